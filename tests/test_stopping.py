"""How a run stops: a signal during a pass between steps (llp_fast/train/stopping.py), the PIL
loader's workers and signals, a lost worker (llp_fast/data/loading.py), and the folder checks that
came with them. Isolated: real DataLoader worker processes, signals sent to them and to this one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_data import make_folder
from test_faults import tiny_npz, train_args, untimed

from llp_fast.cli.train import main as train_main
from llp_fast.data import make_split
from llp_fast.data.files import image_files
from llp_fast.data.loading import WorkerLost, load_batches, worker_lost
from llp_fast.errors import DataError
from llp_fast.train import checkpoint
from llp_fast.train.report import read_metrics

pytestmark = pytest.mark.isolated


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("stopping") / "tiny.npz")


# -- a signal during a pass between steps ---------------------------------------------------------
def _stops_with_its_checkpoint(data, run, capsys, signum) -> None:
    """The run in ``run`` stops on ``signum`` with the interrupt line naming its checkpoint."""
    capsys.readouterr()
    assert train_main(train_args(data, run)) == 130
    assert capsys.readouterr().err.strip() == (
        f"llp-fast-train: interrupted by signal {signum}; checkpoint saved in {run}; "
        f"continue with: llp-fast-train --resume {run}"
    )


def _resumes_to(run, whole) -> None:
    """Resumed, the run in ``run`` ends with the metrics of the uninterrupted run in ``whole``."""
    assert train_main(["--resume", str(run), "--quiet"]) == 0
    assert untimed(read_metrics(run / "metrics.jsonl")) == untimed(read_metrics(whole / "metrics.jsonl"))


def test_a_signal_during_the_bank_warm_start_stops_it_at_once(data, tmp_path, monkeypatch, capsys):
    """The warm start (a forward pass over every image) ran to its end before the run noticed a
    Ctrl-C: minutes on a large folder. Now the pass stops there, and no checkpoint exists."""
    from llp_fast.train import warmstart

    real, after = warmstart.fill_bank, []

    def fill_bank(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        after.append("the pass went on")  # the handler raises before this line
        return real(*a, **k)

    monkeypatch.setattr(warmstart, "fill_bank", fill_bank)
    run = tmp_path / "run"
    assert train_main(train_args(data, run)) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("interrupted outside training (loading, or after the last checkpoint); nothing is half-written")
    assert after == [] and not (run / "checkpoint.pt").exists()
    monkeypatch.setattr(warmstart, "fill_bank", real)
    assert train_main(train_args(data, run)) == 0  # the same command starts the run again


def test_a_signal_during_an_epochs_density_refresh_stops_at_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    """SIGTERM while the second epoch's densities refresh: the run stops there (the refresh is kept
    nowhere) naming the first epoch's checkpoint, and the resumed run ends as an uninterrupted one."""
    from llp_fast.bank import MemoryBank

    assert train_main(train_args(data, tmp_path / "whole")) == 0
    real, calls = MemoryBank.refresh_density, []

    def refresh(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            calls.append("the refresh went on")
        return real(self, *a, **k)

    monkeypatch.setattr(MemoryBank, "refresh_density", refresh)
    run = tmp_path / "run"
    _stops_with_its_checkpoint(data, run, capsys, 15)
    assert calls == [1, 1] and checkpoint.peek(str(run)) == {"epoch": 1, "step_in_epoch": 0, "epochs": 2}
    monkeypatch.setattr(MemoryBank, "refresh_density", real)
    _resumes_to(run, tmp_path / "whole")


def test_a_signal_during_an_epochs_evaluation_stops_it_and_saves_its_last_step(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first epoch is evaluated (after its last step; a test set of 50,000 images
    took minutes to go through): the evaluation stops there, the checkpoint of that step is written
    (the last one was an epoch behind), and the resumed run, which evaluates the epoch again, ends as
    an uninterrupted one."""
    from llp_fast.train.loop import Trainer

    assert train_main(train_args(data, tmp_path / "whole")) == 0
    real, calls = Trainer.evaluate, []

    def evaluate(self):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        calls.append("the evaluation went on")
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    run = tmp_path / "run"
    _stops_with_its_checkpoint(data, run, capsys, 2)
    assert calls == [1]
    steps = checkpoint.peek(str(run))
    assert steps["epoch"] == 0 and steps["step_in_epoch"] > 0 and not (run / "metrics.jsonl").exists()
    monkeypatch.setattr(Trainer, "evaluate", real)
    _resumes_to(run, tmp_path / "whole")


def test_the_trainer_api_raises_keyboardinterrupt_in_the_warm_start(data, tmp_path, monkeypatch):
    """From Python (``Trainer.fit``), a Ctrl-C in the warm start is a KeyboardInterrupt."""
    from llp_fast.train import warmstart
    from llp_fast.train.api import prepare
    from llp_fast.train.config import TrainConfig

    cfg = TrainConfig(
        data=f"npz:{data}", run_dir=str(tmp_path / "api"), epochs=2, width=4, image_size=8, batch_size=32, k=3, t=5
    )
    cfg.labeled_fraction, cfg.threads, cfg.device, cfg.quiet = 0.25, 1, "cpu", True
    trainer = prepare(cfg)
    monkeypatch.setattr(warmstart, "fill_bank", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back


# -- the loader's workers -------------------------------------------------------------------------
class Slow(torch.utils.data.Dataset):
    """Items that take a while, so that a signal lands while the workers decode."""

    def __len__(self):
        return 400

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.full((2,), float(i)), i


def _children() -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")


@needs_proc
def test_workers_leave_an_outside_sigterm_and_sigint_to_the_main_process():
    """A scheduler's SIGTERM to every process (or Ctrl-C to the group) killed the workers, and torch
    raised in the main process wherever it was: the workers now go on, and the pass ends whole."""
    batches = [list(range(s, s + 10)) for s in range(0, 400, 10)]
    got = []
    for n, (_, i) in enumerate(load_batches(Slow(), batches, 2, generator=torch.Generator())):
        if n == 2:
            workers = _children()
            assert len(workers) >= 2
            for pid in workers:  # sent by another process, as kill(1), systemd or Slurm do
                subprocess.run(["kill", "-TERM", str(pid)], check=True)
                subprocess.run(["kill", "-INT", str(pid)], check=True)
                subprocess.run(["kill", "-HUP", str(pid)], check=True)
        got += i.tolist()
    assert got == list(range(400))


@needs_proc
def test_a_killed_worker_is_one_workerlost_and_an_early_stop_ends_the_workers_at_once():
    batches = [list(range(s, s + 10)) for s in range(0, 400, 10)]
    with pytest.raises(
        WorkerLost, match=r"^a data-loader worker was lost \(DataLoader worker .*lower --workers or --batch-size$"
    ):
        for n, _ in enumerate(load_batches(Slow(), batches, 2, generator=torch.Generator())):
            if n == 1:
                os.kill(_children()[-1], signal.SIGKILL)  # as the out-of-memory killer does
    passes = load_batches(Slow(), batches, 2, generator=torch.Generator())
    next(passes)
    workers = _children()
    t0 = time.monotonic()
    passes.close()  # a run stopping mid-pass: each worker was decoding a batch, and torch waited
    assert time.monotonic() - t0 < 3.0
    assert not [
        pid for pid in workers if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    ]


def test_worker_lost_reads_torchs_two_messages_and_nothing_else():
    for text in (
        "DataLoader worker (pid 123) is killed by signal: Killed. ",
        "DataLoader worker (pid(s) 9) exited unexpectedly",
    ):
        lost = worker_lost(RuntimeError(text))
        assert isinstance(lost, WorkerLost) and isinstance(lost, DataError)
        assert str(lost).startswith(f"a data-loader worker was lost ({text.strip().rstrip('.')})")
    assert worker_lost(RuntimeError("CUDA out of memory")) is None
    assert worker_lost(ValueError("DataLoader worker (pid 1) is killed by signal: Killed.")) is None


def test_a_worker_lost_in_training_names_the_checkpoint_to_resume_from(data, tmp_path, monkeypatch, capsys):
    """Torch raises it from its SIGCHLD handler, anywhere in the step (the line said nothing of the
    checkpoint, and a traceback came with it)."""
    from llp_fast.train.loop import Trainer

    step = Trainer.train_step

    def dies(self, *a, **k):
        if self.epoch == 1:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", dies)
    run = tmp_path / "run"
    assert train_main(train_args(data, run)) == 2
    assert capsys.readouterr().err.strip() == (
        "llp-fast-train: error: a data-loader worker was lost (DataLoader worker (pid 4242) is killed by signal: "
        "Killed): if memory ran out, lower --workers or --batch-size; the last complete checkpoint (epoch 1) is "
        f"intact; continue with: llp-fast-train --resume {run}"
    )


@needs_proc
def test_sigterm_to_the_whole_group_during_training_with_workers_checkpoints(tmp_path):
    """``kill -TERM -- -PGID`` (a scheduler, systemd) mid-run with --workers 2: one line, exit 130,
    a checkpoint; it was a torch traceback, exit 1, raised while the checkpoint was being written."""
    root = make_folder(tmp_path / "imgs", per_class=24, size=(40, 40))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llp_fast.cli", "--data", f"folder:{root}", "--run-dir", str(run), "--epochs", "60"]
    cmd += ["--width", "4", "--image-size", "16", "--batch-size", "4", "--k", "2", "--t", "5"]
    cmd += ["--labeled-fraction", "0.3", "--threads", "1", "--device", "cpu", "--baseline", "off"]
    cmd += ["--loader", "pil", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)  # inside the second epoch
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    assert err.strip().splitlines()[-1].startswith("llp-fast-train: interrupted by signal 15; checkpoint saved in "), (
        err
    )
    assert checkpoint.peek(str(run))["epoch"] >= 1


# -- folders and splits ---------------------------------------------------------------------------
def test_image_files_skip_what_is_not_a_file_and_keep_a_dangling_link(tmp_path):
    """A FIFO named ``x.jpg`` made the run wait forever, silent; a link that leads nowhere stays, so
    that reading it names it. The order: a folder's files, then each subfolder's, by name."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jpg").mkdir()  # a folder named like an image: looked into, not read
    for name in ("b/2.png", "b/1.png", "z.png", "a.jpg/0.png", "note.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "gone.png")
    assert [os.path.relpath(p, tmp_path) for p in image_files(str(tmp_path))] == [
        "gone.png",
        "z.png",
        "a.jpg/0.png",
        "b/1.png",
        "b/2.png",
    ]


def test_a_class_left_unlabeled_names_what_labels_it():
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    mask = np.zeros(10, dtype=bool)
    mask[[0, 3]] = True
    with pytest.raises(
        DataError,
        match=r"class 2 has no labeled training example \(list at least one of its training images in labeled\.txt\)",
    ):
        make_split(y, num_classes=3, labeled_fraction=0.5, has_test=True, labeled_mask=mask)
    own = np.array([0, -1, 1, -1, -1, -1])
    with pytest.raises(DataError, match=r"class 2 has no labeled training example \(the data marks its own labeled"):
        make_split(own, num_classes=3, labeled_fraction=0.5, has_test=True)
    with pytest.raises(DataError, match=r"^class 3 has no training example at all$"):  # no fraction helps
        make_split(np.repeat([0, 1, 2], 10), num_classes=4, labeled_fraction=0.5, has_test=True)
    with pytest.raises(DataError, match=r"^class 3 has no training example at all$"):  # nor does y = -1
        make_split(np.repeat([0, 1, 2], 10), num_classes=4, labeled_fraction=None, has_test=True)


def test_workers_beyond_a_thousand_are_refused_by_name(capsys):
    """``--workers 100000`` with DALI aborted in native code ("terminate called ...")."""
    with pytest.raises(SystemExit) as e:
        train_main(["--data", "digits", "--workers", "5000"])
    assert e.value.code == 2
    assert "argument --workers: expected a whole number from 0 to 1024, got 5000" in capsys.readouterr().err


# -- signals the run was started with ignored ------------------------------------------------------
def test_a_handler_leaves_an_ignored_signal_ignored():
    from llp_fast._signals import handled

    def handler(signum, frame):
        raise AssertionError("not this one")

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (nohup's)
    try:
        with handled((signal.SIGHUP, signal.SIGUSR1), handler):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGUSR1) is handler
            os.kill(os.getpid(), signal.SIGHUP)  # ignored, as asked
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


_IGNORING = (
    "import os, signal, sys\nfor s in (signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
    "os.execv(sys.executable, sys.argv[1:])"
)


def test_a_run_started_with_sigint_and_sighup_ignored_keeps_them_ignored(data, tmp_path):
    """``llp-fast-train ... &`` in a script starts with SIGINT ignored (a Ctrl-C meant for the script),
    ``nohup`` with SIGHUP ignored (the terminal closing): the run trains on through both (it had
    installed its own SIGINT handler over the ignored one and stopped). SIGTERM still stops it."""
    run = tmp_path / "run"
    args = train_args(data, run, epochs=200)
    cmd = [sys.executable, "-c", _IGNORING, sys.executable, "-m", "llp_fast.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def epochs_done(n):  # (whole lines of the metrics file)
        deadline, metrics = time.monotonic() + 240, run / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < n:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        return metrics.read_text().count("\n")

    done = epochs_done(1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGHUP)
    epochs_done(done + 2)  # two more epochs: it trained on
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == f"llp-fast-train: interrupted by signal 15; checkpoint saved in {run}; continue with: " + (
        f"llp-fast-train --resume {run}"
    )


# -- output that goes away -------------------------------------------------------------------------
def test_a_run_whose_log_reader_goes_away_checkpoints_and_stops(data, tmp_path):
    """``llp-fast-train ... 2>&1 | tee log`` with the reader gone: the next line printed raised
    BrokenPipeError and the run died, exit 1, without the checkpoint of its last steps. Now it stops
    as on SIGTERM (exit 130, a checkpoint), and resumed it ends as an uninterrupted run."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_main(train_args(data, whole, epochs=30)) == 0
    args = [a for a in train_args(data, run, epochs=30) if a != "--quiet"]
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "llp_fast.cli", *args], stdout=write, stderr=write)
    os.close(write)
    with os.fdopen(read, "rb") as log:
        for line in log:
            if line.startswith(b"[llp] epoch   1/30"):
                break
    assert proc.wait(timeout=240) == 130
    assert 1 <= checkpoint.peek(str(run))["epoch"] < 30  # (30 epochs: slack for a slow reader)
    _resumes_to(run, whole)


def _gone():
    """A pipe whose reader has gone: its write end."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("buffered", [True, False])
def test_a_tool_whose_output_goes_away_finishes_as_it_would_have(tmp_path, buffered):
    """llp-fast-propagate with its stdout gone: it said "interrupted; nothing was written" (exit 130)
    over the outputs it had written, or (a block-buffered stdout) "Exception ignored ... BrokenPipeError",
    status 120, at exit. Now it ends as it would have: exit 0, outputs written; an error, exit 2."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.normal(size=(300, 8)).astype(np.float32))
    np.save(tmp_path / "lab.npy", np.r_[[0, 1], np.full(298, -1)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "llp_fast.cli.propagate", str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
    gone = _gone()
    p = subprocess.run(
        [*cmd, "--out", str(tmp_path / "p.npy"), "--quiet"], stdout=gone, stderr=subprocess.PIPE, env=env
    )
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    assert np.load(tmp_path / "p.npy").shape == (300,)
    p = subprocess.run(
        [*cmd[:-2], str(tmp_path / "none.npy"), str(tmp_path / "lab.npy"), "--out", "q.npy"],
        stdout=gone,
        stderr=gone,
        env=env,
    )
    os.close(gone)
    assert p.returncode == 2


def test_a_lost_stream_goes_to_dev_null_and_asks_the_registered_stop_once():
    script = """
import os, sys
from llp_fast import _signals
from llp_fast.cli import _output
read, write = os.pipe()
os.dup2(write, 2)
os.close(write)
os.close(read)  # the reader gone
asked = []
with _output.guarded(), _signals.stop_on_lost_output(lambda: asked.append(1)):
    for n in range(3):
        print("line", n, file=sys.stderr, flush=True)  # (no BrokenPipeError)
    os.write(2, b"a native write\\n")  # (fd 2 is /dev/null now: no EPIPE)
    sys.stdout.write("stdout still here\\n")
with _signals.stop_on_lost_output(lambda: asked.append(2)):  # (registered after: asked at once)
    pass
print(asked, os.path.samefile("/proc/self/fd/2", os.devnull), sys.stderr is sys.__stderr__)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "stdout still here\n[1, 2] True True\n", (p.stdout, p.stderr)


def test_the_parent_death_signal_repeated_per_launcher_thread_is_one_stop(monkeypatch):
    """The kernel sends a rank its parent-death SIGTERM once per launcher *thread* that exits (the
    TCPStore's, then the main one): a launcher killed with SIGKILL made the ranks read two or three
    SIGTERMs as "interrupted twice" and give up the step's checkpoint. While the launcher lives, a
    second signal still gives up at once."""
    from llp_fast.distributed.collectives import LAUNCHER_ENV
    from llp_fast.errors import InterruptedTwice
    from llp_fast.train.stopping import Stopping

    monkeypatch.setenv(LAUNCHER_ENV, str(os.getppid() + 1))  # not our parent: the launcher is gone
    stop = Stopping(world=2)
    stop._on_signal(signal.SIGTERM, None)
    stop._on_signal(signal.SIGTERM, None)  # the second delivery: the same stop
    assert stop.signal == signal.SIGTERM
    with pytest.raises(InterruptedTwice):  # a Ctrl-C after it is the user's second signal
        stop._on_signal(signal.SIGINT, None)
    monkeypatch.setenv(LAUNCHER_ENV, str(os.getppid()))  # the launcher lives: two SIGTERMs are two
    stop = Stopping(world=2)
    stop._on_signal(signal.SIGTERM, None)
    with pytest.raises(InterruptedTwice):
        stop._on_signal(signal.SIGTERM, None)
    monkeypatch.delenv(LAUNCHER_ENV)  # one process, no launcher
    stop = Stopping(world=1)
    stop._on_signal(signal.SIGTERM, None)
    with pytest.raises(InterruptedTwice):
        stop._on_signal(signal.SIGTERM, None)
