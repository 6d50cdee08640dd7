"""Faults at the writer end in one line and leave nothing torn (llp_fast/_files.py): a disk that
fills at a chosen byte under every output of every tool, the other errors a disk gives, a real
small tmpfs where the machine lets us mount one, a process killed while it writes a checkpoint
(its temporary file swept on resume, a live writer's never), and the directory fsynced after
each rename. The lost-rank faults are in test_faults_ranks.py."""

import builtins
import errno
import io
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from llp_fast import _files
from llp_fast.cli.analyze import main as analyze_main
from llp_fast.cli.probe import main as probe_main
from llp_fast.cli.propagate import main as propagate_main
from llp_fast.cli.select import main as select_main
from llp_fast.cli.train import main as train_main
from llp_fast.train import checkpoint
from llp_fast.train.report import read_metrics

# tiny networks on one thread, a forked writer killed mid-write: a crash fails these tests, not the run
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"images_per_s", "epoch_seconds", "relabel_seconds"}


def tiny_npz(path, n=256, n_test=64, classes=4, side=8, seed=0):
    """A small image set written here: 8x8 grey images, class c a bright quadrant over noise."""
    rng = np.random.default_rng(seed)

    def draw(m):
        y = rng.integers(0, classes, m)
        x = rng.integers(0, 60, (m, side, side))
        h = side // 2
        for c in range(classes):
            r, q = divmod(c, 2)
            x[y == c, r * h : (r + 1) * h, q * h : (q + 1) * h] += 180
        return x.astype(np.uint8), y.astype(np.int64)

    x, y = draw(n)
    xt, yt = draw(n_test)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return str(path)


def train_args(data, run, epochs=2):
    return [
        *("--data", f"npz:{data}", "--run-dir", str(run), "--epochs", str(epochs), "--width", "4"),
        *("--image-size", "8", "--batch-size", "32", "--k", "3", "--t", "5", "--labeled-fraction", "0.25"),
        *("--threads", "1", "--baseline", "off", "--device", "cpu", "--quiet"),
    ]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def temporaries(directory):
    """Temporary files of atomic writers left in ``directory`` (and below)."""
    return [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names if _files._TEMP.match(n)]


def one_line(capsys, rc, prog="llp-fast-train"):
    """The tools' contract for a failed write: exit 2, one line ``PROG: error: cannot write``."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f"{prog}: error: cannot write ") and "Traceback" not in err, err
    return lines[0]


class _Full:
    """A file on a disk with ``room`` bytes left: a write past it stores what fits, then fails."""

    def __init__(self, f, room, code):
        self._f, self._room, self._code = f, room, code

    def write(self, data):
        n = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._room:
            if self._room:
                part = data[: self._room] if isinstance(data, str) else memoryview(data).cast("B")[: self._room]
                self._f.write(part)
            self._room = 0
            self._f.flush()
            raise OSError(self._code, os.strerror(self._code))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``arm(part, at=, nth=, code=)``: the ``nth`` file opened for writing whose name holds
    ``part`` fails at byte ``at`` with ``code`` (ENOSPC), whoever opens it (our writers, NumPy,
    torch, matplotlib all go through ``open``)."""

    def arm(part, *, at=0, nth=1, code=errno.ENOSPC):
        real, seen = builtins.open, [0]

        def fake(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                if part in os.path.basename(os.fspath(file)):
                    seen[0] += 1
                    if seen[0] == nth:
                        return _Full(f, at, code)
            return f

        monkeypatch.setattr(builtins, "open", fake)
        monkeypatch.setattr(io, "open", fake)
        return seen

    return arm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted two-epoch run: its directory."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train_main(train_args(data, run)) == 0
    return str(run)


# -- a disk that fills at a chosen byte, under every output ------------------------------------
@pytest.mark.parametrize("at", [5000])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_finishes_alike(
    at, data, reference, tmp_path, full_disk, monkeypatch, capsys
):
    run = str(tmp_path / "run")
    full_disk("checkpoint.pt", at=at, nth=2)  # the second checkpoint: the first is there
    line = one_line(capsys, train_main(train_args(data, run)))
    assert line == (
        f"llp-fast-train: error: cannot write checkpoint {run}/checkpoint.pt: No space left on device; "
        f"the previous checkpoint (epoch 1) is intact; continue with: llp-fast-train --resume {run}"
    )
    assert checkpoint.load(os.path.join(run, "checkpoint.pt"))["epoch"] == 1  # verified: intact
    assert not temporaries(run)
    monkeypatch.undo()  # the disk has room again
    assert train_main(["--resume", run, "--quiet"]) == 0
    want = untimed(read_metrics(os.path.join(reference, "metrics.jsonl")))
    assert untimed(read_metrics(os.path.join(run, "metrics.jsonl"))) == want


def test_a_full_disk_at_the_first_checkpoint_lets_the_same_command_start_again(
    data, reference, tmp_path, full_disk, monkeypatch, capsys
):
    """The line said "the same command starts the run again", and the same command was refused: the
    epoch's metrics row, written before the checkpoint that failed, read as a finished run's."""
    run = str(tmp_path / "run")
    full_disk("checkpoint.pt", at=5000, nth=1)
    line = one_line(capsys, train_main(train_args(data, run)))
    assert line.endswith(f"{run} holds no checkpoint yet: the same command starts the run again"), line
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # (rows of no checkpoint)
    monkeypatch.undo()
    assert train_main(train_args(data, run)) == 0
    want = untimed(read_metrics(os.path.join(reference, "metrics.jsonl")))
    assert untimed(read_metrics(os.path.join(run, "metrics.jsonl"))) == want


def test_a_full_disk_in_a_resume_to_more_epochs_names_them(data, reference, tmp_path, full_disk, monkeypatch, capsys):
    """A resume to more epochs that failed before its first checkpoint said "continue with:
    llp-fast-train --resume RUN", which resumed to the old count and ended there, unsaid."""
    run = str(tmp_path / "run")
    assert train_main(train_args(data, run, epochs=1)) == 0
    full_disk("checkpoint.pt", at=5000, nth=1)
    line = one_line(capsys, train_main(["--resume", run, "--quiet", "--epochs", "2"]))
    assert line.endswith(
        f"the previous checkpoint (epoch 1) is intact; continue with: llp-fast-train --resume {run} --epochs 2"
    ), line
    monkeypatch.undo()
    assert train_main(["--resume", run, "--quiet", "--epochs", "2"]) == 0  # as the line says: the whole run
    want = untimed(read_metrics(os.path.join(reference, "metrics.jsonl")))
    assert untimed(read_metrics(os.path.join(run, "metrics.jsonl"))) == want
    assert checkpoint.resume_command(run) == f"llp-fast-train --resume {run}"  # (done: no --epochs)


@pytest.mark.parametrize(
    "part,nth,at,kept",
    [
        ("config.json", 1, 10, ""),  # before training: nothing to keep
        ("metrics.jsonl", 2, 7, "the last complete checkpoint (epoch 1) is intact"),  # epoch 2's row
        ("tfevents", 3, 0, "the last complete checkpoint (epoch 1) is intact"),  # the header, epoch 1, epoch 2
    ],
)
def test_a_full_disk_under_the_other_training_outputs_is_one_line(
    part, nth, at, kept, data, tmp_path, full_disk, capsys
):
    if part == "tfevents":
        pytest.importorskip("tensorboard", reason="the tb extra (pip install -e .[tb]) is not installed")
    run = str(tmp_path / "run")
    full_disk(part, at=at, nth=nth)
    line = one_line(capsys, train_main(train_args(data, run)))
    assert f" {run}/" in line and part in line and ": No space left on device" in line, line
    if kept:
        assert line.endswith(f"{kept}; continue with: llp-fast-train --resume {run}"), line
    else:
        assert line.endswith(": No space left on device"), line
    assert not temporaries(run)
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics):  # whole lines only: the torn row was cut off
        rows = read_metrics(metrics)
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert open(metrics).read().endswith("\n")
    assert not os.path.exists(os.path.join(run, "config.json")) or part != "config.json"


def test_one_ctrl_c_before_training_and_a_second_one_inside_it_say_which(data, tmp_path, monkeypatch, capsys):
    """One Ctrl-C while the data loaded said "interrupted twice; the last complete checkpoint is
    kept": one signal, no checkpoint. A second one inside training still says so."""
    import llp_fast.train.api as api
    from llp_fast.train.loop import Trainer

    real = api.prepare

    def prepare(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the data loads
        return real(*a, **k)

    monkeypatch.setattr(api, "prepare", prepare)
    run = tmp_path / "run"
    assert train_main(train_args(data, run)) == 130
    err = capsys.readouterr().err.strip()
    assert (
        err == "llp-fast-train: interrupted outside training (loading, or after the last checkpoint); "
        "nothing is half-written"
    ), err
    assert not (run / "checkpoint.pt").exists()
    monkeypatch.setattr(api, "prepare", real)
    step = Trainer.train_step

    def twice(self, *a, **k):  # the second signal arrives before the first one's checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", twice)
    assert train_main(train_args(data, tmp_path / "run2")) == 130
    assert capsys.readouterr().err.strip() == (  # (it said "the last complete checkpoint is kept": none was)
        f"llp-fast-train: interrupted twice; {tmp_path / 'run2'} holds no checkpoint yet: the same command starts "
        "the run again"
    )
    calls = [0]

    def later(self, *a, **k):  # after the first epoch's checkpoint
        calls[0] += 1
        if calls[0] == 20:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", later)
    run3 = tmp_path / "run3"
    assert train_main(train_args(data, run3, epochs=4)) == 130
    assert capsys.readouterr().err.strip() == (
        f"llp-fast-train: interrupted twice; the last complete checkpoint (epoch 2) is intact; continue with: "
        f"llp-fast-train --resume {run3}"
    )


def _embeddings(tmp_path, n=300, d=8):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((n, d)).astype(np.float32))
    labels = np.where(rng.random(n) < 0.1, rng.integers(0, 3, n), -1)
    labels[:3] = [0, 1, 2]
    np.save(tmp_path / "lab.npy", labels)
    outs = {f: str(tmp_path / f"{f}.{'npz' if f == 'probs' else 'npy'}") for f in ("out", "conf", "probs", "voters")}
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", outs["out"], "--confidence-out"]
    argv += [outs["conf"], "--probs-out", outs["probs"], "--voters-out", outs["voters"], "--k", "3", "--t", "5"]
    return argv + ["--quiet"], outs


@pytest.mark.parametrize("at", [0, 200])
@pytest.mark.parametrize("which", ["out", "conf", "probs", "voters"])
def test_a_full_disk_under_any_propagate_output_writes_none_of_them(which, at, tmp_path, full_disk, capsys):
    argv, outs = _embeddings(tmp_path)
    full_disk(os.path.basename(outs[which]), at=at)
    line = one_line(capsys, propagate_main(argv), "llp-fast-propagate")
    assert line == f"llp-fast-propagate: error: cannot write {outs[which]}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy"]  # no output, no temporary file


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_each_disk_error_is_one_line_with_the_systems_words(code, tmp_path, full_disk, capsys):
    argv, outs = _embeddings(tmp_path)
    full_disk("out.npy", at=100, code=code)
    line = one_line(capsys, propagate_main(argv), "llp-fast-propagate")
    assert line == f"llp-fast-propagate: error: cannot write {outs['out']}: {os.strerror(code)}"
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy"]


@pytest.mark.parametrize(
    "tool,part,argv",
    [
        ("select", "sel.npz", lambda run, d, t: [run, "--source", f"npz:{d}", "--out", f"{t}/sel.npz", "--quiet"]),
        ("select", "sel.json", lambda run, d, t: [run, "--source", f"npz:{d}", "--out", f"{t}/sel.json", "--quiet"]),
        ("probe", "p.json", lambda run, d, t: [run, "--data", f"npz:{d}", "--epochs", "2", "--out", f"{t}/p.json"]),
        ("analyze", "curves.png", lambda run, d, t: [run, "--out", f"{t}/pics"]),
    ],
)
def test_a_full_disk_under_the_other_tools_outputs_is_one_line(
    tool, part, argv, reference, data, tmp_path, full_disk, capsys
):
    main, prog = {
        "select": (select_main, "llp-fast-select"),
        "probe": (probe_main, "llp-fast-linear-probe"),
        "analyze": (analyze_main, "llp-fast-analyze"),
    }[tool]
    if tool == "analyze":
        pytest.importorskip("matplotlib", reason="llp-fast-analyze draws with matplotlib (the dev extra)")
    full_disk(part, at=64)
    line = one_line(capsys, main(argv(reference, data, tmp_path)), prog)
    assert line.endswith(f"{part}: No space left on device") and str(tmp_path) in line, line
    assert not os.path.exists(os.path.join(tmp_path, part)) and not temporaries(tmp_path)


class _Shard:
    """Rows [2 r, 2 r + 2) of a 4-row sharded bank, as rank r holds them."""

    def __init__(self, rank):
        self.rank = rank

    def rows_state(self):
        return {"start": 2 * self.rank, "end": 2 * self.rank + 2, "embeddings": torch.zeros(2, 4)}

    def __len__(self):
        return 4


def _bank_file_worker(rank, world, init_file, run, failing, again):
    """Rank ``failing``'s bank file meets a full disk; every rank must end with that file's line.
    ``again``: the step's files were written by an earlier save (a run resumed at an epoch's last
    step saves again at its end): they are the kept checkpoint's, and must stay as they were."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    real = checkpoint.atomic_open
    kept = {}
    if again:
        checkpoint.save_bank(_Shard(rank), run, 9, rank, world)
        dist.barrier()
        kept = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run) if n.startswith("bank-9")}
        assert sorted(kept) == ["bank-9-r0.pt", "bank-9-r1.pt"]
    target = f"bank-9.1-r{failing}.pt" if again else f"bank-9-r{failing}.pt"

    def full(path, **kw):
        if os.path.basename(path) == target:
            raise _files.WriteError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), what="checkpoint")
        return real(path, **kw)

    checkpoint.atomic_open = full
    with pytest.raises(_files.WriteError) as e:
        checkpoint.save_bank(_Shard(rank), run, 9, rank, world)
    assert str(e.value) == (
        f"cannot write checkpoint {run}/{target}: No space left on device; the previous checkpoint "
        f"(epoch 2) is intact; continue with: llp-fast-train --resume {run} --nproc 2"
    ), str(e.value)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    dist.barrier()  # (every rank has removed its own file)
    left = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run) if n.startswith("bank-9")}
    assert not temporaries(run) and left == kept, sorted(left)  # the kept checkpoint's files, untouched
    dist.destroy_process_group()


@pytest.mark.parametrize("failing,again", [(0, False), (1, False), (1, True)])
def test_a_failed_bank_file_says_which_checkpoint_is_kept_on_every_rank(reference, tmp_path, failing, again):
    """A sharded bank writes one file per rank (checkpoint.save_bank): its failure says which
    checkpoint is kept, and the other ranks' files of that step go too (the rank that failed ended
    alone, and a whole shard, listed by no checkpoint, stayed on the full disk)."""
    import torch.multiprocessing as mp

    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    mp.spawn(_bank_file_worker, args=(2, str(tmp_path / "init"), run, failing, again), nprocs=2, join=True)


def test_a_checkpoint_that_fails_removes_the_bank_files_of_its_step(data, tmp_path, monkeypatch):
    """A sharded bank's files (every rank's, written before the checkpoint) stayed behind when the
    checkpoint itself failed: P x the bank on a disk already full."""
    from llp_fast.cli.train import config_from_args, parser
    from llp_fast.train.api import prepare

    run = tmp_path / "run"
    trainer = prepare(config_from_args(parser().parse_args(train_args(data, run)), str(run)))

    def save_bank(bank, run_dir, tag, rank, world):
        files = []
        for r in range(2):
            name = f"bank-{tag}-r{r}.pt"
            (run / name).write_bytes(b"rows")
            files.append({"file": name, "start": 0, "end": 1, "sha256": ""})
        return {"files": files}

    def full(state, path):
        raise _files.WriteError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), what="checkpoint")

    monkeypatch.setattr(checkpoint, "save_bank", save_bank)
    monkeypatch.setattr(checkpoint, "save", full)
    (run / "bank-0-r0.pt").write_bytes(b"an earlier checkpoint's")  # not this step's: kept
    trainer.global_step = 7
    with pytest.raises(_files.WriteError, match="No space left"):
        trainer.save()
    assert sorted(p.name for p in run.glob("bank-*")) == ["bank-0-r0.pt"]


def test_a_file_where_the_tensorboard_folder_goes_is_one_cannot_write_line(data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("not a folder")
    line = one_line(capsys, train_main(train_args(data, run)))
    assert (
        f"cannot write TensorBoard folder {run / 'tb'}: File exists: a file of that name is in the way (remove" in line
    )


def test_a_programming_error_inside_a_write_keeps_its_traceback(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        with _files.atomic_open(str(tmp_path / "x.json"), "w") as f:
            json.dump({"a": object()}, f)
    assert os.listdir(tmp_path) == []


def test_an_output_over_a_pipe_or_a_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    """The rename replaced a FIFO or a device (as root: /dev/full itself) with a regular file and
    said it had written it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    for target in (fifo, tmp_path / "folder"):
        with pytest.raises(_files.WriteError, match=f"cannot write {target}: it is not a regular file") as e:
            with _files.atomic_open(str(target)) as f:
                f.write(b"x")
        noted = str(e.value.noted("what next"))  # (the trainer's note: "cannot write PATH:" came twice)
        assert noted.count("cannot write") == 1 and noted.endswith("give a file; what next"), noted
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((40, 4)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.where(np.arange(40) < 6, np.arange(40) % 3, -1))
    rc = propagate_main([str(tmp_path / "e.npy"), str(tmp_path / "l.npy"), "--out", str(fifo), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("it is not a regular file (a device, a pipe or a folder): give a file"), err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and (tmp_path / "folder").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["e.npy", "fifo", "folder", "l.npy"]


def test_the_directory_is_fsynced_after_each_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = str(tmp_path / "f.bin")
    with _files.atomic_open(target) as f:
        f.write(b"data")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".f.bin.tmp."))  # the file's bytes, then the rename
    assert events[1][1] == target and events[2][1] == str(tmp_path)


# -- litter: what dead writers leave is swept, a live writer's never ------------------------------
def _slow_checkpoint(run, ready, bytes_before_stop=4096):
    """In a forked child: writes the run's checkpoint again and stops for good mid-write."""
    real = _files._Watched.write

    def write(self, data):
        if self.tell() >= bytes_before_stop:
            ready.set()
            time.sleep(600)
        return real(self, data)

    _files._Watched.write = write
    try:
        ckpt = checkpoint.load(os.path.join(run, "checkpoint.pt"))
        checkpoint.save(ckpt, os.path.join(run, "checkpoint.pt"))
    finally:
        os._exit(0)


def test_a_writer_killed_during_a_checkpoint_leaves_a_temporary_file_that_resume_sweeps(reference, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    before = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_slow_checkpoint, args=(run, ready))
    child.start()
    try:
        assert ready.wait(60), "the child never started writing"
        (tmp,) = temporaries(run)
        assert os.path.basename(tmp) == f".checkpoint.pt.tmp.{child.pid}" and os.path.getsize(tmp) >= 4096
        assert checkpoint.sweep(run, None) == [] and os.path.exists(tmp)  # a live writer's file stays
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert os.path.exists(tmp)  # the litter of issue 26: a killed writer's temporary file
    assert open(os.path.join(run, "checkpoint.pt"), "rb").read() == before  # the checkpoint is untouched
    assert train_main(["--resume", run, "--epochs", "3", "--quiet"]) == 0
    assert not os.path.exists(tmp) and not temporaries(run)
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".a.npy.tmp.{dead.pid}.npy": False,  # its writer is gone: swept
        f".checkpoint.pt.tmp.{dead.pid}": False,
        f".b.npy.tmp.{os.getppid()}.npy": True,  # a running process: kept
        f".c.npy.tmp.{os.getpid()}": True,  # this process: kept
        "plain.tmp.1": True,  # not a temporary file of ours
        ".hidden": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = _files.sweep(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


# -- a real small file system ------------------------------------------------------------------
_TMPFS_SCRIPT = """
import contextlib, io, json, os, subprocess, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_faults import train_args
from llp_fast.cli.propagate import main as propagate_main
from llp_fast.cli.train import main as train_main
from llp_fast.train.report import read_metrics
mnt, data, emb, lab = sys.argv[1:5]
run = os.path.join(mnt, "run")
out = {{}}
def call(name, main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[name] = [main(argv), err.getvalue()]
call("full", train_main, train_args(data, run))
out["left"] = sorted(os.listdir(run))
subprocess.run(["mount", "-o", "remount,size=16m", mnt], check=True)  # the disk grew
call("resume", train_main, ["--resume", run, "--quiet"])
out["metrics"] = read_metrics(os.path.join(run, "metrics.jsonl"))
used = os.statvfs(mnt)
subprocess.run(["mount", "-o", "remount,size=%dk" % ((used.f_blocks - used.f_bfree) * used.f_frsize // 1024 + 8), mnt])
call("propagate", propagate_main, [emb, lab, "--out", os.path.join(mnt, "p.npy"), "--quiet", "--k", "3", "--t", "5"])
out["after"] = sorted(os.listdir(mnt))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_real_small_tmpfs_fills_and_the_run_resumes_after_it_grows(data, reference, tmp_path):
    """On a tmpfs with room for one checkpoint but not for its replacement beside it: the second
    checkpoint fails in one line, the first stays, and after the disk grows ``--resume`` ends
    where the uninterrupted run did; then llp-fast-propagate fills it. Needs a mount: a user
    namespace (``unshare -rm``) or root; skipped where neither works."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size_kb = os.path.getsize(os.path.join(reference, "checkpoint.pt")) * 3 // 2 // 1024 + 64
    probe = (
        subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && echo ok"],
            capture_output=True,
            text=True,
        )
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.stdout.strip() != "ok":
        why = "no unshare" if probe is None else (probe.stderr.strip().splitlines() or ["mount failed"])[-1]
        pytest.skip(f"cannot mount a tmpfs here ({why})")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((6000, 8)).astype(np.float32))  # 48 kB of labels out
    np.save(tmp_path / "lab.npy", np.where(np.arange(6000) < 30, np.arange(6000) % 3, -1))
    script = tmp_path / "on_tmpfs.py"
    script.write_text(_TMPFS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && exec {sys.executable} {script} {mnt} {data} "
    cmd += f"{tmp_path / 'emb.npy'} {tmp_path / 'lab.npy'}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = f"{mnt}/run"
    rc, err = out["full"]
    assert rc == 2 and err == (
        f"llp-fast-train: error: cannot write checkpoint {run}/checkpoint.pt: No space left on device; "
        f"the previous checkpoint (epoch 1) is intact; continue with: llp-fast-train --resume {run}\n"
    )
    assert not [n for n in out["left"] if _files._TEMP.match(n)]
    assert out["resume"] == [0, ""]
    assert untimed(out["metrics"]) == untimed(read_metrics(os.path.join(reference, "metrics.jsonl")))
    rc, err = out["propagate"]
    assert rc == 2 and err == f"llp-fast-propagate: error: cannot write {mnt}/p.npy: No space left on device\n"
    assert out["after"] == ["run"]  # no output, no temporary file


def test_outputs_move_into_place_together_or_not_at_all(tmp_path, monkeypatch):
    """A failure at one output's close (NFS reports a full disk only there) had left the outputs
    closed after it already renamed into place (each atomic writer renamed as it exited, in reverse
    order): a run that said "error" had replaced some of its files. Now none is renamed until all
    are complete."""
    from llp_fast.embeddings import outputs

    paths = [tmp_path / f"{n}.npy" for n in "abc"]
    for p in paths:
        np.save(p, np.zeros(1))  # the previous outputs
    real = _files._Watched.close

    def close(self):
        if os.path.basename(self._f.name).startswith(".b.npy.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(_files._Watched, "close", close)
    with pytest.raises(_files.WriteError, match=r"cannot write .*b\.npy: No space left on device"):
        outputs.write({str(p): ("npy", np.ones(3)) for p in paths})
    assert [np.load(p).tolist() for p in paths] == [[0.0]] * 3 and temporaries(tmp_path) == []
    monkeypatch.setattr(_files._Watched, "close", real)
    outputs.write({str(p): ("npy", np.ones(3)) for p in paths})
    assert [np.load(p).tolist() for p in paths] == [[1.0] * 3] * 3 and temporaries(tmp_path) == []


def test_an_output_under_a_file_says_so_in_every_tool(data, tmp_path, capsys):
    """An output path under a file (``/etc/hostname/x``) read "directory /etc/hostname does not
    exist" in every tool; a missing directory still says that."""
    from llp_fast._files import parent_problem

    (tmp_path / "f").write_text("")
    assert parent_problem(tmp_path / "f" / "x.npy") == f"{tmp_path / 'f'} is a file, not a directory"
    assert parent_problem(tmp_path / "f" / "a" / "x.npy") == f"{tmp_path / 'f'} is a file, not a directory"
    assert parent_problem(tmp_path / "no" / "x.npy") == f"directory {tmp_path / 'no'} does not exist"
    assert parent_problem(tmp_path / "x.npy") is None
    os.symlink(tmp_path / "gone", tmp_path / "link")
    assert (
        parent_problem(tmp_path / "link" / "x.npy")
        == f"{tmp_path / 'link'} is a broken symbolic link (to {tmp_path / 'gone'})"
    )
    emb, labels = tmp_path / "e.npy", tmp_path / "l.npy"
    np.save(emb, np.eye(4, dtype=np.float32))
    np.save(labels, np.array([0, 1, -1, -1]))
    under = f"{tmp_path / 'f'} is a file, not a directory"
    for flag in ("--out", "--save-model", "--suspects-out"):
        argv = [str(emb), str(labels), "--out", str(tmp_path / "p.npy"), flag, str(tmp_path / "f" / "x.npy")]
        with pytest.raises(SystemExit) as e:  # (argparse's exit: the flag's type check)
            propagate_main([*argv, "--quiet"])
        err = capsys.readouterr().err  # (argparse's usage, then its line)
        assert e.value.code == 2 and err.rstrip().endswith(under) and "Traceback" not in err, err
    # a run directory that cannot be made: "PATH: Not a directory", without a word of what was made
    assert train_main(train_args(data, tmp_path / "f" / "run")) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"llp-fast-train: error: cannot write run directory {tmp_path / 'f' / 'run'}: Not a directory"
