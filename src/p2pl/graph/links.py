"""Per-round network dynamics: intermittent links, device dropout, stragglers, mobility.

:class:`NetworkDynamics` turns a :class:`~p2pl.graph.topology.Topology` and a
:class:`~p2pl.config.LinksConfig` into one :class:`RoundNetwork` per round (rounds are numbered
from 1): which devices are present, how much of its local work each one finishes, which links
are up, whether this round cooperates at all (sparse communication), and - with mobility - the
current positions and the rebuilt random geometric graph.

Link models (applied on top of the current graph, after mobility rebuilt it):

``static``
    every link of the graph is up in every round.
``bernoulli``
    each link is up independently with probability ``p_up`` in each round.
``gilbert-elliott``
    each link carries a two-state (good / bad) Markov chain, started from its stationary
    distribution ``pi_bad = g2b / (g2b + b2g)``; per round the state moves good->bad with
    ``ge_good_to_bad`` and bad->good with ``ge_bad_to_good``, then the link is up with
    ``ge_up_good`` or ``ge_up_bad`` according to the state. Outages are therefore bursty: with
    ``ge_up_good = 1`` and ``ge_up_bad = 0`` a down period lasts ``1 / b2g`` rounds on average.

    The chain belongs to the unordered device pair, not to an edge index: when mobility rebuilds
    the graph, a pair that goes out of range and comes back later continues *its* chain, as if
    it had kept running while out of range. That costs nothing per absent pair: the state of a
    pair last seen ``t`` rounds ago is drawn from the exact ``t``-step law
    ``P(bad) = pi_bad + (s - pi_bad) * (1 - g2b - b2g) ** t`` (``s`` = 1 if it was bad). Pairs
    unseen for longer than the chain's mixing horizon (``|1 - g2b - b2g| ** t < 1e-6``) are
    treated as stationary - exactly, not approximately, so forgetting them changes nothing - and
    are dropped from memory.

Devices: each device is absent in a round with probability ``dropout`` (independently per device
and round); an absent device neither trains (``work = 0``) nor communicates (no live edge
touches it). A present device straggles with probability ``straggler_prob`` and then completes
only ``straggler_work`` of its local steps.

Mobility (random waypoint): round 1 uses the topology as built. Before each later round every
device moves ``mobility_speed`` (area units) straight toward its waypoint; on reaching it, it
stops there, picks a new waypoint uniformly in the square ``[0, area]^2`` and pauses for
``mobility_pause`` rounds. Then the random geometric graph is rebuilt: an edge joins every pair
at distance ``<= radius`` (the rule of :func:`p2pl.graph.topology.geometric_graph`, as a k-d
tree query without a ``networkx`` graph per round). A graph that was connected may disconnect
while devices move; that is part of the realism. As is well known for random waypoint, devices
drift toward the centre of the area over time, so the graph gets denser than the uniform
placement it started from.

Randomness and resuming: every draw comes from a generator keyed by ``(seed, stream, round)``,
where the streams are links, dropout, stragglers and mobility (children of
``SeedSequence(seed)`` under a domain key private to this module). So enabling one mechanism
never changes another one's draws, the draws of round ``k`` do not depend on how many numbers
earlier rounds consumed, and the links are drawn in every round whether or not it cooperates
(changing ``every`` changes nothing else). Only the Gilbert-Elliott chains and the mobility
state carry over between rounds; :meth:`NetworkDynamics.state_dict` /
:meth:`NetworkDynamics.load_state_dict` save and restore them, and
:meth:`NetworkDynamics.advance_to` replays just those parts, cheaply, for a resume without a
saved state.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial import cKDTree

from p2pl.config import LinksConfig
from p2pl.errors import P2PLError, choose

if TYPE_CHECKING:
    from p2pl.graph.topology import Topology

LINK_MODELS = ("static", "bernoulli", "gilbert-elliott")
MOBILE_TOPOLOGY = "random-geometric"

_DOMAIN = zlib.crc32(b"p2pl.graph.links")  # keeps these streams apart from other users of the seed
_LINKS, _DROPOUT, _STRAGGLERS, _MOBILITY = 0, 1, 2, 3
_GE_TOLERANCE = 1e-6  # a chain unseen until |lambda|**t < this counts as stationary
_GE_PRUNE_EVERY = 8  # rounds between forgetting chains past the horizon (affects memory only)
_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# validation and expected rates


def validate_links(cfg: LinksConfig, topology_name: str) -> None:
    """Raise a one-line :class:`P2PLError` if ``cfg`` is not a usable link / failure model."""
    choose("links.model", cfg.model, LINK_MODELS)
    probabilities = {
        "links.p_up": cfg.p_up,
        "links.ge_good_to_bad": cfg.ge_good_to_bad,
        "links.ge_bad_to_good": cfg.ge_bad_to_good,
        "links.ge_up_good": cfg.ge_up_good,
        "links.ge_up_bad": cfg.ge_up_bad,
        "links.dropout": cfg.dropout,
        "links.straggler_prob": cfg.straggler_prob,
    }
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise P2PLError(f"{key} is a probability and must be in [0, 1], got {value}")
    if cfg.model != "bernoulli" and cfg.p_up != 1.0:
        raise P2PLError(
            f"links.p_up = {cfg.p_up} only applies to links.model = 'bernoulli' but the model is "
            f"{cfg.model!r}; set links.model = 'bernoulli' or drop links.p_up"
        )
    if cfg.model == "bernoulli" and cfg.p_up == 0.0:
        raise P2PLError(
            "links.p_up = 0 means no link is ever up, so devices never communicate (that is the "
            "'local' algorithm); set links.p_up > 0, or use algorithm = 'local'"
        )
    if cfg.model == "gilbert-elliott":
        if cfg.ge_good_to_bad + cfg.ge_bad_to_good == 0.0:
            raise P2PLError(
                "links.ge_good_to_bad and links.ge_bad_to_good are both 0, so a link's state never "
                "changes and its starting state is undefined; set at least one of them > 0"
            )
        if expected_link_up_rate(cfg) == 0.0:
            raise P2PLError(
                "this gilbert-elliott model never lets a link be up (stationary up-rate 0), so "
                "devices never communicate; raise links.ge_up_good (or links.ge_up_bad)"
            )
    if cfg.dropout == 1.0:
        raise P2PLError(
            "links.dropout = 1 means every device is absent in every round, so nothing trains; set links.dropout < 1"
        )
    if not 0.0 < cfg.straggler_work <= 1.0:
        raise P2PLError(
            f"links.straggler_work is the share of its local steps a straggler finishes and must be "
            f"in (0, 1], got {cfg.straggler_work}; use links.dropout for devices that do nothing"
        )
    if not cfg.mobility_speed >= 0.0 or math.isinf(cfg.mobility_speed):
        raise P2PLError(f"links.mobility_speed must be a finite number >= 0, got {cfg.mobility_speed}")
    if cfg.mobility_pause < 0:
        raise P2PLError(f"links.mobility_pause must be >= 0 rounds, got {cfg.mobility_pause}")
    if cfg.mobility_speed > 0 and topology_name != MOBILE_TOPOLOGY:
        raise P2PLError(
            f"links.mobility_speed > 0 needs device positions, i.e. topology.name = "
            f"{MOBILE_TOPOLOGY!r}, but the topology is {topology_name!r}; set links.mobility_speed = 0 "
            f"or use topology.name = {MOBILE_TOPOLOGY!r}"
        )


def _ge_pi_bad(cfg: LinksConfig) -> float:
    total = cfg.ge_good_to_bad + cfg.ge_bad_to_good
    return cfg.ge_good_to_bad / total if total > 0 else 0.0


def expected_link_up_rate(cfg: LinksConfig) -> float:
    """Long-run probability that a link is up in a round (before device dropout).

    ``1`` for ``static``, ``p_up`` for ``bernoulli``, and for ``gilbert-elliott`` the stationary
    ``pi_good * ge_up_good + pi_bad * ge_up_bad`` with ``pi_bad = g2b / (g2b + b2g)``.
    """
    if cfg.model == "bernoulli":
        return float(cfg.p_up)
    if cfg.model == "gilbert-elliott":
        pi_bad = _ge_pi_bad(cfg)
        return float((1.0 - pi_bad) * cfg.ge_up_good + pi_bad * cfg.ge_up_bad)
    return 1.0


def expected_live_edge_rate(cfg: LinksConfig) -> float:
    """Long-run probability that an edge is live: link up and both ends present."""
    return expected_link_up_rate(cfg) * (1.0 - cfg.dropout) ** 2


# ---------------------------------------------------------------------------------------------
# one round


# eq=False: the fields are arrays, so value equality is not meaningful (compare fields instead).
@dataclass(frozen=True, eq=False)
class RoundNetwork:
    """The network as it is in one round. All arrays are read-only.

    ``live_edges``: int64 ``[E_live, 2]``, rows ``u < v`` in lexicographic order, the edges of
    ``base_edges`` that are up and join two present devices. ``active``: bool ``[N]``, the device
    is present (trains and communicates). ``work``: float64 ``[N]``, the share of its local
    steps the device completes (1, ``straggler_work``, or 0 when absent). ``cooperate``: False in
    rounds that skip consensus (sparse communication: ``round % every != 0``). ``positions``:
    ``[N, 2]`` current positions or None. ``base_edges``: all edges of the current (possibly
    rebuilt) graph, live or not.
    """

    round: int
    live_edges: np.ndarray
    active: np.ndarray
    work: np.ndarray
    cooperate: bool
    positions: np.ndarray | None
    base_edges: np.ndarray

    @property
    def num_devices(self) -> int:
        return int(self.active.shape[0])


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _sort_keys(keys: np.ndarray, bound: int) -> np.ndarray:
    """Sort non-negative int64 ``keys < bound`` (LSD radix on 16-bit digits: O(n), no comparisons)."""
    order = np.arange(keys.shape[0])
    shift = 0
    while (1 << shift) < bound:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]  # numpy radix-sorts 16-bit integers
        shift += 16
    return keys[order]


def _pairs_within(positions: np.ndarray, radius: float) -> np.ndarray:
    """All pairs ``u < v`` at Euclidean distance ``<= radius``, int64 ``[E, 2]``, sorted rows.

    Same rule as :func:`p2pl.graph.topology.geometric_graph`, without building a networkx graph.
    """
    n = positions.shape[0]
    tree = cKDTree(positions, balanced_tree=False, compact_nodes=False)  # faster to build each round
    pairs = np.asarray(tree.query_pairs(radius, output_type="ndarray"), dtype=np.int64).reshape(-1, 2)
    lo = np.minimum(pairs[:, 0], pairs[:, 1])
    hi = np.maximum(pairs[:, 0], pairs[:, 1])
    keys = _sort_keys(lo * n + hi, n * n)
    return np.stack([keys // n, keys % n], axis=1)


# ---------------------------------------------------------------------------------------------
# the dynamics


class NetworkDynamics:
    """Produces the :class:`RoundNetwork` of rounds 1, 2, 3, ... of one run, deterministically.

    ``radius`` is the radio range used to rebuild the random geometric graph (required when
    ``links.mobility_speed > 0``); ``area`` is the side of the square devices move in (default
    ``max(1, positions.max())``; pass ``topology.area_m`` for a topology in metres).
    """

    def __init__(
        self,
        topology: Topology,
        links: LinksConfig,
        every: int,
        seed: int,
        radius: float | None = None,
        area: float | None = None,
    ) -> None:
        validate_links(links, topology.name)
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise P2PLError(f"consensus.every must be a positive integer, got {every}")
        self.cfg = links
        self.every = int(every)
        self.seed = int(seed)
        self.num_devices = int(topology.graph.number_of_nodes())
        n = self.num_devices
        self._base_edges0 = _frozen(np.array(topology.edges, dtype=np.int64).reshape(-1, 2))
        if self._base_edges0.size and (
            self._base_edges0.min() < 0
            or self._base_edges0.max() >= n
            or np.any(self._base_edges0[:, 0] >= self._base_edges0[:, 1])
        ):
            raise ValueError("topology.edges must be rows u < v over nodes 0..N-1")
        pos0 = None if topology.positions is None else np.array(topology.positions, dtype=np.float64)
        self._positions0 = None if pos0 is None else _frozen(pos0)

        self.mobile = links.mobility_speed > 0
        self.radius = None if radius is None else float(radius)
        self.area = 1.0
        if self.mobile:
            if pos0 is None or pos0.shape != (n, 2):
                raise P2PLError(
                    f"links.mobility_speed > 0 needs device positions [N, 2]; use topology.name = {MOBILE_TOPOLOGY!r}"
                )
            if self.radius is None or not self.radius > 0:
                raise ValueError("NetworkDynamics needs radius > 0 (the radio range) for mobility")
            self.area = float(area) if area is not None else max(1.0, float(pos0.max()))
            if not self.area > 0 or pos0.min() < 0 or pos0.max() > self.area * (1 + 1e-12):
                raise ValueError(f"device positions must lie in [0, area]^2 with area = {self.area}")

        # what the link model needs to draw each round (decided from the config alone)
        model = links.model
        if model == "bernoulli" and links.p_up == 1.0:
            model = "static"
        if model == "gilbert-elliott" and links.ge_up_good == 1.0 and links.ge_up_bad == 1.0:
            model = "static"
        self._model = model
        self._pi_bad = _ge_pi_bad(links)
        lam = 1.0 - links.ge_good_to_bad - links.ge_bad_to_good
        if abs(lam) >= 1.0:
            self._ge_horizon = math.inf
        elif lam == 0.0:
            self._ge_horizon = 1.0
        else:
            self._ge_horizon = float(math.ceil(math.log(_GE_TOLERANCE) / math.log(abs(lam))))
        self._ge_lambda = lam

        self._round = 0
        self._reset_state()

    # -- public ---------------------------------------------------------------------------------

    @property
    def static(self) -> bool:
        """True when live edges, presence, work and positions are the same in every round.

        (``cooperate`` may still alternate with ``every``.) The engine may then cache weights.
        """
        return (
            self._model == "static"
            and self.cfg.dropout == 0.0
            and (self.cfg.straggler_prob == 0.0 or self.cfg.straggler_work == 1.0)
            and not self.mobile
        )

    @property
    def round(self) -> int:
        """The last round produced (0 before the first :meth:`next_round`)."""
        return self._round

    def next_round(self) -> RoundNetwork:
        """Advance one round and return its network."""
        k = self._round + 1
        base = self._advance_state(k)
        n = self.num_devices
        cfg = self.cfg

        if cfg.dropout > 0:
            active = self._rng(_DROPOUT, k).random(n) >= cfg.dropout
        else:
            active = np.ones(n, dtype=bool)
        work = active.astype(np.float64)
        if cfg.straggler_prob > 0:
            straggle = (self._rng(_STRAGGLERS, k).random(n) < cfg.straggler_prob) & active
            work[straggle] = cfg.straggler_work

        up = self._link_up(k, base)
        if up is None:
            live_mask = active[base[:, 0]] & active[base[:, 1]] if cfg.dropout > 0 else None
        else:
            live_mask = up & active[base[:, 0]] & active[base[:, 1]] if cfg.dropout > 0 else up
        live = base if live_mask is None else _frozen(base[live_mask])

        positions = self._positions0
        if self.mobile:
            positions = _frozen(self._pos.copy())
        return RoundNetwork(
            round=k,
            live_edges=live,
            active=_frozen(active),
            work=_frozen(work),
            cooperate=k % self.every == 0,
            positions=positions,
            base_edges=base,
        )

    def advance_to(self, k: int) -> None:
        """Replay so that the next :meth:`next_round` returns round ``k`` (forward only).

        Only the state that carries over (Gilbert-Elliott chains, mobility) is replayed; the
        per-round independent draws are skipped.
        """
        if k < self._round + 1:
            raise ValueError(f"cannot go back from round {self._round + 1} to round {k}")
        for j in range(self._round + 1, k):
            base = self._advance_state(j)
            if self._model == "gilbert-elliott":
                self._link_up(j, base)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the sequence exactly (numpy arrays and plain scalars)."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "num_devices": self.num_devices,
            "round": self._round,
        }
        if self.mobile:
            state["positions"] = self._pos.copy()
            state["waypoints"] = self._waypoints.copy()
            state["pause_left"] = self._pause_left.copy()
        if self._model == "gilbert-elliott":
            state["ge_keys"] = self._ge_keys.copy()
            state["ge_state"] = self._ge_state.copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a run with the same topology, config and seed."""
        if state.get("version") != _STATE_VERSION:
            raise P2PLError(f"unsupported network state version {state.get('version')!r}")
        if int(state["num_devices"]) != self.num_devices or int(state["seed"]) != self.seed:
            raise P2PLError(
                "the saved network state belongs to a run with another seed or number of devices; "
                "resume with the original configuration"
            )
        self._reset_state()
        self._round = int(state["round"])
        n = self.num_devices
        try:
            if self.mobile and self._round > 0:
                self._pos = np.array(state["positions"], dtype=np.float64).reshape(n, 2)
                self._waypoints = np.array(state["waypoints"], dtype=np.float64).reshape(n, 2)
                self._pause_left = np.array(state["pause_left"], dtype=np.int64).reshape(n)
                if self._round > 1:  # round 1 is the topology as built; later graphs are rebuilt
                    self._base = _frozen(_pairs_within(self._pos, self.radius or 0.0))
            if self._model == "gilbert-elliott" and self._round > 0:
                self._ge_keys = np.array(state["ge_keys"], dtype=np.int64).reshape(-1)
                self._ge_state = np.array(state["ge_state"], dtype=np.int64).reshape(-1)
        except (KeyError, ValueError) as err:
            raise P2PLError(f"the saved network state is incomplete or malformed: {err}") from None
        if self._model == "gilbert-elliott" and not (self._ge_keys.shape == self._ge_state.shape):
            raise P2PLError("the saved network state is malformed: Gilbert-Elliott arrays differ in length")

    # -- internals ------------------------------------------------------------------------------

    def _rng(self, stream: int, k: int) -> np.random.Generator:
        seq = np.random.SeedSequence(
            entropy=self.seed & 0xFFFFFFFFFFFFFFFF, spawn_key=(_DOMAIN, stream, k & 0xFFFFFFFF)
        )
        return np.random.default_rng(seq)

    def _reset_state(self) -> None:
        self._round = 0
        self._base = self._base_edges0
        if self.mobile:
            assert self._positions0 is not None
            self._pos = self._positions0.copy()
            self._waypoints = self._rng(_MOBILITY, 0).uniform(0.0, self.area, size=(self.num_devices, 2))
            self._pause_left = np.zeros(self.num_devices, dtype=np.int64)
        self._ge_keys = np.zeros(0, dtype=np.int64)  # sorted pair keys u * N + v
        # per pair: 2 * (round it was last seen) + (1 if its chain was bad then)
        self._ge_state = np.zeros(0, dtype=np.int64)

    def _advance_state(self, k: int) -> np.ndarray:
        """Move to round ``k`` (mobility + graph rebuild) and return its base edges."""
        if self.mobile and k > 1:
            self._move(k)
            self._base = _frozen(_pairs_within(self._pos, self.radius or 0.0))
        self._round = k
        return self._base

    def _move(self, k: int) -> None:
        """Random waypoint step toward each device's waypoint (pausing devices stay put)."""
        speed = self.cfg.mobility_speed
        paused = self._pause_left > 0
        self._pause_left[paused] -= 1
        moving = ~paused
        delta = self._waypoints - self._pos
        dist = np.hypot(delta[:, 0], delta[:, 1])
        arrive = moving & (dist <= speed)
        step = moving & ~arrive
        scale = speed / dist[step]
        self._pos[step] += delta[step] * scale[:, None]
        self._pos[arrive] = self._waypoints[arrive]
        np.clip(self._pos, 0.0, self.area, out=self._pos)
        count = int(arrive.sum())
        if count:
            self._waypoints[arrive] = self._rng(_MOBILITY, k).uniform(0.0, self.area, size=(count, 2))
            self._pause_left[arrive] = self.cfg.mobility_pause

    def _link_up(self, k: int, base: np.ndarray) -> np.ndarray | None:
        """Which base edges are up in round ``k`` (None: all of them)."""
        if self._model == "static":
            return None
        rng = self._rng(_LINKS, k)
        e = int(base.shape[0])
        if self._model == "bernoulli":
            up: np.ndarray = rng.random(e) < self.cfg.p_up
            return up
        bad = self._ge_step(k, base, rng.random(e))
        cfg = self.cfg
        if cfg.ge_up_good == 1.0 and cfg.ge_up_bad == 0.0:
            return ~bad
        up = rng.random(e) < np.where(bad, cfg.ge_up_bad, cfg.ge_up_good)
        return up

    def _ge_step(self, k: int, base: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Advance the Gilbert-Elliott chains of the pairs in ``base`` to round ``k``."""
        cfg = self.cfg
        n = self.num_devices
        keys = base[:, 0] * n + base[:, 1]
        store = self._ge_keys
        same_graph = store.shape == keys.shape and np.array_equal(store, keys)
        if same_graph:  # the usual case without mobility: every chain steps once
            idx = np.arange(keys.shape[0])
            found = np.ones(keys.shape[0], dtype=bool)
            prev = self._ge_state
        else:
            idx = np.searchsorted(store, keys)  # for a pair not stored yet: where to insert it
            clipped = np.minimum(idx, max(store.shape[0] - 1, 0))
            if store.size:
                found = (idx < store.shape[0]) & (store[clipped] == keys)
                prev = np.where(found, self._ge_state[clipped], 0)
            else:
                found = np.zeros(keys.shape[0], dtype=bool)
                prev = np.zeros(keys.shape[0], dtype=np.int64)
        prev_bad = (prev & 1).astype(bool)
        gap = k - (prev >> 1)
        # P(bad now | state when last seen, gap rounds ago); exact one-step values for gap == 1
        p_bad = np.full(keys.shape[0], self._pi_bad)
        one = found & (gap == 1)
        p_bad[one] = np.where(prev_bad[one], 1.0 - cfg.ge_bad_to_good, cfg.ge_good_to_bad)
        far = found & (gap > 1) & (gap <= self._ge_horizon)
        if far.any():
            decay = self._ge_lambda ** gap[far].astype(np.float64)
            p_bad[far] = self._pi_bad + (prev_bad[far].astype(np.float64) - self._pi_bad) * decay
        bad = u < p_bad
        state = 2 * k + bad.astype(np.int64)

        if same_graph:
            self._ge_state = state
            return bad
        self._ge_state[idx[found]] = state[found]
        fresh = ~found
        if fresh.any():
            self._ge_keys = np.insert(store, idx[fresh], keys[fresh])
            self._ge_state = np.insert(self._ge_state, idx[fresh], state[fresh])
        if k % _GE_PRUNE_EVERY == 0:  # forget pairs past the horizon: they count as stationary anyway
            keep = (k - (self._ge_state >> 1)) <= self._ge_horizon
            if not keep.all():
                self._ge_keys, self._ge_state = self._ge_keys[keep], self._ge_state[keep]
        return bad
