"""``llp_fast::vote``: propagate's finish, the density-weighted vote of the top-K (docs/method.md §1.2),
as an op so that the compiled extension can serve it on CPU (``csrc/cpu/vote_cpu.cpp``, for the
(rows, classes) table of ``_topk._dense``). Callers use ``llp_fast._topk.vote``, which sends CPU calls
with few classes here; the default body is ``_topk.vote_torch``."""

from __future__ import annotations

import torch

from .._topk import vote_torch
from ._common import compiled_first


@compiled_first("vote")
def _vote_default(
    values: torch.Tensor, classes: torch.Tensor, table: torch.Tensor | None, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return vote_torch(values, classes, num_classes, table=table)


vote_op = torch.library.custom_op("llp_fast::vote", _vote_default, mutates_args=())


@vote_op.register_fake
def _(values, classes, table, num_classes):
    r = values.shape[0]
    return values.new_empty(r, dtype=torch.int64), values.new_empty(r)
