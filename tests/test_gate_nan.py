"""The gate's ranking rule for scores that are not numbers, on every backend that can run here.

Rule: candidates with a number as score (±inf included) by descending score, then candidates whose score is NaN (a
NaN ranks below -inf), then non-candidates; ties go to the lower index. No score can route to an index outside
[0, n) or to a non-candidate while candidates remain, and every backend picks the same experts.
"""
from __future__ import annotations

import math

import pytest
import torch

import pclr
from pclr import dispatch
from pclr.backends.reference import gate_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + [b for b in ("triton", "cuda") if not dispatch.reasons(b, "info", None)]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _no_validation():
    # validation mode rejects a NaN query up front; the rule must hold where nothing checks (the GPU default)
    pclr.set_validation(False)
    yield
    pclr.set_validation(None)


def _problem(B=4, n=20, d=(12, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = [torch.randn(B, dp, generator=g) for dp in d]
    k = [torch.randn(n, dp, generator=g) for dp in d]
    return q, k


def _expected(q, k, w, r, cand, scope):
    """An independent oracle: Python's sort of (tier, -score, index) over the reference's scores."""
    score = gate_scores(tuple(q), tuple(k), tuple(w)).tolist()
    B, n = len(score), len(score[0])
    if cand is None:
        cand = torch.ones(n, dtype=torch.bool)
    ok = cand.expand(B, n).tolist()
    if scope == "batch":
        score = [[math.fsum(score[b][j] for b in range(B)) if not any(math.isnan(score[b][j]) for b in range(B))
                  else NAN for j in range(n)]]
        ok = [[all(ok[b][j] for b in range(B)) for j in range(n)]]

    def key(row, j):
        s, c = score[row][j], ok[row][j]
        tier = 2 if not c else (1 if math.isnan(s) else 0)
        return tier, (0.0 if tier else -s), j

    rows = [sorted(range(n), key=lambda j: key(i, j))[:r] for i in range(len(score))]
    return torch.tensor(rows * (B if scope == "batch" else 1), dtype=torch.int32)


def _check(q, k, r, *, w=(1.0, 0.25), cand=None, scope="sample", oracle=True):
    B, n = q[0].shape[0], k[0].shape[0]
    got = {}
    for be in BACKENDS:
        qd, kd = tuple(t.to(DEVICE) for t in q), tuple(t.to(DEVICE) for t in k)
        cd = None if cand is None else cand.to(DEVICE)
        idx, _ = pclr.lrp_gate(qd, kd, r, weights=w, candidates=cd, scope=scope, mode="soft", backend=be)
        idx = idx.cpu()
        assert idx.shape == (B, r)
        assert bool(((idx >= 0) & (idx < n)).all()), f"{be}: index outside [0, {n})"
        assert all(len(set(row)) == r for row in idx.tolist()), f"{be}: an expert chosen twice"
        got[be] = idx
    ref = got["reference"]
    for be, idx in got.items():
        assert torch.equal(idx, ref), f"{be} routes differently from the reference"
    if oracle:
        assert torch.equal(ref, _expected(q, k, w, r, cand, scope))
    return ref


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nan_or_inf_key_row_ranks_last(bad, scope):
    q, k = _problem()
    k[0][3, 0] = bad  # cos with an Inf key is inf/inf: NaN as well
    idx = _check(q, k, 20, scope=scope)  # r = n: the whole ranking
    assert (idx[:, :-1] != 3).all() and (idx[:, -1] == 3).all()  # chosen only once every number is taken


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_all_nan_keys_pick_lowest_indices(scope):
    q, k = _problem()
    k[0].fill_(NAN)
    idx = _check(q, k, 5, scope=scope)
    assert torch.equal(idx, torch.arange(5, dtype=torch.int32).expand(4, 5))


def test_nan_weight_picks_lowest_indices():
    q, k = _problem()
    idx = _check(q, k, 6, w=(1.0, NAN))
    assert torch.equal(idx, torch.arange(6, dtype=torch.int32).expand(4, 6))


def test_nan_query_row_only_affects_its_sample():
    q, k = _problem()
    q[1][2, :] = NAN
    idx = _check(q, k, 4)
    assert torch.equal(idx[2], torch.arange(4, dtype=torch.int32))
    clean = _check([t[[0, 1, 3]] for t in q], k, 4)
    assert torch.equal(idx[[0, 1, 3]], clean)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_nan_candidate_ranks_after_numbers_but_before_non_candidates(per_sample, scope):
    B, n = 4, 20
    q, k = _problem(B, n)
    k[0][2, 1] = NAN  # expert 2: a candidate everywhere, its score NaN
    k[1][7, 0] = INF  # expert 7: not a candidate anywhere, its score NaN
    if per_sample:
        cand = torch.zeros(B, n, dtype=torch.bool)
        for b in range(B):
            cand[b, [b, 13 + b]] = True  # each sample's own extras, outside the intersection
        cand[:, [2, 9, 10, 11, 12]] = True  # the intersection: 2, 9..12
    else:
        cand = torch.zeros(n, dtype=torch.bool)
        cand[[2, 9, 10, 11, 12]] = True
    idx = _check(q, k, 5, cand=cand, scope=scope)
    allowed = cand.expand(B, n)
    if scope == "batch":
        allowed = allowed.all(0, keepdim=True).expand(B, n)
    assert bool(allowed.gather(1, idx.long()).all()), "a non-candidate was chosen while candidates remained"
    if scope == "batch" or not per_sample:
        assert (idx[:, -1] == 2).all()  # the NaN candidate last of the five candidates


def test_batch_scope_picks_from_intersection_of_rows():
    B, n, r = 3, 16, 3
    q, k = _problem(B, n, seed=4)
    cand = torch.zeros(B, n, dtype=torch.bool)
    cand[0, :8], cand[1, 4:12], cand[2, 3:9] = True, True, True  # intersection {4, ..., 7}
    k[0][0, :] = NAN  # a NaN score in a non-candidate of row 1/2 must not pull it in (NaN - inf is NaN)
    k[0][10, :] = NAN
    idx = _check(q, k, r, cand=cand, scope="batch")
    assert set(idx.flatten().tolist()) <= {4, 5, 6, 7}
