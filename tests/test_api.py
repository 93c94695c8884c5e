"""The Python API: p2pl.run / p2pl.sweep / p2pl.load, config forms, tables, a light import, the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import p2pl
from p2pl.api import Result, SweepResult, make_config
from p2pl.config import load_config
from p2pl.errors import P2PLError

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = {"devices": 6, "rounds": 2, "model": {"hidden": [8]}, "training": {"local_epochs": 1},
         "topology": {"name": "ring"}}  # fmt: skip


def test_import_p2pl_does_not_import_torch() -> None:
    code = "import sys, p2pl; p2pl.__version__; assert 'torch' not in sys.modules, 'torch imported'; print(p2pl.run)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "function run" in done.stdout


def test_config_forms_agree(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('devices = 6\nrounds = 2\n[training]\nlocal_epochs = 1\n[topology]\nname = "ring"\n')
    from_file = make_config(toml, model={"hidden": [8]})
    from_dict = make_config(SMALL)
    from_kwargs = make_config(**SMALL)
    from_cfg = make_config(load_config(None, ["model.hidden=[8]"]), devices=6, rounds=2,
                           training={"local_epochs": 1}, topology={"name": "ring"})  # fmt: skip
    assert from_file == from_dict == from_kwargs == from_cfg
    assert from_dict.training.lr == 0.05  # untouched keys keep their defaults (sections merge, not replace)
    with pytest.raises(P2PLError, match="unknown config key 'trainin'"):
        make_config(trainin={"lr": 0.1})
    with pytest.raises(P2PLError, match="devices must be a positive integer"):
        make_config(devices=0)
    with pytest.raises(P2PLError, match="config must be"):
        make_config(42)  # type: ignore[arg-type]


def test_run_returns_the_summary_and_tables_and_load_reads_them_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = p2pl.run(SMALL, out=out, seed=3)
    assert isinstance(result, Result) and result.directory == out
    on_disk = json.loads((out / "summary.json").read_text())
    assert result.summary["final"] == on_disk["final"] and result.summary["seed"] == 3
    loaded = p2pl.load(out)
    assert isinstance(loaded, Result) and loaded.config == result.config
    for table in ("rounds", "metrics", "devices"):
        assert _records(getattr(loaded, table)) == _records(getattr(result, table))
    rounds = _records(result.rounds)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["accuracy_mean"] == pytest.approx(result.final_accuracy["mean"], abs=1e-6)
    devices = _records(result.devices)
    assert len(devices) == 6 and sum(d["samples"] for d in devices) == 1437  # digits' training split, shared out
    assert all(d["samples"] == sum(v for k, v in d.items() if k.startswith("label_")) for d in devices)  # type: ignore[misc]
    metrics = [m for m in _records(result.metrics) if m["round"] == 2]
    assert [d["final_accuracy"] for d in devices] == [m["accuracy"] for m in metrics]
    assert min(d["final_accuracy"] for d in devices) == pytest.approx(result.final_accuracy["min"], abs=1e-6)


def test_run_without_out_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = p2pl.run(**SMALL)
    assert result.directory is None and list(tmp_path.iterdir()) == []
    assert len(_records(result.rounds)) == 3


def test_tables_are_lists_of_dicts_without_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = p2pl.run(SMALL)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    rounds = result.rounds
    assert isinstance(rounds, list) and isinstance(rounds[1]["accuracy_mean"], float)
    assert rounds[0]["consensus_distance"] is None  # an empty cell (round 0 has no consensus yet)


def test_tables_are_dataframes_with_pandas() -> None:
    pd = pytest.importorskip("pandas")
    result = p2pl.run(SMALL)
    assert isinstance(result.rounds, pd.DataFrame) and list(result.rounds["round"]) == [0, 1, 2]


def test_sweep_and_load(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = p2pl.sweep(SMALL, grid={"training.lr": [0.05, 0.1]}, seeds=2, out=out)
    assert isinstance(result, SweepResult) and result.keys == ["training.lr"]
    rows = _records(result.results)
    assert [(r["training.lr"], r["seed"]) for r in rows] == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    summary = _records(result.summary)
    assert [s["seeds"] for s in summary] == [2, 2]
    loaded = p2pl.load(out)
    assert isinstance(loaded, SweepResult) and _records(loaded.summary) == summary
    one = loaded.run("training.lr=0.1/seed-1")
    assert (one.config.training.lr, one.config.seed) == (0.1, 1)
    assert one.final_accuracy["mean"] == pytest.approx(rows[3]["final_accuracy_mean"])


def test_load_of_a_wrong_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(P2PLError, match="does not exist"):
        p2pl.load(tmp_path / "nope")
    with pytest.raises(P2PLError, match="is not a finished run"):
        p2pl.load(tmp_path)


@pytest.mark.integration
def test_quickstart_example_runs(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    done = subprocess.run([sys.executable, str(example), str(tmp_path / "qs")], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "final accuracy over devices: mean" in done.stdout and "swept ['training.lr']" in done.stdout
    assert (tmp_path / "qs" / "sweep" / "results.csv").is_file()


def _records(table: object) -> list[dict[str, object]]:
    """A table as a list of dicts, whether pandas made it a DataFrame or not."""
    to_dict = getattr(table, "to_dict", None)
    if to_dict is None:
        return table  # type: ignore[return-value]
    records: list[dict[str, object]] = to_dict("records")
    return [{k: (None if v != v else v) for k, v in r.items()} for r in records]  # NaN -> None
