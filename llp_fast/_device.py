"""Device-dependent choices shared by the network and every data loader."""

from __future__ import annotations

import torch


def memory_format(device) -> torch.memory_format:
    """The memory format for images and convolution weights on ``device``.

    channels_last (NHWC) is a GPU optimisation: tensor cores read NHWC, so cuDNN convolutions
    skip a transpose. On CPU torch gains nothing from it, and oneDNN's NHWC backward
    corrupted the heap at small widths (a width-4 ResNet-18, one thread, AVX2-only CPUs), so
    CPU tensors keep the default contiguous format.
    """
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format
