"""The LLP training loop (SPEC §1.5-1.7) with evaluation, checkpoints and exact resume.

One step, for a mini-batch drawn uniformly from all training examples (labeled and
unlabeled mixed, SPEC §1.7):

    logits, v = net(augment(x))
    l, c      = bank.stored(indices)                  # targets from the previous visit
    loss      = mean_b c_b * (CE(logits_b, l_b) [0 for instance ids] + L_A(v_b))   # §1.5
    SGD step (momentum 0.9, weight decay on weights only)
    bank.step(indices, v.detach())                    # §1.6: propagate, then blend rows

with ``bank.refresh_density`` at the start of every epoch (§1.1). Before the first step the
bank can be filled by one pass of the untrained network (``bank_init="forward"``) and the
unlabeled examples' labels by LLP's vote on their raw inputs (``label_init="inputs"``);
until ``propagation_start`` the rows are blended but nobody is re-labeled. ``supervised_only`` trains
the same network with the same schedule (same number of steps) on the labeled examples
alone with cross-entropy: the baseline.

Checkpoints (``RUN_DIR/checkpoint.pt``) are written atomically (temporary file, fsync,
``os.replace``) after every epoch and on SIGINT/SIGTERM at the next step boundary. They hold
the model, optimizer, scaler, bank, every random generator and the position inside the
epoch, so that a resumed run replays exactly what the uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import MemoryBank, distributed, local_density, propagate
from ._device import memory_format
from .data import DataError
from .data import load as load_data
from .data.extra import add_extra_unlabeled, drop_extra_rows
from .nn import build_model, param_groups

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CKPT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, truncated, from another run)."""


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is safely written."""

    def __init__(self, signum: int, run_dir: str):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved in {run_dir}")
        self.signum = signum


@dataclass
class TrainConfig:
    data: str = "digits"
    run_dir: str = "runs/llp"
    epochs: int = 30
    labeled_fraction: float | None = 0.1
    unlabeled_fraction: float = 1.0
    seed: int = 0
    arch: str = "resnet18"
    width: int = 16
    device: str = "cpu"
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=list)  # epochs where lr *= 0.1
    rate_jump: int | None = None  # epoch where lr jumps back to 0.1 x initial
    jump_milestones: list[int] = field(default_factory=list)  # two more x0.1 drops after the jump
    warmup_epochs: int = 0  # instance-discrimination warm-up
    bank_init: str = "forward"  # "forward": one pass of the network fills the bank; "random": unit noise
    propagation_start: int = 0  # epochs before the first propagation (unlabeled rows keep their start labels)
    label_init: str = "instance"  # unlabeled examples' start: "instance" ids, or "inputs": LLP's vote on the raw inputs
    k: int = 10  # 0: min(10, the smallest labeled class's size)
    t: int = 25
    tau: float = 0.07
    bank_momentum: float = 0.5
    density_pool: str = "unlabeled"
    density_weighting: bool = True
    confidence: bool = True
    supervised_only: bool = False
    extra_unlabeled: str | None = None  # llp-fast-select output; dropped for the rate-jump phase
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), bf16, fp16, off
    compile: bool = False
    image_size: int | None = None
    scale_min: float | None = None
    translate: float | None = None
    flip: bool | None = None
    workers: int = 2
    eval_batch_size: int = 512
    threads: int = 0  # CPU threads for torch (0: torch's default)
    bank_layout: str = "sharded"  # under torch.distributed: "sharded" or "replicated" (llp_fast.distributed)
    quiet: bool = False
    # set by the trainer, not by the user
    stop_after_steps: int | None = None  # testing aid: act as if SIGINT arrived after this many steps


# -- small helpers ----------------------------------------------------------------------
def _atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: a
    reader sees either the previous complete checkpoint or the new one, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads and sanity-checks a checkpoint; :class:`CheckpointError` on anything wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__}); delete it to start over") from None
    need = ("version", "config", "epoch", "step_in_epoch", "model", "optimizer", "rng")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise CheckpointError(f"corrupt checkpoint {path} (missing entries)")
    if ckpt["version"] != CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {ckpt['version']}, expected {CKPT_VERSION}")
    return ckpt


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """SPEC §1.7: base lr, x0.1 at each milestone; after ``rate_jump`` the lr restarts at
    0.1 x base and drops x0.1 at each jump milestone."""
    if cfg.rate_jump is not None and epoch >= cfg.rate_jump:
        lr = 0.1 * cfg.lr
        return lr * 0.1 ** sum(epoch >= m for m in cfg.jump_milestones)
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def saved_config(ckpt: dict, path: str) -> TrainConfig:
    """The :class:`TrainConfig` stored in a loaded checkpoint (fields this version does not
    know are dropped); ``path`` names the file in the error for a malformed one."""
    saved = ckpt["config"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"corrupt checkpoint {path} (bad config)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def source_for(cfg: TrainConfig, device, *, workers: int | None = None):
    """The training data of ``cfg`` (split, preprocessing and augmentation as configured)."""
    return load_data(
        cfg.data,
        device=device,
        labeled_fraction=cfg.labeled_fraction,
        unlabeled_fraction=cfg.unlabeled_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
        scale_min=cfg.scale_min,
        translate=cfg.translate,
        flip=cfg.flip,
        workers=cfg.workers if workers is None else workers,
        batch_size=cfg.batch_size,
    )


def model_for(cfg: TrainConfig, source) -> torch.nn.Module:
    """The network of ``cfg`` shaped for ``source`` (classes, channels, image size), on the CPU."""
    return build_model(
        cfg.arch,
        num_classes=source.num_classes,
        in_channels=source.in_channels,
        image_size=source.image_size,
        width=cfg.width,
    )


def _amp_dtype(cfg: TrainConfig, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return None
    if device.type != "cuda":
        raise ValueError(f"--amp {mode} needs a CUDA device; training on CPU runs in float32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def _rng_state(gens: dict) -> dict:
    state = {name: g.get_state() for name, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gens: dict, state: dict) -> None:
    for name, g in gens.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """A plain-stderr progress bar with throughput and ETA (redrawn at most 5 times a second
    on a terminal; only the epoch summaries when stderr is not a terminal)."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.last = 0.0

    def update(self, prefix, done, total, images, seconds, loss, eta_s):
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and done < total:
            return
        self.last = now
        width = 24
        fill = int(width * done / max(total, 1))
        rate = images / max(seconds, 1e-9)
        self.stream.write(
            f"\r{prefix} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
            f"{rate:,.0f} img/s loss {loss:.3f} ETA {_fmt_time(eta_s)}   "
        )
        self.stream.flush()

    def line(self, text):
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# -- the trainer --------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # Under torchrun (WORLD_SIZE > 1): one process per GPU or CPU worker, NCCL or gloo.
        self.rank, self.world = distributed.init() if distributed.launched() else (0, 1)
        device = cfg.device
        if self.world > 1 and device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.source = source_for(cfg, self.device)
        src = self.source
        self.n_original = src.num_train  # examples before --extra-unlabeled's (dataset indices [0, n_original))
        if cfg.extra_unlabeled:
            if self.world > 1:
                # drop_extra_rows cuts one full bank at the rate jump; a sharded cut is not written yet
                raise ValueError("--extra-unlabeled runs in a single process for now (drop --nproc)")
            add_extra_unlabeled(src, cfg.extra_unlabeled)
        self.num_classes = src.num_classes
        self.targets = src.targets.to(self.device)  # (N,) -1 = unlabeled
        self.truth = src.truth.to(self.device)
        self.labeled_idx = torch.nonzero(src.targets >= 0).flatten()  # CPU
        self.n = src.num_train
        self.model = model_for(cfg, src).to(self.device)
        self.model = self.model.to(memory_format=memory_format(self.device))
        # The bank stays outside the DDP module: it is a buffer LLP updates itself.
        train_module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(train_module) if cfg.compile else train_module
        # Evaluation runs the plain module on every rank (no DDP collectives in eval).
        self.eval_forward = torch.compile(self.model) if cfg.compile else self.model
        self.opt = torch.optim.SGD(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.bank = None
        # K = 0 asks for min(10, smallest labeled class). With the forward bank start K = 10 is the
        # better choice even at 3 labels per class (docs/results.md): the votes that reach into
        # other classes lower the confidence of ambiguous examples instead of flipping them.
        self.k = cfg.k or min(10, int(torch.bincount(src.targets[src.targets >= 0]).min()))
        if not isinstance(cfg.propagation_start, int) or cfg.propagation_start < 0:
            raise ValueError(f"propagation_start must be an integer >= 0, got {cfg.propagation_start!r}")
        if cfg.bank_init not in ("forward", "random"):
            raise ValueError(f"bank_init must be 'forward' or 'random', got {cfg.bank_init!r}")
        if cfg.label_init not in ("instance", "inputs"):
            raise ValueError(f"label_init must be 'instance' or 'inputs', got {cfg.label_init!r}")
        if cfg.label_init == "inputs" and not cfg.supervised_only and not hasattr(src, "input_features"):
            raise DataError(
                f"--label-init inputs needs array data (digits, mnist5k, npz:PATH); {cfg.data} has no input "
                "vectors to propagate in (use --label-init instance)"
            )
        if not cfg.supervised_only:
            if self.k > len(self.labeled_idx):
                raise DataError(f"--k {self.k} exceeds the {len(self.labeled_idx)} labeled training examples")
            n_unl = self.n - len(self.labeled_idx)
            pool = n_unl if cfg.density_pool == "unlabeled" else self.n
            if cfg.t > pool:
                raise DataError(f"--t {cfg.t} exceeds the density pool of {pool} examples")
            if self.world == 1:
                self.bank = MemoryBank(src.targets, src.num_classes, dim=128, device=self.device, seed=cfg.seed)
            elif cfg.bank_layout == "replicated":
                self.bank = distributed.ReplicatedMemoryBank(
                    src.targets, src.num_classes, dim=128, device=self.device, seed=cfg.seed
                )
            elif cfg.bank_layout == "sharded":
                self.bank = distributed.ShardedMemoryBank(
                    src.targets, src.num_classes, dim=128, device=self.device, seed=cfg.seed
                )
            else:
                raise ValueError(f"--bank must be 'sharded' or 'replicated', got {cfg.bank_layout!r}")
        self.gen_order = torch.Generator().manual_seed(cfg.seed + 1)
        self.gen_aug = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.gens = {"order": self.gen_order, "aug": self.gen_aug}
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.global_step = 0
        self.order_state = self.gen_order.get_state()  # generator state at the current epoch's start
        self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}
        self.stop_signal = None
        self.progress = Progress(enabled=not cfg.quiet and self.rank == 0)

    # -- schedule ------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        if self.world == 1:
            return math.ceil(self.n / self.cfg.batch_size)
        per_rank = math.ceil(self._epoch_length() / self.world)
        return math.ceil(per_rank / self.rank_batch_size())

    def rank_batch_size(self) -> int:
        """Per-process batch: the global batch (``--batch-size``) split over the ranks."""
        return max(1, self.cfg.batch_size // self.world)

    def _epoch_length(self) -> int:
        if not self.cfg.supervised_only:
            return self.n
        return math.ceil(self.n / self.cfg.batch_size) * self.cfg.batch_size

    def epoch_order(self) -> torch.Tensor:
        """Dataset indices of this epoch's batches: a uniform permutation of all examples
        (SPEC §1.7); for the baseline, labeled examples only, repeated to the same number
        of steps."""
        if self.world > 1:
            return self._rank_order()
        if not self.cfg.supervised_only:
            return torch.randperm(self.n, generator=self.gen_order)
        need = self.steps_per_epoch() * self.cfg.batch_size
        m = len(self.labeled_idx)
        perms = [self.labeled_idx[torch.randperm(m, generator=self.gen_order)] for _ in range(math.ceil(need / m))]
        return torch.cat(perms)[:need]

    def _rank_order(self) -> torch.Tensor:
        """This rank's share of the epoch, from a DistributedSampler over the epoch's examples
        (all of them; for the baseline, the labeled ones repeated to a full epoch):
        shuffled with the run's seed and ``set_epoch``, padded to a multiple of the world."""
        length = self._epoch_length()
        if self.cfg.supervised_only:
            m = len(self.labeled_idx)
            base = self.labeled_idx.repeat(math.ceil(length / m))[:length]
        else:
            base = torch.arange(self.n)
        sampler = torch.utils.data.DistributedSampler(
            range(length), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed
        )
        sampler.set_epoch(self.epoch)
        return base[torch.tensor(list(sampler), dtype=torch.long)]

    def _stop_requested(self) -> bool:
        """A signal seen by any rank stops every rank at the same step (no rank is left
        waiting in a collective for one that already left)."""
        flag = self.stop_signal is not None
        if self.world == 1:
            return flag
        t = torch.tensor([self.stop_signal or 0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if int(t) and self.stop_signal is None:
            self.stop_signal = int(t)
        return bool(int(t))

    # -- one step ------------------------------------------------------------------------
    def loss(self, logits, emb, idx, warmup: bool):
        cfg = self.cfg
        if cfg.supervised_only:
            return F.cross_entropy(logits.float(), self.targets[idx])
        if warmup:
            return self.bank.instance_loss(emb, idx, tau=cfg.tau).mean()
        labels, conf = self.bank.stored(idx)
        la = self.bank.loss(emb, idx, tau=cfg.tau, targets=labels)
        ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none") * (labels >= 0)
        c = conf if cfg.confidence else torch.ones_like(conf)
        return (c * (ce + la)).mean()

    def autocast(self):
        """bf16 (or fp16) autocast on CUDA; a no-op in float32 on CPU (SPEC §1.8)."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    def train_step(self, x, idx, lr, warmup):
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        with self.autocast():
            logits, emb = self.forward(x)
        loss = self.loss(logits, emb, idx, warmup)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.bank is not None:
            if warmup or self.epoch < cfg.propagation_start:
                self.bank.update(idx, emb.detach(), momentum=cfg.bank_momentum)
            else:
                self.bank.step(
                    idx,
                    emb.detach(),
                    k=self.k,
                    tau=cfg.tau,
                    momentum=cfg.bank_momentum,
                    density_weighting=cfg.density_weighting,
                )
        return float(loss.detach())

    @torch.no_grad()
    def fill_bank(self) -> None:
        """Before the first step: every bank row becomes the untrained network's embedding of
        its (un-augmented) example, in place of random noise. The first propagations then
        vote with neighbours that mean something, not with random labeled rows that only
        their own first visit replaces, which on small labeled sets sends the early
        pseudo-labels and the embedding into a collapse (docs/results.md). Stored labels are
        untouched (instance ids, SPEC §1, unless :meth:`init_labels` runs next); the cost is
        one inference pass over the training set.
        Under torch.distributed each rank embeds a strided share, padded to equal length,
        and the bank's collective ``update`` writes every row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        share = torch.arange(self.rank, math.ceil(self.n / self.world) * self.world, self.world) % self.n
        for x, idx in self.source.index_batches(share, cfg.eval_batch_size):
            _, emb, _ = self._embed([(x, idx)])
            self.bank.update(idx, emb, momentum=0.0)
        took = _fmt_time(time.perf_counter() - t0)
        self.progress.line(f"bank filled by one forward pass over {self.n:,} examples ({took})")

    @torch.no_grad()
    def init_labels(self) -> None:
        """``--label-init inputs``, before the first step: every unlabeled example's stored
        label and confidence come from SPEC §1.1-1.2 run on the training inputs themselves
        (``source.input_features()``: pixels, centred, each image L2-normalised) with the
        run's K, T, tau, density pool and weighting, in place of its instance id. The
        untrained network's embedding is a worse space to vote in than the pixels (on
        digits at 2% labels, 22-28% of the first votes are right against 77% in pixel space,
        docs/results.md), and what the first votes get wrong the network learns and keeps.
        From the first propagation on, the network's own votes replace these labels. Under
        torch.distributed rank 0's labels are broadcast, so replicated banks stay identical.
        Extra memory: the (N, C*H*W) float32 features and one block of queries."""
        cfg = self.cfg
        t0 = time.perf_counter()
        feats = self.source.input_features()
        lab = self.targets >= 0
        labeled, classes, s_cls = feats[lab], self.targets[lab], self.num_classes
        log_rho = None
        if cfg.density_weighting:
            pool = ~lab if cfg.density_pool == "unlabeled" else None
            log_rho = local_density(labeled, feats, t=cfg.t, tau=cfg.tau, pool_mask=pool)
        unl = torch.nonzero(~lab).flatten()
        labels = torch.empty(len(unl), dtype=torch.long, device=self.device)
        conf = torch.empty(len(unl), device=self.device)
        for s in range(0, len(unl), 1 << 16):
            block = unl[s : s + (1 << 16)]
            lb, cb = propagate(feats[block], labeled, classes, log_rho, k=self.k, tau=cfg.tau, num_classes=s_cls)
            labels[s : s + len(block)], conf[s : s + len(block)] = lb, cb.float()
        del feats
        if self.world > 1:
            torch.distributed.broadcast(labels, src=0)
            torch.distributed.broadcast(conf, src=0)
        self.bank.set_labels(unl, labels, conf)
        truth = self.truth[unl]
        known = truth >= 0
        acc = f", {float((labels[known] == truth[known]).float().mean()):.1%} right" if bool(known.any()) else ""
        took = _fmt_time(time.perf_counter() - t0)
        self.progress.line(f"{len(unl):,} unlabeled examples labeled by LLP's vote on their inputs{acc} ({took})")

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, batches):
        self.model.eval()
        logits, embs, keys = [], [], []
        for x, key in batches:
            with self.autocast():
                lg, e = self.eval_forward(x)
            logits.append(lg.float())
            embs.append(e.float())
            keys.append(key)
        return torch.cat(logits), torch.cat(embs), torch.cat(keys)

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg, s = self.cfg, self.num_classes
        logits, emb, y = self._embed(self.source.test_batches(cfg.eval_batch_size))
        y = y.to(self.device)
        top5 = logits.topk(min(5, s), dim=1).indices
        out = {
            "test_top1": float((top5[:, 0] == y).float().mean()),
            "test_top5": float((top5 == y[:, None]).any(1).float().mean()),
        }
        # kNN top-1 of the held-out embeddings against the labeled rows of the bank
        # (weighted vote of the K nearest, no density term); the baseline, which has no
        # bank, uses fresh embeddings of its labeled examples.
        # A sharded bank is gathered (collective) so that every diagnostic sees all rows.
        bank = self.bank.gather() if self.bank is not None else None
        if bank is not None:
            lab_emb, lab_cls = bank.labeled_embeddings.float(), bank.labeled_classes
        else:
            _, lab_emb, idx = self._embed(self.source.index_batches(self.labeled_idx, cfg.eval_batch_size))
            lab_cls = self.targets[idx]
        knn, _ = propagate(
            emb, lab_emb, lab_cls, None, k=min(self.k, lab_emb.shape[0]), tau=cfg.tau, num_classes=s, check_finite=False
        )
        out["knn_top1"] = float((knn == y).float().mean())
        if self.bank is None:
            out.update(
                pseudo_acc=None,
                pseudo_counts=None,
                pseudo_conf=None,
                aggregation=None,
                aggregation_per_class=None,
                corr_density_count=None,
            )
            return out
        # pseudo-labels of the unlabeled training examples (bank rows in dataset order)
        idx = torch.arange(self.n, device=self.device)
        labels, conf = bank.stored(idx)
        unl = self.targets < 0
        has_truth = unl & (self.truth >= 0)
        hit = labels[has_truth] == self.truth[has_truth]
        out["pseudo_acc"] = float(hit.float().mean()) if has_truth.any() else None
        pl = labels[unl]
        counts = torch.bincount(pl[pl >= 0], minlength=s)
        out["pseudo_counts"] = counts.tolist()
        out["pseudo_conf"] = float(conf[unl].float().mean()) if unl.any() else None
        # aggregation (paper Fig. 2b): norm of the class-mean bank embedding, per true class
        emb_rows = bank.embeddings[bank.rows(idx)].float()
        known = self.truth >= 0
        sums = torch.zeros(s, emb_rows.shape[1], device=self.device).index_add_(0, self.truth[known], emb_rows[known])
        n_c = torch.bincount(self.truth[known], minlength=s).clamp_min(1)
        agg = (sums / n_c[:, None]).norm(dim=1)
        out["aggregation"] = float(agg.mean())
        out["aggregation_per_class"] = [round(v, 4) for v in agg.tolist()]
        # corr(D_i, Q_i) (paper Fig. 3): mean labeled density of class i vs pseudo-labeled count
        lab_cls = bank.labeled_classes
        d = torch.zeros(s, device=self.device).index_add_(0, lab_cls, bank.log_rho.float())
        d = d / torch.bincount(lab_cls, minlength=s).clamp_min(1)
        dq = np.stack([d.cpu().numpy(), counts.float().cpu().numpy()])
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.corrcoef(dq)[0, 1] if dq.std(axis=1).min() > 0 else float("nan")
        out["corr_density_count"] = None if not np.isfinite(r) else float(r)
        return out

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "version": CKPT_VERSION,
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "order_state": self.order_state,
            "epoch_stats": dict(self.epoch_stats),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            # single-process format whatever the world size: any world size resumes from it
            "bank": self.bank.gather().state_dict() if self.bank is not None else None,
            "targets": self.targets.cpu(),
            "rng": _rng_state(self.gens),
        }

    def save(self) -> None:
        state = self.state()  # collective for a sharded bank: every rank takes part
        if self.rank == 0:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            _atomic_save(state, os.path.join(self.cfg.run_dir, CHECKPOINT))
        if self.world > 1:
            torch.distributed.barrier()

    def restore(self, ckpt: dict) -> None:
        path = os.path.join(self.cfg.run_dir, CHECKPOINT)
        try:
            if ckpt["targets"].shape[0] == self.n_original < self.n:  # saved in the fine-tuning phase
                drop_extra_rows(self)
            if not torch.equal(ckpt["targets"], self.targets.cpu()):
                raise CheckpointError(f"checkpoint {path} was saved for a different data split")
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.bank is not None:
                self.bank.load_full(ckpt["bank"])
            _set_rng_state(self.gens, ckpt["rng"])
        except CheckpointError:
            raise
        except Exception as e:
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__}: {why})") from None
        self.epoch = int(ckpt["epoch"])
        self.step_in_epoch = int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.order_state = ckpt["order_state"]
        self.epoch_stats = dict(ckpt["epoch_stats"])

    # -- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop_signal = signum

    def fit(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        metrics_path = os.path.join(cfg.run_dir, METRICS)
        if self.rank == 0:
            _truncate_metrics(metrics_path, self.epoch)
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        steps = self.steps_per_epoch()
        last = {}
        try:
            if self.global_step == 0 and self.bank is not None:
                if cfg.bank_init == "forward":
                    self.fill_bank()
                if cfg.label_init == "inputs":
                    self.init_labels()
            while self.epoch < cfg.epochs:
                e = self.epoch
                if cfg.rate_jump is not None and e >= cfg.rate_jump:
                    drop_extra_rows(self)  # fine-tuning on the original data only (paper App. B)
                warmup = e < cfg.warmup_epochs
                if self.step_in_epoch == 0:
                    self.order_state = self.gen_order.get_state()
                    self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}
                    if self.bank is not None and not warmup:
                        self.bank.refresh_density(t=cfg.t, tau=cfg.tau, pool=cfg.density_pool)
                else:  # resumed inside an epoch: replay its permutation from the saved state
                    self.gen_order.set_state(self.order_state)
                order = self.epoch_order()
                t0 = time.perf_counter()
                st = self.epoch_stats
                base_seconds = st["seconds"]
                for x, idx in self.source.train_batches(
                    order, self.rank_batch_size(), self.gen_aug, start=self.step_in_epoch, epoch=e
                ):
                    lr = lr_at(cfg, e + self.step_in_epoch / steps)
                    loss = self.train_step(x, idx, lr, warmup)
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {loss} at epoch {e + 1} step {self.step_in_epoch}; lower --lr"
                        )
                    self.step_in_epoch += 1
                    self.global_step += 1
                    st["loss_sum"] += loss
                    st["loss_n"] += 1
                    st["images"] += int(idx.shape[0])
                    st["seconds"] = base_seconds + time.perf_counter() - t0
                    done_total = e * steps + self.step_in_epoch
                    eta = st["seconds"] / max(st["loss_n"], 1) * (cfg.epochs * steps - done_total)
                    self.progress.update(
                        f"epoch {e + 1}/{cfg.epochs}",
                        self.step_in_epoch,
                        steps,
                        st["images"],
                        st["seconds"],
                        st["loss_sum"] / st["loss_n"],
                        eta,
                    )
                    if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps:
                        self.stop_signal = signal.SIGINT
                    if self._stop_requested():
                        self.save()
                        raise Interrupted(self.stop_signal, cfg.run_dir)
                last = self.evaluate()
                last = {
                    "epoch": e + 1,
                    **{k: last[k] for k in ("test_top1", "test_top5", "knn_top1", "pseudo_acc")},
                    "train_loss": st["loss_sum"] / max(st["loss_n"], 1),
                    "lr": lr_at(cfg, e),
                    "images_per_s": st["images"] / max(st["seconds"], 1e-9),
                    "epoch_seconds": st["seconds"],
                    **{k: v for k, v in last.items() if k not in ("test_top1", "test_top5", "knn_top1", "pseudo_acc")},
                }
                self.epoch += 1
                self.step_in_epoch = 0
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    _tensorboard(cfg.run_dir, last)
                self.save()
                self.progress.line(_epoch_line(last, cfg))
                if self.stop_signal is not None:
                    raise Interrupted(self.stop_signal, cfg.run_dir)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if not last:  # resumed a finished run
            last = read_metrics(metrics_path)[-1] if os.path.exists(metrics_path) else {}
        return last


def _tensorboard(run_dir: str, row: dict) -> None:
    """Mirrors the scalar metrics to TensorBoard when the ``tensorboard`` package is installed
    (optional; metrics.jsonl is the record). Untested here: tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return
    with SummaryWriter(os.path.join(run_dir, "tb")) as w:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                w.add_scalar(key, value, row["epoch"])


def _pct(v):
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def _epoch_line(m: dict, cfg: TrainConfig) -> str:
    tag = "sup" if cfg.supervised_only else "llp"
    return (
        f"[{tag}] epoch {m['epoch']:3d}/{cfg.epochs} loss {m['train_loss']:.3f} test top-1 {_pct(m['test_top1'])}% "
        f"top-5 {_pct(m['test_top5'])}% kNN {_pct(m['knn_top1'])}% pseudo {_pct(m['pseudo_acc'])}% "
        f"({m['images_per_s']:,.0f} img/s, {m['epoch_seconds']:.1f} s)"
    )


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, epochs_done: int) -> None:
    """Keeps the first ``epochs_done`` lines of metrics.jsonl (a run killed between writing
    an epoch's metrics and its checkpoint would otherwise repeat that epoch's line)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_metrics(path) if r.get("epoch", 0) <= epochs_done]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def config_from_checkpoint(run_dir: str) -> tuple[TrainConfig, dict]:
    path = os.path.join(run_dir, CHECKPOINT)
    ckpt = load_checkpoint(path)
    cfg = saved_config(ckpt, path)
    cfg.run_dir = run_dir
    cfg.stop_after_steps = None
    return cfg, ckpt


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Trains (or resumes) the run in ``cfg.run_dir``; returns the last epoch's metrics."""
    return prepare(cfg, resume=resume).fit()


def prepare(cfg: TrainConfig, *, resume: bool = False) -> Trainer:
    """The :class:`Trainer` for ``cfg`` (restored from ``cfg.run_dir`` when ``resume``): data
    loaded and checked, model built; nothing trained yet."""
    ckpt = None
    if resume:
        saved_stop = cfg.stop_after_steps
        quiet = cfg.quiet
        cfg, ckpt = config_from_checkpoint(cfg.run_dir)
        cfg.stop_after_steps, cfg.quiet = saved_stop, quiet
    trainer = Trainer(cfg)
    if ckpt is not None:
        trainer.restore(ckpt)
    if trainer.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    return trainer
