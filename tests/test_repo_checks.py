"""Repository-wide checks that CI runs with the tests: lint and import order, and the GPU check's CPU dry run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_clean():
    # the configuration is pyproject.toml's [tool.ruff]: pyflakes, pycodestyle, bugbear and import order
    pytest.importorskip("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    # the one-command GPU check, with everything that needs a GPU left out: its plumbing (logs, the GPU tests'
    # collection, a benchmark run, the summary against the targets) must work on a CPU machine
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "gpu-check"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu_check.log", "pytest.log", "bench.json", "summary.md"):
        assert (out / name).is_file(), f"{name} missing: {sorted(p.name for p in out.iterdir())}"
    summary = (out / "summary.md").read_text()
    assert "| fwd |" in summary and "Targets:" in summary
    assert "tests collected" in (out / "pytest.log").read_text()
