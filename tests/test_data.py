"""Tests of mixq.data: IDX parsing, data-set discovery, CIFAR-10 (python batches and ImageFolder),
stratified subsets and the device loader. Real data: tests/fixtures/ (made by make_fixtures.py)
and, when installed, /usr/share/datasets/fashion-mnist."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixq import data as D
from mixq.loader import DeviceLoader

FIXTURES = Path(__file__).parent / "fixtures"
CIFAR_TINY = FIXTURES / "cifar10_tiny.tar.gz"
FMNIST_SMALL = FIXTURES / "fmnist_small.npz"
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def write_fmnist(folder: Path, n_train=20, n_test=10, gz=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for kind, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{kind}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{kind}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    f = tmp_path / ("a.idx.gz" if gz else "a.idx")
    f.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = D.read_idx(f, ndim=3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and (out == arr).all()
    out[0, 0, 0] = 7  # writable copy


def test_read_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    cases = {
        "magic.idx": (b"\x12\x34" + good[2:], "not an IDX file"),
        "short.idx": (good[:-10], "truncated"),
        "long.idx": (good + b"xx", "truncated or corrupt"),
        "header.idx": (good[:9], "truncated IDX header"),
        "empty.idx": (b"", "not an IDX file"),
        "trunc.gz": (gzip.compress(good)[:-30], "corrupt or truncated gzip"),
    }
    for name, (blob, msg) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(D.DataFormatError, match=msg) as e:
            D.read_idx(tmp_path / name)
        assert name in str(e.value)
    (tmp_path / "labels.idx").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(D.DataFormatError, match="1 dimensions, expected 3.*0x00000803"):
        D.read_idx(tmp_path / "labels.idx", ndim=3)


# ---------------------------------------------------------------- Fashion-MNIST discovery

def test_find_fashion_mnist_search_order(tmp_path, monkeypatch):
    explicit, env, default = tmp_path / "explicit", tmp_path / "env", tmp_path / "default"
    write_fmnist(explicit)
    write_fmnist(env / "fashion-mnist", gz=False)  # subfolder of $MIXQ_DATA, uncompressed
    write_fmnist(default)
    monkeypatch.setattr(D, "FASHION_MNIST_DEFAULT", default)
    monkeypatch.setenv("MIXQ_DATA", str(env))
    assert D.find_fashion_mnist(explicit) == explicit
    assert D.find_fashion_mnist() == env / "fashion-mnist"
    monkeypatch.delenv("MIXQ_DATA")
    assert D.find_fashion_mnist() == default
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path / "nothing"))
    assert D.find_fashion_mnist() == default  # empty $MIXQ_DATA falls through to the default


def test_find_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DEFAULT", tmp_path / "absent")
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as e:
        D.find_fashion_mnist()
    msg = str(e.value)
    assert isinstance(e.value, D.DataNotFoundError)
    for text in ("apt-get install dataset-fashion-mnist", "MIXQ_DATA", "--data",
                 "zalandoresearch/fashion-mnist", str(tmp_path / "absent"), str(tmp_path / "env")):
        assert text in msg
    # an explicit path is the only place looked at, even when the default exists
    write_fmnist(tmp_path / "absent")
    with pytest.raises(D.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.find_fashion_mnist(tmp_path / "wrong")


def test_load_fashion_mnist_small_folder(tmp_path):
    arrays = write_fmnist(tmp_path, n_train=20, n_test=10)
    s = D.load_fashion_mnist(tmp_path)
    assert s.train_x.shape == (20, 1, 28, 28) and s.test_x.shape == (10, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert (s.train_x[:, 0].numpy() == arrays["train-images-idx3-ubyte"]).all()
    assert s.test_y.tolist() == list(range(10)) and s.classes[0] == "T-shirt/top"
    assert s.mean == D.FASHION_MNIST_MEAN and s.in_channels == 1 and s.num_classes == 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(9))))
    with pytest.raises(D.DataFormatError, match="t10k-images.*9 labels"):
        D.load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------- CIFAR-10 python version

def write_cifar_py(folder: Path, n=6) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in D.CIFAR_BATCHES:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        d = {b"batch_label": name.encode(), b"labels": y, b"data": x,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = (x, y)
    meta = {b"label_names": [c.encode() for c in D.CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def test_cifar10_python_version(tmp_path):
    batches = write_cifar_py(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = D.load_cifar10(root)
        assert s.train_x.shape == (30, 3, 32, 32) and s.test_x.shape == (6, 3, 32, 32)
        x1, y1 = batches["data_batch_1"]
        assert (s.train_x[:6].reshape(6, -1).numpy() == x1).all()  # rows are R, G, B planes
        assert s.train_x[0, 1, 0, 0] == x1[0, 1024] and s.train_y[:6].tolist() == y1
        assert s.test_y.tolist() == batches["test_batch"][1]
        assert s.classes == D.CIFAR10_CLASSES and s.mean == D.CIFAR10_MEAN
    # the same batches inside a cifar-10-python.tar.gz
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    s2 = D.load_cifar10(archive)
    assert torch.equal(s2.train_x, s.train_x) and torch.equal(s2.test_y, s.test_y)


def test_cifar10_python_refuses_code_and_reports_bad_batches(tmp_path):
    write_cifar_py(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(D.DataFormatError, match="test_batch.*refusing"):
        D.load_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(D.DataFormatError, match="test_batch.*3072"):
        D.load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(D.DataNotFoundError, match="data_batch_3"):
        D.load_cifar10(tmp_path)


# ---------------------------------------------------------------- ImageFolder

def fixture_members() -> dict[str, bytes]:
    with tarfile.open(CIFAR_TINY) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


def test_cifar10_image_folder_tar_fixture():
    s = D.load_cifar10(CIFAR_TINY)
    assert s.train_x.shape == (100, 3, 32, 32) and s.test_x.shape == (30, 3, 32, 32)
    assert s.classes == D.CIFAR10_CLASSES and s.mean == D.CIFAR10_MEAN
    assert s.train_y.bincount().tolist() == [10] * 10 and s.test_y.bincount().tolist() == [3] * 10
    members = fixture_members()
    assert len(members) == 130
    for i, name in ((0, "train/airplane/0000.jpg"), (67, "train/frog/0007.jpg")):
        ref = np.asarray(Image.open(io.BytesIO(members[name])).convert("RGB"))
        assert (s.train_x[i].permute(1, 2, 0).numpy() == ref).all()
    ref = np.asarray(Image.open(io.BytesIO(members["test/truck/0002.jpg"])).convert("RGB"))
    assert (s.test_x[-1].permute(1, 2, 0).numpy() == ref).all() and s.test_y[-1] == 9


def test_image_folder_dir_with_prefix_equals_tar(tmp_path):
    for name, blob in fixture_members().items():
        f = tmp_path / "cifar10" / name  # one top-level prefix folder
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(blob)
    (tmp_path / "cifar10" / "train" / "cat" / ".hidden.jpg").write_bytes(b"junk")
    (tmp_path / "cifar10" / "README.txt").write_text("not an image")
    a, b = D.load_cifar10(tmp_path / "cifar10"), D.load_cifar10(CIFAR_TINY)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    # prefix inside a .tgz archive too
    arch = tmp_path / "with_prefix.tgz"
    with tarfile.open(arch, "w:gz") as t:
        t.add(tmp_path / "cifar10", arcname="cifar10")
    c = D.load_image_folder(arch, 32)
    assert torch.equal(c.train_x, b.train_x) and c.name == "imagefolder"
    assert len(c.mean) == 3 and all(0 < m < 1 for m in c.mean + c.std)


def test_image_folder_resize_and_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("zebra", "ant", "moth"):  # flat layout, no test folder, mixed sizes and formats
        (tmp_path / "own" / cls).mkdir(parents=True)
        for i in range(10):
            w, h = (60, 30) if i % 2 else (24, 48)
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(tmp_path / "own" / cls / f"{i}.{'png' if i % 3 else 'jpg'}")
    s = D.load_image_folder(tmp_path / "own", 16, test_fraction=0.2, seed=3)
    assert s.classes == ("ant", "moth", "zebra")
    assert s.train_x.shape == (24, 3, 16, 16) and s.test_x.shape == (6, 3, 16, 16)
    assert s.test_y.bincount().tolist() == [2, 2, 2]
    s2 = D.load_image_folder(tmp_path / "own", 16, test_fraction=0.2, seed=3)
    assert torch.equal(s.test_x, s2.test_x)
    # a 60x30 PNG: shorter side to 16 (32x16), then the center 16x16
    img = Image.open(tmp_path / "own" / "ant" / "1.png").convert("RGB")
    ref = np.asarray(img.resize((32, 16), Image.Resampling.BILINEAR).crop((8, 0, 24, 16)))
    allx = torch.cat([s.train_x, s.test_x])
    assert any((x.permute(1, 2, 0).numpy() == ref).all() for x in allx)
    with pytest.raises(D.DataNotFoundError):
        D.load_image_folder(tmp_path / "absent", 16)


def test_image_folder_bad_image_names_it(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(D.DataFormatError, match="x.jpg"):
        D.load_image_folder(tmp_path, 32)


# ---------------------------------------------------------------- registry

def test_load_dataset_registry(tmp_path, monkeypatch):
    assert set(D.DATASETS) == {"fashion_mnist", "cifar10", "imagefolder"}
    with pytest.raises(ValueError, match="'cifar100'.*fashion_mnist, cifar10.*did you mean 'cifar10'"):
        D.load_dataset("cifar100")
    write_fmnist(tmp_path)
    s = D.load_dataset("Fashion-MNIST", tmp_path)
    assert s.train_x.shape == (20, 1, 28, 28)
    assert D.load_dataset("fashion_mnist", tmp_path, image_size=32).train_x.shape == (20, 1, 32, 32)
    monkeypatch.setenv("MIXQ_DATA", str(FIXTURES))
    assert D.find_cifar10() == CIFAR_TINY
    assert D.find_cifar10(CIFAR_TINY) == CIFAR_TINY
    with pytest.raises(D.DataNotFoundError, match="MIXQ_DATA"):
        D.find_cifar10(tmp_path)
    assert D.load_dataset("cifar-10", CIFAR_TINY).test_x.shape == (30, 3, 32, 32)
    assert D.load_dataset("imagefolder", CIFAR_TINY, image_size=8).train_x.shape[-1] == 8


# ---------------------------------------------------------------- subsets

def test_subset_stratified_and_seeded():
    y = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    x = torch.arange(1000, dtype=torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    s = D.Split(x, y, x[:100], y[:100] % 3, ("a", "b", "c"), (0.5,), (0.25,))
    a = s.subset(100, 30, seed=0)
    assert a.train_y.bincount().tolist() == [50, 30, 20] and len(a.test_y) == 30
    assert torch.equal(a.train_x, s.subset(100, 30, seed=0).train_x)
    assert not torch.equal(a.train_x, s.subset(100, 30, seed=1).train_x)
    assert a.mean == s.mean and len(s.subset(10).test_y) == 100
    idx = D.stratified_indices(y, 7, seed=0)
    assert len(idx) == 7 and torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 7
    assert torch.equal(D.stratified_indices(y, 5000), torch.arange(1000))


# ---------------------------------------------------------------- device loader

def toy(n=40, c=3, hw=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g), torch.arange(n)


def test_loader_shapes_and_normalization():
    x, y = toy(42)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ld = DeviceLoader(x, y, mean, std, batch_size=8, device="cpu")
    assert len(ld) == 6 and len(DeviceLoader(x, y, mean, std, 8, drop_last=True)) == 5
    batches = list(ld)
    assert [len(b[1]) for b in batches] == [8, 8, 8, 8, 8, 2]
    xb = torch.cat([b[0] for b in batches])
    assert xb.dtype == torch.float32 and xb.shape == (42, 3, 8, 8)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, ref)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    # shuffled epoch: a permutation of all samples, labels aligned with images
    sh = DeviceLoader(x, y, mean, std, 8, shuffle=True, seed=1)
    xs, ys = zip(*sh.epoch(0), strict=True)
    xs, ys = torch.cat(xs), torch.cat(ys)
    assert sorted(ys.tolist()) == list(range(42)) and not torch.equal(ys, y)
    torch.testing.assert_close(xs, ref[ys])


def test_loader_determinism_and_resume():
    x, y = toy(50)
    kw = dict(batch_size=8, shuffle=True, augment=True, pad=2, drop_last=True, seed=7)
    a = DeviceLoader(x, y, (0.5,), (0.5,), **kw)
    b = DeviceLoader(x, y, (0.5,), (0.5,), **kw)
    full = list(a.epoch(3))
    again = list(b.epoch(3))
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for k in (1, 4):
        resumed = list(b.epoch(3, start_batch=k))
        assert len(resumed) == len(full) - k
        assert torch.equal(resumed[0][0], full[k][0]) and torch.equal(resumed[0][1], full[k][1])
    assert not torch.equal(next(a.epoch(4))[1], full[0][1])  # another epoch, another order
    other = DeviceLoader(x, y, (0.5,), (0.5,), **{**kw, "seed": 8})
    assert not torch.equal(next(other.epoch(3))[1], full[0][1])
    assert list(a.epoch(3, start_batch=len(a))) == []
    with pytest.raises(ValueError):
        a.epoch(0, start_batch=len(a) + 1)


def crops_of(img, src, pad, flips=(False, True)):
    """Every (dy, dx, flip) for which `img` is a crop (and flip) of `src` padded by `pad`."""
    img = img.round().to(torch.uint8)
    padded = torch.nn.functional.pad(src, (pad,) * 4)
    h, w = src.shape[-2:]
    out = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            for f in flips:
                c = padded[:, dy:dy + h, dx:dx + w]
                if torch.equal(img, c.flip(2) if f else c):
                    out.add((dy, dx, f))
    return out


def test_loader_crop_flip_are_real_crops_with_aligned_labels():
    x, y = toy(64, c=2, hw=6)
    ld = DeviceLoader(x, y, (0.0,), (1 / 255,), batch_size=16, shuffle=True, augment=True,
                        pad=2, seed=0)  # mean 0, std 1/255: batches hold the raw pixel values
    changed = flipped = 0
    for xb, yb in ld.epoch(0):
        for img, label in zip(xb, yb, strict=True):
            options = crops_of(img, x[label], 2)
            assert options, "augmented image is no crop/flip of its labelled source"
            changed += not torch.equal(img.round().to(torch.uint8), x[label])
            flipped += all(f for _, _, f in options)
    assert changed > 48 and 16 < flipped < 48
    # evaluation pass (iterating the loader) is plain and in order, even with augment=True
    assert torch.equal(torch.cat([b[0] for b in ld]).round().to(torch.uint8), x)
    # flip only (pad=0) and crop only (flip=False)
    xb, yb = next(DeviceLoader(x, y, (0.0,), (1 / 255,), 64, augment=True, pad=0).epoch(0))
    assert all(crops_of(i, x[l], 0) for i, l in zip(xb, yb, strict=True))
    assert 16 < sum(crops_of(i, x[l], 0) == {(0, 0, True)} for i, l in zip(xb, yb, strict=True)) < 48
    cr = DeviceLoader(x, y, (0.0,), (1 / 255,), 64, augment=True, pad=1, flip=False, seed=0)
    xb, yb = next(cr.epoch(0))
    assert all(crops_of(i, x[l], 1, flips=(False,)) for i, l in zip(xb, yb, strict=True))
    assert sum(crops_of(i, x[l], 1, (False,)) != {(1, 1, False)} for i, l in zip(xb, yb, strict=True)) > 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_cuda_matches_cpu():
    x, y = toy(50)
    kw = dict(batch_size=8, shuffle=True, augment=True, seed=5)
    c = list(DeviceLoader(x, y, (0.5,), (0.5,), **kw).epoch(2))
    g = list(DeviceLoader(x, y, (0.5,), (0.5,), device="cuda", **kw).epoch(2))
    for (xc, yc), (xg, yg) in zip(c, g, strict=True):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


# ---------------------------------------------------------------- real data

def test_fmnist_fixture_is_a_stratified_real_subset():
    f = np.load(FMNIST_SMALL)
    assert f["train_x"].dtype == np.uint8 and f["train_x"].shape[1:] == (1, 28, 28)
    n_train, n_test = len(f["train_y"]), len(f["test_y"])
    assert np.bincount(f["train_y"]).tolist() == [n_train // 10] * 10
    assert np.bincount(f["test_y"]).tolist() == [n_test // 10] * 10
    if not FMNIST_SYSTEM.is_dir():
        pytest.skip("real Fashion-MNIST not installed")
    real = D.load_fashion_mnist(FMNIST_SYSTEM).subset(n_train, n_test, seed=0)
    assert (real.train_x.numpy() == f["train_x"]).all() and (real.test_y.numpy() == f["test_y"]).all()


def test_real_fashion_mnist_loads():
    if not FMNIST_SYSTEM.is_dir():
        pytest.skip("/usr/share/datasets/fashion-mnist absent (apt-get install dataset-fashion-mnist)")
    s = D.load_fashion_mnist(D.find_fashion_mnist(FMNIST_SYSTEM))
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_y.bincount().tolist() == [6000] * 10 and s.test_y.bincount().tolist() == [1000] * 10
    assert s.train_y[:5].tolist() == [9, 0, 0, 3, 0]
    mean, std = D.channel_stats(s.train_x)
    assert abs(mean[0] - 0.2860) < 1e-3 and abs(std[0] - 0.3530) < 1e-3


@pytest.mark.slow
def test_real_cifar10_jpeg_archive_decodes():
    archive = Path("/work/shared/data/cifar10-jpeg.tar.gz")
    if not archive.is_file():
        pytest.skip(f"{archive} absent")
    t = time.perf_counter()
    s = D.load_cifar10(archive)
    seconds = time.perf_counter() - t
    assert s.train_x.shape == (50000, 3, 32, 32) and s.test_x.shape == (10000, 3, 32, 32)
    assert s.train_y.bincount().tolist() == [5000] * 10 and s.test_y.bincount().tolist() == [1000] * 10
    means = s.train_x.double().mean(dim=(0, 2, 3)).tolist()  # the archive's README: 125.4 123.1 114.0
    assert all(abs(m - r) < 0.3 for m, r in zip(means, (125.4, 123.1, 114.0), strict=True))
    assert seconds < 60, f"decoding took {seconds:.1f} s"
