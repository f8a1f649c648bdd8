"""Build the CUDA extension ``pclr._C`` in place, without pip or setuptools (for a machine that has torch and nvcc
but no network): compiles csrc/ with torch's JIT builder and copies the library next to pclr/__init__.py.

Flags match setup.py's (``PCLR_CUDA_ARCHS``, default ``90`` here; ``MAX_JOBS`` ninja jobs).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import time

from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pclr.options import DECODE_MAX_TOKENS  # noqa: E402  (needs ROOT on the path)


def main() -> None:
    archs = [a.strip() for a in os.environ.get("PCLR_CUDA_ARCHS", "90").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    build_dir = os.path.join(ROOT, "build", "jit")
    os.makedirs(build_dir, exist_ok=True)
    define = f"-DPCLR_DECODE_MAX_TOKENS={DECODE_MAX_TOKENS}"
    t0 = time.perf_counter()
    mod = load(name="_C", sources=sources, extra_include_paths=[os.path.join(ROOT, "csrc")],
               extra_cflags=["-O3", define], extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", define,
                                                               *gencode],
               build_directory=build_dir, verbose=True)
    target = os.path.join(ROOT, "pclr", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy(mod.__file__, target)
    print(f"built {target} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
