"""The compiled sums of a compressed gossip step equal a scatter-add over (edge, sent coordinate)
pairs in receiver order, bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.core import sparse_sums
from p2pl.core.cooperate import Neighbourhoods
from p2pl.core.sparse_sums import sent_sums


def _scatter_add_sums(pool: torch.Tensor, hoods: Neighbourhoods, sent: torch.Tensor, width: int):
    """The reference: every (edge, coordinate its sender sent) pair, in receiver then edge then
    coordinate order, added with index_add_."""
    flat, products, weights = [], [], []
    for n in range(hoods.num_rows):
        for e in range(hoods.indptr[n], hoods.indptr[n + 1]):
            m, w = int(hoods.src[e]), torch.tensor(hoods.weight[e], dtype=pool.dtype)
            for c in sent[m].nonzero().flatten().tolist():
                flat.append(n * width + c)
                products.append(w * pool[m, c])
                weights.append(w)
    index = torch.tensor(flat, dtype=torch.int64)
    kept = torch.zeros(hoods.num_rows * width, dtype=pool.dtype).index_add_(0, index, torch.stack(products))
    heard = torch.zeros(hoods.num_rows * width, dtype=pool.dtype).index_add_(0, index, torch.stack(weights))
    return kept.view(hoods.num_rows, width), heard.view(hoods.num_rows, width)


def test_sent_sums_equal_the_scatter_add_bit_for_bit(monkeypatch):
    monkeypatch.setattr(sparse_sums, "_ROWS_PER_JOB", 3)  # several jobs over the free cores
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    receivers, senders, width = 11, 9, 40
    dst = rng.integers(0, receivers - 1, size=45)  # the last receiver hears no one
    src = rng.integers(0, senders, size=45)
    hoods = Neighbourhoods.from_edges(receivers, dst, src, rng.random(45) / 3, rng.random(receivers))
    pool = torch.randn(senders, width, generator=g)
    sent = torch.rand(senders, width, generator=g) < 0.2
    sent[4] = False  # a sender that sent nothing
    pool = pool * sent  # unsent coordinates hold zeros, as a decoded message does
    own = torch.randn(receivers, width, generator=g)
    kept, heard = sent_sums(own, pool, hoods, sent)
    ref_kept, ref_heard = _scatter_add_sums(pool, hoods, sent, width)
    assert torch.equal(kept, ref_kept) and torch.equal(heard, ref_heard)
    assert float(heard[-1].abs().sum()) == 0.0 and bool((heard > 0).any())
