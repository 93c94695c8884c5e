"""Top-k compression's choice: the compiled kernel and the torch path pick the same indices."""

from __future__ import annotations

import pytest
import torch

from p2pl.core import topk
from p2pl.core.topk import _by_sort, top_k_indices


def _reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """The rule spelled out, row by row: largest magnitude first (NaN largest), lower index on ties."""
    out = []
    for row in values.tolist():
        key = [(float("inf") if v != v else abs(v), -i) for i, v in enumerate(row)]
        chosen = sorted(range(len(row)), key=lambda i: key[i], reverse=True)[:k]
        out.append(sorted(chosen))
    return torch.tensor(out, dtype=torch.int64)


def _awkward(rows: int, width: int, seed: int) -> torch.Tensor:
    """Random rows with what breaks a careless selection: zeros, repeated magnitudes of either
    sign, NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, width, generator=g)
    values[:, ::7] = 0.0
    values[:, 3::11] = 0.5 * torch.sign(torch.randn(rows, len(range(3, width, 11)), generator=g))
    values[0, 5] = float("nan")
    values[1, 2] = float("-inf")
    return values


@pytest.mark.parametrize("k", [1, 5, 37, 60])
def test_kernel_and_torch_path_follow_the_rule(monkeypatch, k):
    values = _awkward(9, 61, seed=k)
    expected = _reference(values, k)
    assert torch.equal(_by_sort(values, k), expected)
    monkeypatch.setattr(topk, "KERNEL_MIN_VALUES", 1)  # the compiled kernel on a small step
    monkeypatch.setattr(topk, "_ROWS_PER_JOB", 2)  # several jobs, over the free cores
    assert torch.equal(top_k_indices(values, k), expected)


def test_a_large_step_takes_the_kernel_and_matches_torch():
    values = _awkward(300, 4_000, seed=3)  # 1.2M values: over KERNEL_MIN_VALUES
    assert values.numel() >= topk.KERNEL_MIN_VALUES
    chosen = top_k_indices(values, 40)
    assert chosen.shape == (300, 40) and chosen.dtype == torch.int64
    assert torch.equal(chosen, _by_sort(values, 40))
    assert bool((chosen[:, 1:] > chosen[:, :-1]).all())  # ascending, no repeats


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match=r"must be in 1\.\.4"):
        top_k_indices(torch.zeros(2, 4), 5)
