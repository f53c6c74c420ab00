"""Every ``python`` code block of README.md runs as written, on a CPU, as a new user would run it.

Each block runs in a fresh interpreter from a scratch directory, with the repository on ``PYTHONPATH`` and without
``TRITON_INTERPRET`` (so CPU tensors take ``backend="auto"``'s torch backend, as on a user's machine). A block that
cannot run here (it downloads a model, or needs a GPU) is preceded in the README by an HTML comment
``<!-- readme-test: skip: <why> -->`` and is reported as skipped with that reason, never silently left out.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*skip:\s*(?P<reason>[^>]*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```",
                    re.DOTALL | re.MULTILINE)


def _snippets():
    """(line number, code, skip reason or None) of every python block of the README."""
    with open(README, encoding="utf-8") as file:
        text = file.read()
    return [(text.count("\n", 0, match.start("code")) + 1, match.group("code"), match.group("reason"))
            for match in _BLOCK.finditer(text)]


SNIPPETS = _snippets()


def test_readme_has_runnable_snippets():
    assert any(reason is None for _, _, reason in SNIPPETS), "no python block of README.md is run by this test"


@pytest.mark.parametrize("line, code, skip_reason", SNIPPETS, ids=[f"README.md:{line}" for line, *_ in SNIPPETS])
def test_snippet_runs(tmp_path, line, code, skip_reason):
    if skip_reason is not None:
        pytest.skip(f"README.md:{line} is marked: {skip_reason}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README.md:{line} failed:\n{code}\n{result.stderr[-3000:]}"
