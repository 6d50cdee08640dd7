"""The networks a run trains: a pre-activation ResNet (:mod:`llp_fast.resnet`), a factory's module
(``--arch package.module:factory``) or one given in Python, the last two with LLP's two heads
(:class:`WithHeads`, docs/method.md §1.8); ``--init-weights`` loaded into the trunk, and how a state
dict fails to fit a network (:func:`misfit`); the optimizer's parameter groups.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .resnet import ARCHS, build_model, check_sizes

_EXTRA_STATE = "_extra_state"  # a state dict's key for a module's get_extra_state(): any object


class NetworkOutputError(ConfigError):
    """A backbone's output that is not features (B, F) or a feature map (B, F, h, w): one line (a
    network that returns a tuple only in training mode meets it at the first step; :func:`build`
    names the network). Any other error raised inside the user's network keeps its traceback (it is
    the user's code)."""


class WithHeads(nn.Module):
    """A backbone of the user's (any module mapping images (B, C, H, W) to features (B, F), or to a
    feature map (B, F, h, w), which is average-pooled) with LLP's two heads on its features: a
    linear classifier to S classes and a linear projection to D, L2-normalised (docs/method.md §1.8).

    ``forward(x)`` returns ``(logits (B, S), emb (B, D))`` as :class:`~llp_fast.resnet.PreActResNet` does, so the
    trainer, checkpoints and tools treat both alike; ``features(x)`` is the backbone's output.
    ``feature_dim`` (F) is measured with one forward pass of a (2, C, S, S) zero batch in eval mode.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, in_channels: int, image_size: int, emb_dim=128):
        super().__init__()
        self.backbone = backbone
        was_training = backbone.training
        backbone.eval()
        # probed where it lives (a backbone already on a GPU failed on a CPU image)
        where = next(itertools.chain(backbone.parameters(), backbone.buffers()), torch.zeros(0)).device
        with torch.no_grad():
            out = backbone(torch.zeros(2, in_channels, image_size, image_size, device=where))
            probe = self._pooled(out)
        backbone.train(was_training)
        if probe.shape[0] != 2 or probe.shape[1] < 1 or not probe.is_floating_point():
            raise NetworkOutputError(
                "the network must return features (B, F) or a feature map (B, F, h, w): one row of F >= 1 "
                f"floating-point features per image; for a batch of 2 it returned {out.dtype} of shape "
                f"{tuple(out.shape)}"
            )
        self.feature_dim = int(probe.shape[1])
        self.fc = nn.Linear(self.feature_dim, num_classes, device=where)
        self.embed = nn.Linear(self.feature_dim, emb_dim, device=where)

    @staticmethod
    def _pooled(h) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() not in (2, 4):
            what = f"shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise NetworkOutputError(
                f"the network must return features (B, F) or a feature map (B, F, h, w), got {what}"
            )
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1) if h.dim() == 4 else h

    def features(self, x):
        h = self._pooled(self.backbone(x))
        # Any floating-point features: float64 or float16 ones (a backbone kept in that dtype) met the
        # heads' float32 weights at the first step (a dtype error). Autocast casts float32 itself.
        want = self.fc.weight.dtype
        if h.dtype == torch.float64 or (h.dtype != want and not torch.is_autocast_enabled(h.device.type)):
            h = h.to(want)
        return h

    def forward(self, x):
        h = self.features(x)
        return self.fc(h), F.normalize(self.embed(h).float(), dim=1)


def import_factory(spec: str):
    """The function named by ``package.module:factory``, imported (the current directory is
    searched first, as ``python -m`` would); :class:`ConfigError` naming ``--arch`` when it cannot."""
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:  # (a run's tools, started elsewhere, named only the flag)
        raise ConfigError(
            f"--arch {spec}: cannot import {module_name} ({e}); it is looked for in the current directory "
            "and on PYTHONPATH: run from the directory holding it, or add that directory to PYTHONPATH"
        ) from None
    except Exception as e:  # the user's module: an error while it runs
        raise ConfigError(f"--arch {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    finally:
        sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--arch {spec}: {module_name} has no function {attr!r}")
    return factory


def _from_factory(spec: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    factory = import_factory(spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    except (TypeError, ValueError):  # a builtin without a signature
        kwargs = {}
    try:
        net = factory(**kwargs)
    except Exception as e:  # the user's code failed; its message is the line
        raise ConfigError(f"--arch {spec}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"--arch {spec}: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def load_weights(model: nn.Module, path: str) -> None:
    """``--init-weights PATH``: a state dict saved with ``torch.save`` (or a dict holding one under
    ``state_dict`` or ``model``, as a run's checkpoint does) loaded into the network's trunk: the
    backbone of a :class:`WithHeads` (given the backbone's own state dict, or a whole
    :class:`WithHeads`'s), every layer but the two heads of a ResNet. Every trunk tensor must be
    there with its shape (BatchNorm's ``num_batches_tracked`` may be missing, as ``load_state_dict``
    allows); :class:`ConfigError` naming the flag otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"--init-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled objects
        raise ConfigError(f"--init-weights {path}: cannot read a state dict ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) or str(k).endswith(_EXTRA_STATE) for k, v in state.items()
    ):
        raise ConfigError(f"--init-weights {path}: expected a state dict of tensors")
    trunk = model.backbone if isinstance(model, WithHeads) else model
    heads = () if isinstance(model, WithHeads) else ("fc.", "embed.")
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith(heads)}

    def misfit_of(state: dict) -> str | None:
        # weights saved before PyTorch 0.4.1 lack num_batches_tracked; load_state_dict fills it in
        return misfit(state, {k: v for k, v in own.items() if k in state or not k.endswith(".num_batches_tracked")})

    differs = misfit_of(state)
    if differs and isinstance(model, WithHeads) and any(k.startswith("backbone.") for k in state):
        # a whole WithHeads (a run's checkpoint, fit(...).model's state dict): its backbone, where the
        # state as it is does not fit (a backbone whose own keys start with "backbone." does)
        inner = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if misfit_of(inner) is None:
            state, differs = inner, None
    if differs:
        raise ConfigError(f"--init-weights {path} does not fit the network: {differs}")
    trunk.load_state_dict(state, strict=False)


def misfit(state: dict, want: dict) -> str | None:
    """How the state dict ``state`` fails to fit a network whose own is ``want``: the first entry
    missing, unexpected or of another shape, and how many differ; None when it fits."""
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shape = [k for k in want if k in state and _form(state[k]) != _form(want[k])]
    if not (missing or extra or shape):
        return None
    what = (
        f"missing {missing[0]!r}"
        if missing
        else f"unexpected {extra[0]!r}"
        if extra
        else f"{shape[0]!r} has {_form(state[shape[0]])}, the network {_form(want[shape[0]]).removeprefix('shape ')}"
    )
    return f"{what} ({len(missing) + len(extra) + len(shape)} entries differ)"


def _form(v) -> str:
    """What :func:`misfit` compares: a tensor's shape; any other entry (``get_extra_state()``) fits."""
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else "an entry not a tensor"


GIVEN = "given:"  # the arch of a run whose backbone was passed in Python, e.g. "given:MyNet"


def build(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 64,
    emb_dim: int = 128,
    init_weights: str | None = None,
    backbone: nn.Module | None = None,
) -> nn.Module:
    """The network of a run: a pre-activation ResNet (``resnet18``, ``resnet50``); the module a
    ``package.module:factory`` returns (called with whichever of ``num_classes``, ``in_channels`` and
    ``image_size`` it takes); or ``backbone``, a module passed in Python (``arch`` is then
    ``given:<its class>``). The last two get LLP's heads (:class:`WithHeads`). Then ``init_weights``."""
    if not isinstance(arch, str):
        raise TypeError(
            f"arch must be a string (resnet18, resnet50 or package.module:factory), got {type(arch).__name__}"
        )
    check_sizes(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width, emb_dim=emb_dim)
    if backbone is not None and arch in ARCHS:  # (it was ignored without a word)
        raise ValueError(f"backbone: a module given in Python takes arch='given:...', not the built-in {arch}")
    if arch in ARCHS:
        net = build_model(
            arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width, emb_dim=emb_dim
        )
    else:
        if backbone is None and arch.startswith(GIVEN):
            raise ConfigError(
                f"this run's network ({arch[len(GIVEN) :]}) was given in Python and cannot be built from the "
                "run directory: only llp_fast.train.fit(model, ..., resume=True) continues such a run; the tools "
                "need a run of --arch resnet18, resnet50 or package.module:factory"
            )
        if backbone is None:
            backbone = _from_factory(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        try:
            net = WithHeads(
                backbone, num_classes=num_classes, in_channels=in_channels, image_size=image_size, emb_dim=emb_dim
            )
        except NetworkOutputError as e:
            raise ConfigError(f"{_named(arch)}: {e}") from None
        except RuntimeError as e:  # torch's: the backbone cannot take these images (channels, size)
            # (chained: the one line at the command line, the user's own frames under it in Python; a
            # ValueError, TypeError or IndexError of the user's code is not turned into a setting's error)
            why = str(e).splitlines()[0][:200]
            raise ConfigError(
                f"{_named(arch)}: the network fails on a ({in_channels}, {image_size}, {image_size}) image: {why}"
            ) from e
    if init_weights is not None:
        load_weights(net, init_weights)
    return net


def _named(arch: str) -> str:
    """The network in an error: the flag that named it, or the module given in Python (no flag)."""
    return f"the network given ({arch[len(GIVEN) :]})" if arch.startswith(GIVEN) else f"--arch {arch}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on conv and linear weights only; batch-norm
    parameters and biases (every parameter with fewer than 2 dims) get none (docs/method.md §1.5)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
