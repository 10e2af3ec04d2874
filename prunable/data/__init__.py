"""Built-in datasets for demos, tests and benchmarks.

:class:`JapaneseCharacters` is generated on the fly from fonts that ship inside
Python packages (IPAex Gothic with ``japanize-matplotlib``, three Noto fonts with
``pylopdf-fonts-jp`` and ``noto-cjk-sans-jp-bold``: ``pip install
prunable[demo,ocr]``), so it needs no download: 92 kana, 192 kana and kanji, or
the 3,057 kana and JIS X 0208 level-1 kanji of the full OCR job.

Example
-------
>>> from prunable.data import CLASS_SETS, FONTS, JapaneseCharacters, loaders
>>> {name: len(chars) for name, chars in CLASS_SETS.items()}
{'kana': 92, 'kana+kanji': 192, 'jis': 3057}
>>> sorted(FONTS)
['ipaex-gothic', 'noto-sans-cjk-jp-bold', 'noto-sans-jp', 'noto-serif-jp']
"""

from .japanese import CLASS_SETS, DEFAULT_FONTS, FONTS, Font, JapaneseCharacters, loaders

__all__ = ["CLASS_SETS", "DEFAULT_FONTS", "FONTS", "Font", "JapaneseCharacters", "loaders"]
