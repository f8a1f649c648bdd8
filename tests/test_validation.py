"""Bad input to lrp_linear: a clear error naming the argument and the expected shape/dtype, never a wrong answer."""
from dataclasses import replace

import pytest
import torch
from lrp_cases import make_case

import pclr


def _call(c, **kw):
    args = {"A_s": c.A_s, "B_s": c.B_s, "sample_of_token": c.sot, "trainable": c.trainable}
    args.update(kw)
    return pclr.lrp_linear(c.x, c.weight, c.bias, c.A_m, c.B_m, c.idx, c.val, **args)


C = make_case()


@pytest.mark.parametrize("change, extra, err, match", [
    ({"x": C.x.long()}, {}, TypeError, "x must have dtype"),
    ({"x": C.x[0, 0]}, {}, ValueError, "x must be"),
    ({"weight": C.weight.double()}, {}, TypeError, "weight must have dtype"),
    ({"weight": C.weight[:, :5]}, {}, ValueError, r"weight must have shape \[d_out, 16\]"),
    ({"bias": C.bias[:3]}, {}, ValueError, r"bias must have shape \[12\]"),
    ({"A_m": C.A_m[:, :3]}, {}, ValueError, r"A_m must have shape \[n, 16\]"),
    ({"B_m": C.B_m[:4]}, {}, ValueError, r"B_m must have shape \[10, 12\]"),
    ({"idx": C.idx.float()}, {}, TypeError, "idx must have dtype"),
    ({"idx": C.idx[:2], "val": C.val[:2]}, {}, ValueError, "x has batch 3 but idx has 2"),
    ({"idx": C.idx + 100}, {}, ValueError, "idx holds values outside"),
    ({"val": C.val[:, :2]}, {}, ValueError, r"val must have shape \[3, 4\]"),
    ({}, {"B_s": None}, ValueError, "A_s and B_s must be given together"),
    ({}, {"A_s": C.A_s[:, :3]}, ValueError, r"A_s must have shape \[n_s, 16\]"),
    ({}, {"trainable": torch.ones(10)}, TypeError, "trainable must have dtype"),
    ({}, {"trainable": torch.ones(9, dtype=torch.bool)}, ValueError, r"trainable must have shape \[10\]"),
    ({}, {"sample_of_token": torch.zeros(15, dtype=torch.int32)}, ValueError, "sample_of_token is only"),
    ({}, {"backend": "tpu"}, ValueError, "backend must be one of"),
])
def test_bad_linear_inputs(change, extra, err, match):
    with pytest.raises(err, match=match):
        _call(replace(C, **change), **extra)


def test_packed_needs_sample_of_token_and_range():
    c = make_case(packed=True)
    with pytest.raises(ValueError, match="needs sample_of_token"):
        _call(c, sample_of_token=None)
    with pytest.raises(ValueError, match=r"sample_of_token must have shape \[15\]"):
        _call(c, sample_of_token=c.sot[:3])
    with pytest.raises(ValueError, match="sample_of_token holds values outside"):
        _call(c, sample_of_token=c.sot + 3)


def test_device_mismatch_names_argument():
    meta = make_case()
    with pytest.raises(ValueError, match="A_m is on meta"):
        _call(replace(meta, A_m=meta.A_m.to("meta")))


def test_validation_mode_can_be_switched_off():
    c = replace(C, idx=C.idx + 100)
    pclr.set_validation(False)
    try:
        with pytest.raises((IndexError, RuntimeError)):  # torch's own bounds check, not a silent answer
            _call(c, backend="reference")
    finally:
        pclr.set_validation(None)


def test_empty_pool_with_nonzero_r_is_error():
    c = make_case(n=0, r=0)
    with pytest.raises(ValueError, match="pool A_m is empty"):
        _call(replace(c, idx=torch.zeros(3, 2, dtype=torch.int32), val=torch.ones(3, 2)))
    y = _call(c)  # r = 0: shared ranks only
    assert y.shape == (3, 5, 12)
