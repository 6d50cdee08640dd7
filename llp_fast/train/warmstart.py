"""How a run starts, before its first step: the bank's rows and the unlabeled examples' labels.

Both are choices of ours, not the paper's (docs/results.md has the runs that led to them):

- ``bank_init="forward"``: every bank row becomes the untrained network's embedding of its example
  (one inference pass), in place of random unit vectors. The first propagations then vote with
  neighbours that mean something, instead of random labeled rows that only their own first visit
  replaces, which on small labeled sets sends the early pseudo-labels and the embedding into a
  collapse.
- ``label_init="inputs"``: every unlabeled example's stored label and confidence come from LLP's
  vote on the training inputs themselves (pixels centred, each image L2-normalised): docs/method.md
  §1.1-1.2 with ``start_rounds=1``, the multi-round vote of §7 with more, with the run's K, T, tau
  and weighting, in place of its instance id. The untrained network's embedding is a worse space to
  vote in than the pixels, and what the first votes get wrong the network learns and keeps. From
  the first propagation on, the network's own votes replace these labels.

The functions take what they use: the bank, the data source, an ``embed`` function (images ->
embeddings, eval mode) and the settings.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .._progress import fmt_time
from ..embeddings import label_embeddings
from ..errors import ConfigError
from ..ops import local_density, propagate

_QUERY_BLOCK = 1 << 16


@torch.no_grad()
def fill_bank(bank, source, embed, *, n: int, batch_size: int, rank: int = 0, world: int = 1, progress) -> None:
    """Every bank row <- ``embed`` of its (un-augmented) example. Stored labels are untouched. Under
    torch.distributed each rank embeds a strided share, padded to equal length, and the bank's
    collective ``update`` writes every row."""
    t0 = time.perf_counter()
    share = torch.arange(rank, math.ceil(n / world) * world, world) % n
    with progress.bar(len(share), "filling the bank", "img") as bar:
        for x, idx in source.index_batches(share, batch_size):
            v = embed(x)
            bad = ~torch.isfinite(v).all(dim=1)
            if bad.any():  # before any step: the network itself, not the learning rate
                first = int(idx[torch.nonzero(bad)[0, 0]].item())
                raise ConfigError(
                    f"the network gives NaN or Inf embeddings before any training step (training example {first}): "
                    "check its initial weights (--init-weights) and its forward pass"
                )
            bank.update(idx, v, momentum=0.0)
            bar.update(int(idx.shape[0]))
    progress.line(f"bank filled by one forward pass over {n:,} examples ({fmt_time(time.perf_counter() - t0)})")


@torch.no_grad()
def vote_on_inputs(feats: torch.Tensor, targets: torch.Tensor, cfg, *, k: int, num_classes: int):
    """Labels and confidences of the unlabeled rows of ``feats`` (N, F) from the labeled ones
    (``targets`` >= 0): ``cfg.start_rounds`` rounds (1: ``local_density`` + ``propagate``, the
    paper's vote, with ``cfg.density_pool``; more: docs/method.md §7). Returns (unlabeled dataset
    indices, labels, confidences) on ``feats``' device."""
    dev = feats.device
    lab = targets >= 0
    unl = torch.nonzero(~lab).flatten()
    if cfg.start_rounds > 1:
        res = label_embeddings(
            feats,
            targets.cpu().numpy(),
            rounds=cfg.start_rounds,
            k=k,
            t=cfg.t,
            tau=cfg.tau,
            density=cfg.density_weighting,
            max_voters=cfg.max_voters,  # (the refresh vote's cap: it took the labeller's own, unsaid)
            ties="row",  # (docs/method.md §8: the trainer's results were measured with it)
            normalize=False,
            device=str(dev),
        )
        rows = unl.cpu().numpy()
        labels = torch.from_numpy(np.ascontiguousarray(res.labels[rows])).to(dev)
        return unl, labels, torch.from_numpy(np.ascontiguousarray(res.confidence[rows])).to(dev)
    labeled, classes = feats[lab], targets[lab]
    log_rho = None
    if cfg.density_weighting:
        pool = ~lab if cfg.density_pool == "unlabeled" else None
        log_rho = local_density(labeled, feats, t=cfg.t, tau=cfg.tau, pool_mask=pool)
    labels = torch.empty(len(unl), dtype=torch.long, device=dev)
    conf = torch.empty(len(unl), device=dev)
    for s in range(0, len(unl), _QUERY_BLOCK):
        block = unl[s : s + _QUERY_BLOCK]
        lb, cb = propagate(feats[block], labeled, classes, log_rho, k=k, tau=cfg.tau, num_classes=num_classes)
        labels[s : s + len(block)], conf[s : s + len(block)] = lb, cb.float()
    return unl, labels, conf


@torch.no_grad()
def init_labels(bank, source, cfg, *, targets, truth, k: int, num_classes: int, world: int = 1, progress) -> None:
    """Every unlabeled example's label and confidence <- LLP's vote on the training inputs
    (``source.input_features()``). Under torch.distributed rank 0's labels are broadcast, so
    replicated banks stay identical. Extra memory: the (N, C*H*W) float32 features and one block
    of queries (more rounds: the engine's running top-K, (N, K))."""
    t0 = time.perf_counter()
    feats = source.input_features()
    unl, labels, conf = vote_on_inputs(feats, targets, cfg, k=k, num_classes=num_classes)
    del feats
    if world > 1:
        torch.distributed.broadcast(labels, src=0)
        torch.distributed.broadcast(conf, src=0)
    bank.set_labels(unl, labels, conf)
    truth = truth[unl]
    known = truth >= 0
    acc = f", {float((labels[known] == truth[known]).float().mean()):.1%} right" if bool(known.any()) else ""
    if acc and not bool(known.all()):  # (--extra-unlabeled: the selected images' truth is mostly unknown)
        acc += f" of the {int(known.sum()):,} whose label is known"
    took = fmt_time(time.perf_counter() - t0)
    how = f"a {cfg.start_rounds}-round vote" if cfg.start_rounds > 1 else "LLP's vote"
    progress.line(f"{len(unl):,} unlabeled examples labeled by {how} on their inputs{acc} ({took})")
