"""Every ``python`` code block of README.md runs as written, on a CPU, as a new user would run it.

Each block runs in a fresh interpreter from a scratch directory, with the repository on ``PYTHONPATH`` and without
``TRITON_INTERPRET`` (so CPU tensors take ``backend="auto"``'s torch backend, as on a user's machine). A block that
cannot run here (it downloads a model, or needs a GPU) is preceded in the README by an HTML comment
``<!-- readme-test: skip: <why> -->`` and is reported as skipped with that reason, never silently left out.

A block followed by a line that says it "prints" and ends in a colon, then a ``text`` block, must print those lines,
each number within 1 % of the one written (a seeded model's loss moves a little between torch and transformers
versions).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*skip:\s*(?P<reason>[^>]*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```\n"
                    r"(?:\s*^[^\n]*\bprints\b[^\n]*:\n+```text\n(?P<output>.*?)^```)?", re.DOTALL | re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _snippets():
    """(line number, code, skip reason or None) of every python block of the README."""
    with open(README, encoding="utf-8") as file:
        text = file.read()
    return [(text.count("\n", 0, match.start("code")) + 1, match.group("code"), match.group("reason"),
             match.group("output")) for match in _BLOCK.finditer(text)]


def _same_output(printed, expected):
    """The same lines, the same words, and each number within 1 % of the expected one."""
    printed, expected = printed.strip().splitlines(), expected.strip().splitlines()
    if len(printed) != len(expected):
        return False
    for got, want in zip(printed, expected, strict=True):
        if _NUMBER.sub("#", got) != _NUMBER.sub("#", want):
            return False
        if any(abs(float(a) - float(b)) > 0.01 * abs(float(b)) for a, b in
               zip(_NUMBER.findall(got), _NUMBER.findall(want), strict=True)):
            return False
    return True


SNIPPETS = _snippets()


def test_readme_has_runnable_snippets():
    assert any(reason is None for _, _, reason, _ in SNIPPETS), "no python block of README.md is run by this test"


def test_first_run_prints_what_a_newcomer_can_check():
    """The first block a reader runs says what it should print."""
    _, _, reason, output = SNIPPETS[0]
    assert reason is None and output and "True" in output


def test_output_comparison():
    assert _same_output("loss 5.55 (ln 256 = 5.55)\nok: True\n", "loss 5.56 (ln 256 = 5.55)\nok: True")
    assert not _same_output("loss 5.9 (ln 256 = 5.55)\nok: True", "loss 5.56 (ln 256 = 5.55)\nok: True")
    assert not _same_output("loss 5.56 (ln 256 = 5.55)\nok: False", "loss 5.56 (ln 256 = 5.55)\nok: True")
    assert not _same_output("ok: True", "ok: True\nshape (2, 3)")


@pytest.mark.parametrize("line, code, skip_reason, output", SNIPPETS,
                         ids=[f"README.md:{line}" for line, *_ in SNIPPETS])
def test_snippet_runs(tmp_path, line, code, skip_reason, output):
    if skip_reason is not None:
        pytest.skip(f"README.md:{line} is marked: {skip_reason}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README.md:{line} failed:\n{code}\n{result.stderr[-3000:]}"
    if output is not None:
        assert _same_output(result.stdout, output), \
            f"README.md:{line} printed:\n{result.stdout}\nbut the README says it prints:\n{output}"


def test_recipe_tables_are_copied_from_the_committed_results():
    """The README's tables of the PI recipe are the committed ``table.md`` files' own rows, never typed by hand."""
    with open(README, encoding="utf-8") as file:
        text = file.read()
    section = text[text.index("### The PI recipe"):text.index("## Training past one GPU")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Method |")
            and not line.startswith("| Seed |")]
    results = os.path.join(ROOT, "examples", "results", "cpu")
    committed = "".join(open(os.path.join(folder, "table.md"), encoding="utf-8").read()
                        for folder, _, names in os.walk(results) if "table.md" in names)
    assert rows, "no recipe table in the README"
    for row in rows:
        assert row in committed, f"README row not in any examples/results/cpu/**/table.md: {row}"
