"""Device-dependent choices shared by the network and every data loader, and the one check that a
CUDA device exists."""

from __future__ import annotations

import torch

from .errors import ConfigError


def memory_format(device) -> torch.memory_format:
    """The memory format for images and convolution weights on ``device``.

    channels_last (NHWC) is a GPU optimisation: tensor cores read NHWC, so cuDNN convolutions
    skip a transpose. On CPU torch gains nothing from it, and oneDNN's NHWC backward
    corrupted the heap at small widths (a width-4 ResNet-18, one thread, AVX2-only CPUs), so
    CPU tensors keep the default contiguous format.
    """
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def cuda_checked(device: str, name: str = "--device") -> str:
    """``device`` (a name: cpu, cuda, cuda:N), or a :class:`ConfigError` naming the setting ``name``
    where it names CUDA on a machine without it (the commands, the trainer, the labeller's settings
    and ``load_network`` say it alike)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{name} {device}: CUDA is not available on this machine")
    return device
