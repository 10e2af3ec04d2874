"""README.md's demo block is what `make demo` writes: the demo's own formatting of a stored run record."""

import re
from pathlib import Path

from prunable.demo_report import README_END, README_START, format_readme, format_table, read_readme

README = Path(__file__).resolve().parents[1] / "README.md"
STAGES = ["trained baseline", "after pruning", "after fine-tuning"]
ROW = re.compile(r"^\| (?P<stage>[a-z -]+) \| (?P<acc>\d+\.\d\d) % \| (?P<params>\d{1,3}(,\d{3})*) \| "
                 r"(?P<flops>\d+\.\d\d) M \| (?P<b1>\d+\.\d\d) \| (?P<b32>\d+\.\d\d) \| (?P<kib>\d+\.\d) KiB \|$")
SUMMARY = re.compile(r"^FLOPs ÷\d+\.\d, params ÷\d+\.\d, accuracy [+-]\d+\.\d\d points, "
                     r"CPU speed-up ×\d+\.\d\d \(batch 1\), ×\d+\.\d\d \(batch 32\)\.$")


def test_readme_has_one_demo_block():
    text = README.read_text(encoding="utf-8")
    assert text.count(README_START) == 1 and text.count(README_END) == 1


def test_readme_block_is_the_demo_formatting_of_its_record():
    block, record = read_readme(README)
    assert block == format_readme(record)
    assert record["mode"] in ("default", "pending"), "the README shows the default run of `make demo`"
    assert [r["stage"] for r in record["rows"]] == STAGES


def test_readme_table_has_the_demo_columns_and_numbers_that_parse():
    block, record = read_readme(README)
    lines = block.splitlines()
    header = format_table([]).splitlines()
    assert lines[1:3] == header
    rows = [ROW.match(line) for line in lines[3:6]]
    assert all(rows), lines[3:6]
    for match, r in zip(rows, record["rows"]):
        assert match["stage"] == r["stage"]
        assert abs(float(match["acc"]) - 100 * r["test_accuracy"]) <= 0.005
        assert int(match["params"].replace(",", "")) == r["params"]
        assert abs(float(match["flops"]) - r["flops"] / 1e6) <= 0.005
        assert abs(float(match["kib"]) - r["size_bytes"] / 1024) <= 0.05
    assert SUMMARY.match(lines[7]), lines[7]
    base, pruned, tuned = record["rows"]
    assert pruned["flops"] <= record["flops_target"] * base["flops"] * 1.01 and tuned["flops"] == pruned["flops"]
