"""Training a network with LLP (``llp-fast-train``), one responsibility per module:

- :mod:`.config` — :class:`TrainConfig`: every setting with its default, flag and range check; the
  learning-rate schedule;
- :mod:`.checkpoint` — atomic, verified checkpoints and random-generator state;
- :mod:`.order` — which examples each epoch visits, in which batches;
- :mod:`.warmstart` — the bank's rows and the unlabeled labels before the first step;
- :mod:`.evaluate` — the end-of-epoch accuracy and diagnostics;
- :mod:`.report` — ``metrics.jsonl``, TensorBoard, the epoch line;
- :mod:`.defaults` — the settings a run takes from its data, device and ``--method``;
- :mod:`.build` — the data and network a config describes;
- :mod:`.losses`, :mod:`.ema`, :mod:`.relabel` — the step's losses, the weight average, the
  whole-bank vote;
- :mod:`.loop` — :class:`Trainer`: the step, the epoch, the run;
- :mod:`.api` — :func:`fit`: train your own network from Python.

Tools that only read checkpoints import ``config`` and ``checkpoint`` and never the loop; the
names below are loaded on first use, so ``import llp_fast.train.checkpoint`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "lr_at": "config",
    "resolve": "defaults",
    "fit": "api",
    "Fitted": "api",
    "CHECKPOINT": "checkpoint",
    "METRICS": "checkpoint",
    "read_metrics": "report",
    "Trainer": "loop",
    "prepare": "api",
    "train": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
