"""A generated, augmented dataset of Japanese characters (kana and kanji).

Every glyph is rendered once per font from fonts that ship inside Python
packages (:data:`FONTS`: IPAex Gothic from ``japanize-matplotlib``; Noto Sans
JP and Noto Serif JP from ``pylopdf-fonts-jp``; Noto Sans CJK JP Bold from
``noto-cjk-sans-jp-bold``), then each sample gets its own random rotation,
scale, translation, stroke thickness and Gaussian noise. The randomness of
sample ``i`` comes from ``(seed, split, i)`` only, so the data are reproducible,
the three splits never share an image, and a set with more samples per class
starts with the samples of a smaller one. Generated sets are cached as ``.pt``
files.

Images are float32 tensors of shape ``(1, size, size)`` in ``[0, 1]``: a white
glyph on a black background, not normalised. With the defaults the pixel mean
is about 0.09 and the standard deviation about 0.23; normalise with those if
you want zero mean and unit variance.

Example
-------
>>> import tempfile
>>> from prunable.data import JapaneseCharacters
>>> ds = JapaneseCharacters("test", samples_per_class=1, root=tempfile.mkdtemp())
>>> image, label = ds[0]
>>> ds.classes[label], image.shape
('あ', torch.Size([1, 48, 48]))
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import PrunableError

__all__ = [
    "HIRAGANA", "KATAKANA", "KANJI", "JIS_LEVEL1", "CLASS_SETS", "DEFAULT_FONTS", "FONTS", "Font",
    "DataArgumentError", "JapaneseCharacters", "loaders", "render_glyphs",
]

_log = logging.getLogger("prunable")

#: The 46 basic hiragana (U+3042 あ ... U+3093 ん) in gojūon order.
HIRAGANA: tuple[str, ...] = tuple(
    "あいうえお" "かきくけこ" "さしすせそ" "たちつてと" "なにぬねの"
    "はひふへほ" "まみむめも" "やゆよ" "らりるれろ" "わを" "ん"
)
#: The 46 basic katakana (U+30A2 ア ... U+30F3 ン) in gojūon order.
KATAKANA: tuple[str, ...] = tuple(
    "アイウエオ" "カキクケコ" "サシスセソ" "タチツテト" "ナニヌネノ"
    "ハヒフヘホ" "マミムメモ" "ヤユヨ" "ラリルレロ" "ワヲ" "ン"
)
#: 100 common kanji: the 80 first-grade kyōiku kanji minus the five that look
#: like a katakana of the set (口 ロ, 二 ニ, 八 ハ, 夕 タ, 力 カ), plus the first
#: 25 second-grade kanji, all in the official (on-reading) order.
KANJI: tuple[str, ...] = tuple(
    "一右雨円王音下火花貝学気九休玉金空月犬見五校左三山子四糸字耳七車手十出女"
    "小上森人水正生青石赤千川先早草足村大男竹中虫町天田土日入年白百文木本名目立林六"
    "引羽雲園遠何科夏家歌画回会海絵外角楽活間丸岩顔汽記"
)


def _jis_level1() -> tuple[str, ...]:
    """The 2,965 level-1 kanji of JIS X 0208 (rows 16-47), in JIS order.

    Row ``r``, cell ``c`` of JIS X 0208 is the EUC-JP byte pair ``(0xA0 + r, 0xA0 + c)``;
    row 47 ends at cell 51, the undefined cells are skipped by the codec.
    """
    chars = []
    for row in range(16, 48):
        for cell in range(1, 95):
            try:
                chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp"))
            except UnicodeDecodeError:
                continue
    return tuple(chars)


#: The 2,965 level-1 kanji of JIS X 0208, in JIS (reading) order.
JIS_LEVEL1: tuple[str, ...] = _jis_level1()
#: The character sets accepted by ``JapaneseCharacters(classes=...)``. ``"jis"``:
#: the 92 kana plus JIS X 0208 level-1 kanji, 3,057 classes (the capstone's scale).
CLASS_SETS: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType(
    {"kana": HIRAGANA + KATAKANA, "kana+kanji": HIRAGANA + KATAKANA + KANJI,
     "jis": HIRAGANA + KATAKANA + JIS_LEVEL1}
)


@dataclass(frozen=True)
class Font:
    """A font file shipped inside a Python package, found without importing the package.

    Example
    -------
    >>> FONTS["noto-serif-jp"].title, FONTS["noto-serif-jp"].licence
    ('Noto Serif JP', 'SIL Open Font License 1.1')
    """

    title: str
    package: str
    file: str
    licence: str
    pip: str

    def path(self) -> Path:
        """The font file; :class:`ImportError` naming the pip package when it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise ImportError(f"the font {self.title} comes with a package: pip install {self.pip}")
        path = Path(spec.origin).parent / self.file
        if not path.is_file():
            raise ImportError(f"{self.pip} is installed but {path} is missing")
        return path


#: Fonts the datasets can render from, by key. All cover the kana and every JIS level-1 kanji.
FONTS: types.MappingProxyType[str, Font] = types.MappingProxyType({
    "ipaex-gothic": Font("IPAex Gothic", "japanize_matplotlib", "fonts/ipaexg.ttf",
                         "IPA Font License 1.0", "japanize-matplotlib"),
    "noto-sans-jp": Font("Noto Sans JP", "pylopdf_fonts_jp", "NotoSansJP-Regular.otf",
                         "SIL Open Font License 1.1", "pylopdf-fonts-jp"),
    "noto-serif-jp": Font("Noto Serif JP", "pylopdf_fonts_jp", "NotoSerifJP-Regular.otf",
                          "SIL Open Font License 1.1", "pylopdf-fonts-jp"),
    "noto-sans-cjk-jp-bold": Font("Noto Sans CJK JP Bold", "noto_cjk_sans_jp_bold", "NotoSansCJKjp-Bold.otf",
                                  "SIL Open Font License 1.1", "noto-cjk-sans-jp-bold"),
})
# Noto Sans CJK JP *Regular* (package noto-cjk-sans-jp-regular) is not listed: its glyphs
# render pixel for pixel like Noto Sans JP's, so it would add no variety.

#: Training fonts of each class set when ``fonts`` is not given. The ``"jis"`` set trains on
#: the three Noto fonts (sans, serif, bold sans) and keeps IPAex Gothic, a gothic of another
#: design, for ``split="test-unseen-font"``.
DEFAULT_FONTS: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType({
    "kana": ("ipaex-gothic",), "kana+kanji": ("ipaex-gothic",),
    "jis": ("noto-sans-jp", "noto-serif-jp", "noto-sans-cjk-jp-bold"),
})

_UNSEEN = "test-unseen-font"
_SPLITS = ("train", "val", "test", _UNSEEN)
_DEFAULT_SAMPLES = types.MappingProxyType({"train": 60, "val": 10, "test": 10, _UNSEEN: 10})
_FORMAT_VERSION = 1
_EM = 0.7  # font size as a fraction of the image side
_SUPERSAMPLE = 2  # glyphs are drawn and warped at this multiple of ``size``
_MAX_ROTATION = 10.0  # degrees
_SCALE = (0.85, 1.1)
_MAX_SHIFT = 0.1  # fraction of the image side
_THICKNESS = (-0.8, 1.0)  # <0 blends towards an eroded glyph, >0 towards a dilated one
_MAX_NOISE = 0.08  # largest standard deviation of the additive Gaussian noise
_CHUNK_PIXELS = 1 << 22  # warp at most this many supersampled pixels at a time


class DataArgumentError(PrunableError, ValueError):
    """An argument of a dataset or loader is out of range; the message names it."""


def _draw(chars: Sequence[str], side: int, font_key: str = "ipaex-gothic") -> torch.Tensor:
    """Draw each character centred (by its ink box) on a black ``side`` x ``side`` image."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:  # pillow comes with matplotlib
        raise ImportError("JapaneseCharacters needs pillow: pip install 'prunable[demo]'") from exc
    # the packages are located, never imported: japanize-matplotlib changes matplotlib's configuration
    font = ImageFont.truetype(io.BytesIO(FONTS[font_key].path().read_bytes()), size=round(_EM * side))
    out = torch.empty(len(chars), 1, side, side, dtype=torch.uint8)
    for i, char in enumerate(chars):
        left, top, right, bottom = font.getbbox(char)
        xy = ((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top)
        image = Image.new("L", (side, side), 0)
        ImageDraw.Draw(image).text(xy, char, fill=255, font=font)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        out[i, 0] = pixels.view(side, side)
    return out.float().div_(255)


def render_glyphs(chars: Sequence[str], size: int = 48, font: str = "ipaex-gothic") -> torch.Tensor:
    """Render characters without augmentation, as the dataset's starting point.

    Parameters
    ----------
    chars : sequence of str
        Single characters to draw.
    size : int
        Side of the square images in pixels.
    font : str
        A key of :data:`FONTS`.

    Returns
    -------
    torch.Tensor
        Float32 tensor of shape ``(len(chars), 1, size, size)`` in ``[0, 1]``,
        white glyphs centred on black.

    Example
    -------
    >>> render_glyphs("あア", size=32).shape
    torch.Size([2, 1, 32, 32])
    """
    _check_choice("font", font, tuple(FONTS))
    return _draw(list(chars), int(size), font)


def _sample_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit generator seed derived from ``(seed, split, index)`` alone."""
    digest = hashlib.blake2b(f"prunable.japanese:{seed}:{split}:{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _draw_randomness(
    seed: int, split: str, indices: Sequence[int], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform numbers ``(N, 6)`` and standard normal noise ``(N, 1, size, size)`` per sample."""
    uniform = torch.empty(len(indices), 6)
    noise = torch.empty(len(indices), 1, size, size)
    generator = torch.Generator()
    for row, index in enumerate(indices):
        generator.manual_seed(_sample_seed(seed, split, index))
        torch.rand(6, generator=generator, out=uniform[row])
        torch.randn(size, size, generator=generator, out=noise[row, 0])
    return uniform, noise


def _affine_grid(uniform: torch.Tensor, side: int) -> torch.Tensor:
    """Sampling grids ``(N, side, side, 2)`` for ``grid_sample`` from columns 0-3 of ``uniform``.

    Same result as ``F.affine_grid(..., align_corners=False)``, about twice as fast.
    """
    angle = torch.deg2rad((uniform[:, 0] * 2 - 1) * _MAX_ROTATION)
    scale = _SCALE[0] + uniform[:, 1] * (_SCALE[1] - _SCALE[0])
    shift = (uniform[:, 2:4] * 2 - 1) * (2 * _MAX_SHIFT)  # grid coordinates span 2
    cos, sin = (torch.cos(angle) / scale).view(-1, 1, 1), (torch.sin(angle) / scale).view(-1, 1, 1)
    # output -> input: p_in = R(-angle) (p_out - shift) / scale
    coords = (torch.arange(side, dtype=torch.float32) * 2 + 1) / side - 1
    x = coords.view(1, 1, side) - shift[:, 0].view(-1, 1, 1)
    y = coords.view(1, side, 1) - shift[:, 1].view(-1, 1, 1)
    return torch.stack([cos * x + sin * y, cos * y - sin * x], dim=-1)


def _glyph_variants(chars: Sequence[str], side: int, font_key: str) -> torch.Tensor:
    """Glyphs ``(C, 3, side, side)``: as drawn, dilated and eroded by a 3x3 square."""
    glyphs = _draw(chars, side, font_key)
    dilated = F.max_pool2d(glyphs, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-glyphs, 3, stride=1, padding=1)
    return torch.cat([glyphs, dilated, eroded], dim=1)


def _augment(
    variants: torch.Tensor, labels: torch.Tensor, uniform: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Thicken or thin, warp and add noise to supersampled glyphs; returns uint8 images."""
    thick = _THICKNESS[0] + uniform[:, 4] * (_THICKNESS[1] - _THICKNESS[0])
    weights = torch.stack([1 - thick.abs(), thick.clamp(min=0), (-thick).clamp(min=0)], dim=1)
    x = torch.einsum("bk,bkhw->bhw", weights, variants[labels]).unsqueeze(1)
    grid = _affine_grid(uniform, x.shape[-1])
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(x, _SUPERSAMPLE)
    x = x + noise * (uniform[:, 5] * _MAX_NOISE).view(-1, 1, 1, 1)
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _generate(
    chars: Sequence[str], split: str, size: int, samples_per_class: int, seed: int, fonts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``len(chars) * samples_per_class`` images; sample ``i`` has label ``i % C``
    and is drawn from font ``fonts[(i // C) % len(fonts)]``."""
    total = len(chars) * samples_per_class
    labels = torch.arange(total) % len(chars)
    font_of = (torch.arange(total) // len(chars)) % len(fonts)
    images = torch.empty(total, 1, size, size, dtype=torch.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * _SUPERSAMPLE) ** 2)
    for f, key in enumerate(fonts):  # one font's glyphs in memory at a time
        variants = _glyph_variants(chars, size * _SUPERSAMPLE, key)
        mine = torch.nonzero(font_of == f).flatten()
        for part in mine.split(chunk):
            uniform, noise = _draw_randomness(seed, split, part.tolist(), size)
            images[part] = _augment(variants, labels[part], uniform, noise)
        del variants
    return images, labels


def _cache_dir(root: str | os.PathLike[str] | None) -> Path:
    """The cache folder, first found of: ``root``, ``$PRUNABLE_CACHE``,
    ``$XDG_CACHE_HOME/prunable``, ``~/.cache/prunable``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("PRUNABLE_CACHE"):
        return Path(os.environ["PRUNABLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "prunable"


def _load_cache(path: Path, meta: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and labels from ``path``, or ``None`` if missing, unreadable or not matching."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = payload["images"], payload["labels"]
        ok = all(payload.get(key) == value for key, value in meta.items())
        n, size = len(meta["classes"]) * meta["samples_per_class"], meta["size"]
        ok = ok and images.dtype == torch.uint8 and tuple(images.shape) == (n, 1, size, size)
        ok = ok and labels.dtype == torch.int64 and tuple(labels.shape) == (n,)
    except Exception:  # any failure to read the file means: regenerate it
        return None
    return (images, labels) if ok else None


def _save_cache(path: Path, payload: dict[str, object]) -> None:
    """Write ``payload`` atomically; warn (do not fail) if the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        message = f"could not cache the dataset at {path}: {exc}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise DataArgumentError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise DataArgumentError."""
    if not isinstance(value, str) or value not in choices:
        raise DataArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_fonts(fonts: object) -> tuple[str, ...]:
    """Distinct keys of :data:`FONTS`, at least one, as a tuple; else DataArgumentError."""
    if isinstance(fonts, str) or not isinstance(fonts, Sequence) or not fonts:
        raise DataArgumentError(f"fonts must be a non-empty sequence of keys of FONTS {list(FONTS)}, got {fonts!r}")
    keys = tuple(_check_choice("fonts", f, tuple(FONTS)) for f in fonts)
    if len(set(keys)) != len(keys):
        raise DataArgumentError(f"fonts lists a font twice: {list(fonts)}")
    return keys


class JapaneseCharacters(Dataset):
    """Generated images of Japanese characters, white on black, with augmentation.

    Parameters
    ----------
    split : {"train", "val", "test", "test-unseen-font"}
        Which split; each draws its randomness from its own stream, so no two
        splits share an augmentation. ``"test-unseen-font"`` is rendered only from
        the fonts of :data:`FONTS` that are *not* in ``fonts``.
    classes : {"kana", "kana+kanji", "jis"}
        ``"kana"``: 46 hiragana + 46 katakana (92 classes). ``"kana+kanji"``:
        those plus the 100 kanji of :data:`KANJI` (192 classes). ``"jis"``: the
        kana plus the 2,965 level-1 kanji of JIS X 0208 (3,057 classes).
    size : int
        Image side in pixels, at least 8.
    samples_per_class : int, optional
        Images per character; defaults to 60 (train) or 10 (the test and validation splits).
    seed : int
        Non-negative seed; with ``split`` and the sample index it fixes the sample.
    root : str or path-like, optional
        Cache folder. Defaults to ``$PRUNABLE_CACHE``, else
        ``$XDG_CACHE_HOME/prunable`` or ``~/.cache/prunable``.
    fonts : sequence of str, optional
        The training fonts (keys of :data:`FONTS`); default :data:`DEFAULT_FONTS`
        of ``classes``. Sample ``i`` is drawn from font ``(i // num_classes) % len(fonts)``,
        so every class has the same number of samples from each font.

    Attributes
    ----------
    classes : list of str
        The character of each label.
    num_classes : int
        ``len(classes)``.
    fonts : tuple of str
        The fonts this split is rendered from (the held-out ones for ``"test-unseen-font"``).
    training_fonts : tuple of str
        The training fonts (``fonts`` as given, or the default).
    data : torch.Tensor
        All images as uint8, shape ``(N, 1, size, size)``; ``N = num_classes * samples_per_class``.
    targets : torch.Tensor
        All labels (int64); sample ``i`` shows ``classes[i % num_classes]``.
    seconds : float
        Wall time spent generating the images, or reading them from the cache.
    generated : bool
        True when the images were generated now, False when read from the cache.

    Raises
    ------
    DataArgumentError
        (a ``ValueError``) if an argument is out of range; the message names it.

    Example
    -------
    >>> import tempfile; root = tempfile.mkdtemp()
    >>> ds = JapaneseCharacters("train", size=8, samples_per_class=1, root=root)
    >>> len(ds), ds.num_classes, ds.fonts
    (92, 92, ('ipaex-gothic',))
    >>> image, label = ds[1]; image.dtype, image.shape, label
    (torch.float32, torch.Size([1, 8, 8]), 1)
    >>> JapaneseCharacters("test-unseen-font", size=8, samples_per_class=1, root=root).fonts
    ('noto-sans-jp', 'noto-serif-jp', 'noto-sans-cjk-jp-bold')
    """

    def __init__(
        self,
        split: str = "train",
        classes: str = "kana",
        size: int = 48,
        samples_per_class: int | None = None,
        seed: int = 0,
        root: str | os.PathLike[str] | None = None,
        fonts: Sequence[str] | None = None,
    ) -> None:
        self.split = _check_choice("split", split, _SPLITS)
        self.class_set = _check_choice("classes", classes, tuple(CLASS_SETS))
        self.size = _check_int("size", size, 8)
        if samples_per_class is None:
            samples_per_class = _DEFAULT_SAMPLES[split]
        self.samples_per_class = _check_int("samples_per_class", samples_per_class, 1)
        self.seed = _check_int("seed", seed, 0)
        self.classes: list[str] = list(CLASS_SETS[classes])
        self.training_fonts = _check_fonts(DEFAULT_FONTS[classes] if fonts is None else fonts)
        self.fonts = self.training_fonts
        if split == _UNSEEN:
            self.fonts = tuple(k for k in FONTS if k not in self.training_fonts)
            if not self.fonts:
                raise DataArgumentError(f"fonts: every font of FONTS is a training font {list(FONTS)}; "
                                        f"{_UNSEEN!r} needs one left out")
        self.cache_file = _cache_dir(root) / (
            f"japanese-v{_FORMAT_VERSION}-{classes.replace('+', '_')}-{split}"
            f"-size{size}-n{samples_per_class}-seed{seed}-{'_'.join(self.fonts)}.pt"
        )
        meta: dict[str, object] = {
            "format": _FORMAT_VERSION, "classes": self.classes, "split": split,
            "size": size, "samples_per_class": samples_per_class, "seed": seed, "fonts": list(self.fonts),
        }
        start = time.perf_counter()
        cached = _load_cache(self.cache_file, meta)
        self.generated = cached is None
        if cached is None:
            cached = _generate(self.classes, split, size, samples_per_class, seed, self.fonts)
            _save_cache(self.cache_file, {**meta, "images": cached[0], "labels": cached[1]})
        self.data, self.targets = cached
        self.seconds = time.perf_counter() - start
        _log.info("%s: %d images %s in %.1f s", self, len(self.targets),
                  "generated" if self.generated else "read from the cache", self.seconds)

    @property
    def num_classes(self) -> int:
        """Number of classes (characters)."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index].float().div_(255), int(self.targets[index])

    def __repr__(self) -> str:
        return (
            f"JapaneseCharacters(split={self.split!r}, classes={self.class_set!r}, "
            f"size={self.size}, samples_per_class={self.samples_per_class}, seed={self.seed}, "
            f"fonts={self.training_fonts!r})"
        )


def loaders(
    batch_size: int = 64,
    classes: str = "kana",
    size: int = 48,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, validation and test loaders over :class:`JapaneseCharacters`.

    Parameters
    ----------
    batch_size : int
        Batch size of all three loaders.
    classes, size, seed, root
        Passed to :class:`JapaneseCharacters` (default samples per class).
    num_workers : int
        Worker processes per loader.

    Returns
    -------
    tuple of DataLoader
        ``(train, val, test)``; only ``train`` is shuffled, by a generator seeded
        with ``seed`` so the batch order is reproducible.

    Example
    -------
    >>> import tempfile
    >>> train, val, test = loaders(batch_size=32, size=32, root=tempfile.mkdtemp())
    >>> images, labels = next(iter(train)); images.shape
    torch.Size([32, 1, 32, 32])
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    sets = [JapaneseCharacters(s, classes, size, None, seed, root) for s in _SPLITS[:3]]
    order = torch.Generator().manual_seed(seed)
    return (
        DataLoader(sets[0], batch_size, shuffle=True, generator=order, num_workers=num_workers),
        DataLoader(sets[1], batch_size, num_workers=num_workers),
        DataLoader(sets[2], batch_size, num_workers=num_workers),
    )
