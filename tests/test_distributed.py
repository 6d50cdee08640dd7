"""Distributed LLP (gloo, 2-3 CPU processes) equals the single-process results."""

import datetime
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llp_fast
from llp_fast.bank import Bank
from llp_fast.distributed import ReplicatedMemoryBank, ShardedMemoryBank, all_gather_cat, shard_range
from llp_fast.train.relabel import relabel

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

N, D, S = 61, 8, 4


def _targets():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, S, (N,), generator=g)
    labeled = torch.rand(N, generator=g) < 0.3
    labeled[:S] = True  # every class has a labeled example
    return torch.where(labeled, y, torch.full_like(y, -1))


def _batches(world):
    """A global batch per step, split over ranks; repeats across and within ranks."""
    g = torch.Generator().manual_seed(9)
    steps = []
    for _ in range(3):
        idx = torch.randint(0, N, (5 * world,), generator=g)
        idx[-1] = idx[0]
        emb = torch.nn.functional.normalize(torch.randn(5 * world, D, generator=g), dim=1)
        steps.append((idx, emb))
    return steps


def _worker(rank, world, init_file, layout):
    os.environ["LLP_FAST_DIST_CHUNK"] = "3"  # several density-refresh rounds, uneven across ranks
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)
    targets = _targets()
    single = llp_fast.MemoryBank(targets, S, dim=D, seed=3)
    if layout == "sharded":
        bank = ShardedMemoryBank(targets, S, dim=D, seed=3)
        lo, hi = shard_range(N, rank, world)
        assert (lo, hi) == (bank.start, bank.end)
        own = torch.arange(lo, hi)
        rows = lambda b, idx: b.local.embeddings[b.local.row_of[idx - lo]]
    else:
        bank = ReplicatedMemoryBank(targets, S, dim=D, seed=3)
        own = torch.arange(N)
        rows = lambda b, idx: b.embeddings[b.row_of[idx]]
    # Same starting vectors as the single bank.
    torch.testing.assert_close(rows(bank, own), single.embeddings[single.row_of[own]], rtol=0, atol=0)

    assert isinstance(bank, Bank)  # the interface the trainer uses, whatever the layout
    for pool, t in (("unlabeled", 5), ("all", 7)):
        want = single.refresh_density(t=t, tau=0.1, pool=pool)
        got = bank.refresh_density(t=t, tau=0.1, pool=pool)
        if layout == "sharded":
            lab_global = bank.local.index_of[: bank.local.num_labeled] + bank.start
            torch.testing.assert_close(got, want[single.row_of[lab_global]], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, want)

    for idx, emb in _batches(world):
        mine = slice(rank * 5, rank * 5 + 5)
        # Loss and gradient for this rank's slice against the current bank.
        v = emb[mine].clone().requires_grad_()
        w = torch.arange(1.0, 6.0)
        loss = bank.loss(v, idx[mine], tau=0.1)
        (loss * w).sum().backward()
        v_ref = emb.clone().requires_grad_()
        loss_ref = single.loss(v_ref, idx, tau=0.1)
        (loss_ref[mine] * w).sum().backward()
        torch.testing.assert_close(loss, loss_ref[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.grad, v_ref.grad[mine], rtol=1e-4, atol=1e-5)
        # Propagate + update for the global batch.
        bank.step(idx[mine], emb[mine], k=3, tau=0.1)
        single.step(idx, emb, k=3, tau=0.1)
        torch.testing.assert_close(rows(bank, own), single.embeddings[single.row_of[own]], rtol=0, atol=1e-6)
        if layout == "sharded":
            got_l, got_c = (
                bank.local.labels[bank.local.row_of[own - lo]],
                bank.local.confidence[bank.local.row_of[own - lo]],
            )
        else:
            got_l, got_c = bank.stored(own)
        want_l, want_c = single.stored(own)
        assert torch.equal(got_l, want_l)
        torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-6)
        # stored() of this rank's batch, fetched from the owners.
        torch.testing.assert_close(bank.stored(idx[mine])[0], single.stored(idx[mine])[0])
    # Warm-up pieces: instance discrimination (value and gradient) and the plain update.
    idx, emb = _batches(world)[0]
    mine = slice(rank * 5, rank * 5 + 5)
    v = emb[mine].clone().requires_grad_()
    loss = bank.instance_loss(v, idx[mine], tau=0.2)
    loss.sum().backward()
    v_ref = emb.clone().requires_grad_()
    loss_ref = single.instance_loss(v_ref, idx, tau=0.2)
    loss_ref[mine].sum().backward()
    torch.testing.assert_close(loss, loss_ref[mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.grad, v_ref.grad[mine], rtol=1e-4, atol=1e-5)
    bank.update(idx[mine], emb[mine], momentum=0.3)
    single.update(idx, emb, momentum=0.3)
    torch.testing.assert_close(rows(bank, own), single.embeddings[single.row_of[own]], rtol=0, atol=1e-6)
    # Labels set from outside (--label-init inputs): the same full vectors on every rank.
    unl = torch.nonzero(targets < 0).flatten()
    new_l, new_c = unl % S, torch.linspace(0.1, 1.0, unl.shape[0])
    bank.set_labels(unl, new_l, new_c)
    single.set_labels(unl, new_l, new_c)
    with pytest.raises(ValueError, match="labeled example"):  # checked on every rank, nothing written
        bank.set_labels(torch.tensor([int(unl[0]), 0]), torch.tensor([1, 1]), torch.tensor([0.5, 0.5]))
    # The whole-bank vote of --method plus (docs/method.md §8.1): each rank streams its own rows, the
    # voters and votes are exchanged, and every unlabeled row gets the single bank's label.
    vote = SimpleNamespace(t=5, tau=0.1, density_weighting=True, refresh_rounds=3, max_voters=0)
    changed = relabel(bank, vote, k=3)["relabel_changed"]
    assert changed == relabel(single, vote, k=3)["relabel_changed"]
    if layout == "sharded":
        got_l = bank.local.labels[bank.local.row_of[own - lo]]
        got_c = bank.local.confidence[bank.local.row_of[own - lo]]
    else:
        got_l, got_c = bank.stored(own)
    assert torch.equal(got_l, single.stored(own)[0])
    torch.testing.assert_close(got_c, single.stored(own)[1], rtol=1e-5, atol=1e-6)
    # The gathered bank is the single bank; a bank loaded from it holds the same rows.
    full = bank.gather()
    for key, value in single.state_dict().items():
        got = full.state_dict()[key]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got, value, rtol=0, atol=1e-6, check_dtype=False)
        else:
            assert got == value, key
    twin = (ShardedMemoryBank if layout == "sharded" else ReplicatedMemoryBank)(targets, S, dim=D, seed=11)
    twin.load_full(single.state_dict())
    torch.testing.assert_close(rows(twin, own), rows(bank, own), rtol=0, atol=1e-6)
    # Diagnostics and checkpoints without gathering: the merged vote, the all-reduced per-class
    # sums, and this rank's checkpoint piece equal the single bank's.
    queries = torch.nn.functional.normalize(torch.randn(7, D, generator=torch.Generator().manual_seed(4)), dim=1)
    for weighted in (True, False):
        got_v, want_v = (
            bank.vote(queries, k=3, tau=0.1, density_weighting=weighted),
            single.vote(queries, k=3, tau=0.1, density_weighting=weighted),
        )
        assert torch.equal(got_v[0], want_v[0])
        torch.testing.assert_close(got_v[1], want_v[1], rtol=1e-5, atol=1e-6)
    truth = torch.where(torch.arange(N) % 5 == 0, torch.full((N,), -1), torch.arange(N) % S)
    got_s, want_s = bank.class_statistics(truth), single.class_statistics(truth)
    for key, value in want_s.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got_s[key], value, rtol=1e-5, atol=1e-5, check_dtype=False)
        else:
            assert abs(got_s[key] - value) < 1e-6, key
    piece = bank.rows_state()
    assert (piece["start"], piece["end"]) == ((lo, hi) if layout == "sharded" else (0, N))
    pieces = [None] * world
    dist.all_gather_object(pieces, piece)
    loaded = llp_fast.MemoryBank(targets, S, dim=D, seed=12)
    loaded.load_rows(pieces)  # the pieces of every rank make the single bank again
    for key in ("embeddings", "labels", "confidence", "log_rho"):
        torch.testing.assert_close(getattr(loaded, key), getattr(single, key), rtol=0, atol=1e-6)
    gathered = all_gather_cat(torch.full((rank + 1,), rank))
    assert gathered.tolist() == sum(([r] * (r + 1) for r in range(world)), [])
    dist.barrier()  # every rank got here: all checks passed on all of them
    # Leave without tearing gloo down: torch's gloo teardown sometimes aborts a rank
    # ("terminate called without an active exception", ~1 run in 8 here) after every check
    # has passed. The process exits; the OS reclaims the sockets.
    os._exit(0)


@pytest.mark.parametrize("world,layout", [(2, "sharded"), (3, "sharded"), (2, "replicated")])
def test_distributed_equals_single_process(world, layout, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), layout), nprocs=world, join=True)


def _bad_input_worker(rank, world, init_file):
    """Bad input that every rank passes alike is refused on every rank, before any collective,
    with the single bank's message (it was accepted: inf/NaN rows and confidences, a silent inf
    loss, misaligned losses; or refused by the owning rank alone, the others left waiting)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    targets = _targets()
    bad = targets.clone()
    bad[-1] = S + 3  # a class id out of range, in the last rank's shard only
    with pytest.raises(ValueError, match=f"targets holds {S + 3}, outside"):
        ShardedMemoryBank(bad, S, dim=D, seed=3)
    bank = ShardedMemoryBank(targets, S, dim=D, seed=3, dtype=torch.float16)
    idx = torch.tensor([rank, N - 1 - rank])
    huge = torch.full((2, D), 8e4)
    with pytest.raises(ValueError, match="a torch.float16 bank of D=8 takes at most"):
        bank.step(idx, huge, k=2)
    with pytest.raises(ValueError, match="a torch.float16 bank of D=8 takes at most"):
        bank.update(idx, huge)
    emb = torch.nn.functional.normalize(torch.randn(2, D), dim=1) * 8e3
    with pytest.raises(ValueError, match="scores embeddings . bank / tau may reach"):
        bank.step(idx, emb, k=2, tau=1e-36)
    v = torch.nn.functional.normalize(torch.randn(2, D), dim=1)
    with pytest.raises(ValueError, match=f"indices holds {N + 5}, outside"):
        bank.instance_loss(v, torch.tensor([0, N + 5]))
    with pytest.raises(ValueError, match="v has 2 rows but indices has 3"):
        bank.loss(v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="v has D=5 but bank has D=8"):
        bank.instance_loss(v[:, :5], idx)
    assert torch.isfinite(bank.local.embeddings.float()).all()  # nothing was written
    loss = bank.instance_loss(v, idx)  # and the bank still works, collectively
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    # float targets and indices were cast (-0.7 -> 0: an unlabeled example labeled class 0; 1.7 -> 1)
    with pytest.raises(TypeError, match="targets"):
        ShardedMemoryBank(targets.float() + 0.3, S, dim=D, seed=3)
    with pytest.raises(TypeError, match="indices"):
        bank.stored(torch.tensor([1.7, 3.2]))
    with pytest.raises(ValueError, match="queries contains NaN or Inf"):  # NaN confidences, no error
        bank.vote(torch.full((2, D), float("nan")), k=2)
    # a float16 bank and values beyond its range: NaN losses and votes where MemoryBank refuses
    for call in (lambda: bank.loss(torch.full((2, D), 1e5), idx), lambda: bank.vote(torch.full((2, D), 1e5), k=2)):
        with pytest.raises(ValueError, match="a torch.float16 bank of D=8 takes at most"):
            call()
    # truth checked whole on every rank (a longer one passed, a shorter one failed on one rank alone)
    for length in (N + 5, N - 3):
        with pytest.raises(ValueError, match=rf"truth must have shape \({N},\)"):
            bank.class_statistics(torch.zeros(length, dtype=torch.int64))
    # make_bank sees a group made without torchrun's WORLD_SIZE (each rank built a bank of its own)
    from llp_fast.distributed import make_bank

    assert type(make_bank(targets, S, dim=D, seed=3)) is ShardedMemoryBank
    with pytest.raises(ValueError, match="layout must be"):
        make_bank(targets, S, dim=D, layout="shardd")
    from llp_fast.distributed import ReplicatedMemoryBank

    rep = ReplicatedMemoryBank(targets, S, dim=D, seed=3)
    with pytest.raises(NotImplementedError, match="use step"):  # it changed this rank's copy alone
        rep.propagate(idx, v, k=2)
    dist.barrier()
    os._exit(0)


def test_sharded_bad_input_is_refused_on_every_rank(tmp_path):
    mp.spawn(_bad_input_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def _mismatch_worker(rank, world, init_file):
    """Ranks passing different settings to one collective call all raise the same ValueError at
    the same point (they ended in gloo's abort where shapes differed, and in silently mixed results
    where they did not: each rank's top-k of another k merged, replicated copies parted)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    targets = _targets()
    other = targets.clone()
    other[-1] = -1 if int(targets[-1]) >= 0 else 0  # one label differs, on one rank only
    for cls in (ShardedMemoryBank, ReplicatedMemoryBank):
        with pytest.raises(ValueError, match=f"{cls.__name__}: the ranks passed different targets"):
            cls(other if rank == 1 else targets, S, dim=D, seed=3)
        with pytest.raises(ValueError, match="different seed .rank 0 3, rank 1 4"):
            cls(targets, S, dim=D, seed=3 + rank)
        # a value one rank refuses itself: the shared line, not that rank's alone (the others waited)
        with pytest.raises(ValueError, match="different dim .rank 0 8, rank 1 0"):
            cls(targets, S, dim=(D, 0)[rank], seed=3)
    bank = ShardedMemoryBank(targets, S, dim=D, seed=3)
    rep = ReplicatedMemoryBank(targets, S, dim=D, seed=3)
    idx = torch.tensor([rank, N - 1 - rank])
    emb = torch.nn.functional.normalize(torch.randn(2, D), dim=1)
    before = (bank.local.embeddings.clone(), rep.embeddings.clone(), rep.labels.clone())
    bank.refresh_density(t=3)
    rep.refresh_density(t=3)
    calls = {
        "ShardedMemoryBank.step: the ranks passed different k .rank 0 2, rank 1 3.": lambda: bank.step(
            idx, emb, k=2 + rank
        ),
        "ShardedMemoryBank.step: the ranks passed different k .rank 0 2, rank 1 1000000.": lambda: bank.step(
            idx,
            emb,
            k=(2, 10**6)[rank],  # (rank 1's own check refuses it)
        ),
        "ShardedMemoryBank.loss: the ranks passed different tau .rank 0 0.07, rank 1 0.": lambda: bank.loss(
            emb, idx, tau=(0.07, 0.0)[rank]
        ),
        "ShardedMemoryBank.loss: the ranks passed different targets given .rank 0 False, rank 1 True.": (
            lambda: bank.loss(emb, idx, targets=None if rank == 0 else torch.zeros(2, dtype=torch.int64))
        ),
        "ShardedMemoryBank.refresh_density: the ranks passed different pool": lambda: bank.refresh_density(
            t=3, pool=("unlabeled", "bogus")[rank]
        ),
        "ShardedMemoryBank.step: the ranks passed different tau .rank 0 0.07, rank 1 0.1.": lambda: bank.step(
            idx, emb, k=2, tau=(0.07, 0.1)[rank]
        ),
        "different density_weighting .rank 0 True, rank 1 False.": lambda: bank.step(
            idx, emb, k=2, density_weighting=rank == 0
        ),
        "ShardedMemoryBank.update: the ranks passed different momentum": lambda: bank.update(
            idx, emb, momentum=0.5 + rank / 4
        ),
        "ShardedMemoryBank.loss: the ranks passed different tau": lambda: bank.loss(emb, idx, tau=0.07 + rank),
        "ShardedMemoryBank.instance_loss: the ranks passed different tau": lambda: bank.instance_loss(
            emb, idx, tau=0.07 + rank
        ),
        "ShardedMemoryBank.refresh_density: the ranks passed different t .rank 0 3, rank 1 4.": lambda: (
            bank.refresh_density(t=3 + rank)
        ),
        "ShardedMemoryBank.refresh_density: the ranks passed different pool .rank 0 its own, rank 1 its own.": (
            lambda: bank.refresh_density(t=3, pool=("unlabeled", "all")[rank])
        ),
        "ShardedMemoryBank.vote: the ranks passed different queries' rows .rank 0 2, rank 1 3.": lambda: bank.vote(
            torch.cat([emb, emb])[: 2 + rank], k=2
        ),
        "ShardedMemoryBank.class_statistics: the ranks passed different truth .rank 0 its own, rank 1 its own.": (
            lambda: bank.class_statistics(torch.full((N,), rank))
        ),
        "ReplicatedMemoryBank.step: the ranks passed different k .rank 0 2, rank 1 3.": lambda: rep.step(
            idx, emb, k=2 + rank
        ),
        # a setting left at its default on one rank and given on the other: the same value, no error
        "ReplicatedMemoryBank.update: the ranks passed different momentum .rank 0 0.5, rank 1 0.9.": lambda: (
            rep.update(idx, emb) if rank == 0 else rep.update(idx, emb, momentum=0.9)
        ),
        "ReplicatedMemoryBank.update: the ranks passed different momentum .rank 0 1, rank 1 0.5.": lambda: rep.update(
            idx, emb, momentum=(1, 0.5)[rank]
        ),
    }
    for message, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        rep.step(idx, emb, kk=2)  # MemoryBank.step's own error, on every rank
    with pytest.raises((TypeError, RuntimeError), match="unexpected keyword argument 'kk'|name different settings"):
        rep.step(idx, emb, k=2) if rank == 0 else rep.step(idx, emb, k=2, kk=1)  # (one rank alone: it waited)
    with pytest.raises(
        RuntimeError,
        match="different collective calls at one point, or name different settings .this rank: ShardedMemoryBank",
    ):
        bank.step(idx, emb, k=2) if rank == 0 else bank.update(idx, emb)
    # nothing was written, and the banks work on: defaults given or not are the same settings
    assert torch.equal(bank.local.embeddings, before[0])
    assert torch.equal(rep.embeddings, before[1]) and torch.equal(rep.labels, before[2])
    # the same values of other types agree (one rank's np.int64(2) is another's 2, 1.0 another's 1)
    labels, _ = bank.step(idx, emb, k=2) if rank == 0 else bank.step(idx, emb, k=np.int64(2), tau=0.07, momentum=0.5)
    rep.step(idx, emb, k=2, momentum=(1, 1.0)[rank], density_weighting=(True, np.bool_(True))[rank])
    rep.update(idx, emb) if rank == 0 else rep.update(idx, emb, momentum=0.5)
    gathered = all_gather_cat(labels[None], None)
    assert torch.equal(gathered[0], gathered[1])
    dist.barrier()
    os._exit(0)


def test_ranks_passing_different_settings_are_refused_on_every_rank(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_make_bank_and_the_refresh_round_size_are_checked(monkeypatch):
    """Launched as one of several processes before a group exists: each rank built a bank of its
    own; LLP_FAST_DIST_CHUNK=-1 left the densities unwritten (garbage), 0 or text were a traceback."""
    from llp_fast.distributed import collectives, make_bank
    from llp_fast.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"no process group exists: call llp_fast.distributed.init\(\) first"):
        make_bank(_targets(), S, dim=D)
    monkeypatch.delenv("WORLD_SIZE")
    assert type(make_bank(_targets(), S, dim=D)) is llp_fast.MemoryBank
    for bad in ("-1", "0", "abc", "1.5"):
        monkeypatch.setenv("LLP_FAST_DIST_CHUNK", bad)
        with pytest.raises(ConfigError, match=f"LLP_FAST_DIST_CHUNK='{bad}': expected a whole number >= 1"):
            collectives.dist_chunk()
    monkeypatch.setenv("LLP_FAST_DIST_CHUNK", " 7 ")
    assert collectives.dist_chunk() == 7
    monkeypatch.delenv("LLP_FAST_DIST_CHUNK")
    assert collectives.dist_chunk() == 16_384


DYING = textwrap.dedent(
    """
    import os, torch, torch.distributed as dist
    from llp_fast.distributed import init
    rank, world = init("gloo")
    if rank == 1:
        os._exit(3)           # dies before the collective
    dist.all_reduce(torch.ones(1))
    """
)


def test_a_dying_rank_fails_the_run_instead_of_hanging(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    env = dict(os.environ, LLP_FAST_DIST_TIMEOUT="30")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 110


@pytest.mark.parametrize("in_order", [True, False])
def test_merge_of_rank_lists_is_the_one_merge(in_order):
    """merged_topk's merge of the ranks' top-k lists: one stable sort where each rank's keys are
    numbered above every lower rank's (the banks' shards), the two-sort merge otherwise; both exactly
    merge_topk over the lists side by side: equal values (many: integer scores) by the lower index,
    padding last, ranks with no key at all, fewer candidates than k."""
    from llp_fast._topk import merge_topk
    from llp_fast.distributed.collectives import _ranks_in_index_order, merge_rank_lists

    g = torch.Generator().manual_seed(int(in_order))
    for trial in range(200):
        world = int(torch.randint(2, 5, (1,), generator=g))
        k = int(torch.randint(1, 12, (1,), generator=g))
        q = int(torch.randint(1, 30, (1,), generator=g))
        starts = torch.randperm(world, generator=g) * 1000 if not in_order else torch.arange(world) * 1000
        vals, idx = [], []
        for r in range(world):
            n = (
                int(torch.randint(0, 25, (1,), generator=g))
                if trial % 3
                else int(torch.randint(0, 3, (1,), generator=g))
            )
            scores = torch.randint(0, 4, (q, n), generator=g).float() if trial % 2 else torch.randn(q, n, generator=g)
            v, i = merge_topk(scores, (int(starts[r]) + torch.arange(n)).expand(q, n), k)  # a rank's list
            vals.append(v)
            idx.append(i)
        got = merge_rank_lists(vals, idx, k)
        want = merge_topk(torch.cat(vals, dim=1), torch.cat(idx, dim=1), k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert _ranks_in_index_order(torch.tensor([[0, 1, 5, -1]]), 2, 2)
    assert not _ranks_in_index_order(torch.tensor([[5, 6, 0, 1]]), 2, 2)
    assert not _ranks_in_index_order(torch.tensor([[3, -1, -1, -1, 1, 2]]), 2, 3)  # an empty rank between


def test_a_signal_at_the_final_barrier_waits_for_it(monkeypatch):
    """After a clean run the outputs are in place: a Ctrl-C at the ranks' last barrier was a
    traceback from inside it, and the launcher then said "nothing was written" beside the files.
    The barrier runs with SIGINT and SIGTERM ignored (not masked: another thread would take them)."""
    import signal

    from llp_fast.distributed import collectives

    seen = []

    def barrier():
        os.kill(os.getpid(), signal.SIGINT)  # as the launcher passes a Ctrl-C on
        time.sleep(0.2)
        seen.append(signal.getsignal(signal.SIGINT))

    monkeypatch.setattr(collectives.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(collectives.dist, "barrier", barrier)
    monkeypatch.setattr(collectives.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(collectives, "launched", lambda: False)
    before = signal.getsignal(signal.SIGINT)
    assert collectives.finish(0) == 0  # no KeyboardInterrupt
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) == before
