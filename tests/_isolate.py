"""Runs test modules marked ``isolated`` in a child pytest process.

Code that can crash natively (the C++ extension on odd shapes, oneDNN under odd thread and ISA
settings, gloo's teardown) aborts the whole interpreter when it fails: in-process, one such
failure would end the test run with no report. A module marked with
``pytestmark = pytest.mark.isolated`` is instead run, once, in a child ``pytest``; its reports
travel back through pytest's own report (de)serialisation hooks (the way pytest-xdist moves
them) and are logged here as if the tests had run in this process. When the child dies, the
test it was running fails with the signal and the tail of the child's output, and the module's
remaining tests run in a fresh child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

CHILD_ENV = "LLP_FAST_ISOLATED_CHILD"  # set in the child: run the tests in-process
LOG_ENV = "LLP_FAST_ISOLATED_LOG"  # the child's report file (JSON lines)


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


# -- the child: write every report to the log file ---------------------------------------------
def child_logstart(nodeid: str) -> None:
    _append({"start": nodeid})


def child_logreport(config, report) -> None:
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    _append({"report": data})


def _append(entry: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


# -- the parent: run a module's marked tests in children, replay their reports ----------------
class Isolator:
    def __init__(self, config):
        self.config = config
        self.results: dict[str, list] = {}  # nodeid -> reports
        self.done_paths: set[str] = set()

    def run_protocol(self, item) -> bool:
        path = str(item.path)
        if path not in self.done_paths:
            self.done_paths.add(path)
            siblings = [i for i in item.session.items if str(i.path) == path and i.get_closest_marker("isolated")]
            self._run_children(item, [i.nodeid for i in siblings])
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.results.pop(item.nodeid, None)
        if reports is None:
            reports = [self._failed(item, "the child pytest process reported nothing for this test", "call")]
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_children(self, item, nodeids: list[str]) -> None:
        remaining = list(nodeids)
        attempt = 0
        while remaining:
            attempt += 1
            base = item.config._tmp_path_factory.mktemp(f"isolated-{item.path.stem}-{attempt}", numbered=True)
            log = base / "reports.jsonl"
            env = dict(os.environ, **{CHILD_ENV: "1", LOG_ENV: str(log)})
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base / 'tmp'}"]
            proc = subprocess.run(
                [*cmd, *remaining], cwd=str(item.config.rootpath), env=env, capture_output=True, text=True
            )
            started, finished = None, set()
            for line in log.read_text().splitlines() if log.exists() else []:
                entry = json.loads(line)
                if "start" in entry:
                    started = entry["start"]
                    continue
                rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=entry["report"])
                if isinstance(rep.longrepr, list):  # a skip's (path, line, reason) tuple, listed by JSON
                    rep.longrepr = tuple(rep.longrepr)
                self.results.setdefault(rep.nodeid, []).append(rep)
                if rep.when == "teardown":
                    finished.add(rep.nodeid)
            crashed = proc.returncode < 0 or proc.returncode > 5  # 0-5: pytest's own exit codes
            if crashed and started is not None and started not in finished:
                why = _signal_name(proc.returncode)
                tail = (proc.stdout + proc.stderr)[-3000:]
                item_of = {i.nodeid: i for i in item.session.items}
                victim = item_of.get(started, item)
                self.results.setdefault(started, []).append(
                    self._failed(victim, f"the child pytest process died ({why}) running this test:\n{tail}", "call")
                )
                finished.add(started)
            progressed = [n for n in remaining if n in finished]
            remaining = [n for n in remaining if n not in finished]
            if not crashed or not progressed:
                if remaining and (crashed or proc.returncode not in (0, 1)):
                    tail = (proc.stdout + proc.stderr)[-3000:]
                    for nodeid in remaining:
                        self.results.setdefault(nodeid, []).append(
                            self._failed(
                                item,
                                f"the child pytest process exited with {proc.returncode} before this test:\n{tail}",
                                "setup",
                                nodeid=nodeid,
                            )
                        )
                break

    @staticmethod
    def _failed(item, text: str, when: str, nodeid: str | None = None):
        return pytest.TestReport(
            nodeid=nodeid or item.nodeid,
            location=item.location,
            keywords={},
            outcome="failed",
            longrepr=text,
            when=when,
        )


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
