"""Progress output: a tqdm bar with rate and ETA on a terminal, plain lines in a file, nothing when
quiet (llp_fast._progress, used by the trainer and the tools)."""

import io
import os
import pty
import subprocess
import sys

import pytest
from conftest import TINY_ARGS

from llp_fast._progress import Progress, reporter

# runs llp-fast-train in child processes (tiny networks, one thread)
pytestmark = pytest.mark.isolated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*TINY_ARGS, "--threads", "1", "--baseline", "off"]


def test_file_stream_gets_plain_lines_and_no_bar():
    buf = io.StringIO()
    p = Progress(stream=buf, prog="tool")
    with p.bar(10, "work", "img") as bar:
        report = reporter(bar)
        for i in range(1, 11):
            report(i, 10)
    p.line("done")
    assert buf.getvalue() == "tool: done\n"


def test_quiet_writes_nothing():
    buf = io.StringIO()
    p = Progress(enabled=False, stream=buf)
    with p.bar(3, "work") as bar:
        bar.update(3)
    p.line("done")
    assert buf.getvalue() == ""


def test_terminal_gets_a_bar_with_rate_and_eta():
    master, slave = pty.openpty()
    try:
        stream = os.fdopen(slave, "w", buffering=1)
        p = Progress(stream=stream)
        assert p.tty
        with p.bar(5, "work", "img") as bar:
            for _ in range(5):
                bar.update(1)
        p.line("finished")
        stream.close()  # the child side: once closed, reading the master ends at the last byte
        out = _read_all(master)
    finally:
        os.close(master)
    assert "work" in out and "\r" in out and "img/s" in out and "<" in out  # tqdm's rate and ETA
    assert "finished" in out


def _read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)  # a pty hands out at most a few KB per read
        except OSError:  # EIO: the other side is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _train(run_dir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "llp_fast.cli", "--run-dir", str(run_dir), *extra, *TINY],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_in_a_file(tmp_path_factory):
    """One tiny training run with its output in a file (a pipe): what it printed, and its run
    directory (the tools below read its checkpoint)."""
    run = tmp_path_factory.mktemp("train") / "r"
    proc = _train(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, run


def test_training_run_in_a_file_has_epoch_lines_and_no_redraws(run_in_a_file, tmp_path):
    proc, _ = run_in_a_file
    assert "[llp] epoch   1/1" in proc.stderr and "\r" not in proc.stderr
    quiet = _train(tmp_path / "q", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_training_run_on_a_terminal_draws_bars(tmp_path):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llp_fast.cli", "--run-dir", str(tmp_path / "r"), *TINY],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=_env(),
        )
        os.close(slave)
        out = _read_all(master)
        assert proc.wait(timeout=600) == 0
    finally:
        os.close(master)
    assert "epoch 1/1" in out and "\r" in out  # the bar, redrawn in place
    assert "[llp] epoch   1/1" in out  # and the summary line above it


def test_a_training_run_says_which_implementation_serves_each_op(run_in_a_file):
    proc, _ = run_in_a_file
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("llp-fast-train: LLP+ on digits")
    assert any(line.startswith("llp-fast-train: defaults from it: ") for line in lines[1:4])  # and why
    backends = [line for line in lines if line.startswith("llp-fast-train: llp_fast backends: cpu: ")]
    assert len(backends) == 1 and "propagate" in backends[0]


@pytest.fixture(scope="module")
def tool_inputs(tmp_path_factory, run_in_a_file):
    """(a folder with a pool of 300 digit images and 3,000 random embeddings with 30 labels, the tiny
    trained run): enough work for each tool to show its progress."""
    import numpy as np
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("tools")
    d = load_digits()
    x = np.clip(np.rint(d.images[:300] * 255 / 16), 0, 255).astype(np.uint8)
    np.savez(tmp / "pool.npz", x=x, y=d.target[:300])
    rng = np.random.default_rng(0)
    np.save(tmp / "emb.npy", rng.standard_normal((3000, 16)).astype(np.float32))
    labels = np.full(3000, -1, np.int64)
    labels[:30] = np.arange(30) % 3
    np.save(tmp / "lab.npy", labels)
    return tmp, run_in_a_file[1]


TOOLS = {
    # the tool's module, its arguments, and what its bar counts
    "propagate": (
        "llp_fast.cli.propagate",
        lambda t, run, out: [str(t / "emb.npy"), str(t / "lab.npy"), "--out", str(out / "p.npy"), "--chunk", "500"],
        "rows",
    ),
    "select": (
        "llp_fast.cli.select",
        lambda t, run, out: [str(run), "--source", f"npz:{t / 'pool.npz'}", "--out", str(out / "s.npz")],
        "img",
    ),
    "linear-probe": (
        "llp_fast.cli.probe",
        lambda t, run, out: [str(run), "--data", "digits", "--epochs", "2", "--out", str(out / "r.json")],
        "img",
    ),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_tool_shows_progress_on_a_terminal_lines_in_a_file_and_nothing_when_quiet(tool, tool_inputs, tmp_path):
    module, args, unit = TOOLS[tool]
    cmd = [sys.executable, "-m", module, *args(*tool_inputs, tmp_path), "--threads", "1"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_env())
        os.close(slave)
        tty = _read_all(master)
        assert proc.wait(timeout=600) == 0, tty[-2000:]
    finally:
        os.close(master)
    assert "\r" in tty and f"{unit}/s" in tty and "<" in tty, tty[-2000:]  # a bar: redrawn, rate, ETA

    in_file = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert in_file.returncode == 0, in_file.stderr[-2000:]
    assert "\r" not in in_file.stdout + in_file.stderr and f"{unit}/s" not in in_file.stderr  # no bar

    quiet = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, env=_env(), timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
