"""The system model: link rates, round timing, energy, profiles, FLOPs, and its place in a run."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from p2pl.cli import main as cli
from p2pl.config import ExperimentConfig, SystemConfig
from p2pl.errors import P2PLError
from p2pl.graph.links import RoundNetwork
from p2pl.models import mlp
from p2pl.sim.simulator import run_experiment
from p2pl.system.crossover import crossing_rate
from p2pl.system.energy import round_energy
from p2pl.system.flops import train_flops_per_sample
from p2pl.system.model import SystemModel
from p2pl.system.profiles import PRESETS, DeviceArrays, device_arrays, load_profiles
from p2pl.system.radio import edge_rates_bps, shannon_rate_bps
from p2pl.system.timing import peer_airtime, peer_finish, server_round, shared_uplink_done

ON = "system.enabled=true"


# ---------------------------------------------------------------------------------------------
# radio


def test_shannon_rate_matches_the_formula_by_hand() -> None:
    cfg = SystemConfig()  # 20 MHz, 20 dBm, -174 dBm/Hz, NF 7 dB, n = 3, 40.05 dB at 1 m
    # 100 m: PL = 40.05 + 60 = 100.05 dB; noise = -174 + 7 + 73.01 = -93.99 dBm; SNR = 13.94 dB
    snr = 10 ** ((20 - 100.05 - (-174 + 7 + 10 * math.log10(20e6))) / 10)
    expected = 20e6 * math.log2(1 + snr)
    assert shannon_rate_bps(np.array([100.0]), cfg)[0] == pytest.approx(expected, rel=1e-12)
    assert 90e6 < expected < 97e6
    rates = shannon_rate_bps(np.array([0.1, 1.0, 10.0, 100.0, 1000.0]), cfg)
    assert rates[0] == rates[1]  # the model starts at 1 m
    assert np.all(np.diff(rates[1:]) < 0)  # farther is slower
    capped = shannon_rate_bps(np.array([1.0, 1000.0]), replace(cfg, max_rate_mbps=72.2))
    assert capped[0] == 72.2e6 and capped[1] < 72.2e6


def test_edge_rates_fixed_or_from_positions() -> None:
    edges = np.array([[0, 1], [1, 2]])
    fixed = edge_rates_bps(edges, None, SystemConfig(link_rate_mbps=3.0))
    assert fixed.tolist() == [3e6, 3e6]
    shannon = SystemConfig(link_model="shannon")
    positions = np.array([[0.0, 0.0], [30.0, 40.0], [30.0, 440.0]])  # 50 m and 400 m
    rates = edge_rates_bps(edges, positions, shannon)
    assert rates.tolist() == pytest.approx(shannon_rate_bps(np.array([50.0, 400.0]), shannon).tolist())
    with pytest.raises(P2PLError, match=r"topology\.area_m"):
        edge_rates_bps(edges, None, shannon)


# ---------------------------------------------------------------------------------------------
# timing and energy


PATH = np.array([[0, 1], [1, 2]])  # 0 - 1 - 2


def test_peer_airtime_parallel_links_and_shared_medium() -> None:
    sent = np.array([1000.0, 2000.0, 1000.0])  # device 1 sends 1000 bytes on each of its 2 links
    rates = np.array([8000.0, 4000.0])  # 1 s per 1000 bytes on 0-1, 2 s on 1-2
    air = peer_airtime(PATH, sent, rates, latency_s=0.0, shared_medium=False)
    assert air.tx_s.tolist() == [1.0, 3.0, 2.0]
    assert air.rx_s.tolist() == [1.0, 3.0, 2.0]
    assert air.exchange_s.tolist() == [1.0, 2.0, 2.0]  # the slowest own link, links in parallel
    shared = peer_airtime(PATH, sent, rates, latency_s=0.5, shared_medium=True)
    # one channel per neighbourhood: every transmission of the device and its neighbours
    assert shared.exchange_s.tolist() == [1 + 3 + 0.5, 1 + 3 + 2 + 0.5, 3 + 2 + 0.5]
    alone = peer_airtime(np.array([[0, 1]]), np.array([1000.0, 1000.0, 0.0]), rates[:1], 0.5, False)
    assert alone.exchange_s[2] == 0.0  # no live link: no exchange, no latency


def test_a_device_waits_only_for_its_live_neighbours() -> None:
    train = np.array([1.0, 3.0, 10.0])  # device 2 is a straggler but not linked to 0 and 1
    edges = np.array([[0, 1]])
    finish = peer_finish(train, edges, np.array([0.5, 0.5, 0.0]))
    assert finish.tolist() == [3.5, 3.5, 10.0]
    assert peer_finish(train, PATH, np.zeros(3)).tolist() == [3.0, 10.0, 10.0]


def test_shared_uplink_carries_uploads_as_they_arrive() -> None:
    assert shared_uplink_done(np.array([0.0, 0.0]), np.array([1.0, 1.0])) == 2.0
    assert shared_uplink_done(np.array([0.0, 5.0]), np.array([1.0, 1.0])) == 6.0  # idle in between
    assert shared_uplink_done(np.array([0.5, 0.0]), np.array([1.0, 1.0])) == 2.0
    assert shared_uplink_done(np.zeros(0), np.zeros(0)) == 0.0


def test_server_round_is_upload_latency_server_latency_broadcast() -> None:
    train = np.array([1.0, 2.0, 9.0])
    active = np.array([True, True, False])  # an absent device neither trains nor uploads
    sent = np.array([1000.0, 1000.0, 0.0])
    srv = server_round(train, active, sent, 1000.0, 8000.0, 16000.0, latency_s=0.1, server_s=0.2)
    # uploads: 1 -> 2 s, then 2 -> 3 s; + 0.1 + 0.2 + 0.1 + 0.5 s broadcast
    assert srv.upload_done_s == 3.0
    assert srv.duration_s == pytest.approx(3.9)
    assert srv.tx_s.tolist() == [1.0, 1.0, 0.0] and srv.rx_s.tolist() == [0.5, 0.5, 0.0]


def test_energy_is_compute_radio_and_idle_absent_devices_are_off() -> None:
    dev = DeviceArrays(*(np.full(3, v) for v in (1e9, 2e-9, 3.0, 2.0, 1.0)))
    active = np.array([True, True, False])
    joules = round_energy(dev, active, np.array([1e9, 0.0, 1e9]), np.array([1.0, 0.0, 1.0]),
                          np.array([0.5, 0.0, 0.0]), np.array([0.25, 0.0, 0.0]), round_s=4.0)  # fmt: skip
    # device 0: 2 J compute + 1.5 J tx + 0.5 J rx + 1 W x (4 - 1.75) s idle; device 1 idles 4 s
    assert joules.tolist() == pytest.approx([2 + 1.5 + 0.5 + 2.25, 4.0, 0.0])


# ---------------------------------------------------------------------------------------------
# profiles and FLOPs


def test_presets_and_profile_files(tmp_path: Path) -> None:
    assert set(PRESETS) == {"mcu", "rpi4", "phone"}
    assert PRESETS["mcu"].flops < PRESETS["rpi4"].flops < PRESETS["phone"].flops
    toml = tmp_path / "board.toml"
    toml.write_text("flops = 2e9\njoules_per_flop = 1e-9\ntx_power_w = 1.0\nrx_power_w = 0.8\nidle_power_w = 0.2\n")
    (one,) = load_profiles(str(toml))
    assert one.flops == 2e9 and one.idle_power_w == 0.2
    per_device = tmp_path / "fleet.csv"
    per_device.write_text("device,flops,joules_per_flop,tx_power_w,rx_power_w,idle_power_w\n"
                          "0,1e9,1e-9,1,1,0.1\n1,4e9,1e-9,1,1,0.1\n")  # fmt: skip
    arrays = device_arrays(load_profiles(str(per_device)), 2, 0.0, seed=0)
    assert arrays.flops.tolist() == [1e9, 4e9]
    with pytest.raises(P2PLError, match="lists 2 devices but the run has 3"):
        device_arrays(load_profiles(str(per_device)), 3, 0.0, seed=0)


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("flops = 1e9\n", ".toml", "missing key 'joules_per_flop'"),
        ("flops = -1\njoules_per_flop = 1\ntx_power_w = 1\nrx_power_w = 1\nidle_power_w = 1\n", ".toml", "flops"),
        ("flops,joules_per_flop,tx_power_w,rx_power_w\n1,1,1,1\n", ".csv", "missing column 'idle_power_w'"),
        ("flops,joules_per_flop,tx_power_w,rx_power_w,idle_power_w\n1,x,1,1,1\n", ".csv", ":2: every value"),
    ],
)
def test_bad_profile_files_are_one_line_errors(tmp_path: Path, text: str, suffix: str, message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(P2PLError, match=message) as err:
        load_profiles(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(P2PLError, match="choose a preset"):
        load_profiles("raspberry")


def test_heterogeneity_is_keyed_by_seed_and_device() -> None:
    rpi = [PRESETS["rpi4"]]
    small, large = device_arrays(rpi, 10, 0.5, seed=3), device_arrays(rpi, 1000, 0.5, seed=3)
    assert np.array_equal(small.flops, large.flops[:10])  # a device's draw does not depend on N
    assert not np.array_equal(small.flops, device_arrays(rpi, 10, 0.5, seed=4).flops)
    spread = np.log(large.flops / PRESETS["rpi4"].flops)
    assert abs(spread.mean()) < 0.06 and 0.45 < spread.std() < 0.55  # log-normal around the preset
    assert np.all(device_arrays(rpi, 10, 0.0, seed=3).flops == PRESETS["rpi4"].flops)


def test_training_flops_counted_from_the_model() -> None:
    model = mlp((64,), 10, [32])
    forward = 2 * (64 * 32 + 32 * 10)
    # backward: weight gradients of both layers (= forward) + the input gradient of the second layer
    assert train_flops_per_sample(model, (64,), 10) == forward + forward + 2 * 32 * 10
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert train_flops_per_sample(conv, (1, 8, 8), 10) > 2 * (4 * 9 * 64)  # convolutions counted


# ---------------------------------------------------------------------------------------------
# in a run


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_system_model_costs_a_run_and_changes_nothing_trained(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    off = run_experiment(tiny_config("rounds=3"), tmp_path / "off")
    on = run_experiment(tiny_config("rounds=3", ON, "links.straggler_prob=0.5"), tmp_path / "on")
    plain = run_experiment(tiny_config("rounds=3", "links.straggler_prob=0.5"))
    assert np.array_equal(on.params.numpy(), plain.params.numpy())  # it only measures
    assert "sim_time_s" not in _rows(tmp_path / "off" / "rounds.csv")[0]  # free when off
    assert "simulated_time_s" not in off.summary
    rows = _rows(tmp_path / "on" / "rounds.csv")
    rounds = [float(r["sim_round_s"]) for r in rows[1:]]
    assert all(x > 0 for x in rounds)
    assert float(rows[-1]["sim_time_s"]) == pytest.approx(sum(rounds), rel=1e-5)
    for r in rows[1:]:  # the round waits for the slowest device; the mean device finishes sooner
        assert float(r["sim_device_s_mean"]) <= float(r["sim_round_s"]) * (1 + 1e-5)
        assert float(r["energy_j_max"]) >= float(r["energy_j_mean"]) > 0
    s = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert s["simulated_time_s"] == pytest.approx(sum(rounds), rel=1e-5)
    assert s["energy_j_per_device"]["mean"] == pytest.approx(float(rows[-1]["energy_j_cum_mean"]), rel=1e-5)
    assert set(s["time_to_mean_accuracy_s"]) == set(s["rounds_to_mean_accuracy"]) == set(s["energy_to_mean_accuracy_j"])
    for target, r in s["rounds_to_mean_accuracy"].items():
        if r is not None:
            assert s["time_to_mean_accuracy_s"][target] == pytest.approx(float(rows[r]["sim_time_s"]), rel=1e-5)


def test_resumed_run_keeps_its_costs(tiny_config: Callable[..., ExperimentConfig], tmp_path: Path) -> None:
    cfg = tiny_config("rounds=3", ON, "links.dropout=0.3")
    full = run_experiment(cfg, tmp_path / "full")
    run_experiment(cfg, tmp_path / "part", stop_after=2)
    resumed = run_experiment(cfg, tmp_path / "part")
    assert resumed.history.system_round_s == pytest.approx(full.history.system_round_s)
    assert np.allclose(np.stack(resumed.history.system_energy_j), np.stack(full.history.system_energy_j))


def _net(active: np.ndarray, edges: np.ndarray, work: np.ndarray | None = None) -> RoundNetwork:
    work = np.where(active, 1.0, 0.0) if work is None else work
    return RoundNetwork(1, edges, active, work, True, None, edges)


def test_absent_devices_neither_train_nor_send_and_cost_nothing(
    tiny_config: Callable[..., ExperimentConfig],
) -> None:
    from p2pl.experiment import build_experiment

    exp = build_experiment(tiny_config(ON))
    model = SystemModel.for_experiment(exp)
    active = np.ones(10, bool)
    active[3] = False
    edges = exp.topology.edges[~(exp.topology.edges == 3).any(1)]  # links of absent devices are down
    sent = np.bincount(edges.ravel(), minlength=10) * exp.spec.nbytes
    cost = model.cost(_net(active, edges), sent)
    assert cost.energy_j[3] == 0.0 and cost.finish_s[3] == 0.0
    assert np.all(cost.energy_j[active] > 0)
    full = model.cost(_net(np.ones(10, bool), exp.topology.edges), np.ones(10) * 0)
    assert full.round_s > 0  # training alone takes time


def test_fedavg_round_slows_with_the_edge_link(tiny_config: Callable[..., ExperimentConfig]) -> None:
    from p2pl.experiment import build_experiment

    exp = build_experiment(tiny_config(ON, "algorithm='fedavg'"))
    model = SystemModel.for_experiment(exp)
    active = np.ones(10, bool)
    sent = np.full(10, float(exp.spec.nbytes))
    times = []
    for rate in (0.1, 1.0, 10.0, 100.0):
        model.cfg = replace(exp.cfg.system, edge_uplink_mbps=rate)
        times.append(model.cost(_net(active, np.zeros((0, 2), np.int64)), sent).round_s)
    assert times == sorted(times, reverse=True)
    # at 0.1 Mbit/s the shared uplink carries 10 models: 10 x bytes x 8 / 1e5 s at least
    assert times[0] >= 10 * exp.spec.nbytes * 8 / 1e5


def test_crossing_rate_interpolates_on_the_log_grid() -> None:
    rates = np.array([1.0, 10.0, 100.0])
    assert crossing_rate(rates, np.array([100.0, 10.0, 1.0]), 10.0) is not None
    assert crossing_rate(rates, np.array([100.0, 20.0, 5.0]), 10.0) == pytest.approx(10**1.5)
    assert crossing_rate(rates, np.array([100.0, 50.0, 20.0]), 10.0) is None  # never wins
    assert crossing_rate(rates, np.array([5.0, 2.0, 1.0]), 10.0) == 1.0  # wins everywhere


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("system.link_model='radio'", "unknown system.link_model"),
        ("system.edge_uplink_mbps=0", "system.edge_uplink_mbps must be a positive"),
        ("system.link_model='shannon'", "needs device positions in metres"),
        ("system.device_profile='nope.csv'", "not found"),
    ],
)
def test_bad_system_config_is_one_line_exit_2(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    args = ["run", "--out", str(tmp_path), "--quiet", "--set", ON, "--set", override]
    for o in tiny_overrides:
        args += ["--set", o]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compare_draws_accuracy_against_seconds_and_joules(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.csv"  # one row per device: centralized takes device 0's
    fleet.write_text("flops,joules_per_flop,tx_power_w,rx_power_w,idle_power_w\n" + "1e9,1e-9,1,1,0.1\n" * 10)
    args = [
        "compare",
        "--out",
        str(tmp_path / "cmp"),
        "--quiet",
        "--set",
        ON,
        "--set",
        f"system.device_profile='{fleet}'",
    ]
    for o in tiny_overrides:
        args += ["--set", o]
    assert cli(args) == 0
    png = (tmp_path / "cmp" / "cost.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "cost.png" in capsys.readouterr().out  # results on stdout
    assert cli(["run", "--out", str(tmp_path / "run"), "--quiet", *args[4:]]) == 0
    assert "J per device" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_same_seconds_and_joules_on_the_ray_backend(tiny_config: Callable[..., ExperimentConfig]) -> None:
    ray = pytest.importorskip("ray")
    cfg = tiny_config(ON, "links.straggler_prob=0.5", "links.dropout=0.2")
    local = run_experiment(cfg)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        sharded = run_experiment(cfg, backend="ray", shards=2)
    finally:
        ray.shutdown()
    assert sharded.history.system_round_s == local.history.system_round_s
    assert np.array_equal(np.stack(sharded.history.system_energy_j), np.stack(local.history.system_energy_j))


def test_shannon_needs_a_geometric_graph_in_metres(tiny_config: Callable[..., ExperimentConfig]) -> None:
    from p2pl.experiment import build_experiment

    ring = tiny_config(ON, "system.link_model='shannon'", "topology.name='ring'", "topology.area_m=100.0")
    with pytest.raises(P2PLError, match="needs device positions in metres"):
        SystemModel.for_experiment(build_experiment(ring))
    metres = tiny_config(ON, "system.link_model='shannon'", "topology.area_m=100.0", "topology.range_m=60.0")
    model = SystemModel.for_experiment(build_experiment(metres))
    assert model.network == "peers"
