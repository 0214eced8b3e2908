"""What does the exported integer model cost and deliver on a CPU?

For the default Fashion-MNIST model (the default recipe, trained here with `--quick` settings or
taken from a run folder given with --run) and for ResNet-20 (prepared and calibrated on real
CIFAR-10 images with random mixed per-slice weight widths 2..8; NOT trained: size, parity and
speed do not depend on accuracy), in one run:

- file bytes on disk against the sum of the layer bits (weight codes + biases), and the overhead in
  bytes (header and manifest, per-slice widths/exponents and input tables, byte padding);
- parity of the integer executor with the float64 fake-quantized PyTorch model: images compared,
  predictions that agree, largest logit difference in output steps;
- inference throughput (images/s) of the integer executor (numpy, integers only), the PyTorch
  float model, the PyTorch fake-quantized model and the onnxruntime QDQ model, on the CPU, at one
  stated batch size and thread count.

    python benchmarks/bench_export.py [--quick] [--run RUN] [--cifar PATH] [--threads 1]

Prints a table, then one JSON line, and writes benchmarks/results/export-cpu-torch<version>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq import functional as F  # noqa: E402
from mixq.config import QuantConfig  # noqa: E402
from mixq.convert import calibrate_, fold_bn_, prepare_, quant_sites  # noqa: E402
from mixq.data import load_cifar10, stratified_indices  # noqa: E402
from mixq.export import IntModel, export  # noqa: E402
from mixq.export.check import check_parity, file_accounting, integer_sizes  # noqa: E402
from mixq.export.onnx import to_onnx  # noqa: E402
from mixq.loader import DeviceLoader  # noqa: E402
from mixq.models import create_model  # noqa: E402

CIFAR_FIXTURE = ROOT / "tests" / "fixtures" / "cifar10_tiny.tar.gz"
CIFAR_SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def machine(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "onnxruntime": _version("onnxruntime"), "threads": threads,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": commit, "git_dirty": dirty}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def mixed_widths_(model, gen: torch.Generator, lo: int = 2, hi: int = 8) -> None:
    """Every weight slice at a random width lo..hi: qmax = step * max_code(b) (U3 quantizers)."""
    with torch.no_grad():
        for s in quant_sites(model):
            if s.role == "weight":
                step, _ = s.quant.step_and_range()
                bits = torch.randint(lo, hi + 1, (s.quant.slices,), generator=gen)
                s.quant.qmax.copy_(step * F.max_code(bits, True).to(step.dtype))
                s.quant.project_()


# ------------------------------------------------------------------------------------ models


def fmnist_model(args, workdir: Path) -> dict:
    """The default recipe's model: trained here (--quick settings) or the final model of --run."""
    from mixq.pipeline import load_run_model, train_run
    from mixq.recipe import load_recipe

    run = args.run
    trained_here = run is None
    if trained_here:
        run = workdir / "fmnist-quick"
        t = time.perf_counter()
        train_run(load_recipe(None), run, data_root=args.data, quick=True, device="cpu", progress=False)
        print(f"trained the default recipe with --quick settings in {time.perf_counter() - t:.0f} s")
    model, recipe, job = load_run_model(run, data_root=args.data)
    float_model = job.new_float_model()
    float_ckpt = Path(run) / "ckpt" / "float.pt"
    if float_ckpt.is_file():
        float_model.load_state_dict(torch.load(float_ckpt, map_location="cpu"))
    summary = json.loads((Path(run) / "summary.json").read_text())
    return {"name": "fmnist_cnn (default recipe)", "model": model.eval(), "float": float_model.eval(),
            "normalize": job.test.normalize, "x": job.test.x, "y": job.test.y,
            "input_shape": job.input_shape, "seed": recipe.seed,
            "note": ("trained here with --quick settings (2,000 images, one short epoch per phase)"
                     if trained_here else f"final model of run {run}"),
            "run_quant_acc": summary.get("quant_acc"), "budgets": summary.get("budgets", {})}


def resnet20_model(args) -> dict:
    """ResNet-20, BatchNorm statistics from real images, folded, prepared, calibrated, mixed widths."""
    path = Path(args.cifar) if args.cifar else (CIFAR_SHARED if CIFAR_SHARED.exists() and not args.quick
                                                 else CIFAR_FIXTURE)
    t = time.perf_counter()
    split = load_cifar10(path)
    print(f"CIFAR-10 from {path}: {len(split.train_x)} train / {len(split.test_x)} test images "
          f"({time.perf_counter() - t:.0f} s)")
    torch.manual_seed(args.seed)
    model = create_model("resnet20", 10, 3)
    loader = DeviceLoader(split.train_x[:512], split.train_y[:512], split.mean, split.std, batch_size=64)
    batches = [x for x, _ in loader][:4]
    model.train()
    with torch.no_grad():  # BatchNorm running statistics from real images
        for x in batches:
            model(x)
    model.eval()
    float_model = copy.deepcopy(model)
    fold_bn_(model)
    prepare_(model, QuantConfig(), example_input=batches[0][:2])
    calibrate_(model, batches)
    mixed_widths_(model, torch.Generator().manual_seed(args.seed))
    x, y = split.test_x, split.test_y
    if len(x) < args.parity_images:  # the small fixture: its training images too (real images all)
        x, y = torch.cat([x, split.train_x]), torch.cat([y, split.train_y])
    else:  # a class-stratified subset (the ImageFolder test set is ordered by class)
        keep = stratified_indices(y, args.parity_images, seed=args.seed)
        x, y = x[keep], y[keep]
    return {"name": "resnet20 (untrained, mixed widths 2..8)", "model": model.eval(),
            "float": float_model.eval(), "normalize": loader.normalize, "x": x, "y": y,
            "input_shape": tuple(split.train_x.shape[1:]), "seed": args.seed,
            "note": (f"not trained: BN statistics and calibration from {path.name}; random widths "
                     "2..8 per output channel; size, parity and speed do not depend on accuracy"),
            "run_quant_acc": None, "budgets": {}}


# ------------------------------------------------------------------------------------ measures


def throughput(fn, x8: torch.Tensor, batch: int, repeats: int = 1) -> float:
    """Images per second of fn(uint8 batch) over x8, after one warm-up batch (best of `repeats`)."""
    fn(x8[:batch])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x8), batch):
            fn(x8[i:i + batch])
        best = min(best, time.perf_counter() - t)
    return len(x8) / best


def measure(spec: dict, args, workdir: Path) -> dict:
    model, normalize, x8, y = spec["model"], spec["normalize"], spec["x"], spec["y"]
    meta = {"model": spec["name"], "dataset": "bench"}
    int_model = export(model, spec["input_shape"], normalize=normalize, meta=meta)
    path = workdir / (spec["name"].split()[0] + ".mixq")
    int_model.save(path)
    loaded = IntModel.load(path)
    acc = file_accounting(loaded, path)
    layers = loaded.manifest["layers"].values()
    code_bits = sum(v["weight_bits_total"] for v in layers)
    bias_bits = int(round(8 * sum(v["bias_bytes"] for v in layers)))
    sum_bits = code_bits + bias_bits
    sizes = integer_sizes(loaded)
    size = {"file_bytes": acc["file_bytes"], "sum_layer_bits": sum_bits, "code_bits": code_bits,
            "bias_bits": bias_bits, "sum_layer_bits_as_bytes": sum_bits / 8,
            "overhead_bytes": acc["file_bytes"] - sum_bits / 8,
            "header_and_manifest_bytes": acc["header_bytes"],
            "scale_and_table_bytes": acc["scale_and_table_bytes"],
            "byte_padding_bytes": acc["code_bytes"] - code_bits / 8,
            "budget_weight_bytes": spec["budgets"].get("weight_bytes"),
            "integer_weight_bytes": sizes["weight_bytes"]}

    n_parity = min(len(x8), args.parity_images)
    t = time.perf_counter()
    parity = check_parity(model, loaded, x8[:n_parity], normalize)
    parity["seconds"] = time.perf_counter() - t
    preds = loaded.predict(x8[:n_parity].numpy())
    parity["int_acc"] = float((preds == y[:n_parity].numpy()).mean())

    n_speed = min(len(x8), args.speed_images)
    xs, batch = x8[:n_speed], args.batch
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
    session = ort.InferenceSession(to_onnx(loaded).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    float_model, fake_quant = spec["float"], model.float().eval()
    with torch.no_grad():
        speed = {
            "integer executor (numpy)": throughput(lambda b: loaded.predict(b.numpy(), batch), xs, batch),
            "pytorch float": throughput(lambda b: float_model(normalize(b)), xs, batch, 2),
            "pytorch fake-quant": throughput(lambda b: fake_quant(normalize(b)), xs, batch, 2),
            "onnxruntime QDQ": throughput(
                lambda b: session.run(None, {"input": normalize(b).numpy()}), xs, batch, 2),
        }
    return {"model": spec["name"], "note": spec["note"], "seed": spec["seed"],
            "run_quant_acc": spec["run_quant_acc"], "size": size, "parity": parity,
            "throughput_images_per_s": speed, "throughput_images": n_speed, "batch_size": batch}


def table(results: list[dict], threads: int) -> str:
    lines = []
    for r in results:
        s, p, v = r["size"], r["parity"], r["throughput_images_per_s"]
        lines += [
            f"== {r['model']}: {r['note']}",
            f"  file {s['file_bytes']} B = layer bits {s['sum_layer_bits']} "
            f"({s['sum_layer_bits_as_bytes']:.0f} B: codes {s['code_bits']} + bias {s['bias_bits']}) "
            f"+ overhead {s['overhead_bytes']:.0f} B (header/manifest {s['header_and_manifest_bytes']}, "
            f"scales/tables {s['scale_and_table_bytes']}, byte padding {s['byte_padding_bytes']:.3f})",
            f"  parity: {p['agree']}/{p['images']} predictions agree, largest logit difference "
            f"{p['max_logit_diff_steps']:g} output steps, exact steps {p['exact_steps']} "
            f"(integer model accuracy on them {p['int_acc']:.4f})",
            f"  throughput, {r['throughput_images']} images, batch {r['batch_size']}, {threads} thread(s):"]
        width = max(map(len, v))
        lines += [f"    {k:<{width}}  {val:10.1f} images/s" for k, val in v.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (parity 1,000 / 200, speed 500 / 200; "
                    "default: the whole Fashion-MNIST test set / 1,000, speed 1,000 / 300)")
    ap.add_argument("--run", default=None, help="reuse this run folder instead of training --quick here")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: as mixq finds it)")
    ap.add_argument("--cifar", default=None, help="CIFAR-10 archive/folder (default: ../shared/data/"
                    "cifar10-jpeg.tar.gz when present, else the test fixture; --quick: the fixture)")
    ap.add_argument("--batch", type=int, default=100, help="batch size of every throughput measure")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (numpy: 1)")
    ap.add_argument("--seed", type=int, default=0, help="ResNet-20 init, calibration and widths")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/"
                    "export-cpu-torch<version>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("fmnist", "resnet20"):
            quick_counts = {"fmnist": (1000, 500), "resnet20": (200, 200)}[which]
            full_counts = {"fmnist": (10000, 1000), "resnet20": (1000, 300)}[which]
            args.parity_images, args.speed_images = quick_counts if args.quick else full_counts
            spec = fmnist_model(args, Path(tmp)) if which == "fmnist" else resnet20_model(args)
            results.append(measure(spec, args, Path(tmp)))
    print(table(results, args.threads))
    version = torch.__version__.split("+")[0]
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"export-cpu-torch{version}.json"
    record = {"benchmark": "bench_export", "question": __doc__.split("\n")[0], "quick": args.quick,
              "machine": info, "seeds": {r["model"]: r["seed"] for r in results},
              "seconds": time.perf_counter() - started, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
