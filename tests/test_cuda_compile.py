"""Build checks of the CUDA extension without a GPU (CPU-only torch is enough).

* every csrc/kernels/*.cu through nvcc for sm_80 and sm_90 (one nvcc call per file, both architectures), with
  ``-Xptxas -v``: no kernel spills registers on either architecture, and none needs more than the 48 KB of static
  shared memory a launch gets without an opt-in;
* csrc/*.cpp through the host compiler against the installed torch headers (ops.cpp includes no CUDA header that a
  CPU-only torch lacks);
* the objects linked into a shared library that a fresh Python process loads with ``torch.ops.load_library``: all
  launchers resolve, the schemas parse, the ops register next to the Python ``pclr::*`` custom ops, and their meta
  implementations give the right shapes.

They catch syntax, template, link and registration errors on every commit; whether the kernels compute the right
thing is for the GPU tests (tests/test_cuda_backend.py, marked ``gpu``).
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from pclr.options import DECODE_MAX_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = sorted(glob.glob(os.path.join(CSRC, "kernels", "*.cu")))
HOST_SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
ARCHS = ("80", "90")
# torch builds extensions with these defined: the kernels must not rely on implicit half/bf16 conversions.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
# the decode bound reaches the sources as setup.py passes it: from pclr.options, to both compilers
DECODE_DEFINE = f"-DPCLR_DECODE_MAX_TOKENS={DECODE_MAX_TOKENS}"


def _cuda_home():
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script: prefer CUDA_HOME, then the usual install prefix
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                     os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
            if home and os.path.isdir(os.path.join(home, "include")):
                return nvcc, home
        return nvcc, None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc"), home
    return None, None


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _torch_flags():
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return includes, abi, os.path.join(os.path.dirname(torch.__file__), "lib")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    return proc.returncode, " ".join(cmd), proc.stderr


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile every source once (two at a time: CI has two cores); returns {source: (rc, cmd, stderr, obj)}."""
    out = tmp_path_factory.mktemp("pclr_C")
    nvcc, _ = _cuda_home()
    cxx = _cxx()
    jobs = {}
    if nvcc is not None:
        gencode = []
        for arch in ARCHS:  # both architectures in one nvcc call: the front end runs once
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        for src in KERNELS:
            obj = str(out / (os.path.basename(src) + ".o"))
            # -O1 only lowers the host compiler's effort; ptxas optimises device code at its default (-O3), as in
            # the real build, so the register and spill counts below are the built kernels' own
            jobs[src] = ([nvcc, "-std=c++17", "-O1", "-Xcompiler", "-fPIC", f"-I{CSRC}", *TORCH_NVCC_DEFINES,
                          DECODE_DEFINE, *gencode, "-Xptxas", "-v", "-c", src, "-o", obj], obj)
    if cxx is not None:
        includes, abi, _ = _torch_flags()
        for src in HOST_SOURCES:
            obj = str(out / (os.path.basename(src) + ".o"))
            # recent torch headers need C++20 (torch's own extension builds pass it); older ones compile with it too
            jobs[src] = ([cxx, "-std=c++20", "-O0", "-fPIC", "-Wall", "-Werror=return-type", abi, DECODE_DEFINE,
                          *includes, "-c", src, "-o", obj], obj)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {src: pool.submit(_run, cmd) for src, (cmd, _) in jobs.items()}
        results = {src: (*f.result(), jobs[src][1]) for src, f in futures.items()}
    return {"dir": out, "results": results, "nvcc": nvcc, "cxx": cxx}


def _check(build, source):
    if source not in build["results"]:
        pytest.skip("no compiler for this source (nvcc not found for .cu files, no g++/c++/clang++ for .cpp)")
    rc, cmd, stderr, _ = build["results"][source]
    assert rc == 0, f"{os.path.basename(source)} does not compile:\n{cmd}\n{stderr[-6000:]}"
    ours = [ln for ln in stderr.splitlines() if "warning" in ln and CSRC in ln]
    assert not ours, "warnings in csrc:\n" + "\n".join(ours)


def test_setup_reads_the_python_decode_bound():
    # setup.py's reader, run on its own (importing setup.py would run the build)
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "decode_max_tokens")
    namespace = {"ast": ast, "os": os, "ROOT": ROOT}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102 (our own code)
    assert namespace["decode_max_tokens"]() == DECODE_MAX_TOKENS
    with open(os.path.join(CSRC, "pclr_ops.h")) as f:
        header = f.read()
    assert "constexpr int kDecodeMaxTokens = PCLR_DECODE_MAX_TOKENS;" in header


def test_sources_exist():
    assert KERNELS, "csrc/kernels/ holds no .cu files"
    assert os.path.join(CSRC, "ops.cpp") in HOST_SOURCES
    assert os.path.exists(os.path.join(CSRC, "pclr_ops.h"))


@pytest.mark.parametrize("source", KERNELS, ids=[os.path.basename(k) for k in KERNELS])
def test_nvcc_compiles_kernel(build, source):
    if build["nvcc"] is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile-check the CUDA kernels")
    _check(build, source)


def ptxas_entries(log: str) -> list[tuple[str, str, int, int, int]]:
    """(mangled kernel, sm_XX, registers, spill bytes stored + loaded, static shared memory bytes) of every entry
    function in an ``nvcc -Xptxas -v`` log (one block per entry and architecture)."""
    parts = re.split(r"Compiling entry function '([^']+)' for '(sm_\d+)'", log)
    out = []
    for name, arch, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        regs = re.search(r"Used (\d+) registers", body)
        assert regs, f"no register count for {name} ({arch}) in the ptxas log"
        spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", body))
        smem = re.search(r"(\d+) bytes smem", body)
        out.append((name, arch, int(regs.group(1)), spills, int(smem.group(1)) if smem else 0))
    return out


def test_ptxas_entries_parser():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\nptxas info    : Function properties for _Z1kv\n"
           "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 16 bytes smem, 496 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\nptxas info    : Function properties for _Z1kv\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 496 bytes cmem[0]\n")
    assert ptxas_entries(log) == [("_Z1kv", "sm_80", 40, 12, 16), ("_Z1kv", "sm_90", 32, 0, 0)]


@pytest.mark.parametrize("source", KERNELS, ids=[os.path.basename(k) for k in KERNELS])
def test_nvcc_kernels_do_not_spill(build, source):
    if build["nvcc"] is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile-check the CUDA kernels")
    _check(build, source)
    entries = ptxas_entries(build["results"][source][2])
    assert {arch for _, arch, *_ in entries} == {f"sm_{a}" for a in ARCHS}, "ptxas -v reported no kernel for an arch"
    bad = [e for e in entries if e[3] > 0 or e[4] > 48 * 1024]
    assert not bad, "kernels that spill or exceed 48 KB of static shared memory (name, arch, regs, spills, smem):\n" + \
        "\n".join(map(str, bad))


@pytest.mark.parametrize("source", HOST_SOURCES, ids=[os.path.basename(s) for s in HOST_SOURCES])
def test_host_source_compiles(build, source):
    _check(build, source)


LOAD_CHECK = textwrap.dedent("""
    import sys, torch
    import pclr.backends.cuda, pclr.backends.reference  # the Python pclr::* ops first, as in a real import
    torch.ops.load_library(sys.argv[1])
    ops = torch.ops.pclr
    m = lambda *s, dt=torch.float32: torch.empty(*s, device="meta", dtype=dt)
    T, din, dout, n, B, r, ns = 7, 16, 12, 10, 3, 4, 2
    i32 = torch.int32
    y = ops.cuda_lrp_forward(m(T, din), m(dout, din), None, m(n, din), m(n, dout), m(B, r, dt=i32), m(B, r),
                             m(ns, din), m(ns, dout), m(T, dt=i32), 2.0, 0.5, 0)
    assert tuple(y.shape) == (T, dout), y.shape
    g = ops.cuda_lrp_backward(m(T, dout), m(T, din), m(dout, din), m(n, din), m(n, dout), m(B, r, dt=i32), m(B, r),
                              m(ns, din), m(ns, dout), m(T, dt=i32), None, 2.0, 0.5, 0, True, True, False, True)
    assert [tuple(t.shape) for t in g] == [(T, din), (n, din), (n, dout), (0,), (ns, din), (ns, dout)], g
    g = ops.cuda_lrp_backward(m(T, dout), m(T, din), m(dout, din), m(n, din), m(n, dout), m(B, r, dt=i32), m(B, r),
                              None, None, m(T, dt=i32), None, 2.0, 0.5, 0, False, True, True, False, 4096)
    assert [tuple(t.shape) for t in g] == [(0,), (n, din), (n, dout), (B, r), (0,), (0,)], g  # explicit workspace cap
    idx, val = ops.cuda_gate([m(B, 8), m(B, 5)], [m(n, 8), m(n, 5)], [1.0, 0.25], 3, None, False, True)
    assert tuple(idx.shape) == (B, 3) and idx.dtype == torch.int32 and val.dtype == torch.float32
    assert hasattr(ops, "cuda_lrp_linear") and hasattr(ops, "reference_lrp_linear")
    print("ok")
""")


def test_extension_links_loads_and_registers(build, tmp_path):
    results = build["results"]
    if build["nvcc"] is None or build["cxx"] is None:
        pytest.skip("needs nvcc and a host C++ compiler")
    if any(rc != 0 for rc, *_ in results.values()):
        pytest.fail("a source does not compile (see the compile tests)")
    _, home = _cuda_home()
    cudart_dirs = [d for d in (os.path.join(home or "", "lib64"), os.path.join(home or "", "lib"),
                               os.path.join(home or "", "targets", "x86_64-linux", "lib"))
                   if os.path.exists(os.path.join(d, "libcudart.so"))]
    if not cudart_dirs:
        pytest.skip(f"libcudart.so not found under CUDA home {home!r}: cannot link the test library")
    _, _, torch_lib = _torch_flags()
    so = str(tmp_path / "_C.so")
    objs = [obj for *_, obj in results.values()]
    rc, cmd, err = _run([build["cxx"], "-shared", "-o", so, *objs, f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10",
                         f"-L{cudart_dirs[0]}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cudart_dirs[0]}"])
    assert rc == 0, f"link failed:\n{cmd}\n{err[-6000:]}"
    # the loader resolves every symbol at load time (ctypes uses RTLD_NOW): a launcher declared in pclr_ops.h but
    # defined nowhere fails here; Python's own symbols come from the running interpreter, as for any extension.
    proc = subprocess.run([sys.executable, "-c", LOAD_CHECK, so], capture_output=True, text=True, timeout=300, check=False,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-6000:]
