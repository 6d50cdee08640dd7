"""``folder:PATH`` -- an ImageFolder tree of the user's own images.

Layout: ``PATH/<class>/<image>`` (one subfolder per class), or ``PATH/train/<class>/...``
with ``PATH/test/<class>/...`` (or ``val/``; any case, and ``training``, ``testing``, ``valid``,
``validation``: :func:`split_layout`) as the held-out split. An optional ``PATH/labeled.txt``
lists the files (relative to the class folders' parent, one per line, UTF-8, ``#`` starting a
comment unless the whole line names an image) whose label the learner may use; without it a
class-balanced ``--labeled-fraction`` keeps its label. The folder names give the truth of every image, used
only for the held-out split and the pseudo-label diagnostics.

Two loaders (``--loader``), the same samples: a PIL-based torch DataLoader (``pil``), or NVIDIA
DALI (``dali``, :mod:`llp_fast.data.dali`; ``auto`` picks it when ``nvidia.dali`` imports). Both
take every sample's geometry from :mod:`llp_fast.data.transforms`: for training a random resized
crop and horizontal flip seeded per sample from (seed, epoch, position), so a resumed run sees
the same crops; for evaluation the short side resized, then a centre crop. Both normalise with
:meth:`FolderSource._normalise`.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from .. import _optional
from .._device import memory_format
from ..errors import ConfigError
from . import DataError, DataFacts, Split, make_split, untested_note
from .dali import undecodable
from .files import (
    GREY_MODES,
    equal_channels,
    files_fingerprint,
    read_labeled,
    scan,
    skipped_note,
    split_layout,
)
from .loading import load_batches
from .strong import strong_pil
from .transforms import MEAN, STD, crop_box, eval_geometry, open_rgb, sample_seed

LOADERS = ("auto", "dali", "pil")


def resolve_loader(loader: str = "auto") -> str:
    """``dali`` or ``pil`` for ``--loader``: ``auto`` is DALI when ``nvidia.dali`` imports;
    :class:`ConfigError` for ``dali`` without it."""
    if loader not in LOADERS:
        raise ConfigError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if loader == "pil" or (loader == "auto" and _optional.dali() is None):
        return "pil"
    if _optional.dali() is None:
        raise ConfigError(
            "--loader dali: NVIDIA DALI is not installed (pip install 'llp_fast[dali]', or use --loader pil)"
        )
    return "dali"


def loader_label(loader: str, device, strong: bool = False) -> str:
    """How ``folder:`` images will be decoded, for the run's first line: ``pil``, ``dali (CPU)`` or
    ``dali (GPU)``. With ``strong`` views wanted, ``auto`` is the PIL loader (DALI makes none)."""
    name = "pil" if strong and loader == "auto" else resolve_loader(loader)
    if name == "dali":
        return f"dali ({'GPU' if torch.device(device).type == 'cuda' else 'CPU'})"
    return name


class _Images(torch.utils.data.Dataset):
    """(uint8 (3, S, S) tensor, key) for keys (file index, augmentation seed or -1); with
    ``strong``, (weak, strong view of the same crop, key) for training keys."""

    def __init__(self, files, size, scale_min, flip, strong=False):
        self.files, self.size, self.scale_min, self.flip, self.strong = files, size, scale_min, flip, strong

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, seed = key
        im = open_rgb(self.files[i])
        s = self.size
        if seed < 0:  # evaluation: resize the short side, centre crop
            from PIL import Image

            w, h = im.size
            big_w, big_h, left, top = eval_geometry(w, h, s)
            # the crop's region resampled alone (as DALI does), the same sampling positions and filter
            # as resizing the whole image and cropping, within a grey level's rounding: that resized a
            # 3000 x 2 image to 383,040 x 255 at 224 px, 0.6 s and 300 MB a sample
            sx, sy = w / big_w, h / big_h
            box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
            im = im.resize((s, s), Image.BILINEAR, box=box)
        else:
            rng = np.random.default_rng(seed)
            im = _random_resized_crop(im, s, self.scale_min, self.flip, rng)
            if self.strong:
                return _chw(im), _chw(strong_pil(im.copy(), rng)), i
        return _chw(im), i


def _chw(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _random_resized_crop(im, size, scale_min, flip, rng):
    from PIL import Image

    x0, y0, cw, ch, mirror = crop_box(*im.size, scale_min, flip, rng)
    im = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if mirror:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


class FolderSource:
    """An image-folder data set, split; batches as :class:`llp_fast.data.arrays.ArraySource`."""

    def __init__(
        self,
        root,
        *,
        device="cpu",
        labeled_fraction=0.1,
        unlabeled_fraction=1.0,
        seed=0,
        image_size=None,
        scale_min=None,
        flip=None,
        workers=2,
        loader="auto",
        **_,
    ):
        _optional.need("PIL.Image", "data", "folder: images")
        self.requested_loader = loader
        self.loader = resolve_loader(loader)
        if not os.path.isdir(root):
            raise DataError(f"folder:{root}: no such directory")
        self.root = root
        train_root, test_root = split_layout(root)
        skipped = Counter()
        classes, files, y = scan(train_root, skipped)
        other = f"; {skipped_note(skipped)}" if skipped else ""
        if not files:
            raise DataError(f"folder:{root}: no images found (expected one subfolder of images per class){other}")
        empty = [c for i, c in enumerate(classes) if not (y == i).any()]
        if empty:
            raise DataError(f"folder:{root}: class folder {os.path.join(train_root, empty[0])} holds no image{other}")
        self.class_names = classes
        if len(classes) < 2:  # nothing to tell apart: it trained and reported 100%
            raise DataError(f"folder:{root}: one class folder only ({classes[0]}); at least two are needed")
        self.num_classes = len(classes)
        mask = None
        label_file = next(
            (
                p
                for p in (os.path.join(root, "labeled.txt"), os.path.join(train_root, "labeled.txt"))
                if os.path.isfile(p)
            ),
            None,
        )
        if label_file is not None:
            mask = read_labeled(label_file, train_root, files)
        self.split: Split = make_split(
            y,
            num_classes=self.num_classes,
            labeled_fraction=labeled_fraction,
            unlabeled_fraction=unlabeled_fraction,
            has_test=test_root is not None,
            seed=seed,
            class_names=classes,
            labeled_mask=mask,
        )
        if test_root is not None:
            tclasses, tfiles, ty = scan(test_root, skipped)
            if tclasses != classes:
                raise DataError(f"{test_root} has classes {tclasses}, but {train_root} has {classes}")
        else:
            tfiles, ty = [files[i] for i in self.split.test], y[self.split.test]
        if len(tfiles) == 0:
            raise DataError(f"folder:{root}: the held-out split is empty (add images or a test/ folder)")
        self.files = [files[i] for i in self.split.train]
        self.test_files, self.y_test = tfiles, torch.from_numpy(ty)
        self.fingerprint = files_fingerprint(root, self.files)
        # what the run's first lines say of the data: files not read, classes not tested
        self.notes = [f"folder:{root}: {skipped_note(skipped)}"] if skipped else []
        fix = f"add its images to {test_root}" if test_root is not None else "add images of it, or a test/ folder"
        self.notes += [n for n in (untested_note(ty, classes, fix),) if n]
        self.targets = torch.from_numpy(self.split.targets)
        self.truth = torch.from_numpy(self.split.truth)
        self.device = torch.device(device)
        self.in_channels = 3
        self.workers = int(workers)
        self.seed = seed
        self.num_train, self.num_test = len(self.files), len(tfiles)
        self.notes += [n for n in (self._pil_for_gifs("the files"),) if n]
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255
        self.configure(image_size=image_size, scale_min=scale_min, flip=flip)

    def facts(self) -> DataFacts:
        """What the data is (:mod:`llp_fast.train.defaults`); the side is the median short side of
        up to 32 training images, read from their headers, and the images are grayscale (channels
        1: the grayscale defaults, no flips) where every one of them is stored grey or holds equal
        colour channels (said in ``notes``). They are still decoded as RGB, three equal channels,
        for the network."""
        from PIL import Image

        picks = np.linspace(0, len(self.files) - 1, min(32, len(self.files))).round().astype(int)
        sides, modes, grey = [], set(), []
        for i in picks:
            try:
                with Image.open(self.files[i]) as im:
                    sides.append(min(im.size))
                    modes.add(im.mode)
                    # (decoding stops at the first colour image: 32 photos of 6000 x 4000 took seconds)
                    grey.append(im.mode in GREY_MODES or (all(grey) and equal_channels(im)))
            except Exception:  # an unreadable file is reported when it is decoded
                continue
        gray = bool(grey) and all(grey)
        if gray and not modes <= GREY_MODES:  # (grey images saved as RGB took the colour defaults)
            self.notes.append(
                f"folder:{self.root}: the sampled images' colour channels are equal: grayscale images, given the "
                "grayscale defaults"
            )
        return DataFacts.of(self, kind="folder", side=int(np.median(sides)) if sides else 32, channels=1 if gray else 3)

    def configure(self, *, image_size=None, scale_min=None, flip=None, strong=False, **_) -> None:
        """The network's input side and the training augmentation (unset: 32 px, a crop of at
        least 35% of the area, flips on); ``strong``: training batches carry a strong view too,
        made on the host by the PIL loader (DALI does not make them, :func:`check_strong`)."""
        self.image_size = int(image_size or 32)
        self.scale_min = float(scale_min if scale_min is not None else 0.35)
        self.flip = True if flip is None else bool(flip)
        self.strong = bool(strong)
        if self.strong and self.requested_loader == "auto":
            self.loader = "pil"
        if self.strong and self.loader == "dali":
            raise ConfigError(
                "--loader dali does not make the strong views of the consistency term: use --loader pil, "
                "or --consistency 0"
            )
        self._datasets()

    def add_files(self, paths: list[str]) -> str:
        """Appends training images (``--extra-unlabeled``): every dataset over the training files is
        made again, so that all of them (plain, strong views, DALI's) see the same list. Returns a
        note where ``--loader auto`` then takes PIL (GIFs among them: DALI stopped the run), else ""."""
        self.files = list(self.files) + list(paths)
        note = self._pil_for_gifs("them")
        self._datasets()
        return note

    def _pil_for_gifs(self, among: str) -> str:
        """``--loader auto`` where DALI would meet a GIF among the files (:func:`undecodable`): PIL,
        and the line that says so, else "" (a GIF stopped a run that asked for no loader)."""
        if self.loader != "dali" or self.requested_loader != "auto":
            return ""
        gifs = len(undecodable(self))  # (auto took PIL for any before: the ones just added)
        if gifs:
            self.loader = "pil"
        return f"--loader auto: pil, for the {gifs:,} GIF image(s) among {among} (DALI decodes none)" if gifs else ""

    def _datasets(self) -> None:
        self._train_set = _Images(self.files, self.image_size, self.scale_min, self.flip, self.strong)
        self._test_set = _Images(self.test_files, self.image_size, self.scale_min, False)
        self._plain_set = _Images(self.files, self.image_size, self.scale_min, self.flip)
        self.dali = None
        if self.loader == "dali":
            from .dali import DaliFolder

            self.dali = DaliFolder(self)

    def _normalise(self, x_u8: torch.Tensor) -> torch.Tensor:
        """Float images ``(x - mean) / std`` from uint8 ``(B, 3, S, S)`` (both loaders; in place on
        the float copy: the same values as out of place, without two more batch-sized buffers)."""
        x = x_u8.to(self.device, non_blocking=True).float()
        return x.sub_(self.mean).div_(self.std).contiguous(memory_format=memory_format(self.device))

    def _loader(self, dataset, keys, batch_size):
        batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
        # Its own generator: each iterator draws a base seed (for its workers) from the loader's
        # generator, by default torch's global one, which the network's own draws (dropout) share:
        # a run resumed mid-epoch makes one iterator more than the uninterrupted run, and every later
        # draw shifted. The samples' randomness is their own seed (sample_seed), not this.
        generator = torch.Generator().manual_seed(self.seed)
        return load_batches(dataset, batches, self.workers, generator=generator, pin_memory=self.device.type == "cuda")

    def train_batches(self, order: torch.Tensor, batch_size: int, gen=None, *, start: int = 0, epoch: int = 0):
        """Augmented ``(images, indices)`` over dataset indices ``order`` from batch ``start``.
        Each sample's crop is seeded by (seed, epoch, position), so resuming replays it."""
        if self.dali is not None:
            yield from self.dali.train_batches(order, batch_size, start=start, epoch=epoch)
            return
        order = order.tolist()
        keys = [(i, sample_seed(self.seed, epoch, len(order), p)) for p, i in enumerate(order)][start * batch_size :]
        for batch in self._loader(self._train_set, keys, batch_size):
            *views, idx = batch
            yield (*(self._normalise(x) for x in views), idx.to(self.device))

    def test_batches(self, batch_size: int):
        if self.dali is not None:
            yield from self.dali.test_batches(batch_size)
            return
        keys = [(i, -1) for i in range(self.num_test)]
        for x, i in self._loader(self._test_set, keys, batch_size):
            yield self._normalise(x), self.y_test[i].to(self.device)

    def index_batches(self, indices: torch.Tensor, batch_size: int):
        if self.dali is not None:
            yield from self.dali.index_batches(indices, batch_size)
            return
        keys = [(int(i), -1) for i in indices]
        for x, idx in self._loader(self._plain_set, keys, batch_size):
            yield self._normalise(x), idx.to(self.device)


def load_folder(path: str, **kwargs) -> FolderSource:
    return FolderSource(path, **kwargs)
