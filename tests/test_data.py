"""Data sources: splits, array augmentation, npz and image-folder loading."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from llp_fast.data import DataError, load, make_split


def test_split_is_class_balanced_seeded_and_disjoint():
    y = np.repeat(np.arange(5), 40)
    a = make_split(y, num_classes=5, labeled_fraction=0.1, seed=3)
    b = make_split(y, num_classes=5, labeled_fraction=0.1, seed=3)
    c = make_split(y, num_classes=5, labeled_fraction=0.1, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.targets, c.targets)
    assert len(np.intersect1d(a.train, a.test)) == 0 and len(a.train) + len(a.test) == 200
    assert np.bincount(y[a.test], minlength=5).tolist() == [8] * 5  # 20% stratified
    counts = np.bincount(a.targets[a.targets >= 0], minlength=5)
    assert counts.tolist() == [3] * 5  # round(0.1 * 32)
    assert np.array_equal(a.truth, y[a.train])


def test_unlabeled_fraction_drops_unlabeled_only():
    y = np.repeat(np.arange(4), 50)
    s = make_split(y, num_classes=4, labeled_fraction=0.2, unlabeled_fraction=0.5, seed=0)
    n_lab = int((s.targets >= 0).sum())
    assert n_lab == 4 * 8
    assert len(s.train) - n_lab == round(0.5 * (160 - n_lab))


def test_class_without_labeled_example_is_an_error():
    y = np.array([0] * 10 + [-1] * 10)  # class 1 (of 2) is never labeled
    with pytest.raises(DataError, match="class 1 has no labeled"):
        make_split(y, num_classes=2, labeled_fraction=None, has_test=True)
    with pytest.raises(DataError, match="class 3 has no training example at all"):
        make_split(np.repeat(np.arange(3), 4), num_classes=4, labeled_fraction=0.5)


def _source(**kw):
    """Digits configured as the trainer configures them (llp_fast.train.defaults); ``kw`` overrides."""
    src = load("digits", device="cpu", labeled_fraction=0.1, seed=0)
    src.configure(**{"image_size": 16, "scale_min": 0.85, "translate": 1.0, "flip": False, **kw})
    return src


def test_digits_source_on_device_and_normalised():
    src = _source()
    assert src.num_classes == 10 and src.in_channels == 1 and src.image_size == 16
    assert src.x.dtype == torch.uint8 and src.num_train + src.num_test == 1797
    raw = load("digits", device="cpu", labeled_fraction=0.1, seed=0)  # unconfigured: native side, no augmentation
    assert (raw.image_size, raw.scale_min, raw.translate, raw.flip) == (8, 1.0, 0.0, False)
    x, y = next(src.test_batches(64))
    assert x.shape == (64, 1, 16, 16) and x.is_contiguous()  # channels_last only on CUDA (llp_fast._device)
    assert abs(float(x.mean())) < 0.5


def test_augmentation_batched_seeded_and_label_preserving():
    src = _source()
    order = torch.arange(32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    (a, ia), (b, _) = next(src.train_batches(order, 32, g1)), next(src.train_batches(order, 32, g2))
    torch.testing.assert_close(a, b)
    assert torch.equal(ia, order)
    plain = src.plain(src.x[:32])
    assert not torch.allclose(a, plain)
    # with no crop, no translation and no flip the resampling is the identity
    still = _source(scale_min=1.0, translate=0.0)
    still.ratio = (1.0, 1.0)
    torch.testing.assert_close(still.augment(still.x[:32], g1), still.plain(still.x[:32]), atol=1e-5, rtol=0)


def test_plain_refuses_a_batch_it_would_scale_or_read_wrongly():
    """``plain`` is public (the README: a trained network's input); a float batch was scaled a second
    time, a channels-last one read as channels, both without a word (found by review, 2026-12-08)."""
    src = _source()
    x = src.x[:4]
    for bad, what in ((x.float() / 255, "torch.float32"), (x.bool(), "torch.bool"), (x.numpy(), "ndarray")):
        with pytest.raises(TypeError, match=f"x must be a uint8 torch.Tensor.*got {what}"):
            src.plain(bad)
    for bad in (x.permute(0, 2, 3, 1), x[:, 0], x.expand(4, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\)"):
            src.plain(bad)
    torch.testing.assert_close(src.plain(x), src.plain(x.contiguous()))


def test_flip_mirrors_npz_images(tmp_path):
    p = tmp_path / "f.npz"
    x = np.random.default_rng(0).integers(0, 255, (40, 6, 6), dtype=np.uint8)
    np.savez(p, x=x, y=np.arange(40) % 2)
    src = load(f"npz:{p}", device="cpu", labeled_fraction=0.5, scale_min=1.0, translate=0.0, flip=True)
    src.ratio = (1.0, 1.0)
    out = src.augment(src.x, torch.Generator().manual_seed(0))
    plain = src.plain(src.x)
    same = (out - plain).flatten(1).abs().amax(1) < 1e-4
    mirrored = (out - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-4
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 40


def test_train_batches_start_skips_batches():
    src = _source()
    order = torch.randperm(src.num_train, generator=torch.Generator().manual_seed(0))
    all_idx = [i for _, i in src.train_batches(order, 100, torch.Generator())]
    later = [i for _, i in src.train_batches(order, 100, torch.Generator(), start=3)]
    assert len(later) == len(all_idx) - 3 and torch.equal(later[0], all_idx[3])
    assert torch.equal(torch.cat(all_idx), order)


def _write_npz(path, n=60, test=True, **extra):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 255, (n, 10, 10, 3), dtype=np.uint8), "y": np.arange(n) % 3}
    if test:
        arrays.update(x_test=rng.integers(0, 255, (9, 10, 10, 3), dtype=np.uint8), y_test=np.arange(9) % 3)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_npz_with_own_unlabeled_marks_and_test_split(tmp_path):
    y = np.full(60, -1)
    y[:6] = np.arange(6) % 3
    p = _write_npz(tmp_path / "d.npz", y=y)
    src = load(f"npz:{p}", device="cpu", labeled_fraction=0.5)
    assert src.num_train == 60 and src.num_test == 9 and src.in_channels == 3
    assert int((src.targets >= 0).sum()) == 6  # the file's own labeled set wins
    assert src.facts().channels == 3 and src.facts().side == 10  # colour images (the defaults flip them)
    x, _ = next(src.test_batches(4))
    assert x.shape == (4, 3, 10, 10)


def test_npz_gray_without_test_holds_out_20_percent(tmp_path):
    p = tmp_path / "g.npz"
    np.savez(p, x=np.zeros((50, 6, 6), np.uint8), y=np.arange(50) % 5)
    src = load(f"npz:{p}", device="cpu", labeled_fraction=0.2)
    assert src.num_test == 10 and src.num_train == 40 and src.in_channels == 1


def test_a_class_with_no_held_out_example_is_said(tmp_path):
    """Without x_test the held-out split takes 20% of each class's labeled examples: a class of one
    or two kept none, and the held-out accuracy (100% on random pixels) left it out unsaid."""
    rng = np.random.default_rng(4)
    y = -np.ones(1005, int)
    y[:300], y[1000:1002] = 0, 1
    p = tmp_path / "imb.npz"
    np.savez(p, x=rng.integers(0, 256, (1005, 8, 8), dtype=np.uint8), y=y)
    src = load(f"npz:{p}", device="cpu")
    assert src.notes[0] == (
        "the held-out split holds no example of class '1': the held-out accuracy leaves it out (label more "
        "examples, or give x_test and y_test)"
    )
    assert len(src.notes) == 2 and "no x_test: 60 of its 302 labeled images" in src.notes[1]
    np.savez(p, x=np.zeros((30, 8, 8), np.uint8), y=np.arange(30) % 3, x_test=np.zeros((4, 8, 8), np.uint8),
             y_test=np.array([0, 0, 1, 1]))  # fmt: skip
    assert load(f"npz:{p}", device="cpu").notes == [
        "the held-out split holds no example of class '2': the held-out accuracy leaves it out (add examples to "
        "x_test and y_test)"
    ]
    np.savez(p, x=np.zeros((30, 8, 8), np.uint8), y=np.arange(30) % 3)
    assert load(f"npz:{p}", device="cpu").notes == []
    from llp_fast.data import untested_note

    assert "of 2 classes 'b', 'c': the held-out accuracy leaves them out (x)" in untested_note(
        np.array([0]), ["a", "b", "c"], "x"
    )


def test_non_square_arrays_get_the_same_defaults_whichever_way_round(tmp_path):
    """The side was the width: 16 x 40 images were "40 px" and 40 x 16 ones "16 px" (other input
    sides, shifts and start labels)."""
    y = np.where(np.arange(200) % 3 == 0, np.arange(200) % 4, -1)
    sides = []
    for shape in ((16, 40), (40, 16)):
        np.savez(tmp_path / "a.npz", x=np.zeros((200, *shape), np.uint8), y=y)
        sides.append(load(f"npz:{tmp_path / 'a.npz'}", device="cpu").facts().side)
    assert sides == [40, 40]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((4, 5, 5), np.float32), "y": np.zeros(4, int)}, "uint8"),
        ({"x": np.zeros((4, 5, 5), np.uint8)}, "no array 'y'"),
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.zeros(3, int)}, r"image of .x. \(4\), got int64 \(3,\)"),
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, -2, 0])}, "below -1"),
        ({"x": np.zeros((4, 0, 0), np.uint8), "y": np.array([0, 1, 1, 0])}, "no pixels"),
        # an empty test split trained an epoch and then failed in the evaluation
        (
            {"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, 1, 0])}
            | {"x_test": np.zeros((0, 5, 5), np.uint8), "y_test": np.zeros(0, int)},
            "'x_test' holds no image",
        ),
        # it trained and reported 100%
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.zeros(4, int)}, "one class only"),
        # 2**63 wrapped to a negative id: the row became unlabeled
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, 2**63, 0], np.uint64)}, "beyond int64"),
    ],
)
def test_npz_bad_arrays(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load(f"npz:{p}", device="cpu", labeled_fraction=0.5)


def test_an_npy_array_given_as_npz_data_says_what_it_is(tmp_path):
    """numpy's words were "TypeError: 'numpy.ndarray' object does not support the context manager
    protocol"."""
    np.save(tmp_path / "x.npy", np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(DataError, match=r"x.npy is one .npy array, not an .npz archive of x and y"):
        load(f"npz:{tmp_path / 'x.npy'}", device="cpu", labeled_fraction=0.5)


def test_npz_reads_the_rows_in_chunks_as_one_copy(tmp_path):
    """The training tensor, its test split and the normalisation statistics are what the whole
    arrays give, whatever the chunk (they were made with full copies: about 5x the data at the peak)."""
    from llp_fast.data.arrays import _channel_stats, _to_nchw

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, 5, 5, 3), dtype=np.uint8)
    rows = rng.permutation(37)[:23]
    want = torch.from_numpy(x[rows]).permute(0, 3, 1, 2)
    for chunk in (1, 75, 7 * 75, 1 << 24):
        assert torch.equal(_to_nchw(x, rows, chunk_elements=chunk), want)
        assert torch.equal(_to_nchw(x[..., 0], rows, chunk_elements=chunk), want[:, :1])
        mean, std = _channel_stats(want, chunk_elements=chunk)
        f = want.double() / 255
        torch.testing.assert_close(mean, f.mean((0, 2, 3)).float())
        torch.testing.assert_close(std, f.std(dim=(0, 2, 3)).float())
    p = tmp_path / "extra.npz"  # arrays the loader does not use are not read
    np.savez(p, x=x[:, :, :, 0], y=np.arange(37) % 3, big=np.zeros(10, np.float64))
    src = load(f"npz:{p}", device="cpu", labeled_fraction=0.5)
    assert torch.equal(src.x, torch.from_numpy(x[src.split.train, :, :, :1]).permute(0, 3, 1, 2))
    assert torch.equal(src.x_test, torch.from_numpy(x[src.split.test, :, :, :1]).permute(0, 3, 1, 2))


def test_non_square_npz_images_train_but_are_not_shown_as_pool_images(tmp_path):
    """Training squashes a non-square image to the input side; the pool side (select, probe,
    --extra-unlabeled) crops a square and would show other pixels (a traceback with extras)."""
    from llp_fast.data.extra import native_format

    p = tmp_path / "wide.npz"
    np.savez(p, x=np.zeros((40, 6, 10), np.uint8), y=np.arange(40) % 2)
    src = load(f"npz:{p}", device="cpu", labeled_fraction=0.5)
    assert src.x.shape[1:] == (1, 6, 10)
    with pytest.raises(DataError, match="images are 6 x 10 pixels"):
        native_format(src)


def test_npz_missing_and_garbage(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load(f"npz:{tmp_path}/nope.npz", device="cpu")
    with pytest.raises(DataError, match=f"^{tmp_path}: a directory, not an .npz archive$"):
        load(f"npz:{tmp_path}", device="cpu")  # (it was "no such file")
    monkeypatch.setenv("HOME", str(tmp_path))  # npz:~/... read under $HOME by every caller (a shell leaves it)
    np.savez(tmp_path / "home.npz", x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    assert load("npz:~/home.npz", device="cpu", labeled_fraction=0.5).x.shape[0] > 0
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")  # (NumPy read it as a pickle: "This file contains pickled (object) data")
    with pytest.raises(DataError, match=r"junk.npz is not an .npz archive .* \(its first bytes are b'not a '\)$"):
        load(f"npz:{junk}", device="cpu")
    junk.write_bytes(b"PK\x03\x04 a torn zip")
    with pytest.raises(DataError, match="cannot read .*junk.npz as an .npz archive"):
        load(f"npz:{junk}", device="cpu")
    with pytest.raises(DataError, match="unknown --data"):
        load("cifar", device="cpu")


def make_folder(root, classes=3, per_class=8, size=(12, 14)):
    """A tiny ImageFolder tree of coloured PNGs. The tests below pin the PIL loader; the DALI loader
    is tested in test_dali.py (isolated: native code)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = (rng.random((*size, 3)) * 60).astype(np.uint8)
            a[..., c % 3] += 150
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")
    return root


def test_holding_out_a_fifth_of_the_users_own_labels_is_said(tmp_path):
    """An npz that marks its own 30 labels and has no x_test trained on 24 and measured on 6 of them
    (an accuracy of 6 images), and no line said so."""
    y = np.full(200, -1)
    y[:30] = np.arange(30) % 3
    np.savez(tmp_path / "own.npz", x=np.zeros((200, 8, 8), np.uint8), y=y)
    src = load(f"npz:{tmp_path / 'own.npz'}", device="cpu")
    assert int((src.targets >= 0).sum()) == 24 and src.num_test == 6
    assert f"npz:{tmp_path / 'own.npz'}: no x_test: 6 of its 30 labeled images" in " ".join(src.notes)
    assert "give x_test and y_test to train on all 30" in " ".join(src.notes)
    y[30:] = np.arange(170) % 3  # every image labeled: the fraction picks the labeled ones, nothing to say
    np.savez(tmp_path / "all.npz", x=np.zeros((200, 8, 8), np.uint8), y=y)
    assert not any("no x_test" in n for n in load(f"npz:{tmp_path / 'all.npz'}", device="cpu").notes)


def test_grey_images_saved_with_three_equal_channels_get_the_grayscale_defaults(tmp_path):
    """Digits saved as RGB (an npz of three equal channels, PNGs or JPEGs converted to RGB) took the
    colour defaults, mirrored digits among them: 4.3 points lost at 2% labels (docs/results.md,
    "Grey images saved with three channels")."""
    from PIL import Image

    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (40, 10, 10), dtype=np.uint8)
    y = np.arange(40) % 2
    np.savez(tmp_path / "g.npz", x=np.repeat(grey[..., None], 3, axis=3), y=y)
    src = load(f"npz:{tmp_path / 'g.npz'}", device="cpu")
    assert src.in_channels == 3 and src.facts().channels == 1  # the network takes three; the defaults grey
    assert any(n.startswith("x's three channels are equal") for n in src.notes)
    colour = np.repeat(grey[..., None], 3, axis=3)
    colour[:, 3, 3, 0] ^= 1  # one pixel of one channel in every image
    np.savez(tmp_path / "c.npz", x=colour, y=y)
    assert load(f"npz:{tmp_path / 'c.npz'}", device="cpu").facts().channels == 3
    from llp_fast.data.arrays import _equal_channels

    x = torch.from_numpy(np.repeat(grey[:, None], 3, axis=1).copy())
    assert _equal_channels(x, chunk_elements=300) and _equal_channels(x)  # a chunk of one image at a time
    x[-1, 2, 9, 9] ^= 1  # the last image only
    assert not _equal_channels(x, chunk_elements=300) and not _equal_channels(x)
    for ext, kind in ((".png", "RGB"), (".jpg", "RGB"), (".png", "colour")):
        root = tmp_path / f"f{ext}{kind}"
        for c in range(2):
            (root / f"c{c}").mkdir(parents=True)
            for i in range(6):
                a = np.repeat(rng.integers(0, 255, (16, 16, 1), dtype=np.uint8), 3, axis=2)
                if kind == "colour":
                    a[..., 0] //= 2
                Image.fromarray(a).save(root / f"c{c}" / f"{i}{ext}")
        src = load(f"folder:{root}", device="cpu", workers=0, loader="pil")
        assert src.facts().channels == (3 if kind == "colour" else 1), (ext, kind)
        assert any("colour channels are equal" in n for n in src.notes) == (kind != "colour")


def test_linked_folders_are_counted_and_labeled_txt_matches_either_unicode_form(tmp_path):
    """A linked folder inside a class was dropped without a word: it is not followed (a link to a
    sibling class or to the parent would read images twice, or into another class; a run's file
    list would change under its checkpoint) but said. A class folder named in the decomposed form
    (macOS) did not match labeled.txt's composed name."""
    import os
    import unicodedata

    root = make_folder(tmp_path / "imgs", per_class=4)
    extra = make_folder(tmp_path / "elsewhere", classes=1, per_class=3) / "class0"
    os.symlink(extra, root / "class1" / "more")
    cafe = unicodedata.normalize("NFD", "café")
    os.rename(root / "class2", root / cafe)
    os.symlink(root / cafe, root / "class1" / "sibling")
    os.symlink(root, root / "class0" / "up")
    (root / "labeled.txt").write_text("class0/0.png\nclass1/1.png\ncafé/2.png\n", encoding="utf-8")
    src = load(f"folder:{root}", device="cpu", workers=0, loader="pil")
    assert src.class_names == [cafe, "class0", "class1"]
    assert int((src.targets >= 0).sum()) == 3 and src.num_train + src.num_test == 12  # no image twice
    assert any("3 linked folders are not followed" in n for n in src.notes), src.notes
    import shutil

    shutil.copy(root / "class0" / "0.png", root / "stray.png")  # in no class folder
    src = load(f"folder:{root}", device="cpu", workers=0, loader="pil")
    assert any("1 image lies beside the class folders, in none of them: not read" in n for n in src.notes)


def test_folder_loader_with_label_file(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "labeled.txt").write_text("# labeled\nclass0/0.png\nclass1/0.png\n\nclass2/3.png\n")
    src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, image_size=8, workers=0, loader="pil")
    assert src.class_names == ["class0", "class1", "class2"]
    assert int((src.targets >= 0).sum()) == 3  # labeled.txt, not the fraction
    assert src.num_test > 0 and src.num_train + src.num_test == 24
    order = torch.arange(src.num_train)
    batches = list(src.train_batches(order, 5, None, epoch=0))
    assert torch.equal(torch.cat([i for _, i in batches]), order)
    x = batches[0][0]
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    again = next(src.train_batches(order, 5, None, epoch=0))[0]
    torch.testing.assert_close(x, again)  # crops are seeded by (seed, epoch, position)
    other = next(src.train_batches(order, 5, None, epoch=1))[0]
    assert not torch.allclose(x, other)
    xt, yt = next(src.test_batches(4))
    assert xt.shape[1:] == (3, 8, 8) and yt.dtype == torch.int64


def test_folder_train_test_dirs_and_fraction(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=6)
    make_folder(tmp_path / "d" / "test", per_class=2)
    src = load(f"folder:{tmp_path / 'd'}", device="cpu", labeled_fraction=0.34, image_size=8, workers=0, loader="pil")
    assert src.num_train == 18 and src.num_test == 6
    assert np.bincount(src.targets[src.targets >= 0].numpy()).tolist() == [2, 2, 2]


def test_folder_split_names_in_any_case_and_a_class_named_train(tmp_path):
    """Train/ beside Test/ (as many downloaded sets have them) trained "Test" against "Train" as two
    classes; a vehicles set whose classes are bus, car and train lost bus and car ("no images")."""
    kw = dict(device="cpu", labeled_fraction=0.34, image_size=8, workers=0, loader="pil")
    make_folder(tmp_path / "k" / "Train", per_class=6)
    make_folder(tmp_path / "k" / "Validation", per_class=2)
    src = load(f"folder:{tmp_path / 'k'}", **kw)
    assert src.class_names == ["class0", "class1", "class2"] and (src.num_train, src.num_test) == (18, 6)
    veh = tmp_path / "veh"
    make_folder(veh, per_class=6)
    (veh / "class2").rename(veh / "train")
    src = load(f"folder:{veh}", **kw)
    assert src.class_names == ["class0", "class1", "train"] and src.num_train + src.num_test == 18
    # train/ of class folders beside other folders: the split layout, the others not read (as before)
    make_folder(tmp_path / "both" / "train", per_class=6)
    make_folder(tmp_path / "both" / "test", per_class=2)
    make_folder(tmp_path / "both" / "pool", per_class=2)
    (tmp_path / "both" / "__MACOSX").mkdir()
    src = load(f"folder:{tmp_path / 'both'}", **kw)
    assert src.class_names == ["class0", "class1", "class2"] and (src.num_train, src.num_test) == (18, 6)
    make_folder(tmp_path / "nt" / "train", per_class=6)
    make_folder(tmp_path / "nt" / "unlabeled" / "x", per_class=2)
    assert load(f"folder:{tmp_path / 'nt'}", **kw).class_names == ["class0", "class1", "class2"]


def test_pil_warnings_stay_out_of_the_loaders_workers(tmp_path):
    """PIL's warnings (here a large image's DecompressionBombWarning) printed two lines naming no
    file from every worker process, every pass: a worker leaves them out; the main process keeps
    Python's default (once per place)."""
    code = f"""
import warnings, numpy as np
from PIL import Image
Image.MAX_IMAGE_PIXELS = 1000
Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save({str(tmp_path / "big.png")!r})
from llp_fast.data.loading import _worker_signals
from llp_fast.data.transforms import open_rgb
open_rgb({str(tmp_path / "big.png")!r})  # as the main process: shown
_worker_signals(0)
for _ in range(3):
    open_rgb({str(tmp_path / "big.png")!r})  # as a worker: not
"""
    p = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("DecompressionBombWarning") == 1, p.stderr


def test_label_file_with_a_byte_order_mark_and_a_hash_in_a_name(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "class1" / "0.png").rename(root / "class1" / "photo #1.png")
    text = "# labeled\nclass0/0.png  # the first\nclass1/photo #1.png\nclass2/3.png\n"
    (root / "labeled.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Notepad's UTF-8
    src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, image_size=8, workers=0, loader="pil")
    assert int((src.targets >= 0).sum()) == 3
    (root / "labeled.txt").write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load(f"folder:{root}", device="cpu", workers=0, loader="pil")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load(f"folder:{tmp_path}/missing", device="cpu")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load(f"folder:{tmp_path / 'empty'}", device="cpu")
    root = make_folder(tmp_path / "imgs")
    (root / "labeled.txt").write_text("class0/0.png\nclass1/nope.png\n")
    with pytest.raises(DataError, match="bad label file .*line 2"):
        load(f"folder:{root}", device="cpu", workers=0, loader="pil")
    (root / "labeled.txt").write_text("class0/0.png\nclass1/0.png\n")  # class2 has none
    with pytest.raises(DataError, match="'class2' has no labeled"):
        load(f"folder:{root}", device="cpu", workers=0, loader="pil")
    (root / "labeled.txt").unlink()
    (root / "class3").mkdir()  # it blamed --labeled-fraction, even at 1
    with pytest.raises(DataError, match=r"class folder .*class3 holds no image"):
        load(f"folder:{root}", device="cpu", workers=0, loader="pil", labeled_fraction=1.0)
    one = make_folder(tmp_path / "one", classes=1)
    with pytest.raises(DataError, match=r"one class folder only \(class0\)"):
        load(f"folder:{one}", device="cpu", workers=0, loader="pil")


def test_wide_grey_pixels_read_as_dali_reads_them_or_are_refused(tmp_path):
    """PIL's own conversion clipped 16-bit grey to 255 (white images); 16-bit PNG grey reads
    round(v / 257), 32-bit integer and floating-point pixels are one line naming the file."""
    from PIL import Image

    from llp_fast.data.transforms import open_image

    v = np.array([[0, 257, 64 * 257, 65535]], np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert np.asarray(open_image(str(tmp_path / "g16.png"), "L")).tolist() == [[0, 1, 64, 255]]
    Image.fromarray(np.array([[0, 64, 252]], np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    for name, why in (("i32.tif", "32-bit pixels"), ("f.tif", "floating-point pixels")):
        with pytest.raises(DataError, match=f"{name}: {why}"):
            open_image(str(tmp_path / name))


def test_folder_hidden_entries_are_not_images(tmp_path):
    """A class folder's hidden folders (thumbnails) and files (macOS's ._name) trained as the class;
    the pool scanner already skipped hidden folders."""
    import shutil

    from llp_fast.data.extra import open_pool

    root = make_folder(tmp_path / "imgs", per_class=4)
    (root / "class0" / ".thumbnails").mkdir()
    shutil.copy(root / "class0" / "0.png", root / "class0" / ".thumbnails" / "t.png")
    (root / "class1" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    src = load(f"folder:{root}", device="cpu", workers=0, loader="pil", labeled_fraction=0.5)
    assert src.num_train + src.num_test == 12
    assert len(open_pool(f"folder:{root}", workers=0)) == 12  # the pool side skips them too


def test_files_not_read_as_images_are_counted_and_said(tmp_path):
    """Photos in a format the loaders do not read (.heic) were dropped without a word: a class lost
    most of its images, or a folder of them was "no images found"."""
    root = make_folder(tmp_path / "imgs", per_class=4)
    for i in range(3):
        (root / "class0" / f"p{i}.HEIC").write_bytes(b"not read")
    (root / "class1" / "notes").write_text("x")
    (root / "class1" / ".DS_Store").write_bytes(b"hidden: not counted")
    src = load(f"folder:{root}", device="cpu", workers=0, loader="pil", labeled_fraction=0.5)
    assert src.num_train + src.num_test == 12
    assert len(src.notes) == 1
    assert "4 files are not read as images (3 .heic, 1 (no extension))" in src.notes[0], src.notes
    clean = load(f"folder:{make_folder(tmp_path / 'clean', per_class=4)}", device="cpu", workers=0, loader="pil")
    assert clean.notes == []
    heic = tmp_path / "heic"
    for c in ("a", "b"):
        (heic / c).mkdir(parents=True)
        (heic / c / "1.heic").write_bytes(b"not read")
    with pytest.raises(DataError, match=r"no images found .*2 files are not read as images \(2 \.heic\)"):
        load(f"folder:{heic}", device="cpu", workers=0, loader="pil")
    (root / "class2" / "only.heic").write_bytes(b"x")
    for f in (root / "class2").glob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match=r"class2 holds no image; 5 files are not read as images \(4 \.heic"):
        load(f"folder:{root}", device="cpu", workers=0, loader="pil")


def test_folder_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    (root / "class1" / "0.png").write_bytes(b"garbage, not a png")
    src = load(f"folder:{root}", device="cpu", labeled_fraction=1.0, image_size=8, workers=0, loader="pil")
    with pytest.raises(DataError, match="cannot read image"):
        list(src.train_batches(torch.arange(src.num_train), 4, None))


def test_npz_huge_class_id_is_refused_before_anything_is_sized(tmp_path):
    """One label of 2**40 made the trainer build a list of 2**40 class names (24 GB, OOM)."""
    y = np.arange(60) % 3
    y[7] = 2**40
    p = _write_npz(tmp_path / "huge.npz", y=y)
    with pytest.raises(DataError, match="class ids must be 0..S-1") as err:
        load(f"npz:{p}", device="cpu", labeled_fraction=0.5)
    assert "1099511627776" in str(err.value) and "no 3" in str(err.value)
    y_gap = np.arange(60) % 3 * 2  # classes 0, 2, 4: ids with gaps
    p = _write_npz(tmp_path / "gap.npz", y=y_gap, test=False)
    with pytest.raises(DataError, match="no 1"):
        load(f"npz:{p}", device="cpu", labeled_fraction=0.5)


def test_npz_whose_held_out_split_would_be_empty_is_refused_up_front(tmp_path):
    """An npz marking its own labeled rows, 2 per class, no x_test: 20% of 2 rounds to none. It
    trained a whole epoch, then failed in torch.cat with no checkpoint."""
    y = np.full(60, -1)
    y[:6] = np.arange(6) % 3
    p = _write_npz(tmp_path / "d.npz", y=y, test=False)
    with pytest.raises(DataError, match="held-out split is empty"):
        load(f"npz:{p}", device="cpu", labeled_fraction=None)


def test_the_evaluation_crop_resamples_its_region_alone(tmp_path):
    """The PIL loader resized the whole image and cropped: a 3000 x 2 image at 224 px became
    383,040 x 255 (0.6 s and 300 MB a sample). Resampling the crop's region alone uses the same
    positions and filter: within a grey level's rounding of resize-then-crop, on odd sizes."""
    from PIL import Image

    from llp_fast.data.folder import _Images
    from llp_fast.data.transforms import eval_geometry

    rng = np.random.default_rng(0)
    for w, h, s in ((3000, 2, 224), (2, 900, 32), (40, 31, 16), (97, 61, 80), (300, 200, 8)):
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        got, _ = _Images([str(path)], s, 0.35, False)[(0, -1)]
        bw, bh, left, top = eval_geometry(w, h, s)
        with Image.open(path) as im:
            whole = im.convert("RGB").resize((bw, bh), Image.BILINEAR).crop((left, top, left + s, top + s))
        want = torch.from_numpy(np.asarray(whole).copy()).permute(2, 0, 1)
        assert got.shape == (3, s, s) and (got.int() - want.int()).abs().max() <= 1, (w, h, s)
