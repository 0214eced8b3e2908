"""NUUQ on Fashion-MNIST: do the paper's claims (k = 4 levels within 0.2 points of float, k = 3
within 0.6 points, uniform 2-bit weights far worse) hold in our harness? Collects the rows of
`mixq sweep` folders (sweep.json) into results/nuuq-fmnist-cpu-torch<version>.md and .json.

    python benchmarks/nuuq_table.py SWEEP_DIR [SWEEP_DIR ...] [--ablation LABEL=SWEEP_DIR ...]
        [--wall-seconds S] [--commands FILE] [--notes FILE]
    python benchmarks/nuuq_table.py --protocol LABEL=SWEEP_DIR[,SWEEP_DIR] [--protocol ...] --stem NAME
        --about FILE [--commands FILE] [--dataset NAME]

The second form writes the protocols' table (e.g. PTQ + fine-tuning + QAT from a given float model)
to results/NAME.md and .json, with the paragraph in FILE saying what the protocols are (any data
set: `--dataset "CIFAR-10"` names it in the title).

The sweeps themselves (sequential, one thread: see the .md file for the exact commands) are what
costs time; this script only reads their results and the machine description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS, machine_info  # noqa: E402


def load_rows(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        for r in json.loads((Path(d) / "sweep.json").read_text()):
            summary = json.loads((Path(d) / r["point"] / "summary.json").read_text())
            r["method"] = "uniform" if r.get("level_init") == "uniform" else "NUUQ"
            r["mse_layers"] = summary.get("flexible", {}).get("mse", {}).get("layers", [])
            env = Path(d) / r["point"] / "env.json"
            r["threads"] = json.loads(env.read_text()).get("torch_threads") if env.exists() else None
            r["sweep"] = str(d)
            rows.append(r)
    return rows


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def delta(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.2f}"


def main_table(rows: list[dict]) -> str:
    head = ("| method | b | k | levels | equivalent bits | stored bits: packed (ceil / base-k) | float % | "
            "no FT % | FT % | no FT - float | FT - float | seed |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        levels = {"uniform": "uniform block", "NUUQ": r["level_init"]}[r["method"]]
        lines.append(
            f"| {r['method']} | {r['grid_bits']} | {r['k']} | {levels} | {r['equivalent_bits']:.2f} | "
            f"{r['stored_bits']:.2f} ({r['stored_bits_ceil']:.0f} / {r['stored_bits_base_k']:.2f}) | "
            f"{pct(r['float_acc'])} | {pct(r['acc_no_ft'])} | {pct(r['acc_ft'])} | "
            f"{delta(r['acc_no_ft'], r['float_acc'])} | {delta(r['acc_ft'], r['float_acc'])} | {r['seed']} |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["grid_bits"], r["k"]), []).append(r)
    lines = ["| method | b | k | seeds | float % | no FT - float (mean +- sd) | FT - float (mean +- sd) |",
             "|---|---|---|---|---|---|---|"]
    for (method, b, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], -kv[0][2])):
        if len(rs) < 2:
            continue

        def ms(key, rs=rs):
            d = [100 * (r[key] - r["float_acc"]) for r in rs]
            return f"{statistics.mean(d):+.2f} +- {statistics.stdev(d):.2f}"

        floats = ", ".join(pct(r["float_acc"]) for r in rs)
        lines.append(f"| {method} | {b} | {k} | {', '.join(str(r['seed']) for r in rs)} | {floats} | "
                     f"{ms('acc_no_ft')} | {ms('acc_ft')} |")
    return "\n".join(lines)


def ablation_table(ablations: list[tuple[str, list[dict]]]) -> str:
    lines = ["| protocol | b | k | equivalent bits | stored bits: packed (ceil / base-k) | no FT % | "
             "after PTQ + FT % | after QAT % | final - float | run min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in ablations:
        for r in sorted(rows, key=lambda r: -r["k"]):
            stored = (f"{r['stored_bits']:.2f} ({r['stored_bits_ceil']:.0f} / {r['stored_bits_base_k']:.2f})"
                      if r.get("stored_bits") is not None else "-")
            equiv = f"{r['equivalent_bits']:.2f}" if r.get("equivalent_bits") is not None else "-"
            lines.append(f"| {label} | {r['grid_bits']} | {r['k']} | {equiv} | {stored} | "
                         f"{pct(r['acc_no_ft'])} | {pct(r['acc_ft'])} | {pct(r['acc_qat'])} | "
                         f"{delta(r['quant_acc'], r['float_acc'])} | {(r.get('seconds') or 0) / 60:.0f} |")
    return "\n".join(lines)


def mse_table(rows: list[dict]) -> str:
    lines = ["| b | k | DP / k-means (mean over layers) | k-means then snap / k-means | "
             "worst layer: DP / snap |", "|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["grid_bits"], r["k"])
        if r["method"] != "NUUQ" or key in seen or not r["mse_layers"]:
            continue
        seen.add(key)
        worst = max(r["mse_layers"], key=lambda m: m["kmeans_snap_over_kmeans"])
        lines.append(f"| {key[0]} | {key[1]} | {r['mse_dp_over_kmeans']:.4f} | "
                     f"{r['mse_kmeans_snap_over_kmeans']:.4f} | {worst['layer']}: "
                     f"{worst['dp_over_kmeans']:.4f} / {worst['kmeans_snap_over_kmeans']:.4f} |")
    return "\n".join(lines)


def plot_protocols(protocols, path, dataset: str) -> None:
    """Final test accuracy against stored bits per weight, one series per protocol, float as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in protocols:
        rows = sorted(rows, key=lambda r: r["stored_bits"])
        ax.plot([r["stored_bits"] for r in rows], [100 * r["quant_acc"] for r in rows], "o-", label=label)
        for r in rows:
            ax.annotate(f"k={r['k']}", (r["stored_bits"], 100 * r["quant_acc"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    float_acc = 100 * protocols[0][1][0]["float_acc"]
    ax.axhline(float_acc, color="gray", linestyle="--", label=f"float {float_acc:.2f} %")
    ax.set_xlabel("stored bits per weight (as packed)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"NUUQ vs uniform weights,\n{dataset}", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def protocol_report(args) -> None:
    """One protocol's rows (ablation_table) with the machine, the description and the commands."""
    protocols = []
    for item in args.protocol:
        label, folders = item.split("=", 1)
        protocols.append((label, load_rows(folders.split(","))))
    rows = [r for _, rs in protocols for r in rs]
    info = machine_info()
    threads = "/".join(sorted({str(r["threads"]) for r in rows if r["threads"]})) or "?"
    parts = [f"# NUUQ on {args.dataset}: {'; '.join(label for label, _ in protocols)}", "",
             f"Machine: {info.get('cpu_model', '?')}, {info.get('cpus', '?')} CPUs (runs used {threads} "
             "torch threads), "
             f"torch {info['torch']}, Python {info['python']}, {info['date']}. Git commit "
             f"{info.get('git_commit', '?')}. Seed {', '.join(sorted({str(r['seed']) for r in rows}))}; "
             f"float model test accuracy {', '.join(sorted({pct(r['float_acc']) for r in rows}))} %.",
             "", Path(args.about).read_text().strip(), "", ablation_table(protocols)]
    if args.commands:
        parts += ["", "## Commands", "", "```", Path(args.commands).read_text().strip(), "```"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_protocols(protocols, RESULTS / f"{args.stem}.png", args.dataset)
    parts += ["", f"![final accuracy against stored bits]({args.stem}.png)"]
    if args.notes:
        parts += ["", "## Reading", "", Path(args.notes).read_text().strip()]
    (RESULTS / f"{args.stem}.md").write_text("\n".join(parts) + "\n")
    keep = [{k: v for k, v in r.items() if k not in ("float_checkpoint", "sweep")} for r in rows]
    (RESULTS / f"{args.stem}.json").write_text(json.dumps({"machine": info, "rows": keep}, indent=1) + "\n")
    print("\n".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="*")
    p.add_argument("--protocol", action="append", default=[], metavar="LABEL=DIR[,DIR]",
                   help="a protocol's runs (repeatable): writes only the protocols' table")
    p.add_argument("--stem", default=None, help="results file stem for --protocol")
    p.add_argument("--about", default=None, help="Markdown paragraph describing --protocol's runs")
    p.add_argument("--dataset", default="Fashion-MNIST", help="data set named in --protocol's title")
    p.add_argument("--ablation", action="append", default=[], metavar="LABEL=DIR",
                   help="a sweep of another protocol, shown in its own table")
    p.add_argument("--wall-seconds", type=float, default=None, help="total wall time of the sweeps")
    p.add_argument("--commands", default=None, help="a file with the commands that produced the sweeps")
    p.add_argument("--notes", default=None, help="a Markdown file appended as the discussion")
    args = p.parse_args()
    if args.protocol:
        protocol_report(args)
        return
    rows = load_rows(args.sweeps)
    ablations = [(label, load_rows([d])) for label, d in (a.split("=", 1) for a in args.ablation)]
    info = machine_info()
    name = f"nuuq-fmnist-cpu-torch{info['torch'].split('+')[0]}"
    seed0 = [r for r in rows if r["seed"] == 0]
    seed0.sort(key=lambda r: (r["method"] != "NUUQ", -r["k"], -r["grid_bits"]))
    floats = {r["seed"]: r["float_acc"] for r in rows}
    parts = [
        "# NUUQ (flexible quantization) on Fashion-MNIST, CPU",
        "",
        f"Machine: {info.get('cpu_model', '?')}, {info.get('cpus', '?')} CPUs (shared with other jobs; runs "
        f"used one thread), torch {info['torch']}, Python {info['python']}, {info['date']}. "
        f"Git commit {info.get('git_commit', '?')}.",
        "",
        "Model fmnist_cnn (7 conv/linear layers, 259,952 weights), BatchNorm folded; the float model is "
        "the main job's (recipes/fmnist_default.toml's float phase: 6 epochs, flips only, seed 0), given "
        "as flexible.float_checkpoint. Weights: NUUQ per output channel, "
        "power-of-two clip, levels from the exact grid-constrained DP (level_init dp), midpoint thresholds. "
        "Activations: uniform 8-bit (unsigned after ReLU) at every conv/linear input. Post-training, "
        "layer by layer from input to output; FT = 0.25 epoch of fine-tuning after each layer (later "
        "layers' weights and all biases, SGD lr 0.01 cosine). Uniform rows: the same procedure with fixed "
        "uniform levels, MSE-chosen power-of-two step: "
        "k = 3 at b = 2 is the symmetric {-1, 0, 1} grid of mixq's 2-bit UniformQuantizer, k = 4 at b = 2 "
        "the two's-complement {-2, -1, 0, 1}. Accuracies on the 10,000 test images (float64 fake-quant, "
        "equal to the integer export). Float accuracy by seed: "
        + ", ".join(f"seed {s}: {pct(a)} %" for s, a in sorted(floats.items())) + ".",
        "",
        "## Seed 0",
        "",
        main_table(seed0),
    ]
    seeds = seed_table(rows)
    if seeds.count("\n") > 1:
        parts += ["", "## Several seeds (each seed its own float model)", "", seeds]
    if ablations:
        main = [("FT 0.25 epoch per layer (the table above)",
                 [r for r in seed0 if r["method"] == "NUUQ" and r["grid_bits"] == 8])]
        parts += ["", "## Fine-tuning ablations at b = 8 (seed 0, same float model)", "",
                  ablation_table(main + ablations)]
    parts += ["", "## Weight quantization MSE on the trained float weights, relative to unconstrained "
              "k-means", "", "Per layer at the run's k, per output channel, each method with its own best "
              "power-of-two "
              "alpha; unconstrained 1-D k-means with 4 restarts (a local optimum, so a ratio can dip below "
              "1). Seed 0.", "", mse_table(seed0)]
    everything = rows + [r for _, rs in ablations for r in rs]
    wall = sum(r.get("seconds") or 0 for r in everything)
    whole = f" ({args.wall_seconds / 3600:.2f} h for the whole measurement)" if args.wall_seconds else ""
    parts += ["", f"Wall time: {wall / 3600:.2f} h summed over the {len(everything)} runs" + whole
              + "; per run: " + ", ".join(f"{Path(r['sweep']).name}/{r['point']} {r['seconds'] / 60:.0f} min"
                                          for r in everything if r.get("seconds")) + "."]
    if args.commands:
        parts += ["", "## Commands", "", "```", Path(args.commands).read_text().strip(), "```"]
    if args.notes:
        parts += ["", Path(args.notes).read_text().strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(parts) + "\n")
    def keep(rs):
        return [{k: v for k, v in r.items() if k not in ("float_checkpoint", "sweep")} for r in rs]

    data = {"machine": info, "rows": keep(rows), "ablations": {label: keep(rs) for label, rs in ablations}}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
