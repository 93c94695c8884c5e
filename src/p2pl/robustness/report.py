"""``DIR/report.md`` and ``DIR/robustness.png`` from a finished grid, written atomically.

The table has one row per scenario and one column per aggregation rule; a cell holds the honest
devices' final mean / worst test accuracy and, for an attacked row, their change against the
attack-free run of the same rule. The reading under it is computed from the same numbers.
"""

from __future__ import annotations

import datetime as dt
import io
import platform
from pathlib import Path

import numpy as np

from p2pl import atomic
from p2pl.robustness.grid import NO_ATTACK, GridSettings, Scenario
from p2pl.robustness.suite import FAILED, GridResult, write_results_csv

#: An honest mean this far below the attack-free run of the same rule counts as a collapse.
COLLAPSE = 0.10
#: A rule "holds" under an attack when honest mean and worst stay this close to its attack-free run.
HOLD_MEAN, HOLD_WORST = 0.03, 0.06
#: Without attack, a robust rule is "as good as mean" within this many points of mean accuracy.
NO_ATTACK_COST = 0.015


def pts(x: float) -> str:
    """Points, signed; a change that rounds to zero prints as +0.0, never -0.0."""
    value = 100 * x
    return f"{0.0 if abs(value) < 0.05 else value:+.1f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)])


def _cell(result: GridResult, scenario: Scenario, rule: str) -> str:
    o = result.outcome(scenario.key, rule)
    acc = result.honest_accuracy(scenario.key, rule)
    if o is None or acc is None:
        return "failed"
    text = f"{pct(acc[0])} / {pct(acc[1])}"
    base = result.honest_accuracy(NO_ATTACK, rule)
    if scenario.key != NO_ATTACK and base is not None:
        text += f" ({pts(acc[0] - base[0])} / {pts(acc[1] - base[1])})"
    return text


def accuracy_table(result: GridResult) -> str:
    """Scenario x rule: honest mean / worst accuracy (%), change vs attack-free (points)."""
    s = result.settings
    rows = []
    for scenario in s.scenarios:
        rows.append([scenario.label, scenario.describe_scale(), *(_cell(result, scenario, r) for r in s.rules)])
    return _table(["attack", "default scale", *s.rules], rows)


def _deltas(result: GridResult, scenario: str, rule: str) -> tuple[float, float] | None:
    acc, base = result.honest_accuracy(scenario, rule), result.honest_accuracy(NO_ATTACK, rule)
    if acc is None or base is None:
        return None
    return acc[0] - base[0], acc[1] - base[1]


def reading(result: GridResult) -> list[str]:
    """A few sentences computed from the table: who collapses, which rule holds, what robustness costs."""
    s = result.settings
    robust = [r for r in s.rules if r != "mean"]
    lines = []
    for scenario in s.scenarios:
        if scenario.key == NO_ATTACK:
            continue
        parts = []
        if "mean" in s.rules:
            d = _deltas(result, scenario.key, "mean")
            if d is not None:
                verdict = "collapses" if d[0] < -COLLAPSE else "holds" if _holds(d) else "degrades"
                parts.append(f"plain mean {pts(d[0])} / {pts(d[1])} pts ({verdict})")
        best = best_rule(result, scenario.key, robust)
        d = None if best is None else _deltas(result, scenario.key, best)
        if d is not None:
            parts.append(f"best robust rule **{best}** {pts(d[0])} / {pts(d[1])} pts "
                         f"({'holds' if _holds(d) else 'does not hold'})")  # fmt: skip
        if parts:
            lines.append(f"**{scenario.label}**: " + "; ".join(parts) + ".")
    cost = []
    plain = result.honest_accuracy(NO_ATTACK, "mean") if "mean" in s.rules else None
    if plain is not None:
        for r in robust:
            acc = result.honest_accuracy(NO_ATTACK, r)
            if acc is not None:
                over = acc[0] - plain[0] < -NO_ATTACK_COST
                flag = f" (costs more than {100 * NO_ATTACK_COST:g})" if over else ""
                cost.append(f"{r} {pts(acc[0] - plain[0])}{flag}")
    if cost:
        lines.append("**Without attack**, against plain mean (mean accuracy, pts): " + ", ".join(cost) + ".")
    exposure = exposure_line(result)
    if exposure:
        lines.append(exposure)
    hijack = [k for k in ("sync-hijack-verified", "sync-hijack-flood") if k in {x.key for x in s.scenarios}]
    if len(hijack) == 2 and "mean" in s.rules:
        v, f = (_deltas(result, k, "mean") for k in hijack)
        if v is not None and f is not None:
            flood = [d for r in robust if (d := _deltas(result, hijack[1], r)) is not None]
            undone = any(_holds(d) for d in flood)
            lines.append(
                f"**Sync** (plain mean): the hijacker's claim moves honest mean by {pts(v[0])} pts under verified "
                f"sync (the claim is recomputed and refused) and by {pts(f[0])} pts under the paper's flooding "
                "sync, where devices adopt the hijacker's scaled parameters before training starts"
                + ("; a robust rule recovers from it." if undone else "; no aggregation rule recovers from it.")
            )
    return lines


def exposure_line(result: GridResult) -> str | None:
    """How many attackers the honest devices hear on the base graph, against what each rule
    tolerates: this is what decides which rule holds for which device."""
    from p2pl.core.cooperate import trim_count
    from p2pl.graph.topology import build_topology

    honest, cfg = result.reference_honest(), result.settings.base
    if honest is None or len(honest) != cfg.devices:
        return None
    try:
        edges = np.asarray(build_topology(cfg.topology, cfg.devices, cfg.seed).edges, dtype=np.int64).reshape(-1, 2)
    except Exception:  # e.g. an edge-list file gone since the runs: the reading goes without this line
        return None
    attacker = (~honest).astype(np.float64)
    degree = np.bincount(edges.ravel(), minlength=cfg.devices)
    heard = np.bincount(edges[:, 0], attacker[edges[:, 1]], cfg.devices)
    heard += np.bincount(edges[:, 1], attacker[edges[:, 0]], cfg.devices)
    d, a = degree[honest], heard[honest].astype(np.int64)
    if len(d) == 0:
        return None
    worst = int(np.argmax(a / (d + 1)))
    trim_cut = np.array([trim_count(cfg.consensus.trim, int(x) + 1) for x in d])
    clip_share = 1 - cfg.consensus.clip_quantile
    q = cfg.consensus.clip_quantile
    radius_followed = int((2 * a >= np.maximum(d, 1)).sum())  # attackers hold half the neighbour weight or more
    return (
        f"**Exposure** (base graph): {int((a > 0).sum())} of {len(d)} honest devices hear an attacker; "
        f"the most exposed (by share) hears {a[worst]} among its {d[worst] + 1} values (own included). "
        f"Honest devices hearing more attackers than trimmed-mean cuts at each end: {int((a > trim_cut).sum())} "
        f"(trim {cfg.consensus.trim:g}); with more than {100 * clip_share:.0f} % of their neighbours attacking "
        f"(so under equal weights an attacker can be among the nearest {q:g} of the weight that sets the "
        f"clipped rule's radius): {int((a > clip_share * np.maximum(d, 1)).sum())}; with attackers as half or "
        f"more of their values (where the median can follow them): {int((2 * a >= d + 1).sum())}; as half or more "
        f"of their neighbours (where the redescending rule's radius can follow them): {radius_followed}."
    )


def best_rule(result: GridResult, scenario: str, rules: list[str] | tuple[str, ...]) -> str | None:
    """The rule with the highest average of honest mean and worst accuracy under ``scenario``
    (both count: a rule that keeps the mean but abandons some devices is not the best)."""
    scored = [(sum(acc) / 2, r) for r in rules if (acc := result.honest_accuracy(scenario, r)) is not None]
    return max(scored)[1] if scored else None


def _holds(d: tuple[float, float]) -> bool:
    return d[0] >= -HOLD_MEAN and d[1] >= -HOLD_WORST


def _setup_lines(s: GridSettings) -> list[str]:
    c = s.base
    adv = c.adversary
    who = f"{adv.count} attackers" if adv.count > 0 else f"{100 * adv.fraction:g} % of the devices attack"
    t = c.training
    return [
        f"- **Mode:** {'`--quick`' if s.quick else 'full'}; **dataset:** {c.data.name}, partition "
        f"{c.partition.scheme}; **devices:** {c.devices}; **rounds:** {c.rounds}; **seed:** {c.seed}",
        f"- **Attackers:** {who}, placed by {adv.placement}"
        + (f", scale {adv.scale:g} for every attack" if adv.scale else " (each attack at its default scale)"),
        f"- **Graph:** {c.topology.name}"
        + (f" (radius {c.topology.radius or 'automatic'})" if c.topology.name == "random-geometric" else "")
        + f"; {c.consensus.weights} weights, {c.consensus.steps} consensus step(s) per round; max norm sync "
        f"{'on' if c.sync.enabled else 'off'}",
        f"- **Rules:** trimmed-mean trim {c.consensus.trim}, clipped clip_quantile {c.consensus.clip_quantile}, "
        f"redescending radius_factor {c.consensus.radius_factor}",
        f"- **Model:** {c.model.name} {c.model.hidden}; {t.optimizer} lr {t.lr}, batch {t.batch_size}, "
        f"{t.local_epochs} local epochs per round",
        "- **Rows:** the sync hijack under verified and under flooding sync; every other attack under verified "
        "sync; the attack-free row per rule is the reference of every delta",
    ]


def _runs_table(result: GridResult) -> str:
    rows = []
    for key, o in result.outcomes.items():
        m = o.measured
        wall = "-" if m is None else f"{float(m.summary.get('wall_time_s', 0.0)):.1f}"
        per_round = "-" if m is None or m.summary.get("round_time_s_mean") is None else (
            f"{float(m.summary['round_time_s_mean']):.2f}")  # fmt: skip
        rows.append([f"`runs/{key}/`", o.status, f"{o.seconds:.1f}", wall, per_round, o.error or ""])
    return _table(["run", "status", "s this time", "run wall s", "s per round", "error"], rows)


def render(result: GridResult, figure: str) -> str:
    s = result.settings
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    failed = result.failures
    parts = [
        "# Robustness of P2PL to Byzantine devices",
        f"Generated {now} by `{s.command}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}). This invocation: **{result.seconds:.0f} s** "
        f"({result.count('ran')} runs ran, {result.count('reused')} reused, {result.count(FAILED)} failed). "
        "Rerunning the same command reuses finished runs and resumes interrupted ones.",
        "## Honest accuracy: attack x aggregation rule\n\n"
        "Each cell: the honest devices' final test accuracy, **mean / worst** device (%), and in brackets its "
        "change against the attack-free run of the same rule (points). Attackers are never counted; the "
        "attack-free run is read over the same devices.\n\n" + accuracy_table(result),
        "## Reading\n\n"
        + "\n".join(f"- {line}" for line in reading(result) or ["(no run finished: nothing to read)"])
        + f"\n\nA rule *holds* when honest mean and worst stay within {100 * HOLD_MEAN:.0f} and "
        f"{100 * HOLD_WORST:.0f} points of its attack-free run; *collapses* means more than "
        f"{100 * COLLAPSE:.0f} points of honest mean lost.",
        f"![honest mean accuracy per attack and rule]({figure})\n\n*{figure}*: the honest devices' final mean "
        "test accuracy (%) per attack (rows) and aggregation rule (columns), the worst honest device in "
        "brackets; grey cells failed.",
        "## What was run\n\n" + "\n".join(_setup_lines(s)),
        "Every run's files (config.toml, metrics.csv, rounds.csv, devices.csv with each device's role, "
        "summary.json) are in its folder under `runs/`; `results.csv` has one row per run.\n\n" + _runs_table(result),
    ]
    if failed:
        parts.append("**Failed runs** (traceback in each folder's error.txt):\n\n"
                     + "\n".join(f"- `runs/{o.spec.key}/`: {o.error}" for o in failed))  # fmt: skip
    return "\n\n".join(parts) + "\n"


def heatmap(result: GridResult, path: Path) -> None:
    """Honest mean accuracy per (scenario, rule) as a heatmap, worst device in brackets."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result.settings
    grid = np.full((len(s.scenarios), len(s.rules)), np.nan)
    worst = np.full_like(grid, np.nan)
    for i, scenario in enumerate(s.scenarios):
        for j, rule in enumerate(s.rules):
            acc = result.honest_accuracy(scenario.key, rule)
            if acc is not None:
                grid[i, j], worst[i, j] = 100 * acc[0], 100 * acc[1]
    fig = Figure(figsize=(1.9 * len(s.rules) + 2.8, 0.55 * len(s.scenarios) + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("lightgrey")  # failed cells (NaN) show the background
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "failed" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f} ({worst[i, j]:.1f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(s.rules)), labels=list(s.rules))
    ax.set_yticks(range(len(s.scenarios)), labels=[x.label for x in s.scenarios], fontsize=8)
    ax.set_xlabel("aggregation rule")
    fig.colorbar(image, ax=ax, label="honest mean accuracy (%)")
    ax.set_title(f"Honest final test accuracy (%): mean (worst); {s.base.devices} devices, {s.base.rounds} rounds",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())


def write_report(result: GridResult) -> Path:
    """results.csv, robustness.png and report.md in ``result.out``; returns report.md's path."""
    write_results_csv(result)
    figure = "robustness.png"
    heatmap(result, result.out / figure)
    path = result.out / "report.md"
    atomic.write_text(path, render(result, figure))
    return path


__all__ = [
    "COLLAPSE",
    "HOLD_MEAN",
    "HOLD_WORST",
    "accuracy_table",
    "best_rule",
    "exposure_line",
    "heatmap",
    "reading",
    "render",
    "write_report",
]
