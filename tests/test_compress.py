"""Compressed cooperation (p2pl.core.compress): exact message sizes, unbiased stochastic rounding,
error feedback, keyed draws a single row reproduces, the sent-mask fill of every aggregation rule,
config errors, checkpoint/resume, and the same numbers on the simulator, Ray and real nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.cli import main as cli
from p2pl.config import load_config
from p2pl.core.compress import ArraySpec, Compression, Compressor, check_indices, compressed_gossip, message_layout
from p2pl.core.cooperate import AGGREGATION_RULES, Gossip, Neighbourhoods, aggregate
from p2pl.errors import P2PLError
from p2pl.node import wire
from p2pl.sim.simulator import run_experiment

P = 1000
SEGMENTS = (600, 300, 100)
METHODS = [
    Compression("top-k", ratio=0.05),
    Compression("top-k", ratio=0.05, bits=8),
    Compression("random-k", ratio=0.05),
    Compression("random-k", ratio=0.05, bits=4, block_size=16),
    Compression("quantize", bits=8),
    Compression("quantize", bits=4, granularity="tensor", segments=SEGMENTS),
    Compression("choco", ratio=0.05, bits=8),
]
IDS = ["top-k", "top-k-8", "random-k", "random-k-4", "quantize-8", "quantize-4-tensor", "choco-8"]


def _rows(r: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(r, P)).astype(np.float32))


@pytest.mark.parametrize("compression", METHODS, ids=IDS)
def test_messages_have_exactly_the_layout_and_its_byte_size(compression: Compression) -> None:
    comp = Compressor(compression, P, seed=1)
    comp.start(torch.zeros(3, P))
    arrays = comp.encode(_rows(3), [0, 1, 2], 1, 0)
    layout = message_layout(compression, P)
    assert tuple(arrays) == layout.names
    for spec in layout.arrays:
        assert tuple(arrays[spec.name].shape) == (3, *spec.shape)
        assert str(arrays[spec.name].dtype) == f"torch.{spec.dtype}"
    assert sum(a[0].numel() * a.element_size() for a in arrays.values()) == layout.nbytes
    k = compression.kept(P)
    expected = {
        "top-k": k * (2 + compression.value_bits // 8) + (4 * -(-k // 256) if compression.value_bits < 32 else 0),
        "random-k": (k + 1) // 2 + 4 * -(-k // 16) if compression.value_bits == 4 else 4 * k,
        "quantize": P + 4 * -(-P // 256) if compression.bits == 8 else P // 2 + 4 * len(SEGMENTS),
        "choco": k * 3 + 4,  # int16 indices (P < 32,768), 8-bit codes, one scale
    }[compression.method]
    assert layout.nbytes == expected
    assert message_layout(Compression(), P).nbytes == 4 * P  # uncompressed: the float32 row
    if compression.method in ("top-k", "choco"):  # indices of larger models need 32 bits
        big = 2**15 + 1
        assert message_layout(compression, big).arrays[0] == ArraySpec("indices", "int32", (compression.kept(big),))
        assert message_layout(compression, big - 1).arrays[0].dtype == "int16"


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_and_within_one_level(bits: int) -> None:
    x = _rows(1, seed=3)
    comp = Compressor(Compression("quantize", bits=bits, block_size=P), P, seed=0)
    draws = torch.stack([comp.publish(x, [0], r, 0)[0][0] for r in range(400)])
    step = float(x.abs().max()) / (2 ** (bits - 1) - 1)
    assert float((draws - x).abs().max()) <= step * (1 + 1e-5)  # never more than one level off
    # the mean of 400 draws is within a few standard errors (each draw's spread is <= step / 2)
    assert float((draws.mean(0) - x[0]).abs().max()) <= 5 * step / 2 / 400**0.5
    assert float((draws.mean(0) - x[0]).abs().mean()) <= step / 20


def test_error_feedback_sends_every_coordinate_in_turn() -> None:
    """A change that is not sent accumulates until it is: with a fixed change, top-k sends k new
    coordinates each step (the ones not sent yet) until every one has been sent."""
    comp = Compressor(Compression("top-k", ratio=0.1), P, seed=0)
    comp.start(torch.zeros(1, P))
    row = torch.linspace(1.0, 2.0, P).unsqueeze(0)
    seen: set[int] = set()
    for step in range(10):
        indices = comp.encode(row, [0], 1, step)["indices"][0].tolist()
        assert not seen & set(indices)  # nothing sent twice while something is still unsent
        seen |= set(indices)
    assert seen == set(range(P))
    assert comp.state is not None and torch.equal(comp.state, row)


@pytest.mark.parametrize("compression", METHODS, ids=IDS)
def test_a_single_row_draws_exactly_what_the_vectorized_rows_draw(compression: Compression) -> None:
    rows, start, ids = _rows(4), _rows(4, seed=9), [5, 7, 11, 13]
    batch = Compressor(compression, P, seed=2)
    batch.start(start)
    singles = [Compressor(compression, P, seed=2) for _ in ids]
    for i, single in enumerate(singles):
        single.start(start[i : i + 1])
    for step in range(2):  # the second step exercises the sender state
        pool, mask = batch.publish(rows + step, ids, 3, step)
        for i, single in enumerate(singles):
            one, one_mask = single.publish(rows[i : i + 1] + step, [ids[i]], 3, step)
            assert torch.equal(one[0], pool[i])
            assert (mask is None and one_mask is None) or (
                mask is not None and one_mask is not None and torch.equal(one_mask[0], mask[i])
            )
    assert torch.equal(batch.own(rows), torch.cat([s.own(rows[i : i + 1]) for i, s in enumerate(singles)]))


def test_receivers_refuse_bad_layouts_and_indices() -> None:
    compression = Compression("top-k", ratio=0.05, bits=4)
    layout = message_layout(compression, P)
    spec = wire.ModelSpec(tuple(wire.TensorSpec(a.name, a.shape, a.dtype) for a in layout.arrays))
    comp = Compressor(compression, P, seed=0)
    comp.start(torch.zeros(1, P))
    arrays = {name: t[0] for name, t in comp.encode(_rows(1), [0], 1, 0).items()}
    header = wire.MessageHeader("params", "dev-1", 1, 0, spec.fingerprint)
    message = wire.encode(header, arrays)
    assert wire.decode(message, spec).tensors is not None  # uint8 codes and int16 indices travel
    longer = dict(arrays, indices=torch.arange(len(arrays["indices"]) + 1, dtype=torch.int16))
    bad_header = wire.MessageHeader("params", "dev-1", 1, 0, wire.ModelSpec.from_tensors(longer).fingerprint)
    wrong = wire.encode(bad_header, longer)
    with pytest.raises(wire.WireError, match="fingerprint"):
        wire.decode(wrong, spec)
    # The same payload under the expected fingerprint: refused by its size, before decoding.
    forged = wrong.replace(bad_header.fingerprint.encode(), spec.fingerprint.encode())
    with pytest.raises(wire.WireError, match="does not fit"):
        wire.decode(forged, spec)
    for indices in ([3, 2], [0, P], [-1, 4], [5, 5]):
        with pytest.raises(P2PLError, match="indices"):
            check_indices(torch.tensor([indices]), P)


@pytest.mark.parametrize("density", [0.3, 0.02])  # the weighted mean walks only the sent entries below 5 %
@pytest.mark.parametrize("rule", sorted(AGGREGATION_RULES))
def test_every_rule_fills_unsent_coordinates_with_the_receivers_own(rule: str, density: float) -> None:
    """A pool row with a sent mask aggregates exactly like the full row that holds the
    receiver's own value wherever nothing was sent."""
    gen = np.random.default_rng(4)
    n, p = 6, 400
    edges = [(i, j) for i in range(n) for j in range(n) if i != j and (i + j) % 3]
    dst, src = np.array([e[0] for e in edges]), np.array([e[1] for e in edges])
    weight = np.full(len(edges), 0.1)
    hoods = Neighbourhoods.from_edges(n, dst, src, weight, 1 - np.bincount(dst, weights=weight, minlength=n))
    own = torch.from_numpy(gen.normal(size=(n, p)).astype(np.float32))
    pool = torch.from_numpy(gen.normal(size=(n, p)).astype(np.float32))
    sent = torch.from_numpy(gen.random((n, p)) < density)
    stage = Gossip(rule, trim=0.2)
    got = aggregate(own, pool * sent, hoods, stage, sent)
    for r in range(n):  # receiver by receiver, its neighbours' rows filled with its own values
        filled = torch.where(sent, pool, own[r])
        one = Neighbourhoods.from_edges(1, np.zeros((dst == r).sum()), src[dst == r], weight[dst == r],
                                        hoods.self_weight[r : r + 1])  # fmt: skip
        want = aggregate(own[r : r + 1], filled, one, stage)
        assert torch.allclose(got[r], want[0], atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.02])  # the dense path and the sent-entries path
@pytest.mark.parametrize("rule", ["mean", "clipped"])
def test_renormalized_mean_averages_each_coordinate_over_its_senders(rule: str, density: float) -> None:
    """unsent = "renormalize": each coordinate is the weighted mean over the receiver and the
    neighbours that sent it (a coordinate nobody sent stays), and one receiver with its own
    neighbourhood (a node, a Ray shard) gets what the vectorized rows give it."""
    gen = np.random.default_rng(5)
    n, p = 6, 400
    edges = [(i, j) for i in range(n) for j in range(n) if i != j and (i + j) % 3]
    dst, src = np.array([e[0] for e in edges]), np.array([e[1] for e in edges])
    weight = gen.uniform(0.05, 0.15, len(edges))
    self_weight = 1 - np.bincount(dst, weights=weight, minlength=n)
    hoods = Neighbourhoods.from_edges(n, dst, src, weight, self_weight)
    own = torch.from_numpy(gen.normal(size=(n, p)).astype(np.float32))
    pool = torch.from_numpy(gen.normal(size=(n, p)).astype(np.float32)) * 0.1 + own.mean(0)  # not clipped away
    sent = torch.from_numpy(gen.random((n, p)) < density)
    stage = Gossip(rule, clip_quantile=1.0, sent_only=True)
    got = aggregate(own, pool * sent, hoods, stage, sent)
    if rule == "mean":  # the formula, coordinate by coordinate
        w = np.zeros((n, n))
        w[dst, src] = weight
        s = sent.double().numpy()
        num = self_weight[:, None] * own.double().numpy() + w @ (s * pool.double().numpy())
        want = torch.from_numpy(num / (self_weight[:, None] + w @ s)).float()
        assert torch.allclose(got, want, atol=1e-5)
        nobody = ~(w @ s > 0)
        assert nobody.any() and torch.allclose(got[torch.from_numpy(nobody)], own[torch.from_numpy(nobody)])
    assert not torch.allclose(got, aggregate(own, pool * sent, hoods, Gossip(rule, clip_quantile=1.0), sent))
    for r in range(n):
        one = Neighbourhoods.from_edges(1, np.zeros((dst == r).sum()), src[dst == r], weight[dst == r],
                                        self_weight[r : r + 1])  # fmt: skip
        assert torch.allclose(aggregate(own[r : r + 1], pool * sent, one, stage, sent)[0], got[r], atol=1e-6)


def test_unsent_setting_reaches_the_gossip_step() -> None:
    """compressed_gossip renormalizes the mean by default and fills with the receiver's own value
    with unsent = "own" (the old rule)."""
    n = 5
    dst, src = np.array([0, 1, 1, 2, 3, 4]), np.array([1, 0, 2, 1, 4, 3])
    weight = np.full(len(dst), 0.25)
    hoods = Neighbourhoods.from_edges(n, dst, src, weight, 1 - np.bincount(dst, weights=weight, minlength=n))
    rows = _rows(n)
    results = {}
    for unsent in ("renormalize", "own"):
        compressor = Compressor(Compression("top-k", ratio=0.05, unsent=unsent), P, seed=0)
        compressor.start(torch.zeros(n, P))
        pool, mask = compressor.publish(rows, np.arange(n), 1, 0)
        results[unsent] = compressed_gossip(rows, pool, mask, hoods, Gossip(), compressor)
        assert torch.equal(results[unsent], aggregate(rows, pool, hoods, Gossip(sent_only=unsent != "own"), mask))
    assert not torch.equal(results["renormalize"], results["own"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compression.method=zip"], "compression.method"),
        (["compression.method=top-k", "compression.unsent=zero"], "compression.unsent"),
        (["compression.method=quantize", "compression.bits=32"], "bits = 8 or 4"),
        (["compression.method=top-k", "compression.ratio=0"], "compression.ratio"),
        (["compression.method=choco", "links.model=bernoulli", "links.p_up=0.5"], "every message to arrive"),
        (["compression.method=top-k", "algorithm=fedavg"], "has none (it cooperates by GlobalMean"),
    ],
)
def test_bad_compression_settings_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    args = ["run", "--out", str(tmp_path), "--quiet", "--set", "devices=4", "--set", "rounds=1"]
    for o in overrides:
        args += ["--set", o]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


SMALL = ["devices=12", "rounds=3", "topology.radius=0.5", "model.hidden=[16]", "training.local_epochs=1"]


@pytest.mark.parametrize("method", ["top-k", "choco"])
def test_a_resumed_run_continues_the_compressor_state(tmp_path: Path, method: str) -> None:
    cfg = load_config(None, [*SMALL, "rounds=4", f"compression.method={method}", "compression.ratio=0.1"])
    straight = run_experiment(cfg)
    run_experiment(cfg, tmp_path, stop_after=2)
    resumed = run_experiment(cfg, tmp_path)
    assert torch.equal(resumed.params, straight.params)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bytes_sent_per_device"] == pytest.approx(straight.summary["bytes_sent_per_device"])


def test_bytes_are_the_encoded_message_size() -> None:
    plain = run_experiment(load_config(None, SMALL))
    topk = run_experiment(load_config(None, [*SMALL, "compression.method=top-k", "compression.ratio=0.01"]))
    k = -(-plain.experiment.spec.total // 100)  # each sent as an int16 index and a float32 value
    assert np.array_equal(
        topk.history.bytes_sent[0] * plain.experiment.spec.total * 4, plain.history.bytes_sent[0] * k * 6
    )


# ---------------------------------------------------- simulator == Ray == real nodes (<= 1e-5)

TOL = 1e-5
ENGINES = ["devices=6", "rounds=3", "topology.radius=0.8", "consensus.weights='metropolis'", "model.hidden=[16]",
           "training.local_epochs=1", "output.progress=false"]  # fmt: skip
# Between them: sender state (choco's copies, top-k's memory), sent masks, keyed indices, 8- and
# 4-bit codes, a robust rule, the renormalized mean and two consensus steps. quantize adds no
# Ray-specific path; the single-row == vectorized test above holds every method to the same draws.
ON_RAY = {
    "random-k-4-median-2steps": [
        "compression.method='random-k'",
        "compression.ratio=0.1",
        "compression.bits=4",
        "consensus.aggregation='median'",
        "consensus.steps=2",
    ],
    "choco-8": ["compression.method='choco'", "compression.ratio=0.1", "compression.bits=8"],
    # the renormalized mean (unsent = "renormalize"): each shard's receivers over the whole pool
    "top-k-mean-2steps": ["compression.method='top-k'", "compression.ratio=0.1", "consensus.steps=2"],
}


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_every_compressor_gives_the_same_numbers_on_ray_shards() -> None:
    ray = pytest.importorskip("ray")
    from p2pl.sim.ray_start import start_ray

    start_ray(ray, num_cpus=2)
    try:
        for name, extra in ON_RAY.items():
            cfg = load_config(None, [*ENGINES, *extra])
            local, sharded = run_experiment(cfg), run_experiment(cfg, backend="ray", shards=2)
            worst = float((sharded.params - local.params).abs().max())
            assert worst <= TOL, f"{name}: max |ray - simulator| = {worst:.3g}"
            for a, b in zip(sharded.history.bytes_sent, local.history.bytes_sent, strict=True):
                assert np.array_equal(a, b)
    finally:
        ray.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_launched_nodes_send_compressed_messages_and_equal_the_simulator(tmp_path: Path) -> None:
    """Real node processes with choco (8-bit values): the wire carries the encoded arrays (int8
    codes, int16 indices), every node keeps its copies of its neighbours in step with theirs, and
    its row equals the simulator's."""
    from p2pl.node import checkpoint

    extra = ON_RAY["choco-8"]
    out = tmp_path / "run"
    args = ["launch", "--out", str(out), "--quiet", "--timeout", "240"]
    for o in [*ENGINES, *extra]:
        args += ["--set", o]
    assert cli(args) == 0
    cfg = load_config(None, [*ENGINES, *extra])
    sim = run_experiment(cfg)
    ids = json.loads((out / "launch.json").read_text())["devices"]
    worst = 0.0
    for i, dev in enumerate(ids):
        ckpt = checkpoint.load(out / "nodes" / dev)
        assert ckpt is not None and ckpt.round == cfg.rounds
        assert len(ckpt.history.mixed[-1]) == int((sim.experiment.topology.edges == i).any(1).sum())
        worst = max(worst, float((ckpt.params - sim.params[i]).abs().max()))
    assert worst <= TOL, f"max |node - simulator| = {worst:.3g}"
    # What a node really sent per round is the encoded message (plus headers), far below a full row.
    summary = json.loads((out / "summary.json").read_text())
    degree = 2 * len(sim.experiment.topology.edges) / cfg.devices
    full_rows = degree * cfg.rounds * sim.experiment.spec.nbytes  # the uncompressed rows
    assert 0 < summary["bytes_sent_per_device"] < full_rows / 3


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--compress", "zip"], "unknown --compress 'zip'"), (["--compress", "top-k", "--seeds", "2"], "one seed")],
)
def test_compare_refuses_bad_compress_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli(["compare", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_node_checkpoint_carries_its_compressor_and_choco_copies(tmp_path: Path) -> None:
    """A restarted node continues its sender state and its copies of every neighbour."""
    from p2pl.node.runtime import NodeRuntime
    from test_node_runtime import node_config, tiny_data

    tiny_data(tmp_path, 3)
    extra = {"compression": {"method": "choco", "ratio": 0.2, "bits": 8}, "sync": {"enabled": False}}
    cfg = node_config(tmp_path, 0, 0, {1: 1, 2: 2}, extra)
    node = NodeRuntime(cfg)
    try:
        node.params = node.init_of(0).reshape(1, -1).clone()
        node._start_compression()
        assert torch.equal(node.copies["dev-1"][0], node.init_of(1))  # sync off: each neighbour's public init
        node.compressor.encode(node.params + 1.0, [0], 1, 0)  # the sender state moves
        node.copies["dev-2"] = node.copies["dev-2"] + 0.5
        node._checkpoint(1)
        state = {k: v.clone() for k, v in node._compression_state().items()}
    finally:
        node.close()
    restarted = NodeRuntime(cfg)
    try:
        from p2pl.node import checkpoint

        ckpt = checkpoint.load(restarted.dir, restarted.spec.total)
        assert ckpt is not None
        restarted._resume(ckpt)
        assert set(restarted._compression_state()) == set(state) == {"compress.state", "compress.copy.dev-1",
                                                                     "compress.copy.dev-2"}  # fmt: skip
        for key, value in restarted._compression_state().items():
            assert torch.equal(value, state[key]), key
    finally:
        restarted.close()
