"""Build script for pclr.

The package is pure Python unless the optional CUDA extension ``pclr._C`` can be built:

* ``PCLR_SKIP_CUDA_BUILD=1``  never build it (pure-Python install; the triton/reference backends still work).
* ``PCLR_FORCE_CUDA_BUILD=1`` build it or fail loudly.
* otherwise it is built when nvcc and a CUDA-enabled torch are importable *in the build environment*; use
  ``pip install --no-build-isolation -e .`` so the build sees your installed torch (the flash-attention way).
* ``PCLR_CUDA_ARCHS``         semicolon list of SM versions (default ``80;90``).
* ``MAX_JOBS``                ninja parallelism (default: derived from CPU cores and free memory).

``kernels/`` (Triton) is installed as ``pclr.kernels``: the top-level name ``kernels`` belongs to another
PyPI package and must never be shadowed.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["pclr", "pclr.backends", "pclr.backends.triton", "pclr.bench", "pclr.cil", "pclr.demo", "pclr.demo.data",
            "pclr.demo.models", "pclr.models", "pclr.kernels"]
PACKAGE_DIR = {"pclr": "pclr", "pclr.kernels": "kernels"}


def decode_max_tokens() -> int:
    """pclr.options.DECODE_MAX_TOKENS, read from the source (the build must not import pclr, or torch with it)."""
    with open(os.path.join(ROOT, "pclr", "options.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DECODE_MAX_TOKENS" for t in node.targets):
            return int(ast.literal_eval(node.value))
    raise RuntimeError("pclr/options.py defines no DECODE_MAX_TOKENS")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _max_jobs() -> str:
    """ninja jobs: each nvcc process can take ~4 GB, so bound by memory as well as by cores (flash-attn rule)."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        free_gb = 8.0
    return str(max(1, min(cores, int(free_gb / 4))))


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for pclr._C, or ([], {}) with a reason printed when it is skipped."""
    force, skip = _flag("PCLR_FORCE_CUDA_BUILD"), _flag("PCLR_SKIP_CUDA_BUILD")
    if skip and not force:
        print("pclr: PCLR_SKIP_CUDA_BUILD=1, installing without the CUDA extension", file=sys.stderr)
        return [], {}
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001  torch absent from the (isolated) build environment
        reason = f"torch is not importable at build time ({exc}); use --no-build-isolation to build pclr._C"
    else:
        if torch.version.cuda is None:
            reason = "the installed torch has no CUDA support"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            reason = "nvcc / CUDA_HOME not found"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    if reason is None and not any(s.endswith(".cpp") for s in sources):
        reason = "csrc/ holds no sources"
    if reason is not None:
        if force:
            raise RuntimeError(f"PCLR_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
        print(f"pclr: building without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}

    os.environ["MAX_JOBS"] = _max_jobs()
    archs = [a.strip() for a in os.environ.get("PCLR_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    # The kernels use bf16 tensor-core MMA (WMMA bf16 fragments), which needs sm_80 or newer.
    bad = [a for a in archs if not (a.rstrip("a").isdigit() and int(a.rstrip("a")) >= 80)]
    if bad:
        raise RuntimeError(f"PCLR_CUDA_ARCHS entries must be SM versions >= 80 (e.g. '80;90;90a'), got {bad}")
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # No -std flag: torch's BuildExtension picks the C++ standard its headers need (c++17 or c++20).
    # The decode bound is the Python one, so dispatch and the kernels agree on which calls are decode-sized.
    decode = f"-DPCLR_DECODE_MAX_TOKENS={decode_max_tokens()}"
    ext = CUDAExtension(
        name="pclr._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", decode],
            # no --use_fast_math: the gate's cosine/top-r and the fp32 path are compared against the reference
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", decode, *gencode],
        },
    )

    class _Build(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:
                if force:
                    raise
                warnings.warn(f"pclr: the CUDA extension failed to build ({exc}); installing pure Python", stacklevel=2)

    return [ext], {"build_ext": _Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
