"""Strict IDX and CIFAR-10 binary readers, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from p2pl.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_cifar_binary, read_idx
from p2pl.errors import P2PLError


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    if magic is None:
        magic = 0x00000800 | arr.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)


def test_idx_images_and_labels_roundtrip(tmp_path: Path, images: np.ndarray) -> None:
    (tmp_path / "img").write_bytes(idx_bytes(images))
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "lab").write_bytes(idx_bytes(labels))
    got = read_idx(tmp_path / "img", IDX_IMAGES_MAGIC)
    assert got.dtype == np.uint8 and got.shape == (5, 4, 3)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab", IDX_LABELS_MAGIC), labels)
    assert read_idx(tmp_path / "lab").shape == (5,)  # kind not pinned: either is accepted
    got.flags.writeable = True  # a real copy, not a view of an immutable buffer
    got[0, 0, 0] = 7


def test_idx_gzip(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(path, IDX_IMAGES_MAGIC), images)


def test_idx_truncated(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(images)[:-7])
    expected = 16 + images.size
    with pytest.raises(P2PLError, match=rf"img is truncated: expected {expected} bytes, got {expected - 7}$"):
        read_idx(path)


def test_idx_truncated_gz_and_header(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)[:20]))
    with pytest.raises(P2PLError, match=r"truncated: expected 76 bytes, got 20 \(after gunzip\)"):
        read_idx(path)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(images)[:10])
    with pytest.raises(P2PLError, match="short is truncated: expected a 16-byte IDX header"):
        read_idx(short)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(P2PLError, match="tiny is truncated"):
        read_idx(tiny)


def test_idx_trailing_bytes(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(images) + b"\x00\x01\x02")
    with pytest.raises(P2PLError, match="img has 3 trailing bytes: expected 76 bytes"):
        read_idx(path)


def test_idx_wrong_magic(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(images, magic=0x00000999))
    with pytest.raises(P2PLError, match=r"img has magic 0x00000999, expected 0x00000803 \(IDX images\)$"):
        read_idx(path, IDX_IMAGES_MAGIC)
    with pytest.raises(P2PLError, match=r"0x00000803 \(IDX images\) or 0x00000801 \(IDX labels\)"):
        read_idx(path)
    # a label file where images are expected
    labels = tmp_path / "lab"
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(P2PLError, match="magic 0x00000801, expected 0x00000803"):
        read_idx(labels, IDX_IMAGES_MAGIC)
    # other IDX dtypes (0x0D = float) are not MNIST
    floats = tmp_path / "float"
    floats.write_bytes(struct.pack(">II", 0x00000D01, 1) + b"\x00" * 4)
    with pytest.raises(P2PLError, match="magic 0x00000d01"):
        read_idx(floats)


def test_idx_missing_and_bad_gzip(tmp_path: Path) -> None:
    with pytest.raises(P2PLError, match="nope not found"):
        read_idx(tmp_path / "nope")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(P2PLError, match=r"bad\.gz could not be read"):
        read_idx(bad)


def test_idx_errors_are_one_line(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(images)[:-1])
    with pytest.raises(P2PLError) as info:
        read_idx(path)
    assert "\n" not in str(info.value)


def test_cifar_binary_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2, 5], dtype=np.uint8)
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(cifar_bytes(imgs, labels))
    got_x, got_y = read_cifar_binary(path)
    assert got_x.shape == (7, 3, 32, 32) and got_x.dtype == np.uint8
    np.testing.assert_array_equal(got_x, imgs)
    np.testing.assert_array_equal(got_y, labels)
    # layout: label byte, then 1024 red, 1024 green, 1024 blue (row-major)
    raw = path.read_bytes()
    assert raw[0] == 0 and raw[1 + 1024 + 5] == imgs[0, 1, 0, 5]


def test_cifar_binary_truncated(tmp_path: Path) -> None:
    imgs = np.zeros((2, 3, 32, 32), np.uint8)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(cifar_bytes(imgs, np.array([1, 2]))[:-100])
    with pytest.raises(P2PLError, match=r"test_batch\.bin is truncated: its size 6046 is not a multiple of the 3073"):
        read_cifar_binary(path)
    path.write_bytes(b"")
    with pytest.raises(P2PLError, match="is empty"):
        read_cifar_binary(path)


def test_cifar_binary_bad_label(tmp_path: Path) -> None:
    imgs = np.zeros((3, 3, 32, 32), np.uint8)
    path = tmp_path / "b.bin"
    path.write_bytes(cifar_bytes(imgs, np.array([1, 10, 2])))
    with pytest.raises(P2PLError, match=r"b.bin has label 10 in record 1, expected 0..9"):
        read_cifar_binary(path)
