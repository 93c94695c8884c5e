"""A user's own data: ``npz``, ``csv`` and ``image-folder`` datasets, and device assignments.

Formats (``DataConfig.path`` points at the file or folder):

* ``npz``: a NumPy ``.npz`` archive (read with ``allow_pickle=False``) holding a feature array
  and a label array under one of the key pairs ``x``/``y``, ``X``/``y`` or ``features``/``labels``
  (looked up in that order). Features shaped ``[n, d]`` (or ``[n]``, read as ``d = 1``) are
  standardized; ``[n, H, W]`` or ``[n, C, H, W]`` arrays are kept as images (``uint8`` scaled by
  1/255, other dtypes unchanged; a ``[n, H, W]`` array gets one channel).
* ``csv``: a header row, a label column named ``DataConfig.label_column``, every other column a
  number (a non-numeric, empty or non-finite value is an error naming its line and column).
* ``image-folder``: ``path/<class_name>/*.png|*.jpg|*.jpeg`` (read with Pillow). Classes are the
  sub-folder names sorted; hidden entries and other files are ignored. All images must have the
  same height and width; grey images become ``[1, H, W]`` and colour ones ``[3, H, W]`` (if the
  folder mixes them, grey ones are repeated to 3 channels; alpha is dropped); values in [0, 1].

Labels: the classes are the sorted distinct label values (numerically sorted for integer labels,
else as strings) and are encoded as ``0..C-1``; so integer labels ``0..C-1`` are kept as they are.

Held-out test split: ``test_fraction`` of the samples, drawn with
``sklearn.model_selection.train_test_split(random_state=seed)``, stratified by label when every
class has at least 2 samples (and both splits can hold every class), plain otherwise.
2-D features are standardized with the mean and standard deviation of the training split only.

Device assignment (``DataConfig.device_assignment``): a text/csv file with one integer device id
per row of the ORIGINAL data, in file order (for ``image-folder``: in the order classes sorted by
name, then file names sorted within a class); blank lines are skipped, a first line that is not
an integer is a header, and a header with several columns must name a ``device`` (or
``device_id``) column. The test split removes the test rows; the returned assignment is aligned
with the returned ``x_train`` (``device_of_train[i]`` is the device of training sample ``i``).
For datasets with a standard test split (MNIST, CIFAR-10) the file lists one id per sample of
the standard training set, in file order.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from p2pl.config import DataConfig
from p2pl.data.base import Dataset
from p2pl.data.formats import one_line
from p2pl.errors import P2PLError

NPZ_KEYS = (("x", "y"), ("X", "y"), ("features", "labels"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# shared helpers


def split_train_test(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)`` of a held-out split, stratified when possible."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    if not 0 < test_fraction < 1:
        raise P2PLError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    if n < 2 or n_test >= n:
        raise P2PLError(
            f"cannot hold out data.test_fraction = {test_fraction} of {n} samples; "
            "provide more samples or a smaller data.test_fraction"
        )
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and min(n_test, n - n_test) >= counts.size else None
    rows = np.arange(n)
    train, test = train_test_split(rows, test_size=test_fraction, stratify=stratify, random_state=seed)
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def encode_labels(raw: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Map label values to ``0..C-1`` (sorted distinct values); returns (int64 labels, class names)."""
    arr = np.asarray(raw)
    if arr.ndim != 1:
        raise P2PLError(f"{source}: labels must be 1-D, got shape {list(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise P2PLError(f"{source}: labels must be integers or strings, got non-integer numbers")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iuUS":
        raise P2PLError(f"{source}: labels must be integers or strings, got dtype {arr.dtype}")
    classes, codes = np.unique(arr, return_inverse=True)
    if classes.size < 2:
        raise P2PLError(f"{source}: found {classes.size} class(es); a classification task needs at least 2")
    return codes.astype(np.int64).reshape(-1), [str(c) for c in classes]


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# readers


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, raw labels) from an ``.npz`` archive (see module doc for the key names)."""
    file = Path(path)
    if not file.is_file():
        raise P2PLError(f"{file} not found; set data.path to an existing .npz file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = list(archive.files)
            for xk, yk in NPZ_KEYS:
                if xk in archive.files and yk in archive.files:
                    x, y = archive[xk], archive[yk]
                    break
            else:
                pairs = ", ".join(f"{a}/{b}" for a, b in NPZ_KEYS)
                raise P2PLError(f"{file} has arrays {keys}; expected one of the key pairs {pairs}")
    except P2PLError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise P2PLError(f"{file} could not be read as a .npz archive: {one_line(err)}") from None
    if x.dtype.kind not in "biuf":
        raise P2PLError(f"{file}: features must be numeric, got dtype {x.dtype}")
    if x.ndim == 0 or x.ndim > 4:
        raise P2PLError(f"{file}: features must be [n, d], [n, H, W] or [n, C, H, W], got {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise P2PLError(
            f"{file}: labels must be 1-D with one label per sample, got shape {list(y.shape)} for {len(x)} samples"
        )
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise P2PLError(f"{file}: features contain NaN or infinite values")
    return x, y


def read_csv(path: str | Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 features ``[n, d]``, raw labels) from a csv file with a header row."""
    file = Path(path)
    if not file.is_file():
        raise P2PLError(f"{file} not found; set data.path to an existing .csv file")
    rows: list[list[float]] = []
    labels: list[str] = []
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise P2PLError(f"{file} is empty; expected a header row and data rows")
            header = [h.strip() for h in header]
            if label_column not in header:
                raise P2PLError(
                    f"{file} has no label column {label_column!r} (columns: {', '.join(header)}); set data.label_column"
                )
            if len(set(header)) != len(header):
                dup = next(h for h in header if header.count(h) > 1)
                raise P2PLError(f"{file} has the column {dup!r} twice in its header")
            li = header.index(label_column)
            feature_cols = [i for i in range(len(header)) if i != li]
            if not feature_cols:
                raise P2PLError(f"{file} has no feature columns besides the label column {label_column!r}")
            for record in reader:
                if not record or all(not v.strip() for v in record):
                    continue  # blank line
                line = reader.line_num
                if len(record) != len(header):
                    raise P2PLError(
                        f"{file} line {line}: expected {len(header)} fields as in the header, got {len(record)}"
                    )
                label = record[li].strip()
                if not label:
                    raise P2PLError(f"{file} line {line}: empty label in column {label_column!r}")
                values = []
                for i in feature_cols:
                    text = record[i].strip()
                    try:
                        value = float(text)
                    except ValueError:
                        raise P2PLError(
                            f"{file} line {line}: column {header[i]!r} has non-numeric value {text!r}"
                        ) from None
                    if not math.isfinite(value):
                        raise P2PLError(f"{file} line {line}: column {header[i]!r} has non-finite value {text!r}")
                    values.append(value)
                rows.append(values)
                labels.append(label)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise P2PLError(f"{file} could not be read as csv: {one_line(err)}") from None
    if not rows:
        raise P2PLError(f"{file} has a header but no data rows")
    try:
        y: np.ndarray = np.array([int(v) for v in labels], dtype=np.int64)
    except ValueError:
        y = np.array(labels)
    return np.array(rows, dtype=np.float64), y


def _read_image(file: Path) -> np.ndarray:
    """One image as float32 ``[H, W]`` (grey) or ``[H, W, 3]`` (colour) in [0, 1]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
        raise P2PLError("reading an image folder needs Pillow; pip install pillow") from None
    try:
        with Image.open(file) as img:
            img.load()
            if img.mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            if img.mode.startswith("I;16"):
                return np.asarray(img, dtype=np.float32) / 65535.0
            if img.mode in ("I", "F"):
                raise P2PLError(f"{file} has unsupported image mode {img.mode!r}; save it as 8-bit grey or RGB")
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except P2PLError:
        raise
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise P2PLError(f"{file} could not be read as an image: {one_line(err)}") from None


def read_image_folder(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float32 images ``[n, C, H, W]`` in [0, 1], int64 labels, class names) from class folders."""
    root = Path(path)
    if not root.is_dir():
        raise P2PLError(f"{root} is not a folder; set data.path to a folder of <class_name>/ sub-folders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise P2PLError(
            f"{root} has {len(class_dirs)} class folder(s); expected at least 2 sub-folders "
            "<class_name>/ holding .png or .jpg images"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: Path | None = None
    for c, cdir in enumerate(class_dirs):
        files = sorted(
            p
            for p in cdir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise P2PLError(f"class folder {cdir} has no .png or .jpg images")
        for f in files:
            img = _read_image(f)
            if first is None:
                first = f
            elif img.shape[:2] != images[0].shape[:2]:
                h0, w0 = images[0].shape[:2]
                raise P2PLError(
                    f"{f} is {img.shape[1]}x{img.shape[0]} pixels but {first} is {w0}x{h0}; "
                    "all images must have the same size (resize them first)"
                )
            images.append(img)
            labels.append(c)
    colour = any(im.ndim == 3 for im in images)
    chw = []
    for im in images:
        if im.ndim == 2:
            im = np.repeat(im[None], 3, axis=0) if colour else im[None]
        else:
            im = im.transpose(2, 0, 1)
        chw.append(im)
    x = np.ascontiguousarray(np.stack(chw), dtype=np.float32)
    return x, np.asarray(labels, dtype=np.int64), [p.name for p in class_dirs]


# ---------------------------------------------------------------------------------------------
# device assignment


def read_device_ids(path: str | Path, num_rows: int) -> np.ndarray:
    """One non-negative int64 device id per data row from a txt/csv file (see module doc)."""
    file = Path(path)
    if not file.is_file():
        raise P2PLError(f"device assignment file {file} not found; set data.device_assignment")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise P2PLError(f"device assignment file {file} could not be read: {one_line(err)}") from None
    numbered = [(i + 1, s.strip()) for i, s in enumerate(lines) if s.strip()]
    column, ncols = 0, 1
    if numbered:
        try:
            int(numbered[0][1])
        except ValueError:  # a header line
            header = [h.strip() for h in numbered[0][1].split(",")]
            if len(header) > 1:
                names = [h for h in ("device", "device_id") if h in header]
                if not names:
                    raise P2PLError(
                        f"device assignment file {file} has columns {header}; name one 'device' "
                        "or give one device id per line"
                    ) from None
                column, ncols = header.index(names[0]), len(header)
            numbered = numbered[1:]
    ids = np.empty(len(numbered), dtype=np.int64)
    for k, (line, text) in enumerate(numbered):
        fields = text.split(",")
        try:
            value = int(fields[column].strip()) if len(fields) == ncols else None
        except ValueError:
            value = None
        if value is None or value < 0:
            raise P2PLError(
                f"device assignment file {file} line {line}: expected one non-negative integer device id, got {text!r}"
            )
        ids[k] = value
    if ids.size != num_rows:
        raise P2PLError(
            f"device assignment file {file} has {ids.size} device ids but the data has {num_rows} rows; "
            "list one device id per row of the original data"
        )
    return ids


def assignment_of_rows(path: str, num_rows: int, train_rows: np.ndarray | None) -> np.ndarray | None:
    """Device ids of the training rows (``None`` without an assignment file)."""
    if not path:
        return None
    ids = read_device_ids(path, num_rows)
    return ids if train_rows is None else ids[train_rows]


# ---------------------------------------------------------------------------------------------
# the dataset


def load_user_dataset(cfg: DataConfig, seed: int) -> tuple[Dataset, np.ndarray | None]:
    """A user's ``npz``/``csv``/``image-folder`` data, split and scaled, with its device ids."""
    if not cfg.path:
        raise P2PLError(f"data.name = {cfg.name!r} needs data.path: the file or folder holding your data")
    if cfg.name == "npz":
        x, raw = read_npz(cfg.path)
        y, classes = encode_labels(raw, cfg.path)
    elif cfg.name == "csv":
        x, raw = read_csv(cfg.path, cfg.label_column)
        y, classes = encode_labels(raw, cfg.path)
    elif cfg.name == "image-folder":
        x, y, classes = read_image_folder(cfg.path)
    else:
        raise P2PLError(f"{cfg.name!r} is not a user data format; use npz, csv or image-folder")
    train, test = split_train_test(y, cfg.test_fraction, seed)
    if x.ndim <= 2:
        feats = x.reshape(len(x), -1).astype(np.float64)
        x_train, x_test = _standardize(feats[train], feats[test])
    else:
        imgs = x[:, None] if x.ndim == 3 else x
        imgs = imgs.astype(np.float32) / 255.0 if imgs.dtype == np.uint8 else imgs.astype(np.float32)
        x_train, x_test = imgs[train], imgs[test]
    dataset = Dataset(
        name=cfg.name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(y[test]),
        num_classes=len(classes),
    )
    return dataset, assignment_of_rows(cfg.device_assignment, len(y), train)
