"""Run folders: the unit of reproducibility. A run folder holds the resolved recipe, the
environment, a JSON-lines log, checkpoints, the summary and the plots:

    RUN/recipe.json   RUN/env.json   RUN/log.jsonl   RUN/ckpt/{last,best,float}.pt
    RUN/summary.json  RUN/summary.md  RUN/*.png

Also the progress line shown while training.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import _kernels, host_memory


def environment(device: torch.device) -> dict:
    """torch, device, CPU/thread count, Python, git commit of this checkout, and the quantizer kernels
    the run uses (the fused-kernel settings; on CUDA the Triton version, where it is installed)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=Path(__file__).parent,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(device), "git_commit": commit, "git_dirty": dirty,
           "keep_freed_host_memory": host_memory.freed_host_memory_kept(),
           "fast_kernels": {k: v for k, v in _kernels.fast_kernel_status().items() if k != "variants"},
           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        from . import _triton

        env["triton"] = getattr(_triton.triton, "__version__", None) if _triton.available() else None
    return env


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt = self.path / "ckpt"

    def create(self, resume: bool = False) -> RunFolder:
        if self.path.exists() and not resume and (self.path / "log.jsonl").exists():
            raise FileExistsError(
                f"run folder {self.path} already holds a run; resume it with --resume {self.path} "
                "or choose another --out")
        self.ckpt.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data) -> Path:
        path = self.path / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_log(self) -> list[dict]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_log(self, keep) -> None:
        """Keep only the records for which keep(record) is true (used when resuming)."""
        records = [r for r in self.read_log() if keep(r)]
        tmp = self.path / "log.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path / "log.jsonl")


class Progress:
    """A one-line progress display on stderr: a bar on a terminal, a line per 10% otherwise."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.label, self.last_decile = time.time(), "", -1

    def begin(self, label: str) -> None:
        self.start, self.label, self.last_decile = time.time(), label, -1

    def update(self, done: int, total: int, text: str = "") -> None:
        if not self.enabled:
            return
        frac = done / max(total, 1)
        elapsed = time.time() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = f"{self.label:<12} {done:>6}/{total:<6} {elapsed:6.0f}s (eta {eta:4.0f}s) {text}"
        if self.tty:
            bar = "#" * int(20 * frac)
            self.stream.write(f"\r{self.label:<12} [{bar:<20}] {line[13:]}\033[K")
            if done >= total:
                self.stream.write("\n")
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()
