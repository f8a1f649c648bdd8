"""pclr's own providers (each backend, each triton forward variant, the one-pass gate + LRP) and the registry of
every provider, in the order of the ``--providers`` help, the table and the charts.

pclr is called only through its public functions (``pclr.lrp_linear``, ``pclr.lrp_gate``, ``pclr.lrp_gate_linear``,
``pclr.FusedLRPLinear``) with ``backend=`` forced: a backend that cannot run the inputs raises
``pclr.BackendUnavailableError`` with its own reasons, which the harness writes as the row's note.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from pclr import available_backends
from pclr.bench.baselines import BASELINES
from pclr.bench.models import replace_linears, tiny_llama
from pclr.bench.problems import Problem
from pclr.bench.provider import (
    KERNEL,
    LINEAR,
    MODEL,
    Built,
    Provider,
    RunOptions,
    Skip,
    layer_chain,
    make_fn,
    trainable_copy,
)
from pclr.bench.shapes import GATE_WEIGHTS
from pclr.config import LRPConfig
from pclr.functional import forward_variant, lrp_gate, lrp_linear, set_forward_variant
from pclr.modules import FusedLRPLinear, KeyPool
from pclr.options import ForwardVariant

try:  # the gate and the LRP together; versions of pclr before it have no such function
    from pclr import lrp_gate_linear
except ImportError:
    lrp_gate_linear = None

ONE_PASS_UNAVAILABLE: Optional[str] = (
    None if lrp_gate_linear is not None else "pclr.lrp_gate_linear not available in this version")


@contextmanager
def triton_forward_variant(variant: ForwardVariant) -> Iterator[None]:
    """Make ``variant`` the triton forward variant ``lrp_linear`` and :class:`pclr.FusedLRPLinear` use while a
    provider is built and timed (``pclr.set_forward_variant``), then put the previous default back.

    The only place the benchmark chooses a variant.
    """
    old = forward_variant()
    set_forward_variant(variant)
    try:
        yield
    finally:
        set_forward_variant(old)


class PclrBackend(Provider):
    """``pclr.lrp_linear`` / ``pclr.lrp_gate`` with ``backend=`` forced (the triton one optionally with a forward
    variant forced); in ``layer`` mode one gate per decoder layer feeds its 7 linears, the amortisation pclr is built
    for. The model-level modes put :class:`pclr.FusedLRPLinear` in every linear, one key pool per decoder layer."""

    def __init__(self, name: str, backend: str, modes: frozenset[str], not_supported: dict[str, str], summary: str,
                 variant: Optional[ForwardVariant] = None) -> None:
        self.name, self.backend, self.variant, self.summary = name, backend, variant, summary
        self.modes, self.not_supported = modes, not_supported

    def context(self) -> AbstractContextManager[None]:
        return triton_forward_variant(self.variant) if self.variant is not None else nullcontext()

    def _require(self, device: torch.device, opts: RunOptions) -> None:
        """Skip with the backend's general reasons, or the CPU policy for the Triton interpreter."""
        why = available_backends()[self.backend]
        if why:
            raise Skip("; ".join(why))
        if device.type != "cuda" and self.backend == "triton" and not opts.interpreter:
            raise Skip(f"{self.name} on CPU would run through the Triton interpreter (a debugging tool): pass "
                       "--interpreter to include it")

    def build(self, p: Problem, opts: RunOptions) -> Built:
        self._require(p.device, opts)
        r, backend = p.shape.r, self.backend
        if p.shape.mode == "gate":
            return Built(lambda: lrp_gate(p.query, p.keys, r, weights=GATE_WEIGHTS, backend=backend))
        q, x, grads = _trainable(p)

        def linear(inp: Tensor, layer: dict[str, Any], route: tuple[Tensor, Tensor]) -> Tensor:
            idx, val = route
            return lrp_linear(inp, layer["weight"], layer["bias"], layer["A_m"], layer["B_m"], idx, val,
                              A_s=layer["A_s"], B_s=layer["B_s"], beta_m=p.beta_m, beta_s=p.beta_s, backend=backend)

        route: Callable[[], tuple[Tensor, Tensor]]
        if p.shape.mode == "layer":
            def route() -> tuple[Tensor, Tensor]:  # one gate per decoder layer, shared by its 7 linears
                return lrp_gate(p.query, p.keys, r, weights=GATE_WEIGHTS, backend=backend)
        else:
            def route() -> tuple[Tensor, Tensor]:  # the kernel modes time the linear with its route given
                return p.idx, p.val
        return make_fn(q, layer_chain(q, linear, route), grads, x)

    def build_model(self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    opts: RunOptions) -> nn.Module:
        self._require(device, opts)
        model = tiny_llama(cfg, device, dtype)
        d, n, r, n_s = cfg["hidden"], cfg["n"], cfg["r"], cfg["n_s"]
        for layer in model.model.layers:
            lcfg = LRPConfig(r=r, n_shared=n_s, budget=max(n, r), backend=self.backend)
            pool = KeyPool((d,), lcfg).to(device)
            made: list[FusedLRPLinear] = []

            def make(_: str, lin: nn.Linear, lcfg: LRPConfig = lcfg, pool: KeyPool = pool,
                     made: list[FusedLRPLinear] = made) -> nn.Module:
                made.append(FusedLRPLinear.from_linear(lin, lcfg, key_pool=pool))
                return made[-1]
            replace_linears(layer, make)
            pool.grow(n)
            for m in made:
                m.add_shared(n_s, trainable=False)
            layer.lrp_key_pool = pool  # keep the pool reachable (it is not a submodule of the linears)
        return model


def _trainable(p: Problem) -> tuple[Problem, Tensor, list[Tensor]]:
    """The problem with its pool tensors as leaves that record gradients in ``fwdbwd`` (shared ranks stay frozen,
    as while learning a task); returns (problem, x, the tensors whose gradients a call produces)."""
    fwdbwd = p.shape.mode == "fwdbwd"
    x = trainable_copy(p.x, fwdbwd)
    grads: list[Tensor] = [x] if fwdbwd else []
    params = []
    for layer in p.layers:
        A_m, B_m = trainable_copy(layer["A_m"], fwdbwd), trainable_copy(layer["B_m"], fwdbwd)
        params.append(dict(layer, A_m=A_m, B_m=B_m))
        grads += [A_m, B_m] if fwdbwd else []
    return replace(p, layers=params), x, grads


class OnePass(PclrBackend):
    """``pclr.lrp_gate_linear``: the gate and the gated LRP linear in one launch, in every linear (no shared route)."""

    def _availability(self) -> Optional[str]:
        return ONE_PASS_UNAVAILABLE

    def build(self, p: Problem, opts: RunOptions) -> Built:
        self._require(p.device, opts)
        assert lrp_gate_linear is not None, "the harness checks unavailable() before build()"
        one_pass = lrp_gate_linear
        r, backend = p.shape.r, self.backend

        def linear(inp: Tensor, layer: dict[str, Any], route: None) -> Tensor:
            y, _, _ = one_pass(inp, layer["weight"], layer["bias"], layer["A_m"], layer["B_m"], p.query, p.keys, r,
                               weights=GATE_WEIGHTS, A_s=layer["A_s"], B_s=layer["B_s"], beta_m=p.beta_m,
                               beta_s=p.beta_s, backend=backend)
            return y
        return make_fn(p, layer_chain(p, linear, lambda: None), [], p.x)


_NO_GATE_VARIANT = "no gate of its own: gate mode times the triton gate kernel as pclr-triton"
_MODEL_VARIANT = "the model-level modes run pclr-triton with the forward variant chosen by shape"

_VARIANT_SUMMARY: dict[str, str] = {
    "extended-tma": "the extended path with its GEMM on tensor descriptors (TMA), persistent tiles (sm_90)",
    "fused": "base GEMM and LRP term in one kernel",
    "epilogue": "cuBLAS x·Wᵀ, then the LRP term added in place",
    "split": "shrink kernel, then a GEMM with S·B_eff in its epilogue",
}


def _triton_variant(variant: ForwardVariant) -> PclrBackend:
    return PclrBackend(
        f"pclr-triton-{variant}", "triton", LINEAR,
        {"gate": _NO_GATE_VARIANT, "train": _MODEL_VARIANT, "serve": _MODEL_VARIANT},
        f"triton backend, forward variant {variant} forced: {_VARIANT_SUMMARY[variant]}", variant=variant)


PCLR_PROVIDERS: tuple[Provider, ...] = (
    PclrBackend("pclr-reference", "reference", KERNEL | MODEL, {},
                'lrp_linear(..., backend="reference"): gathered torch, the definition of correct'),
    PclrBackend("pclr-triton", "triton", KERNEL | MODEL, {},
                "the triton backend as dispatch runs it: its gate kernel, and the auto forward (the decode kernels "
                "for at most 64 tokens, the extended path otherwise)", variant="auto"),
    _triton_variant("extended-tma"),
    _triton_variant("fused"),
    _triton_variant("epilogue"),
    _triton_variant("split"),
    OnePass("pclr-triton-onepass", "triton", frozenset({"fwd", "decode", "layer"}),
            {"gate": "no gate alone: the one-pass path gates inside its launch (gate mode times pclr-triton)",
             "fwdbwd": "one-pass is an inference path",
             "train": "one-pass is an inference path", "serve": "the model-level modes route through pclr.routing"},
            "pclr.lrp_gate_linear(..., backend='triton'): the gate and the LRP in one launch, in every linear"),
    PclrBackend("pclr-cuda", "cuda", KERNEL | MODEL, {}, "the compiled CUDA backend (pclr._C)"),
)

PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (BASELINES[0], *PCLR_PROVIDERS, *BASELINES[1:])}
"""Every provider by name: base first (the floor), then pclr's, then the other formulations."""
