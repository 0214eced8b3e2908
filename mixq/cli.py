"""The command line: `mixq train | eval | report`. It parses arguments and calls the library;
user errors print one line (what is wrong, how to fix it) and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_FAILED = 2, 130, 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixq", description="Learned mixed-precision quantization of "
                                "CNNs under byte budgets.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="float pretraining, then mixed-precision QAT under the budgets")
    t.add_argument("--recipe", "-r", default=None,
                   help="recipe file or shipped recipe name (default: fmnist_default)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set pretrain.epochs=3 (repeatable)")
    t.add_argument("--out", "-o", default=None, help="run folder (default: runs/<recipe>-<time>)")
    t.add_argument("--data", default=None, help="data set folder (default: MIXQ_DATA, then the "
                   "Debian path /usr/share/datasets/fashion-mnist for Fashion-MNIST)")
    t.add_argument("--quick", action="store_true",
                   help="smoke run: 2,000 training images, one short epoch per phase")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run folder")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress display")

    e = sub.add_parser("eval", help="test accuracy of a run's final model (float64 fake-quant) or "
                       "of an exported integer model file (integer executor)")
    e.add_argument("target", help="run folder, or a file written by mixq export")
    e.add_argument("--data", default=None, help="data set folder (default: as the run found it)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--predictions", default=None, metavar="FILE.npy", help="save predicted classes")

    x = sub.add_parser("export", help="write the packed integer model of a run (and ONNX/QONNX)")
    x.add_argument("run", help="run folder")
    x.add_argument("--out", "-o", default=None, help="output file (default: RUN/model.mixq)")
    x.add_argument("--onnx", default=None, metavar="FILE.onnx", help="also write ONNX with Q/DQ pairs")
    x.add_argument("--qonnx", default=None, metavar="FILE.onnx", help="also write QONNX (Quant nodes)")
    x.add_argument("--data", default=None, help="data set folder (for the parity check)")
    x.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser("report", help="size of a network at given bit widths, or of a run's model")
    r.add_argument("run", nargs="?", default=None, help="run folder (instead of --model)")
    r.add_argument("--model", default=None, help="registry model name, e.g. resnet20")
    r.add_argument("--input-size", default=None, metavar="C,H,W", help="input size, e.g. 3,32,32")
    r.add_argument("--bits", default="8", metavar="B or W,A", help="bit width of weights and "
                   "activations, or weights,activations (default 8)")
    r.add_argument("--num-classes", type=int, default=10)
    r.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    r.add_argument("--act-site", default="input", choices=("input", "relu"))
    r.add_argument("--unit", default="KiB", help="B, kB, KiB, MB, MiB")
    r.add_argument("--json", action="store_true", help="print one JSON object")

    w = sub.add_parser("sweep", help="a flexible (NUUQ) recipe over a grid of values, one float model "
                       "reused by every point; writes OUT/sweep.json, sweep.md and sweep.png")
    w.add_argument("--recipe", "-r", default=None, help="recipe file or shipped name (method 'flexible')")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="values of one recipe key, e.g. flexible.k=3,4 (repeatable: cross product)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every point (repeatable)")
    w.add_argument("--out", "-o", required=True, help="sweep folder (one run folder per point)")
    w.add_argument("--data", default=None, help="data set folder")
    w.add_argument("--quick", action="store_true", help="smoke run: small data, one short epoch per phase")
    w.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    w.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def cmd_train(args) -> int:
    from .pipeline import summary_table, train_run
    from .recipe import load_recipe

    recipe = None
    if not args.resume or args.overrides or args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.resume or args.out or f"runs/{Path(args.recipe or 'fmnist_default').stem}-{stamp}"
    summary = train_run(recipe, out, data_root=args.data, quick=args.quick, resume=bool(args.resume),
                        device=args.device, progress=not args.no_progress)
    unit = (recipe.budget.unit if recipe else "KiB")
    print(summary_table(summary, unit))
    print(f"run folder: {out}")
    keys = ("float_acc", "quant_acc", "weight_bytes", "act_sum_bytes", "act_max_bytes", "budgets_met")
    print(json.dumps({"run": str(out), **{k: summary.get(k) for k in keys}}))
    return 0


def cmd_eval(args) -> int:
    import numpy as np
    import torch

    if Path(args.target).is_file():  # an exported integer model: the integer executor
        from .data import load_dataset
        from .export import IntModel

        int_model = IntModel.load(args.target)
        meta = int_model.manifest
        split = load_dataset(meta["dataset"], root=args.data, image_size=meta.get("image_size"))
        predictions = int_model.predict(split.test_x.numpy())
        labels = split.test_y.numpy()
        acc = float((predictions == labels).mean())
        out = {"target": args.target, "kind": "integer executor", "acc": acc, "images": int(len(labels))}
    else:
        from .pipeline import load_run_model
        from .train import evaluate

        model, _, job = load_run_model(args.target, data_root=args.data)
        result = evaluate(model, job.test, dtype=torch.float64)
        predictions = result["predictions"].numpy()
        out = {"target": args.target, "kind": "fake-quant (float64)", "acc": result["acc"],
               "loss": result["loss"], "images": int(len(predictions))}
    if args.predictions:
        np.save(args.predictions, predictions.astype(np.int64))
    print(json.dumps(out) if args.json else f"test accuracy {out['acc']:.4f} on {out['images']} images "
          f"({out['kind']})")
    return 0


def cmd_export(args) -> int:
    from .export.check import export_run

    out = args.out or str(Path(args.run) / "model.mixq")
    report = export_run(args.run, out, data_root=args.data)
    if args.onnx or args.qonnx:
        from .export import IntModel
        from .export.onnx import to_onnx

        int_model = IntModel.load(out)
        for path, qonnx in ((args.onnx, False), (args.qonnx, True)):
            if path:
                Path(path).write_bytes(to_onnx(int_model, qonnx=qonnx).SerializeToString())
                report["qonnx" if qonnx else "onnx"] = path
    if args.json:
        print(json.dumps(report))
    else:
        p = report["parity"]
        print(f"wrote {out}: {report['file_bytes']} bytes = codes {report['code_bytes']} + bias "
              f"{report['bias_bytes']} + scales/tables {report['scale_and_table_bytes']} + header and "
              f"manifest {report['header_bytes']}")
        print(f"parity on {p['images']} test images: {p['agree']} predictions equal, largest logit "
              f"difference {p['max_logit_diff_steps']:g} output steps")
        for key, slack in report["slack_bytes"].items():
            state = "met" if slack >= 0 else "BROKEN"
            print(f"{key}: {report['sizes'][key]:.0f} B, budget {report['budgets'][key]:.0f} B, "
                  f"slack {slack:.0f} B ({state})")
    if not report["budgets_met"]:
        print("mixq export: error: the integer model breaks a budget of the run", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_report(args) -> int:
    import torch

    from . import size as size_mod

    if args.run:
        from .pipeline import load_run_model

        model = load_run_model(args.run)[0]
    else:
        if not args.model or not args.input_size:
            raise ValueError("give a run folder, or --model NAME and --input-size C,H,W")
        from .config import QuantConfig, default_act_config, default_weight_config
        from .convert import prepare_
        from .models import create_model

        shape = _ints(args.input_size, "--input-size", 3)
        bits = _ints(args.bits, "--bits", None)
        wbits, abits = (bits[0], bits[0]) if len(bits) == 1 else bits[:2]

        def fixed(cfg, b):
            return cfg.replace(bits_init=b, bits_min=b, bits_max=b)

        config = QuantConfig(weight=fixed(default_weight_config(), wbits),
                             act=fixed(default_act_config(), abits), act_site=args.act_site)
        model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0],
                             stem=args.stem)
        prepare_(model, config, example_input=torch.zeros(1, *shape))
    report = size_mod.size_report(model)
    if args.json:
        print(json.dumps(report))
    else:
        print(size_mod.format_report(report, args.unit))
    return 0


def _ints(text: str, flag: str, count: int | None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers") from None
    if (count and len(values) != count) or not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r} must be {count or 'one or two'} positive integers")
    return values


def cmd_sweep(args) -> int:
    from .sweep import parse_grid, run_sweep, sweep_table

    rows = run_sweep(args.recipe, parse_grid(args.grid), args.out, overrides=args.overrides, quick=args.quick,
                     data_root=args.data, device=args.device, progress=not args.no_progress)
    print(sweep_table(rows))
    print(f"sweep folder: {args.out} (sweep.json, sweep.md, sweep.png)")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "report": cmd_report,
            "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .export import ExportError, ExportFormatError
    from .export.check import ParityError
    from .pipeline import CheckpointError
    from .train import Interrupted, NonFiniteLoss

    try:
        return COMMANDS[args.command](args)
    except Interrupted:
        return EXIT_INTERRUPTED
    except (NonFiniteLoss, ParityError) as err:
        print(f"mixq: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, ExportError,
            ExportFormatError) as err:
        print(f"mixq {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
