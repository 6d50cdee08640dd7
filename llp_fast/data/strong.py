"""The strong view of the consistency term (docs/method.md §8.2): RandAugment-style operations plus
cutout, the same list for array batches (batched on the training device) and for ``folder:`` images
(per sample, PIL, on the host).

Each sample gets ``OPS_PER_SAMPLE`` operations drawn uniformly from :data:`OPS`, each with its own
magnitude ``m`` uniform in [0, 1] (FixMatch's "RandAugment with random magnitude", Sohn et al. 2020),
then a grey square of side up to half the image (cutout). No operation flips (the list must keep a
digit a digit); solarize inverts the pixels above 1 - m, at the largest magnitudes nearly all.
Every draw comes from the caller's generator in a fixed order, so a resumed run replays the same
views.

Geometric operations (rotate, shear, translate) are returned as an affine map that the array path
composes with the weak view's crop, so a strong view is one resampling of the stored image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = (
    "identity",
    "autocontrast",
    "brightness",
    "contrast",
    "equalize",
    "posterize",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
)
OPS_PER_SAMPLE = 2
MAX_ROTATE = 30.0  # degrees
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image side
MAX_ENHANCE = 0.9  # brightness, contrast, sharpness factors in [0.1, 1.9]
CUTOUT = 0.5  # largest cutout side, as a fraction of the image side
_GEOMETRIC = {OPS.index(n) for n in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")}


def draw(b: int, gen: torch.Generator, device) -> dict:
    """The random choices of ``b`` strong views, in one fixed order: op ids (b, 2), magnitudes
    (b, 2), signs (b, 2), cutout centre (b, 2) and side (b,), each in [0, 1) but the ids."""
    ops = torch.randint(0, len(OPS), (b, OPS_PER_SAMPLE), generator=gen, device=device)
    u = torch.rand(b, 3 * OPS_PER_SAMPLE + 3, generator=gen, device=device)
    k = OPS_PER_SAMPLE
    return {
        "ops": ops,
        "mag": u[:, :k],
        "sign": torch.where(u[:, k : 2 * k] < 0.5, -1.0, 1.0),
        "cut_centre": u[:, 2 * k : 2 * k + 2],
        "cut_side": u[:, 2 * k + 2],
    }


def geometry(choice: dict) -> torch.Tensor:
    """The strong views' geometric operations as (b, 3, 3) maps in ``affine_grid``'s normalised
    output-to-input coordinates (identity for photometric operations)."""
    ops, mag, sign = choice["ops"], choice["mag"], choice["sign"]
    b, dev = ops.shape[0], ops.device
    out = torch.eye(3, device=dev).repeat(b, 1, 1)
    for j in range(ops.shape[1]):
        m = mag[:, j] * sign[:, j]
        a = torch.eye(3, device=dev).repeat(b, 1, 1)
        op = ops[:, j]
        ang = torch.where(op == OPS.index("rotate"), m * math.radians(MAX_ROTATE), torch.zeros_like(m))
        c, s = torch.cos(ang), torch.sin(ang)
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = c, -s, s, c
        a[:, 0, 1] += torch.where(op == OPS.index("shear_x"), m * MAX_SHEAR, torch.zeros_like(m))
        a[:, 1, 0] += torch.where(op == OPS.index("shear_y"), m * MAX_SHEAR, torch.zeros_like(m))
        a[:, 0, 2] = torch.where(op == OPS.index("translate_x"), 2 * m * MAX_TRANSLATE, torch.zeros_like(m))
        a[:, 1, 2] = torch.where(op == OPS.index("translate_y"), 2 * m * MAX_TRANSLATE, torch.zeros_like(m))
        out = out @ a
    return out


def _blur(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (centre 5, the rest 1, over 13), per channel, the border replicated
    (PIL keeps border pixels as they are: the two differ there)."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(c, 1, 3, 3)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return y


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation of [0, 1] images on 256 levels."""
    b, c = x.shape[:2]
    q = (x * 255).round().clamp(0, 255).long().flatten(2)  # (b, c, hw)
    hist = torch.zeros(b, c, 256, device=x.device).scatter_add_(2, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(2)
    lo = hist.gather(2, (hist > 0).float().argmax(2, keepdim=True))  # count of the darkest level present
    lut = ((cdf - lo) / (cdf[..., -1:] - lo).clamp_min(1)).clamp(0, 1)
    return lut.gather(2, q).view_as(x).to(x.dtype)


def photometric(x: torch.Tensor, choice: dict) -> torch.Tensor:
    """The strong views' photometric operations and cutout on [0, 1] images (b, c, h, w)."""
    ops, mag, sign = choice["ops"], choice["mag"], choice["sign"]
    b, dev = x.shape[0], x.device
    view = (b, 1, 1, 1)
    for j in range(ops.shape[1]):
        op, m, s = ops[:, j], mag[:, j].view(view), sign[:, j].view(view)
        f = 1 + s * m * MAX_ENHANCE  # enhance factor

        def pick(name, y, x, op=op):
            return torch.where((op == OPS.index(name)).view(view), y, x)

        x = pick("brightness", (x * f).clamp(0, 1), x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = pick("contrast", (mean + (x - mean) * f).clamp(0, 1), x)
        blurred = _blur(x)
        x = pick("sharpness", (blurred + (x - blurred) * f).clamp(0, 1), x)
        x = pick("solarize", torch.where(x >= 1 - m, 1 - x, x), x)
        shift = 2 ** (4 * m).round()  # keep 8 - round(4 m) bits
        x = pick("posterize", torch.floor(x * 255 / shift) * shift / 255, x)
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        x = pick("autocontrast", torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x), x)
        x = pick("equalize", _equalize(x), x)
    h, w = x.shape[-2:]
    side = (choice["cut_side"] * CUTOUT * min(h, w)).view(b, 1, 1)
    cy = choice["cut_centre"][:, 0].view(b, 1, 1) * h
    cx = choice["cut_centre"][:, 1].view(b, 1, 1) * w
    ys = torch.arange(h, device=dev).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=dev).view(1, 1, w) + 0.5
    hole = ((ys - cy).abs() <= side / 2) & ((xs - cx).abs() <= side / 2)
    return torch.where(hole.unsqueeze(1), torch.full_like(x, 0.5), x)


def strong_pil(im, rng):
    """A strong view of the PIL image ``im`` (RGB, already cropped to the network's size), drawn from
    the numpy ``rng``: the same operations and ranges as the array path (not bit for bit: equalize's
    formula, shear about the top-left corner, blur at the border, the order drawn, black outside;
    docs/method.md §8.2), then cutout."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps

    w, h = im.size
    for _ in range(OPS_PER_SAMPLE):
        name = OPS[int(rng.integers(0, len(OPS)))]
        m, s = float(rng.random()), (-1.0 if rng.random() < 0.5 else 1.0)
        f = 1 + s * m * MAX_ENHANCE
        if name == "autocontrast":
            im = ImageOps.autocontrast(im)
        elif name == "brightness":
            im = ImageEnhance.Brightness(im).enhance(f)
        elif name == "contrast":
            im = ImageEnhance.Contrast(im).enhance(f)
        elif name == "equalize":
            im = ImageOps.equalize(im)
        elif name == "posterize":
            im = ImageOps.posterize(im, 8 - round(4 * m))
        elif name == "rotate":
            im = im.rotate(s * m * MAX_ROTATE, resample=Image.BILINEAR)
        elif name == "sharpness":
            im = ImageEnhance.Sharpness(im).enhance(f)
        elif name == "shear_x":
            im = im.transform(im.size, Image.AFFINE, (1, s * m * MAX_SHEAR, 0, 0, 1, 0), Image.BILINEAR)
        elif name == "shear_y":
            im = im.transform(im.size, Image.AFFINE, (1, 0, 0, s * m * MAX_SHEAR, 1, 0), Image.BILINEAR)
        elif name == "solarize":
            im = ImageOps.solarize(im, round(256 * (1 - m)))
        elif name == "translate_x":
            im = im.transform(im.size, Image.AFFINE, (1, 0, s * m * MAX_TRANSLATE * w, 0, 1, 0), Image.BILINEAR)
        elif name == "translate_y":
            im = im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, s * m * MAX_TRANSLATE * h), Image.BILINEAR)
    cy, cx, side = float(rng.random()) * h, float(rng.random()) * w, float(rng.random()) * CUTOUT * min(w, h)
    if side >= 1:
        ImageDraw.Draw(im).rectangle(
            (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2) - 1, round(cy + side / 2) - 1),
            fill=(128, 128, 128),
        )
    return im
