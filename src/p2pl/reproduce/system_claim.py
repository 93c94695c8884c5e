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
    Claim,
    Data,
    Finding,
    Panel,
    RunSpec,
    SuiteSettings,
    grade,
    pct,
    rounds_cell,
)

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


def judge_c7(claim: Claim, data: Data, s: SuiteSettings) -> Finding:
    from p2pl.system.crossover import crossing_rate, fedavg_cost_by_rate
    from p2pl.system.plots import plot_crossover

    p2pl, fed = data.get("C7/p2pl"), data.get("C7/fedavg")
    cols = ["run", f"rounds to {pct(s.target)}", f"seconds to {pct(s.target)}", f"J/device to {pct(s.target)}",
            "simulated seconds (all rounds)", "J/device (all rounds, mean)", "final mean"]  # fmt: skip
    rows: list[list[str]] = []
    costs: dict[str, tuple[float | None, float | None]] = {}
    for key, m, name in (("C7/p2pl", p2pl, "P2PL, Wi-Fi D2D (shared channel)"),
                         ("C7/fedavg", fed, f"FedAvg, edge uplink {EDGE_UPLINK_MBPS:g} Mbit/s")):  # fmt: skip
        if m is None:
            rows.append([name, "failed", "-", "-", "-", "-", "failed"])
            continue
        t = _to_target(m.summary, "time_to_mean_accuracy_s", s.target)
        e = _to_target(m.summary, "energy_to_mean_accuracy_j", s.target)
        costs[key] = (t, e)
        rows.append([
            name, rounds_cell(m.rounds_to(s.target), s.rounds), _seconds(t), _joules(e),
            _seconds(m.summary.get("simulated_time_s")),
            _joules((m.summary.get("energy_j_per_device") or {}).get("mean")), pct(m.final()),
        ])  # fmt: skip
    if p2pl is None or fed is None:
        return Finding(grade(False, False), "a run failed", cols, rows)
    (tp, ep), (tf, ef) = costs["C7/p2pl"], costs["C7/fedavg"]
    if tp is None:
        return Finding(grade(False, False), f"P2PL never reached {pct(s.target)} in {s.rounds} rounds", cols, rows)
    if tf is None:
        headline = f"FedAvg never reached {pct(s.target)} in {s.rounds} rounds; P2PL did in {_seconds(tp)}"
        return Finding(grade(True, True), headline, cols, rows)
    assert ep is not None and ef is not None
    rounds_f = fed.rounds_to(s.target) or 0
    seconds, joules = fedavg_cost_by_rate(fed.config, rounds_f, fed.curves.bytes_sent_mean, RATES)
    cross_t, cross_e = crossing_rate(RATES, seconds, tp), crossing_rate(RATES, joules, ep)
    sooner, cheaper = tp < tf, ep < ef

    def wins(cross: float | None) -> str:
        return f"never on the grid (up to {RATES[-1]:g} Mbit/s)" if cross is None else f"above {cross:.3g} Mbit/s"

    headline = (
        f"to {pct(s.target)} mean accuracy at a {EDGE_UPLINK_MBPS:g} Mbit/s edge uplink: P2PL {_seconds(tp)} and "
        f"{_joules(ep)}/device, FedAvg {_seconds(tf)} and {_joules(ef)}/device; FedAvg is faster "
        f"{wins(cross_t)} and uses less energy {wins(cross_e)}"
    )
    latency_ms = fed.config.system.edge_latency_ms
    notes = [
        f"Crossover: FedAvg's rounds to {pct(s.target)} replayed through the system model at edge uplink rates from "
        f"{RATES[0]:g} to {RATES[-1]:g} Mbit/s (downlink scaled alike); its latency ({latency_ms:g} ms each way per "
        "round) bounds how fast it can get however fast the link."
    ]
    finding = Finding(grade(sooner and cheaper, sooner or cheaper), headline, cols, rows, notes)
    draw = partial(plot_crossover, RATES, (seconds, joules), (tp, ep), EDGE_UPLINK_MBPS, (cross_t, cross_e),
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
        "reproduced if P2PL reaches the target mean accuracy in fewer simulated seconds *and* with fewer "
        "joules per device than FedAvg at the configured edge rate; partly if only one of the two; otherwise "
        "not. The crossover (the edge uplink rate above which FedAvg would win) is reported, not graded.",
        (RunSpec("C7/p2pl", "P2PL, seconds and joules", SYSTEM, "P2PL (system)"),
         RunSpec("C7/fedavg", "FedAvg, seconds and joules", (*SYSTEM, 'algorithm="fedavg"'), "FedAvg (system)")),
        ("C7/p2pl", "C7/fedavg"),
        (Panel("accuracy per round (the crossover figure shows seconds and joules)", ("C7/p2pl", "C7/fedavg")),),
        judge_c7,
    )  # fmt: skip
