"""How a run starts, before its first step: the bank's rows and the unlabeled examples' labels.

Both are choices of ours, not the paper's (docs/results.md has the runs that led to them):

- ``bank_init="forward"``: every bank row becomes the untrained network's embedding of its example
  (one inference pass), in place of random unit vectors. The first propagations then vote with
  neighbours that mean something, instead of random labeled rows that only their own first visit
  replaces, which on small labeled sets sends the early pseudo-labels and the embedding into a
  collapse.
- ``label_init="inputs"``: every unlabeled example's stored label and confidence come from
  docs/method.md §1.1-1.2 run on the training inputs themselves (pixels centred, each image
  L2-normalised), with the run's K, T, tau, density pool and weighting, in place of its instance
  id. The untrained network's embedding is a worse space to vote in than the pixels, and what the
  first votes get wrong the network learns and keeps. From the first propagation on, the
  network's own votes replace these labels.
"""

from __future__ import annotations

import math
import time

import torch

from .._progress import fmt_time
from ..ops import local_density, propagate

_QUERY_BLOCK = 1 << 16


@torch.no_grad()
def fill_bank(trainer) -> None:
    """Every bank row <- the untrained network's embedding of its (un-augmented) example. Stored
    labels are untouched. Under torch.distributed each rank embeds a strided share, padded to equal
    length, and the bank's collective ``update`` writes every row."""
    cfg, n, world = trainer.cfg, trainer.n, trainer.world
    t0 = time.perf_counter()
    share = torch.arange(trainer.rank, math.ceil(n / world) * world, world) % n
    with trainer.progress.bar(len(share), "filling the bank", "img") as bar:
        for x, idx in trainer.source.index_batches(share, cfg.eval_batch_size):
            _, emb, _ = trainer.embed([(x, idx)])
            trainer.bank.update(idx, emb, momentum=0.0)
            bar.update(int(idx.shape[0]))
    trainer.progress.line(f"bank filled by one forward pass over {n:,} examples ({fmt_time(time.perf_counter() - t0)})")


@torch.no_grad()
def init_labels(trainer) -> None:
    """Every unlabeled example's label and confidence <- LLP's vote on the training inputs
    (``source.input_features()``). Under torch.distributed rank 0's labels are broadcast, so
    replicated banks stay identical. Extra memory: the (N, C*H*W) float32 features and one block
    of queries."""
    cfg, dev = trainer.cfg, trainer.device
    t0 = time.perf_counter()
    feats = trainer.source.input_features()
    lab = trainer.targets >= 0
    labeled, classes = feats[lab], trainer.targets[lab]
    log_rho = None
    if cfg.density_weighting:
        pool = ~lab if cfg.density_pool == "unlabeled" else None
        log_rho = local_density(labeled, feats, t=cfg.t, tau=cfg.tau, pool_mask=pool)
    unl = torch.nonzero(~lab).flatten()
    labels = torch.empty(len(unl), dtype=torch.long, device=dev)
    conf = torch.empty(len(unl), device=dev)
    for s in range(0, len(unl), _QUERY_BLOCK):
        block = unl[s : s + _QUERY_BLOCK]
        lb, cb = propagate(
            feats[block], labeled, classes, log_rho, k=trainer.k, tau=cfg.tau, num_classes=trainer.num_classes
        )
        labels[s : s + len(block)], conf[s : s + len(block)] = lb, cb.float()
    del feats
    if trainer.world > 1:
        torch.distributed.broadcast(labels, src=0)
        torch.distributed.broadcast(conf, src=0)
    trainer.bank.set_labels(unl, labels, conf)
    truth = trainer.truth[unl]
    known = truth >= 0
    acc = f", {float((labels[known] == truth[known]).float().mean()):.1%} right" if bool(known.any()) else ""
    took = fmt_time(time.perf_counter() - t0)
    trainer.progress.line(f"{len(unl):,} unlabeled examples labeled by LLP's vote on their inputs{acc} ({took})")
