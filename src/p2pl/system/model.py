"""The system model of one experiment: per round, its seconds and every device's joules.

:class:`SystemModel` is built once per run (the model's FLOPs per sample, the device profiles,
the radio settings) and :meth:`SystemModel.cost` turns one round of the simulator -- who was
present, how much of its work each device did, which links were up, where devices were, and the
bytes the algorithm really sent -- into a :class:`RoundCost`. It never changes what is trained.

Which network a run uses follows from its algorithm: one that uses the device graph exchanges
over device-to-device links; one that does not but sends bytes (FedAvg) uploads to the edge
server; one that sends nothing (local, centralized) only computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from p2pl.config import ExperimentConfig, SystemConfig
from p2pl.errors import P2PLError
from p2pl.metrics import History
from p2pl.system.energy import round_energy
from p2pl.system.profiles import DeviceArrays, device_arrays, load_profiles
from p2pl.system.radio import NEEDS_METRES, edge_rates_bps
from p2pl.system.timing import peer_airtime, peer_finish, server_round

if TYPE_CHECKING:
    from p2pl.experiment import Experiment
    from p2pl.graph.links import RoundNetwork

PEERS, SERVER = "peers", "server"


@dataclass(frozen=True)
class RoundCost:
    round_s: float  # the synchronous round: the last device's finish
    finish_s: np.ndarray  # [N] each device's own finish (straggler-aware; 0 if absent)
    finish_s_mean: float  # over present devices
    energy_j: np.ndarray  # [N] joules each device spent in the round


@dataclass
class SystemModel:
    cfg: SystemConfig
    devices: DeviceArrays
    flops_per_sample: float  # one training step, forward + backward
    samples: np.ndarray  # [N] local dataset sizes
    local_epochs: int
    network: str  # peers | server
    model_bytes: int  # what the server broadcasts
    num_params: int

    @classmethod
    def for_experiment(cls, exp: Experiment) -> SystemModel:
        from p2pl.system.flops import train_flops_per_sample

        cfg: ExperimentConfig = exp.cfg
        system = cfg.system
        metres = exp.topology.positions is not None and cfg.topology.area_m > 0
        if system.link_model == "shannon" and exp.algorithm.uses_graph and not metres:
            raise P2PLError(NEEDS_METRES)
        n = exp.num_devices
        profiles = load_profiles(system.device_profile)
        if n == 1 < len(profiles):  # centralized: one device holding all the data, the first one
            profiles = profiles[:1]
        devices = device_arrays(profiles, n, system.heterogeneity, cfg.seed)
        flops = train_flops_per_sample(exp.model, exp.dataset.input_shape, exp.dataset.num_classes)
        return cls(
            system, devices, flops, exp.setting.data_sizes.astype(np.float64), cfg.training.local_epochs,
            PEERS if exp.algorithm.uses_graph else SERVER, int(exp.spec.nbytes), int(exp.spec.total),
        )  # fmt: skip

    def training(self, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs, seconds) each device trains this round; ``work`` = share of its steps (0: absent)."""
        flops = work * self.samples * self.local_epochs * self.flops_per_sample
        return flops, flops / self.devices.flops

    def cost(self, net: RoundNetwork, bytes_sent: np.ndarray) -> RoundCost:
        """One round's seconds and joules; ``bytes_sent`` [N] as the algorithm counted them."""
        active = net.active
        train_flops, train_s = self.training(np.where(active, net.work, 0.0))
        sent = np.asarray(bytes_sent, dtype=np.float64)
        if self.network == PEERS and net.cooperate and len(net.live_edges):
            edges = net.live_edges
            rates = edge_rates_bps(edges, net.positions, self.cfg)
            air = peer_airtime(edges, sent, rates, self.cfg.link_latency_ms / 1e3, self.cfg.shared_medium)
            finish = peer_finish(train_s, edges, air.exchange_s)
            tx, rx = air.tx_s, air.rx_s
        elif self.network == SERVER and sent[active].sum() > 0:
            c = self.cfg
            present = int(active.sum())
            server_s = 2.0 * present * self.num_params / (c.server_gflops * 1e9)  # one multiply-add each
            srv = server_round(
                train_s, active, sent, float(self.model_bytes), c.edge_uplink_mbps * 1e6,
                c.edge_downlink_mbps * 1e6, c.edge_latency_ms / 1e3, server_s,
            )  # fmt: skip
            finish = np.full(len(active), srv.duration_s)
            tx, rx = srv.tx_s, srv.rx_s
        else:
            finish, tx, rx = train_s, np.zeros_like(train_s), np.zeros_like(train_s)
        finish = np.where(active, finish, 0.0)
        round_s = float(finish.max()) if active.any() else 0.0
        energy = round_energy(self.devices, active, train_flops, train_s, tx, rx, round_s)
        finish_mean = float(finish[active].mean()) if active.any() else 0.0
        return RoundCost(round_s, finish, finish_mean, energy)


def record_round_cost(history: History, cost: RoundCost) -> None:
    history.system_round_s.append(cost.round_s)
    history.system_finish_s_mean.append(cost.finish_s_mean)
    history.system_energy_j.append(cost.energy_j)
