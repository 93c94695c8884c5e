"""What a person reads: result tables and plots on stdout / in files, progress on stderr.

Results go to stdout so ``p2pl run > log`` keeps them; progress goes to stderr: a live bar on a
terminal, plain lines every few rounds otherwise (a log file or a CI job gets readable text).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from p2pl.metrics import History

ProgressFn = Callable[[int, int, dict[str, float]], None]
# Plain progress lines: about this many per run, plus the last round.
PLAIN_PROGRESS_LINES = 10


class _Console(Console):
    """A rich console that lets a closed pipe surface as ``BrokenPipeError`` (rich's default
    exits with code 1), so the CLI ends quietly the same way whichever writer hit it."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


# soft_wrap: a long line (a path) stays one line in a log or a pipe; tables still fit the width.
console = _Console(soft_wrap=True)  # results: stdout
progress_console = _Console(stderr=True, soft_wrap=True)  # progress, warnings and notes: stderr


@contextlib.contextmanager
def round_progress(label: str, total: int, enabled: bool = True) -> Iterator[ProgressFn | None]:
    """Progress for a run of ``total`` rounds on stderr; yields ``update(round, total, metrics)``
    (or None when disabled). A bar with ETA on a terminal, plain text lines otherwise."""
    if not enabled:
        yield None
        return
    if not progress_console.is_terminal:
        yield _plain_progress(label, total)
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )  # fmt: skip
    # Started on the first finished round, so an error while setting up prints only its one line.
    progress = Progress(*columns, console=progress_console, transient=False)
    task = None

    def update(k: int, _total: int, metrics: dict[str, float]) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=total, status="")
        progress.update(task, completed=k, status=_status(metrics))

    try:
        yield update
    finally:
        if task is not None:
            progress.stop()


def _status(metrics: dict[str, float]) -> str:
    if "acc_mean" not in metrics:
        return "not evaluated yet"
    return f"acc mean {metrics['acc_mean']:.3f} min {metrics['acc_min']:.3f}"


def _plain_progress(label: str, total: int) -> ProgressFn:
    """One line every ``total / PLAIN_PROGRESS_LINES`` rounds and at the last round."""
    every = max(1, total // PLAIN_PROGRESS_LINES)
    start = time.perf_counter()

    def update(k: int, _total: int, metrics: dict[str, float]) -> None:
        if k % every and k != total:
            return
        elapsed = time.perf_counter() - start
        line = f"{label}: round {k}/{total}, {_status(metrics)}, {elapsed:.1f} s"
        progress_console.print(line, markup=False, highlight=False, soft_wrap=True)

    return update


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(summaries: dict[str, dict[str, Any]], title: str = "") -> Table:
    """Final accuracy / loss across devices, side by side for one or more runs."""
    table = Table(title=title or None, padding=(0, 1))
    table.add_column("run", no_wrap=True, min_width=11)
    # Short headers, numbers never cut: the table must fit an 80-column terminal.
    for col in ("N", "acc\nmean", "acc\nmin", "acc\nmax", "loss", "to\n80%", "MB/\ndev", "time\ns"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, s in summaries.items():
        acc, loss = s["final"]["accuracy"], s["final"]["loss"]
        to80 = s["rounds_to_mean_accuracy"].get("0.8")
        table.add_row(
            name, str(s["devices"]), _pct(acc["mean"]), _pct(acc["min"]), _pct(acc["max"]), f"{loss['mean']:.3f}",
            "-" if to80 is None else str(to80),
            f"{s['bytes_sent_per_device'] / 1e6:.2f}", f"{s['wall_time_s']:.1f}",
        )  # fmt: skip
    return table


def accuracy_curves(h: History) -> dict[str, np.ndarray]:
    acc = np.stack(h.accuracy)  # NaN: a device not evaluated that round (eval.devices)
    return {"round": np.asarray(h.eval_rounds), "mean": np.nanmean(acc, 1), "min": np.nanmin(acc, 1),
            "max": np.nanmax(acc, 1)}  # fmt: skip


def plot_accuracy(
    curves: dict[str, dict[str, np.ndarray]], path: Path, title: str = "", band: bool = True, caption: str = ""
) -> None:
    """Mean device accuracy per round (solid), min (dashed) and a band per run: the min–max over
    devices, or ``band_low``..``band_high`` when a run's curves hold them (e.g. a CI over seeds).
    ``caption`` (what was run, what the lines and bands are) goes under the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from p2pl import atomic

    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c["round"], 100 * c["mean"], color=color, label=f"{name} mean")
        if c["min"] is not None and not np.allclose(c["min"], c["mean"]):
            ax.plot(c["round"], 100 * c["min"], color=color, linestyle="--", linewidth=1, label=f"{name} min")
            if band and "band_low" not in c:
                ax.fill_between(c["round"], 100 * c["min"], 100 * c["max"], color=color, alpha=0.12)
        if band and "band_low" in c:
            ax.fill_between(c["round"], 100 * c["band_low"], 100 * c["band_high"], color=color, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07 if caption else 0, 1, 1))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())


def bytes_curves(h: History, sync_bytes_per_device: float = 0.0) -> dict[str, np.ndarray]:
    """Mean device accuracy at each evaluated round with the megabytes a device had sent by then
    (mean over devices, max-norm sync included): the x-axis of accuracy per byte."""
    per_round = np.array([float(b.mean()) for b in h.bytes_sent]) if h.bytes_sent else np.zeros(0)
    sent = np.concatenate([[0.0], np.cumsum(per_round)]) + sync_bytes_per_device
    rounds = np.asarray(h.eval_rounds)
    return {"round": rounds, "mean": np.nanmean(np.stack(h.accuracy), 1), "mb": sent[rounds] / 1e6}


def plot_accuracy_bytes(
    curves: dict[str, dict[str, np.ndarray]], path: Path, title: str = "", caption: str = ""
) -> None:
    """Two panels: mean device accuracy against rounds, and against megabytes sent per device
    (log scale; runs that send nothing, such as centralized and local, are on the first only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from p2pl import atomic

    fig = Figure(figsize=(10, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    by_round, by_bytes = fig.subplots(1, 2, sharey=True)
    for i, (name, c) in enumerate(curves.items()):
        width = 3.0 if i == 0 else 1.5  # the first run (the reference) drawn wide: others may lie on it
        by_round.plot(c["round"], 100 * c["mean"], color=f"C{i}", linewidth=width, label=name)
        sends = c["mb"] > 0
        if sends.any():
            by_bytes.plot(c["mb"][sends], 100 * c["mean"][sends], color=f"C{i}", linewidth=width, marker=".",
                          markersize=3, label=name)  # fmt: skip
    by_round.set_xlabel("round")
    by_round.set_ylabel("mean device test accuracy (%)")
    by_bytes.set_xlabel("MB sent per device (log scale)")
    by_bytes.set_xscale("log")
    for ax in (by_round, by_bytes):
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if caption else 0, 1, 1))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())
