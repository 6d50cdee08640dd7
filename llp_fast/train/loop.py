"""The training loop (docs/method.md §1.5-1.7 and §8), read top to bottom.

One step, for a mini-batch drawn uniformly from all training examples (labeled and unlabeled mixed,
§1.7; plus ``labeled_batch`` labeled ones from their own stream, §8.6):

    logits, v   = net(weak view)              [and net(strong view), in the same forward pass]
    l, c        = bank.stored(indices)        # targets from the previous visit
    loss        = mean_b c_b (CE(logits_b, l_b) + L_A(v_b))                       # §1.5
                + consistency * mean_b mask_b CE(strong logits_b, target_b)       # §8.2
    SGD step (momentum 0.9, weight decay on weights only); the weight average follows (§8.3)
    bank.step(indices, v.detach())            # §1.6: propagate, then blend rows

At the start of every epoch the bank refreshes its densities (§1.1) and, from ``propagation_start``
on, the whole-bank vote relabels every unlabeled example (§8.1). Before the first step the bank and
the unlabeled labels may be warm-started (:mod:`.warmstart`). ``supervised_only`` trains the same
network with the same schedule on the labeled examples alone (the baseline); ``--method fixmatch``
has no bank: labeled cross-entropy plus the consistency term on the weak view's predictions.

A checkpoint (:mod:`.checkpoint`) is written after every epoch and, on SIGINT or SIGTERM, at the
next step boundary (:mod:`.stopping`: a pass between steps stops at once); a resumed run replays
exactly what the uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import torch

from .. import distributed
from .._progress import Progress, reporter
from ..bank import MemoryBank
from ..errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingDiverged, one_line
from ..nn import GIVEN, misfit
from . import checkpoint, claim, defaults, order, relabel, report, rng, warmstart
from .build import add_extras, check_against_data, configure_source, load_source, run_device
from .config import TrainConfig, lr_at, validate
from .evaluate import evaluate
from .losses import consistency_loss, llp_loss, strong_targets, supervised_loss
from .network import Network
from .stopping import Stopping

EMBED_DIM = 128  # D of docs/method.md §1.8


class Trainer:
    """A run of ``cfg``: data loaded, the settings left to choose chosen (:mod:`.defaults`; the lines
    saying which are in ``notes``), network, optimizer and bank built; :meth:`fit` trains.
    ``model``: a backbone of the user's (images -> features) in place of ``cfg.arch``; ``resuming``
    (:func:`.defaults.resolve`'s ``new``, inverted) and ``given`` as it takes them. Under torchrun
    (WORLD_SIZE > 1) one process per GPU or CPU worker, NCCL or gloo."""

    def __init__(self, cfg: TrainConfig, *, model: torch.nn.Module | None = None, resuming: bool = False, given=None):
        self._made_dir = None
        try:
            self._build(cfg, model, resuming, given)
        except BaseException:  # a run that failed to start leaves no empty runs/<time> of its own (in a
            if self._made_dir is not None:  # notebook they piled up until the interpreter exited)
                defaults.remove_if_empty(self._made_dir)
            raise

    def _build(self, cfg: TrainConfig, model: torch.nn.Module | None, resuming: bool, given) -> None:
        cfg = validate(dataclasses.replace(cfg))
        if model is not None:
            cfg.arch = GIVEN + type(model).__qualname__
        self.rank, self.world = distributed.init() if distributed.launched() else (0, 1)
        if cfg.run_dir is None:  # a new directory, claimed by rank 0 (two runs never share one)
            box = [defaults.new_run_dir() if self.rank == 0 else None]
            self._made_dir = box[0]
            if self.world > 1:
                torch.distributed.broadcast_object_list(box, src=0)
            cfg = dataclasses.replace(cfg, run_dir=box[0])
        cfg = defaults.resolve_run(cfg)
        self.device = run_device(cfg, self.world)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.source = src = load_source(cfg, self.device)
        self.facts = src.facts()
        cfg, notes = defaults.resolve(cfg, self.facts, new=not resuming, given=given)
        notes = [*getattr(src, "notes", []), *notes]  # (the data's own: the files it does not read)
        self.cfg, self.notes = cfg, notes
        configure_source(cfg, src)
        self.n_original = src.num_train  # examples before --extra-unlabeled's: dataset indices [0, n_original)
        self.data_files = getattr(src, "fingerprint", None)  # before the extras join
        if cfg.extra_unlabeled:
            self.notes = notes = [*notes, add_extras(cfg, src, self.world)]
        self.num_classes = src.num_classes
        self.targets = src.targets.to(self.device)  # (N,) -1 = unlabeled
        self.truth = src.truth.to(self.device)
        self.labeled_idx = torch.nonzero(src.targets >= 0).flatten()  # CPU
        self.n = src.num_train
        self.net = Network(cfg, src, self.device, world=self.world, backbone=model)
        self.model, self.average = self.net.model, self.net.average
        # K = 0 asks for min(10, smallest labeled class).
        self.k = cfg.k or min(10, int(torch.bincount(src.targets[src.targets >= 0]).min()))
        self.bank = None
        if not cfg.supervised_only and cfg.method != "fixmatch":
            check_against_data(cfg, src, self.k)
            kw = dict(dim=EMBED_DIM, dtype=getattr(torch, cfg.bank_dtype), device=self.device, seed=cfg.seed)
            if self.world > 1:
                self.bank = distributed.make_bank(src.targets, src.num_classes, layout=cfg.bank_layout, **kw)
            else:  # (one process of its own: a group a user made without torchrun's WORLD_SIZE is not the run's)
                self.bank = MemoryBank(src.targets, src.num_classes, **kw)
        self.gen_order = torch.Generator().manual_seed(cfg.seed + 1)
        self.gen_aug = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.gens = {"order": self.gen_order, "aug": self.gen_aug}
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.global_step = 0
        self.order_state = self.gen_order.get_state()  # generator state at the current epoch's start
        self.epoch_world = self.world  # how many processes began the current epoch (its order's)
        self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0, "masked": 0.0}
        self.history: list[dict] = []  # one metrics row per completed epoch
        self.stopping = Stopping(self.world)
        self.progress = Progress(enabled=not cfg.quiet and self.rank == 0)
        self.notes = notes

    def schedule(self) -> order.Schedule:
        cfg = self.cfg
        return order.Schedule(
            n=self.n,
            labeled=self.labeled_idx,
            batch_size=cfg.batch_size,
            labeled_batch=cfg.labeled_batch,
            world=self.world,
            supervised_only=cfg.supervised_only,
            seed=cfg.seed,
        )

    def steps_per_epoch(self) -> int:
        return self.schedule().steps_per_epoch()

    # -- one step ------------------------------------------------------------------------
    def train_step(self, batch, lr: float, warmup: bool) -> tuple[float, float]:
        """One optimizer step on ``batch`` = (images, [strong images,] dataset indices); returns the
        loss and the share of the batch the consistency term used."""
        cfg, bank = self.cfg, self.bank
        x, strong, idx = batch if len(batch) == 3 else (batch[0], None, batch[1])
        self.model.train()
        try:
            with self.net.autocast():
                logits, emb = self.net.forward(x if strong is None else torch.cat([x, strong]))
        except ValueError as e:  # torch's batch norm on a (1, C) batch: a last batch of one image
            if x.shape[0] == 1 and "more than 1 value per channel" in str(e):
                raise ConfigError(
                    f"--batch-size {cfg.batch_size}: a batch of one image (the last of an epoch), which the "
                    "network's batch norm cannot train on; pick a batch size that leaves no single image over"
                ) from None
            raise
        b = x.shape[0]
        known = self.targets[idx]
        labels = conf = None
        if cfg.supervised_only:
            loss = supervised_loss(logits[:b], known)
        elif bank is None:  # --method fixmatch
            loss = supervised_loss(logits[:b], known, only_labeled=True)
            labels, conf = known, torch.ones_like(known, dtype=torch.float32)
        else:
            loss, labels, conf = llp_loss(
                logits[:b], emb[:b], idx, bank, tau=cfg.tau, confidence=cfg.confidence, warmup=warmup
            )
        share = 0.0
        if strong is not None and labels is not None:
            target, mask = strong_targets(cfg.consistency_target, logits[:b], labels, conf, known, cfg.threshold)
            term, share = consistency_loss(logits[b:], target, mask)
            loss = loss + cfg.consistency * term
        self.net.step(loss, lr)
        value = float(loss.detach())
        if not math.isfinite(value):  # before the bank takes the step's (then NaN) embeddings
            where = f"epoch {self.epoch + 1} step {self.step_in_epoch}"
            raise TrainingDiverged(f"loss became {value} at {where}; lower --lr")
        if bank is not None:
            v = emb[:b].detach()
            if warmup or self.epoch < cfg.propagation_start or not cfg.local_propagation:
                bank.update(idx, v, momentum=cfg.bank_momentum)
            else:
                bank.step(
                    idx, v, k=self.k, tau=cfg.tau, momentum=cfg.bank_momentum, density_weighting=cfg.density_weighting
                )
        return value, share

    # -- warm starts and evaluation --------------------------------------------------------
    def start(self) -> None:
        """The bank's rows and the unlabeled labels before the first step (:mod:`.warmstart`)."""
        cfg, common = self.cfg, dict(world=self.world, progress=self.progress)
        if cfg.bank_init == "forward":
            embed, b = self.net.embed_images, cfg.eval_batch_size
            warmstart.fill_bank(self.bank, self.source, embed, n=self.n, batch_size=b, rank=self.rank, **common)
        if cfg.label_init == "inputs":
            kw = dict(targets=self.targets, truth=self.truth, k=self.k, num_classes=self.num_classes, **common)
            warmstart.init_labels(self.bank, self.source, cfg, **kw)

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate(
            self.net.embed,
            self.source,
            self.bank,
            k=self.k,
            tau=cfg.tau,
            num_classes=self.num_classes,
            batch_size=cfg.eval_batch_size,
            labeled_idx=self.labeled_idx,
            targets=self.targets,
            truth=self.truth,
            averaged=self.average is not None,
        )

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "order_state": self.order_state,
            "epoch_world": self.epoch_world,
            "epoch_stats": dict(self.epoch_stats),
            **self.net.state_dict(),
            "targets": self.targets.cpu(),
            "data_files": self.data_files,  # a digest of the training images (folder: names; arrays: pixels)
            "rng": rng.rng_state(self.gens),
            "history": list(self.history),
        }

    def save(self) -> None:
        run_dir, state = self.cfg.run_dir, self.state()
        state["bank"] = None  # collective for a sharded bank: every rank writes its rows
        if self.bank is not None:
            state["bank"] = checkpoint.save_bank(self.bank, run_dir, self.global_step, self.rank, self.world)
        if self.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            try:
                checkpoint.save(state, os.path.join(run_dir, checkpoint.CHECKPOINT))
            except BaseException:  # this step's bank files (every rank's, written) belong to no checkpoint:
                checkpoint.remove_bank_files(run_dir, state["bank"])  # on a full disk, P x the bank left
                raise
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
            if checkpoint.files_differ(ckpt, self.data_files):
                raise CheckpointError(  # (checkpoints before it have none: not checked)
                    f"checkpoint {path}: the training images of {self.cfg.data} are not those the run began with "
                    "(a training image renamed, added or removed, or an array's pixels changed): put them back as "
                    "they were, or start a new run"
                )
            differs = misfit(ckpt["model"], self.model.state_dict()) if isinstance(ckpt.get("model"), dict) else None
            if differs:
                raise CheckpointError(f"checkpoint {path} does not fit this network: {differs}")
            self.net.load_state_dict(ckpt)
            if self.bank is not None:
                pieces = checkpoint.bank_pieces(ckpt["bank"], self.cfg.run_dir, *self.bank.index_range)
                self.bank.load_rows(pieces)
            rng.set_rng_state(self.gens, ckpt["rng"])
        except CheckpointError:
            raise
        except Exception as e:
            raise checkpoint.corrupt(path, e) from None
        self.epoch = ckpt["epoch"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.order_state = ckpt["order_state"]
        self.epoch_world = ckpt.get("epoch_world", self.world) if self.step_in_epoch else self.world
        why = order.check_regroup(self.schedule(), self.epoch_world, self.world, self.step_in_epoch)
        if why:  # (None: this world finishes the epoch, order.regrouped)
            raise CheckpointError(
                f"{path} was saved inside epoch {self.epoch + 1}, begun by {self.epoch_world} processes: {why}; "
                f"resume with --nproc {self.epoch_world}"
            )
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
    def fit(self, after_epoch=None) -> dict:
        """Trains to ``cfg.epochs``; returns the last epoch's metrics row. ``after_epoch``: called with
        no argument after each epoch is saved (the CLI hands a finished baseline's core back)."""
        cfg = self.cfg
        tb = None
        if self.rank == 0:
            self.claim = getattr(self, "claim", None) or claim.RunClaim(cfg.run_dir)  # (prepare's, or again)
            tb = report.reopen(cfg.run_dir, self.history, self.epoch, dataclasses.asdict(cfg))
            if tb.missing:
                self.progress.line(tb.missing)
        ended = False
        try:
            with self.stopping.handlers():
                if self.global_step == 0 and self.bank is not None:
                    with self.stopping.at_once(cfg.run_dir, checkpointed=False):
                        self.start()
                while self.epoch < cfg.epochs:
                    row = self._train_epoch()
                    if self.rank == 0:
                        report.append_row(cfg.run_dir, row)
                        tb.add(row)
                    self.save()
                    self.progress.line(report.epoch_line(row, cfg.epochs, cfg.supervised_only))
                    if after_epoch is not None:
                        after_epoch()
                    if self.stopping.signal is not None:
                        raise Interrupted(self.stopping.signal, cfg.run_dir)
            ended = True
        finally:
            if tb is not None:
                tb.close()
            self.claim = getattr(self, "claim", None) and self.claim.release()  # given back: None
            if not ended and self.rank == 0:  # (what a run that never checkpointed wrote)
                report.forget_unsaved(cfg.run_dir, made=self._made_dir is not None)
        return self.history[-1] if self.history else {}

    def _epoch_start(self, e: int, warmup: bool) -> dict:
        """Density refresh (§1.1) and, from ``propagation_start`` on, the whole-bank vote (§8.1)."""
        cfg, bank = self.cfg, self.bank
        if bank is None or warmup:
            return {}
        with self.progress.bar(None, "density refresh", "row") as bar:
            bank.refresh_density(t=cfg.t, tau=cfg.tau, pool=cfg.density_pool, progress=reporter(bar))
        if not cfg.refresh_rounds or e < cfg.propagation_start:
            return {}
        return relabel.relabel(bank, cfg, k=self.k)

    def _train_epoch(self) -> dict:
        cfg, e = self.cfg, self.epoch
        if cfg.rate_jump is not None and e >= cfg.rate_jump:
            self.drop_extra_rows()  # fine-tuning on the original data only (paper App. B)
        warmup = e < cfg.warmup_epochs
        if self.step_in_epoch == 0:
            self.order_state, self.epoch_world = self.gen_order.get_state(), self.world
            self.epoch_stats = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "seconds": 0.0, "masked": 0.0}
            with self.stopping.at_once(cfg.run_dir, checkpointed=self.global_step > 0):  # (the epoch's checkpoint)
                self.epoch_stats.update(self._epoch_start(e, warmup))
        else:  # resumed inside an epoch: replay its permutation from the saved state
            self.gen_order.set_state(self.order_state)
        # (resumed inside an epoch that another number of processes began: its order, shared out)
        epoch_order, size, steps = order.for_rank(self.schedule(), self.gen_order, self.epoch_world, self.rank, e)
        batches = self.source.train_batches(epoch_order, size, self.gen_aug, start=self.step_in_epoch, epoch=e)
        st, t0 = self.epoch_stats, time.perf_counter()
        base_seconds = st["seconds"]
        with self.progress.bar(steps, f"epoch {e + 1}/{cfg.epochs}", "step", initial=self.step_in_epoch) as bar:
            for batch in batches:
                loss, share = self.train_step(batch, lr_at(cfg, e + self.step_in_epoch / steps), warmup)
                self.step_in_epoch += 1
                self.global_step += 1
                st["loss_sum"] += loss
                st["loss_n"] += 1
                st["masked"] += share
                st["images"] += int(batch[-1].shape[0])
                st["seconds"] = base_seconds + time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {st['loss_sum'] / st['loss_n']:.3f}, {st['images'] / max(st['seconds'], 1e-9):,.0f} img/s",
                    refresh=False,
                )
                if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps:
                    self.stopping.signal = signal.SIGINT
                if self.stopping.requested(self.device):
                    self.save()
                    raise Interrupted(self.stopping.signal, cfg.run_dir)
        with self.stopping.at_once(cfg.run_dir, checkpointed=True, save=self.save):  # (after the last step)
            try:
                metrics = self.evaluate()
            except DataError as err:  # a held-out file first read here: the epoch's steps are kept
                if self.world > 1:  # (the save is collective; a rank alone with the error would wait)
                    raise
                self.save()
                kept = checkpoint.last_checkpoint(cfg.run_dir)  # (one_line: a worker's error holds its traceback)
                raise DataError(f"{one_line(err)}; {kept} (replace the file with a readable one first)") from None
        row = report.epoch_row(e + 1, metrics, st, lr_at(cfg, e), consistency=bool(cfg.consistency))
        self.epoch += 1
        self.step_in_epoch = 0
        self.history.append(row)
        return row
