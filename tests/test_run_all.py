"""bench/run_all.py --only: one table rerun in place, the rest of the page kept byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("run_all", "common"):
        sys.modules.pop(name, None)
    import run_all as module

    yield module
    for name in ("run_all", "common"):
        sys.modules.pop(name, None)


def _page(run_all, tables: dict[str, str]) -> str:
    parts = ["# Benchmarks", "", "## Machine", "", "| date | then |", ""]
    for number, (name, title) in enumerate(run_all.TABLES, 1):
        parts += [f"## {number}. {title}", "", f"Reproduce: `python bench/{name}.py`", "", tables.get(name, "old"), ""]
    parts += ["## Wall time", "", "| total | 1 s |", ""]
    return "\n".join(parts)


def test_only_replaces_that_section(run_all, tmp_path, monkeypatch):
    name = run_all.TABLES[1][0]
    monkeypatch.setattr(run_all, "run_table", lambda module, quick: ("| new | table |", 3.0))
    path = tmp_path / "BENCHMARKS.md"
    before = _page(run_all, {})
    path.write_text(before)
    after = run_all.rerun_one(name, path)
    assert path.read_text() == after
    assert "| new | table |" in after and f"--only {name}` at " in after
    assert after.count("| new | table |") == 1
    # every other section, the machine record and the wall-time table are unchanged
    head = f"## 2. {run_all.TABLES[1][1]}"
    nxt = f"## 3. {run_all.TABLES[2][1]}"
    assert before[:before.index(head)] == after[:after.index(head)]
    assert before[before.index(nxt):] == after[after.index(nxt):]


def test_only_refuses_an_unknown_table_or_a_page_without_it(run_all, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n")
    with pytest.raises(SystemExit, match="choose from"):
        run_all.rerun_one("no_such_table", path)
    with pytest.raises(SystemExit, match="no section"):
        run_all.rerun_one(run_all.TABLES[0][0], path)
    assert path.read_text() == "# Benchmarks\n"


def test_only_on_the_published_page_rewrites_the_readme_quote_too(run_all, tmp_path, monkeypatch):
    import readme_results

    name = run_all.TABLES[1][0]
    monkeypatch.setattr(run_all, "run_table", lambda module, quick: ("| new | table |", 3.0))
    quoted = []
    monkeypatch.setattr(readme_results, "update", lambda page: quoted.append(page) or True)
    elsewhere, published = tmp_path / "other.md", tmp_path / "BENCHMARKS.md"
    for path in (elsewhere, published):
        path.write_text(_page(run_all, {}))
    monkeypatch.setattr(run_all, "PAGE", published)
    run_all.rerun_one(name, elsewhere)
    assert quoted == []  # a page written elsewhere is not the README's
    run_all.rerun_one(name, published)
    assert quoted == [published]
