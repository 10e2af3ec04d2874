"""The demo's tables and README block: markdown from a run's rows, nothing measured here.

:func:`format_table` and :func:`summary` turn the rows of
:func:`prunable.demo.run_demo` into markdown; :func:`format_readme` makes the
block between :data:`README_START` and :data:`README_END` of README.md (``make
demo`` rewrites it with :func:`write_readme`), so every figure of that block
comes from a run.

Example
-------
>>> row = {"stage": "x", "test_accuracy": 0.5, "params": 10, "flops": 2e6,
...        "latency_b1_ms": 1.0, "latency_b32_ms": 3.0, "size_bytes": 2048}
>>> print(format_table([row]).splitlines()[0])
| stage | test accuracy | params | FLOPs | latency b1 (ms) | latency b32 (ms) | size on disk |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PruningValueError

__all__ = [
    "README_START", "README_END", "format_table", "summary", "format_readme", "read_readme", "write_readme",
]

#: the lines around README.md's demo block, which ``run_demo(readme=...)`` rewrites
README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"
_DATA = "<!-- demo:data "


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table.

    Example
    -------
    >>> row = {"stage": "x", "test_accuracy": 0.5, "params": 10, "flops": 2e6,
    ...        "latency_b1_ms": 1.0, "latency_b32_ms": 3.0, "size_bytes": 2048}
    >>> print(format_table([row]).splitlines()[2])
    | x | 50.00 % | 10 | 2.00 M | 1.00 | 3.00 | 2.0 KiB |
    """
    lines = ["| stage | test accuracy | params | FLOPs | latency b1 (ms) | latency b32 (ms) | size on disk |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {100 * r['test_accuracy']:.2f} % | {r['params']:,} | "
                     f"{r['flops'] / 1e6:.2f} M | {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} | "
                     f"{r['size_bytes'] / 1024:.1f} KiB |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    """First row against the last: FLOPs and params ratios, accuracy change, CPU speed-ups.

    Example
    -------
    >>> a = {"test_accuracy": 0.9, "params": 100, "flops": 8e6, "latency_b1_ms": 2.0, "latency_b32_ms": 9.0}
    >>> summary([a, {**a, "test_accuracy": 0.85, "params": 25, "flops": 2e6, "latency_b1_ms": 1.0}])
    'FLOPs ÷4.0, params ÷4.0, accuracy -5.00 points, CPU speed-up ×2.00 (batch 1), ×1.00 (batch 32)'
    """
    base, last = rows[0], rows[-1]
    return (f"FLOPs ÷{base['flops'] / last['flops']:.1f}, params ÷{base['params'] / last['params']:.1f}, "
            f"accuracy {100 * (last['test_accuracy'] - base['test_accuracy']):+.2f} points, "
            f"CPU speed-up ×{base['latency_b1_ms'] / last['latency_b1_ms']:.2f} (batch 1), "
            f"×{base['latency_b32_ms'] / last['latency_b32_ms']:.2f} (batch 32)")


def format_readme(record: dict[str, Any]) -> str:
    """README.md's demo block, markers included, from a run's ``record`` (see :class:`DemoResult`).

    The block holds the table, the ratio sentence, how the run was made and the
    record itself (an HTML comment), so a test can check the block is exactly
    what this function makes of that record.

    Example
    -------
    >>> row = {"stage": "x", "test_accuracy": 0.5, "params": 10, "flops": 2e6,
    ...        "latency_b1_ms": 1.0, "latency_b32_ms": 3.0, "size_bytes": 2048}
    >>> record = {"rows": [row, {**row, "params": 5, "flops": 1e6}], "mode": "quick", "criterion": "l1",
    ...           "flops_target": 0.5, "seed": 0, "threads": 2, "wall_time_s": 9.4}
    >>> print(format_readme(record).splitlines()[6])
    FLOPs ÷2.0, params ÷2.0, accuracy +0.00 points, CPU speed-up ×1.00 (batch 1), ×1.00 (batch 32).
    """
    return "\n".join([
        README_START, format_table(record["rows"]), "", summary(record["rows"]) + ".", "", _provenance(record),
        _DATA + json.dumps(record, ensure_ascii=False, sort_keys=True) + " -->", README_END])


def _provenance(record: dict[str, Any]) -> str:
    if record["mode"] == "pending":  # the figures of the earlier hand-typed table, until `make demo` runs
        return ("These figures predate the generated block (they were typed by hand); `make demo` "
                "replaces the block with its own run.")
    command = {"default": "make demo", "quick": "prunable demo --quick"}.get(record["mode"], "run_demo()")
    return (f"Written by `{command}` from its own run (criterion {record['criterion']}, target "
            f"{record['flops_target']:g} of the FLOPs, seed {record['seed']}, {record['threads']} torch "
            f"thread(s), {record['wall_time_s']:.0f} s wall). Accuracy, params and FLOPs of a run are "
            "deterministic on a given machine and thread count; latencies vary with the machine's load.")


def read_readme(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The demo block of the README at ``path`` (markers included) and the record stored in it.

    Example
    -------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "README.md"
    >>> _ = path.write_text("# title " + README_START + README_END, encoding="utf-8")
    >>> row = {"stage": "x", "test_accuracy": 0.5, "params": 10, "flops": 2e6,
    ...        "latency_b1_ms": 1.0, "latency_b32_ms": 3.0, "size_bytes": 2048}
    >>> write_readme(path, {"rows": [row], "mode": "pending"})
    >>> block, record = read_readme(path)
    >>> block == format_readme(record) and record["rows"] == [row]
    True
    """
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise PruningValueError(f"{path}: no {README_START} ... {README_END} block")
    block = text[start:end + len(README_END)]
    data = [ln for ln in block.splitlines() if ln.startswith(_DATA) and ln.endswith(" -->")]
    if len(data) != 1:
        raise PruningValueError(f"{path}: the demo block holds {len(data)} data lines, expected 1")
    return block, json.loads(data[0][len(_DATA):-len(" -->")])


def write_readme(path: str | Path, record: dict[str, Any]) -> None:
    """Replace the demo block of the README at ``path`` by :func:`format_readme` ``(record)``.

    Example
    -------
    >>> write_readme("no-such-readme.md", {})
    Traceback (most recent call last):
    ...
    prunable.errors.PruningValueError: no-such-readme.md: no such file to write the demo table into
    """
    path = Path(path)
    if not path.is_file():
        raise PruningValueError(f"{path}: no such file to write the demo table into")
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise PruningValueError(f"{path}: no {README_START} ... {README_END} block to rewrite")
    path.write_text(text[:start] + format_readme(record) + text[end + len(README_END):], encoding="utf-8")
