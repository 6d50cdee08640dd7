"""NVIDIA DALI decoding for ``folder:`` data (optional; used when ``nvidia.dali`` imports).

UNTESTED HERE: DALI has no wheel for the CPU-only machine this package is built on; the PIL
DataLoader in :mod:`llp_fast.data.folder` is the tested path. Keep this module small.

The pipeline is fed by an ``external_source`` with *our* epoch order, one batch of
(encoded bytes, dataset index) at a time, so there is no file reader and hence none of the
reader's padding: the last batch is simply short. As a second guard against padded
duplicate samples corrupting the bank (docs/method.md §1.6: a repeated index must not be counted
twice), every batch is cut to the indices still owed this epoch and de-duplicated, keeping
the first occurrence. Decoding runs on the GPU ("mixed") when training on CUDA, else on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _optional
from .._device import memory_format


class DaliFolder:
    def __init__(self, source):
        self.source = source
        self.on_gpu = source.device.type == "cuda"

    def _pipeline(self, feed, batch_size, train: bool, seed: int):
        dali = _optional.dali()
        fn, types = dali.fn, dali.types
        s = self.source
        device_id = (s.device.index or 0) if self.on_gpu else None

        @dali.pipeline_def(
            batch_size=batch_size, num_threads=4, device_id=device_id, seed=seed, exec_async=False, exec_pipelined=False
        )
        def pipe():
            jpegs, idx = fn.external_source(source=feed, num_outputs=2, dtype=[types.UINT8, types.INT64])
            dev = "mixed" if self.on_gpu else "cpu"
            if train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=dev, output_type=types.RGB, random_area=[s.scale_min, 1.0]
                )
                images = fn.resize(images, resize_x=s.image_size, resize_y=s.image_size)
                mirror = fn.random.coin_flip() if s.flip else 0
            else:
                images = fn.decoders.image(jpegs, device=dev, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=s.image_size)
                mirror = 0
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                crop=(s.image_size, s.image_size),
                mean=[v * 255 for v in (0.485, 0.456, 0.406)],
                std=[v * 255 for v in (0.229, 0.224, 0.225)],
                mirror=mirror,
            )
            return images, idx

        p = pipe()
        p.build()
        return p

    def _feed(self, files, keys, batch_size):
        batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
        it = iter(batches)

        def feed():
            batch = next(it)  # StopIteration ends the epoch
            data = [np.fromfile(files[i], dtype=np.uint8) for i in batch]
            return data, [np.array([i], dtype=np.int64) for i in batch]

        return feed, len(batches)

    def _run(self, files, keys, batch_size, train, seed):
        feed, n_batches = self._feed(files, keys, batch_size)
        pipe = self._pipeline(feed, batch_size, train, seed)
        owed = len(keys)
        for _ in range(n_batches):
            images, idx = pipe.run()
            x = torch.from_dlpack(images.as_tensor())
            i = torch.from_dlpack(idx.as_tensor()).reshape(-1).to(torch.int64)
            keep = min(owed, i.shape[0])
            x, i = x[:keep], i[:keep]
            first = _first_occurrence(i)
            owed -= keep
            x = x[first].to(self.source.device).contiguous(memory_format=memory_format(self.source.device))
            yield x, i[first].to(self.source.device)

    def train_batches(self, order, batch_size, *, start=0, epoch=0):
        keys = order.tolist()[start * batch_size :]
        seed = (self.source.seed * 1_000_003 + epoch) % (2**31)
        yield from self._run(self.source.files, keys, batch_size, True, seed)


def _first_occurrence(i: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each value in ``i`` (order kept)."""
    _, inv = torch.unique(i, return_inverse=True)
    pos = torch.arange(i.shape[0], device=i.device)
    first = torch.full((int(inv.max()) + 1 if i.numel() else 0,), i.shape[0], device=i.device, dtype=torch.long)
    first.scatter_reduce_(0, inv, pos, reduce="amin")
    return torch.sort(first).values
