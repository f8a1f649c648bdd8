"""Model-level runs: training throughput and serving latency of a small randomly initialised LLaMA with each
provider's adapter in all 7 linears of every decoder layer (nothing is downloaded).

``train``: tokens/s of forward, backward and an AdamW step on the trainable tensors, every sample routed by its own
query (mixed tasks). ``serve``: ms per decode step (one new token for every sample, KV cache on); the prompt's route is
computed once per request and reused by every new token; the prefill time goes in the row's note.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pclr.bench.provider import Provider, RunOptions, Skip
from pclr.bench.results import fill_model_ratio, model_row
from pclr.bench.shapes import DTYPES, LAYER_LINEARS
from pclr.bench.timing import synchronize, timed_steps
from pclr.routing import routing

LORA_TARGETS = LAYER_LINEARS



def _cache_keyword(model: nn.Module) -> str:
    """The KV-cache keyword of the installed transformers: ``cache`` from 5.24 on (``past_key_values`` is deprecated
    there), ``past_key_values`` before; read from the signature rather than from version numbers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _kv_cache(out: Any) -> Any:
    """The KV cache of a model output, under either name (see :func:`_cache_keyword`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values

def tiny_llama(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised LLaMA-shaped causal LM of ``cfg`` (hidden, ffn, layers, heads, vocab), frozen."""
    # imported here: loading transformers' LLaMA takes ~3.5 s, which `pclr bench --help` and the kernel modes
    # should not pay
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Skip(f"the model-level modes need transformers ({exc})") from exc
    conf = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
                       num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                       max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def replace_linears(layer: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each of the 7 LLaMA linears of a decoder layer by ``make(leaf_name, linear)``."""
    for name, mod in list(layer.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LAYER_LINEARS and isinstance(mod, nn.Linear):
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, leaf, make(leaf, mod))


def _run_provider(mode: str, provider: Provider, cfg: dict[str, Any], device: torch.device, dtype: str, label: str,
                  opts: RunOptions, run: Callable[[nn.Module], list[dict]]) -> list[dict]:
    """Build the model for ``provider`` and return ``run``'s rows, or one skipped/error row saying why not."""
    if mode == "train":
        tokens, batch = cfg["batch"] * cfg["seq"], cfg["batch"]
    else:
        tokens = batch = cfg["batch"][0]

    def failed(status: str, note: str) -> list[dict]:
        return [model_row(mode, provider, cfg, dtype, tokens, batch, status, label, note=note)]

    why = provider.mode_reason(mode) or provider.unavailable()
    if why:
        return failed("skipped", why)
    model = None
    try:
        with provider.context():
            model = provider.build_model(cfg, device, DTYPES[dtype], opts)
            return run(model)
    except Skip as exc:
        return failed("skipped", str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        return failed("oom", str(exc).splitlines()[0][:200])
    except Exception as exc:  # one broken provider must not end the run; its row says what happened
        return failed("error", f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_train(cfg: dict[str, Any], providers: Sequence[Provider], device: torch.device, dtype: str, label: str,
              opts: RunOptions) -> list[dict]:
    """Training throughput (tokens/s) of the tiny LLaMA: forward, backward and AdamW step on the trainable tensors."""
    B, L = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg["vocab"], (B, L), generator=g).to(device)
    query = torch.randn(B, cfg["hidden"], generator=g).to(device)  # one query per sample: mixed tasks

    def run(model: nn.Module, provider: Provider) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        model.train()

        def step() -> None:
            with routing(query):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        times, mem = timed_steps(step, device, 1, cfg["steps"])
        return [model_row("train", provider, cfg, dtype, B * L, B, "ok", label, note=provider.model_note("train", cfg),
                          times=times, mem=mem)]

    rows: list[dict] = []
    for provider in providers:
        rows += _run_provider("train", provider, cfg, device, dtype, label, opts, lambda m, p=provider: run(m, p))
    fill_model_ratio(rows)
    return rows


def run_serve(cfg: dict[str, Any], providers: Sequence[Provider], device: torch.device, dtype: str, label: str,
              opts: RunOptions) -> list[dict]:
    """Latency per decoded token (one decode step of the whole batch, KV cache on) for each batch size of ``cfg``,
    every sample routed to its own experts."""
    def run(model: nn.Module, provider: Provider) -> list[dict]:
        model.eval()
        out_rows = []
        for B in cfg["batch"]:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(cfg["vocab"], (B, cfg["prompt"]), generator=g).to(device)
            query = torch.randn(B, cfg["hidden"], generator=g).to(device)
            with torch.no_grad(), routing(query):
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                synchronize(device)
                prefill_ms = (time.perf_counter() - t0) * 1e3
                kw = _cache_keyword(model)
                state = {"pkv": _kv_cache(out), "tok": out.logits[:, -1:].argmax(-1)}

                def step(state: dict[str, Any] = state) -> None:
                    o = model(input_ids=state["tok"], use_cache=True, **{kw: state["pkv"]})
                    state["pkv"], state["tok"] = _kv_cache(o), o.logits[:, -1:].argmax(-1)
                times, mem = timed_steps(step, device, 1, cfg["steps"])
            note = f"prefill {cfg['prompt']} tokens: {prefill_ms:.3g} ms"
            extra = provider.model_note("serve", cfg)
            out_rows.append(model_row("serve", provider, cfg, dtype, B, B, "ok", label,
                                      note=f"{note}; {extra}" if extra else note, times=times, mem=mem))
        return out_rows

    rows: list[dict] = []
    for provider in providers:
        rows += _run_provider("serve", provider, cfg, device, dtype, label, opts, lambda m, p=provider: run(m, p))
    fill_model_ratio(rows)
    return rows
