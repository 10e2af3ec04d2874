"""Write the "layer types" section of docs/zoo.md from the handler registry and the layer zoo.

The section (from ``layer_zoo.DOC_MARKER`` to the end of the file) is replaced;
the torchvision table above it, written by ``bench/zoo.py``, is kept.
``tests/test_layers.py`` checks that the file matches what this script writes.

Run: ``python bench/layer_table.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZOO_DOC = REPO / "docs" / "zoo.md"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from layer_zoo import DOC_MARKER, markdown  # noqa: E402


def with_layer_section(text: str) -> str:
    """``text`` (docs/zoo.md) with its layer-types section replaced by a fresh one."""
    head = text.split(DOC_MARKER)[0].rstrip("\n")
    return f"{head}\n\n{markdown()}" if head else markdown()


def main() -> None:
    old = ZOO_DOC.read_text() if ZOO_DOC.exists() else ""
    ZOO_DOC.write_text(with_layer_section(old))
    print(f"wrote the layer types of {ZOO_DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
