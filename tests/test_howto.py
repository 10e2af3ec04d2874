"""Run the snippets of docs/howto/*.md.

Every ```python block of a page runs, in order, in one namespace per page, in a
temporary folder. A block right after a line ``<!-- not run: REASON -->`` is
shown but not run (it needs a GPU or several processes); the reason is required.
"""

import re
import warnings
from pathlib import Path

import pytest

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto"
PAGES = sorted(HOWTO.glob("*.md"))
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
#: pages and the packages their snippets import beyond torch and prunable
NEEDS = {"lightning.md": ["lightning"], "timm.md": ["timm"], "huggingface.md": ["transformers"],
         "export.md": ["onnx", "onnxscript", "onnxruntime"], "save-load.md": ["torchvision"], "ddp.md": [],
         "fsdp.md": [], "large-models.md": ["transformers"]}


def snippets(page: Path) -> list[tuple[str, str | None]]:
    """``(code, reason not run or None)`` of every python block of ``page``."""
    return [(m["code"], m["reason"]) for m in BLOCK.finditer(page.read_text())]


def test_every_integration_has_a_page_with_a_snippet_that_runs():
    assert sorted(p.name for p in PAGES) == sorted(NEEDS)
    for page in PAGES:
        blocks = snippets(page)
        assert any(reason is None for _, reason in blocks), f"{page.name}: no snippet is run"
        for code, reason in blocks:
            assert reason is None or reason.strip(), f"{page.name}: a block not run needs a reason"
        assert page.read_text().count("```python") == len(blocks), f"{page.name}: a python block was not parsed"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_snippets_run(page, tmp_path, monkeypatch):
    for package in NEEDS[page.name]:
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"howto_{page.stem}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation chatter; the snippets assert what matters
        for i, (code, reason) in enumerate(snippets(page)):
            if reason is None:
                exec(compile(code, f"{page.name}[{i}]", "exec"), namespace)  # noqa: S102 - our own docs
