"""Broken dataset files reach the user as one line and exit code 2 from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pl.cli import main
from test_datasets import cifar_batches, write_cifar, write_mnist

SMALL = ("devices=4", 'topology.name="complete"')  # tiny datasets: few devices, a graph that is connected


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _mnist_args(root: Path, out: Path, tiny_overrides: list[str]) -> list[str]:
    sets = [*tiny_overrides, *SMALL, 'data.name="mnist"', f'data.root="{root}"', 'model.name="lenet"']
    return ["run", "--quiet", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_truncated_idx_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_overrides: list[str]
) -> None:
    write_mnist(tmp_path / "mnist")
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    code, lines = _run_cli(_mnist_args(tmp_path, tmp_path / "out", tiny_overrides), capsys)
    assert code == 2
    assert len(lines) == 1 and "truncated" in lines[0] and "train-images-idx3-ubyte" in lines[0], lines


def test_wrong_magic_number_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_overrides: list[str]
) -> None:
    write_mnist(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[2:4] = b"\x09\x99"
    labels.write_bytes(bytes(raw))
    code, lines = _run_cli(_mnist_args(tmp_path, tmp_path / "out", tiny_overrides), capsys)
    assert code == 2
    assert len(lines) == 1 and "magic" in lines[0] and "t10k-labels-idx1-ubyte" in lines[0], lines


def test_truncated_cifar_batch_is_one_line_exit_2_in_a_real_process(tmp_path: Path, tiny_overrides: list[str]) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar(folder, cifar_batches())
    batch = folder / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-10])
    sets = [*tiny_overrides, *SMALL, 'data.name="cifar10"', f'data.root="{tmp_path}"']
    args = ["run", "--quiet", "--out", str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "p2pl.cli", *args], capture_output=True, text=True, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "data_batch_3.bin" in lines[0] and "Traceback" not in result.stderr, lines


def test_generated_mnist_files_train_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_overrides: list[str]
) -> None:
    write_mnist(tmp_path / "mnist", n_train=80, n_test=20)
    out = tmp_path / "out"
    code, _ = _run_cli(_mnist_args(tmp_path, out, tiny_overrides), capsys)
    assert code == 0
    metrics = np.genfromtxt(out / "metrics.csv", delimiter=",", names=True)
    assert set(metrics["device"].astype(int)) == {0, 1, 2, 3}
