"""Write README.md's results block from the benchmark pages.

The README's "Results against Torch-Pruning" figures are quoted, cell for cell,
from ``docs/BENCHMARKS.md`` (written by ``bench/run_all.py`` from one
``make bench`` run), never typed by hand. ``run_all.py`` calls :func:`update`
after writing the page; ``python bench/readme_results.py`` rewrites the block
from the page as it is, and ``--check`` exits 1 when the README differs.

A table or column the block needs and the page lacks raises
:class:`BenchPageError` naming them, so a changed page cannot leave the README
silently stale.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"

#: (table number on the page, columns quoted, row filter: column -> allowed values or None for every row)
QUOTED = (
    (1, ("model", "total ours/TP", "total + rebuild ours/TP", "ours result", "TP result"), None),
    (2, ("configuration", "time vs plain", "peak vs plain"), None),
    (3, ("model", "pruned by", "round_to", "FLOPs left", "speed-up b1", "speed-up b32"), {"FLOPs target": ("50%",)}),
    (4, ("dataset", "FLOPs target", "method", "test accuracy %"),
     {"method": ("unpruned", "ours TaylorActivation", "TP Taylor")}),
    (6, ("criterion", "within layer (mean over layers)", "across layers, L2-normalised"), None),
)


class BenchPageError(ValueError):
    """The benchmark page lacks a table or column the README quotes."""


def sections(page: str) -> dict[int, tuple[str, str]]:
    """``{number: (title, body)}`` of the page's ``## N. Title`` sections."""
    found = re.split(r"^## (\d+)\. (.+)$", page, flags=re.M)
    return {int(found[i]): (found[i + 1].strip(), found[i + 2]) for i in range(1, len(found) - 2, 3)}


def first_table(body: str) -> list[dict[str, str]]:
    """Rows of the first markdown table of ``body``, as ``{header: cell}``."""
    all_lines = body.splitlines()
    start = next((i for i, line in enumerate(all_lines) if line.startswith("|")), len(all_lines))
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), all_lines[start:]))
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header, rows = cells[0], [r for r in cells[2:] if len(r) == len(cells[0])]
    end = next((i for i, line in enumerate(lines[2:]) if len(cells[i + 2]) != len(header)), len(rows))
    return [dict(zip(header, r)) for r in rows[:end]]


def machine(page: str) -> dict[str, str]:
    """``{fact: value}`` of the page's machine table (its first table: two columns, no header)."""
    facts = {}
    for line in page.split("\n## ")[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] and not cells[0].startswith("---"):
            facts[cells[0]] = cells[1]
    return facts


def _quote(number: int, title: str, rows: list[dict[str, str]], columns: tuple, keep: dict | None) -> list[str]:
    if not rows:
        raise BenchPageError(f"table {number} ({title}) has no rows")
    missing = [c for c in (*columns, *(keep or {})) if c not in rows[0]]
    if missing:
        raise BenchPageError(f"table {number} ({title}) has no column {missing}; it has {list(rows[0])}")
    chosen = [r for r in rows if all(r[k] in allowed for k, allowed in (keep or {}).items())]
    lines = [f"**{number}. {title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in chosen]
    return lines + [""]


def block(page: str) -> str:
    """The README block quoting ``page`` (the text of docs/BENCHMARKS.md)."""
    found = sections(page)
    facts = machine(page)
    lines = [START, "",
             f"Quoted by `bench/readme_results.py` from the `make bench` run of {facts.get('date', '?')} "
             f"({facts.get('cpu', '?')}, {facts.get('cores (os.cpu_count)', '?')} cores, torch "
             f"{facts.get('torch', '?')}, Torch-Pruning {facts.get('torch-pruning', '?')}); "
             "[docs/BENCHMARKS.md](docs/BENCHMARKS.md) has every table and how to read it.", ""]
    if 5 in found:
        coverage = next((line for line in found[5][1].splitlines() if line.startswith("prunable: **")), None)
        if coverage is None:
            raise BenchPageError("table 5 (zoo) has no 'prunable: **…' summary line")
        lines += [f"**5. {found[5][0]}** ([docs/zoo.md](docs/zoo.md)): {coverage}", ""]
    for number, columns, keep in QUOTED:
        if number not in found:
            raise BenchPageError(f"the page has no section '## {number}.'; it has {sorted(found)}")
        title, body = found[number]
        lines += _quote(number, title, first_table(body), columns, keep)
    return "\n".join(lines + [END])


def replace_block(readme: str, new: str) -> str:
    """``readme`` with the text between the markers replaced by ``new`` (markers included)."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise BenchPageError(f"README.md needs exactly one {START} and one {END}")
    head, rest = readme.split(START)
    return head + new + rest.split(END)[1]


def update(readme: Path = REPO / "README.md", page: Path = REPO / "docs" / "BENCHMARKS.md") -> bool:
    """Rewrite the README block from the page; True when the README changed."""
    old = readme.read_text()
    new = replace_block(old, block(page.read_text()))
    if new != old:
        readme.write_text(new)
    return new != old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's block is not the page's")
    args = parser.parse_args(argv)
    readme, page = REPO / "README.md", REPO / "docs" / "BENCHMARKS.md"
    if args.check:
        current = replace_block(readme.read_text(), block(page.read_text()))
        return int(current != readme.read_text())
    print("README.md updated" if update(readme, page) else "README.md already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
