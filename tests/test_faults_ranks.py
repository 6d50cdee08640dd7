"""A lost rank under ``--nproc`` (llp_fast/cli/workers.py): one line naming the rank and how it
ended, quiet survivors, and ``--max-restarts`` that resumes by itself to the uninterrupted result.

The runs are llp-fast-train on a small npz written here, two gloo processes, one thread each. The
launcher's verdicts and the survivors' reading of gloo's errors are also checked directly."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_faults import temporaries, tiny_npz, train_args, untimed

from llp_fast.cli import workers
from llp_fast.distributed import collectives as comm
from llp_fast.train import checkpoint
from llp_fast.train.report import read_metrics

# gloo processes killed and stopped on purpose: a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (their RANK variable)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != launcher:
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                for var in f.read().split(b"\0"):
                    if var.startswith(b"RANK="):
                        found[int(var[5:])] = int(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def _train(argv, fault=None, timeout=300):
    """``llp-fast-train argv`` in a child; ``fault = (signal, rank, ready)`` sends the signal to
    that rank once ``ready()`` holds. Returns (CompletedProcess-like, seconds from the signal to
    the end, the signalled pid)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llp_fast.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    sent, pid, deadline = None, None, time.monotonic() + timeout
    while fault is not None and sent is None and proc.poll() is None and time.monotonic() < deadline:
        sig, rank, ready = fault
        if ready():
            pid = _ranks(proc.pid).get(rank)
            if pid is not None:
                os.kill(pid, sig)
                sent = time.monotonic()
        time.sleep(0.01)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    ended = time.monotonic()
    assert fault is None or sent is not None, f"the run ended before the fault: {err.decode()[-2000:]}"
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    return result, (ended - sent if sent else None), pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def _checkpointed(run):
    return lambda: os.path.exists(os.path.join(run, "checkpoint.pt"))


@pytest.mark.slow
def test_max_restarts_survives_a_killed_rank_with_the_uninterrupted_accuracy(data, tmp_path):
    """Rank 1 SIGKILLed after the first checkpoint: the launcher says so in one progress line,
    starts both processes again, and they resume from the checkpoint by themselves; the run ends
    with exactly the metrics of the same run uninterrupted (same P, resume is exact)."""
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    ref, _, _ = _train([*train_args(data, whole), "--nproc", "2"])
    assert ref.returncode == 0 and ref.stderr == "", ref.stderr[-3000:]
    res, _, _ = _train(
        [*train_args(data, cut), "--nproc", "2", "--max-restarts", "1"],
        fault=(signal.SIGKILL, 1, _checkpointed(cut)),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"llp-fast-train: rank 1 was lost \(killed by SIGKILL\); restart 1 of 1: resuming from the checkpoint "
        r"of epoch 1( and \d+ steps? of epoch 2)?",
        lines[0],
    ), res.stderr  # no survivor's traceback, no torchrun report
    assert untimed(read_metrics(os.path.join(cut, "metrics.jsonl"))) == untimed(
        read_metrics(os.path.join(whole, "metrics.jsonl"))
    )
    assert res.stdout.split(" | ")[:3] == ref.stdout.split(" | ")[:3]  # the same held-out top-1 line
    assert not temporaries(cut)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_in_one_line_within_the_timeout(data, tmp_path):
    """Rank 1 SIGSTOPped after the first checkpoint, ``--dist-timeout 2``: rank 0 gives up on it
    after 2 s and exits quietly; the command names rank 1, the last checkpoint and the command
    that resumes, and leaves no process behind."""
    run = str(tmp_path / "run")
    res, seconds, pid = _train(
        [*train_args(data, run), "--nproc", "2", "--dist-timeout", "2"],
        fault=(signal.SIGSTOP, 1, _checkpointed(run)),
    )
    kept = checkpoint.describe(checkpoint.peek(run))
    assert res.returncode == 1
    assert res.stderr == (
        f"llp-fast-train: error: rank 1 was lost (no answer in 2 s); the last complete checkpoint ({kept}) is "
        f"intact; continue with: llp-fast-train --resume {run} --nproc 2\n"
    )
    assert seconds < 2 + workers.GRACE + 10, seconds  # the timeout, then no wait for a stopped process
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stopped rank was ended, not left behind
    assert not temporaries(run)


@pytest.mark.slow
def test_a_second_ctrl_c_ends_the_command_while_a_rank_hangs(data, tmp_path):
    """Rank 1 SIGSTOPped (hung) after the first checkpoint, then Ctrl-C twice: rank 0 waits in a
    collective where no signal reaches it, and the command waited out the collective timeout (600
    s). Now the second signal gives up on the ranks after the launcher's grace: exit 130, one line
    naming the checkpoint, no process left."""
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [*train_args(data, run, epochs=40), "--nproc", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llp_fast.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 300
    while not _checkpointed(run)() or len(_ranks(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.02)
    ranks = _ranks(proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=workers.GRACE + 60)
    assert time.monotonic() - sent < workers.GRACE + 30
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    # (rank 0 says it itself where the second signal found it between collectives, as it can)
    assert len(err.splitlines()) == 1 and re.fullmatch(
        rf"llp-fast-train: interrupted; the last complete checkpoint \(epoch \d+\) is intact; continue with: "
        rf"llp-fast-train --resume {re.escape(run)} --nproc 2\n"
        rf"|llp-fast-train: interrupted twice; the last complete checkpoint \(epoch \d+\) is intact; continue with: "
        rf"llp-fast-train --resume {re.escape(run)} --nproc 2\n",
        err,
    ), err
    for pid in ranks.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_under_nohup_the_launcher_leaves_sighup_ignored(data, tmp_path):
    """``nohup llp-fast-train --nproc 2 ... &``: the launcher handed SIGHUP (the terminal closing) on
    to the ranks as SIGTERM over nohup's SIG_IGN, and the run stopped. Now it trains on; SIGTERM
    still stops it (llp_fast/_signals.py)."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nohup = (
        "import os, signal, sys\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\nos.execv(sys.executable, sys.argv[1:])"
    )
    argv = [*train_args(data, str(run), epochs=200), "--nproc", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", nohup, sys.executable, "-m", "llp_fast.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    metrics = run / "metrics.jsonl"

    def epochs_done(n):  # (whole lines of rank 0's metrics file)
        deadline = time.monotonic() + 300
        while not metrics.exists() or metrics.read_text().count("\n") < n:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        return metrics.read_text().count("\n")

    done = epochs_done(1)
    proc.send_signal(signal.SIGHUP)
    epochs_done(done + 2)  # two more epochs: it trained on
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    # (sent as an epoch's metrics line appears, the signal may find the ranks in the pass after it,
    # where they stand at their last checkpoint and stop at once, saying so: both lines resume)
    said = "checkpoint saved in" in err or "the last complete checkpoint (epoch" in err
    assert said and "--resume" in err, err[-3000:]


@pytest.mark.slow
def test_a_run_with_its_baseline_resumes_under_nproc_without_it(data, tmp_path):
    """A one-process run with the baseline beside it, resumed with ``--nproc 2``: it was refused
    naming ``--baseline off``, a flag the user never gave (the launcher had set it). Now it resumes,
    saying once that the baseline stays where it was; and an error under ``--nproc`` is its one
    line (the baseline note came before it on every start)."""
    run = str(tmp_path / "run")
    res, _, _ = _train(["on" if a == "off" else a for a in train_args(data, run, epochs=1)])  # --baseline on
    assert res.returncode == 0 and os.path.isdir(os.path.join(run, "baseline")), res.stderr[-3000:]
    res, _, _ = _train(["--resume", run, "--epochs", "2", "--nproc", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("no supervised-only baseline under torch.distributed: baseline/ stays as it is") == 1
    assert checkpoint.peek(run)["epoch"] == 2
    res, _, _ = _train(["--data", f"npz:{tmp_path / 'missing.npz'}", "--run-dir", str(tmp_path / "m"), "--nproc", "2"])
    assert res.returncode == 2 and res.stderr == f"llp-fast-train: error: no such file: {tmp_path / 'missing.npz'}\n"


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
def test_a_propagate_rank_signalled_alone_is_one_interrupt_line(tmp_path):
    """SIGTERM to one rank of ``llp-fast-propagate --nproc 2`` (not to the command): it ended with
    exit 130 and no word at all (only rank 0 prints, and only a signal to the launcher was said)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32))
    y = rng.integers(0, 5, 60000)
    np.save(tmp_path / "emb.npy", (centres[y] + 0.5 * rng.normal(size=(60000, 32))).astype(np.float32))
    labels = np.full(60000, -1)
    labels[:600] = y[:600]
    np.save(tmp_path / "lab.npy", labels)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "llp_fast.cli.propagate", str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
    cmd += ["--out", str(tmp_path / "p.npy"), "--nproc", "2", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    # until rank 1 handles SIGTERM (its run has begun: before, the signal killed it, "rank 1 was lost")
    while len(ranks := _ranks(proc.pid)) < 2 or not _catches_sigterm(ranks[1]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.02)
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.decode() == "llp-fast-propagate: interrupted; nothing was written\n", err
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy"]


# -- the launcher's verdicts and the survivors' reading of errors, directly ------------------------
@pytest.mark.parametrize(
    "ended,killed,want",
    [
        ({0: 0, 1: 0}, [], (0, None)),
        ({0: comm.PEER_LOST, 1: -9}, [], (1, "rank 1 was lost (killed by SIGKILL)")),
        ({1: -6}, [0], (1, "rank 1 was lost (killed by SIGABRT)")),  # the dead rank, not the one we ended
        ({0: comm.PEER_LOST}, [1], (1, "rank 1 was lost (no answer in 20 s)")),
        ({0: 1, 1: comm.PEER_LOST}, [], (1, "rank 0 was lost (exited with status 1, its traceback above)")),
        ({0: 2, 1: comm.PEER_LOST}, [], (2, None)),  # rank 0 printed its own error line
        ({0: 130, 1: 130}, [], (130, None)),  # an interrupt: rank 0 said where the checkpoint is
        ({0: comm.PEER_LOST, 1: comm.PEER_LOST}, [], (1, "the ranks lost contact with each other (no answer in 20 s)")),
    ],
)
def test_the_launcher_names_the_lost_rank_and_how_it_ended(ended, killed, want):
    assert workers._verdict(ended, killed, 20.0) == want


def test_a_rank_ended_by_the_signal_handed_on_to_it_was_interrupted_not_lost():
    """A Ctrl-C or SIGTERM handed on while a rank was still starting (before its handler) ended it
    by that signal: it read "rank 0 was lost (killed by SIGINT)"."""
    assert workers._verdict({0: -2, 1: -2}, [], 20.0, [signal.SIGINT]) == (130, None)
    assert workers._verdict({0: -15, 1: 130}, [], 20.0, [signal.SIGTERM]) == (130, None)
    assert workers._verdict({0: -9, 1: -2}, [], 20.0, [signal.SIGINT]) == (1, "rank 0 was lost (killed by SIGKILL)")
    assert workers._verdict({0: -2, 1: 0}, [], 20.0) == (1, "rank 0 was lost (killed by SIGINT)")  # not handed on
    # the others killed after GRACE, waiting for a rank interrupted with nothing to save: interrupted
    assert workers._verdict({0: comm.INTERRUPTED_UNSAVED}, [1], 20.0, [signal.SIGINT], cut=True) == (130, None)
    # a rank that stops answering after a Ctrl-C, killed after the whole timeout: still lost
    assert workers._verdict({0: 130}, [1], 20.0, [signal.SIGINT]) == (1, "rank 1 was lost (no answer in 20 s)")


def test_the_ranks_error_lines_are_printed_once_each_in_rank_order(tmp_path, capsys):
    """Every rank printed the same missing file: P identical lines under --nproc P."""
    for rank, text in ((0, "tool: error: no such file: x\n"), (1, "tool: error: no such file: x\n"), (2, "b\na\n")):
        (tmp_path / str(rank)).write_text(text)
    lines = workers._Lines(str(tmp_path))
    lines.flush([1])  # rank 1 ended first: its line at once
    assert capsys.readouterr().err == "tool: error: no such file: x\n"
    lines.flush(range(4))  # rank 3 wrote nothing
    assert capsys.readouterr().err == "b\na\n"
    assert os.listdir(tmp_path) == [] and lines.seen == {"tool: error: no such file: x", "a", "b"}


def _launch(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "llp_fast.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def test_an_error_every_rank_meets_is_one_line(tmp_path):
    proc = _launch(
        ["--data", f"npz:{tmp_path}/missing.npz", "--run-dir", str(tmp_path / "r"), "--nproc", "2", "--quiet"]
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err == f"llp-fast-train: error: no such file: {tmp_path}/missing.npz\n", err


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_a_ctrl_c_while_the_ranks_start_is_an_interrupt_in_one_line(data, tmp_path, delay):
    """It was a KeyboardInterrupt traceback from each starting rank (or "Fatal Python error:
    init_import_site") and "rank 0 was lost (killed by SIGINT)"."""
    run = tmp_path / "run"
    proc = _launch([*train_args(data, run, epochs=50), "--nproc", "2"])
    deadline = time.monotonic() + 60
    while len(_ranks(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("llp-fast-train: interrupted"), err


def test_ranks_stop_when_their_launcher_is_killed(data, tmp_path):
    """SIGKILL of the launcher (the OOM killer): its ranks trained on to the last epoch unwatched."""
    run = tmp_path / "run"
    proc = _launch([*train_args(data, run, epochs=200), "--nproc", "2"])
    deadline = time.monotonic() + 120
    while not os.path.exists(run / "checkpoint.pt") and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = _ranks(proc.pid)
    assert len(ranks) == 2, ranks
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 60
    alive = set(ranks.values())
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        alive.discard(pid)
            except (ProcessLookupError, FileNotFoundError):
                alive.discard(pid)
        time.sleep(0.1)
    assert not alive, f"ranks {alive} still run after their launcher was killed"


def _raised_from(filename: str, text: str) -> RuntimeError:
    """A RuntimeError whose traceback passes through a frame of ``filename``, as one raised by
    torch.distributed's own code would."""
    code = compile(f"raise RuntimeError({text!r})", os.path.join("site-packages", filename), "exec")
    try:
        exec(code, {})
    except RuntimeError as e:
        return e
    raise AssertionError("not raised")


def test_a_survivor_reads_gloos_errors_as_a_lost_peer_and_a_bug_as_a_bug(monkeypatch):
    closed = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:49827. "
        "This is typically caused by a remote worker crashing. GLHF!"
    )
    silent = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"
    )
    bug = RuntimeError("Tensors must be contiguous")  # a misused collective: keeps its traceback
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not comm.peer_lost(closed)  # alone, nothing is a lost peer
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert comm.peer_lost(closed) and comm.peer_lost(silent) and not comm.peer_lost(bug)
    # gloo's words for a peer that stopped answering, raised from DDP's buffer broadcast: no "gloo" in the text
    assert comm.peer_lost(RuntimeError("Application timeout caused pair closure"))
    assert comm.peer_lost(_raised_from("torch/distributed/distributed_c10d.py", "Socket Timeout"))
    assert not comm.peer_lost(RuntimeError("Socket Timeout"))  # the same words from elsewhere: not ours
    assert not comm.peer_lost(_raised_from("torch/distributed/distributed_c10d.py", "Tensors must be contiguous"))
    assert not comm.peer_lost(OSError(errno.ECONNRESET, "reset"))
    monkeypatch.setenv(comm.QUIET_ENV, "1")
    assert comm.lost_line("llp-fast-train", closed) is None  # under --nproc: the launcher speaks
    monkeypatch.delenv(comm.QUIET_ENV)
    assert comm.lost_line("llp-fast-train", closed) == (
        "llp-fast-train: error: rank 0 lost contact with the other ranks (Connection closed by peer [127.0.0.1]:49827)"
    )


def test_dist_timeout_is_a_flag_of_both_tools_and_the_variable_its_default(monkeypatch, capsys):
    from llp_fast.cli import _common
    from llp_fast.cli.propagate_args import parser as propagate_parser
    from llp_fast.cli.train import main as train_main
    from llp_fast.cli.train import parser as train_parser

    for ap in (train_parser(), propagate_parser()):
        dest = {a.dest: a for a in ap._actions}["dist_timeout"]
        assert dest.option_strings == ["--dist-timeout"] and dest.default is None
    monkeypatch.delenv(comm.TIMEOUT_ENV, raising=False)
    assert comm.timeout_seconds() == 600
    monkeypatch.setenv(comm.TIMEOUT_ENV, "20")
    assert comm.timeout_seconds() == 20
    _common.set_dist_timeout(7.5)
    assert comm.timeout_seconds() == 7.5
    monkeypatch.setenv(comm.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LLP_FAST_DIST_TIMEOUT='soon'"):
        comm.timeout_seconds()
    # 1e10 s: a false "no answer in 1e+10 s" at once; 1e11: a hang nothing ended; 1e15: an OverflowError a rank
    monkeypatch.setenv(comm.TIMEOUT_ENV, "1e11")
    with pytest.raises(
        ValueError, match=r"LLP_FAST_DIST_TIMEOUT='1e11': expected a number of seconds above 0 and at most"
    ):
        comm.timeout_seconds()
    monkeypatch.setenv(comm.TIMEOUT_ENV, "604800")
    assert comm.timeout_seconds() == 604800
    for bad in (["--dist-timeout", "0"], ["--dist-timeout", "1e10"], ["--max-restarts", "1"]):  # (needs --nproc P)
        with pytest.raises(SystemExit) as e:
            train_main(bad)
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_a_killed_launchers_lines_folder_is_swept_by_the_next(tmp_path):
    """A launcher killed by SIGKILL leaves its lines folder in $TMPDIR; the next launcher's start
    removes the folders of launchers that no longer run, and only those."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = workers.LINES_PREFIX
    names = {
        f"{p}{dead.pid}-abc": False,  # its launcher is gone: swept, with what it holds
        f"{p}{os.getpid()}-def": True,  # a running launcher's
        f"{p}{os.getppid()}-ghi": True,
        f"{p}x{dead.pid}-jkl": True,  # not a pid
        "other-folder": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "0").write_text("a line\n")
    (tmp_path / f"{p}{dead.pid}-file").write_text("a file, not a folder of ours")
    removed = workers.sweep_lines(str(tmp_path))
    assert [os.path.basename(r) for r in removed] == [f"{p}{dead.pid}-abc"]
    assert sorted(os.listdir(tmp_path)) == sorted([n for n, keep in names.items() if keep] + [f"{p}{dead.pid}-file"])


def test_a_process_started_with_sigint_blocked_and_one_that_dies_with_its_parent():
    """The baseline beside an LLP run: started deaf to the terminal's Ctrl-C (one that reached it
    while it started printed multiprocessing's traceback), and ended by the kernel's SIGTERM when
    the LLP process dies (it trained on unattended)."""
    from llp_fast.cli import _common

    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C meanwhile: delivered here at the end, not lost
        with _common.sigint_blocked():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            os.kill(os.getpid(), signal.SIGINT)
    try:
        with open(f"/proc/{child.pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked & (1 << (signal.SIGINT - 1))
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # unblocked here
    finally:
        child.kill()
        child.wait()
    middle = (
        "import subprocess, sys\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import os, time; from llp_fast.cli import _common; "
        "_common.die_with_parent(os.getppid()); print(flush=True); time.sleep(60)'], stdout=subprocess.PIPE)\n"
        "c.stdout.readline(); print(c.pid, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True, env=env, timeout=120)
    pid = int(out.stdout)  # the middle process has exited: its child must follow
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def test_a_batch_that_the_processes_do_not_split_evenly_is_said():
    """``--batch-size 32 --nproc 3`` trained on 30 a step while the first line said batch 32; a
    batch of 4 over 13 processes on 13."""
    from types import SimpleNamespace

    from llp_fast.train.api import _say_split_batches

    def notes(world, batch, labeled=0):
        trainer = SimpleNamespace(world=world, cfg=SimpleNamespace(batch_size=batch, labeled_batch=labeled), notes=[])
        _say_split_batches(trainer)
        return trainer.notes

    assert notes(1, 33) == notes(2, 32) == notes(4, 32, 8) == []
    assert notes(3, 32) == [
        "--batch-size 32 does not split evenly over 3 processes: 10 examples each, 30 a step in all "
        "(a multiple of 3 keeps the step at --batch-size)"
    ]
    assert notes(13, 4) == [
        "--batch-size 4 does not split evenly over 13 processes: 1 example each, 13 a step in all "
        "(a multiple of 13 keeps the step at --batch-size)"
    ]
    assert [n.split(":")[0] for n in notes(3, 30, 8)] == ["--labeled-batch 8 does not split evenly over 3 processes"]
