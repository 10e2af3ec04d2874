"""Built-in datasets for demos, tests and benchmarks.

The only dataset so far is :class:`JapaneseCharacters`, generated on the fly from
the IPAex Gothic font shipped with ``japanize-matplotlib`` (``pip install
prunable[demo]``), so it needs no download.

Example
-------
>>> import tempfile
>>> from prunable.data import JapaneseCharacters, loaders
>>> cache = tempfile.mkdtemp()  # generated sets are cached there
>>> ds = JapaneseCharacters("val", samples_per_class=2, size=32, root=cache)
>>> ds.num_classes, ds[0][0].shape
(92, torch.Size([1, 32, 32]))
>>> train, val, test = loaders(batch_size=64, size=16, root=cache)
>>> len(train.dataset), len(val.dataset)
(5520, 920)
"""

from .japanese import JapaneseCharacters, loaders

__all__ = ["JapaneseCharacters", "loaders"]
