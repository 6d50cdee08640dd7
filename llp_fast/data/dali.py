"""NVIDIA DALI decoding for ``folder:`` data (``--loader dali``; ``--loader auto`` when ``nvidia.dali``
imports). Tested on CPU (``tests/test_dali.py``); the GPU decode is not (see :meth:`DaliFolder._pipeline`).

The work is split so that DALI yields the PIL loader's samples (:mod:`llp_fast.data.folder`):

- The host reads each file and its header (PIL, no decode) and computes the sample's geometry with
  the PIL path's own functions: for training, :func:`~llp_fast.data.transforms.crop_box` seeded by
  (seed, epoch, position) -- the same crops and flips as PIL's, and a resumed epoch replays
  them; for evaluation and index passes, :func:`~llp_fast.data.transforms.eval_geometry` (the short
  side resized, then a centre crop). DALI runs no random operator, so a batch depends on nothing
  but its samples.
- DALI decodes (``fn.decoders.image``, RGB: grey and palette images become 3 channels; EXIF
  orientation ignored, as PIL's ``open`` does) and resamples the sample's box to S x S
  (``fn.resize`` with a region of interest, linear and antialiased: PIL's ``BILINEAR``). A mirrored
  sample's box has its x ends swapped, which ``fn.resize`` reads as a horizontal flip.
- The uint8 result is normalised by :meth:`FolderSource._normalise`, as the PIL path's.

An ``external_source`` feeds the pipeline *our* sample order, one batch at a time: there is no
file reader, so none of its padding; the last batch is simply short. Every batch's dataset
indices travel through the pipeline and are checked against the ones fed, so a sample can
neither repeat nor go missing. A file DALI cannot decode becomes a :class:`DataError` naming it:
by its header where it holds a format DALI does not read (a GIF saved as ``.jpg``), else the first
file of the failed batch that PIL cannot read either. DALI's decoders also log to the process's
stderr from their own threads, in colour ("[ERROR] [libtiff_decoder] ..." for a CMYK TIFF that they
then decode anyway; libjpeg's "Premature end of JPEG data" before the error raised here), and
libjpeg itself prints a warning on every decode of a JPEG it decodes anyway ("Corrupt JPEG data: 3
extraneous bytes before marker 0xd9"), also
while the pipeline prefetches, after ``run`` has returned a batch, and no setting of DALI 2.4 turns
them off. So while a pass runs, file descriptor 2 is a pipe, and a thread hands on to the real
stderr everything written there but those lines (:class:`_NativeLogFilter`): the run's output
(progress bars included, as they are written) stays its own.
"""

from __future__ import annotations

import collections
import io
import os
import re
import sys
import threading
import time

import numpy as np
import torch

from .. import _optional
from .._device import memory_format
from . import MARKER, DataError
from .transforms import check_depth, crop_box, eval_geometry, open_rgb, sample_seed

# What fn.decoders.image reads (JPEG, PNG, BMP, TIFF, WebP, PNM, JPEG 2000); of the folder
# loader's extensions only GIF is missing. By content, as PIL names the formats:
UNDECODABLE = (".gif",)
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")


class _NativeLogFilter:
    """While the block runs: file descriptor 2 is a pipe, and a thread writes what arrives to the
    real stderr without DALI's log lines (whole lines ``[ERROR] [libtiff_decoder] ...``, coloured
    or not) and libjpeg's warnings (:attr:`JPEG_WARNINGS`). Nested blocks share the outermost one's
    pipe. Should the real stderr fail (a reader gone), what follows is dropped and the pipe still
    drained: its writers never block on it."""

    # libjpeg's warnings (its jerror.h, JWRN_*), printed unprefixed on every decode of a JPEG that it
    # then decodes anyway ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9", a few files in
    # ImageNet): the PIL path reads those files without a word. (Its fatal errors pass: the run's
    # error line, naming the file, follows them.)
    JPEG_WARNINGS = (
        rb"Corrupt JPEG data: [^\n]*",
        rb"Premature end of JPEG file",
        rb"Invalid SOS parameters for sequential JPEG",
        rb"Inconsistent progression sequence for component \d+ coefficient \d+",
        rb"Warning: unknown JFIF revision number \d+\.\d+",
        rb"Unknown Adobe color transform code [-\d]\d*",
        rb"Application transferred too many scanlines",
    )
    # the decoders' own libraries: OpenCV's log ("[ERROR:0@0.013] global loadsave.cpp:1409 imdecode_ ...",
    # a truncated BMP) and libpng's ("libpng error: IDAT: CRC error"); the run's line names the file
    LIBRARIES = (
        rb"\[ ?(?:FATAL|ERROR|WARN|INFO|DEBUG|VERBOSE):\d+@[\d.]+\][^\n]*",
        rb"libpng (?:error|warning): [^\n]*",
    )
    LINE = re.compile(
        rb"(?m)^(?:(?:\x1b\[[0-9;]*m)?\[(?:FATAL|ERROR|WARNING|WARN|INFO|DEBUG|TRACE)\] (?:\x1b\[0m)?\[[^]\n]*\][^\n]*"
        rb"|" + rb"|".join(JPEG_WARNINGS + LIBRARIES) + rb")\n"
    )
    COLOUR = re.compile(rb"^\x1b\[[0-9;]*m?")
    TAGS = tuple(b"[%s]" % level for level in (b"FATAL", b"ERROR", b"WARNING", b"WARN", b"INFO", b"DEBUG", b"TRACE"))
    STARTS = TAGS + tuple(re.split(rb"[\\\[]", w, maxsplit=1)[0] for w in JPEG_WARNINGS)  # (up to the first pattern)
    STARTS += (
        b"[FATAL:",
        b"[ERROR:",
        b"[WARN:",
        b"[ WARN:",
        b"[INFO:",
        b"[ INFO:",
        b"[DEBUG:",
        b"[VERBOSE:",
        b"libpng ",
    )
    depth = 0

    def __enter__(self):
        type(self).depth += 1
        self.outer = type(self).depth == 1
        if self.outer:
            sys.stderr.flush()
            self.saved = os.dup(2)
            read, write = os.pipe()
            os.dup2(write, 2)
            os.close(write)
            self.thread = threading.Thread(target=self._forward, args=(read,), daemon=True)
            self.thread.start()
        return self

    def _forward(self, read: int) -> None:
        held, failed = b"", False  # held: the start of a line that may be one of DALI's
        while chunk := os.read(read, 65536):
            data = held + chunk
            tail = data[data.rfind(b"\n") + 1 :]
            held = tail if len(tail) < 4096 and self._may_start_a_line(tail) else b""
            out = self.LINE.sub(b"", data[: len(data) - len(held)])
            failed = failed or not self._write(out)
        failed or self._write(held)
        os.close(read)

    def _may_start_a_line(self, tail: bytes) -> bool:
        """Whether ``tail`` (no newline) can be the beginning of one of DALI's log lines (or libjpeg's)."""
        rest = self.COLOUR.sub(b"", tail)
        return bool(tail) and (not rest or any(rest.startswith(t) or t.startswith(rest) for t in self.STARTS))

    def _write(self, data: bytes) -> bool:
        """All of ``data`` to the real stderr; False where it failed."""
        while data:
            try:
                data = data[os.write(self.saved, data) :]
            except BlockingIOError:  # a non-blocking stderr, full for now
                time.sleep(0.01)
            except OSError:
                return False
        return True

    def __exit__(self, *exc):
        type(self).depth -= 1
        if self.outer:
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # the pipe's last writer gone: the thread drains it and ends
            self.thread.join()
            os.close(self.saved)


def _misdecoded(kind: str, bands: int, raw: bytes, mode: str = "") -> str | None:
    """What DALI's CPU decoder reads wrongly, from the header: a TIFF of two samples a pixel (grey
    or palette, and alpha: the alpha came out as the green channel, up to 243 levels off), a CIE-Lab
    TIFF (read as if RGB: up to 75 levels off), a PGM/PPM whose maximum is not 255 (DALI does not
    rescale it as PIL does: a 12-bit one read as 0-15, one of maximum 100 up to 155 levels off)."""
    if kind == "TIFF" and bands == 2:
        return "a TIFF of two channels (grey or palette, and alpha)"
    if kind == "TIFF" and mode == "LAB":
        return "a CIE-Lab TIFF"
    if kind == "PPM":
        top = _pnm_maximum(raw)
        if top is not None and top != 255:
            return f"a PGM/PPM of maximum {top} (DALI reads 255 only)"
    return None


def _pnm_maximum(raw: bytes) -> int | None:
    """The maximum value in a binary or text PGM/PPM header (P2, P3, P5, P6); None for a bitmap
    (P1, P4) or a header it cannot read."""
    if raw[:2] not in (b"P2", b"P3", b"P5", b"P6"):
        return None
    fields = []
    for line in raw[2:1024].splitlines():
        fields += line.split(b"#", 1)[0].split()
        if len(fields) >= 3:
            return int(fields[2]) if fields[2].isdigit() else None
    return None


def undecodable(source) -> list[str]:
    """The training and held-out files of a folder source that DALI does not decode, by name
    (``--loader dali`` refuses them; ``--loader auto`` takes PIL for them)."""
    return [p for p in [*source.files, *source.test_files] if p.lower().endswith(UNDECODABLE)]


class DaliFolder:
    """Batches of a :class:`~llp_fast.data.folder.FolderSource` decoded by DALI: the source's
    ``train_batches`` / ``test_batches`` / ``index_batches`` with the same samples."""

    def __init__(self, source):
        self.source = source
        self.on_gpu = source.device.type == "cuda"
        gifs = undecodable(source)
        if gifs:
            raise DataError(f"{gifs[0]}: DALI does not decode GIF images (use --loader pil)")

    def _pipeline(self, feed, batch_size: int):
        dali = _optional.dali()
        fn, types = dali.fn, dali.types
        s = self.source.image_size
        # UNTESTED HERE: the GPU path ("mixed" decode with nvJPEG, the resize on the GPU, DLPack
        # hand-over on DALI's stream). No session on this project has had a GPU yet; the first one
        # runs tests/test_dali.py::test_gpu_decode_against_the_cpu_pipeline (pytest -m cuda) and
        # measures the nvJPEG-against-libjpeg-turbo difference that test only reports.
        device_id = None
        if self.on_gpu:
            device_id = self.source.device.index
            device_id = torch.cuda.current_device() if device_id is None else device_id

        @dali.pipeline_def(batch_size=batch_size, num_threads=max(1, self.source.workers), device_id=device_id)
        def pipe():
            data, roi_start, roi_end, idx = fn.external_source(
                source=feed, num_outputs=4, dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT64]
            )
            images = fn.decoders.image(
                data, device="mixed" if self.on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )
            images = fn.resize(
                images,
                size=[s, s],
                roi_start=roi_start,
                roi_end=roi_end,
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            return images, idx

        p = pipe()
        p.build()
        return p

    # -- the host side: bytes and geometry of each sample -------------------------------------
    def _sample(self, path: str, seed: int):
        """(bytes, roi_start (y, x), roi_end (y, x)) of one sample; ``seed`` < 0: evaluation."""
        from PIL import Image

        try:
            with open(path, "rb") as f:
                raw = f.read()
            with Image.open(io.BytesIO(raw)) as im:  # reads the header only
                w, h, kind, bands, mode = *im.size, im.format, len(im.getbands()), im.mode
                check_depth(im, path)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for truncated or foreign files
            raise DataError(f"{MARKER}cannot read image {path} ({type(e).__name__})") from None
        if kind not in DECODABLE_FORMATS:  # (DALI's error named another file of the batch)
            raise DataError(f"{MARKER}{path}: DALI does not decode {kind} images (use --loader pil)")
        wrong = _misdecoded(kind, bands, raw, mode)
        if wrong:  # (decoded without an error, and wrong: an alpha channel read as green)
            raise DataError(f"{MARKER}{path}: DALI decodes {wrong} wrongly (use --loader pil, or save it as PNG)")
        src, s = self.source, self.source.image_size
        if seed < 0:
            big_w, big_h, left, top = eval_geometry(w, h, s)
            sx, sy = w / big_w, h / big_h  # the crop of the resized image, in source pixels
            x0, y0, x1, y1 = left * sx, top * sy, (left + s) * sx, (top + s) * sy
        else:
            x0, y0, cw, ch, mirror = crop_box(w, h, src.scale_min, src.flip, np.random.default_rng(seed))
            x1, y1 = x0 + cw, y0 + ch
            if mirror:
                x0, x1 = x1, x0
        roi_start, roi_end = np.array([y0, x0], dtype=np.float32), np.array([y1, x1], dtype=np.float32)
        return np.frombuffer(raw, dtype=np.uint8), roi_start, roi_end

    def _run(self, files, keys, batch_size):
        """``(uint8 (B, 3, S, S), dataset index (B,))`` over ``keys`` = [(file index, seed or -1)]."""
        if not keys:
            return
        batches = iter([keys[s : s + batch_size] for s in range(0, len(keys), batch_size)])
        in_flight = collections.deque()  # batches fed and not yet returned (DALI prefetches)

        def feed():
            batch = next(batches)  # StopIteration ends the pass
            samples = [self._sample(files[i], seed) for i, seed in batch]
            in_flight.append(batch)
            return (
                [x[0] for x in samples],
                [x[1] for x in samples],
                [x[2] for x in samples],
                [np.array(i, dtype=np.int64) for i, _ in batch],
            )

        with _NativeLogFilter():
            yield from self._batches_of(self._pipeline(feed, batch_size), in_flight, files)

    def _batches_of(self, pipe, in_flight, files):
        while True:
            try:
                images, idx = pipe.run()
            except StopIteration:
                break
            except RuntimeError as e:
                if "fn.decoders.image" not in str(e):
                    raise  # not the decoder: a bug, keep its traceback
                raise self._decode_error(files, in_flight, e) from None
            fed = in_flight.popleft()
            i = torch.from_dlpack(idx.as_tensor()).reshape(-1).to(torch.int64).clone()
            if i.tolist() != [k for k, _ in fed]:
                raise RuntimeError(f"DALI returned samples {i.tolist()[:8]}... for the batch fed as {fed[:8]}...")
            # NHWC as NCHW: a copy (of uint8, the cheap one) on CPU; already channels_last on CUDA
            x = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=memory_format(self.source.device))
            yield x, i
        if in_flight:
            raise RuntimeError(f"DALI ended the pass with {len(in_flight)} batches fed and not returned")

    def _decode_error(self, files, in_flight, e: RuntimeError) -> DataError:
        """The file behind DALI's failure: the first of the batches in flight that PIL cannot decode
        either; else a line naming the batch."""
        paths = [files[i] for batch in in_flight for i, _ in batch]
        for path in paths:
            try:
                open_rgb(path).load()
            except DataError as bad:
                return bad
        skip = r"Current pipeline|Error in|Critical error|which was|encountered|\s*File"
        why = re.findall(rf"^(?!{skip})(\S.*)$", str(e), re.M)
        # The batch that failed is the oldest in flight (DALI returns them in order); its decoder names
        # the sample by position ("sample #5"): that file, where the number fits (the line
        # named the batch's first file "and 42 more", a good file, where PIL reads the bad one)
        at = [int(n) for n in re.findall(r"[Ss]ample #(\d+)", str(e))]  # ("'#17'" alone is a status code)
        first = [files[i] for i, _ in in_flight[0]] if in_flight else []
        if at and at[-1] < len(first):
            paths = [first[at[-1]]]
        where = f"{paths[0]}" + (f" and {len(paths) - 1} more in the same batches" if len(paths) > 1 else "")
        return DataError(
            f"DALI cannot decode an image of {where} ({why[-1].strip() if why else 'RuntimeError'}; "
            f"PIL reads {'it' if len(paths) == 1 else 'them all'}: try --loader pil)"
        )

    # -- the FolderSource interface ----------------------------------------------------------
    def _batches(self, files, keys, batch_size):
        for x, i in self._run(files, keys, batch_size):
            yield self.source._normalise(x), i

    def train_batches(self, order: torch.Tensor, batch_size: int, *, start: int = 0, epoch: int = 0):
        s = self.source
        order = order.tolist()
        keys = [(i, sample_seed(s.seed, epoch, len(order), p)) for p, i in enumerate(order)][start * batch_size :]
        for x, i in self._batches(s.files, keys, batch_size):
            yield x, i.to(s.device)

    def test_batches(self, batch_size: int):
        s = self.source
        keys = [(i, -1) for i in range(s.num_test)]
        for x, i in self._batches(s.test_files, keys, batch_size):
            yield x, s.y_test[i].to(s.device)

    def index_batches(self, indices: torch.Tensor, batch_size: int):
        s = self.source
        keys = [(int(i), -1) for i in indices]
        for x, i in self._batches(s.files, keys, batch_size):
            yield x, i.to(s.device)


def version() -> str:
    """DALI's version, or ``"absent"``."""
    dali = _optional.dali()
    return getattr(dali, "__version__", "unknown") if dali is not None else "absent"


__all__ = ["DaliFolder", "UNDECODABLE", "undecodable", "version"]
