"""The network of a run on its device: the module (a ResNet, or the user's backbone with LLP's heads),
its training forward (DistributedDataParallel under torchrun, ``torch.compile`` when asked), its
evaluation forward, autocast (bf16 on CUDA, float32 on CPU, docs/method.md §1.8), the optimizer and
the weight average (docs/method.md §8.3). The memory bank stays outside: it is a buffer LLP updates
itself.
"""

from __future__ import annotations

import torch

from .._device import memory_format
from ..errors import ConfigError
from ..nn import param_groups
from .build import model_for
from .checkpoint import digest
from .config import TrainConfig, amp_dtype
from .ema import WeightAverage


class Network:
    """``model`` (the module), ``forward`` (training), ``opt``, ``scaler``, ``average`` (or None)."""

    def __init__(self, cfg: TrainConfig, source, device: torch.device, *, world: int = 1, backbone=None):
        self.device = device
        self.model = model_for(cfg, source, backbone=backbone).to(device, memory_format=memory_format(device))
        _checkpointable(self.model)
        train_module = self.model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            train_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(train_module) if cfg.compile else train_module
        self.eval_forward = torch.compile(self.model) if cfg.compile else self.model  # no DDP collectives
        self.opt = torch.optim.SGD(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
        self.amp_dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.average = WeightAverage(self.model, cfg.ema) if cfg.ema and not cfg.supervised_only else None

    def autocast(self):
        """bf16 (or fp16) autocast on CUDA; a no-op in float32 on CPU."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    def step(self, loss: torch.Tensor, lr: float) -> None:
        """One optimizer step on ``loss`` at learning rate ``lr``; the weight average follows."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.model)

    @torch.no_grad()
    def embed(self, batches, averaged: bool = False):
        """(logits, embeddings, keys) of ``(images, key)`` batches in eval mode, with the weight
        average's weights when ``averaged``."""
        net = self.average.model if averaged else self.eval_forward
        net.eval()
        logits, embs, keys = [], [], []
        for x, key in batches:
            with self.autocast():
                lg, e = net(x)
            logits.append(lg.float())
            embs.append(e.float())
            keys.append(key)
        return torch.cat(logits), torch.cat(embs), torch.cat(keys)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings of one batch of images, in eval mode (the bank's forward start)."""
        self.eval_forward.eval()
        with self.autocast():
            return self.eval_forward(x)[1].float()

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": None if self.average is None else self.average.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.average is not None:
            self.average.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def _checkpointable(model: torch.nn.Module) -> None:
    """A :class:`ConfigError` before training where the network's state holds what a checkpoint
    cannot (a ``get_extra_state()`` returning a NumPy array failed the first checkpoint's write)."""
    other = {k: v for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)}
    try:
        digest(other, "the network's state dict")
    except TypeError as e:
        raise ConfigError(f"{e} (a module's get_extra_state() must return one of those)") from None
