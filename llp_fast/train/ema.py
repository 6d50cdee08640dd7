"""The weight average evaluated in place of the trained weights (docs/method.md §8.3).

After every optimizer step each parameter of the average moves toward the trained one,
``a <- d * a + (1 - d) * p``, and the buffers (batch-norm statistics) are copied, as USB's and
FixMatch's evaluation models do. The decay of step t is ``d = min(decay, (1 + t) / (10 + t))``
(TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``): early in a run the average
follows the weights closely instead of mixing the random start into batch-norm statistics that no
longer match it. The average smooths the noise that pseudo-label targets put into the last steps;
it never feeds back into training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of ``model``'s weights, kept on its device."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.steps = 0
        with torch.no_grad():  # (a TorchScript module's copy under grad mode: non-leaf parameters)
            self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        avg = [p for p in self.model.parameters()]
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(avg, d)
        torch._foreach_add_(avg, cur, alpha=1 - d)
        for b, c in zip(self.model.buffers(), model.buffers()):
            b.copy_(c)

    def state_dict(self) -> dict:
        return {"steps": self.steps, **self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.steps = int(state.pop("steps"))
        self.model.load_state_dict(state)
