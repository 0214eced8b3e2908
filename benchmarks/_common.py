"""Shared pieces of the benchmarks: the machine description, the QAT variants (float, mixq's, and
the competitors' of `baselines.py`), interleaved timing, peak memory and tables.

Timing: all variants of one (model, mode, precision) group are built first, warmed up, and then timed
in alternating order, one step each per repetition, in the same process: slow phases of a shared CPU
hit every variant alike, and every ratio is QAT over float from the same repetitions. Reported: the
median step time of each variant, the ratio of the medians, and the median of the per-repetition
ratios (the steadier number on a busy machine) with a 95 % bootstrap interval of that median (how far
the VM's noise lets the number move; `rep_ratio_interval`).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over one step minus the memory allocated
before it, plus, for a step replayed as a CUDA graph (which allocates nothing), the bytes its
graph's private pool reserves (activations, saved tensors, gradients; free blocks counted). On the
CPU, the tensor memory timeline of torch.profiler (profile_memory=True): every allocation and free
of one training step in order, summed; the peak of that sum (parameters, gradients, optimizer state
and activations that the step touches; the allocator has no cache on the CPU, so this is what the
step holds at its worst moment). One separate profiled step per variant, not one of the timed ones.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as tF

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baselines import to_brevitas, to_torch_lsq  # noqa: E402

import mixq  # noqa: E402
from mixq import QuantConfig, _kernels, models  # noqa: E402
from mixq.budget import BudgetPenalty, Budgets  # noqa: E402
from mixq.convert import quant_sites  # noqa: E402
from mixq.recipe import PhaseConfig  # noqa: E402
from mixq.size import SizeAccount  # noqa: E402
from mixq.train import PhaseRunner, make_optimizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpus"] = fields.get("CPU(s)", "").strip()
        info["cores_per_socket"] = fields.get("Core(s) per socket", "").strip()
        info["hypervisor"] = fields.get("Hypervisor vendor", "").strip()
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = platform.processor()
    try:
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mixq"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + (" (mixq/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    from mixq import _kernels, host_memory

    info["keep_freed_host_memory"] = host_memory.freed_host_memory_kept()
    info["mixq_fast_kernels"] = {k: v for k, v in _kernels.fast_kernel_status().items()
                                 if k != "variants"}
    return info


def machine_line(info: dict) -> str:
    gpu = f"{info['cuda_device']} with " if info.get("cuda_device") else ""
    return (f"{gpu}{info.get('cpu_model', '?')} ({info.get('cpus', '?')} CPUs), torch {info['torch']}, "
            f"{info['threads']} threads, "
            f"freed CPU memory {'kept for reuse' if info.get('keep_freed_host_memory') else 'returned'}, "
            f"load average at start {info.get('loadavg_start')}, "
            f"commit {info['git_commit'][:12]}"
            f"{' + uncommitted mixq/ changes' if 'uncommitted' in info['git_commit'] else ''}, "
            f"{info['date']}")


# -------------------------------------------------------------------------------------- variants
class _Ramp:
    def ramp(self, progress):
        return 1.0


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: object  # step(x, y) -> None
    note: str = ""
    times: list = field(default_factory=list)
    peak_bytes: float | None = None
    compile_s: float | None = None
    max_reps: int | None = None  # a very slow variant (Brevitas) is timed in the first reps only
    faults: list = field(default_factory=list)  # minor page faults per timed step (CPU)
    runner: object = None  # the PhaseRunner of the trainer variants (its CUDA graph, if any)


def build_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model(name, in_channels=1 if name == "fmnist_cnn" else 3)


def make_batch(name: str, batch: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c, hw = (1, 28) if name == "fmnist_cnn" else (3, 32)
    x = torch.randn(batch, c, hw, hw, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# (weight, activation) rounding-gradient modifier of the mixq variants that change them
_MODIFIERS = {"mixq_ste": ("ste", "ste"), "mixq_ewgs_act": ("ewgs", "ewgs")}
VARIANTS = ("float", "mixq", "mixq_bn", "mixq_ste", "mixq_ewgs_act", "mixq_plain", "mixq_triton",
            "mixq_inductor", "float_graphed", "mixq_graphed", "torch_lsq", "brevitas")


def check_variants(names: list[str]) -> None:
    """Raise ValueError naming the first unknown variant, the known ones and the closest match."""
    for name in names:
        if name not in VARIANTS:
            close = difflib.get_close_matches(name, VARIANTS, n=1)
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))


def make_variant(kind: str, model_name: str, x, y, mode: str, precision: str,
                 penalty: bool = True) -> Variant | None:
    """One training-step variant. kind: one of VARIANTS. mode: eager | compiled. mixq is QAT as mixq
    trains: BatchNorm folded into the convs first (`fold_bn_`, what the main job and the integer
    export do; the float model keeps its BatchNorm), mixq's default kernel settings (on CUDA: the
    hand-written Triton kernels of mixq._triton); every mixq_* variant folds too, except mixq_bn,
    which keeps BatchNorm in training mode (a prepare_ without fold_bn_; what `mixq` measured
    before commit f9a183b: the mixq rows of the result files before run6); mixq_ste is
    mixq with both rounding-gradient modifiers off (plain straight-through estimator, what the
    EWGS/ATanh modifiers cost); mixq_ewgs_act has EWGS on the activations instead of ATanh (what
    ATanh costs over EWGS); float_graphed and mixq_graphed (CUDA) are float and mixq through
    mixq's trainer with its CUDA graphs (`mixq.graphs`: forward and backward replayed as one graph,
    optimizer eager); mixq_plain keeps CUDA tensors on the plain ops (the default before
    2026-11-27), mixq_triton and mixq_inductor pick the CUDA backend of the fused kernels (eager
    mode; compiled mode traces the plain ops either way).

    float and torch_lsq: forward, cross-entropy (label smoothing 0.1), backward, SGD step. mixq: the
    real step of mixq.train.PhaseRunner: with `penalty`, SizeAccount + BudgetPenalty (weight budget
    at half the current weight size, so it is active) added to the loss; after backward the
    quantizer gradient clipping, the optimizer step, the projection of every quantizer.
    """
    check_variants([kind])
    device = x.device.type
    model = build_model(model_name).to(x.device)
    is_mixq = kind.startswith("mixq")
    graphed = kind.endswith("_graphed")
    trainer = is_mixq or graphed  # the step of mixq.train.PhaseRunner, not the hand-written loop
    phase = PhaseConfig(name=kind, penalty=penalty and is_mixq, quantizers="learned")
    note = ""
    account = pen = None
    kernels = {"mixq_triton": "triton", "mixq_inductor": "inductor", "mixq_plain": "plain"}.get(kind)
    if is_mixq:
        config = QuantConfig()
        w_mod, a_mod = _MODIFIERS.get(kind, (config.weight.modifier, config.act.modifier))
        config = QuantConfig(weight=config.weight.replace(modifier=w_mod),
                             act=config.act.replace(modifier=a_mod))
        if kind != "mixq_bn":  # what the main job and the integer export do before QAT
            mixq.fold_bn_(model)
        mixq.prepare_(model, config, example_input=x[:2])
        mixq.calibrate_(model, [x[:128]])
        if penalty:
            account = SizeAccount(model)
            with torch.no_grad():
                wbytes = float(account()["weight_bits"]) / 8
            pen = BudgetPenalty(Budgets(weight_bytes=0.5 * wbytes)).to(x.device)
        note = (f"U3 W per-channel ({w_mod.upper()}) + A per-tensor ({a_mod.upper()})"
                + (", size penalty" if penalty else "")
                + (", BatchNorm kept" if kind == "mixq_bn" else ", BatchNorm folded"))
    elif kind == "torch_lsq":
        to_torch_lsq(model)
        note = "learnable per-channel W4 + per-tensor A8"
    elif kind == "brevitas":
        if to_brevitas(model) is None:
            return None
        note = "QuantConv2d/QuantLinear W4 per-channel"
    model.train()
    opt = make_optimizer(model, phase)
    fwd_model = torch.compile(model) if mode == "compiled" else model
    qmods = [s.quant for s in quant_sites(model)] if is_mixq else []
    runner = PhaseRunner(fwd_model, phase, 0, None, _Ramp(), None, penalty=pen, account=account,
                         cuda_graphs=graphed)
    amp = precision
    if kernels:
        note += f"; fused kernels on CUDA: {kernels}"
    if graphed:
        note += ("; " if note else "") + "mixq trainer, CUDA graph of forward + backward"

    def step(xb, yb):
        if trainer:
            settings = (contextlib.nullcontext() if not kernels else
                        _kernels.fast_kernels(True, devices=("cpu",)) if kernels == "plain" else
                        _kernels.fast_kernels(True, devices=("cpu", "cuda"), cuda_backend=kernels))
            with settings, _autocast(device, amp):
                # PhaseRunner._step: forward, loss (+ penalty), backward, clip, step, project
                runner._step(xb, yb, opt, qmods, is_mixq, 0.5)
            return
        with _autocast(device, amp):
            logits = fwd_model(xb)
            loss = tF.cross_entropy(logits.float(), yb, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Variant(kind, model, step, note, runner=runner if trainer else None)


# ------------------------------------------------------------------------------------------ timing
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(v: Variant, x, y) -> float:
    device = x.device.type
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        v.step(x, y)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    v.step(x, y)
    elapsed = time.perf_counter() - t0
    # memory mapped anew and touched: one fault per 4 KiB page (see mixq.host_memory)
    v.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    return elapsed


def warm_up(variants: list[Variant], x, y, steps: int) -> None:
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(steps):
            v.step(x, y)
        _sync(x.device.type)
        v.compile_s = time.perf_counter() - t0  # the first steps, compilation included


def time_interleaved(variants: list[Variant], x, y, reps: int) -> None:
    for r in range(reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            if v.max_reps is None or len(v.times) < v.max_reps:
                v.times.append(time_step(v, x, y))


def peak_memory(v: Variant, x, y) -> float | None:
    """Peak bytes held during one step (see the module doc for how), or None if unavailable."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        v.step(x, y)
        torch.cuda.synchronize()
        graph = getattr(v.runner, "_graph", None)
        # a replayed CUDA graph allocates nothing: what it holds is its private pool (reserved,
        # so counted whole, free blocks included)
        pool = graph.pool_bytes() if graph is not None else 0
        return float(torch.cuda.max_memory_allocated() - base + pool)
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            v.step(x, y)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        return float(max(sum(s) for s in sizes)) if sizes else None
    except Exception as err:  # the private memory timeline API moved: say so, do not guess
        print(f"  (peak memory not measured for {v.name}: {type(err).__name__}: {err})")
        return None


def rep_ratio_interval(ratios: list[float], level: float = 0.95, resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of the per-repetition ratios: the repetitions
    are resampled with replacement (seeded, so a results file is reproducible from its times)."""
    if not ratios:
        raise ValueError("rep_ratio_interval needs at least one ratio")
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor(ratios, dtype=torch.float64)
    picks = torch.randint(0, len(ratios), (resamples, len(ratios)), generator=g)
    # statistics.median's convention (the mean of the two middle values), not torch's lower median
    medians = r[picks].sort(dim=1).values
    n = len(ratios)
    medians = 0.5 * (medians[:, (n - 1) // 2] + medians[:, n // 2])
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(medians, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def summarize(variants: list[Variant]) -> dict:
    """Medians and ratios to the variant named 'float'."""
    base = next(v for v in variants if v.name == "float")
    out = {}
    for v in variants:
        med = statistics.median(v.times)
        per_rep = [t / b for t, b in zip(v.times, base.times, strict=False)]
        out[v.name] = {
            "median_s": med, "min_s": min(v.times), "times_s": v.times,
            "ratio_of_medians": med / statistics.median(base.times),
            "median_of_rep_ratios": statistics.median(per_rep),
            "rep_ratio_ci95": rep_ratio_interval(per_rep),
            "peak_bytes": v.peak_bytes,
            "peak_ratio": (v.peak_bytes / base.peak_bytes
                           if v.peak_bytes and base.peak_bytes else None),
            "first_steps_s": v.compile_s, "note": v.note, "reps": len(v.times),
            "page_faults_per_step": statistics.median(v.faults) if v.faults else None,
        }
    return out


def table(rows: list[dict], title: str) -> str:
    head = (f"{'model':<11} {'dev':<4} {'mode':<8} {'prec':<5} {'variant':<13} {'median ms':>10} "
            f"{'x float':>8} {'rep-ratio':>9} {'95% interval':>13} {'peak MiB':>9} {'x float':>8} "
            f"{'1st steps s':>11} {'faults/step':>11}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        if r.get("missing"):
            lines.append(f"{r['model']:<11} {r['device']:<4} {r['mode']:<8} {r['precision']:<5} "
                         f"{r['variant']:<13} {r['missing']}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r.get("peak_bytes") else f"{'-':>9}"
        pr = f"{r['peak_ratio']:8.2f}" if r.get("peak_ratio") else f"{'-':>8}"
        first = f"{r['first_steps_s']:11.1f}" if r.get("first_steps_s") is not None else f"{'-':>11}"
        faults = r.get("page_faults_per_step")
        faults = f"{faults:11,.0f}" if faults is not None else f"{'-':>11}"
        ci = r.get("rep_ratio_ci95")
        ci = f"{ci[0]:6.2f}-{ci[1]:<6.2f}" if ci else f"{'-':>13}"
        lines.append(
            f"{r['model']:<11} {r['device']:<4} {r['mode']:<8} {r['precision']:<5} {r['variant']:<13} "
            f"{r['median_s'] * 1e3:10.1f} {r['ratio_of_medians']:8.2f} {r['median_of_rep_ratios']:9.2f} "
            f"{ci} {peak} {pr} {first} {faults}")
    return "\n".join(lines)


def results_paths(stem: str) -> tuple[Path, Path]:
    """The JSON and Markdown files of `--out STEM`: a bare name lies under benchmarks/results/, a
    path (`runs/x`, `/tmp/x`, `benchmarks/results/x`, with or without .json) where it says.
    Scripts call it on --out right after parsing, so a folder that does not exist fails at once,
    not after the run."""
    path = Path(stem)
    if path.suffix in (".json", ".md"):
        path = path.with_suffix("")
    if len(path.parts) == 1:
        path = RESULTS / path
    if not path.parent.is_dir():
        raise SystemExit(f"--out {stem!r}: the folder {path.parent} does not exist; give a bare name "
                         f"(written under {RESULTS}) or a path in an existing folder")
    return path.parent / f"{path.name}.json", path.parent / f"{path.name}.md"


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    jpath, mpath = results_paths(stem)
    jpath.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath
