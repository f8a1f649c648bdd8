"""Allowed values and fixed bounds of pclr's settings, each defined once.

Everything else (functional validation, :class:`pclr.LRPConfig`, the PEFT config, dispatch, the backends, the
benchmark and the CUDA build) reads them from here, so adding a value is a one-line change.
"""
from __future__ import annotations

from typing import Literal, get_args

GateScope = Literal["sample", "batch"]
"""'sample': each sample ranks its own scores; 'batch': the batch-summed score ranks experts for every sample."""

GateMode = Literal["hard", "soft"]
"""'hard': gate value 1 for each chosen expert; 'soft': the score itself (differentiable w.r.t. query and keys)."""

BackendName = Literal["reference", "triton", "cuda"]
"""The op backends, in no particular order (dispatch owns the priority)."""

ForwardVariant = Literal["auto", "extended", "extended-tma", "fused", "epilogue", "split"]
"""How the triton backend computes the forward of ``lrp_linear`` (same result, different passes over memory):
``extended`` one shrink then one K-extended GEMM [x | S]·[W | B_eff]ᵀ (S kept for the backward);
``extended-tma`` the same with its GEMM on sm_90 tensor descriptors (TMA) and a persistent tile schedule;
``fused`` S recomputed inside every output tile; ``epilogue`` cuBLAS x·Wᵀ then the LRP term added in place;
``split`` a shrink then a GEMM with S·B_eff in its epilogue; ``auto`` the decode kernels for at most
DECODE_MAX_TOKENS tokens, ``extended`` otherwise."""

GATE_SCOPES: tuple[str, ...] = get_args(GateScope)
GATE_MODES: tuple[str, ...] = get_args(GateMode)
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
FORWARD_VARIANTS: tuple[str, ...] = get_args(ForwardVariant)

DECODE_MAX_TOKENS = 64
"""Calls with at most this many tokens take the decode paths (one tile holds every token); the CUDA extension is
compiled with the same value (setup.py passes it as ``PCLR_DECODE_MAX_TOKENS``)."""


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        spelled = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {spelled}; got {value!r}")
