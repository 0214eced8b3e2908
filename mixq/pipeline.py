"""The main job: recipe -> data + model -> float pretraining -> fold_bn_ + prepare_ + calibrate_
-> QAT phases under the budgets -> the final model, its report, plots and summary.

`train_run` is what `mixq train` calls. Stages are numbered: 0 is float pretraining, 1.. are the
recipe's QAT phases; the checkpoint ckpt/last.pt records the stage and the step inside it, so an
interrupted run resumes where it stopped and ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from . import host_memory
from . import size as size_mod
from .budget import (
    BudgetPenalty,
    Budgets,
    check_feasible,
    element_counts,
    enforce_budgets_,
    ramp,
    resolve_budgets,
    weight_importance,
)
from .config import UNITS
from .convert import calibrate_, fold_bn_, prepare_, quant_plan
from .data import load_dataset
from .loader import DeviceLoader
from .models import create_model
from .recipe import PhaseConfig, Recipe, recipe_from_dict
from .runs import Progress, RunFolder, environment
from .train import Interrupted, NonFiniteLoss, PhaseProgress, PhaseRunner, StopFlag, evaluate, save_atomic

QUICK_TRAIN, QUICK_VAL, QUICK_TEST = 2000, 500, 1000


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or belongs to another recipe."""


def load_checkpoint(path: Path) -> dict:
    """torch.load with a clear error instead of a traceback from deep inside torch."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(f"checkpoint {path} is damaged or not a mixq checkpoint ({err}); "
                              "delete it to start that stage again") from None


def load_model_state(model: nn.Module, state: dict, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no model state")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("other shape", shapes)) if keys)
        raise CheckpointError(f"checkpoint {path} does not match this recipe's model ({details}); was "
                              "it written by another recipe or mixq version?")
    model.load_state_dict(state)


def quick_recipe(recipe: Recipe) -> Recipe:
    """--quick: one short epoch per phase on 2,000 training images (batches of at most 64, so that
    even the smoke run takes a few dozen steps per phase and learns something)."""
    one = {"epochs": 1.0, "evals_per_epoch": 1}
    return dataclasses.replace(
        recipe,
        pretrain=dataclasses.replace(recipe.pretrain, **one),
        phases=tuple(dataclasses.replace(p, **one) for p in recipe.phases),
        data=dataclasses.replace(recipe.data, num_train=QUICK_TRAIN, num_test=QUICK_TEST,
                                 val_size=QUICK_VAL, batch_size=min(recipe.data.batch_size, 64)),
    )


class Job:
    """Everything one run holds: recipe, folder, data loaders, models, budgets."""

    def __init__(self, recipe: Recipe, folder: RunFolder, data_root=None, device=None,
                 progress: bool = True, on_step=None):
        self.recipe, self.folder = recipe, folder
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.show = Progress(enabled=progress)
        self.on_step = on_step or (lambda stage, step: None)
        torch.manual_seed(recipe.seed)
        self._load_data(data_root)
        self.model = self.new_float_model()
        self.teacher: nn.Module | None = None
        self.budgets = Budgets()
        self.account = None
        self.stop = StopFlag()

    # -- data and models ---------------------------------------------------------------------
    def _load_data(self, data_root) -> None:
        cfg = self.recipe.data
        split = load_dataset(cfg.name, root=data_root or cfg.root, image_size=cfg.image_size)
        if cfg.num_train or cfg.num_test:
            split = split.subset(cfg.num_train or len(split.train_y),
                                 cfg.num_test or len(split.test_y), seed=self.recipe.seed)
        self.classes, self.mean, self.std = split.classes, split.mean, split.std
        g = torch.Generator().manual_seed(self.recipe.seed)
        order = torch.randperm(len(split.train_y), generator=g)
        val_size = min(cfg.val_size, len(order) // 5)
        tr, va = order[val_size:], order[:val_size]
        common = {"mean": split.mean, "std": split.std, "device": self.device, "seed": self.recipe.seed}
        self.train = DeviceLoader(split.train_x[tr], split.train_y[tr], batch_size=cfg.batch_size,
                                  shuffle=True, augment=cfg.augment, pad=cfg.pad, flip=cfg.flip,
                                  drop_last=True, **common)
        eval_kw = {"batch_size": cfg.eval_batch_size, "shuffle": False, "augment": False,
                   "drop_last": False, **common}
        self.val = DeviceLoader(split.train_x[va], split.train_y[va], **eval_kw) if val_size else None
        self.test = DeviceLoader(split.test_x, split.test_y, **eval_kw)
        self.input_shape = tuple(split.train_x.shape[1:])

    def new_float_model(self) -> nn.Module:
        cfg = self.recipe.model
        model = create_model(cfg.name, num_classes=cfg.num_classes or len(self.classes),
                             in_channels=self.input_shape[0], stem=cfg.stem)
        return model.to(self.device)

    def example_batch(self) -> torch.Tensor:
        return next(iter(self.test))[0][:2]

    def quantize_(self, model: nn.Module, calibrate: bool) -> None:
        """fold_bn_ + prepare_ (+ calibrate_ on clean training batches) + budgets."""
        recipe = self.recipe
        if recipe.fold_bn:
            fold_bn_(model)
        quant = recipe.quant
        if recipe.start_bits is not None:
            quant = _with_start_bits(quant, self._start_bits(model))
        prepare_(model, quant, example_input=self.example_batch())
        if calibrate:
            clean = DeviceLoader(self.train.x, self.train.y, mean=self.mean, std=self.std,
                                 batch_size=self.recipe.data.batch_size, shuffle=False,
                                 augment=False, drop_last=False, seed=0, device=self.device)
            calibrate_(model, clean, max_batches=4)
        self.budgets = resolve_budgets(dataclasses.asdict(recipe.budget), model)
        check_feasible(model, self.budgets, recipe.budget.unit)
        self.account = size_mod.SizeAccount(model)

    def enforce_budgets_(self, why: str) -> list[str]:
        """Lower bit widths greedily until every budget is met (budget.enforce_budgets_), by the
        recipe's criterion (Fisher-weighted squared error from training batches, or plain)."""
        batch = next(iter(DeviceLoader(self.train.x[:256], self.train.y[:256], mean=self.mean,
                                       std=self.std, batch_size=256, device=self.device)))[0]
        b = self.recipe.budget
        importance = (weight_importance(self.model, self.train, b.fisher_batches)
                      if b.greedy_criterion == "fisher" and self.budgets.weight_bytes is not None else None)
        lowered = enforce_budgets_(self.model, self.budgets, batch, importance)
        self.show.message(f"{why}: lowered {len(lowered)} slices by one bit to meet every budget")
        self.folder.log({"event": "enforce_budgets", "why": why, "lowered": lowered,
                         "sizes": self.sizes_bytes()})
        return lowered

    def _start_bits(self, model: nn.Module) -> int:
        """Schaefer's homogeneous start: floor(average target bits per weight) + 2."""
        if isinstance(self.recipe.start_bits, int):
            return self.recipe.start_bits
        probe = copy.deepcopy(model)
        prepare_(probe, self.recipe.quant, example_input=self.example_batch())
        budgets = resolve_budgets(dataclasses.asdict(self.recipe.budget), probe)
        if budgets.weight_bytes is None:
            raise ValueError("start_bits = 'auto' needs a weight budget")
        bits = 8 * budgets.weight_bytes / element_counts(probe)["weight"]
        return int(math.floor(bits)) + 2

    # -- evaluation ----------------------------------------------------------------------------
    def sizes_bytes(self) -> dict[str, float]:
        with torch.no_grad():
            return {k.replace("_bits", "_bytes"): float(v) / 8 for k, v in self.account().items()}

    def evaluate_val(self) -> dict:
        result = evaluate(self.model, self.val or self.test)
        if self.account is not None:
            result["sizes"] = self.sizes_bytes()
            result["budgets_met"] = self.budgets.met(result["sizes"])
        return result


def _with_start_bits(quant, bits: int):
    w = quant.weight.replace(bits_init=bits, bits_max=max(bits, quant.weight.bits_max))
    return dataclasses.replace(quant, weight=w)


class _Hooks:
    """The PhaseRunner's callbacks for one stage of a Job."""

    def __init__(self, job: Job, stage: int, phase: PhaseConfig, penalty, results: dict):
        self.job, self.stage, self.phase, self.penalty, self.results = job, stage, phase, penalty, results

    def log(self, record):
        self.job.folder.log({"stage": self.stage, **record})

    def progress(self, step, total, text):
        self.job.show.update(step, total, text)

    def evaluate(self):
        return self.job.evaluate_val()

    def size_text(self):
        """' | weight 61.2/61.7 KiB' for the progress line (one host read per logging interval)."""
        job = self.job
        if job.account is None or not job.budgets.items():
            return ""
        sizes, unit = job.sizes_bytes(), job.recipe.budget.unit
        return "".join(f" | {key} {sizes[f'{key}_bytes'] / UNITS[unit]:.1f}/{target / UNITS[unit]:.1f} {unit}"
                       for key, target in job.budgets.items())

    def ramp(self, progress):
        b = self.job.recipe.budget
        return ramp(progress, b.ramp_start, b.ramp_fraction)

    def on_step(self, step):
        self.job.on_step(self.stage, step)

    def save_best(self):
        save_atomic(self.job.model.state_dict(), self.job.folder.ckpt / f"best_stage{self.stage}.pt")

    def checkpoint(self, state: PhaseProgress, opt):
        save_atomic({
            "stage": self.stage, "progress": dataclasses.asdict(state), "model": self.job.model.state_dict(),
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "penalty": self.penalty.state_dict() if self.penalty is not None else None,
            "results": self.results, "recipe": self.job.recipe.to_dict(),
        }, self.job.folder.ckpt / "last.pt")


def train_run(recipe: Recipe, out: str | Path, *, data_root=None, quick: bool = False,
              resume: bool = False, device=None, progress: bool = True, on_step=None) -> dict:
    """Run (or resume) the main job into run folder `out`; returns the summary."""
    folder = RunFolder(out)
    last = folder.ckpt / "last.pt"
    if resume:
        if not folder.path.is_dir():
            raise FileNotFoundError(f"nothing to resume: {folder.path} does not exist")
        saved = recipe_from_dict(folder.read_json("recipe.json"))
        if saved != recipe and recipe is not None:
            print(f"note: resuming {folder.path} with a recipe that differs from recipe.json")
        recipe = recipe or saved
    folder.create(resume=resume)
    if quick and not resume:
        recipe = quick_recipe(recipe)
    folder.write_json("recipe.json", recipe.to_dict())
    job = Job(recipe, folder, data_root=data_root, device=device, progress=progress, on_step=on_step)
    if job.device.type == "cpu" and host_memory.wanted():
        host_memory.keep_freed_host_memory()  # every step reuses its pages (see host_memory)
    folder.write_json("env.json", environment(job.device))
    state = load_checkpoint(last) if resume and last.exists() else None
    results = state["results"] if state else {"started": time.time()}
    start_stage = state["stage"] if state else 0
    if state:
        done = (start_stage, state["progress"]["step"])
        folder.truncate_log(lambda r: (r.get("stage", 0), r.get("step", 0)) <= done)
        job.show.message(f"resuming {folder.path} at stage {start_stage}, step {state['progress']['step']}")
    stages = [recipe.pretrain, *recipe.phases]
    with job.stop:
        try:
            if recipe.method == "flexible":  # NUUQ: float, level allocation, PTQ (+FT), QAT phases
                from .nuuq import run_flexible

                run_flexible(job, results, state)
            for stage in range(start_stage, len(stages)) if recipe.method != "flexible" else ():
                resuming = state is not None and stage == start_stage
                _run_stage(job, stage, stages[stage], state if resuming else None, results)
        except Interrupted as err:
            job.show.message(f"\n{err} received: checkpoint saved to {last}; continue with "
                             f"`mixq train --resume {folder.path}`")
            raise
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"training diverged ({err}); the last good checkpoint is {last}. "
                                "Lower the learning rate (e.g. --set phases.0.lr=...) and resume with "
                                f"--resume {folder.path}") from None
    return finish(job, results)


def _run_stage(job: Job, stage: int, phase: PhaseConfig, state: dict | None, results: dict) -> None:
    folder, recipe = job.folder, job.recipe
    if stage == 1 or (state is not None and stage >= 1):
        if state is None:  # entering QAT: start from the float model
            load_model_state(job.model, load_checkpoint(folder.ckpt / "float.pt"), folder.ckpt / "float.pt")
        job.teacher = copy.deepcopy(job.model).eval() if any(p.distill for p in recipe.phases) else None
        job.quantize_(job.model, calibrate=state is None)
        results["budgets"] = dataclasses.asdict(job.budgets)
    if phase.reload_best and state is None:
        best = folder.ckpt / f"best_stage{stage - 1}.pt"
        if not best.exists():
            raise RuntimeError(f"phase {phase.name!r} reloads the best checkpoint of the previous phase, "
                               "but no checkpoint of that phase met every budget; train the mixed "
                               "phase longer or raise the budget")
        load_model_state(job.model, load_checkpoint(best), best)
    if phase.greedy_start and state is None and stage >= 1 and job.budgets.items():
        job.enforce_budgets_(f"phase {phase.name!r} starts inside its budgets")
    penalty = None
    if phase.penalty and stage >= 1 and job.budgets.items():
        b = recipe.budget
        penalty = BudgetPenalty(job.budgets, b.lambdas, b.unit, b.controller, b.margin).to(job.device)
    progress = PhaseProgress()
    if state is not None:
        load_model_state(job.model, state["model"], folder.ckpt / "last.pt")
        if penalty is not None and state["penalty"] is not None:
            penalty.load_state_dict(state["penalty"])
        torch.set_rng_state(state["rng"])
        progress = PhaseProgress(**state["progress"])
    else:
        torch.manual_seed(recipe.seed * 1000 + stage)
    job.show.begin(phase.name)
    runner = PhaseRunner(job.model, phase, stage, job.train, _Hooks(job, stage, phase, penalty, results),
                         job.stop, penalty=penalty, account=job.account, teacher=job.teacher,
                         cuda_graphs=recipe.cuda_graphs)
    started = time.time()
    runner.run(progress, state["optimizer"] if state is not None else None)
    results.setdefault("stage_seconds", {})[phase.name] = time.time() - started
    if stage == 0:
        save_atomic(job.model.state_dict(), folder.ckpt / "float.pt")
        results["float_acc"] = evaluate(job.model, job.test)["acc"]
        job.show.message(f"float model: test accuracy {results['float_acc']:.4f}")
    else:
        best = folder.ckpt / f"best_stage{stage}.pt"
        if penalty is not None and not best.exists():
            lowered = job.enforce_budgets_(f"phase {phase.name!r} ended above its budgets")
            result = job.evaluate_val()
            progress.best_acc, progress.best_step = result["acc"], progress.step
            progress.best_sizes = result["sizes"]
            save_atomic(job.model.state_dict(), best)
            results.setdefault("enforced", {})[phase.name] = len(lowered)
        results.setdefault("phases", {})[phase.name] = {"best_val_acc": progress.best_acc,
                                                        "best_step": progress.best_step,
                                                        "best_sizes": progress.best_sizes}
        if best.exists():  # end the phase on its best in-budget model
            load_model_state(job.model, load_checkpoint(best), best)


def finish(job: Job, results: dict) -> dict:
    """Final evaluation, report, summary.json / summary.md, plots and the final checkpoint."""
    folder, recipe = job.folder, job.recipe
    if job.account is not None and not all(job.budgets.met(job.sizes_bytes()).values()):
        lowered = job.enforce_budgets_("the final model is above its budgets (no fine-tuning after)")
        results.setdefault("enforced", {})["final"] = len(lowered)
    final = {"model": job.model.state_dict(), "recipe": recipe.to_dict(),
             "quantized": job.account is not None}
    save_atomic(final, folder.ckpt / "final.pt")
    summary = {"float_acc": results.get("float_acc"), "quant_acc": None,
               "budgets": {k: v for k, v in dataclasses.asdict(job.budgets).items() if v is not None},
               "seed": recipe.seed, "model": recipe.model.name, "data": recipe.data.name}
    if job.account is not None:
        test = evaluate(job.model, job.test, dtype=torch.float64)
        report = size_mod.size_report(job.model)
        summary.update({k: report[k] for k in ("weight_bytes", "bias_bytes", "act_sum_bytes",
                                                "act_max_bytes", "bn16_bytes", "weight_bits_mean")})
        summary["quant_acc"] = test["acc"]
        summary["budgets_met"] = job.budgets.met(report)
        summary["all_budgets_met"] = all(summary["budgets_met"].values())
        summary["layers"] = report["layers"]
        summary["plan"] = quant_plan(job.model).to_dicts()
        if recipe.method == "flexible":  # equivalent and stored bits, overhead, PTQ/FT accuracies
            from .nuuq import add_flexible_summary

            add_flexible_summary(summary, job.model, results)
    summary["phases"] = results.get("phases", {})
    summary["enforced_slices"] = results.get("enforced", {})
    summary["stage_seconds"] = results.get("stage_seconds", {})
    summary["total_seconds"] = time.time() - results.get("started", time.time())
    folder.write_json("summary.json", summary)
    from .plots import plot_run  # matplotlib is imported only when a run ends

    plot_run(folder, summary)
    (folder.path / "summary.md").write_text(summary_table(summary, recipe.budget.unit) + "\n")
    return summary


def summary_table(summary: dict, unit: str = "KiB") -> str:
    """The summary as a short Markdown table."""
    rows = [("float test accuracy", f"{summary['float_acc']:.4f}" if summary.get("float_acc") else "-")]
    if summary.get("quant_acc") is not None:
        rows.append(("quantized test accuracy", f"{summary['quant_acc']:.4f}"))
        for key in ("weight", "act_sum", "act_max"):
            size = size_mod.format_bytes(summary[f"{key}_bytes"], unit)
            target = summary["budgets"].get(f"{key}_bytes")
            if target is not None:
                met = "met" if summary["budgets_met"][key] else "NOT MET"
                size += f" (budget {size_mod.format_bytes(target, unit)}: {met})"
            rows.append((f"{key} size", size))
        rows.append(("mean bits per weight", f"{summary['weight_bits_mean']:.3f}"))
    rows.append(("wall time", f"{summary['total_seconds']:.0f} s"))
    return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def load_run_model(run: str | Path, device: str = "cpu", data_root=None) -> tuple[nn.Module, Recipe, Job]:
    """The final model of a run folder, rebuilt from its recipe (used by eval, report, export).
    The job's test loader holds the whole test set, also for a --quick run."""
    folder = RunFolder(run)
    if not (folder.path / "recipe.json").exists():
        raise FileNotFoundError(f"{folder.path} is not a mixq run folder (no recipe.json)")
    recipe = recipe_from_dict(folder.read_json("recipe.json"))
    ckpt = load_checkpoint(folder.ckpt / "final.pt")
    full = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, num_train=None, num_test=None))
    job = Job(full, folder, data_root=data_root, device=device, progress=False)
    if ckpt["quantized"] and recipe.method == "flexible":  # levels per layer from the state's shapes
        from .nuuq import quantize_like_

        quantize_like_(job, ckpt["model"])
    elif ckpt["quantized"]:
        job.quantize_(job.model, calibrate=False)
    load_model_state(job.model, ckpt["model"], folder.ckpt / "final.pt")
    return job.model, recipe, job


__all__ = ["train_run", "load_run_model", "quick_recipe", "CheckpointError", "Path"]
