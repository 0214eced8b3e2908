"""Training-step time and peak memory: float vs mixq vs PyTorch's learnable fake-quant ops (vs
Brevitas when it is installed), ResNet-20 (batch 512, 32x32) and the Fashion-MNIST CNN (batch 256,
28x28), eager and torch.compile, fp32 and bf16 autocast, CPU and CUDA (when available).

    python benchmarks/bench_train_step.py --device cpu --quick --json

mixq's step is the real one of mixq.train.PhaseRunner._step on the model as mixq trains it
(BatchNorm folded into the convs by `fold_bn_`, as the main job does; the mixq_bn row keeps
BatchNorm): U3 per-channel weights (EWGS) and per-tensor activations (ATanh) at every conv and
linear, the size penalty active (SizeAccount + BudgetPenalty with a weight budget at half the
model's size), backward, clip_grads_, the SGD step (Nesterov, the recipe's parameter groups) and
project_ of every quantizer. float and PyTorch's ops (on the model with its BatchNorm): forward,
loss, backward, the same optimizer. bf16 runs the whole step under torch.autocast.
See benchmarks/_common.py for how time and memory are measured. The last line with --json is one
JSON object (cpu_eager_fp32_ratio: mixq over float step time, ResNet-20, same run: the median of
the per-repetition ratios; *_ratio_ci95 its 95 % bootstrap interval; *_ratio_of_medians is the
other estimate).
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
    VARIANTS,
    check_variants,
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
from baselines import brevitas_version  # noqa: E402

from mixq import host_memory  # noqa: E402

BATCH = {"resnet20": 512, "fmnist_cnn": 256}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--quick", action="store_true", help="few repetitions, fits 15 min on 2 CPU cores")
    p.add_argument("--json", action="store_true", help="print the summary JSON as the last line")
    p.add_argument("--models", default="resnet20,fmnist_cnn")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--precisions", default=None,
                   help="fp32,bf16 (quick: fp32; bf16 eager ResNet-20 steps on the shared CPU take "
                        "1.5 to 25 s, too slow and too erratic for the quick budget)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps per variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the groups that would end after this many seconds (quick: 780)")
    p.add_argument("--compile-estimate-s", type=float, default=420.0,
                   help="expected duration of a compiled group never run before (for --budget-s)")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: freed CPU memory is kept for reuse (mixq.host_memory, what `mixq train` "
                        "does on the CPU; the whole process, float included); default: glibc's "
                        "defaults, every large tensor mapped and page-faulted anew each step")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-brevitas", action="store_true")
    p.add_argument("--variants", default=None,
                   help="only these variants (comma-separated; float is always run: every ratio is "
                        f"to it): {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None,
                   help="results file stem: a bare name under benchmarks/results/, or a path")
    a = p.parse_args(argv)
    if a.out:
        results_paths(a.out)  # a bad folder fails now, not after the run
    try:
        check_variants(a.variants.split(",") if a.variants else [])
    except ValueError as err:
        p.error(f"--variants: {err}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.malloc == "keep" and not host_memory.keep_freed_host_memory():
        print("note: --malloc keep does nothing here (the C library is not glibc)")
    a.precisions = a.precisions or ("fp32" if a.quick else "fp32,bf16")
    reps = a.reps or 15
    warmup = a.warmup or (1 if a.quick else 3)
    budget = a.budget_s or (780.0 if a.quick else float("inf"))
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    info = machine_info()
    print("machine:", machine_line(info))
    print(f"reps {reps}, warm-up {warmup}, brevitas: {brevitas_version() or 'not installed'}")
    t_start = time.perf_counter()
    rows, summary = [], {}
    # most important first, so that a time budget drops the least useful groups: ResNet-20 eager
    # fp32, compiled fp32, then the CNN and bf16
    # (compiled bf16 after the CNN's eager and compiled fp32 groups: it compiles from a cold cache)
    rank = {("eager", "fp32"): 0, ("compiled", "fp32"): 1, ("eager", "bf16"): 2, ("compiled", "bf16"): 4}
    groups = sorted(((d, m, p_, mo) for d in devices for m in a.models.split(",")
                     for p_ in a.precisions.split(",") for mo in a.modes.split(",")),
                    key=lambda g: (devices.index(g[0]),
                                   rank.get((g[3], g[2]), 9) + 1.5 * (g[1] != "resnet20")))
    batches, durations = {}, {}
    for device, model_name, precision, mode in groups:
        if (model_name, device) not in batches:
            batches = {(model_name, device): make_batch(model_name, BATCH[model_name], device)}
        x, y = batches[(model_name, device)]
        group = dict(model=model_name, device=device, mode=mode, precision=precision)
        kinds = ["float", "mixq", "mixq_bn", "mixq_ste", "mixq_ewgs_act", "torch_lsq"]
        if device == "cuda" and mode == "eager":  # mixq's fused kernels on CUDA: both backends
            kinds[4:4] = ["mixq_plain", "mixq_inductor"]  # mixq itself runs Triton there
        if device == "cuda":  # mixq's trainer replays each step as a CUDA graph there
            kinds[2:2] = ["float_graphed", "mixq_graphed"]
        if mode == "eager" and precision == "fp32" and not a.no_brevitas:
            kinds.append("brevitas")
        if a.variants:
            kinds = [k for k in kinds if k == "float" or k in a.variants.split(",")]
        # a group is skipped when it would likely end past the budget: its estimate is the last
        # group of the same model and mode; a compiled group of a new model compiles from a cold
        # cache: the longest compiled group of its precision so far (ResNet-20 runs first and is the
        # largest), or --compile-estimate-s for a precision never compiled
        first = (durations.get(("compiled", precision), a.compile_estimate_s) if mode == "compiled"
                 else durations.get((model_name, mode), 120.0))
        estimate = durations.get((model_name, mode, precision), first)
        if time.perf_counter() - t_start + estimate > budget:
            rows += [{**group, "variant": k, "missing": "skipped: time budget"} for k in kinds]
            continue
        t_group = time.perf_counter()
        variants = []
        for k in kinds:
            v = make_variant(k, model_name, x, y, mode, precision, penalty=True)
            if v is None:
                rows.append({**group, "variant": k, "missing": f"{k}: not installed"})
            else:
                if k == "brevitas":  # 4x (CPU) to 45x (H100) slower than float: a few reps
                    v.max_reps = 2 if a.quick else 5
                variants.append(v)
        print(f"\n{model_name} {device} {mode} {precision}: "
              f"{', '.join(v.name for v in variants)}", flush=True)
        warm_up(variants, x, y, warmup)
        time_interleaved(variants, x, y, reps)
        if not a.no_memory:
            for v in variants:
                v.peak_bytes = peak_memory(v, x, y)
        result = summarize(variants)
        group_rows = [{**group, "variant": k, "batch": BATCH[model_name], **r}
                      for k, r in result.items()]
        rows += group_rows
        print(table(group_rows, ""), flush=True)
        if "mixq" in result:
            key = f"{device}_{mode}_{precision}"
            if model_name != "resnet20":
                key = f"{model_name}_{key}"
            # the median of the per-repetition ratios: robust to the load of a shared machine
            # changing during the run (which moves the two medians apart)
            summary[f"{key}_ratio"] = round(result["mixq"]["median_of_rep_ratios"], 4)
            summary[f"{key}_ratio_of_medians"] = round(result["mixq"]["ratio_of_medians"], 4)
            summary[f"{key}_ratio_ci95"] = [round(b, 4) for b in result["mixq"]["rep_ratio_ci95"]]
            if result["mixq"]["peak_ratio"]:
                summary[f"{key}_peak_ratio"] = round(result["mixq"]["peak_ratio"], 4)
            for other in (k for k in VARIANTS if k not in ("float", "mixq", "brevitas")):
                if other in result:
                    summary[f"{key}_{other}_ratio"] = round(result[other]["median_of_rep_ratios"], 4)
                    if result[other]["peak_ratio"]:
                        summary[f"{key}_{other}_peak_ratio"] = round(result[other]["peak_ratio"], 4)
            if "mixq_graphed" in result and "float_graphed" in result:  # both through the trainer
                summary[f"{key}_mixq_graphed_vs_float_graphed"] = round(
                    result["mixq_graphed"]["median_s"] / result["float_graphed"]["median_s"], 4)
        del variants
        gc.collect()
        torch._dynamo.reset()
        spent = time.perf_counter() - t_group
        durations[(model_name, mode, precision)] = durations[(model_name, mode)] = spent
        if mode == "compiled":
            durations[("compiled", precision)] = max(spent, durations.get(("compiled", precision), 0.0))
    elapsed = time.perf_counter() - t_start
    title = (f"Training step, QAT vs float (x float = ratio of medians; rep-ratio = median of the "
             f"per-repetition ratios, with its 95 % bootstrap interval), {reps} interleaved reps "
             f"after {warmup} warm-up steps")
    text = table(rows, title)
    print("\n" + text)
    info["loadavg_end"] = _loadavg()
    stem = a.out or f"train_step_{'_'.join(devices)}{'_quick' if a.quick else ''}"
    payload = {"benchmark": "bench_train_step", "machine": info, "args": vars(a), "reps": reps,
               "warmup": warmup, "elapsed_s": elapsed, "summary": summary, "rows": rows,
               "brevitas": brevitas_version()}
    md = (f"# bench_train_step{' --quick' if a.quick else ''}\n\nMachine: {machine_line(info)}; load "
          f"average at the end {info['loadavg_end']}. Run time {elapsed:.0f} s.\n\n"
          "Peak memory: CPU rows from the torch.profiler memory timeline of one extra step "
          "(all tensors alive at the worst moment); CUDA rows from torch.cuda.max_memory_allocated "
          "(plus the private pool of a step replayed as a CUDA graph, reserved whole).\n\n"
          "```\n" + text + "\n```\n\nSummary (ResNet-20 unless prefixed): `" + json.dumps(summary) + "`\n")
    jpath, mpath = write_results(stem, payload, md)
    print(f"\nwrote {jpath} and {mpath} ({elapsed:.0f} s)")
    if a.json:
        print(json.dumps({**summary, "elapsed_s": round(elapsed, 1), "results": str(jpath),
                          "machine": info.get("cpu_model"), "threads": info["threads"],
                          "torch": info["torch"]}))
    return 0


def _loadavg():
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
