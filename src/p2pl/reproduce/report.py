"""``DIR/report.md`` and ``DIR/figures/*.png`` from a finished suite, all written atomically.

One section per claim: the claim, the setup, a table of measured numbers, the verdict with the
rule it follows from, and a figure (accuracy per round: the mean device solid, the worst device
dashed, the min–max band across devices shaded). A failed experiment shows up as ``failed`` in
the tables and in the list of runs, with its error.
"""

from __future__ import annotations

import datetime as dt
import io
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from p2pl import atomic
from p2pl.config import load_config
from p2pl.reproduce.claims import (
    VERDICT_RULE,
    Claim,
    Curves,
    Finding,
    Panel,
    Runs,
    SuiteSettings,
    label_of,
    pct,
)
from p2pl.reproduce.suite import FAILED, SuiteResult
from p2pl.stats import FAILS, HOLDS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MAX_BANDS = 4  # more shaded bands than this on one axes are unreadable


@dataclass(frozen=True)
class _Line:
    label: str
    curves: Curves
    band: bool
    show_local: bool
    emphasize: bool = False  # a distinct style drawn on top (a run equal to another by construction)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = panels if panels <= 3 else 2
    rows = (panels + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols if cols > 1 else 7.5, 4.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _draw_panel(a: Axes, title: str, lines: list[_Line], failed: list[str], zoom: bool = False) -> None:
    for i, line in enumerate(lines):
        c, color = line.curves, f"C{i}"
        label = line.label + (", after consensus" if line.show_local else "")
        if line.emphasize:  # dotted with markers, on top: the line it equals stays visible beneath
            a.plot(c.round, 100 * c.mean, color="black", linestyle=":", linewidth=1.6, marker="o", markersize=3.5,
                   markevery=max(1, len(c.round) // 12), zorder=5, label=label)  # fmt: skip
        else:
            a.plot(c.round, 100 * c.mean, color=color, label=label)
        spread = not np.allclose(c.min, c.mean)
        # With the after-local curve drawn too, a worst-device line would be a third look-alike.
        if spread and not line.show_local and not line.emphasize:
            a.plot(c.round, 100 * c.min, color=color, linestyle="--", linewidth=0.9)
        if spread and line.band:
            a.fill_between(c.round, 100 * c.min, 100 * c.max, color=color, alpha=0.13)
        if line.show_local and np.isfinite(c.local_mean).any():
            keep = np.isfinite(c.local_mean)
            a.plot(c.round[keep], 100 * c.local_mean[keep], color=color, linestyle=":",
                   marker=".", markersize=3, label=f"{line.label}, after local training")  # fmt: skip
    if failed:
        a.text(0.02, 0.03, "failed: " + ", ".join(failed), transform=a.transAxes,
               fontsize=7, color="firebrick")  # fmt: skip
    a.set_title(title, fontsize=10)
    a.set_xlabel("round")
    a.set_ylabel("test accuracy (%)")
    a.set_ylim(_zoomed_floor(lines) if zoom else 0, 100)
    a.grid(alpha=0.3)
    if lines:
        a.legend(fontsize=7, loc="lower right")


def _zoomed_floor(lines: list[_Line]) -> float:
    """A y floor just below every worst-device curve after the first quarter of the rounds."""
    lows = []
    for line in lines:
        later = line.curves.round >= max(1, int(line.curves.round.max()) // 4)
        if later.any():
            lows.append(float(np.nanmin(line.curves.min[later])))
    return max(0.0, 10 * np.floor(10 * min(lows)) - 10) if lows else 0.0


def claim_figure(claim: Claim, data: dict[str, Runs | None], path: Path, seeds: int = 1) -> None:
    """The claim's panels: mean (solid), worst device (dashed), min–max band (shaded)."""
    fig, axes = _new_figure(len(claim.panels))
    for ax, panel in zip(axes, claim.panels, strict=True):
        lines, failed = _panel_lines(panel, data)
        _draw_panel(ax, panel.title, lines, failed, panel.zoom)
    if any(p.show_local for p in claim.panels):
        legend = "mean device after consensus (solid) and after local training (dotted); shaded: min-max over devices"
    else:
        legend = "mean device (solid), worst device (dashed); shaded: min-max over devices"
    if seeds > 1:
        legend += f"; every curve averaged over {seeds} seeds"
    import textwrap

    width = 90 if len(claim.panels) == 1 else 140  # characters that fit the figure's width
    fig.suptitle(f"{claim.id}: {claim.title}\n" + textwrap.fill(legend, width), fontsize=10)
    fig.tight_layout()
    atomic.write_bytes(path, _png(fig))


def _panel_lines(panel: Panel, data: dict[str, Runs | None]) -> tuple[list[_Line], list[str]]:
    banded = set(panel.band) if panel.band else set(panel.keys) if len(panel.keys) <= _MAX_BANDS else set()
    lines, failed = [], []
    for key in panel.keys:
        m = data.get(key)
        if m is None:
            failed.append(label_of(key))
            continue
        lines.append(_Line(label_of(key), m.curves(), key in banded, panel.show_local, key in panel.emphasize))
    lines.sort(key=lambda line: line.emphasize)  # emphasized lines last: drawn on top
    return lines, failed


def gap_figure(points: list[tuple[str, float, int | None, float]], horizon: int, target: float, path: Path) -> None:
    """C3: spectral gap of W against rounds to the target and final mean accuracy."""
    fig, (left, right) = _new_figure(2)
    gaps = np.array([p[1] for p in points])
    reached = [p[2] if p[2] is not None else horizon + 1 for p in points]
    for (label, gap, r, _acc), y in zip(points, reached, strict=True):
        marker = "o" if r is not None else "x"
        left.scatter([gap], [y], marker=marker)
        left.annotate(label, (gap, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.axhline(horizon + 1, color="grey", linestyle=":", linewidth=0.8)
    left.set_title(f"rounds to {pct(target)} mean accuracy (x = not reached)", fontsize=9)
    right.scatter(gaps, [100 * p[3] for p in points])
    for label, gap, _r, acc in points:
        right.annotate(label, (gap, 100 * acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set_title("final mean device accuracy (%)", fontsize=9)
    for ax in (left, right):
        if gaps.size and gaps.min() > 0:
            ax.set_xscale("log")
        ax.set_xlabel("spectral gap 1 - |lambda_2(W)|")
        ax.grid(alpha=0.3)
    fig.suptitle("C3: mixing speed of the graph against learning", fontsize=10)
    fig.tight_layout()
    atomic.write_bytes(path, _png(fig))


# ---------------------------------------------------------------------------------------------
# markdown


def _table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _setup_lines(settings: SuiteSettings) -> list[str]:
    base = load_config(None, [*settings.base_overrides(), *settings.extra])
    t = base.training
    mode = "`--quick`" if settings.quick else "full"
    seeds = settings.seed_values
    if len(seeds) > 1:
        stats = (f"- **Seeds:** {len(seeds)} ({seeds[0]}-{seeds[-1]}); every number is the mean ± the half-width "
                 "of its 95 % confidence interval over seeds (Student t); a difference between two runs is "
                 "paired by seed (same data split and initializations)")  # fmt: skip
    else:
        stats = (f"- **Seeds:** 1 ({seeds[0]}): no confidence intervals; checks are judged on single values, so "
                 "a gap of a point or two can decide them; run with `--seeds 3` or more")  # fmt: skip
    return [
        stats,
        f"- **Mode:** {mode}; **dataset:** {base.data.name}"
        + (f" ({settings.dataset_note})" if settings.dataset_note else ""),
        f"- **Devices:** {base.devices}; **rounds:** {base.rounds}; **seed:** {base.seed}; evaluation every "
        f"{base.eval.every} round(s) on the common test set",
        f"- **Model:** {base.model.name} {base.model.hidden}; **optimizer:** {t.optimizer} lr {t.lr}"
        + (f" momentum {t.momentum}" if t.optimizer == "momentum" else "")
        + f", batch {t.batch_size}, {t.local_epochs} local epochs per round",
        f"- **Default graph:** {base.topology.name} (radius {base.topology.radius or 'automatic: 0.25 at 100'}), "
        f"{base.consensus.weights} weights, {base.consensus.steps} consensus step(s) per round, "
        f"max norm sync {'on' if base.sync.enabled else 'off'}",
        f'- **Rules:** accuracy is the final round\'s test accuracy of each device; "reaches X" means '
        f">= X - {100 * settings.tolerance:.0f} pts; rounds to target = first evaluated round whose mean "
        f"device accuracy is >= {pct(settings.target)} (the worst device's is shown too)",
        "- **Verdicts:** each claim is a list of checks, each judged on the 95 % CI of the quantity it is "
        "about: it *holds* when the whole interval satisfies it, *fails* when the whole interval violates "
        f"it, and is *undecided* otherwise. A claim is {VERDICT_RULE}.",
    ] + ([f"- **Extra overrides on every run:** `{' '.join(settings.extra)}`"] if settings.extra else [])


def _claim_section(claim: Claim, finding: Finding, result: SuiteResult, figures: list[str]) -> str:
    ran = {o.spec.key for o in result.outcomes.values()}
    own = [r for r in claim.runs if r.key in ran]
    shared = [k for k in claim.uses if k not in {r.key for r in claim.runs}]
    runs = "\n".join(f"  - `{r.key}`: {label_of(r.key)} - `{' '.join(r.overrides) or '(base)'}`"
                     for r in own)  # fmt: skip
    if shared:
        runs += "\n  - reused from other claims: " + ", ".join(f"`{k}` ({label_of(k)})" for k in shared)
    parts = [
        f"## {claim.id}: {claim.title}",
        f"**Claim.** {claim.statement}",
        f"**Setup.** {claim.setup}\n\n- Runs (config overrides on top of the base setup):\n{runs}",
        "**Measured.**\n\n" + (_table(finding.columns, finding.rows) if finding.columns else "(nothing)"),
    ]
    if finding.notes:
        parts.append("\n".join(f"- {n}" for n in finding.notes))
    parts.append(f"**Verdict: {finding.verdict}.** {finding.headline}.\n\n*Checks:* {claim.rule}")
    if finding.checks:
        mark = {HOLDS: "holds", FAILS: "fails"}
        parts.append("\n".join(f"- {mark.get(c.outcome, 'undecided')}: {c.what} ({c.value})"
                               for c in finding.checks))  # fmt: skip
    failed = [o for o in result.outcomes.values() if o.spec.key in claim.uses and o.status == FAILED]
    if failed:
        parts.append("**Failed runs:**\n\n" + "\n".join(f"- `{o.name}`: {o.error}" for o in failed))
    parts += [f"![{claim.id}: {name}](figures/{name})" for name in figures]
    return "\n\n".join(parts)


def _runs_table(result: SuiteResult) -> str:
    rows = []
    for key, o in result.outcomes.items():
        m = o.measured
        rows.append([
            f"`{key}`", o.status, f"{o.seconds:.1f}",
            "-" if m is None else f"{float(m.summary.get('wall_time_s', 0.0)):.1f}",
            "-" if m is None else pct(m.final()), "-" if m is None else pct(m.final("min")),
            f"runs/{key}/", o.error or "",
        ])  # fmt: skip
    cols = ["run", "status", "s this time", "run wall s", "final mean", "final min", "folder", "error"]
    return _table(cols, rows)


def render(result: SuiteResult, findings: dict[str, Finding], figures: dict[str, list[str]]) -> str:
    s = result.settings
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "p2pl reproduce" + (" --quick" if s.quick else "") + (f" --seeds {s.seeds}" if s.seeds > 1 else "")
    command += f" --out {result.out}"
    glance = [
        [f"[{c.id}](#{c.id.lower()}-{_anchor(c.title)})", c.title, f"**{findings[c.id].verdict}**",
         findings[c.id].headline]
        for c in result.claims
    ]  # fmt: skip
    lines = [
        "# Reproducing the claims of P2PL (Pranav & Moura, arXiv 2310.18861)",
        f"Generated {now} by `{command}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}). Suite wall time this invocation: "
        f"**{result.seconds:.0f} s** ({result.count('ran')} runs ran, {result.count('reused')} reused, "
        f"{result.count('failed')} failed); the experiments' own compute time, as recorded when they ran: "
        f"**{_compute_seconds(result):.0f} s**. Rerunning the same command reuses finished runs.",
        "\n".join(_setup_lines(s)),
        "## Claims at a glance\n\n" + _table(["claim", "what is tested", "verdict", "measured"], glance),
    ]
    for claim in result.claims:
        lines.append(_claim_section(claim, findings[claim.id], result, figures.get(claim.id, [])))
    lines.append(
        "## Runs\n\nEvery experiment's files (config.toml, metrics.csv with every device's accuracy per "
        "round, rounds.csv, devices.csv, summary.json) are in its folder under `runs/`.\n\n" + _runs_table(result)
    )
    return "\n\n".join(lines) + "\n"


def _compute_seconds(result: SuiteResult) -> float:
    return sum(float(o.measured.summary.get("wall_time_s", 0.0)) for o in result.outcomes.values() if o.measured)


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def write_report(result: SuiteResult) -> Path:
    """Judge every claim, draw its figures and write ``report.md``; returns its path."""
    data = result.data()
    findings: dict[str, Finding] = {}
    figures: dict[str, list[str]] = {}
    fig_dir = result.out / "figures"
    for claim in result.claims:
        try:
            finding = claim.judge_runs(data, result.settings)
        except Exception as err:  # a bug in a judge must not hide the other claims' results
            finding = Finding("not measured", f"could not judge: {type(err).__name__}: {err}", [], [])
        findings[claim.id] = finding
        names = [f"{claim.id.lower()}.png"]
        claim_figure(claim, data, fig_dir / names[0], len(result.settings.seed_values))
        points = finding.extra.get("gap_vs_rounds")
        if points:
            names.append(f"{claim.id.lower()}-spectral-gap.png")
            gap_figure(points, result.settings.rounds, result.settings.target, fig_dir / names[1])
        for name, draw in finding.extra.get("figures", {}).items():  # a claim's own extra figures
            draw(fig_dir / name)
            names.append(name)
        figures[claim.id] = names
    path = result.out / "report.md"
    atomic.write_text(path, render(result, findings, figures))
    return path
