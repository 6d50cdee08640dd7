"""The embeddings engine over gloo ranks (2-3 CPU processes) gives the single-process labels exactly:
per-rank top-T merged with global tie-breaks, per-rank votes, quotas from the gathered votes."""

import datetime
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llp_fast.embeddings import Engine, Rows, Settings, tune
from llp_fast.embeddings.ranks import Ranks
from llp_fast.embeddings.suspects import suspects_of

# gloo in child processes: a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated


def _problem(n=613, d=11, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[7] = x[300]  # an exact duplicate: equal scores, broken by the lower row on every rank count
    labels = np.where(rng.random(n) < 0.06, rng.integers(0, classes, n), -1)
    labels[:classes] = np.arange(classes)
    return x, labels


CASES = [Settings(rounds=1, chunk=50), Settings(rounds=4, chunk=64), Settings(rounds=3, density=False, k=3, chunk=1000)]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    x, labels = _problem()
    comm = Ranks(torch.device("cpu"))
    for i, settings in enumerate(CASES):
        res = Engine(Rows(x), labels, settings, comm=comm).run(top_classes=2, voter_ids=True)
        found = suspects_of(Rows(x), labels, res, settings, comm=comm)  # suspect labels: each rank its voters
        choice = tune.choose(Rows(x), labels, settings, auto_k=True, auto_tau=True, comm=comm)
        # every rank's ranking (--drop-suspects reruns each rank with its own): the same on all
        np.savez(os.path.join(out_dir, f"{i}-rank{rank}.npz"), suspects=found.rows, score=found.score)
        if rank == 0:
            np.savez(
                os.path.join(out_dir, f"{i}.npz"),
                labels=res.labels,
                conf=res.confidence,
                voters=res.voters,
                suspects=found.rows,
                gap=found.gap,
                choice=np.array([choice.k, choice.tau]),
            )
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("world", [3])
def test_ranks_equal_one_process(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    x, labels = _problem()
    for i, settings in enumerate(CASES):
        want = Engine(Rows(x), labels, settings).run(top_classes=2, voter_ids=True)
        got = np.load(tmp_path / f"{i}.npz")
        assert np.array_equal(got["labels"], want.labels), settings
        assert np.array_equal(got["conf"], want.confidence), settings
        assert np.array_equal(got["voters"], want.voters), settings
        found = suspects_of(Rows(x), labels, want, settings)
        assert np.array_equal(got["suspects"], found.rows) and np.array_equal(got["gap"], found.gap), settings
        for rank in range(world):
            each = np.load(tmp_path / f"{i}-rank{rank}.npz")
            assert np.array_equal(each["suspects"], found.rows), (settings, rank)
            assert np.array_equal(each["score"], found.score), (settings, rank)
        choice = tune.choose(Rows(x), labels, settings, auto_k=True, auto_tau=True)
        assert tuple(got["choice"]) == (choice.k, choice.tau), settings


def test_cli_nproc_equals_one_process(tmp_path):
    x, labels = _problem(n=900, d=16)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "lab.npy", labels)
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}.npy"
        cmd = [sys.executable, "-m", "llp_fast.cli.propagate", str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
        cmd += ["--out", str(out), "--rounds", "3", "--chunk", "100", "--nproc", str(nproc), "--threads", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("llp-fast-propagate: labeled") == 1  # rank 0 reports, once
        outs[nproc] = np.load(out)
    assert np.array_equal(outs[1], outs[2])
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy", "p1.npy", "p2.npy"]


def test_cli_nproc_keeps_float64_scores(tmp_path):
    """A float64 run over two ranks merged its candidates' scores as float32: a near-tie one
    process told apart (3e-9) went the other way, and every density moved by about 1e-6."""
    th, ph, e = 0.5, 0.45, 3e-9
    a = np.array([-th] + [0.0] * 4 + [-ph, ph - e, th])
    np.save(tmp_path / "x.npy", np.stack([np.cos(a), np.sin(a)], 1))
    np.save(tmp_path / "y.npy", np.array([1, -1, -1, -1, -1, -1, -1, 0]))
    outs = {}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "llp_fast.cli.propagate", str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
        cmd += ["--out", str(tmp_path / f"p{nproc}.npy"), "--rounds", "1", "--k", "1", "--t", "1"]
        proc = subprocess.run(
            [*cmd, "--nproc", str(nproc), "--threads", "1"], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[nproc] = np.load(tmp_path / f"p{nproc}.npy")
    assert outs[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]  # (the float64 reference's)
    assert np.array_equal(outs[1], outs[2])
