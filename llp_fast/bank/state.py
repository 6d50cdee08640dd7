"""Saving and loading a bank: whole (``state_dict``) or as checkpoint pieces (``rows_state``).

A mixin of :class:`llp_fast.MemoryBank`, kept apart so that the bank's arithmetic (memory.py) and
its persistence read separately.
"""

from __future__ import annotations

import numbers

import torch

_STATE_KEYS = ("embeddings", "labels", "confidence", "log_rho", "row_of", "num_labeled", "num_classes")


UNIT_SLACK = 1.01  # a bank row is a unit vector (normalised at every write), rounded to its dtype


def _check_unit_rows(embeddings: torch.Tensor, what: str) -> None:
    """Bank rows of norm at most :data:`UNIT_SLACK` (finite rows of 3e38 loaded as they were, and
    the next density was -inf/+inf, the next loss NaN)."""
    norms = embeddings.float().norm(dim=1)
    if not bool((norms <= UNIT_SLACK).all()):
        i = int(torch.nonzero(~(norms <= UNIT_SLACK))[0, 0])
        raise ValueError(f"{what} 'embeddings' row {i} has norm {float(norms[i]):.3g}; bank rows are unit vectors")


def _check_unlabeled_labels(labels: torch.Tensor, own: torch.Tensor, num_classes: int, what: str) -> None:
    """An unlabeled row holds a class or, before its first vote, its own instance id ``own`` (negative)."""
    if not bool((((labels >= 0) & (labels < num_classes)) | (labels == own)).all()):
        raise ValueError(
            f"{what} 'labels' hold a value that is neither a class in [0, {num_classes}) nor the row's own instance id"
        )


class BankState:
    @torch.no_grad()
    def rows_state(self) -> dict:
        """This bank's rows in dataset order, as a checkpoint piece: ``start`` and ``end`` (the
        dataset indices it covers), ``embeddings`` (n, D), ``labels`` (n,), ``confidence`` (n,),
        ``log_rho`` (n,) (0 for unlabeled rows), on the CPU. Pieces of any bank layout load into
        any other (:meth:`load_rows`), so a run resumes at any world size."""
        order = self.index_of.argsort()  # bank rows in dataset order
        log_rho = torch.zeros(len(self), device=self.device)
        log_rho[: self.num_labeled] = self.log_rho.float()
        return {
            "start": self.index_offset,
            "end": self.index_offset + len(self),
            "embeddings": self.embeddings[order].cpu(),
            "labels": self.labels[order].cpu(),
            "confidence": self.confidence[order].cpu(),
            "log_rho": log_rho[order].cpu(),
        }

    @torch.no_grad()
    def load_rows(self, pieces: list[dict]) -> None:
        """Loads the rows of :meth:`rows_state` pieces (any split of the dataset indices) that
        fall in this bank's range. Everything is checked first: a gap, a wrong shape, a labeled row
        whose stored label is not its class, or NaN leaves the bank unchanged (``ValueError``)."""
        lo, n, d = self.index_offset, len(self), self.embeddings.shape[1]
        hi = lo + n
        emb = torch.empty(n, d, dtype=self.embeddings.dtype)
        labels = torch.empty(n, dtype=torch.int64)
        conf, log_rho = torch.empty(n), torch.empty(n)
        covered = torch.zeros(n, dtype=torch.bool)
        for p in pieces:
            if not isinstance(p, dict):
                raise ValueError(f"bank rows: each piece must be a dict (rows_state()), got {type(p).__name__}")
            missing = [k for k in ("start", "end", "embeddings", "labels", "confidence", "log_rho") if k not in p]
            if missing:
                raise ValueError(f"bank rows: a piece is missing {missing}")
            a, b = max(lo, int(p["start"])), min(hi, int(p["end"]))
            if a >= b:
                continue
            rows = int(p["end"]) - int(p["start"])
            for key, shape in (("embeddings", (rows, d)), ("labels", (rows,)), ("confidence", (rows,))):
                if tuple(p[key].shape) != shape:
                    raise ValueError(f"bank rows {p['start']}..{p['end']}: {key!r} has shape {tuple(p[key].shape)}")
            if tuple(p["log_rho"].shape) != (rows,):
                raise ValueError(f"bank rows {p['start']}..{p['end']}: 'log_rho' has shape {tuple(p['log_rho'].shape)}")
            if p["labels"].is_floating_point() or p["labels"].dtype == torch.bool:
                raise ValueError(
                    f"bank rows {p['start']}..{p['end']}: 'labels' must be integer, got {p['labels'].dtype}"
                )
            src = slice(a - int(p["start"]), b - int(p["start"]))
            emb[a - lo : b - lo] = p["embeddings"][src]
            labels[a - lo : b - lo] = p["labels"][src]
            conf[a - lo : b - lo] = p["confidence"][src]
            log_rho[a - lo : b - lo] = p["log_rho"][src]
            covered[a - lo : b - lo] = True
        if not bool(covered.all()):
            first = int(torch.nonzero(~covered)[0]) + lo
            raise ValueError(f"the bank's rows do not cover dataset index {first}")
        for key, values in (("embeddings", emb), ("confidence", conf), ("log_rho", log_rho)):
            if not bool(torch.isfinite(values.float()).all()):
                raise ValueError(f"bank rows {key!r} contain NaN or Inf")
        _check_unit_rows(emb, "bank rows")
        if not bool(((conf >= 0) & (conf <= 1)).all()):
            raise ValueError("bank rows 'confidence' must lie in [0, 1]")
        rows = self.row_of.cpu()  # dataset order -> bank rows
        labeled = rows < self.num_labeled
        if not torch.equal(labels[labeled], self.labels.cpu()[rows[labeled]]):
            raise ValueError("bank rows were saved for a different labeled split")
        _check_unlabeled_labels(labels[~labeled], -1 - torch.arange(lo, hi)[~labeled], self.num_classes, "bank rows")
        dev = self.device
        self.embeddings[rows.to(dev)] = emb.to(dev)
        self.labels[rows.to(dev)] = labels.to(dev)
        self.confidence[rows.to(dev)] = conf.to(dev)
        self.log_rho = log_rho[self.index_of[: self.num_labeled].cpu()].to(dev).contiguous()

    def gather(self):
        """The whole bank as one :class:`MemoryBank`: this one (a sharded bank gathers)."""
        return self

    def load_full(self, state: dict) -> None:
        """Loads a single-process state (what :meth:`gather` gives); same as load_state_dict."""
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {
            "embeddings": self.embeddings,
            "labels": self.labels,
            "confidence": self.confidence,
            "log_rho": self.log_rho,
            "row_of": self.row_of,
            "num_labeled": self.num_labeled,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`; checks every entry first, so a corrupt or
        mismatched state raises ``ValueError`` and leaves this bank unchanged."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"bank state is missing {missing}")
        n, d = self.embeddings.shape
        for key in ("num_labeled", "num_classes"):
            if isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral):
                raise ValueError(f"bank state {key!r} must be a whole number, got {state[key]!r}")
        m = int(state["num_labeled"])
        expect = {
            "embeddings": (n, d),
            "labels": (n,),
            "confidence": (n,),
            "log_rho": (m,),
            "row_of": (n,),
        }
        for key, shape in expect.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"bank state {key!r} has shape {got}, expected {shape}")
            if value.device.type == "meta":
                raise ValueError(f"bank state {key!r} is on the meta device (it holds no values)")
            integral = key in ("labels", "row_of")
            if value.dtype == torch.bool or value.is_floating_point() == integral or value.is_complex():
                raise ValueError(
                    f"bank state {key!r} must be {'integer' if integral else 'floating point'}, got {value.dtype}"
                )
        if m != self.num_labeled or int(state["num_classes"]) != self.num_classes:
            raise ValueError("bank state was saved for a different labeled split or class count")
        # row_of follows from the labeled split (labeled examples first, each part in dataset order)
        if not torch.equal(state["row_of"].long().cpu(), self.row_of.cpu()):
            raise ValueError("bank state was saved for a different labeled split ('row_of' differs)")
        for key in ("embeddings", "confidence", "log_rho"):
            if not bool(torch.isfinite(state[key].float()).all()):
                raise ValueError(f"bank state {key!r} contains NaN or Inf")
        _check_unit_rows(state["embeddings"], "bank state")
        conf = state["confidence"]
        if not bool(((conf >= 0) & (conf <= 1)).all()):
            raise ValueError("bank state 'confidence' must lie in [0, 1]")
        labels, mine = state["labels"].long().cpu(), self.labels.cpu()
        if not torch.equal(labels[:m], mine[:m]):
            raise ValueError("bank state was saved for a different labeled split (its labeled rows' classes differ)")
        own = -1 - self.index_offset - self.index_of.cpu()[m:]
        _check_unlabeled_labels(labels[m:], own, self.num_classes, "bank state")
        row_of = state["row_of"].long().to(self.device)
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.confidence.copy_(state["confidence"])
        self.log_rho = state["log_rho"].to(device=self.device, dtype=torch.float32).clone()
        self.row_of.copy_(row_of)
        self.index_of[row_of] = torch.arange(n, device=self.device)
