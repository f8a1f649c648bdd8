"""The providers pclr is compared against: the base Linear (the floor), the authors' formulation, a dense masked gate,
PEFT LoRA and vLLM's punica kernels. Each runs on the same :class:`~pclr.bench.problems.Problem` as pclr.

peft and vLLM are imported when a run first asks for them (importing either takes seconds and pulls in transformers;
``pclr bench --help`` must not pay for that), then remembered.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.bench.models import LORA_TARGETS, replace_linears, tiny_llama
from pclr.bench.paper import PaperLRPLinear, cosine_scores, paper_gate, paper_linear
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
    no_route,
    trainable_copy,
)
from pclr.bench.shapes import ALPHA


class BaseLinear(Provider):
    name = "base"
    summary = "F.linear(x, W): x·Wᵀ on cuBLAS, the floor every ratio is taken against"
    modes = LINEAR | MODEL
    not_supported = {"gate": "no gate: the base Linear is the floor of the linear modes only"}
    cost = "base"

    def build(self, p: Problem, opts: RunOptions) -> Built:
        fwdbwd = p.shape.mode == "fwdbwd"
        x = trainable_copy(p.x, fwdbwd)
        forward = layer_chain(p, lambda inp, layer, _: F.linear(inp, layer["weight"], layer["bias"]), no_route)
        return make_fn(p, forward, [x] if fwdbwd else [], x)

    def build_model(self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    opts: RunOptions) -> nn.Module:
        model = tiny_llama(cfg, device, dtype)
        model.enable_input_require_grads()  # backward to the inputs only: the floor of any adapter's training
        return model

    def model_note(self, mode: str, cfg: dict[str, Any]) -> str:
        return "frozen model, backward to the inputs only (no adapter): the floor" if mode == "train" else ""


class Paper(Provider):
    name = "paper"
    summary = ("the PCLR authors' formulation: A stored [d_in, n], cosine gate recomputed inside every linear and "
               "summed over the batch (one route for the whole batch), torch.matmul((x @ A[:, idx]) * mask, B[idx])")
    modes = KERNEL | {"train"}
    not_supported = {"serve": "routes the whole batch as one task: a mixed-task batch cannot be served per sample"}

    def build(self, p: Problem, opts: RunOptions) -> Built:
        if p.shape.mode == "gate":
            return Built(lambda: paper_gate(p.query, p.keys, p.shape.r))
        fwdbwd = p.shape.mode == "fwdbwd"
        x = trainable_copy(p.x, fwdbwd)
        grads: list[Tensor] = [x] if fwdbwd else []
        params = []
        for layer in p.layers:  # the authors' layout, converted once outside the timed region
            A = layer["A_m"].t().contiguous().requires_grad_(fwdbwd)
            B = layer["B_m"].detach().clone().requires_grad_(fwdbwd)
            A_s = None if layer["A_s"] is None else layer["A_s"].t().contiguous()
            params.append(dict(layer, A=A, B=B, A_s_cols=A_s))
            grads += [A, B] if fwdbwd else []

        def linear(inp: Tensor, layer: dict[str, Any], route: Any) -> Tensor:
            return paper_linear(inp, layer["weight"], layer["bias"], layer["A"], layer["B"], layer["A_s_cols"],
                                layer["B_s"], p.query, p.keys, p.shape.r, p.beta_m, p.beta_s)
        q = replace(p, layers=params)
        return make_fn(q, layer_chain(q, linear, no_route), grads, x)

    def build_model(self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    opts: RunOptions) -> nn.Module:
        model = tiny_llama(cfg, device, dtype)
        d, n, r, n_s = cfg["hidden"], cfg["n"], cfg["r"], cfg["n_s"]
        for layer in model.model.layers:
            keys = [F.normalize(torch.randn(n, d, device=device), dim=-1)]
            replace_linears(layer, lambda _, lin, keys=keys: PaperLRPLinear(lin, keys, n, r, n_s))
        return model

    def model_note(self, mode: str, cfg: dict[str, Any]) -> str:
        return "one route per batch, gate recomputed in every linear"


class Dense(Provider):
    name = "dense"
    summary = "what a naive user writes: x·A_mᵀ over all n experts, times a dense [B, n] masked gate, then ·B_m"
    modes = KERNEL
    not_supported = {m: "a formulation of one linear, not built into a model" for m in MODEL}

    def build(self, p: Problem, opts: RunOptions) -> Built:
        """All n experts computed for every token, then a dense [B, n] gate zeroes the unchosen ones."""
        n = p.shape.n
        if p.shape.mode == "gate":
            def gate_only() -> Tensor:
                s = cosine_scores(p.query, p.keys)
                idx = s.topk(p.shape.r, dim=-1).indices
                return torch.zeros_like(s).scatter_(1, idx, 1.0)
            return Built(gate_only)

        def dense_gate() -> Tensor:
            return torch.zeros(p.shape.B, n, device=p.device).scatter_(1, p.idx.long(), p.val) * p.beta_m

        fwdbwd = p.shape.mode == "fwdbwd"
        x = trainable_copy(p.x, fwdbwd)
        grads: list[Tensor] = [x] if fwdbwd else []
        params = []
        for layer in p.layers:
            A_m, B_m = (t.detach().clone().requires_grad_(fwdbwd) for t in (layer["A_m"], layer["B_m"]))
            params.append(dict(layer, A_m=A_m, B_m=B_m))
            grads += [A_m, B_m] if fwdbwd else []

        def linear(inp: Tensor, layer: dict[str, Any], g: Tensor) -> Tensor:
            y = F.linear(inp, layer["weight"], layer["bias"])
            s = (inp @ layer["A_m"].t()) * g.to(inp.dtype).unsqueeze(1)  # [B, L, n]: n-wide, mostly zeros
            y = y + s @ layer["B_m"]
            if layer["A_s"] is not None:
                y = y + (inp @ layer["A_s"].t()) @ layer["B_s"] * p.beta_s
            return y
        q = replace(p, layers=params)
        return make_fn(q, layer_chain(q, linear, dense_gate), grads, x)


def _peft_linear(peft: Any, weight: Tensor, bias: Optional[Tensor], R: int, alpha: float) -> nn.Module:
    """A one-Linear module (weight [d_out, d_in] frozen) with a PEFT LoRA of rank R whose B is non-zero."""
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                                 dtype=weight.dtype)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x)

    m = One()
    with torch.no_grad():
        m.lin.weight.copy_(weight)
    m.requires_grad_(False)
    conf = peft.LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"])
    m = peft.inject_adapter_in_model(conf, m)
    with torch.no_grad():  # PEFT starts B at zero; a trained adapter is not zero
        for name, t in m.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.01)
    return m.to(weight.dtype)


class PeftLora(Provider):
    name = "peft-lora"
    summary = "a PEFT LoRA layer of rank R = n_s + r on the same weight: one adapter, no routing (same dtype)"
    modes = LINEAR | MODEL
    not_supported = {"gate": "PEFT LoRA has no gate"}
    cost = "lora"

    def _availability(self) -> Optional[str]:
        try:
            self._peft = importlib.import_module("peft")
        except ImportError as exc:
            return f"peft is not installed ({exc})"
        return None

    def build(self, p: Problem, opts: RunOptions) -> Built:
        fwdbwd = p.shape.mode == "fwdbwd"
        mods = [_peft_linear(self._peft, layer["weight"], layer["bias"], p.shape.R, ALPHA) for layer in p.layers]
        x = trainable_copy(p.x, fwdbwd)
        grads = [x] + [t for m in mods for t in m.parameters() if t.requires_grad] if fwdbwd else []
        q = replace(p, layers=[dict(layer, mod=m) for layer, m in zip(p.layers, mods, strict=True)])
        return make_fn(q, layer_chain(q, lambda inp, layer, _: layer["mod"](inp), no_route), grads, x)

    def build_model(self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    opts: RunOptions) -> nn.Module:
        model = tiny_llama(cfg, device, dtype)
        conf = self._peft.LoraConfig(r=cfg["n_s"] + cfg["r"], lora_alpha=ALPHA, lora_dropout=0.0,
                                     target_modules=list(LORA_TARGETS))
        with warnings.catch_warnings():  # a transformers deprecation raised inside peft, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            return self._peft.get_peft_model(model, conf, autocast_adapter_dtype=False)  # same dtype as the others

    def model_note(self, mode: str, cfg: dict[str, Any]) -> str:
        if mode == "train":
            return f"one LoRA of rank R = {cfg['n_s'] + cfg['r']} for every sample"
        return "one adapter for every sample (no per-sample routing)"


class Punica(Provider):
    name = "punica"
    summary = ("vLLM's punica bgmv_shrink/bgmv_expand with each sample's gathered rows as its adapter, when vLLM is "
               "importable (else skipped)")
    modes = frozenset({"fwd", "decode", "layer"})
    not_supported = {"gate": "punica has no gate", "fwdbwd": "punica kernels are inference-only (no backward)",
                     "train": "punica kernels are inference-only (no backward)",
                     "serve": "punica kernels are not wired into a model here"}
    _shrink: Callable[..., Any]
    _expand: Callable[..., Any]

    def _availability(self) -> Optional[str]:
        # the kernels moved between vLLM releases: the package of the current one first, then the older modules
        try:
            try:
                ops = importlib.import_module("vllm.lora.ops.triton_ops")
                self._shrink, self._expand = ops.bgmv_shrink, ops.bgmv_expand
            except ImportError:
                self._shrink = importlib.import_module("vllm.lora.ops.bgmv_shrink").bgmv_shrink
                self._expand = importlib.import_module("vllm.lora.ops.bgmv_expand").bgmv_expand
        except Exception as exc:  # vLLM can fail to import for many reasons; each is a reason, not a crash
            return f"vLLM punica (bgmv) kernels not importable: {type(exc).__name__}: {exc}"
        return None

    def build(self, p: Problem, opts: RunOptions) -> Built:
        """Each sample's gathered rows as its own adapter (decode-style, one adapter index per token)."""
        if p.device.type != "cuda":
            raise Skip("punica kernels need a CUDA device")
        lora_idx = torch.arange(p.shape.B, device=p.device).repeat_interleave(p.shape.L)
        shrink, expand = self._shrink, self._expand

        def linear(inp: Tensor, layer: dict[str, Any], route: Any) -> Tensor:
            idx = p.idx.long()
            A_eff = layer["A_m"][idx]  # [B, r, d_in]: the routing changes per batch, so the gather is part of the work
            B_eff = layer["B_m"][idx]
            if layer["A_s"] is not None:
                A_eff = torch.cat([layer["A_s"].expand(p.shape.B, -1, -1), A_eff], 1)
                B_eff = torch.cat([layer["B_s"].expand(p.shape.B, -1, -1), B_eff], 1)
            x2 = inp.reshape(-1, inp.shape[-1])
            y = F.linear(x2, layer["weight"], layer["bias"])
            s = torch.zeros(x2.shape[0], A_eff.shape[1], dtype=torch.float32, device=x2.device)
            shrink(x2, A_eff.contiguous(), s, lora_idx, p.beta_m)
            expand(s.to(x2.dtype), B_eff.transpose(1, 2).contiguous(), y, lora_idx, True)
            return y.reshape(*inp.shape[:-1], -1)
        return make_fn(p, layer_chain(p, linear, no_route), [], p.x)


BASELINES: tuple[Provider, ...] = (BaseLinear(), Paper(), Dense(), PeftLora(), Punica())
