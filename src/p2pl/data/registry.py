"""Dataset registry: ``load_dataset(cfg, seed)`` for every ``data.name``.

* ``digits``: scikit-learn's bundled 8x8 digits (offline, the default), ``[n, 1, 8, 8]`` scaled
  to [0, 1] (/16), a stratified held-out split of ``data.test_fraction``.
* ``mnist`` / ``fashion-mnist``: the four standard IDX files (optionally ``.gz``) in
  ``<root>/mnist/`` or ``<root>/fashion-mnist/``, or torchvision's ``<root>/MNIST/raw/`` and
  ``<root>/FashionMNIST/raw/``; ``[n, 1, 28, 28]`` scaled to [0, 1] (/255), the standard test split.
* ``cifar10``: the BINARY version, ``<root>/cifar-10-batches-bin/data_batch_{1..5}.bin`` and
  ``test_batch.bin``; ``[n, 3, 32, 32]`` scaled to [0, 1] then normalized per channel with the
  usual CIFAR-10 means and standard deviations; the standard test split. The python (pickle)
  version is never read.
* ``npz`` / ``csv`` / ``image-folder``: a user's own data (see :mod:`p2pl.data.user`).

Missing files are an error unless ``data.download = true``: then MNIST and Fashion-MNIST are
fetched with ``torchvision.datasets.MNIST`` / ``FashionMNIST(download=True)`` into ``<root>``
and read back from ``<root>/<MNIST|FashionMNIST>/raw/`` with our strict reader. For CIFAR-10,
torchvision's ``CIFAR10`` class would fetch the pickle version, so instead torchvision's
``download_url`` fetches the official binary archive (MD5-checked) and only its six batch
files are extracted (by name) into ``<root>/cifar-10-batches-bin/``. Downloading needs the
optional extra: ``pip install "p2pl[vision]"``.

Loaded datasets are cached in memory per process (the last ``CACHE_SIZE`` distinct loads, keyed
by the relevant config fields, the seed where it matters and the source files' size and mtime),
so a comparison of several algorithms on the same data reads and converts it once. The cached
tensors are shared: callers must not modify them in place. ``clear_dataset_cache()`` drops them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pl.config import DataConfig
from p2pl.data.base import Dataset
from p2pl.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, one_line, read_cifar_binary, read_idx
from p2pl.data.user import assignment_of_rows, load_user_dataset, split_train_test
from p2pl.errors import P2PLError, choose

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "npz", "csv", "image-folder")
USER_FORMATS = ("npz", "csv", "image-folder")
CACHE_SIZE = 2

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_LIKE = {  # registry name -> (title, torchvision class / folder)
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("Fashion-MNIST", "FashionMNIST"),
}
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_FILES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset named by ``cfg.name`` (see module doc); ``seed`` drives drawn test splits."""
    return load_dataset_with_assignment(cfg, seed)[0]


def load_dataset_with_assignment(cfg: DataConfig, seed: int) -> tuple[Dataset, np.ndarray | None]:
    """The dataset and, if ``cfg.device_assignment`` is set, the device id of each training sample.

    The assignment array is aligned with ``x_train`` (see :mod:`p2pl.data.user` for the file
    format); pass it to :func:`p2pl.data.partition.partition_from_assignment`.
    """
    choose("dataset", cfg.name, DATASETS)
    uses_seed = cfg.name == "digits" or cfg.name in USER_FORMATS
    key = (
        tuple(sorted(dataclasses.asdict(cfg).items())),
        int(seed) if uses_seed else 0,
        _file_stamp(cfg),
    )
    return _load_cached(key)


def clear_dataset_cache() -> None:
    """Forget the datasets cached by :func:`load_dataset`."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=CACHE_SIZE)
def _load_cached(key: tuple[Any, ...]) -> tuple[Dataset, np.ndarray | None]:
    cfg = DataConfig(**dict(key[0]))
    seed = key[1]
    if cfg.name == "digits":
        return _load_digits(cfg, seed)
    if cfg.name in _MNIST_LIKE:
        return _load_mnist_like(cfg)
    if cfg.name == "cifar10":
        return _load_cifar10(cfg)
    return load_user_dataset(cfg, seed)


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _file_stamp(cfg: DataConfig) -> tuple[Any, ...]:
    """Size and mtime of the files a load would read, so edited files are not served stale."""
    paths: list[Path] = []
    if cfg.device_assignment:
        paths.append(Path(cfg.device_assignment))
    if cfg.name in _MNIST_LIKE:
        paths.extend((_find_mnist_files(cfg) or {}).values())
    elif cfg.name == "cifar10":
        paths.extend(Path(cfg.root) / CIFAR_DIR / f for f in CIFAR_FILES)
    elif cfg.name in USER_FORMATS and cfg.path:
        root = Path(cfg.path)
        paths.append(root)
        if root.is_dir():
            paths.extend(sorted(d for d in root.iterdir() if d.is_dir()))
    return tuple(_stat(p) for p in paths)


def _dataset(
    name: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray
) -> Dataset:
    return Dataset(
        name=name,
        x_train=x_train.contiguous(),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=x_test.contiguous(),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------------
# digits


def _load_digits(cfg: DataConfig, seed: int) -> tuple[Dataset, np.ndarray | None]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = split_train_test(y, cfg.test_fraction, seed)
    ds = _dataset("digits", torch.from_numpy(x[train]), y[train], torch.from_numpy(x[test]), y[test])
    return ds, assignment_of_rows(cfg.device_assignment, len(y), train)


# ---------------------------------------------------------------------------------------------
# MNIST, Fashion-MNIST


def _mnist_dirs(cfg: DataConfig) -> list[Path]:
    root = Path(cfg.root)
    return [root / cfg.name, root / _MNIST_LIKE[cfg.name][1] / "raw"]


def _find_mnist_files(cfg: DataConfig) -> dict[str, Path] | None:
    """The first candidate folder holding all four files (plain preferred over ``.gz``)."""
    for folder in _mnist_dirs(cfg):
        found: dict[str, Path] = {}
        for base in MNIST_FILES:
            for candidate in (folder / base, folder / f"{base}.gz"):
                if candidate.is_file():
                    found[base] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def _import_torchvision(title: str, where: Path) -> Any:
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        raise P2PLError(
            f'downloading {title} needs torchvision: pip install "p2pl[vision]" '
            f"(or place the files in {where} yourself)"
        ) from None


def _download_mnist_like(cfg: DataConfig) -> None:
    title, cls_name = _MNIST_LIKE[cfg.name]
    raw = Path(cfg.root) / cls_name / "raw"
    _import_torchvision(title, raw)
    datasets = importlib.import_module("torchvision.datasets")
    Path(cfg.root).mkdir(parents=True, exist_ok=True)
    try:
        getattr(datasets, cls_name)(root=str(cfg.root), train=True, download=True)
    except Exception as err:  # network, HTTP and checksum errors come in many types
        raise P2PLError(
            f"could not download {title} into {raw}: {one_line(err)}; place the files there yourself"
        ) from None


def _load_mnist_like(cfg: DataConfig) -> tuple[Dataset, np.ndarray | None]:
    title = _MNIST_LIKE[cfg.name][0]
    files = _find_mnist_files(cfg)
    if files is None and cfg.download:
        _download_mnist_like(cfg)
        files = _find_mnist_files(cfg)
    if files is None:
        first, second = _mnist_dirs(cfg)
        hint = "place the files there" if cfg.download else "set data.download = true or place the files there"
        raise P2PLError(
            f"{title} not found: expected {', '.join(MNIST_FILES)} (each optionally .gz) in {first} "
            f"(or {second}); {hint}"
        )
    x_train, y_train = _read_mnist_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    x_test, y_test = _read_mnist_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    ds = _dataset(cfg.name, x_train, y_train, x_test, y_test)
    return ds, assignment_of_rows(cfg.device_assignment, ds.num_train, None)


def _read_mnist_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise P2PLError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if len(images) != len(labels):
        raise P2PLError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and labels.max() >= 10:
        raise P2PLError(f"{labels_path} has label {int(labels.max())}, expected 0..9")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    return x, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (binary version)


def _download_cifar10(cfg: DataConfig) -> None:
    folder = Path(cfg.root) / CIFAR_DIR
    _import_torchvision("CIFAR-10", folder)
    utils = importlib.import_module("torchvision.datasets.utils")
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-binary.tar.gz"
    try:
        utils.download_url(CIFAR_URL, str(root), filename=archive.name, md5=CIFAR_MD5)
    except Exception as err:  # network, HTTP and checksum errors come in many types
        raise P2PLError(
            f"could not download the CIFAR-10 binary version from {CIFAR_URL}: {one_line(err)}; "
            f"extract it yourself so that {folder} exists"
        ) from None
    _extract_cifar(archive, folder)


def _extract_cifar(archive: Path, folder: Path) -> None:
    """Extract only the six batch files, by name, as plain files (no paths from the archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for name in CIFAR_FILES:
                if name not in members:
                    raise P2PLError(f"{archive} has no {name}; is it the CIFAR-10 binary version?")
                src = tar.extractfile(members[name])
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise P2PLError(f"{archive}: cannot read {name}")
                with src, (folder / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (OSError, tarfile.TarError, EOFError) as err:
        raise P2PLError(f"{archive} could not be extracted: {one_line(err)}") from None


def _load_cifar10(cfg: DataConfig) -> tuple[Dataset, np.ndarray | None]:
    folder = Path(cfg.root) / CIFAR_DIR
    missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing and cfg.download:
        _download_cifar10(cfg)
        missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        hint = "" if cfg.download else "set data.download = true or "
        py = Path(cfg.root) / "cifar-10-batches-py"
        note = f" ({py} is the pickle version, which p2pl never reads)" if py.exists() else ""
        raise P2PLError(
            f"CIFAR-10 (binary version) not found: expected {', '.join(CIFAR_FILES)} in {folder} "
            f"(missing {', '.join(missing)}){note}; {hint}extract {CIFAR_URL} into {cfg.root}"
        )
    x_train, y_train = _read_cifar_split([folder / f for f in CIFAR_FILES[:-1]])
    x_test, y_test = _read_cifar_split([folder / CIFAR_FILES[-1]])
    ds = _dataset("cifar10", x_train, y_train, x_test, y_test)
    return ds, assignment_of_rows(cfg.device_assignment, ds.num_train, None)


def _read_cifar_split(paths: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    parts = [read_cifar_binary(p) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x, labels
