"""Where does a training step's time go: is it the device's kernels or the host launching them?

For each variant of `bench_train_step.py` (float, mixq, ...), a few steps under torch.profiler, after
warm-up: the step's wall time, the summed device time of its kernels (CUDA) or of its operators
(CPU), the number of kernels launched per step, the host time spent in launches, and the operators
with the most self device time; with `--host`, also the Python functions with the most own host time
(cProfile). On CUDA, a step whose wall time is far above its kernel time is
host-bound (launch overhead: fewer, fused kernels help) and one whose kernel time is far above
float's is kernel-bound (the kernels themselves must get faster).

    python benchmarks/profile_step.py --device cuda --variants float,mixq,mixq_plain --json

Writes results/profile_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    check_variants,
    machine_info,
    machine_line,
    make_batch,
    make_variant,
    results_paths,
    warm_up,
    write_results,
)
from bench_train_step import BATCH  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def profile_variant(v, x, y, steps: int, top: int) -> dict:
    device = x.device.type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            v.step(x, y)
        if device == "cuda":
            torch.cuda.synchronize()
        wall_s = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_s = sum(k.device_time for k in kernels) / 1e6 / steps
        launches = len(kernels) / steps
        launch_s = sum(e.self_cpu_time_total for e in events
                       if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                    "cudaLaunchKernelExC")) / 1e6 / steps
        # the host waiting for the device inside the step (the final cudaDeviceSynchronize is ours)
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaMemcpy")) / steps
        ranked = sorted(events, key=lambda e: -e.self_device_time_total)
        top_ops = [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps)
                   for e in ranked[:top] if e.self_device_time_total > 0]
    else:
        device_s, launches, launch_s, syncs = None, None, None, None
        ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
        top_ops = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in ranked[:top]]
    return {"variant": v.name, "wall_ms": wall_s * 1e3,
            "kernel_ms": device_s * 1e3 if device_s is not None else None,
            "launches_per_step": launches, "launch_host_ms": launch_s * 1e3 if launch_s is not None else None,
            "syncs_per_step": syncs, "top": [{"op": k, "ms": round(ms, 3), "calls": round(c, 1)}
                                             for k, ms, c in top_ops]}


def host_profile(v, x, y, steps: int, top: int) -> list[dict]:
    """The Python functions that take the host's time in a step (cProfile, own time per step): where
    a host-bound step's time goes, which torch.profiler's operator view does not show."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        v.step(x, y)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    rows = []
    for (path, line, func), (_, calls, own_s, cum_s, _) in pstats.Stats(prof).stats.items():
        where = "/".join(Path(path).parts[-2:]) + f":{line}" if line else path
        rows.append({"function": f"{where}({func})", "own_ms": own_s * 1e3 / steps,
                     "cum_ms": cum_s * 1e3 / steps, "calls": calls / steps})
    rows.sort(key=lambda r: -r["own_ms"])
    return [{k: round(val, 3) if isinstance(val, float) else val for k, val in r.items()}
            for r in rows[:top]]


def render(results: list[dict], device: str) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"{'variant':14s} {'wall ms':>8s} {'kernel ms':>9s} {'launches':>8s} {'launch ms':>9s} "
             f"{'syncs':>5s}"]
    for r in results:
        lines.append(f"{r['variant']:14s} {r['wall_ms']:8.1f} {f(r['kernel_ms'], '9.1f')} "
                     f"{f(r['launches_per_step'], '8.0f')} {f(r['launch_host_ms'], '9.1f')} "
                     f"{f(r['syncs_per_step'], '5.1f')}")
    for r in results:
        what = "self device time" if device == "cuda" else "self CPU time"
        lines += ["", f"{r['variant']}: top operators by {what} per step"]
        lines += [f"  {t['ms']:8.3f} ms  {t['calls']:6.1f} calls  {t['op'][:90]}" for t in r["top"]]
        if r.get("host"):
            lines += ["", f"{r['variant']}: Python functions by own host time per step (cProfile)"]
            lines += [f"  {t['own_ms']:8.3f} ms own {t['cum_ms']:9.3f} ms cum {t['calls']:7.1f} calls  "
                      f"{t['function'][:80]}" for t in r["host"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=list(BATCH), default="resnet20")
    p.add_argument("--variants", default="float,mixq,mixq_plain,torch_lsq")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--host", action="store_true",
                   help="also profile the host's Python per step (cProfile): what a host-bound step spends")
    p.add_argument("--json", action="store_true", help="print the results JSON as the last line")
    p.add_argument("--out", default=None,
                   help="results file stem: a bare name under benchmarks/results/, or a path")
    a = p.parse_args(argv)
    if a.out:
        results_paths(a.out)  # a bad folder fails now, not after the run
    try:
        check_variants(a.variants.split(","))
    except ValueError as err:
        p.error(f"--variants: {err}")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch.cuda.is_available() is False here; use --device cpu")
    info = machine_info()
    print("machine:", machine_line(info), flush=True)
    x, y = make_batch(a.model, BATCH[a.model], a.device)
    results = []
    for kind in a.variants.split(","):
        v = make_variant(kind, a.model, x, y, a.mode, a.precision, penalty=True)
        if v is None:
            print(f"{kind}: not installed, skipped")
            continue
        warm_up([v], x, y, a.warmup)
        results.append(profile_variant(v, x, y, a.steps, a.top))
        if a.host:
            results[-1]["host"] = host_profile(v, x, y, a.steps, a.top)
        print(f"{kind}: {results[-1]['wall_ms']:.1f} ms per step", flush=True)
        del v
        torch._dynamo.reset()
    text = render(results, a.device)
    print("\n" + text)
    head = (f"{a.model}, batch {BATCH[a.model]}, {a.mode}, {a.precision}, {a.steps} profiled steps "
            f"after {a.warmup} warm-up steps")
    md = f"# profile_step\n\nMachine: {machine_line(info)}.\n\n{head}.\n\n```\n{text}\n```\n"
    stem = a.out or f"profile_step_{a.device}"
    payload = {"benchmark": "profile_step", "machine": info, "args": vars(a), "results": results}
    jpath, mpath = write_results(stem, payload, md)
    print(f"\nwrote {jpath} and {mpath}")
    if a.json:
        print(json.dumps({r["variant"]: {k: r[k] for k in ("wall_ms", "kernel_ms", "launches_per_step")}
                          for r in results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
