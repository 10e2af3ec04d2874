"""The full-scale OCR example (examples/ocr_capstone.py) on a micro configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("PIL")
if importlib.util.find_spec("japanize_matplotlib") is None:
    pytest.skip("japanize-matplotlib (the font) is not installed", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ocr_capstone.py"


@pytest.fixture(scope="module")
def ocr():
    spec = importlib.util.spec_from_file_location("ocr_capstone", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ocr_capstone"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("ocr_capstone", None)


def test_micro_run_writes_the_table_and_the_results(ocr, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNABLE_CACHE", str(tmp_path / "cache"))
    s = replace(ocr.QUICK, size=16, train_per_class=3, eval_per_class=1, epochs=1, batch_size=32,
                channels_per_step=16, batches_per_step=1, hidden=16, config=(8, "M", 16, "M"),
                milestones=(0.5, 0.7))
    results = ocr.run(s, tmp_path / "docs")
    saved = json.loads((tmp_path / "docs" / "ocr_results.json").read_text())
    for key in ("classes", "baseline_accuracy", "pruned_accuracy", "maps_removed_fraction", "flops_fraction",
                "seconds"):
        assert saved[key] == pytest.approx(results[key])
    assert saved["classes"] == 92
    rows = saved["rows"]
    assert [r["stage"] for r in rows] == ["CNet-0 (trained)", "CNet-50", "CNet-70"]
    assert rows[0]["maps_removed"] == 0 and rows[1]["maps_removed"] >= 50 and rows[2]["maps_removed"] >= 70
    assert saved["pruned_stage"] == "CNet-70" and saved["maps_removed_fraction"] >= 0.7
    assert rows[2]["flops_m"] < rows[1]["flops_m"] < rows[0]["flops_m"]
    assert saved["flops_fraction"] == pytest.approx(rows[2]["flops_m"] / rows[0]["flops_m"])
    assert 0 < rows[2]["classifier_share"] <= 100 and rows[2]["classifier_share"] > rows[0]["classifier_share"]
    page = (tmp_path / "docs" / "OCR.md").read_text()
    assert page.count("| CNet-") == 3 + 3  # three measured rows, three capstone rows
    assert f"{rows[2]['test']:.2f} %" in page and "ipaex-gothic" in page


def test_bar_row_is_the_first_with_seventy_percent(ocr):
    rows = [{"maps_removed": 0.0}, {"maps_removed": 50.0}, {"maps_removed": 71.0}, {"maps_removed": 80.0}]
    assert ocr._bar_row(rows) is rows[2]
    assert ocr._bar_row(rows[:2]) is rows[1]  # none reached: the last one, reported as not met
