"""``--nproc P``: one command as P local processes, watched, and a lost one told in one line.

This is ``torchrun --standalone --nproc-per-node P`` for the commands of this package, with their
error contract. The processes get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, a
rendezvous store that this process hosts, TORCHELASTIC_RESTART_COUNT, OMP_NUM_THREADS=1 unless
set), so the code under them is the code under torchrun, which remains the way to run on several
nodes. What differs is what happens when a rank is lost:

* A rank that dies (a signal, or an exit status that is none of the package's) or stops answering
  ends the command within the collective timeout (``--dist-timeout``). The others notice (a closed
  connection, or no answer within the timeout), exit quietly with
  :data:`llp_fast.distributed.collectives.PEER_LOST`, and after :data:`GRACE` seconds any that has not is
  killed. This process then prints one line: which rank, how it ended (the signal's name, the exit
  status, or "no answer in N s" for a rank that was still running when the others had given up on
  it), and what the command keeps (for training, the last checkpoint and the command that
  resumes). No torchrun report, no survivor's traceback.
* A rank that ends with an error it has explained itself (exit status 2, its one line printed) or
  on an interrupt (130) is not lost: the command ends with its status and no further word.
* ``max_restarts`` (``--max-restarts N``, torchrun's name and meaning): after a lost rank, the P
  processes start again, up to N times, with TORCHELASTIC_RESTART_COUNT counting; the command they
  run decides what a restart means (training resumes from its last checkpoint). A progress line
  says which rank was lost and where the work continues.

The processes run in their own session, so a Ctrl-C at the terminal reaches this process alone,
which hands it (and SIGTERM; SIGHUP, a closed terminal, as SIGTERM) on to each of them once: a
training run checkpoints at its next step. Until the command installs handlers of its own, a rank
that gets the signal ends at once, without a word, by the signal's default action
(:data:`BOOTSTRAP`); it counts as interrupted, not lost, and the others get :data:`GRACE` (they
may wait for it where no signal reaches them). Should this process die without a word (SIGKILL,
the OOM killer), each rank gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``) and stops as if
interrupted, instead of training on unwatched.

An error line that several ranks print alike (the same missing file, the same refused flag) is
printed once: the ranks write their lines to files that this process prints as each rank ends,
each distinct line once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .. import _files, distributed
from .._signals import ignored
from ..distributed.collectives import ERROR_LINES_ENV, INTERRUPTED_UNSAVED, LAUNCHER_ENV, PEER_LOST, QUIET_ENV

GRACE = 5.0  # seconds the other ranks get to notice a lost rank and end by themselves
EXPLAINED = (2, 130)  # a rank that printed its own error line, or was interrupted


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}" + (", its traceback above" if code == 1 else "")


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, a debugger): it will not end by itself."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


# What each rank runs before the command's module: the kernel's SIGTERM should this launcher die
# (Linux; a launcher already gone ends the rank at once), and until the command installs handlers
# of its own (training: its checkpointing one; propagate: at once) a handed-on signal ends the rank
# at once by its default action, which _verdict reads as an interrupt: as a KeyboardInterrupt it
# could land in imports or in C++ (pybind11's "terminate called ... KeyboardInterrupt", SIGABRT)
# and print tracebacks, and a Python handler (os._exit) waits while the rank is inside C++ (gloo's
# rendezvous: the other rank gone first, gloo printed "connectFullMesh failed" before it ran). The
# ranks start with the signals blocked (the launcher blocks them while it starts them, and a mask is
# inherited): one handed on while the interpreter itself starts waits until here (it was "Fatal
# Python error: init_import_site" and exit status 1, a lost rank).
BOOTSTRAP = f"""
import os, runpy, signal, sys
from llp_fast.cli._common import die_with_parent
die_with_parent(int(os.environ["{LAUNCHER_ENV}"]))
handed = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
for s in handed:
    signal.signal(s, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, handed)
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""
_HANDED_ON = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _spawn(
    nproc: int, module: str, argv: list[str], attempt: int, max_restarts: int, port: int, lines: str | None
) -> list:
    env = dict(os.environ, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", GROUP_WORLD_SIZE="1")
    env.update(ROLE_NAME="default", ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(attempt))
    env.update(TORCHELASTIC_MAX_RESTARTS=str(max_restarts), TORCHELASTIC_RUN_ID=f"llp-fast-{os.getpid()}")
    env[QUIET_ENV] = "1"
    if lines:
        env[ERROR_LINES_ENV] = lines
    else:
        env.pop(ERROR_LINES_ENV, None)
    env[LAUNCHER_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: P processes share the cores
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's socket warnings when a peer is gone: the line says it
    procs = []
    for rank in range(nproc):
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
        cmd = [sys.executable, "-c", BOOTSTRAP, module, *argv]
        procs.append(subprocess.Popen(cmd, env=dict(env), start_new_session=True))
    return procs


def _watch(procs: list, timeout: float, handed=(), lines=None) -> tuple[dict[int, int], list[int], bool]:
    """Waits until every rank has ended, or the others have had their chance to after one failed;
    kills what is left. Returns ({rank: exit status} of the ranks that ended, ranks killed here,
    whether they were killed after :data:`GRACE` because of an interrupted rank with nothing to
    save). ``handed``: the signals handed on so far (read as it grows); after a rank they ended
    before its handler, or one interrupted with nothing to save (:data:`INTERRUPTED_UNSAVED`), the
    others get :data:`GRACE`: they may wait for it where no signal reaches them. ``lines``: a
    :class:`_Lines` whose ranks' lines are printed as each ends. A second signal handed on gives
    up on the ranks after :data:`GRACE` (one may hang in a collective, where no signal reaches it:
    the command waited out the collective timeout)."""
    ended: dict[int, int] = {}
    since, unstarted, twice = None, False, None
    while len(ended) < len(procs):
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = p.returncode
                if lines is not None:
                    lines.flush([rank])
        failed = [c for c in ended.values() if c != 0]
        if failed and len(ended) < len(procs):
            since = since or time.monotonic()
            left = [p for r, p in enumerate(procs) if r not in ended]
            # An orderly stop (an interrupt, an explained error) may still be writing a checkpoint:
            # the others end within the collective timeout. A stopped process never ends.
            unstarted = any(c == INTERRUPTED_UNSAVED or (c < 0 and -c in handed) for c in failed)
            wait = timeout + GRACE if all(c in EXPLAINED for c in failed) and not unstarted else GRACE
            if all(_stopped(p.pid) for p in left) or time.monotonic() - since > wait:
                break
        if len(handed) > 1:
            twice = twice or time.monotonic()
            if time.monotonic() - twice > GRACE:
                break
        time.sleep(0.05)
    killed = [r for r in range(len(procs)) if r not in ended]
    for r in killed:
        procs[r].kill()  # SIGKILL ends a stopped process too
        procs[r].wait()
    # after a second signal the ranks killed here were cut short too: interrupted, not lost
    return ended, killed, bool(killed) and (unstarted or len(handed) > 1)


def _verdict(
    ended: dict[int, int], killed: list[int], timeout: float, handed=(), *, cut: bool = False
) -> tuple[int, str | None]:
    """(exit status of the command, the line about the lost rank(s), None when none was lost).
    ``handed``: the signals handed on to the ranks; a rank they ended, or one interrupted with
    nothing to save (:data:`INTERRUPTED_UNSAVED`), was interrupted (130). ``cut``: the ranks
    killed here were cut short after such a rank (waiting for it where no signal reaches them):
    interrupted too; otherwise a killed rank stopped answering and is lost."""
    ended = {r: 130 if c == INTERRUPTED_UNSAVED or (c < 0 and -c in handed) else c for r, c in ended.items()}
    if cut:
        ended.update({r: 130 for r in killed})
        killed = []
    lost = {r: c for r, c in ended.items() if c not in (0, PEER_LOST, *EXPLAINED)}
    if lost:
        return 1, ", ".join(f"rank {r} was lost ({_how(c)})" for r, c in sorted(lost.items()))
    silent = f"no answer in {timeout:g} s"
    if killed:
        return 1, ", ".join(f"rank {r} was lost ({silent})" for r in killed)
    codes = set(ended.values())
    for code in EXPLAINED:
        if code in codes:
            return code, None
    if codes == {0}:
        return 0, None
    return 1, f"the ranks lost contact with each other ({silent})"


def run(nproc: int, module: str, argv: list[str], *, prog: str, max_restarts: int = 0, kept=None, resuming=None):
    """``python -m module *argv`` as ``nproc`` local ranks; returns the command's exit status.
    ``kept()``: what the command keeps after a lost rank (for the final line); ``resuming()``:
    where a restart continues (for the progress line)."""
    import torch.distributed as dist

    timeout = distributed.timeout_seconds()
    procs: list = []
    interrupted = []
    sweep_lines()
    try:
        lines = _Lines(tempfile.mkdtemp(prefix=f"{LINES_PREFIX}{os.getpid()}-"))
    except OSError:  # no room for the folder (a full /tmp): the ranks print their own lines
        lines = _Lines(None)

    def forward(signum, frame):
        signum = signal.SIGTERM if signum == signal.SIGHUP else signum  # the ranks stop as on SIGTERM
        interrupted.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # (one this command was started with ignored, nohup's SIGHUP say, stays ignored: _signals.ignored)
    previous = {sig: signal.signal(sig, forward) for sig in _HANDED_ON if not ignored(sig)}
    try:
        for attempt in range(max_restarts + 1):
            # Blocked until procs holds every rank, and before the store starts its thread (which
            # inherits the mask): a signal delivered there, or before procs was set, reached no rank.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDED_ON)
            try:
                store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
                procs[:] = _spawn(nproc, module, argv, attempt, max_restarts, store.port, lines.folder)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            ended, killed, cut = _watch(procs, timeout, interrupted, lines)
            del store
            lines.flush(range(nproc))
            rc, lost = _verdict(ended, killed, timeout, interrupted, cut=cut)
            if lost is None:
                if rc == 130 and not lines.seen:  # ended before a word: while starting, or a rank signalled alone
                    note = kept() if kept else "nothing was written"
                    print(f"{prog}: interrupted; {note}", file=sys.stderr, flush=True)
                return rc
            if attempt < max_restarts and not interrupted:
                where = resuming() if resuming else "starting again"
                print(f"{prog}: {lost}; restart {attempt + 1} of {max_restarts}: {where}", file=sys.stderr, flush=True)
                continue
            note = kept() if kept else ""
            print(f"{prog}: error: {lost}{'; ' + note if note else ''}", file=sys.stderr, flush=True)
            return rc
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if lines.folder:
            shutil.rmtree(lines.folder, ignore_errors=True)


LINES_PREFIX = "llp-fast-lines-"  # the lines folder: $TMPDIR/llp-fast-lines-<launcher pid>-<random>


def sweep_lines(directory: str | None = None) -> list[str]:
    """Removes the lines folders (``LINES_PREFIX<pid>-...``, this user's) of launchers that no longer
    run: a launcher killed (SIGKILL, a lost machine) leaves its folder, which each launcher's start
    then removes. Returns what it removed; never raises."""
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name[len(LINES_PREFIX) :].split("-", 1)[0]
        if not name.startswith(LINES_PREFIX) or not pid.isdigit() or _files.alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        try:
            if not os.path.isdir(path) or os.path.islink(path) or os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


class _Lines:
    """The ranks' error and interrupt lines (``folder/<rank>``, None: the ranks print their own),
    each distinct one printed once, in the order the ranks end (then rank order): a rank's lines as
    soon as it ends, not when the last one does (which can be the collective timeout later)."""

    def __init__(self, folder: str | None):
        self.folder, self.seen = folder, set()

    def flush(self, ranks) -> None:
        if not self.folder:
            return
        for rank in ranks:
            path = os.path.join(self.folder, str(rank))
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                os.remove(path)  # a restart's ranks write their own
            except OSError:
                continue
            for line in text.splitlines():
                if line and line not in self.seen:
                    self.seen.add(line)
                    print(line, file=sys.stderr, flush=True)
