"""The training loop: parameter groups, learning-rate schedules, one phase of float or
quantization-aware training under the budget penalty, evaluation, and checkpoints that survive
Ctrl-C / SIGTERM and resume to the same result.

Per step nothing crosses to the host: the loss, accuracy and sizes stay on the device and are read
once per logging interval, where a non-finite loss stops the run.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as tF

from .batched import clip_grads_all_, project_all_, shared_steps
from .convert import quant_sites
from .graphs import GraphedStep, graphs_available
from .quantizers import SliceQuantizer
from .recipe import PhaseConfig


class Interrupted(Exception):
    """Raised after a checkpoint was saved because the user pressed Ctrl-C or sent SIGTERM."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def quantizer_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SliceQuantizer)
            for p in m.parameters(recurse=False)]


def param_groups(model: nn.Module, phase: PhaseConfig) -> list[dict]:
    """Weights (with weight decay), norms and biases (without), quantizer parameters (their own
    learning rate, no weight decay: decay would shrink ranges and bit widths on its own)."""
    quant = {id(p) for p in quantizer_params(model)}
    decay, no_decay, qparams = [], [], []
    for p in model.parameters():
        if id(p) in quant:
            qparams.append(p)
        elif p.dim() <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": phase.weight_decay, "base_lr": phase.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": phase.lr}]
    if qparams and phase.quantizers == "learned":
        group = {"params": qparams, "weight_decay": 0.0, "base_lr": phase.quant_lr}
        if phase.quant_momentum is not None and phase.optimizer in ("sgd", "rmsprop"):
            group["momentum"] = phase.quant_momentum
        groups.append(group)
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, phase)
    for g in groups:
        g["lr"] = g["base_lr"]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum,
                               nesterov=phase.momentum > 0)
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=phase.lr)
    # Schaefer: RMSProp with decay 0.9, momentum 0.9, eps 1e-3 (methods.md 2.1.4)
    return torch.optim.RMSprop(groups, lr=phase.lr, alpha=0.9, momentum=phase.momentum, eps=1e-3)


def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """Multiplier of the base learning rate at `progress` in [0, 1] of the phase.

    onecycle: linear warm-up over `warmup`, then linear decay to 0; cosine: warm-up, then cosine to
    0; step: x0.1 at 50% and x0.01 at 75% (Uhlich's 80/120 of 160 epochs); constant: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if progress < warmup:
        return (progress + 1e-3) / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-9)
    if schedule == "onecycle":
        return max(1.0 - rest, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * min(rest, 1.0)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, dtype: torch.dtype | None = None) -> dict:
    """Accuracy, mean cross-entropy and the predictions of `model` on `loader`.

    dtype=torch.float64 evaluates in double precision: with power-of-two steps every accumulator of
    the fake-quantized model is then exact, which is what the integer export reproduces.
    """
    was_training = model.training
    model.eval()
    if dtype is not None:
        model.to(dtype)
    correct, loss, count, predictions = 0, 0.0, 0, []
    try:
        for x, y in loader:
            logits = model(x.to(dtype) if dtype is not None else x)
            loss += float(tF.cross_entropy(logits.float(), y, reduction="sum"))
            pred = logits.argmax(dim=1)
            correct += int((pred == y).sum())
            count += y.numel()
            predictions.append(pred.cpu())
    finally:
        if dtype is not None:
            model.to(torch.float32)
        model.train(was_training)
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1),
            "predictions": torch.cat(predictions) if predictions else torch.empty(0)}


class StopFlag:
    """Installs SIGINT/SIGTERM handlers that ask the loop to checkpoint and stop (a context)."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class PhaseProgress:
    """Where a phase stands; saved in every checkpoint so a run resumes exactly."""

    step: int = 0
    best_acc: float = -1.0
    best_step: int = -1
    best_sizes: dict = field(default_factory=dict)


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file, then rename: an interrupt never leaves half a checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class PhaseRunner:
    """Runs one phase. `hooks` are the pipeline's callbacks: `log(record)`, `evaluate() -> dict`
    (acc, sizes in bytes, budgets_met), `checkpoint(progress, optimizer)`, `save_best()`,
    `on_step(step)` (tests), `progress(step, total, text)`, `size_text()` (sizes vs budgets),
    `ramp(progress)` (penalty strength). `cuda_graphs`: on CUDA, replay each step's forward and
    backward as a CUDA graph (`mixq.graphs`; the host then no longer bounds the step)."""

    model: nn.Module
    phase: PhaseConfig
    index: int
    train_loader: object
    hooks: object
    stop: StopFlag
    penalty: nn.Module | None = None
    account: object = None
    teacher: nn.Module | None = None
    log_every: int = 20
    cuda_graphs: bool = False
    _graph: GraphedStep | None = field(default=None, init=False, repr=False)

    def run(self, state: PhaseProgress, optimizer_state: dict | None = None) -> PhaseProgress:
        phase, model = self.phase, self.model
        qmodules = [s.quant for s in quant_sites(model)]
        qparams = quantizer_params(model)
        learned = phase.quantizers == "learned" and bool(qparams)
        for p in qparams:
            p.requires_grad_(learned)
        opt = make_optimizer(model, phase)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        steps_per_epoch = len(self.train_loader)
        total = max(1, math.ceil(phase.epochs * steps_per_epoch))
        n_evals = max(1, math.ceil(phase.epochs * phase.evals_per_epoch))
        eval_at = {max(1, round(total * k / n_evals)) for k in range(1, n_evals + 1)}
        device = next(model.parameters()).device
        run_loss = torch.zeros((), device=device)
        run_correct = torch.zeros((), device=device, dtype=torch.long)
        run_count, seen = 0, 0
        model.train()
        while state.step < total:
            epoch, start = divmod(state.step, steps_per_epoch)
            for x, y in self.train_loader.epoch(self.index * 100_000 + epoch, start_batch=start):
                progress = state.step / total
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(phase.schedule, progress, phase.warmup_fraction)
                update_q = learned and (state.step + 1) % phase.update_every == 0
                if learned and phase.update_every > 1:
                    for p in qparams:
                        p.requires_grad_(update_q)
                loss, correct = self._step(x, y, opt, qmodules, update_q, progress)
                run_loss += loss.detach() * y.numel()
                run_correct += correct
                run_count += y.numel()
                state.step += 1
                seen += 1
                if state.step % self.log_every == 0 or state.step == total or state.step in eval_at:
                    mean_loss = float(run_loss) / run_count
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLoss(f"phase {phase.name!r}, step {state.step}: loss {mean_loss}")
                    record = {"phase": phase.name, "step": state.step, "epoch": state.step / steps_per_epoch,
                              "loss": mean_loss, "train_acc": float(run_correct) / run_count,
                              "lr": opt.param_groups[0]["lr"]}
                    if self.penalty is not None:
                        record["lambda_factor"] = self.penalty.factors()
                    self.hooks.log(record)
                    text = f"loss {mean_loss:.3f} acc {record['train_acc']:.3f}{self.hooks.size_text()}"
                    self.hooks.progress(state.step, total, text)
                    run_loss.zero_(), run_correct.zero_()
                    run_count = 0
                if state.step in eval_at:
                    self._evaluate(state)
                    self.hooks.checkpoint(state, opt)
                self.hooks.on_step(state.step)
                if self.stop.signal is not None:
                    self.hooks.checkpoint(state, opt)
                    raise Interrupted(self.stop.signal)
                if state.step >= total:
                    break
        for p in qparams:
            p.requires_grad_(True)
        return state

    def _step(self, x: Tensor, y: Tensor, opt, qmodules, update_q: bool, progress: float):
        """One training step: forward, loss (+ penalty), backward (replayed as a CUDA graph where
        `cuda_graphs` allows, see `mixq.graphs`), then gradient clipping, the optimizer step and
        the projection of the quantizer parameters. Returns (loss, correct), on the device."""
        strength = self.hooks.ramp(progress) if self.penalty is not None and update_q else 0.0
        graphed = self._graphed_step(x, qmodules, update_q)
        if graphed is not None:
            loss, correct = graphed(x, y, strength)
        else:
            opt.zero_grad(set_to_none=True)
            loss, correct = self._forward_backward(x, y, qmodules, update_q, strength)
        if update_q:
            clip_grads_all_(qmodules)
        opt.step()
        if update_q:
            project_all_(qmodules)
        return loss, correct

    def _forward_backward(self, x: Tensor, y: Tensor, qmodules, update_q: bool, strength):
        """Forward, loss (+ the budget penalty at `strength`, a number or a 0-d tensor), backward."""
        phase = self.phase
        with shared_steps(qmodules):  # each quantizer's step computed once, all in one batch
            logits = self.model(x)
            loss = tF.cross_entropy(logits, y, label_smoothing=phase.label_smoothing)
            if self.teacher is not None and phase.distill > 0:
                with torch.no_grad():
                    target = self.teacher(x)
                t = phase.distill_temperature
                kd = tF.kl_div(tF.log_softmax(logits / t, 1), tF.log_softmax(target / t, 1),
                               log_target=True, reduction="batchmean") * t * t
                loss = (1 - phase.distill) * loss + phase.distill * kd
            total = loss
            if self.penalty is not None and update_q:
                total = loss + self.penalty(self.account(), strength)
        total.backward()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def _graphed_step(self, x: Tensor, qmodules, update_q: bool) -> GraphedStep | None:
        """The CUDA graph of this phase's step, or None where the step runs eagerly: not on CUDA,
        `cuda_graphs` off, or the quantizers learn only every `update_every` steps (their
        requires_grad flags change between steps, which a graph cannot follow)."""
        if not (self.cuda_graphs and graphs_available(x.device) and self.phase.update_every == 1):
            return None
        if self._graph is None:
            modules = [m for m in (self.model, self.penalty, self.teacher) if m is not None]
            self._graph = GraphedStep(
                lambda xb, yb, strength: self._forward_backward(xb, yb, qmodules, update_q, strength),
                modules)
        return self._graph

    def _evaluate(self, state: PhaseProgress) -> None:
        result = self.hooks.evaluate()
        if not math.isfinite(result["loss"]):
            raise NonFiniteLoss(f"phase {self.phase.name!r}, step {state.step}: eval loss {result['loss']}")
        selectable = all(result.get("budgets_met", {}).values())
        improved = selectable and result["acc"] > state.best_acc
        if improved:
            state.best_acc, state.best_step = result["acc"], state.step
            state.best_sizes = result.get("sizes", {})
            self.hooks.save_best()
        self.hooks.log({"phase": self.phase.name, "step": state.step, "eval": True,
                        "val_acc": result["acc"], "val_loss": result["loss"],
                        "sizes": result.get("sizes", {}), "budgets_met": result.get("budgets_met", {}),
                        "best": improved})
