"""lrp_gate semantics: weighted multi-part cosine, top-r per sample or per batch, candidates, ties, soft values."""
import pytest
import torch
import torch.nn.functional as F

import pclr


def _scores(q, k, w):
    return sum(wi * F.normalize(qi, dim=-1) @ F.normalize(ki, dim=-1).T for qi, ki, wi in zip(q, k, w))


def test_sample_scope_matches_scores():
    q, k = (torch.randn(4, 8), torch.randn(4, 5)), (torch.randn(20, 8), torch.randn(20, 5))
    idx, val = pclr.lrp_gate(q, k, 6, weights=(1.0, 0.25))
    s = _scores(q, k, (1.0, 0.25))
    assert idx.dtype == torch.int32 and val.dtype == torch.float32 and idx.shape == (4, 6)
    assert torch.equal(idx.long(), s.topk(6, dim=1).indices)
    assert torch.equal(val, torch.ones(4, 6))


def test_batch_scope_uses_summed_score():
    q, k = torch.randn(5, 8), torch.randn(20, 8)
    idx, _ = pclr.lrp_gate(q, k, 4, scope="batch")
    s = _scores((q,), (k,), (1.0,)).sum(0)
    expected = s.topk(4).indices
    assert torch.equal(idx.long(), expected.expand(5, 4))


def test_soft_values_are_scores_and_differentiable():
    q, k = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    idx, val = pclr.lrp_gate(q, k, 3, mode="soft")
    s = _scores((q,), (k,), (1.0,))
    torch.testing.assert_close(val, s.gather(1, idx.long()))
    val.sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_candidates_restrict_choice():
    q, k = torch.randn(3, 8), torch.randn(12, 8)
    cand = torch.zeros(12, dtype=torch.bool)
    cand[[1, 4, 7, 9]] = True
    idx, _ = pclr.lrp_gate(q, k, 3, candidates=cand)
    assert set(idx.flatten().tolist()) <= {1, 4, 7, 9}
    per_sample = torch.zeros(3, 12, dtype=torch.bool)
    per_sample[0, :3] = per_sample[1, 3:6] = per_sample[2, 6:9] = True
    idx2, _ = pclr.lrp_gate(q, k, 3, candidates=per_sample)
    for b in range(3):
        assert sorted(idx2[b].tolist()) == list(range(3 * b, 3 * b + 3))


def test_ties_choose_lower_index():
    k = torch.zeros(8, 4)
    k[:, 0] = 1.0  # every key identical: all scores tie
    idx, _ = pclr.lrp_gate(torch.ones(2, 4), k, 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_zero_query_part_contributes_nothing():
    qt, kt, kv = torch.randn(2, 6), torch.randn(9, 6), torch.randn(9, 4)
    qv = torch.zeros(2, 4)  # no image
    idx_mm, _ = pclr.lrp_gate((qt, qv), (kt, kv), 4, weights=(1.0, 0.25), mode="soft")
    idx_t, _val_t = pclr.lrp_gate(qt, kt, 4, mode="soft")
    assert torch.equal(idx_mm, idx_t)


@pytest.mark.parametrize("bad, err, match", [
    ({"r": 11}, ValueError, "r \\(11\\) exceeds"),
    ({"r": 0}, ValueError, "r must be a positive int"),
    ({"scope": "token"}, ValueError, "scope"),
    ({"mode": "gumbel"}, ValueError, "mode"),
    ({"query": torch.randn(3, 7)}, ValueError, "query\\[0\\]"),
    ({"keys": torch.randn(10, 8, dtype=torch.float64)}, None, None),
    ({"candidates": torch.ones(9, dtype=torch.bool)}, ValueError, "candidates"),
    ({"candidates": torch.ones(10)}, TypeError, "candidates"),
    ({"query": torch.full((3, 8), float("nan"))}, ValueError, "NaN"),
    ({"weights": (1.0, 2.0)}, ValueError, "weights"),
])
def test_bad_gate_inputs(bad, err, match):
    kw = {"query": torch.randn(3, 8), "keys": torch.randn(10, 8), "r": 3}
    kw.update(bad)
    call = lambda: pclr.lrp_gate(kw.pop("query"), kw.pop("keys"), kw.pop("r"), **kw)
    if err is None:
        call()  # mixed precision parts are fine: scores are computed in fp32/fp64
    else:
        with pytest.raises(err, match=match):
            call()


def test_r_larger_than_candidates_is_error():
    cand = torch.zeros(10, dtype=torch.bool)
    cand[:2] = True
    with pytest.raises(ValueError, match="candidates"):
        pclr.lrp_gate(torch.randn(3, 8), torch.randn(10, 8), 3, candidates=cand)
