"""Every ```python block of README.md and docs/*.md runs, as written, and prints what it shows.

The blocks of one document run in order in one namespace, on the 8 CPU devices of conftest.py,
so a block may use what an earlier block of the same page defined. Three conventions:

- A block whose first line is ``# NAME.py`` is a file: it is written to a fresh folder as NAME.py
  and run there as a script, ``python NAME.py``, or with the command given on the line just
  before the block as ``<!-- run as: python NAME.py ARGS -->``.
- A ``print(...)`` line's expected output is its trailing comment, or the comment lines right
  below it (``# [ 1.  -2.   0.5]``); the test checks that the output contains it, whitespace
  aside. A trailing comment that is prose rather than output goes on the line above instead.
- ``<!-- not run: REASON -->`` on the line just before a block leaves it out, and says why. Use
  it only for what cannot run here (a Cloud TPU command, say); a block a reader is meant to copy
  runs.
"""

import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest

import tpustrat as ts

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
MARK = re.compile(r"<!--\s*(not run|run as):\s*(.*?)\s*-->")


def _document(path: pathlib.Path):
    return pytest.param(path, id=str(path.relative_to(ROOT)))


class Block(NamedTuple):
    """One ```python block: where it starts, its code, and how the page asks to run it."""

    line: int
    code: str
    mark: str | None  # "not run" or "run as"
    argument: str  # the mark's reason or command


def python_blocks(path: pathlib.Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        i += 1
        while lines[i].strip() != "```":
            i += 1
        code = "\n".join(lines[start + 1 : i]) + "\n"
        match = MARK.fullmatch(lines[start - 1].strip()) if start else None
        mark, argument = match.groups() if match else (None, "")
        blocks.append(Block(start + 1, code, mark, argument))
        i += 1
    return blocks


def expected_outputs(code: str) -> list[str]:
    """What the block's ``print`` lines say they print (see the module docstring)."""
    expected, lines = [], code.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        _, _, comment = line.partition(")  # ")
        below = []
        for following in lines[i + 1 :]:
            text = following.strip()
            if not text.startswith("# "):
                break
            below.append(text[2:])
        expected.extend(text for text in [comment, *below] if text)
    return expected


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _run_file(block: Block, folder: pathlib.Path) -> str:
    name = block.code.splitlines()[0][2:].strip()
    (folder / name).write_text(block.code)
    command = shlex.split(block.argument) if block.mark == "run as" else ["python", name]
    if command[:2] != ["python", name]:
        raise ValueError(f"'run as' must run this block's file, 'python {name} ...'; got {command}")
    done = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ,  # conftest's XLA_FLAGS: 8 CPU devices
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _run_in(block: Block, namespace: dict, label: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block.code, label, "exec"), namespace)
    return output.getvalue()


@pytest.mark.parametrize("path", [_document(path) for path in DOCUMENTS])
def test_python_blocks_run_as_written(path, tmp_path):
    namespace = {"__name__": "__docs__"}
    for block in python_blocks(path):
        label = f"{path.relative_to(ROOT)}:{block.line}"
        if block.mark == "not run":
            assert block.argument, f"{label}: 'not run' needs a reason"
            continue
        if re.fullmatch(r"# \w+\.py", block.code.splitlines()[0]):
            output = _run_file(block, tmp_path)
        else:
            assert block.mark is None, f"{label}: 'run as' is only for file blocks (# NAME.py)"
            output = _run_in(block, namespace, label)
        for expected in expected_outputs(block.code):
            assert _squeeze(expected) in _squeeze(output), (
                f"{label} should print {expected!r}; it printed:\n{output}"
            )


def test_parser_finds_the_readme_blocks():
    """The README's eight Python blocks are found, so the test above cannot pass on none."""
    assert len(python_blocks(ROOT / "README.md")) == 8


def test_quickstart_example_is_the_readme_quickstart():
    """examples/quickstart.py is the README's first block, ending on the same line."""
    quickstart = python_blocks(ROOT / "README.md")[0].code.strip().splitlines()
    example = (ROOT / "examples" / "quickstart.py").read_text().strip().splitlines()
    assert example[-1] == quickstart[-1]


def test_api_reference_documents_every_public_name():
    """docs/api.md renders each name of ``ts.__all__`` (and of ``tpustrat.testing``)."""
    documented = set(re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), re.M))
    public = {f"tpustrat.{name}" for name in ts.__all__ if name != "testing"}
    public |= {f"tpustrat.testing.{name}" for name in ts.testing.__all__}
    assert sorted(public - documented) == [], "add these to docs/api.md"
    assert sorted(documented - public) == [], "docs/api.md names what is not public"
