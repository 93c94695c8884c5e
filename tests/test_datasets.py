"""Dataset registry and user data, on small files written in the real on-disk layouts."""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from p2pl.config import DataConfig
from p2pl.data.registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    clear_dataset_cache,
    load_dataset,
    load_dataset_with_assignment,
)
from p2pl.errors import P2PLError


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_dataset_cache()
    yield
    clear_dataset_cache()


# ---------------------------------------------------------------------------------------------
# writers for the real formats


def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x00000800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in data.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return data


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    return np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1).tobytes()


def cifar_batches(per_file: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    return {
        name: (
            rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, per_file).astype(np.uint8),
        )
        for name in names
    }


def write_cifar(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in batches.items():
        (folder / name).write_bytes(cifar_bytes(x, y))


# ---------------------------------------------------------------------------------------------
# digits


def test_registry_names_and_unknown() -> None:
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "npz", "csv", "image-folder")
    with pytest.raises(P2PLError, match="unknown dataset 'imagenet'; choose one of: cifar10, csv"):
        load_dataset(DataConfig(name="imagenet"), 0)


def test_digits_shapes_ranges_and_stratification() -> None:
    ds = load_dataset(DataConfig(name="digits", test_fraction=0.2), seed=0)
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8) and ds.num_train == 1437
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_test.tolist()) == set(range(10))
    train_counts = torch.bincount(ds.y_train, minlength=10).numpy()
    test_counts = torch.bincount(ds.y_test, minlength=10).numpy()
    share = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(share - 0.2) < 0.02)  # stratified


def test_digits_seeded_split_and_cache() -> None:
    a = load_dataset(DataConfig(), 0)
    b = load_dataset(DataConfig(), 0)
    assert a is b  # cached per process
    clear_dataset_cache()
    c = load_dataset(DataConfig(), 0)
    assert c is not a and torch.equal(a.x_train, c.x_train) and torch.equal(a.y_test, c.y_test)
    d = load_dataset(DataConfig(), 1)
    assert not torch.equal(a.y_train, d.y_train)


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize(
    ("name", "sub", "gz"),
    [
        ("mnist", "mnist", False),
        ("mnist", "MNIST/raw", True),
        ("fashion-mnist", "fashion-mnist", True),
        ("fashion-mnist", "FashionMNIST/raw", False),
    ],
)
def test_mnist_like_layouts(tmp_path: Path, name: str, sub: str, gz: bool) -> None:
    data = write_mnist(tmp_path / sub, gz=gz)
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path)), 0)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (60, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(data["train-images-idx3-ubyte"]).float()[:, None] / 255
    assert torch.allclose(ds.x_train, expected)
    assert ds.y_test.tolist() == data["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(P2PLError) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), 0)
    msg = str(info.value)
    assert "data.download = true" in msg and str(tmp_path / "mnist") in msg
    assert "train-images-idx3-ubyte" in msg and "\n" not in msg
    # three of four files are not enough
    write_mnist(tmp_path / "fashion-mnist")
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(P2PLError, match="Fashion-MNIST not found"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0)


def test_mnist_corrupt_file_is_named(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(P2PLError, match="t10k-images-idx3-ubyte is truncated"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), 0)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(59, np.uint8)))
    with pytest.raises(P2PLError, match=r"has 60 images but .* has 59 labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), 0)


def test_download_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    for name in ("mnist", "cifar10"):
        with pytest.raises(P2PLError, match=r'needs torchvision: pip install "p2pl\[vision\]"'):
            load_dataset(DataConfig(name=name, root=str(tmp_path), download=True), 0)


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, calls: list[Any], **attrs: Any) -> None:
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    utils = types.ModuleType("torchvision.datasets.utils")
    for key, value in attrs.items():
        setattr(utils if key == "download_url" else datasets, key, value)
    tv.datasets = datasets  # type: ignore[attr-defined]
    datasets.utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.setitem(sys.modules, "torchvision.datasets.utils", utils)


def test_download_mnist_reads_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeMNIST:  # writes what torchvision writes: <root>/MNIST/raw/*-ubyte
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_mnist(Path(root) / "MNIST" / "raw", n_train=30, n_test=10)

    _fake_torchvision(monkeypatch, calls, MNIST=FakeMNIST)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=True), 0)
    assert calls == [(str(tmp_path), True)]
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)


def test_download_cifar_binary_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = cifar_batches(per_file=3)
    calls: list[Any] = []

    def fake_download_url(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, md5))
        with tarfile.open(Path(root) / filename, "w:gz") as tar:
            for name, (x, y) in batches.items():
                blob = cifar_bytes(x, y)
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))

    _fake_torchvision(monkeypatch, calls, download_url=fake_download_url)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=True), 0)
    assert calls and calls[0][0].endswith("cifar-10-binary.tar.gz")
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-bin").iterdir()) == sorted(batches)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_binary(tmp_path: Path) -> None:
    batches = cifar_batches(per_file=4)
    write_cifar(tmp_path / "cifar-10-batches-bin", batches)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), 0)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.num_classes == 10
    x0, y0 = batches["data_batch_1.bin"]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(x0).float() / 255 - mean) / std
    assert torch.allclose(ds.x_train[:4], expected, atol=1e-6)
    assert ds.y_train[:4].tolist() == y0.tolist()
    assert ds.y_test.tolist() == batches["test_batch.bin"][1].tolist()


def test_cifar10_missing_and_python_version(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(P2PLError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), 0)
    msg = str(info.value)
    assert "data.download = true" in msg and "cifar-10-batches-bin" in msg
    assert "pickle version" in msg and "cifar-10-binary.tar.gz" in msg


def test_cifar10_bad_label(tmp_path: Path) -> None:
    batches = cifar_batches()
    x, y = batches["data_batch_3.bin"]
    y = y.copy()
    y[2] = 11
    batches["data_batch_3.bin"] = (x, y)
    write_cifar(tmp_path / "cifar-10-batches-bin", batches)
    with pytest.raises(P2PLError, match=r"data_batch_3\.bin has label 11 in record 2"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), 0)


# ---------------------------------------------------------------------------------------------
# a user's own data: npz


def _blobs(n: int = 60, d: int = 3, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)) * 5 + 10 + y[:, None]
    return x, y


@pytest.mark.parametrize(("xk", "yk"), [("x", "y"), ("X", "y"), ("features", "labels")])
def test_npz_features(tmp_path: Path, xk: str, yk: str) -> None:
    x, y = _blobs()
    path = tmp_path / "d.npz"
    np.savez(path, **{xk: x, yk: y})
    ds = load_dataset(DataConfig(name="npz", path=str(path), test_fraction=0.25), 0)
    assert ds.x_train.shape == (45, 3) and ds.x_test.shape == (15, 3)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 3
    # standardized with training statistics only
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(ds.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.bincount(ds.y_test).tolist() == [5, 5, 5]  # stratified


def test_npz_images_and_string_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (12, 5, 6), dtype=np.uint8)
    y = np.array(["cat", "dog", "ant"] * 4)
    path = tmp_path / "img.npz"
    np.savez(path, x=x, y=y)
    ds = load_dataset(DataConfig(name="npz", path=str(path), test_fraction=0.25), 0)
    assert ds.x_train.shape == (9, 1, 5, 6) and ds.num_classes == 3
    assert float(ds.x_train.min()) >= 0 and float(ds.x_train.max()) <= 1


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((4, 2)), targets=np.zeros(4))
    with pytest.raises(P2PLError, match=r"has arrays \['inputs', 'targets'\]; expected one of the key pairs x/y"):
        load_dataset(DataConfig(name="npz", path=str(path)), 0)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    with pytest.raises(P2PLError, match="could not be read"):
        load_dataset(DataConfig(name="npz", path=str(obj)), 0)  # never unpickled
    short = tmp_path / "short.npz"
    np.savez(short, x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(P2PLError, match="one label per sample"):
        load_dataset(DataConfig(name="npz", path=str(short)), 0)
    frac = tmp_path / "frac.npz"
    np.savez(frac, x=np.zeros((4, 2)), y=np.array([0.5, 1, 0, 1]))
    with pytest.raises(P2PLError, match="labels must be integers or strings"):
        load_dataset(DataConfig(name="npz", path=str(frac)), 0)
    with pytest.raises(P2PLError, match=r"needs data\.path"):
        load_dataset(DataConfig(name="npz"), 0)
    with pytest.raises(P2PLError, match="not found"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "none.npz")), 0)


# ---------------------------------------------------------------------------------------------
# csv


def test_csv_good(tmp_path: Path) -> None:
    x, y = _blobs(n=40, d=2, classes=2)
    path = tmp_path / "d.csv"
    lines = ["f1,kind,f2"] + [f"{a},{'yes' if c else 'no'},{b}" for (a, b), c in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(DataConfig(name="csv", path=str(path), label_column="kind", test_fraction=0.25), 3)
    assert ds.x_train.shape == (30, 2) and ds.x_test.shape == (10, 2) and ds.num_classes == 2
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(2), atol=1e-5)
    # classes sorted as strings: "no" -> 0, "yes" -> 1
    assert torch.bincount(ds.y_train).tolist() == [15, 15]


def test_csv_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = [f"{i},{[2, 10, 1][i % 3]}" for i in range(30)]
    path.write_text("a,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset(DataConfig(name="csv", path=str(path)), 0)
    x = torch.cat([ds.x_train, ds.x_test])[:, 0]
    y = torch.cat([ds.y_train, ds.y_test])
    order = torch.argsort(x)  # standardized a keeps the row order
    assert y[order][:3].tolist() == [1, 2, 0]  # 2 -> 1, 10 -> 2, 1 -> 0


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(P2PLError, match=r"bad.csv line 3: column 'b' has non-numeric value 'oops'"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)
    path.write_text("a,b,target\n1,2,0\n")
    with pytest.raises(P2PLError, match=r"has no label column 'label' \(columns: a, b, target\)"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)
    path.write_text("a,label\n1,0\n2\n")
    with pytest.raises(P2PLError, match="line 3: expected 2 fields"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)
    path.write_text("a,label\n1,0\nnan,1\n")
    with pytest.raises(P2PLError, match="line 3: column 'a' has non-finite value"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)
    path.write_text("a,label\n")
    with pytest.raises(P2PLError, match="no data rows"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)
    path.write_text("a,label\n1,0\n2,0\n3,0\n")
    with pytest.raises(P2PLError, match="at least 2"):
        load_dataset(DataConfig(name="csv", path=str(path)), 0)


def test_split_without_stratification(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "\n".join(f"{i},{0 if i else 1}" for i in range(10)) + "\n")
    ds = load_dataset(DataConfig(name="csv", path=str(path), test_fraction=0.3), 0)  # class 1 has 1 sample
    assert ds.num_train == 7 and len(ds.y_test) == 3 and ds.num_classes == 2


# ---------------------------------------------------------------------------------------------
# image folder


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 2:
        matplotlib.image.imsave(path, arr, cmap="gray", vmin=0, vmax=1)
    else:
        matplotlib.image.imsave(path, arr)


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("zebra", "ant"):
        for i in range(5):
            _write_png(tmp_path / cls / f"{i}.png", rng.random((6, 4, 3)))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset(DataConfig(name="image-folder", path=str(tmp_path), test_fraction=0.2), 0)
    assert ds.x_train.shape == (8, 3, 6, 4) and ds.x_test.shape == (2, 3, 6, 4)
    assert ds.num_classes == 2 and torch.bincount(ds.y_test).tolist() == [1, 1]
    assert float(ds.x_train.min()) >= 0 and float(ds.x_train.max()) <= 1


def test_image_folder_grey_values(tmp_path: Path) -> None:
    img = np.linspace(0, 1, 12).reshape(3, 4)
    for cls in ("a", "b"):
        for i in range(4):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(DataConfig(name="image-folder", path=str(tmp_path), test_fraction=0.25), 0)
    assert ds.x_train.shape == (6, 1, 3, 4)
    assert torch.allclose(ds.x_train[0, 0], torch.from_numpy(np.round(img * 255) / 255).float(), atol=1e-6)


def test_image_folder_mismatched_size(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "1.png", np.zeros((4, 4, 3)))
    _write_png(tmp_path / "b" / "2.png", np.zeros((5, 4, 3)))
    with pytest.raises(P2PLError, match=r"2.png is 4x5 pixels but .*1.png is 4x4; all images must have the same"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)), 0)


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_png(tmp_path / "only" / "1.png", np.zeros((4, 4, 3)))
    with pytest.raises(P2PLError, match="1 class folder"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(P2PLError, match=r"has no \.png or \.jpg images"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)), 0)
    (tmp_path / "empty" / "x.png").write_bytes(b"not a png")
    with pytest.raises(P2PLError, match=r"x\.png could not be read as an image"):
        load_dataset(DataConfig(name="image-folder", path=str(tmp_path)), 0)


# ---------------------------------------------------------------------------------------------
# device assignment


def test_assignment_follows_training_rows(tmp_path: Path) -> None:
    n = 30
    path = tmp_path / "d.csv"
    # feature "dev" equals the device of the row, so the training order can be checked
    path.write_text("dev,noise,label\n" + "\n".join(f"{i % 3},{i * 0.1},{i % 2}" for i in range(n)) + "\n")
    assign = tmp_path / "devices.txt"
    assign.write_text("\n".join(str(i % 3) for i in range(n)) + "\n")
    cfg = DataConfig(name="csv", path=str(path), device_assignment=str(assign), test_fraction=0.2)
    ds, dev = load_dataset_with_assignment(cfg, 0)
    assert dev is not None and dev.dtype == np.int64 and dev.shape == (ds.num_train,)
    levels = torch.unique(ds.x_train[:, 0])  # three standardized values, in order 0, 1, 2
    recovered = torch.searchsorted(levels, ds.x_train[:, 0].contiguous()).numpy()
    np.testing.assert_array_equal(dev, recovered)
    assert load_dataset(cfg, 0) is ds  # load_dataset goes through the same (cached) loader
    no_assign = DataConfig(name="csv", path=str(path))
    assert load_dataset_with_assignment(no_assign, 0)[1] is None


def test_assignment_for_standard_split_and_digits(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist")
    assign = tmp_path / "a.txt"
    assign.write_text("device\n" + "\n".join(str(i % 4) for i in range(60)) + "\n")
    cfg = DataConfig(name="mnist", root=str(tmp_path), device_assignment=str(assign))
    _, dev = load_dataset_with_assignment(cfg, 0)
    assert dev is not None and dev.tolist() == [i % 4 for i in range(60)]
    digits_assign = tmp_path / "digits.txt"
    digits_assign.write_text("\n".join(str(i % 5) for i in range(1797)))
    ds, dev = load_dataset_with_assignment(DataConfig(device_assignment=str(digits_assign)), 0)
    assert dev is not None and len(dev) == ds.num_train and set(dev.tolist()) == set(range(5))
    with pytest.raises(P2PLError, match="has 60 device ids but the data has 1797 rows"):
        load_dataset_with_assignment(DataConfig(device_assignment=str(assign)), 0)


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise OSError("Temporary failure in name resolution\nretry later")

    _fake_torchvision(monkeypatch, [], MNIST=OfflineMNIST)
    with pytest.raises(P2PLError) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=True), 0)
    msg = str(info.value)
    assert msg.startswith("could not download MNIST into") and "\n" not in msg
    assert "name resolution retry later" in msg
