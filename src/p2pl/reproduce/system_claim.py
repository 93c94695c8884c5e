"""C7: P2PL reaches the target sooner and with less energy than FedAvg when the edge link is the
bottleneck -- judged in simulated seconds and joules (p2pl.system), with the crossover rate.

Both runs use the system model on the same devices (the ``rpi4`` preset): P2PL's devices talk
over Wi-Fi device-to-device links whose rates follow from their distances (a 1 km square, 250 m
range: the C1 graph in metres) on one shared channel per neighbourhood; FedAvg's devices share
one edge uplink. The crossover replays FedAvg's rounds at other edge rates
(:func:`p2pl.system.crossover.fedavg_cost_by_rate`).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from p2pl.reproduce.claims import (
    NOT_MEASURED,
    Check,
    Claim,
    Data,
    Finding,
    Panel,
    Runs,
    RunSpec,
    SuiteSettings,
    pct,
    rounds_cell,
    verdict_of,
)
from p2pl.stats import FAILS, HOLDS, Interval, below, mean_ci, paired_difference

# An LTE-M (Cat-M1) class uplink, ~1 Mbit/s peak, shared by the 100 devices: the bottleneck.
EDGE_UPLINK_MBPS = 1.0
SYSTEM = (
    "system.enabled=true", 'system.device_profile="rpi4"', 'system.link_model="shannon"',
    "topology.area_m=1000.0", "topology.range_m=250.0", "system.shared_medium=true",
    "system.max_rate_mbps=72.2", f"system.edge_uplink_mbps={EDGE_UPLINK_MBPS}",
)  # fmt: skip
RATES = EDGE_UPLINK_MBPS * np.logspace(-2, 3, 41)


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _joules(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} J"


def _to_target(summary: dict, key: str, target: float) -> float | None:
    value = summary.get(key, {}).get(str(target))
    return None if value is None else float(value)


def _costs(m: Runs, target: float) -> tuple[list[float | None], list[float | None]]:
    """Per seed: simulated seconds and joules per device to the target (None: never reached)."""
    return ([_to_target(x.summary, "time_to_mean_accuracy_s", target) for x in m.seeds],
            [_to_target(x.summary, "energy_to_mean_accuracy_j", target) for x in m.seeds])  # fmt: skip


def _ci(values: list[float | None]) -> Interval:
    return mean_ci(v for v in values if v is not None)


def _less(what: str, p2pl: list[float | None], fed: list[float | None], unit: str) -> Check:
    """P2PL's cost - FedAvg's < 0, paired by seed; a seed P2PL never reaches the target in fails it,
    one only FedAvg never reaches it in counts for P2PL."""
    if any(v is None for v in p2pl):
        return Check(f"{what}, P2PL - FedAvg < 0", FAILS, "P2PL never reached the target in some seed")
    if any(v is None for v in fed):
        return Check(f"{what}, P2PL - FedAvg < 0", HOLDS, "FedAvg never reached the target in some seed")
    diff = paired_difference([float(v) for v in p2pl if v is not None], [float(v) for v in fed if v is not None])
    return Check(f"{what}, P2PL - FedAvg < 0", below(diff, 0), diff.format(digits=1, sign=True)
                 + f" {unit}")  # fmt: skip


def judge_c7(claim: Claim, data: Data, s: SuiteSettings) -> Finding:
    from p2pl.system.crossover import crossing_rate, fedavg_cost_by_rate
    from p2pl.system.plots import plot_crossover

    p2pl, fed = data.get("C7/p2pl"), data.get("C7/fedavg")
    cols = ["run", f"rounds to {pct(s.target)}", f"seconds to {pct(s.target)}", f"J/device to {pct(s.target)}",
            "simulated seconds (all rounds)", "J/device (all rounds, mean)", "final mean"]  # fmt: skip
    rows: list[list[str]] = []
    costs: dict[str, tuple[list[float | None], list[float | None]]] = {}
    for key, m, name in (("C7/p2pl", p2pl, "P2PL, Wi-Fi D2D (shared channel)"),
                         ("C7/fedavg", fed, f"FedAvg, edge uplink {EDGE_UPLINK_MBPS:g} Mbit/s")):  # fmt: skip
        if m is None:
            rows.append([name, "failed", "-", "-", "-", "-", "failed"])
            continue
        costs[key] = _costs(m, s.target)
        energy = mean_ci((x.summary.get("energy_j_per_device") or {}).get("mean") for x in m.seeds)
        rows.append([
            name, rounds_cell(m.rounds_to(s.target, s.rounds), s.rounds),
            _ci(costs[key][0]).format(digits=1) + " s", _ci(costs[key][1]).format(digits=1) + " J",
            mean_ci(m.values("simulated_time_s")).format(digits=1) + " s", energy.format(digits=1) + " J",
            pct(m.final()),
        ])  # fmt: skip
    if p2pl is None or fed is None:
        return Finding(NOT_MEASURED, "a run failed", cols, rows)
    (tp, ep), (tf, ef) = costs["C7/p2pl"], costs["C7/fedavg"]
    checks = [_less(f"seconds to {pct(s.target)}", tp, tf, "s"), _less(f"J/device to {pct(s.target)}", ep, ef, "J")]
    headline = (
        f"to {pct(s.target)} mean accuracy at a {EDGE_UPLINK_MBPS:g} Mbit/s edge uplink: P2PL "
        f"{_ci(tp).format(digits=1)} s and {_ci(ep).format(digits=1)} J/device, FedAvg {_ci(tf).format(digits=1)} s "
        f"and {_ci(ef).format(digits=1)} J/device"
    )
    finding = Finding(verdict_of(checks), headline, cols, rows, checks=checks)
    first = fed.first  # the crossover replays one seed's FedAvg rounds at other edge rates
    rounds_f = first.rounds_to(s.target)
    if rounds_f is None or any(v is None for v in (*tp, *ep)):
        return finding
    seconds, joules = fedavg_cost_by_rate(first.config, rounds_f, first.curves.bytes_sent_mean, RATES)
    cross_t, cross_e = crossing_rate(RATES, seconds, _ci(tp).mean), crossing_rate(RATES, joules, _ci(ep).mean)

    def wins(cross: float | None) -> str:
        return f"never on the grid (up to {RATES[-1]:g} Mbit/s)" if cross is None else f"above {cross:.3g} Mbit/s"

    finding.headline += f"; FedAvg is faster {wins(cross_t)} and uses less energy {wins(cross_e)}"
    latency_ms = first.config.system.edge_latency_ms
    finding.notes.append(
        f"Crossover: FedAvg's rounds to {pct(s.target)} (seed {first.config.seed}) replayed through the system model "
        f"at edge uplink rates from {RATES[0]:g} to {RATES[-1]:g} Mbit/s (downlink scaled alike), against P2PL's "
        f"mean over seeds; its latency ({latency_ms:g} ms each way per round) bounds how fast it can get however "
        "fast the link."
    )
    point = (_ci(tp).mean, _ci(ep).mean)
    draw = partial(plot_crossover, RATES, (seconds, joules), point, EDGE_UPLINK_MBPS, (cross_t, cross_e),
                   target=s.target)  # fmt: skip
    finding.extra["figures"] = {"c7-crossover.png": lambda path: draw(path=path)}
    finding.extra["crossover_mbps"] = {"time": cross_t, "energy": cross_e}
    return finding


def claim_c7() -> Claim:
    return Claim(
        "C7", "P2PL is faster and cheaper than FedAvg when the edge link is the bottleneck",
        "With no server to reach, P2PL reaches FedAvg's accuracy sooner and with less energy per device than "
        "FedAvg through an edge server whose shared uplink is the bottleneck; FedAvg wins once the edge link is "
        "fast enough (the crossover rate).",
        "The C1 setup with the system model on Raspberry Pi 4-class devices (rpi4 preset): P2PL over Wi-Fi "
        "device-to-device links in a 1 km square with 250 m range (the C1 graph in metres), rates from "
        "log-distance path loss and Shannon capacity (20 MHz, 20 dBm, capped at 72.2 Mbit/s), one shared "
        f"channel per neighbourhood; FedAvg through an edge server with a {EDGE_UPLINK_MBPS:g} Mbit/s uplink "
        "(LTE-M class) shared by all devices, 50 Mbit/s broadcast downlink, 20 ms latency each way.",
        "two checks on the paired differences over seeds at the configured edge rate: P2PL's simulated seconds "
        "to the target mean accuracy - FedAvg's < 0, and its joules per device to the target - FedAvg's < 0 "
        "(a seed where P2PL never reaches the target fails a check). The crossover (the edge uplink rate above "
        "which FedAvg would win) is reported, not graded.",
        (RunSpec("C7/p2pl", "P2PL, seconds and joules", SYSTEM, "P2PL (system)"),
         RunSpec("C7/fedavg", "FedAvg, seconds and joules", (*SYSTEM, 'algorithm="fedavg"'), "FedAvg (system)")),
        ("C7/p2pl", "C7/fedavg"),
        (Panel("accuracy per round (the crossover figure shows seconds and joules)", ("C7/p2pl", "C7/fedavg")),),
        judge_c7,
    )  # fmt: skip
