"""What a benchmark provider is: an object that declares the modes it runs, why it cannot run the others, whether it
is available at all here, and how to build the callable of one point (or the model of a model-level mode).

The harness asks every provider the same three questions in this order, and writes a ``skipped`` row carrying the
answer as its note when one of them says no: :meth:`Provider.mode_reason` (a declared property of the provider),
:meth:`Provider.unavailable` (computed once per process: a missing package, a missing entry point), then
:meth:`Provider.build` may raise :class:`Skip` for reasons that depend on the inputs (a backend's own reasons).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from pclr.bench.problems import CostKind, Problem
from pclr.bench.shapes import KERNEL_MODES, LAYER_LINEARS, LINEAR_MODES, MODEL_MODES

LINEAR = frozenset(LINEAR_MODES)
KERNEL = frozenset(KERNEL_MODES)
MODEL = frozenset(MODEL_MODES)


@dataclass
class Built:
    """A provider ready to time: ``fn`` runs one call; ``grads`` are reset between fwd+bwd repetitions."""

    fn: Callable[[], Any]
    grads: list[Tensor] = field(default_factory=list)


class Skip(Exception):
    """A provider cannot run here; the message is the stated reason."""


@dataclass(frozen=True)
class RunOptions:
    """Options every provider sees. ``interpreter``: run the triton backend on CPU through TRITON_INTERPRET=1."""

    interpreter: bool = False


class Provider:
    """One thing to time. Subclasses set the class attributes and implement :meth:`build` (kernel modes) and, when
    ``train``/``serve`` are among their modes, :meth:`build_model`.

    Attributes:
        name: the ``--providers`` name and the ``provider`` column.
        summary: one line for ``--help`` and the README's table.
        modes: the modes it has a measurement in.
        not_supported: for modes outside ``modes``, why not (the note of its ``skipped`` row).
        cost: the operation its call computes, for the ideal FLOPs and bytes (:func:`pclr.bench.problems.ideal_cost`).
    """

    name: str = ""
    summary: str = ""
    modes: frozenset[str] = frozenset()
    not_supported: Mapping[str, str] = {}
    cost: CostKind = "lrp"

    _unavailable: Optional[str] = None
    _checked: bool = False

    def mode_reason(self, mode: str) -> Optional[str]:
        """Why this provider has no measurement in ``mode`` (None: it has one)."""
        if mode in self.modes:
            return None
        return self.not_supported.get(mode, f"{self.name} has no {mode} mode")

    def unavailable(self) -> Optional[str]:
        """Why this provider cannot run in this process at all (None: it can). Computed once, then remembered."""
        if not self._checked:
            self._unavailable = self._availability()
            self._checked = True
        return self._unavailable

    def _availability(self) -> Optional[str]:
        """Override: the reason this provider is unavailable (a missing package or entry point), or None."""
        return None

    def context(self) -> AbstractContextManager[None]:
        """Entered around building and timing this provider (e.g. a backend setting it forces)."""
        return nullcontext()

    def build(self, p: Problem, opts: RunOptions) -> Built:
        """The callable of one kernel-level point; raise :class:`Skip` when the inputs rule this provider out."""
        raise Skip(f"{self.name} has no kernel-level build")

    def build_model(self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    opts: RunOptions) -> nn.Module:
        """The small LLaMA of ``cfg`` with this provider's adapter in every decoder layer's 7 linears."""
        raise Skip(f"{self.name} has no model-level build")

    def model_note(self, mode: str, cfg: dict[str, Any]) -> str:
        """What a model-level row of this provider means, when it needs saying."""
        return ""

    def model_ranks(self, cfg: dict[str, Any]) -> int:
        """The R column of a model-level row."""
        return 0 if self.cost == "base" else cfg["n_s"] + cfg["r"]


LinearFn = Callable[[Tensor, dict[str, Any], Any], Tensor]
"""(input [B, L, d_in], one layer's tensors, the route of the layer) -> output [B, L, d_out]."""


def layer_chain(p: Problem, linear: LinearFn, route: Callable[[], Any]) -> Callable[[Tensor], Tensor]:
    """Apply each linear of the problem in a decoder layer's data flow: q/k/v/gate/up read the hidden state x,
    o_proj reads v_proj's output (attention left out) and down_proj reads up_proj's. One linear: y = linear(x).
    ``route`` is called once per forward and its result passed to every linear (one gate per decoder layer)."""
    def forward(x: Tensor) -> Tensor:
        r = route()
        y = x
        for i, layer in enumerate(p.layers):
            y = linear(y if LAYER_LINEARS[i] in ("o_proj", "down_proj") else x, layer, r)
        return y
    return forward


def no_route() -> None:
    """The route of providers that gate inside every linear (or not at all)."""
    return None


def make_fn(p: Problem, forward: Callable[[Tensor], Tensor], grads: list[Tensor], x: Tensor) -> Built:
    """One call of ``forward(x)``: under no_grad for inference modes; forward then backward of a fixed random dY
    [B, L, d_out] for ``fwdbwd`` (``grads`` are the tensors whose gradients the call produces)."""
    if p.shape.mode != "fwdbwd":
        def run() -> Any:
            with torch.no_grad():
                return forward(x)
        return Built(run)
    dy = torch.randn(*x.shape[:-1], p.layers[-1]["d_out"], dtype=x.dtype, device=x.device)

    def run_bwd() -> None:
        forward(x).backward(dy)
    return Built(run_bwd, grads)


def trainable_copy(t: Tensor, requires_grad: bool) -> Tensor:
    """A leaf sharing ``t``'s storage that records gradients when ``requires_grad`` (the fwd+bwd modes)."""
    return t.detach().requires_grad_(requires_grad)
