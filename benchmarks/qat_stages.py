"""The main job's QAT stages from one float checkpoint: how do the allocation and fine-tuning
settings compare when the float model is the same? Runs the recipe's phases (not its float phase)
from a float state dict, or collects finished runs into a table.

    python benchmarks/qat_stages.py run --float RUN/ckpt/float.pt --out DIR [--recipe R] [--set k=v ...]
    python benchmarks/qat_stages.py table DIR [DIR ...] --stem NAME [--notes FILE]

`run` writes a normal run folder (recipe.json, log.jsonl, summary.json, plots) with one thread, so
that two runs can share the 2-core machine; `table` writes results/NAME.md and .json: per run the
overrides, seed, test accuracy against the float model, weight size and bits per layer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS, machine_info  # noqa: E402

from mixq.pipeline import (  # noqa: E402  (the stages of pipeline.train_run)
    Job,
    _run_stage,
    finish,
    load_checkpoint,
    load_model_state,
)
from mixq.recipe import load_recipe  # noqa: E402
from mixq.runs import RunFolder, environment  # noqa: E402
from mixq.train import evaluate  # noqa: E402


def run(args) -> None:
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, overrides=args.set)
    folder = RunFolder(args.out)
    folder.create(resume=False)
    folder.write_json("recipe.json", recipe.to_dict())
    folder.write_json("env.json", environment(torch.device("cpu")))
    folder.write_json("overrides.json", {"recipe": args.recipe or "fmnist_default", "set": args.set,
                                         "float": str(args.float)})
    shutil.copy(args.float, folder.ckpt / "float.pt")
    job = Job(recipe, folder, progress=False, device="cpu")
    load_model_state(job.model, load_checkpoint(args.float), args.float)  # clear errors on a bad file
    results = {"started": time.time(), "float_acc": evaluate(job.model, job.test)["acc"]}
    for stage, phase in enumerate(recipe.phases, start=1):
        _run_stage(job, stage, phase, None, results)
    s = finish(job, results)
    print(json.dumps({k: s.get(k) for k in ("float_acc", "quant_acc", "weight_bytes", "budgets_met")}))


def table(args) -> None:
    rows = []
    for d in map(Path, args.dirs):
        s = json.loads((d / "summary.json").read_text())
        o = json.loads((d / "overrides.json").read_text())
        rows.append({"run": d.name, "recipe": o["recipe"], "set": o["set"], "seed": s["seed"],
                     "float_acc": s["float_acc"], "quant_acc": s["quant_acc"],
                     "weight_bytes": s["weight_bytes"], "budget_bytes": s["budgets"].get("weight_bytes"),
                     "weight_bits_mean": s["weight_bits_mean"], "seconds": s.get("total_seconds"),
                     "layer_bits": {r["fqn"]: round(r["weight_bits_mean"], 2) for r in s["layers"]}})
    info = machine_info()
    lines = [f"# {args.stem}", "",
             f"Machine: {info.get('cpu_model', '?')}, {info.get('cpus', '?')} CPUs (two runs at a time, one "
             f"thread each), torch {info['torch']}, Python {info['python']}, {info['date']}. Git commit "
             f"{info.get('git_commit', '?')}. Test accuracy on the 10,000 Fashion-MNIST test images "
             "(float64 fake-quant, what the integer export computes).", "",
             "| run | recipe | overrides | seed | float % | quantized % | - float | weight B / budget | "
             "bits per weight | bits per layer | min |", "|" + "---|" * 11]
    for r in rows:
        layers = " ".join(f"{v:g}" for v in r["layer_bits"].values())
        lines.append(f"| {r['run']} | {r['recipe']} | {' '.join(r['set']) or '-'} | {r['seed']} | "
                     f"{100 * r['float_acc']:.2f} | {100 * r['quant_acc']:.2f} | "
                     f"{100 * (r['quant_acc'] - r['float_acc']):+.2f} | {r['weight_bytes']:.0f} / "
                     f"{r['budget_bytes']:.0f} | {r['weight_bits_mean']:.3f} | {layers} | "
                     f"{(r['seconds'] or 0) / 60:.0f} |")
    if args.notes:
        lines += ["", Path(args.notes).read_text().strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the recipe's QAT phases from a float checkpoint")
    r.add_argument("--float", required=True, type=Path, help="float state dict (a run's ckpt/float.pt)")
    r.add_argument("--out", required=True)
    r.add_argument("--recipe", default=None, help="recipe file or shipped name (default fmnist_default)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table", help="collect finished runs")
    t.add_argument("dirs", nargs="+")
    t.add_argument("--stem", required=True)
    t.add_argument("--notes", default=None, help="a Markdown file appended below the table")
    args = p.parse_args()
    (run if args.cmd == "run" else table)(args)


if __name__ == "__main__":
    main()
