"""``folder:`` data through NVIDIA DALI's CPU pipeline (llp_fast.data.dali), against the PIL loader.

Both loaders take each sample's geometry from llp_fast.data.folder (the same crop boxes and flips,
seeded by (seed, epoch, position); the same evaluation resize and centre crop) and normalise with
the same code, so their images differ only where decoding and resampling do:

- decoding: both use libjpeg-turbo; here the decoded pixels are bitwise the same.
- resampling: PIL's BILINEAR and DALI's linear antialiased resize evaluate the same triangle
  filter at the same positions and round differently: at most 1 grey level (of 255) apart
  wherever the filter lies inside the image. Where it reaches past the image edge (only the
  first and last output row and column can, when the box touches the edge) PIL drops the
  missing taps and renormalises, DALI repeats the edge pixel: there the difference grows with
  the contrast at the image's edge (up to 22 levels measured on these noisy test images).

Hence the tolerance: <= 1 grey level off the border rows and columns, <= 0.5 level on average
over all pixels (measured 0.12-0.38 over 8-224 px outputs), and on the border DALI equals PIL
resampling the edge-replicated image within 1 level (the border rule is the whole difference).
bench/bench_loader.py reports the same comparison at 224 px.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llp_fast import _optional
from llp_fast.cli.train import main as train_main
from llp_fast.data import load
from llp_fast.data.transforms import MEAN, STD, open_image
from llp_fast.errors import MARKER, ConfigError, DataError

# DALI is native code: a crash fails these tests, not the run (tests/_isolate.py)
pytestmark = pytest.mark.isolated

needs_dali = pytest.mark.skipif(
    _optional.dali() is None,
    reason="NVIDIA DALI is not installed (pip install 'llp_fast[dali]'; make test and CI install it)",
)

INNER_LEVELS, MEAN_LEVELS = 1, 0.5  # DALI against PIL, grey levels of 255 (module docstring)
SCALE = torch.tensor(STD).view(1, 3, 1, 1) * 255  # one grey level, per channel, in normalised units


def _picture(rng, w, h, grey=False):
    """A JPEG-like scene: gradients, a few discs, noise (smooth and sharp parts alike)."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (w + h)], -1) + rng.normal(0, 12, (h, w, 3))
    for _ in range(3):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(2, max(3, min(w, h) // 3))
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im.convert("L") if grey else im


def make_jpegs(root, classes=3, per_class=7, sizes=((24, 20), (40, 31), (19, 33), (64, 48)), seed=0):
    """An ImageFolder tree of JPEGs of several sizes and aspect ratios, every fourth one grey."""
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[n % len(sizes)]
            _picture(rng, w, h, grey=n % 4 == 3).save(root / f"c{c}" / f"{i}.jpg", quality=90)
            n += 1
    return root


def both(root, **kw):
    """The same folder through DALI and through PIL."""
    kw = {"device": "cpu", "labeled_fraction": 0.5, "image_size": 16, "workers": 0, **kw}
    return load(f"folder:{root}", loader="dali", **kw), load(f"folder:{root}", loader="pil", **kw)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised batches in grey levels."""
    return ((a - b) * SCALE).abs()


@needs_dali
def test_every_example_once_and_the_short_last_batch(tmp_path):
    dali, pil = both(make_jpegs(tmp_path / "d"))
    assert dali.loader == "dali" and pil.loader == "pil" and dali.dali is not None
    n = dali.num_train
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    batches = list(dali.train_batches(order, 5, None, epoch=0))
    assert [int(i.shape[0]) for _, i in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert n % 5 != 0  # the data make a short last batch
    assert torch.equal(torch.cat([i for _, i in batches]), order)  # each once, in order, nothing padded
    for x, i in batches:
        assert x.shape == (i.shape[0], 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
        assert i.dtype == torch.int64
    # held-out and index passes: every example once, with its label
    xs, ys = zip(*dali.test_batches(4))
    assert torch.equal(torch.cat(ys), dali.y_test) and sum(x.shape[0] for x in xs) == dali.num_test
    some = torch.tensor([3, 3, 0, n - 1])  # a repeat stays a repeat (as in the PIL loader)
    got = [i for _, i in dali.index_batches(some, 3)]
    assert torch.equal(torch.cat(got), some)


@needs_dali
def test_mid_epoch_resume_replays_the_epoch(tmp_path):
    dali, _ = both(make_jpegs(tmp_path / "d"))
    order = torch.randperm(dali.num_train, generator=torch.Generator().manual_seed(1))
    whole = list(dali.train_batches(order, 4, None, epoch=2))
    again = list(dali.train_batches(order, 4, None, epoch=2))
    later = list(dali.train_batches(order, 4, None, start=2, epoch=2))
    assert len(later) == len(whole) - 2
    for (x, i), (y, j) in zip(whole, again):
        assert torch.equal(x, y) and torch.equal(i, j)  # deterministic
    for (x, i), (y, j) in zip(whole[2:], later):
        assert torch.equal(x, y) and torch.equal(i, j)  # bitwise the uninterrupted epoch
    other = next(dali.train_batches(order, 4, None, epoch=3))[0]
    assert not torch.equal(whole[0][0], other)  # a new epoch, new crops


@needs_dali
@pytest.mark.parametrize("size", [16, 72])  # 72: above 64 px the evaluation resize is 1.14 x the crop
def test_evaluation_images_match_pil(tmp_path, size):
    root = make_jpegs(tmp_path / "d", sizes=((24, 20), (40, 31), (19, 33), (100, 80), (130, 90)))
    dali, pil = both(root, image_size=size)
    d = torch.cat([levels(a, b) for (a, _), (b, _) in zip(dali.test_batches(6), pil.test_batches(6))])
    idx = torch.arange(dali.num_train)
    e = torch.cat([levels(a, b) for (a, _), (b, _) in zip(dali.index_batches(idx, 8), pil.index_batches(idx, 8))])
    for diff in (d, e):
        assert diff.shape[1:] == (3, size, size)
        check_tolerance(diff)


def check_tolerance(diff: torch.Tensor) -> None:
    inner = diff[:, :, 1:-1, 1:-1]  # off the border rows and columns
    assert inner.max() <= INNER_LEVELS + 1e-3, inner.max()
    assert diff.mean() <= MEAN_LEVELS, diff.mean()


@needs_dali
def test_border_pixels_differ_by_the_border_rule_alone(tmp_path):
    """On the border, DALI matches PIL resampling the image padded by repeating its edge pixels."""
    from PIL import Image

    from llp_fast.data.transforms import eval_geometry

    root = make_jpegs(tmp_path / "d", sizes=((24, 20), (40, 31), (19, 33), (9, 12)))
    dali, _ = both(root)
    s, pad = 16, 8
    mean, std = torch.tensor(MEAN).view(3, 1, 1) * 255, torch.tensor(STD).view(3, 1, 1) * 255
    x, _ = next(dali.test_batches(64))
    for k, path in enumerate(dali.test_files):
        im = Image.open(path).convert("RGB")
        w, h = im.size
        big_w, big_h, left, top = eval_geometry(w, h, s)
        sx, sy = w / big_w, h / big_h
        box = (left * sx + pad, top * sy + pad, (left + s) * sx + pad, (top + s) * sy + pad)
        edged = Image.fromarray(np.pad(np.asarray(im), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        ref = torch.from_numpy(np.asarray(edged.resize((s, s), Image.BILINEAR, box=box)).copy()).permute(2, 0, 1)
        got = x[k] * std + mean
        assert (got - ref.float()).abs().max() <= 1 + 1e-3, path


@needs_dali
def test_training_crops_and_flips_match_pil(tmp_path):
    dali, pil = both(make_jpegs(tmp_path / "d"), scale_min=0.2, flip=True)
    order = torch.randperm(dali.num_train, generator=torch.Generator().manual_seed(0))
    for (a, i), (b, j) in zip(dali.train_batches(order, 6, None, epoch=1), pil.train_batches(order, 6, None, epoch=1)):
        assert torch.equal(i, j)
        check_tolerance(levels(a, b))


@needs_dali
def test_channels_and_normalisation_identical(tmp_path):
    """Lossless PNGs at the input size (the evaluation resize is then the identity): RGB order,
    grey and palette images made 3-channel, and the normalisation, bitwise as PIL's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, mode in enumerate(["RGB", "L", "P"]):
        (tmp_path / "d" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            a[0, 0] = (255, 0, 0)  # pure red in the corner
            Image.fromarray(a).convert(mode).save(tmp_path / "d" / f"c{c}" / f"{i}.png")
    dali, pil = both(tmp_path / "d")
    idx = torch.arange(dali.num_train)
    for (a, _), (b, _) in zip(dali.index_batches(idx, 5), pil.index_batches(idx, 5)):
        assert torch.equal(a, b)
    x, y = next(dali.test_batches(64))
    rgb = x[y == 0][:, :, 0, 0]  # the RGB class's red corner, normalised
    expect = (torch.tensor([255.0, 0, 0]) - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255)
    torch.testing.assert_close(rgb, expect.expand_as(rgb))
    grey = x[y == 1]
    back = grey * SCALE + torch.tensor(MEAN).view(1, 3, 1, 1) * 255  # grey: three equal channels
    torch.testing.assert_close(back[:, 0], back[:, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(back[:, 0], back[:, 2], atol=1e-3, rtol=0)


def _truncate(path):
    """Cuts a JPEG inside its entropy-coded data: its header reads (PIL's ``open`` and the host's
    geometry pass succeed), the decode fails."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")  # start of scan
    path.write_bytes(data[: sos + (len(data) - sos) // 3])


@needs_dali
def test_corrupt_jpeg_is_one_data_error_naming_the_file(tmp_path):
    root = make_jpegs(tmp_path / "d", sizes=((64, 48),))
    dali, _ = both(root, labeled_fraction=1.0)
    for k, spoil in ((5, _truncate), (9, lambda p: p.write_bytes(b"not a jpeg" * 20))):
        # truncated: caught by DALI's decoder; not a JPEG: caught by the host reading the header
        path = dali.files[k]
        good = Path(path).read_bytes()
        spoil(Path(path))
        with pytest.raises(DataError, match=f"^{MARKER}cannot read image {re.escape(path)} "):
            list(dali.index_batches(torch.tensor([0, 1, k, 2]), 2))
        with pytest.raises(DataError, match=f"cannot read image {re.escape(path)} "):
            list(dali.train_batches(torch.arange(dali.num_train), 3, None))
        Path(path).write_bytes(good)
    # the files restored, the same pipeline decodes every image again, as PIL does
    _, pil = both(root, labeled_fraction=1.0)
    idx = torch.arange(dali.num_train)
    got, want = (list(src.index_batches(idx, 8)) for src in (dali, pil))
    assert torch.equal(torch.cat([i for _, i in got]), idx)
    check_tolerance(torch.cat([levels(a, b) for (a, _), (b, _) in zip(got, want)]))


@needs_dali
def test_a_failure_pil_does_not_share_names_the_batch(tmp_path):
    """DALI stricter than PIL: no file to blame, so the line names the batches in flight."""
    dali, _ = both(make_jpegs(tmp_path / "d", per_class=3))
    err = RuntimeError(
        "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nencountered:\n\n"
        "nvImageCodec failure: '#3'\nCurrent pipeline object is no longer valid."
    )
    e = dali.dali._decode_error(dali.files, collections.deque([[(0, 5), (1, 6)], [(2, 7)]]), err)
    assert isinstance(e, DataError)
    assert str(e) == (
        f"DALI cannot decode an image of {dali.files[0]} and 2 more in the same batches (nvImageCodec failure: "
        "'#3'; PIL reads them all: try --loader pil)"
    )
    # the decoder names the sample by its place in the failed batch (the oldest in flight): that file
    err = RuntimeError(str(err).replace("nvImageCodec failure: '#3'", "Failed to decode sample #1 :"))
    e = dali.dali._decode_error(dali.files, collections.deque([[(0, 5), (1, 6)], [(2, 7)]]), err)
    want = f"DALI cannot decode an image of {dali.files[1]} (Failed to decode sample #1 :; PIL reads it: try"
    assert str(e) == want + " --loader pil)"


@needs_dali
def test_corrupt_jpeg_through_the_trainer_is_one_line(tmp_path, capsys):
    root = make_jpegs(tmp_path / "d", sizes=((64, 48),))
    _truncate(root / "c1" / "2.jpg")
    rc = train_main(
        ["--data", f"folder:{root}", "--loader", "dali", "--run-dir", str(tmp_path / "r"), *_TINY, "--quiet"]
    )
    _, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("llp-fast-train: error: cannot read image ") and str(root) in lines[0], lines[0]


def test_loader_flag_errors(tmp_path, capsys, monkeypatch):
    """``--loader dali`` without DALI, or on array data: one line, exit 2; ``auto`` falls back to PIL."""
    from llp_fast.train.config import TrainConfig, validate

    root = make_jpegs(tmp_path / "d", per_class=3)
    with pytest.raises(ConfigError, match="--loader dali decodes folder: images"):
        load("digits", loader="dali")
    with pytest.raises(ConfigError, match="--loader pil decodes folder: images"):  # it was accepted, meaning nothing
        load("digits", loader="pil")
    with pytest.raises(ConfigError, match="--loader must be one of auto, dali, pil"):
        validate(TrainConfig(loader="opencv"))
    monkeypatch.setattr(_optional, "dali", lambda: None)  # as if DALI were not installed
    assert load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="auto", workers=0).loader == "pil"
    monkeypatch.setenv("HOME", str(tmp_path))  # folder:~/... under $HOME, as npz:~/... (a shell leaves the ~)
    assert len(load("folder:~/d", device="cpu", labeled_fraction=0.5, loader="pil", workers=0).targets) > 0
    rc = train_main(["--data", f"folder:{root}", "--loader", "dali", "--run-dir", str(tmp_path / "r"), *_TINY])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0] == (
        "llp-fast-train: error: --loader dali: NVIDIA DALI is not installed (pip install 'llp_fast[dali]', "
        "or use --loader pil)"
    )


@needs_dali
def test_sixteen_bit_grey_pngs_read_alike(tmp_path):
    """PIL's conversion clipped 16-bit grey to 255 (every image white); both loaders now read
    round(v / 257). Floating-point pixels are one line naming the file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "d" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            v = rng.integers(0, 65536, (12, 12)).astype(np.uint16)
            Image.fromarray(v).save(tmp_path / "d" / f"c{c}" / f"{i}.png")
    dali, pil = both(tmp_path / "d", labeled_fraction=1.0, image_size=12)
    (a, ya), (b, yb) = next(dali.test_batches(8)), next(pil.test_batches(8))
    assert torch.equal(ya, yb) and levels(a, b).max() == 0
    grey = (b[:, 0] * STD[0] + MEAN[0]) * 255  # a 16-bit value v reads round(v / 257)
    assert 50 < float(grey.mean()) < 200 and float(grey.std()) > 30
    Image.fromarray(np.ones((12, 12), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: floating-point pixels"):
        open_image(str(tmp_path / "f.tif"))


@needs_dali
def test_gif_under_dali_names_the_file(tmp_path):
    from PIL import Image

    root = make_jpegs(tmp_path / "d", per_class=3)
    Image.new("RGB", (20, 20)).save(root / "c0" / "x.gif")
    with pytest.raises(DataError, match=r"x\.gif: DALI does not decode GIF images \(use --loader pil\)"):
        load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="dali", workers=0)
    assert load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="pil", workers=0).loader == "pil"


@needs_dali
def test_auto_decodes_a_folder_with_gifs_by_pil_and_says_so(tmp_path):
    """--loader auto (DALI installed) stopped on a GIF the user never asked DALI to read, as did
    llp-fast-linear-probe on a folder (it decodes with PIL; its error named a --loader it lacks)."""
    from PIL import Image

    from llp_fast.probe import probe_features

    root = make_jpegs(tmp_path / "d", per_class=4)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "c0" / "x.gif")
    src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="auto", workers=0)
    assert src.loader == "pil" and src.dali is None
    assert "--loader auto: pil, for the 1 GIF image(s) among the files (DALI decodes none)" in src.notes
    assert list(src.test_batches(64))
    plain = load(f"folder:{make_jpegs(tmp_path / 'e', per_class=5)}", device="cpu", labeled_fraction=0.5, workers=0)
    assert plain.loader == "dali" and not any("GIF" in n for n in plain.notes)  # (no GIF: DALI, unsaid)
    net = load("digits", device="cpu", labeled_fraction=0.5, image_size=8)
    _, tr_y, _, te_y, classes = probe_features(torch.nn.Identity(), net, f"folder:{root}", batch_size=8, pixels=True)
    assert classes == 3 and len(tr_y) + len(te_y) == 13


@needs_dali
def test_auto_takes_pil_for_gifs_among_the_extra_unlabeled_images(tmp_path):
    """--loader auto checked the data's files for GIFs, not --extra-unlabeled's: a GIF selected from
    a pool stopped the run with DALI's refusal (found by review, 2026-12-08)."""
    from PIL import Image

    from llp_fast.data.extra import add_extra_unlabeled
    from llp_fast.data.selection import write_selection

    root = make_jpegs(tmp_path / "d", per_class=4)
    pool = make_jpegs(tmp_path / "pool", per_class=2)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(pool / "c0" / "x.gif")
    paths = sorted(str(p) for p in pool.rglob("*.*"))
    sel = str(tmp_path / "sel.npz")
    n = len(paths)
    write_selection(sel, np.arange(n), np.zeros(n, np.int64), np.ones(n, np.float32), {"source": "x"}, paths=paths)
    src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="auto", workers=0, image_size=8)
    assert src.loader == "dali"
    assert add_extra_unlabeled(src, sel) == n and src.loader == "pil" and src.dali is None
    assert src.extra_note == "--loader auto: pil, for the 1 GIF image(s) among them (DALI decodes none)"
    assert len(list(src.index_batches(torch.arange(src.num_train), 64))) == 1
    src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader="dali", workers=0, image_size=8)
    with pytest.raises(DataError, match=r"x\.gif: DALI does not decode GIF images"):  # (asked for: refused)
        add_extra_unlabeled(src, sel)


@needs_dali
def test_what_dali_decodes_wrongly_is_refused_and_pil_reads_it(tmp_path):
    """A TIFF of grey and alpha: DALI put the alpha in the green channel (up to 243 levels off,
    no error). A 16-bit PGM: PIL's reading was refused as "32-bit pixels"; DALI does not rescale
    one whose maximum is below 65535."""
    from PIL import Image

    la = Image.fromarray(np.full((16, 16), 78, np.uint8), "L").convert("LA")
    la.putalpha(100)
    v = np.arange(24 * 24).reshape(24, 24) * 7  # 0..4025 of a 12-bit maximum
    pgm = b"P5\n24 24\n4095\n" + v.astype(">u2").tobytes()
    rgb = b"P6\n# a comment\n24 24\n100\n" + (np.arange(24 * 24 * 3) % 101).astype(np.uint8).tobytes()
    cases = (
        ("la.tif", re.escape("a TIFF of two channels (grey or palette, and alpha)")),
        ("lab.tif", re.escape("a CIE-Lab TIFF")),  # (read as if RGB, up to 75 levels off: review, 2026-12-08)
        ("g12.pgm", re.escape("a PGM/PPM of maximum 4095 (DALI reads 255 only)")),
        ("rgb100.ppm", re.escape("a PGM/PPM of maximum 100 (DALI reads 255 only)")),
    )
    for name, what in cases:
        root = make_jpegs(tmp_path / name, per_class=3)
        if name == "la.tif":
            la.save(root / "c0" / name)
        elif name == "lab.tif":
            Image.fromarray(np.tile(np.arange(24, dtype=np.uint8)[:, None] * 10, (1, 24, 3))).convert("LAB").save(
                root / "c0" / name
            )
        else:
            (root / "c0" / name).write_bytes(pgm if name == "g12.pgm" else rgb)
        dali, _ = both(root, labeled_fraction=1.0)
        with pytest.raises(DataError, match=rf"{re.escape(name)}: DALI decodes {what} wrongly \(use --loader pil"):
            list(dali.index_batches(torch.arange(dali.num_train), 64))
            list(dali.test_batches(64))
    from llp_fast.data.dali import _misdecoded

    for ordinary in (b"P5 2 2 255\n" + bytes(4), b"P6\n#x 1\n2 2\n255\n" + bytes(12), b"P4\n8 1\n\x00"):
        assert _misdecoded("PPM", 1, ordinary) is None  # (maximum 255, or a bitmap: decoded alike)
    root = tmp_path / "la.tif"
    assert np.asarray(open_image(str(root / "c0" / "la.tif"))).tolist()[3][3] == [78, 78, 78]
    grey = np.asarray(open_image(str(tmp_path / "g12.pgm" / "c0" / "g12.pgm")))[..., 0].astype(np.int64)
    assert np.abs(grey - np.round(v * 255 / 4095)).max() <= 1  # PIL scales to 65535, then round(v / 257)


@needs_dali
def test_a_floating_point_tiff_is_refused_by_both_loaders(tmp_path):
    """PIL refused it (no agreed 8-bit reading); DALI read it and trained."""
    from PIL import Image

    root = make_jpegs(tmp_path / "d", per_class=3)
    Image.fromarray(np.random.default_rng(0).random((16, 16)).astype(np.float32)).save(root / "c1" / "f.tif")
    for loader in ("dali", "pil"):
        with pytest.raises(DataError, match=r"f\.tif: floating-point pixels"):
            src = load(f"folder:{root}", device="cpu", labeled_fraction=0.5, loader=loader, workers=0, image_size=8)
            list(src.test_batches(64)), list(src.train_batches(torch.arange(src.num_train), 64, None, epoch=0))


@needs_dali
def test_a_gif_named_like_a_jpeg_is_named_by_its_content(tmp_path):
    """A GIF saved as ``.jpg`` (scraped data): DALI's failure named a good file of the batch."""
    from PIL import Image

    root = make_jpegs(tmp_path / "d", per_class=3)
    Image.new("P", (20, 20)).save(root / "c1" / "fake.jpg", format="GIF")
    dali, _ = both(root, labeled_fraction=1.0)
    with pytest.raises(DataError, match=r"fake\.jpg: DALI does not decode GIF images \(use --loader pil\)"):
        list(dali.index_batches(torch.arange(dali.num_train), 4))


@needs_dali
def test_dali_native_log_lines_stay_out_of_the_output(tmp_path, capfd):
    """DALI's decoders log to file descriptor 2 from their threads: a CMYK TIFF (decoded anyway)
    printed a coloured "[ERROR] [libtiff_decoder]" line per decode, a truncated JPEG an "[ERROR]
    [libjpeg_turbo_decoder]" line before the one error line; libjpeg's own warning, unprefixed,
    "Corrupt JPEG data: 3 extraneous bytes before marker 0xd9" on every decode of a JPEG with bytes
    before its end marker, which it (and PIL) decodes anyway. (libjpeg's fatal messages, such as
    "Input file read error", pass: the run's error line names the file after them.)"""
    from PIL import Image

    root = make_jpegs(tmp_path / "d", per_class=4)
    for c in range(3):
        Image.new("RGB", (24, 20), (80 * c, 40, 200)).convert("CMYK").save(root / f"c{c}" / "k.tif")
    noise = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "c2" / "x.jpg", quality=90)
    data = (root / "c2" / "x.jpg").read_bytes()
    assert data.endswith(b"\xff\xd9")
    (root / "c2" / "x.jpg").write_bytes(data[:-2] + bytes(range(1, 65)) + b"\xff\xd9")  # extraneous bytes
    args = ["--data", f"folder:{root}", "--loader", "dali", *_TINY, "--quiet"]
    assert train_main([*args, "--run-dir", str(tmp_path / "r1")]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "[ERROR]" not in out, (out, err)
    dali, _ = both(root, labeled_fraction=1.0)  # what the process itself writes meanwhile passes, in order
    batches = -(-dali.num_train // 4)
    for n, _ in enumerate(dali.index_batches(torch.arange(dali.num_train), 4)):
        print(f"batch {n}", file=sys.stderr, end="\n" if n % 2 else "\r")
    assert batches >= 3 and capfd.readouterr().err == "".join(
        f"batch {n}" + ("\n" if n % 2 else "\r") for n in range(batches)
    )
    _truncate(root / "c1" / "2.jpg")
    assert train_main([*args, "--run-dir", str(tmp_path / "r2")]) == 2
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert lines[-1].startswith("llp-fast-train: error: cannot read image "), err
    assert not [line for line in lines if re.search(r"\[(ERROR|WARNING|INFO)\] ", line)], err


def test_the_log_filter_drops_whole_dali_lines_only(capfd):
    """Only whole lines in DALI's format go (a ``[WARNING] [x]`` inside a line cut it and merged it
    with the next); a partial line that cannot begin one is handed on at once, one that can is held
    to its end."""
    from llp_fast.data.dali import _NativeLogFilter

    dali_line = b"\x1b[0;31m[ERROR] \x1b[0m[libtiff_decoder] Unsupported photometric interpretation: 5\n"
    jpeg_lines = b"Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\nPremature end of JPEG file\n"
    with _NativeLogFilter():
        os.write(2, b"step 3: saw [WARNING] [x] odd value\nnext line\n" + dali_line + jpeg_lines)
        os.write(2, b"Corrupt JPEG da")  # a start held to its end
        os.write(2, b"ta: bad Huffman code\nsaw Corrupt JPEG data: x\nPremature end of JPEG file, said nobody\n")
        # the decoders' libraries (a truncated BMP, a PNG's bad CRC) went through
        os.write(2, b"[ERROR:0@0.013] global loadsave.cpp:1409 imdecode_ Unexpected end of input stream\n")
        os.write(2, b"[ERR")
        os.write(2, b"OR:0@1.5] global x\nlibpng error: IDAT: CRC error\n")
        os.write(2, b"[WARN")
        os.write(2, b"ING] [nvimgcodec] split across writes\n\r 50%|## | bar")
        with _NativeLogFilter():  # nested: the same pipe
            os.write(2, b"\r100%|####| bar\n[llp] epoch 1\n")
    assert (
        capfd.readouterr().err == "step 3: saw [WARNING] [x] odd value\nnext line\nsaw Corrupt JPEG data: x\n"
        "Premature end of JPEG file, said nobody\n\r 50%|## | bar\r100%|####| bar\n[llp] epoch 1\n"
    )


def test_the_log_filter_never_blocks_its_writers_when_stderr_fails(tmp_path):
    """Its thread died on the first failed write (stderr a pipe whose reader is gone), and 64 KB
    later every writer to fd 2, DALI's threads included, blocked for good."""
    script = (
        "import os\nfrom llp_fast.data.dali import _NativeLogFilter\n"
        "with _NativeLogFilter():\n    for i in range(3000): os.write(2, b'x' * 99 + b'\\n')\nprint('pass ended')\n"
    )
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], stderr=write, capture_output=False, stdout=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write)
    assert b"pass ended" in proc.stdout


_TINY = ["--width", "4", "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--k", "3", "--t", "5"]
_TINY += ["--labeled-fraction", "0.5", "--device", "cpu", "--threads", "1", "--workers", "1"]
_TINY += ["--method", "paper"]  # DALI makes no strong views (--method plus's consistency term)


@needs_dali
def test_trainer_end_to_end_through_dali(tmp_path, capsys):
    root = make_jpegs(tmp_path / "d", per_class=10)
    rd = tmp_path / "run"
    assert train_main(["--data", f"folder:{root}", "--loader", "dali", "--run-dir", str(rd), *_TINY]) == 0
    out, err = capsys.readouterr()
    first = err.strip().splitlines()[0]
    assert first.startswith("llp-fast-train: LLP (the paper's method) on folder:") and ", loader dali (CPU), " in first
    assert "held-out top-1 LLP" in out
    rows = [json.loads(line) for line in open(rd / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and 0 <= rows[0]["test_top1"] <= 1


# GPU: run on a machine with one (pytest -m cuda); skipped here, where it cannot run.
@pytest.mark.cuda
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI's mixed decode)")
def test_gpu_decode_against_the_cpu_pipeline(tmp_path):
    """The same samples decoded by nvJPEG and resized on the GPU: every index once, on the GPU,
    channels_last. nvJPEG and libjpeg-turbo round differently; never measured, so the difference
    is printed and only a loose sanity bound (2 grey levels on average) asserted."""
    root = make_jpegs(tmp_path / "d", sizes=((64, 48), (100, 80), (130, 90)))
    kw = {"labeled_fraction": 0.5, "image_size": 32, "workers": 2}
    gpu = load(f"folder:{root}", device="cuda", loader="dali", **kw)
    cpu = load(f"folder:{root}", device="cpu", loader="dali", **kw)
    order = torch.randperm(gpu.num_train, generator=torch.Generator().manual_seed(0))
    for name, g, c in [
        ("train", gpu.train_batches(order, 5, None, epoch=1), cpu.train_batches(order, 5, None, epoch=1)),
        ("eval", gpu.test_batches(5), cpu.test_batches(5)),
    ]:
        diffs = []
        for (a, i), (b, j) in zip(g, c):
            assert a.is_cuda and a.is_contiguous(memory_format=torch.channels_last) and torch.equal(i.cpu(), j)
            diffs.append(levels(a.cpu(), b))
        d = torch.cat(diffs)
        print(f"{name}: GPU against CPU decode, grey levels: max {d.max():.1f}, mean {d.mean():.3f}")
        assert d.mean() <= 2, d.mean()


@needs_dali
def test_trainer_resumes_mid_epoch_through_dali_exactly(tmp_path, capsys):
    """A run stopped after two steps of its first epoch and resumed through DALI ends with the
    same weights, bank and metrics as the run that was never stopped: the resumed epoch replays
    the same order and the same random crops from its third batch on."""
    from llp_fast.train.checkpoint import CHECKPOINT

    root = make_jpegs(tmp_path / "d", per_class=10)
    args = ["--data", f"folder:{root}", "--loader", "dali", *_TINY, "--epochs", "2", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_main([*args, "--run-dir", str(full)]) == 0
    assert train_main([*args, "--run-dir", str(cut), "--stop-after-steps", "2"]) == 130
    saved = torch.load(cut / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] == 2
    assert train_main(["--resume", str(cut), "--quiet"]) == 0
    capsys.readouterr()

    def rows(run):  # without the wall-clock figures
        timing = {"images_per_s", "epoch_seconds"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]

    assert rows(full) == rows(cut) and len(rows(full)) == 2
    a = torch.load(full / CHECKPOINT, weights_only=True)
    b = torch.load(cut / CHECKPOINT, weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for piece_a, piece_b in zip(a["bank"]["pieces"], b["bank"]["pieces"]):
        assert torch.equal(piece_a["embeddings"], piece_b["embeddings"])
        assert torch.equal(piece_a["labels"], piece_b["labels"])


@needs_dali
def test_a_resume_may_change_the_loader(tmp_path, capsys):
    """A file DALI refuses stopped the run with "use --loader pil", which a resume refused as a
    change ("--loader (saved: dali) cannot change"): the loader is how the run reads, not what."""
    from llp_fast.train.checkpoint import CHECKPOINT

    root = make_jpegs(tmp_path / "d", per_class=10)
    args = ["--data", f"folder:{root}", "--loader", "dali", *_TINY, "--epochs", "2", "--quiet"]
    cut = tmp_path / "cut"
    assert train_main([*args, "--run-dir", str(cut), "--stop-after-steps", "2"]) == 130
    assert train_main(["--resume", str(cut), "--loader", "pil", "--quiet"]) == 0, capsys.readouterr().err
    assert torch.load(cut / CHECKPOINT, weights_only=True)["epoch"] == 2
    assert json.load(open(cut / "config.json"))["loader"] == "pil"


@needs_dali
def test_the_runs_first_line_names_the_loader_the_data_took(tmp_path, capsys):
    """--loader auto with a GIF among the files: the data said PIL and the run's first line DALI."""
    from PIL import Image

    root = make_jpegs(tmp_path / "d", per_class=6)
    Image.new("RGB", (20, 20), (10, 200, 10)).save(root / "c1" / "g.gif")
    args = ["--data", f"folder:{root}", *_TINY, "--baseline", "off", "--run-dir", str(tmp_path / "r")]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert ", loader pil, run dir" in err and "--loader auto: pil, for the 1 GIF image(s)" in err, err
