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

import ast
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


def test_parser_finds_every_python_block():
    """Every ```python fence is parsed as a block, so the test above cannot pass on none."""
    for path in DOCUMENTS:
        fences = [line for line in path.read_text().splitlines() if line.strip() == "```python"]
        assert len(python_blocks(path)) == len(fences), path.name
    assert python_blocks(ROOT / "README.md"), "the README's quickstart is a ```python block"


def _prose(path: pathlib.Path) -> list[str]:
    """The lines of a page outside code blocks and tables, stripped."""
    lines, in_code = [], False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and not line.lstrip().startswith("|"):
            lines.append(line.strip())
    return lines


def test_readme_is_the_front_door():
    """The README is short and links every page of docs/ and the benchmark records."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    pages = [ROOT / "docs" / "index.md", ROOT / "docs" / "api.md"]
    pages += [ROOT / "docs" / "development.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
    links = set(re.findall(r"\]\(([^)#]+)", text))
    wanted = {str(page.relative_to(ROOT)) for page in pages} | {"benchmarks/README.md"}
    assert sorted(wanted - links) == [], "link these from the README"


def test_readme_says_nothing_twice():
    """Below its introduction, no README prose line is also a line of docs/: it lives once."""
    readme = _prose(ROOT / "README.md")
    body = readme[next(i for i, line in enumerate(readme) if line.startswith("## ")) :]
    docs = {line for path in DOCUMENTS[1:] for line in _prose(path)}
    assert sorted(line for line in body if len(line) > 40 and line in docs) == []


HISTORY = re.compile(
    r"before this change|after this change|previous record|old name|earlier version"
    r"|still works|used to be|in the past",
    re.IGNORECASE,
)
TIMING = re.compile(r"\b\d[\d.,]*\s?(ms|µs|us|ns)\b|\d\s?x (faster|slower)|\d steps/s")
RATIO = re.compile(r"\b\d+(\.\d+)?x\b")  # "18x": a speed-up, where "8x1" is a mesh


def _docstrings() -> list[tuple[str, str]]:
    """(where, docstring) for every module, class and function docstring of tpustrat."""
    found = []
    for path in sorted(pathlib.Path(ts.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(node, kinds) and (docstring := ast.get_docstring(node)):
                found.append((f"{path.name}:{getattr(node, 'name', 'module')}", docstring))
    return found


def test_no_history_or_speed_figures_in_docs_and_docstrings():
    """Docs say what is, never what was, and quote no timings (benchmarks/results/ holds them)."""
    pages = [(str(path.relative_to(ROOT)), path.read_text()) for path in DOCUMENTS]
    problems = [
        f"{where}: {match.group(0)!r}"
        for where, text in pages + _docstrings()
        for pattern in (HISTORY, TIMING)
        for match in pattern.finditer(text)
    ]
    problems += [
        f"{where}: {match.group(0)!r}"
        for where, text in _docstrings()
        for match in RATIO.finditer(text)
    ]
    assert problems == [], "say what is, and point to benchmarks/results/:\n" + "\n".join(problems)


def _development_table() -> dict[str, tuple[int, set[str]]]:
    """docs/development.md's house: module -> (floor, the tpustrat modules it imports)."""
    table = {}
    for line in (ROOT / "docs" / "development.md").read_text().splitlines():
        row = re.fullmatch(r"\|\s*(\d+)\s*\|\s*`(\w+)\.py`\s*\|[^|]*\|([^|]*)\|", line.strip())
        if row:
            floor, module, imports = row.groups()
            table[module] = (int(floor), set(re.findall(r"`(\w+)`", imports)))
    return table


def _imports(path: pathlib.Path) -> set[str]:
    """The tpustrat modules a module imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tpustrat"):
            if node.module == "tpustrat":
                names |= {alias.name for alias in node.names}
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tpustrat.")}
    return names


def test_development_page_describes_the_house():
    """docs/development.md lists every module with what it imports, each from a lower floor."""
    table = _development_table()
    modules = {path.stem: path for path in pathlib.Path(ts.__file__).parent.glob("*.py")}
    assert sorted(table) == sorted(modules)
    for module, (floor, imports) in table.items():
        if module == "__init__":
            continue
        assert imports == _imports(modules[module]), f"{module}: fix its row's imports"
        higher = sorted(name for name in imports if table[name][0] >= floor)
        assert higher == [], f"{module} (floor {floor}) imports from its floor or above"


def test_quickstart_example_is_the_readme_quickstart():
    """examples/quickstart.py is the README's first block, ending on the same line."""
    quickstart = python_blocks(ROOT / "README.md")[0].code.strip().splitlines()
    example = (ROOT / "examples" / "quickstart.py").read_text().strip().splitlines()
    assert example[-1] == quickstart[-1]


def test_api_reference_documents_every_public_name():
    """docs/api.md renders each name of ``ts.__all__``, those of ``tpustrat.compat`` in its section.

    The compat names stay importable from ``tpustrat`` too, for code ported from TF.
    """
    documented = set(re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), re.M))
    assert set(ts.compat.__all__) <= set(ts.__all__), "import the compat names in tpustrat too"
    core = set(ts.__all__) - set(ts.compat.__all__) - {"compat", "testing"}
    public = {f"tpustrat.{name}" for name in core} | {"tpustrat.compat"}
    public |= {f"tpustrat.compat.{name}" for name in ts.compat.__all__}
    public |= {f"tpustrat.testing.{name}" for name in ts.testing.__all__}
    assert sorted(public - documented) == [], "add these to docs/api.md"
    assert sorted(documented - public) == [], "docs/api.md names what is not public"
