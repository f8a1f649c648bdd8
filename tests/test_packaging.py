"""Installed layout: Triton kernels live in pclr.kernels and never as a top-level `kernels` package."""
import os
import subprocess
import sys


def test_kernels_not_importable_as_top_level():
    code = ("import importlib.util as u, sys\n"
            "s = u.find_spec('kernels')\n"
            "root = sys.argv[1]\n"
            "print('LEAK' if s and s.origin and s.origin.startswith(root) else 'OK')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, cwd="/",
                         check=True).stdout
    assert out.strip() == "OK"


def test_pclr_kernels_is_importable():
    import pclr.kernels

    assert os.path.basename(os.path.dirname(pclr.kernels.__file__)) == "kernels"


def test_public_api_exports_resolve():
    import pclr

    for name in pclr.__all__:
        assert getattr(pclr, name) is not None, name
    assert callable(pclr.available_backends) and callable(pclr.inject_lrp) and callable(pclr.CILTrainer)
