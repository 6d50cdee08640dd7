"""Process-group plumbing shared by the distributed banks and tools: start-up, shard ranges, and
exact combinations of per-rank partial results: concatenation, log-sum-exp, and the top-k of a
selection whose keys are sharded (each rank's ``topk_scores`` over its own keys, merged with
``llp_fast._topk.merge_topk``)."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist

from .._checks import DIST_TIMEOUT_RANGE, dist_timeout
from .._topk import merge_topk
from .agree import gather_agreed


def launched() -> bool:
    """True inside a multi-process launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


TIMEOUT_ENV = "LLP_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
# The exit status of a rank that stops because another rank is gone (its connection closed, or no
# answer within the timeout): EX_TEMPFAIL. The launcher of ``--nproc P`` reads it as "a survivor"
# and names the rank that was lost instead (llp_fast/cli/workers.py).
PEER_LOST = 75
# The exit status, under that launcher, of a rank interrupted with nothing to save (while it started
# or loaded, before training, or outside it): the others may be waiting for it inside a collective
# or the rendezvous, where no signal reaches them, so the launcher gives them a few seconds only.
# It reads as 130.
INTERRUPTED_UNSAVED = 121
QUIET_ENV = "LLP_FAST_WORKER"  # set by that launcher: a survivor exits without a word
# Set by that launcher too: a folder where each rank writes its error line (llp_fast.cli._common),
# which the launcher prints once however many ranks wrote it.
ERROR_LINES_ENV = "LLP_FAST_ERROR_LINES"
LAUNCHER_ENV = "LLP_FAST_LAUNCHER"  # and the launcher's pid: a rank whose parent is another is alone


def timeout_seconds() -> float:
    """The collective timeout: ``LLP_FAST_DIST_TIMEOUT`` seconds (``--dist-timeout`` sets it),
    600 when unset."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text.strip():
        return DEFAULT_TIMEOUT
    try:
        return dist_timeout(float(text))
    except ValueError:  # (not a number, or out of range)
        from ..errors import ConfigError

        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected {DIST_TIMEOUT_RANGE}") from None


CHUNK_ENV = "LLP_FAST_DIST_CHUNK"


def dist_chunk() -> int:
    """Labeled rows a rank sends per round of the sharded density refresh: ``LLP_FAST_DIST_CHUNK``,
    16,384 when unset; one line for a value that is not a whole number >= 1 (-1 left the densities
    unwritten, garbage, and 0 or text were a traceback)."""
    text = os.environ.get(CHUNK_ENV, "").strip()
    if not text:
        return 16_384
    if not text.isdigit() or int(text) < 1:
        from ..errors import ConfigError

        raise ConfigError(f"{CHUNK_ENV}={text!r}: expected a whole number >= 1 (rows a round)")
    return int(text)


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) if it is not yet; returns (rank, world_size). Every collective, and the
    rendezvous itself, gives up after :func:`timeout_seconds`."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_seconds())
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# What gloo and NCCL say when the other side is gone or silent.
_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "timed out",
    "timeout",
    "remote process exited",
    "network error",
    "pair closure",  # gloo: "Application timeout caused pair closure"
)
# Where torch.distributed's collectives raise from (DDP's buffer broadcast included): an error from
# there speaks for the process group even when its text does not name gloo or NCCL.
_DIST_FILES = (os.path.join("torch", "distributed", ""), os.path.join("torch", "nn", "parallel", "distributed.py"))


def _raised_in_distributed(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in _DIST_FILES):
            return True
        tb = tb.tb_next
    return False


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` means that another rank is gone (it died, or it stopped answering within the
    timeout) rather than a fault of this rank: a network or store error of ``torch.distributed``,
    or gloo's or NCCL's words for a closed connection or a timeout, raised while this process is
    one rank of several. A collective misused (shapes, dtypes) is none of these: a bug, with its
    traceback."""
    if not launched() or not isinstance(e, RuntimeError):
        return False
    if isinstance(e, (getattr(dist, "DistNetworkError", ()), getattr(dist, "DistStoreError", ()))):
        return True
    text = str(e).lower()
    ours = isinstance(e, getattr(dist, "DistError", ())) or "gloo" in text or "nccl" in text or "pair closure" in text
    ours = ours or _raised_in_distributed(e)
    return ours and any(word in text for word in _LOST)


def lost_line(prog: str, e: BaseException) -> str | None:
    """The line a surviving rank prints for :func:`peer_lost` ``e``: none under the launcher of
    ``--nproc`` (which names the lost rank itself), one line under a torchrun of the user's."""
    if os.environ.get(QUIET_ENV) == "1":
        return None
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = text.split("] ", 1)[-1].split(". This is typically", 1)[0]  # gloo's source location and advice
    rank = os.environ.get("RANK", "?")
    return f"{prog}: error: rank {rank} lost contact with the other ranks ({text})"


def finish(rc: int) -> int:
    """Leaves the process group at the end of a command and returns ``rc``. After a clean run the
    ranks meet at a barrier first (none exits while another still talks to it); after a failure they
    do not wait for each other. A process that torchrun launched then ends here, by ``os._exit``
    once its output is flushed: gloo's threads can abort the interpreter's own teardown
    ("terminate called without an active exception", SIGABRT) even after the group is destroyed,
    which torchrun reports as a failed run. Every file a command writes is closed before this.
    A peer lost at the final barrier is :data:`PEER_LOST`, quietly."""
    if dist.is_initialized():
        # After a clean run the outputs are in place: a Ctrl-C or SIGTERM now (the launcher passes it
        # on) waits until the ranks have met, instead of a traceback from inside the barrier and a
        # launcher's "nothing was written" beside the files it wrote. (The process ends right after.)
        # (ignored, not masked: a signal masked in this thread is taken by one of gloo's or OpenMP's)
        held = {}
        for sig in (signal.SIGINT, signal.SIGTERM) if rc == 0 else ():
            with contextlib.suppress(ValueError):  # not the main thread
                held[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            if rc == 0:
                try:
                    dist.barrier()
                except RuntimeError as e:
                    if not peer_lost(e):
                        raise
                    rc = PEER_LOST
            if rc != PEER_LOST:  # a group whose peer is gone is not torn down: the process ends now
                dist.destroy_process_group()
        finally:
            for sig, handler in held.items() if not launched() else ():  # launched: it ends below
                signal.signal(sig, handler)
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The dataset indices [start, end) that ``rank`` owns: contiguous, sizes differ by <= 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_cat(x: torch.Tensor, group=None, agree: tuple[str, dict] | None = None) -> torch.Tensor:
    """Concatenation over ranks (rank order) of tensors whose first dimension may differ.
    ``agree``: (call, settings) that every rank must pass alike, checked with the sizes
    (:func:`llp_fast.distributed.agree.gather_agreed`, no collective more)."""
    call, settings = agree if agree is not None else ("all_gather_cat", {})
    sizes = gather_agreed(x.shape[0], call, settings, group, x.device)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def merged_topk(values: torch.Tensor, indices: torch.Tensor, k: int, group=None):
    """The top-k over every rank's keys, from each rank's top-k (``values`` float32 or float64, ``indices`` (Q,
    k), the same queries on every rank, indices global and distinct across ranks): all-gathered (one
    collective: the values' bits and the indices in one int64 tensor) and merged, equal values by the
    lower index, as one process holding every key selects them.

    Where every rank's keys are numbered above every lower rank's (the banks' contiguous shards) and
    each list is in ``topk_scores``' order, the lists side by side in rank order already hold equal
    values by ascending index, and one stable sort by value gives the one merge's result
    (:func:`llp_fast._topk.merge_topk`, two sorts, for anything else)."""
    width, wide = values.shape[1], values.dtype == torch.float64  # (float64 kept: a labeller's float64 run)
    bits = values.contiguous().view(torch.int64) if wide else values.float().contiguous().view(torch.int32).long()
    parts = all_gather_same(torch.cat([bits, indices.long()], dim=1), group)
    back = (lambda p: p.contiguous().view(torch.float64)) if wide else (lambda p: p.int().view(torch.float32))  # noqa: E731
    return merge_rank_lists([back(p[:, :width]) for p in parts], [p[:, width:] for p in parts], k)


def merge_rank_lists(values: list[torch.Tensor], indices: list[torch.Tensor], k: int):
    """:func:`merged_topk`'s merge of the ranks' lists (each (Q, w), in rank order) by
    :func:`llp_fast._topk.merge_topk`: one stable sort where every rank's keys lie above every lower
    rank's (``index_ordered``), two for anything else."""
    vals, idx = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    world, width = len(values), values[0].shape[1]
    ordered = world > 1 and vals.shape[0] > 0 and _ranks_in_index_order(idx, width, world)
    return merge_topk(vals, idx, k, index_ordered=ordered)


def _ranks_in_index_order(idx: torch.Tensor, width: int, world: int) -> bool:
    """Whether each rank's ``width`` columns of ``idx`` (padding -1 aside) lie above every lower
    rank's (ranks without any key aside)."""
    valid = idx >= 0
    high = torch.where(valid, idx, torch.full_like(idx, -1)).view(-1, world, width).amax(dim=(0, 2))
    low = torch.where(valid, idx, torch.full_like(idx, torch.iinfo(torch.int64).max)).view(-1, world, width)
    low = low.amin(dim=(0, 2))
    return bool((high.cummax(0).values[:-1] < low[1:]).all())


def lse_combine(lse: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(lse)), elementwise, stable."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lse - safe)
    dist.all_reduce(total, group=group)
    return torch.log(total) + safe


def offset_of_rank(n_local: int, group, device) -> int:
    """Where this rank's rows start in an all_gather_cat of per-rank batches."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([n_local], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    return int(sum(int(s) for s in sizes[:rank]))


def all_gather_same(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """``x`` from every rank (same shape on every rank), in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts
