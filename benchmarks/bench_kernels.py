"""One uniform fake-quantizer call, forward + backward, at the sizes of a ResNet-20 step at batch 512:
the plain ATen ops vs the inductor-compiled kernels vs the hand-written Triton kernels (CUDA only),
with the memory floor (bytes that must move once: x read and x_hat written in forward; x and the
upstream gradient read and dL/dx written in backward) and the achieved bandwidth.

    python benchmarks/bench_kernels.py --device cuda [--out STEM]

Timing: CUDA events around 50 calls after 10 warm-up calls, the median of 7 such runs (CPU: the
host clock); each call's parameter gradients included. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import machine_info, machine_line, results_paths, write_results  # noqa: E402

import mixq.functional as F  # noqa: E402
from mixq import _kernels  # noqa: E402

# (name, x shape, parameter shape, signed, modifier): ResNet-20's largest activation and a late one
# (per tensor, unsigned, ATanh), its largest conv weight (per output channel, signed, EWGS)
CASES = [("act 512x16x32x32", (512, 16, 32, 32), (), False, "atanh"),
         ("act 512x64x8x8", (512, 64, 8, 8), (), False, "atanh"),
         ("weight 64x64x3x3", (64, 64, 3, 3), (64, 1, 1, 1), True, "ewgs")]


def _call(x, s, q, g, signed, modifier):
    x.grad = s.grad = q.grad = None  # no gradient accumulation kernels in the timing
    y = F.fake_quant_uniform(x, s, q, signed, modifier, 5e-3)
    y.backward(g)


def _time(fn, device: str, calls: int = 50, runs: int = 7) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None,
                   help="results file stem: a bare name under benchmarks/results/, or a path")
    a = p.parse_args(argv)
    if a.out:
        results_paths(a.out)  # a bad folder fails now, not after the run
    info = machine_info()
    print("machine:", machine_line(info), info.get("cuda_device", ""))
    backends = ["plain", "inductor"] + (["triton"] if a.device == "cuda" else [])
    rows, summary = [], {}
    for name, xshape, pshape, signed, modifier in CASES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(xshape, generator=gen).abs_().to(a.device).requires_grad_()
        if signed:
            x = (x.detach() * torch.sign(torch.randn(xshape, generator=gen)).to(a.device)).requires_grad_()
        g = torch.randn(xshape, generator=gen).to(a.device)
        s = torch.full(pshape, 2.0**-5, device=a.device, requires_grad=True)
        q = torch.full(pshape, 3.0, device=a.device, requires_grad=True)
        floor_bytes = x.numel() * x.element_size() * 5  # fwd: x, x_hat; bwd: x, g, dL/dx
        for backend in backends:
            settings = _kernels.fast_kernels(backend != "plain", min_numel=0, devices=("cpu", "cuda"),
                                             cuda_backend=None if backend == "plain" else backend)
            with settings:
                args = (x, s, q, g, signed, modifier)
                seconds = _time(lambda args=args: _call(*args), a.device,
                                *((50, 7) if a.device == "cuda" else (2, 3)))
            row = {"case": name, "backend": backend, "us": seconds * 1e6,
                   "gb_per_s": floor_bytes / seconds / 1e9, "floor_bytes": floor_bytes}
            rows.append(row)
            print(f"{name:<18} {backend:<9} {row['us']:9.1f} us  {row['gb_per_s']:7.1f} GB/s")
        base = next(r["us"] for r in rows if r["case"] == name and r["backend"] == "plain")
        for r in rows:
            if r["case"] == name:
                r["x_plain"] = r["us"] / base
                summary[f"{name.split()[0]}_{name.split()[1]}_{r['backend']}_us"] = round(r["us"], 1)
    lines = ["| case | backend | us per call (fwd + bwd) | x plain | GB/s over the floor bytes |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['backend']} | {r['us']:.1f} | {r['x_plain']:.2f} | {r['gb_per_s']:.0f} |"
              for r in rows]
    text = "\n".join(lines)
    stem = a.out or f"kernels_{a.device}"
    md = (f"# bench_kernels ({a.device})\n\nMachine: {machine_line(info)} {info.get('cuda_device', '')}\n\n"
          + text + "\n\nFloor bytes: x read + x_hat written (forward), x + upstream gradient read and "
          "dL/dx written (backward), at the input's dtype (float32).\n")
    write_results(stem, {"benchmark": "bench_kernels", "machine": info, "rows": rows, "summary": summary}, md)
    print(text)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
