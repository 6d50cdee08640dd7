"""The aggregation loss of each rank's batch against a bank sharded over the ranks
(:class:`llp_fast.distributed.ShardedMemoryBank`'s ``loss`` and ``instance_loss``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_gather_cat, lse_combine, offset_of_rank


class ShardedAggregationLoss(torch.autograd.Function):
    """L_A for the local batch against a bank sharded over ranks: the value and, on a float32 bank,
    the gradient exact (a bf16/fp16 bank rounds each rank's share of the gradient, see backward)."""

    @staticmethod
    def forward(ctx, v, shard, shard_labels, targets, tau, group, agree):
        v_all = all_gather_cat(v.detach(), group, agree)  # (agree: the call and its settings)
        t_all = all_gather_cat(targets, group)
        _, lse_all, lse_pos = torch.ops.llp_fast.aggregation_loss(v_all, shard, shard_labels, t_all, tau)
        lse_all = lse_combine(lse_all.float(), group)
        lse_pos = lse_combine(lse_pos.float(), group)
        rank_start = offset_of_rank(v.shape[0], group, v.device)
        ctx.save_for_backward(v_all, shard, shard_labels, t_all, lse_all, lse_pos)
        ctx.tau, ctx.group, ctx.rows = tau, group, (rank_start, rank_start + v.shape[0])
        ctx.v_dtype = v.dtype
        return (lse_all - lse_pos)[rank_start : rank_start + v.shape[0]]

    @staticmethod
    def backward(ctx, grad):
        v_all, shard, shard_labels, t_all, lse_all, lse_pos = ctx.saved_tensors
        g_all = all_gather_cat(grad.contiguous().float(), ctx.group)
        # Each rank's share comes back in the bank's dtype and is rounded before the sum: on a bf16
        # or fp16 bank its error is the share's rounding (1.4-1.8x one process's on typical rows,
        # more where the shares cancel). A float32 share would need the shard widened each step.
        part = torch.ops.llp_fast.aggregation_loss_backward(
            v_all, shard, shard_labels, t_all, lse_all, lse_pos, g_all, -g_all, ctx.tau
        ).float()
        dist.all_reduce(part, group=ctx.group)
        lo, hi = ctx.rows
        return part[lo:hi].to(ctx.v_dtype), None, None, None, None, None, None
