"""`mixq sweep`: one flexible (NUUQ) recipe over the cross product of value grids, e.g.
flexible.k=3,4 x flexible.grid_bits=4,6,8. Every point is a run folder under OUT; every point
starts from a float model trained once per distinct float setup (seed, model, data, pretrain) and
kept under OUT/float-<hash>, or from the recipe's flexible.float_checkpoint. Writes OUT/sweep.json,
OUT/sweep.md (a table) and OUT/sweep.png (accuracy against stored and equivalent bits). A point
whose folder holds a summary.json is reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
from pathlib import Path

from .recipe import load_recipe


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """['flexible.k=3,4'] -> [('flexible.k', ['3', '4'])]."""
    grids = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"grid {item!r} must look like key=v1,v2,..., e.g. flexible.k=3,4")
        grids.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    keys = [k for k, _ in grids]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid key is given twice: {keys}")
    return grids


def point_name(point: list[tuple[str, str]]) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in point).replace("/", "_") or "base"


def _float_key(recipe) -> str:
    data = recipe.to_dict()
    spec = {k: data[k] for k in ("seed", "model", "data", "pretrain")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def _train(recipe, folder: Path, **kw) -> dict:
    from .pipeline import train_run

    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    if folder.exists():  # an interrupted run of this sweep: start it again
        shutil.rmtree(folder)
    return train_run(recipe, folder, **kw)


def run_sweep(recipe_name: str | None, grids: list[tuple[str, list[str]]], out: str | Path,
              overrides: list[str] | tuple = (), quick: bool = False, data_root=None, device=None,
              progress: bool = True) -> list[dict]:
    """Run every point of the grid (sequentially); returns one row per point (also in sweep.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_recipe(recipe_name, list(overrides))
    if base.method != "flexible":
        raise ValueError(f"mixq sweep runs recipes with method = 'flexible', not {base.method!r}")
    kw = {"data_root": data_root, "quick": quick, "device": device, "progress": progress}
    rows = []
    for values in itertools.product(*[v for _, v in grids]):
        point = [(k, v) for (k, _), v in zip(grids, values, strict=True)]
        sets = [*overrides, *(f"{k}={v}" for k, v in point)]
        recipe = load_recipe(recipe_name, sets)
        float_ckpt = recipe.flexible.get("float_checkpoint")
        if not float_ckpt:  # one float model per distinct float setup, trained once
            folder = out / f"float-{_float_key(recipe)}"
            _train(dataclasses.replace(recipe, method="learned", phases=(), flexible={}), folder, **kw)
            float_ckpt = str(folder / "ckpt" / "float.pt")
            recipe = load_recipe(recipe_name, [*sets, f"flexible.float_checkpoint={float_ckpt}"])
        summary = _train(recipe, out / point_name(point), **kw)
        rows.append(sweep_row(point, summary, float_ckpt))
        write_sweep(out, rows)
    return rows


def sweep_row(point, summary: dict, float_ckpt: str) -> dict:
    flex = summary.get("flexible", {})
    opts = flex.get("options", {})
    mse = flex.get("mse", {})
    return {"point": point_name(point), "set": dict(point), "seed": summary.get("seed"),
            "float_checkpoint": float_ckpt, "float_acc": summary.get("float_acc"),
            "acc_acts_only": flex.get("test_acc_acts_only"), "acc_no_ft": flex.get("test_acc_no_ft"),
            "acc_ft": flex.get("test_acc_ft"),
            "acc_qat": flex.get("test_acc_qat"), "quant_acc": summary.get("quant_acc"),
            "k": opts.get("k"), "grid_bits": opts.get("grid_bits"), "allocation": opts.get("allocation"),
            "level_init": opts.get("level_init"), "granularity": opts.get("granularity"),
            "act_bits": opts.get("act_bits"), "finetune_epochs": opts.get("finetune_epochs"),
            **{k: summary.get(k) for k in ("equivalent_bits", "stored_bits", "stored_bits_ceil",
                                           "stored_bits_base_k", "weight_bytes", "overhead_bytes")},
            "mse_dp_over_kmeans": mse.get("dp_over_kmeans_mean"),
            "mse_kmeans_snap_over_kmeans": mse.get("kmeans_snap_over_kmeans_mean"),
            "seconds": summary.get("total_seconds")}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def sweep_table(rows: list[dict]) -> str:
    """Markdown table: accuracies in %, bits per weight element (packed / ceil(log2 k) / base k);
    the final accuracy is after QAT when the recipe has QAT phases, else after fine-tuning."""
    head = ("| point | seed | k | b | level init | equiv. bits | stored bits (packed / ceil / base-k) | "
            "float % | no FT % | FT % | QAT % | final - float | weights KiB |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        final = r.get("acc_qat") if r.get("acc_qat") is not None else r.get("acc_ft")
        diff = (f"{100 * (final - r['float_acc']):+.2f}" if final is not None
                and r.get("float_acc") is not None else "-")
        stored = "/".join(f"{r[k]:.2f}" if r.get(k) is not None else "-"
                          for k in ("stored_bits", "stored_bits_ceil", "stored_bits_base_k"))
        eq = f"{r['equivalent_bits']:.2f}" if r.get("equivalent_bits") is not None else "-"
        kib = f"{r['weight_bytes'] / 1024:.1f}" if r.get("weight_bytes") is not None else "-"
        lines.append(f"| {r['point']} | {r['seed']} | {r['k']} | {r['grid_bits']} | {r['level_init']} | "
                     f"{eq} | {stored} | {_pct(r['float_acc'])} | {_pct(r['acc_no_ft'])} | "
                     f"{_pct(r['acc_ft'])} | {_pct(r.get('acc_qat'))} | {diff} | {kib} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path) -> None:
    """Test accuracy against stored bits and equivalent bits (filled: with FT, open: without)."""
    from .plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "stored_bits", "stored bits per weight (as packed)"),
                           (axes[1], "equivalent_bits", "equivalent bits per weight, log2 k")):
        for r in rows:
            if r.get(key) is None:
                continue
            for acc, marker in ((r.get("acc_no_ft"), "o"), (r.get("acc_ft"), "s")):
                if acc is not None:
                    ax.scatter(r[key], 100 * acc, marker=marker, s=28,
                               facecolors="none" if marker == "o" else f"C{r['grid_bits'] % 10}",
                               edgecolors=f"C{r['grid_bits'] % 10}")
            best = max(a for a in (r.get("acc_ft"), r.get("acc_no_ft"), 0) if a is not None)
            ax.annotate(f"k{r['k']} b{r['grid_bits']}", (r[key], 100 * best), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        floats = [r["float_acc"] for r in rows if r.get("float_acc") is not None]
        if floats:
            ax.axhline(100 * sum(floats) / len(floats), color="grey", ls="--", lw=0.8, label="float")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("squares: fine-tuned after each layer, circles: no fine-tuning; colour: grid bits b",
                 fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(out: Path, rows: list[dict]) -> None:
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "sweep.md").write_text(sweep_table(rows) + "\n")
    plot_sweep(rows, out / "sweep.png")
