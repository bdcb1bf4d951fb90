"""Every lesson source (lessons/NN_*.py, jupytext percent format) converts to a notebook.

The notebooks themselves run top to bottom in `make lessons` (nbmake); this quick test
catches a broken source early: it must parse, start with a markdown title, contain code
cells, and be listed in lessons/README.md.
"""
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
SOURCES = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))


def test_there_are_lessons():
    assert len(SOURCES) >= 6, f"expected the lesson sources in {LESSONS_DIR}, found {SOURCES}"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_lesson_converts(source):
    nb = jupytext.read(source)
    assert nb.cells, f"{source.name}: no cells"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# Lesson"), \
        f"{source.name}: the first cell must be a markdown title '# Lesson ...'"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 3, f"{source.name}: only {len(code)} code cells"
    assert any("assert" in c.source for c in code), f"{source.name}: a lesson must check its claims"
    # the round trip to a notebook and back keeps every cell
    text = jupytext.writes(nb, fmt="ipynb")
    again = jupytext.reads(text, fmt="ipynb")
    assert [c.source for c in again.cells] == [c.source for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_lesson_listed_in_readme(source):
    readme = (LESSONS_DIR / "README.md").read_text()
    assert source.name in readme, f"lessons/README.md does not mention {source.name}"


MACHINE_DIRS = ("work", "tmp", "root")   # top-level folders of the machines we develop on


def test_no_machine_paths_in_lessons():
    for source in SOURCES:
        text = source.read_text()
        for folder in MACHINE_DIRS:
            assert f"/{folder}/" not in text, f"{source.name} hard-codes a machine path (/{folder}/...)"
