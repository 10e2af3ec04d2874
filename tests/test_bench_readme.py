"""README's results block is quoted by bench/readme_results.py from docs/BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quoting():
    spec = importlib.util.spec_from_file_location("readme_results", REPO / "bench" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_results"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("readme_results", None)


def test_readme_block_is_the_pages_quote(quoting):
    readme, page = (REPO / "README.md").read_text(), (REPO / "docs" / "BENCHMARKS.md").read_text()
    assert quoting.replace_block(readme, quoting.block(page)) == readme


def test_every_quoted_cell_is_on_the_page(quoting):
    page = (REPO / "docs" / "BENCHMARKS.md").read_text()
    block = quoting.block(page)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| model |")]
    assert len(rows) > 20
    page_cells = {c.strip() for line in page.splitlines() if line.startswith("|") for c in line.split("|")}
    for row in rows:
        for cell in row.strip("|").split("|"):
            assert cell.strip() in page_cells, cell


def test_a_cell_typed_by_hand_is_caught(quoting):
    readme, page = (REPO / "README.md").read_text(), (REPO / "docs" / "BENCHMARKS.md").read_text()
    first = quoting.first_table(quoting.sections(page)[1][1])[0]["total ours/TP"]
    edited = readme.replace(f"| {first} |", "| 0.01× |", 1)
    assert edited != readme
    assert quoting.replace_block(edited, quoting.block(page)) != edited


def test_a_page_without_a_quoted_column_is_refused(quoting):
    page = (REPO / "docs" / "BENCHMARKS.md").read_text()
    with pytest.raises(quoting.BenchPageError, match="total ours/TP"):
        quoting.block(page.replace("total ours/TP", "total (ours/TP)"))
    with pytest.raises(quoting.BenchPageError, match="no section"):
        quoting.block(page.replace("## 6. ", "## Six. "))


def test_update_rewrites_only_the_block(quoting, tmp_path):
    text = (REPO / "docs" / "BENCHMARKS.md").read_text()
    first = quoting.first_table(quoting.sections(text)[1][1])[0]["total ours/TP"]
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(text.replace(f"| {first} |", "| 0.4242× |"))
    readme = tmp_path / "README.md"
    before = (REPO / "README.md").read_text()
    readme.write_text(before)
    assert quoting.update(readme, page)
    after = readme.read_text()
    assert "0.4242×" in after and after.split(quoting.START)[0] == before.split(quoting.START)[0]
    assert after.split(quoting.END)[1] == before.split(quoting.END)[1]
    assert not quoting.update(readme, page)  # already current


def test_first_table_stops_at_the_end_of_the_first_table(quoting):
    body = ("text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n**Second table:**\n\n| a | b |\n|---|---|\n| 3 | 4 |\n")
    assert quoting.first_table(body) == [{"a": "1", "b": "2"}]
