"""What a ``folder:`` sample is, whichever loader decodes it (:mod:`llp_fast.data.folder`'s PIL
DataLoader or :mod:`llp_fast.data.dali`): its geometry (the training crop and flip, the evaluation
resize and centre crop), its augmentation seed, and the normalisation statistics. Nothing here
decodes pixels but :func:`open_image`.
"""

from __future__ import annotations

import math
import warnings

from . import MARKER, DataError

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics
STD = (0.229, 0.224, 0.225)


def open_rgb(path: str):
    """The image at ``path`` as an RGB ``PIL.Image``, decoded; :class:`DataError` naming the file."""
    return open_image(path, "RGB")


def open_image(path: str, mode: str = "RGB"):
    """The image at ``path`` as a decoded ``PIL.Image`` of ``mode`` (8 bits a channel);
    :class:`DataError` naming the file. 16-bit grey pixels (PNG's 16-bit grey opens as ``I;16`` or
    ``I``) are scaled to 8 bits, ``round(v / 257)``, as DALI's decoder scales them (PIL's own
    conversion clips them, which made such images white); pixels of 32 bits or floating point have
    no agreed 8-bit reading and are refused."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _eight_bit(im, path).convert(mode)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise DataError(f"{MARKER}cannot read image {path} ({type(e).__name__})") from None


def quiet_pil() -> None:
    """Leaves PIL's warnings out of this process ("Corrupt EXIF data", a palette's transparency, a
    large image's DecompressionBombWarning): called in the loaders' worker processes, where each
    printed two lines naming no file, once per worker and pass, every epoch, of images that read
    fine. (A process's own warnings show once per place by Python's default; an image too large to
    read at all still raises, and is named.)"""
    from PIL import Image

    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def check_depth(im, path: str) -> None:
    """From the header: :class:`DataError` for pixels of floating point or of 32 bits (both
    loaders refuse them; DALI read a floating-point TIFF where PIL refused it)."""
    if im.mode == "F":
        raise DataError(f"{MARKER}cannot read image {path}: floating-point pixels (save it with 8 or 16 bits)")
    # a PNG's or PGM's 16-bit grey (PIL scales a PGM's to 0-65535); elsewhere (TIFF) 32-bit integers
    if im.mode == "I" and im.format not in ("PNG", "PPM"):
        raise DataError(f"{MARKER}cannot read image {path}: 32-bit pixels (save it with 8 or 16 bits)")


def _eight_bit(im, path: str):
    check_depth(im, path)
    if not (im.mode == "I" or im.mode.startswith("I;16")):
        return im
    import numpy as np
    from PIL import Image

    v = np.asarray(im).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise DataError(f"{MARKER}cannot read image {path}: 32-bit pixels (save it with 8 or 16 bits)")
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")


def eval_geometry(w: int, h: int, s: int) -> tuple[int, int, int, int]:
    """The evaluation transform of a ``w`` x ``h`` image for network input ``s``: resize to
    ``(W, H)`` (the short side to ``s``, or to 1.14 ``s`` above 64 px, as ImageNet's 256/224),
    then crop ``s`` x ``s`` at ``(left, top)``. Returns ``(W, H, left, top)``."""
    r = s / min(w, h) if s <= 64 else s * 1.14 / min(w, h)
    big_w, big_h = max(s, round(w * r)), max(s, round(h * r))
    return big_w, big_h, (big_w - s) // 2, (big_h - s) // 2


def crop_box(w: int, h: int, scale_min: float, flip: bool, rng) -> tuple[int, int, int, int, bool]:
    """A random resized crop of a ``w`` x ``h`` image: area fraction in ``[scale_min, 1]``, aspect
    ratio in [3/4, 4/3] (log-uniform), 10 tries, else the centred square; then a coin for the
    horizontal flip when ``flip``. Returns ``(x0, y0, cw, ch, mirror)``; ``rng`` is the sample's
    ``numpy.random.Generator``, drawn in this order (a resumed run replays it)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(w, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    mirror = bool(flip and rng.random() < 0.5)
    return x0, y0, cw, ch, mirror


def sample_seed(seed: int, epoch: int, n: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of an epoch of ``n`` samples."""
    return (seed * 1_000_003 + epoch) * (n + 1) + position
