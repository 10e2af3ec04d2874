"""Tests of prunable.data: the generated Japanese character dataset and its loaders."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("PIL")
if importlib.util.find_spec("japanize_matplotlib") is None:
    pytest.skip("japanize-matplotlib (the font) is not installed", allow_module_level=True)

from prunable.data import JapaneseCharacters, loaders  # noqa: E402
from prunable.data import japanese as J  # noqa: E402
from prunable.errors import PrunableError  # noqa: E402

SIZE = 32
N = 3  # samples per class


def build(root, split="train", classes="kana", **kw) -> JapaneseCharacters:
    kw.setdefault("size", SIZE)
    kw.setdefault("samples_per_class", N)
    return JapaneseCharacters(split, classes, root=root, **kw)


def test_public_api():
    import prunable.data as data

    assert sorted(data.__all__) == ["CLASS_SETS", "DEFAULT_FONTS", "FONTS", "Font", "JapaneseCharacters", "loaders"]


def test_shape_dtype_range_and_labels(tmp_path):
    ds = build(tmp_path)
    assert len(ds) == 92 * N
    image, label = ds[5]
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    assert type(label) is int and label == 5
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.min() >= 0 and images.max() <= 1
    assert images.max() == 1.0 and 0.02 < images.mean() < 0.4  # white glyphs on black
    assert torch.equal(ds.targets, torch.arange(len(ds)) % 92)


@pytest.mark.parametrize("classes, count", [("kana", 92), ("kana+kanji", 192)])
def test_num_classes(tmp_path, classes, count):
    ds = build(tmp_path, "val", classes, samples_per_class=1)
    assert ds.num_classes == count == len(ds.classes) == len(set(ds.classes)) == len(ds)
    assert ds.classes[:2] == ["あ", "い"] and ds.classes[46] == "ア"
    assert all(isinstance(c, str) and len(c) == 1 for c in ds.classes)


def test_character_lists():
    assert len(J.HIRAGANA) == len(J.KATAKANA) == 46 and len(set(J.KANJI)) == len(J.KANJI) == 100
    assert all(0x3041 <= ord(c) <= 0x3096 for c in J.HIRAGANA)
    assert all(0x30A1 <= ord(c) <= 0x30FA for c in J.KATAKANA)
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in J.KANJI)


def test_deterministic(tmp_path):
    a = build(tmp_path / "a")
    b = build(tmp_path / "b")
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.data, build(tmp_path / "c", seed=1).data)


def test_sample_depends_only_on_seed_split_index(tmp_path):
    small = build(tmp_path, samples_per_class=2)
    large = build(tmp_path, samples_per_class=N)
    assert torch.equal(small.data, large.data[: len(small)])


def test_splits_disjoint(tmp_path):
    seen: dict[bytes, str] = {}
    for split in ("train", "val", "test"):
        ds = build(tmp_path, split)
        for image in ds.data:
            key = image.numpy().tobytes()
            first = seen.setdefault(key, split)
            assert first == split, f"an image of {split} is also in {first}"
    assert len(seen) == 3 * 92 * N  # also no duplicates inside a split


def test_augmentation_varies_samples(tmp_path):
    ds = build(tmp_path)
    same_class = ds.data[ds.targets == 0].float()
    assert (same_class[0] - same_class[1]).abs().mean() > 5  # uint8 units


def test_cache_reused(tmp_path, monkeypatch):
    first = build(tmp_path)
    assert first.cache_file.parent == tmp_path and first.cache_file.is_file()
    mtime = first.cache_file.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although a valid cache exists")

    monkeypatch.setattr(J, "_generate", fail)
    second = build(tmp_path)
    assert torch.equal(first.data, second.data)
    assert second.cache_file.stat().st_mtime_ns == mtime
    payload = torch.load(first.cache_file, weights_only=True)
    assert payload["classes"] == first.classes and payload["images"].dtype == torch.uint8


def test_cache_name_encodes_parameters(tmp_path):
    names = {
        build(tmp_path, **kw).cache_file.name
        for kw in ({}, {"seed": 1}, {"size": 16}, {"samples_per_class": 1}, {"split": "val"},
                   {"classes": "kana+kanji", "samples_per_class": 1})
    }
    assert len(names) == 6 and len(list(tmp_path.iterdir())) == 6
    assert all("v1" in name and name.endswith(".pt") for name in names)


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04garbage"])
def test_corrupt_cache_regenerated(tmp_path, content):
    good = build(tmp_path / "good")
    path = tmp_path / "bad" / good.cache_file.name
    path.parent.mkdir()
    path.write_bytes(content)
    again = build(tmp_path / "bad")
    assert torch.equal(again.data, good.data)
    assert torch.equal(torch.load(path, weights_only=True)["images"], good.data)


def test_mismatching_cache_regenerated(tmp_path):
    good = build(tmp_path)
    payload = torch.load(good.cache_file, weights_only=True)
    payload["images"] = payload["images"][:-1]  # truncated data under the right name
    torch.save(payload, good.cache_file)
    assert torch.equal(build(tmp_path).data, good.data)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNABLE_CACHE", str(tmp_path / "env"))
    assert build(None, samples_per_class=1).cache_file.parent == tmp_path / "env"
    monkeypatch.delenv("PRUNABLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build(None, samples_per_class=1).cache_file.parent == tmp_path / "xdg" / "prunable"
    assert len(list((tmp_path / "xdg" / "prunable").glob("*.pt"))) == 1


def test_unwritable_cache_warns_but_works(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.warns(RuntimeWarning, match="could not cache"):
        ds = build(blocker / "cache", samples_per_class=1)
    assert len(ds) == 92 and not os.path.exists(blocker / "cache")


@pytest.mark.parametrize(
    "kwargs, name, shown",
    [
        ({"split": "dev"}, "split", "'dev'"),
        ({"classes": "kanji"}, "classes", "'kanji'"),
        ({"size": 7}, "size", "7"),
        ({"size": 32.0}, "size", "32.0"),
        ({"samples_per_class": 0}, "samples_per_class", "0"),
        ({"seed": -1}, "seed", "-1"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name, shown):
    with pytest.raises(ValueError, match=f"{name} .*got {shown}") as info:
        JapaneseCharacters(root=tmp_path, **kwargs)
    assert isinstance(info.value, PrunableError)
    assert not list(tmp_path.iterdir())


def test_loaders(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "_DEFAULT_SAMPLES", {"train": 4, "val": 2, "test": 1})
    train, val, test = loaders(batch_size=16, size=SIZE, root=tmp_path)
    assert [len(dl.dataset) for dl in (train, val, test)] == [368, 184, 92]
    images, labels = next(iter(train))
    assert images.shape == (16, 1, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert not torch.equal(labels, torch.arange(16))  # shuffled
    again, _, _ = loaders(batch_size=16, size=SIZE, root=tmp_path)
    assert torch.equal(next(iter(again))[1], labels)  # reproducibly
    assert torch.equal(next(iter(val))[1], torch.arange(16))  # not shuffled
    assert sum(len(b[1]) for b in test) == 92
    with pytest.raises(ValueError, match="batch_size .*got 0"):
        loaders(batch_size=0, root=tmp_path)


def test_glyphs_have_ink_and_differ():
    chars = J.CLASS_SETS["kana+kanji"]
    glyphs = J.render_glyphs(chars, SIZE)
    assert glyphs.shape == (len(chars), 1, SIZE, SIZE)
    ink = glyphs.flatten(1).sum(1)
    assert (ink > 10).all(), [c for c, v in zip(chars, ink) if v <= 10]  # no blank glyph
    assert (glyphs.flatten(1) < 0.5).float().mean(1).min() > 0.5  # mostly background
    dist = torch.cdist(glyphs.flatten(1), glyphs.flatten(1))
    dist.fill_diagonal_(float("inf"))
    first, second = divmod(int(dist.argmin()), len(chars))
    assert dist.min() > 1.0, f"{chars[first]} and {chars[second]} render alike"


def test_class_means_differ(tmp_path):
    ds = build(tmp_path, classes="kana+kanji", samples_per_class=2)
    means = ds.data.float().view(2, ds.num_classes, -1).mean(0)
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 0


# -- several fonts, the JIS class set, the unseen-font split ---------------------------------------------------

def test_jis_level1_is_the_2965_kanji_in_jis_order():
    kanji = J.JIS_LEVEL1
    assert len(kanji) == 2965 and len(set(kanji)) == 2965
    assert kanji[0] == "亜" and kanji[-1] == "腕"  # row 16 cell 1 and row 47 cell 51
    assert all("\u4e00" <= c <= "\u9fff" for c in kanji)  # CJK unified ideographs
    assert [c.encode("euc_jp")[0] - 0xA0 for c in kanji] == sorted(c.encode("euc_jp")[0] - 0xA0 for c in kanji)
    assert set(J.KANJI) <= set(kanji)  # the demo's 100 school kanji are all level 1
    jis = J.CLASS_SETS["jis"]
    assert len(jis) == 92 + 2965 >= 3000 and len(set(jis)) == len(jis)


def test_every_font_covers_every_class():
    fontTools = pytest.importorskip("fontTools.ttLib")
    for key, font in J.FONTS.items():
        cmap = fontTools.TTFont(font.path(), lazy=True).getBestCmap()
        missing = [c for c in J.CLASS_SETS["jis"] if ord(c) not in cmap]
        assert not missing, f"{key} lacks {missing[:5]}"


def test_fonts_render_differently():
    glyphs = {k: J.render_glyphs("永あ", size=32, font=k) for k in J.FONTS}
    keys = list(glyphs)
    for i, a in enumerate(keys):
        assert glyphs[a].amax() > 0.5, a  # ink
        for b in keys[i + 1:]:
            assert (glyphs[a] - glyphs[b]).abs().mean() > 0.01, (a, b)


def test_sample_font_is_index_over_classes_modulo_fonts(tmp_path):
    two = build(tmp_path, fonts=("noto-sans-jp", "noto-serif-jp"), samples_per_class=2)
    sans = build(tmp_path, fonts=("noto-sans-jp",), samples_per_class=2)
    serif = build(tmp_path, fonts=("noto-serif-jp",), samples_per_class=2)
    c = two.num_classes
    assert two.fonts == ("noto-sans-jp", "noto-serif-jp")
    assert torch.equal(two.data[:c], sans.data[:c])  # same randomness, same font
    assert torch.equal(two.data[c:], serif.data[c:])
    assert not torch.equal(two.data[c:], sans.data[c:])


def test_unseen_font_split_uses_only_held_out_fonts(tmp_path):
    train = build(tmp_path, fonts=("noto-sans-jp", "noto-serif-jp"))
    unseen = build(tmp_path, "test-unseen-font", fonts=("noto-sans-jp", "noto-serif-jp"))
    assert set(unseen.fonts) == set(J.FONTS) - set(train.fonts)
    alone = build(tmp_path, "test-unseen-font", fonts=("ipaex-gothic",) + tuple(
        k for k in J.FONTS if k not in train.fonts and k != "ipaex-gothic"))
    assert alone.fonts == ("noto-sans-jp", "noto-serif-jp")
    assert unseen.cache_file != alone.cache_file
    default = JapaneseCharacters("test-unseen-font", "jis", size=8, samples_per_class=1, root=tmp_path)
    assert default.fonts == ("ipaex-gothic",) and default.num_classes == 3057
    assert not set(default.fonts) & set(J.DEFAULT_FONTS["jis"])


def test_reported_generation_time_and_cache(tmp_path):
    first = build(tmp_path, fonts=("noto-sans-jp",))
    again = build(tmp_path, fonts=("noto-sans-jp",))
    assert first.generated and not again.generated
    assert first.seconds > 0 and again.seconds > 0
    assert torch.equal(first.data, again.data)


@pytest.mark.parametrize("fonts, shown", [
    ((), "fonts"), ("ipaex-gothic", "fonts"), (("comic-sans",), "comic-sans"),
    (("noto-sans-jp", "noto-sans-jp"), "twice"),
])
def test_bad_fonts(tmp_path, fonts, shown):
    with pytest.raises(J.DataArgumentError, match=shown):
        build(tmp_path, fonts=fonts)


def test_every_font_held_out_is_refused(tmp_path):
    with pytest.raises(J.DataArgumentError, match="test-unseen-font"):
        build(tmp_path, "test-unseen-font", fonts=tuple(J.FONTS))
