"""The README's "Use as a library" examples run, so the README cannot rot.

Every ```python block preceded by the line `<!-- ci:example -->` is run as a script in a
fresh process (CPU; the Triton kernels through the interpreter, as in the other tests).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- ci:example -->"


def examples() -> list[tuple[int, str]]:
    """(line number, code) of every marked block."""
    text = README.read_text()
    out = []
    for m in re.finditer(re.escape(MARK) + r"\s*\n```python\n(.*?)\n```", text, re.S):
        out.append((text[:m.start()].count("\n") + 1, m.group(1)))
    return out


def test_the_readme_has_the_examples_it_promises():
    blocks = examples()
    assert len(blocks) >= 3, f"expected at least 3 marked examples, found {len(blocks)}"
    assert len(blocks) == README.read_text().count(MARK), "a marker without a python block"


@pytest.mark.parametrize("line,code", examples(), ids=lambda v: f"line{v}"
                         if isinstance(v, int) else "")
def test_readme_example_runs(line, code, tmp_path):
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README example at line {line} failed:\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip(), f"README example at line {line} printed nothing"
