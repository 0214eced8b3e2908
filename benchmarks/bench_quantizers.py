"""Cost of the quantizers in a training step: the Fashion-MNIST CNN (mixq.models.fmnist_cnn, 1x28x28)
at batch 256 on the CPU, float vs mixq vs PyTorch's own learnable fake-quant ops at the same sites,
eager and torch.compile, in one run.

    python benchmarks/bench_quantizers.py            # eager and compiled, 15 interleaved reps
    python benchmarks/bench_quantizers.py --quick    # eager only, 3 reps: under a minute

mixq: U3 per-channel weights (EWGS) and per-tensor activations (ATanh) at the input of every conv
and linear, the step of mixq.train without a budget penalty (forward, loss, backward, quantizer
gradient clipping, SGD step, projection; bench_train_step.py adds the penalty). PyTorch:
torch._fake_quantize_learnable_per_channel_affine (weights, 4 bits) and
torch._fake_quantize_learnable_per_tensor_affine (inputs, 8 bits), LSQ gradient factors. Target:
mixq at most 1.5x float in eager mode. Timing method: benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    machine_info,
    machine_line,
    make_batch,
    make_variant,
    peak_memory,
    results_paths,
    summarize,
    table,
    time_interleaved,
    warm_up,
    write_results,
)

MODEL, BATCH = "fmnist_cnn", 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="eager only, 3 reps, no memory (< 1 min)")
    p.add_argument("--modes", default=None, help="eager,compiled (quick: eager)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None,
                   help="results file stem: a bare name under benchmarks/results/, or a path")
    a = p.parse_args(argv)
    if a.out:
        results_paths(a.out)  # a bad folder fails now, not after the run
    if a.threads:
        torch.set_num_threads(a.threads)
    reps = a.reps or (3 if a.quick else 15)
    warmup = a.warmup or (1 if a.quick else 3)
    modes = (a.modes or ("eager" if a.quick else "eager,compiled")).split(",")
    memory = not (a.no_memory or a.quick)
    info = machine_info()
    print("machine:", machine_line(info))
    t0 = time.perf_counter()
    x, y = make_batch(MODEL, BATCH, "cpu")
    rows, summary = [], {}
    for mode in modes:
        variants = [make_variant(k, MODEL, x, y, mode, "fp32", penalty=False)
                    for k in ("float", "mixq", "torch_lsq")]
        warm_up(variants, x, y, warmup)
        time_interleaved(variants, x, y, reps)
        if memory:
            for v in variants:
                v.peak_bytes = peak_memory(v, x, y)
        for k, r in summarize(variants).items():
            rows.append(dict(model=MODEL, device="cpu", mode=mode, precision="fp32", variant=k,
                             batch=BATCH, **r))
            if k != "float":  # the median of per-repetition ratios: robust to load changes
                summary[f"{k}_{mode}_ratio"] = round(r["median_of_rep_ratios"], 4)
                summary[f"{k}_{mode}_ratio_of_medians"] = round(r["ratio_of_medians"], 4)
        del variants
        gc.collect()
        torch._dynamo.reset()
    elapsed = time.perf_counter() - t0
    title = (f"{MODEL} batch {BATCH}, CPU fp32 training step (x float = ratio of medians; rep-ratio = "
             f"median of per-repetition ratios), {reps} interleaved reps after {warmup} warm-up steps")
    text = table(rows, title)
    print(text)
    if "mixq_eager_ratio" in summary:
        ok = summary["mixq_eager_ratio"] <= 1.5
        print(f"target mixq eager <= 1.5x float: {'met' if ok else 'NOT met'} "
              f"({summary['mixq_eager_ratio']:.2f}x, median of the per-repetition ratios)")
    stem = a.out or f"quantizers_cpu{'_quick' if a.quick else ''}"
    import os

    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    payload = {"benchmark": "bench_quantizers", "machine": info, "args": vars(a), "reps": reps,
               "warmup": warmup, "elapsed_s": elapsed, "summary": summary, "rows": rows}
    md = (f"# bench_quantizers{' --quick' if a.quick else ''}\n\nMachine: {machine_line(info)}; "
          f"load average at the end {info['loadavg_end']}. Run time {elapsed:.0f} s. "
          "'1st steps s' is the time of the warm-up steps (compilation included).\n\n"
          "```\n" + text + "\n```\n\nSummary: `" + json.dumps(summary) + "`\n")
    jpath, mpath = write_results(stem, payload, md)
    print(f"wrote {jpath} and {mpath} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
