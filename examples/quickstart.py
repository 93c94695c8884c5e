"""p2pl from Python: one run, its tables, a small sweep over seeds, and reading results back.

Run it as a script (``python examples/quickstart.py [OUT]``) or paste the cells into a notebook.
Tables are pandas DataFrames when pandas is installed, otherwise lists of dicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import p2pl


def show(table: object, rows: int = 3) -> None:
    """Print the first rows of a table, DataFrame or list of dicts alike."""
    head = getattr(table, "head", None)
    print(head(rows).to_string() if head else "\n".join(str(row) for row in table[:rows]))  # type: ignore[index]


def main(out: Path) -> None:
    # %% One experiment: the default config with a few overrides (sections as dicts).
    small = {"devices": 20, "rounds": 5, "topology": {"name": "ring"}, "training": {"local_epochs": 2}}
    result = p2pl.run(small, out=out / "ring")
    acc = result.final_accuracy
    print(f"final accuracy over devices: mean {acc['mean']:.3f}, min {acc['min']:.3f}, max {acc['max']:.3f}")
    show(result.rounds)  # one row per round: accuracy mean/min/max, consensus distance, bytes, ...
    show(result.devices)  # one row per device: final accuracy, samples, label counts

    # %% The same run read back from its folder (e.g. in another notebook).
    again = p2pl.load(out / "ring")
    assert again.summary["final"] == result.summary["final"]

    # %% A sweep: two learning rates x 2 seeds, mean and 95 % CI over seeds per setting.
    # Finished runs are reused when this runs again; workers > 1 runs them in parallel processes.
    sweep = p2pl.sweep(small, grid={"training.lr": [0.05, 0.1]}, seeds=2, out=out / "sweep")
    show(sweep.results, rows=4)  # one row per setting x seed
    show(sweep.summary)  # e.g. final_accuracy_mean_mean, final_accuracy_mean_ci95_low/high, ...
    loaded = p2pl.load(out / "sweep")
    one_run = loaded.run("training.lr=0.1/seed-1")  # type: ignore[union-attr]
    print(f"swept {loaded.keys}; lr 0.1, seed 1: final accuracy {one_run.final_accuracy}")  # type: ignore[union-attr]


if __name__ == "__main__":  # required when a sweep uses worker processes
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/quickstart"))
