"""The LLP training loop (docs/method.md §1.5-1.7), read top to bottom.

One step, for a mini-batch drawn uniformly from all training examples (labeled and unlabeled
mixed, §1.7):

    logits, v = net(augment(x))
    l, c      = bank.stored(indices)                  # targets from the previous visit
    loss      = mean_b c_b * (CE(logits_b, l_b) [0 for instance ids] + L_A(v_b))   # §1.5
    SGD step (momentum 0.9, weight decay on weights only)
    bank.step(indices, v.detach())                    # §1.6: propagate, then blend rows

with ``bank.refresh_density`` at the start of every epoch (§1.1). Before the first step the bank
and the unlabeled labels may be warm-started (:mod:`llp_fast.train.warmstart`); until
``propagation_start`` the rows are blended but nobody is re-labeled. ``supervised_only`` trains
the same network with the same schedule (same number of steps) on the labeled examples alone with
cross-entropy: the baseline.

A checkpoint (:mod:`llp_fast.train.checkpoint`) is written after every epoch and, on SIGINT or
SIGTERM, at the next step boundary; a resumed run replays exactly what the uninterrupted one would
have done. Evaluation is :mod:`llp_fast.train.evaluate`; what a run reports, :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import torch
import torch.nn.functional as F

from .. import distributed
from .._device import memory_format
from .._progress import Progress, reporter
from ..data.extra import add_extra_unlabeled
from ..errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from ..nn import param_groups
from . import checkpoint, order, report, warmstart
from .config import RESUMABLE, TrainConfig, amp_dtype, check_against_data, lr_at, model_for, source_for, validate
from .evaluate import evaluate

EMBED_DIM = 128  # D of docs/method.md §1.8


class Trainer:
    """A run of ``cfg``: data loaded and checked, network, optimizer and bank built; :meth:`fit`
    trains. Under torchrun (WORLD_SIZE > 1) one process per GPU or CPU worker, NCCL or gloo."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = validate(cfg)
        self.rank, self.world = distributed.init() if distributed.launched() else (0, 1)
        device = cfg.device
        if self.world > 1 and device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.source = src = source_for(cfg, self.device)
        self.n_original = src.num_train  # examples before --extra-unlabeled's: dataset indices [0, n_original)
        if cfg.extra_unlabeled:
            if self.world > 1:
                raise ConfigError("--extra-unlabeled runs in a single process for now (drop --nproc)")
            add_extra_unlabeled(src, cfg.extra_unlabeled)
        self.num_classes = src.num_classes
        self.targets = src.targets.to(self.device)  # (N,) -1 = unlabeled
        self.truth = src.truth.to(self.device)
        self.labeled_idx = torch.nonzero(src.targets >= 0).flatten()  # CPU
        self.n = src.num_train
        self.model = model_for(cfg, src).to(self.device, memory_format=memory_format(self.device))
        # The bank stays outside the DDP module: it is a buffer LLP updates itself.
        train_module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(train_module) if cfg.compile else train_module
        self.eval_forward = torch.compile(self.model) if cfg.compile else self.model  # no DDP collectives
        self.opt = torch.optim.SGD(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # K = 0 asks for min(10, smallest labeled class). With the forward bank start K = 10 is the
        # better choice even at 3 labels per class (docs/results.md).
        self.k = cfg.k or min(10, int(torch.bincount(src.targets[src.targets >= 0]).min()))
        self.bank = None
        if not cfg.supervised_only:
            check_against_data(cfg, src, self.k)
            self.bank = distributed.make_bank(
                src.targets, src.num_classes, layout=cfg.bank_layout, dim=EMBED_DIM, device=self.device, seed=cfg.seed
            )
        self.gen_order = torch.Generator().manual_seed(cfg.seed + 1)
        self.gen_aug = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.gens = {"order": self.gen_order, "aug": self.gen_aug}
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.global_step = 0
        self.order_state = self.gen_order.get_state()  # generator state at the current epoch's start
        self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}
        self.history: list[dict] = []  # one metrics row per completed epoch
        self.stop_signal = None
        self.progress = Progress(enabled=not cfg.quiet and self.rank == 0)

    # -- schedule (llp_fast.train.order) ---------------------------------------------------
    def steps_per_epoch(self) -> int:
        return order.steps_per_epoch(self)

    def rank_batch_size(self) -> int:
        return order.rank_batch_size(self)

    def epoch_order(self) -> torch.Tensor:
        return order.epoch_order(self)

    def _stop_requested(self) -> bool:
        """A signal seen by any rank stops every rank at the same step (no rank is left waiting in
        a collective for one that already left)."""
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
        """bf16 (or fp16) autocast on CUDA; a no-op in float32 on CPU (docs/method.md §1.8)."""
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

    # -- warm starts and evaluation --------------------------------------------------------
    def fill_bank(self) -> None:
        warmstart.fill_bank(self)

    def init_labels(self) -> None:
        warmstart.init_labels(self)

    @torch.no_grad()
    def embed(self, batches):
        """(logits, embeddings, keys) of ``(images, key)`` batches, in eval mode."""
        self.model.eval()
        logits, embs, keys = [], [], []
        for x, key in batches:
            with self.autocast():
                lg, e = self.eval_forward(x)
            logits.append(lg.float())
            embs.append(e.float())
            keys.append(key)
        return torch.cat(logits), torch.cat(embs), torch.cat(keys)

    def evaluate(self) -> dict:
        return evaluate(self)

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "order_state": self.order_state,
            "epoch_stats": dict(self.epoch_stats),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "targets": self.targets.cpu(),
            "rng": checkpoint.rng_state(self.gens),
            "history": list(self.history),
        }

    def save(self) -> None:
        run_dir, state = self.cfg.run_dir, self.state()
        state["bank"] = None  # collective for a sharded bank: every rank writes its rows
        if self.bank is not None:
            state["bank"] = checkpoint.save_bank(self.bank, run_dir, self.global_step, self.rank, self.world)
        if self.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            checkpoint.save(state, os.path.join(run_dir, checkpoint.CHECKPOINT))
            checkpoint.remove_stale_bank_files(run_dir, state["bank"])
        if self.world > 1:
            torch.distributed.barrier()

    def restore(self, ckpt: dict) -> None:
        """Takes the state of a loaded, verified checkpoint (:func:`checkpoint.load`)."""
        path = os.path.join(self.cfg.run_dir, checkpoint.CHECKPOINT)
        try:
            if ckpt["targets"].shape[0] == self.n_original < self.n:  # saved in the fine-tuning phase
                self.drop_extra_rows()
            if not torch.equal(ckpt["targets"], self.targets.cpu()):
                raise CheckpointError(f"checkpoint {path} was saved for a different data split")
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.bank is not None:
                pieces = checkpoint.bank_pieces(ckpt["bank"], self.cfg.run_dir, *self.bank.index_range)
                self.bank.load_rows(pieces)
            checkpoint.set_rng_state(self.gens, ckpt["rng"])
        except CheckpointError:
            raise
        except Exception as e:
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__}: {why})") from None
        self.epoch = ckpt["epoch"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.order_state = ckpt["order_state"]
        self.epoch_stats = dict(ckpt["epoch_stats"])
        self.history = list(ckpt["history"])

    def drop_extra_rows(self) -> None:
        """Fine-tuning on the original data only (paper Appendix B): forgets the extra examples of
        ``--extra-unlabeled``, the last dataset indices (and, being unlabeled, the last bank rows);
        batches are drawn from the original examples alone."""
        n0 = self.n_original
        if self.n == n0:
            return
        if self.bank is not None:
            self.bank.truncate(n0)
        self.n = n0
        self.targets = self.targets[:n0]
        self.truth = self.truth[:n0]

    # -- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop_signal = signum

    def fit(self) -> dict:
        """Trains to ``cfg.epochs``; returns the last epoch's metrics row."""
        cfg = self.cfg
        tb = None
        if self.rank == 0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            report.write_history(cfg.run_dir, self.history)  # the checkpoint's rows are the record
            tb = report.TensorBoard(cfg.run_dir, self.epoch)
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            if self.global_step == 0 and self.bank is not None:
                if cfg.bank_init == "forward":
                    self.fill_bank()
                if cfg.label_init == "inputs":
                    self.init_labels()
            while self.epoch < cfg.epochs:
                row = self._train_epoch()
                if self.rank == 0:
                    report.append_row(cfg.run_dir, row)
                    tb.add(row)
                self.save()
                self.progress.line(report.epoch_line(row, cfg.epochs, cfg.supervised_only))
                if self.stop_signal is not None:
                    raise Interrupted(self.stop_signal, cfg.run_dir)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if tb is not None:
                tb.close()
        return self.history[-1] if self.history else {}

    def _train_epoch(self) -> dict:
        cfg, e = self.cfg, self.epoch
        if cfg.rate_jump is not None and e >= cfg.rate_jump:
            self.drop_extra_rows()  # fine-tuning on the original data only (paper App. B)
        warmup = e < cfg.warmup_epochs
        if self.step_in_epoch == 0:
            self.order_state = self.gen_order.get_state()
            self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0}
            if self.bank is not None and not warmup:
                with self.progress.bar(None, "density refresh", "row") as bar:
                    self.bank.refresh_density(t=cfg.t, tau=cfg.tau, pool=cfg.density_pool, progress=reporter(bar))
        else:  # resumed inside an epoch: replay its permutation from the saved state
            self.gen_order.set_state(self.order_state)
        steps = self.steps_per_epoch()
        batches = self.source.train_batches(
            self.epoch_order(), self.rank_batch_size(), self.gen_aug, start=self.step_in_epoch, epoch=e
        )
        st, t0 = self.epoch_stats, time.perf_counter()
        base_seconds = st["seconds"]
        with self.progress.bar(steps, f"epoch {e + 1}/{cfg.epochs}", "step", initial=self.step_in_epoch) as bar:
            for x, idx in batches:
                loss = self.train_step(x, idx, lr_at(cfg, e + self.step_in_epoch / steps), warmup)
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss} at epoch {e + 1} step {self.step_in_epoch}; lower --lr")
                self.step_in_epoch += 1
                self.global_step += 1
                st["loss_sum"] += loss
                st["loss_n"] += 1
                st["images"] += int(idx.shape[0])
                st["seconds"] = base_seconds + time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {st['loss_sum'] / st['loss_n']:.3f}, {st['images'] / max(st['seconds'], 1e-9):,.0f} img/s",
                    refresh=False,
                )
                if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps:
                    self.stop_signal = signal.SIGINT
                if self._stop_requested():
                    self.save()
                    raise Interrupted(self.stop_signal, cfg.run_dir)
        metrics = self.evaluate()
        row = {
            "epoch": e + 1,
            **{k: metrics[k] for k in report.KEYS_FIRST[1:]},
            "train_loss": st["loss_sum"] / max(st["loss_n"], 1),
            "lr": lr_at(cfg, e),
            "images_per_s": st["images"] / max(st["seconds"], 1e-9),
            "epoch_seconds": st["seconds"],
            **{k: v for k, v in metrics.items() if k not in report.KEYS_FIRST},
        }
        self.epoch += 1
        self.step_in_epoch = 0
        self.history.append(row)
        return row


def prepare(cfg: TrainConfig, *, resume: bool = False, ckpt: dict | None = None) -> Trainer:
    """The :class:`Trainer` for ``cfg``: data loaded and checked, model built; nothing trained yet.
    Writes ``RUN_DIR/config.json``.

    ``resume``: continue the run in ``cfg.run_dir`` from its checkpoint (``ckpt``, when the caller
    has loaded it already, with ``cfg`` its config). Without ``ckpt`` the checkpoint is loaded here
    and its saved config is used, except for the fields of ``config.RESUMABLE`` (epochs, quiet,
    threads, workers), which are taken from ``cfg``."""
    if resume and ckpt is None:
        saved_cfg, ckpt = checkpoint.open_run(cfg.run_dir)
        keep = {name: getattr(cfg, name) for name in (*RESUMABLE, "stop_after_steps")}
        cfg = dataclasses.replace(saved_cfg, **keep)
    if ckpt is not None and cfg.epochs < ckpt["epoch"]:
        raise ConfigError(f"--epochs {cfg.epochs}: the run in {cfg.run_dir} has completed {ckpt['epoch']} epochs")
    trainer = Trainer(cfg)
    if ckpt is not None:
        trainer.restore(ckpt)
    if trainer.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        checkpoint.sweep(cfg.run_dir, ckpt)  # what killed writers left (checkpoint.py)
        report.write_config(cfg.run_dir, dataclasses.asdict(cfg))
    return trainer


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Trains (or resumes) the run in ``cfg.run_dir``; returns the last epoch's metrics."""
    return prepare(cfg, resume=resume).fit()
