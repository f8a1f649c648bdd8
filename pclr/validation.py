"""Input checks shared by the functional API and the modules.

Shape/dtype/device checks are free (no host sync) and always run. Value checks (index ranges, NaN queries) need a
device→host sync, so they run only in *validation mode*:

* ``PCLR_VALIDATE=1`` / ``pclr.set_validation(True)``  always on (eager GPU debugging);
* ``PCLR_VALIDATE=0`` / ``pclr.set_validation(False)`` always off;
* default: on for CPU tensors, off for GPU tensors; always off while ``torch.compile`` traces or a CUDA graph
  is being captured (a sync there would break the graph).

With validation off nothing is read outside the pool: the gate never emits an index outside [0, n), and the
Triton ``lrp_linear`` kernels mask every gather of a pool row by 0 <= idx < n, so an out-of-range idx contributes
nothing to y or to any gradient (exactly as if that expert were dropped from the route). Validation mode turns
such an idx, and NaN / Inf queries, keys or weights of the gate, into an error naming the argument instead.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_mode: bool | None = None
_warned_frozen_base = False


def set_validation(enabled: bool | None) -> None:
    """Force value checks on (True) or off (False); None restores the default (env, then device rule)."""
    global _mode
    _mode = enabled


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def validation_enabled(device: torch.device) -> bool:
    """Whether value checks (with a host sync) run for tensors on ``device``."""
    if _capturing():
        return False
    if _mode is not None:
        return _mode
    env = os.environ.get("PCLR_VALIDATE", "").strip()
    if env:
        return env not in ("0", "false", "False", "no")
    return device.type == "cpu"


def check_tensor(name: str, t, *, ndim: int | None = None, shape: Sequence | None = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, device: torch.device | None = None,
                 expected: str = "") -> None:
    """Raise TypeError/ValueError naming ``name`` and the expected shape/dtype when ``t`` does not conform.

    ``shape`` entries may be None (any size). ``expected`` is the human description, e.g. "[n, d_in]".
    """
    desc = expected or (f"[{', '.join('*' if s is None else str(s) for s in shape)}]" if shape else "")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {desc}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {desc}, got shape {tuple(t.shape)}")
    if shape is not None:
        for dim, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} must have shape {desc}, got {tuple(t.shape)} (dim {dim}: {got} != {want})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}; move it to {device}")


def check_finite(name: str, t: torch.Tensor, consequence: str) -> None:
    """Raise ValueError naming ``name`` when ``t`` holds NaN or Inf (a host sync: validation mode only)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or Inf: {consequence}")


def warn_frozen_base(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Warn (once per process) when the base ``weight`` / ``bias`` asks for a gradient: the LRP ops treat the base
    as frozen and compute no gradient for it, which would otherwise go unnoticed (its .grad stays None)."""
    global _warned_frozen_base
    if _warned_frozen_base or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    asked = [n for n, t in (("weight", weight), ("bias", bias)) if t is not None and t.requires_grad]
    if asked:
        _warned_frozen_base = True
        warnings.warn(f"{' and '.join(asked)} require grad, but the base linear is frozen in pclr's LRP ops: no "
                      "gradient is computed for it (train the pool A_m / B_m, or call .requires_grad_(False) on "
                      "the base to silence this warning)", UserWarning, stacklevel=3)
