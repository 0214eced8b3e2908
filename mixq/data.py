"""Data sets. Nothing here downloads anything.

Readers: Fashion-MNIST (IDX files, gzip or not), CIFAR-10 (the original pickled "python version",
or an ImageFolder of JPEG/PNG files, as a folder or a .tar/.tar.gz/.tgz read as a stream without
extracting), and any ImageFolder (`train/<class>/*`, `test/<class>/*`, or flat `<class>/*`).
Every loader returns a `Split` of uint8 (N, C, H, W) images and int64 labels;
`mixq.loader.DeviceLoader` keeps them on the device and makes normalized, augmented batches there.
Depends on torch, numpy, Pillow and the standard library only.
"""

from __future__ import annotations

import difflib
import gzip
import importlib
import io
import math
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DEFAULT_IMAGE_SIZE = 32
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFoundError(FileNotFoundError):
    """No data set where we looked; the message lists the places and how to get the data."""


class DataFormatError(ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


@dataclass
class Split:
    """A data set in memory: uint8 images (N, C, H, W), int64 labels, class names and the
    per-channel mean/std (0..1 units) that `DeviceLoader` normalizes with."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __post_init__(self):
        pairs = {"train": (self.train_x, self.train_y), "test": (self.test_x, self.test_y)}
        for what, (x, y) in pairs.items():
            if x.dtype != torch.uint8 or x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
                raise ValueError(f"{what}: want uint8 (N,C,H,W) images and N labels, got "
                                 f"{x.dtype} {tuple(x.shape)} and {tuple(y.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def subset(self, n_train: int, n_test: int | None = None, seed: int = 0) -> Split:
        """Class-stratified, seeded subset: `n_train` training images (and `n_test` test images;
        None keeps the whole test set), each class in proportion to its share (largest
        remainder), picked by a seeded permutation within the class; data-set order is kept.
        The mean/std stay those of the full set."""
        tr = stratified_indices(self.train_y, n_train, seed)
        te = slice(None) if n_test is None else stratified_indices(self.test_y, n_test, seed + 1)
        return replace(self, train_x=self.train_x[tr], train_y=self.train_y[tr],
                       test_x=self.test_x[te], test_y=self.test_y[te])



def stratified_indices(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-stratified seeded sample of `n` of the labels `y` (all if n>=N)."""
    y = torch.as_tensor(y)
    if n >= len(y):
        return torch.arange(len(y))
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    quota = exact.floor().long()
    extra = n - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:extra]] += 1
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten()[torch.randperm(int(k), generator=g)[:int(q)]]
             for c, k, q in zip(classes, counts, quota, strict=True)]
    return torch.cat(picks).sort().values


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std, in 0..1 units, of uint8 images (N, C, H, W)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        b = x[i:i + chunk].transpose(0, 1).reshape(x.shape[1], -1).double() / 255
        s += b.sum(1)
        s2 += (b * b).sum(1)
    m = x.numel() // x.shape[1]
    mean = s / m
    std = (s2 / m - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzip or not); check the magic number, the header and the data size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataFormatError(f"{path}: not an IDX file (magic {data[:4].hex() or 'missing'})")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DataFormatError(f"{path}: IDX file has {dims} dimensions, expected {ndim} "
                              f"(magic 0x{data[:4].hex()}, expected 0x00000{data[2]:x}0{ndim})")
    head = 4 + 4 * dims
    if len(data) < head:
        raise DataFormatError(f"{path}: truncated IDX header ({len(data)} of {head} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    want = math.prod(shape) * dtype.itemsize
    if len(data) - head != want:
        raise DataFormatError(f"{path}: IDX header says shape {shape} ({want} data bytes) but the "
                              f"file holds {len(data) - head}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _fmnist_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(path: str | Path | None = None) -> Path:
    """Folder holding the four Fashion-MNIST files (.gz or not). An explicit `path` is the only
    place looked at when given; else $MIXQ_DATA, then /usr/share/datasets/fashion-mnist (where
    Debian's dataset-fashion-mnist installs it). Each place may also hold the files in a
    fashion-mnist/, fashion_mnist/ or FashionMNIST/raw/ subfolder."""
    if path is not None:
        bases = [(Path(path), "path given (--data)")]
    else:
        env = os.environ.get("MIXQ_DATA")
        bases = [(Path(env), "$MIXQ_DATA")] if env else []
        bases.append((FASHION_MNIST_DEFAULT, "system default"))
    for base, _ in bases:
        for folder in (base, base / "fashion-mnist", base / "fashion_mnist",
                       base / "FashionMNIST" / "raw"):
            if all(_fmnist_file(folder, s) for s in FASHION_MNIST_FILES):
                return folder
    looked = "\n".join(f"  {b} ({why})" for b, why in bases)
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked in (and in its fashion-mnist/ subfolder):\n{looked}\n"
        f"A folder must hold {', '.join(FASHION_MNIST_FILES)} (each may end in .gz).\n"
        "To get it:\n"
        "  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (installs the files in "
        f"{FASHION_MNIST_DEFAULT})\n"
        "  elsewhere: download the four .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist into a folder DIR, then pass --data DIR "
        "or set MIXQ_DATA=DIR")


def load_fashion_mnist(root: str | Path) -> Split:
    """Fashion-MNIST from a folder of the four IDX files: uint8 (N,1,28,28), int64 labels."""
    root = Path(root)
    arrays = {}
    for stem in FASHION_MNIST_FILES:
        f = _fmnist_file(root, stem)
        if f is None:
            raise DataNotFoundError(f"{root / stem}(.gz) is missing")
        arrays[stem] = (read_idx(f, 3 if "images" in stem else 1), f)
    parts = []
    for kind in ("train", "t10k"):
        (x, fx), (y, fy) = arrays[f"{kind}-images-idx3-ubyte"], arrays[f"{kind}-labels-idx1-ubyte"]
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataFormatError(f"{fx}: {x.dtype} images {x.shape} do not match the {len(y)} "
                                  f"labels of {fy} (want uint8 N x 28 x 28)")
        if len(y) and int(y.max()) >= 10:
            raise DataFormatError(f"{fy}: label {int(y.max())} out of range 0..9")
        parts += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return Split(*parts, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                 "fashion_mnist")


# ---------------------------------------------------------------- CIFAR-10 and ImageFolder

class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy arrays, no arbitrary code."""

    _names = {"_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer"}
    _mods = ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray", "numpy")

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):  # how Python 3 protocol-2 pickles bytes
            return super().find_class(module, name)
        if module.startswith("numpy") and name in self._names:
            for m in self._mods:
                try:
                    return getattr(importlib.import_module(m), name)
                except (ImportError, AttributeError):
                    pass
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        d = _NumpyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise DataFormatError(f"{where}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(d, dict):
        raise DataFormatError(f"{where}: not a CIFAR-10 python batch (a {type(d).__name__})")
    return d


def _cifar_from_batches(blobs: dict[str, bytes], where: str) -> Split:
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for name in CIFAR_BATCHES:
        if name not in blobs:
            raise DataNotFoundError(f"{where}: CIFAR-10 batch {name} is missing")
        d = _unpickle(blobs[name], f"{where}/{name}")
        x, y = np.asarray(d.get(b"data")), np.asarray(d.get(b"labels"))
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
            raise DataFormatError(f"{where}/{name}: want b'data' uint8 (N, 3072) and N b'labels', "
                                  f"got {x.dtype} {x.shape} and {y.shape}")
        split = "test" if name == "test_batch" else "train"
        xs[split].append(x.reshape(-1, 3, 32, 32))
        ys[split].append(y.astype(np.int64))
    classes = CIFAR10_CLASSES
    if "batches.meta" in blobs:
        names = _unpickle(blobs["batches.meta"], f"{where}/batches.meta").get(b"label_names")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names or classes)
    t = [torch.from_numpy(np.concatenate(v[s])) for s in ("train", "test") for v in (xs, ys)]
    for y in (t[1], t[3]):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise DataFormatError(f"{where}: labels outside 0..{len(classes) - 1}")
    return Split(*t, classes, CIFAR10_MEAN, CIFAR10_STD, "cifar10")


def _decode(blob: bytes, size: int, where: str) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side resized to `size` (bilinear), then center crop."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.size != (size, size):
                im.draft("RGB", (size, size))  # JPEG: let the decoder downscale (never below size)
            im = im.convert("RGB")
    except Exception as e:
        raise DataFormatError(f"{where}: cannot decode image ({e})") from e
    if im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
        left, top = (w - size) // 2, (h - size) // 2
        im = im.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))
    return np.asarray(im)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _scan(root: Path, size: int, batches: dict | None = None) -> list[tuple[tuple, np.ndarray]]:
    """Decode every image file (at most 4 levels deep) of a folder or tar archive into
    (path parts, array). CIFAR python batches met on the way go into `batches` if given."""
    out = []
    if root.is_dir():
        for dirpath, dirnames, files in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and len(rel) < 3)
            for f in files:
                if _is_image(f):
                    p = Path(dirpath) / f
                    out.append((rel + (f,), _decode(p.read_bytes(), size, str(p))))
        return out
    try:
        with tarfile.open(root, "r|*") as tar:  # stream: one pass, nothing extracted to disk
            for m in tar:
                parts = tuple(p for p in PurePosixPath(m.name).parts if p not in (".", "/"))
                if not m.isfile() or not parts:
                    continue
                if batches is not None and parts[-1] in CIFAR_BATCHES + ("batches.meta",):
                    batches[parts[-1]] = tar.extractfile(m).read()
                elif len(parts) <= 4 and _is_image(parts[-1]):
                    blob = tar.extractfile(m).read()
                    out.append((parts, _decode(blob, size, f"{root}:{m.name}")))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{root}: unreadable or truncated tar archive ({e})") from e
    return out


def _assemble(entries, root, split_names, test_fraction, seed, name) -> Split:
    train, test = split_names[0], (split_names[1] if len(split_names) > 1 else None)
    if any(len(p) in (3, 4) and p[-3] == train for p, _ in entries):  # [prefix/]split/class/file
        by_split = {s: [(p[-2], p[-1], a) for p, a in entries if len(p) in (3, 4) and p[-3] == s]
                    for s in (train, test) if s}
    else:  # flat [prefix/]class/file: every image is training data, test split off below
        by_split = {train: [(p[-2], p[-1], a) for p, a in entries if len(p) in (2, 3)], test: []}
    if not by_split[train]:
        raise DataNotFoundError(f"{root}: no images found in {train}/<class>/ or <class>/ layout")
    classes = tuple(sorted({c for c, _, _ in by_split[train]}))
    ids = {c: i for i, c in enumerate(classes)}
    xy = []
    for s in (train, test):
        items = sorted(by_split.get(s) or [], key=lambda t: t[:2])
        if unknown := {c for c, _, _ in items} - ids.keys():
            raise DataFormatError(f"{root}: {s} classes {sorted(unknown)} not in {train}/")
        x = torch.from_numpy(np.stack([a for _, _, a in items])).permute(0, 3, 1, 2).contiguous() \
            if items else torch.zeros(0, 3, *entries[0][1].shape[:2], dtype=torch.uint8)
        xy += [x, torch.tensor([ids[c] for c, _, _ in items], dtype=torch.int64)]
    if not len(xy[2]):  # no test split: a seeded, class-stratified `test_fraction` of train
        te = stratified_indices(xy[1], round(test_fraction * len(xy[1])), seed)
        keep = torch.ones(len(xy[1]), dtype=torch.bool)
        keep[te] = False
        xy = [xy[0][keep], xy[1][keep], xy[0][te], xy[1][te]]
    mean, std = channel_stats(xy[0])
    return Split(*xy, classes, mean, std, name)


def load_image_folder(root: str | Path, size: int = DEFAULT_IMAGE_SIZE,
                      split_names: tuple[str, ...] = ("train", "test"),
                      test_fraction: float = 0.1, seed: int = 0) -> Split:
    """ImageFolder data set from a folder or a .tar/.tar.gz/.tgz archive (read as a stream).

    Layout: `train/<class>/*` and `test/<class>/*` (names from `split_names`), optionally under
    one top-level folder; or flat `<class>/*`. Class names sorted alphabetically give the label
    ids (`Split.classes`). Images (JPEG/PNG/...) become RGB uint8 (N, 3, size, size): the shorter
    side is resized to `size` (bilinear, JPEGs first downscaled by the decoder), then the center
    `size` x `size` is cropped, so the aspect ratio is kept. Within a class, files are sorted by
    name. Without a test split, a class-stratified fraction `test_fraction` of the training
    images, chosen with `seed`, becomes the test set. Mean/std are computed from training images.
    """
    root = Path(root)
    if not root.exists():
        raise DataNotFoundError(f"image folder {root} does not exist")
    entries = _scan(root, size)
    return _assemble(entries, root, split_names, test_fraction, seed, "imagefolder")


def load_cifar10(root: str | Path) -> Split:
    """CIFAR-10 from the python version (a folder with data_batch_1..5 and test_batch, or one
    holding cifar-10-batches-py/, or cifar-10-python.tar.gz) or from an ImageFolder folder or
    archive of 32x32 images (`train/<class>/*`, `test/<class>/*`); detected automatically."""
    root = Path(root)
    if root.is_dir():
        for d in (root, root / "cifar-10-batches-py"):
            if (d / "data_batch_1").is_file():
                blobs = {n: (d / n).read_bytes() for n in CIFAR_BATCHES + ("batches.meta",)
                         if (d / n).is_file()}
                return _cifar_from_batches(blobs, str(d))
    elif not root.is_file():
        raise DataNotFoundError(f"CIFAR-10: {root} does not exist")
    blobs: dict[str, bytes] = {}
    entries = _scan(root, 32, blobs)
    if blobs:
        return _cifar_from_batches(blobs, str(root))
    split = _assemble(entries, root, ("train", "test"), 0.1, 0, "cifar10")
    return replace(split, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def find_cifar10(path: str | Path | None = None) -> Path:
    """CIFAR-10 folder or archive: the explicit `path` (only), else $MIXQ_DATA; either may be
    the data itself or a folder whose entries named *cifar* (sorted) are tried in turn."""
    env = os.environ.get("MIXQ_DATA")
    base = Path(path) if path is not None else Path(env) if env else None
    if base is not None:
        kids = sorted(p for p in base.iterdir() if "cifar" in p.name.lower()) if base.is_dir() else []
        for d in [base] + kids:
            if d.is_file() and d.name.lower().endswith(TAR_SUFFIXES):
                return d
            if d.is_dir() and any((d / n).exists() for n in ("data_batch_1", "train",
                                                               "cifar-10-batches-py")):
                return d
    raise DataNotFoundError(
        f"CIFAR-10 not found in {base or 'nowhere (no --data, $MIXQ_DATA unset)'}. Download the "
        "python version (cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "or use an ImageFolder folder/.tar.gz of train/<class>/ and test/<class>/ images, then "
        "pass --data PATH or set MIXQ_DATA=PATH")


# ---------------------------------------------------------------- registry

def _resize(split: Split, size: int | None) -> Split:
    if size is None or size == split.image_size:
        return split

    def r(x):
        return torch.cat([F.interpolate(x[i:i + 4096].float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False).round_().clamp_(0, 255)
                          .to(torch.uint8) for i in range(0, len(x), 4096)] or [x[:0]])
    return replace(split, train_x=r(split.train_x), test_x=r(split.test_x))


def _imagefolder_entry(root, image_size):
    if root is None:
        raise DataNotFoundError("imagefolder needs a folder or archive: pass --data PATH")
    return load_image_folder(root, image_size or DEFAULT_IMAGE_SIZE)


# name -> fn(root or None, image_size or None) -> Split. Fixed-size sets are resized (bilinear,
# antialiased) when image_size differs from their native size.
DATASETS = {
    "fashion_mnist": lambda root, image_size: _resize(load_fashion_mnist(find_fashion_mnist(root)),
                                                      image_size),
    "cifar10": lambda root, image_size: _resize(load_cifar10(find_cifar10(root)), image_size),
    "imagefolder": _imagefolder_entry,
}


def load_dataset(name: str, root: str | Path | None = None, image_size: int | None = None) -> Split:
    """Load a registered data set by name (case, '-' and '_' ignored: 'Fashion-MNIST' works)."""
    key = str(name).lower().replace("-", "_")
    for k in DATASETS:
        if k.replace("_", "") == key.replace("_", ""):
            return DATASETS[k](root, image_size)
    match = difflib.get_close_matches(key, DATASETS, n=1, cutoff=0.4)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}"
                     + (f"; did you mean {match[0]!r}?" if match else ""))
