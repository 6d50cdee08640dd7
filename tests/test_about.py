"""What an installation says about itself: every command's ``--version``, ``python -m llp_fast``
(the environment report for a bug report), and the CPU kernels' paths it names, checked against
the path a call really takes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llp_fast
from llp_fast import _ext
from llp_fast.cli import analyze, probe, propagate, select, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "module, prog",
    [
        (train, "llp-fast-train"),
        (propagate, "llp-fast-propagate"),
        (select, "llp-fast-select"),
        (probe, "llp-fast-linear-probe"),
        (analyze, "llp-fast-analyze"),
    ],
)
def test_version(module, prog, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"{prog} {re.escape(llp_fast.__version__)} \(torch \S+, Python [\d.]+\); python -m llp_fast says more\n", out
    ), out


@pytest.mark.parametrize("flag", ["--version", "--help"])
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_version_and_help_into_a_closed_pipe(flag, unbuffered):
    """`llp-fast-select --version | head -n 0`: a BrokenPipeError traceback (unbuffered), or
    "Exception ignored" and status 120: argparse printed before the commands guarded their output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(ROOT), **({"PYTHONUNBUFFERED": "1"} if unbuffered else {}))
    code = "import sys; from llp_fast.cli.select import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before it writes (it imports torch first)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and not err, err


def _report(env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLP_FAST_")}
    full.update(env or {}, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "llp_fast", *args], env=full, capture_output=True, text=True, timeout=300
    )


def test_report():
    out = _report()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"llp_fast {llp_fast.__version__} (")
    assert any(line.startswith("torch ") for line in lines)
    assert any(line.startswith("cpu: ") for line in lines)
    backends = [line for line in lines if line.startswith("llp_fast backends: cpu: ")]
    assert len(backends) == 1
    if _ext.load() is not None:
        assert any(line.startswith("extension: llp_fast._C loaded") or "JIT-built" in line for line in lines)
        assert re.search(r"\| cpu kernels: scan (avx512|avx2|baseline); ", backends[0]), backends[0]
    # every extra of the package's metadata, installed or with the command that installs it
    extras = [line for line in lines if line.startswith("extra ")]
    assert extras, out.stdout
    for line in extras:
        assert re.fullmatch(r"extra \w+: (missing .*\(pip install 'llp_fast\[\w+\]'\)|.+ \S+)", line) or (
            "not installed as a package" in line
        ), line


def test_report_without_the_extension():
    out = _report({"LLP_FAST_DISABLE_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert "extension: not loaded (LLP_FAST_DISABLE_EXT=1)" in out.stdout
    assert "cpu kernels:" not in out.stdout


def test_report_refuses_what_it_cannot_use():
    out = _report(None, "--bogus")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "python -m llp_fast: error: no arguments expected, got '--bogus' (--help says why)"
    out = _report(None, "--help")
    assert out.returncode == 0 and "for a bug report" in out.stdout
    out = _report(None, "--version")  # (every tool's --version points here; it was "no arguments expected")
    assert out.returncode == 0 and out.stdout == f"llp_fast {llp_fast.__version__}\n"
    import subprocess
    import sys

    # `python -m llp_fast -h | head -1` ended in a BrokenPipeError traceback
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "llp_fast", "-h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    p.stdout.close()  # before it writes (it imports torch first): its write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 1) and "Traceback" not in err, err
    if _ext.load() is not None:  # a setting the kernels would refuse: one line, as the first call says it
        out = _report({"LLP_FAST_CPU_APPROX": "7"})
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == "python -m llp_fast: error: LLP_FAST_CPU_APPROX must be 0, 1 or 2, got '7'"


# One child per setting: each reads the CPU paths the kernels report, then makes a call large enough
# for the bf16 first pass (1,024 x 8,192 float32, k = 10) and says whether it took it
# (LLP_FAST_CPU_APPROX_REPORT prints a line to stderr when it does).
_CHILD = """
import torch, llp_fast
from llp_fast import _ext
print("PATHS", _ext.cpu_paths())
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(1024, 32, generator=g), dim=1)
m = torch.nn.functional.normalize(torch.randn(8192, 32, generator=g), dim=1)
llp_fast.topk_scores(q, m, k=10, tau=0.07)
"""


@pytest.mark.skipif(_ext.load() is None, reason="the extension is not built here")
@pytest.mark.parametrize(
    "env",
    [{}, {"LLP_FAST_CPU_APPROX": "0"}, {"LLP_FAST_CPU_FUSED": "0"}, {"LLP_FAST_CPU_BF16_GEMM": "0"}],
    ids=["default", "approx-off", "fused-off", "bf16-gemm-off"],
)
def test_cpu_paths_name_the_path_taken(env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLP_FAST_")}
    full.update(env, PYTHONPATH=str(ROOT), LLP_FAST_CPU_APPROX_REPORT="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    paths = re.search(r"^PATHS (.*)$", out.stdout, re.M).group(1)
    assert re.match(r"scan (avx512|avx2|baseline); (fused float32 tile (avx512|avx2)|float32 tile from BLAS); ", paths)
    says_pass = "from a bf16 pass" in paths
    took_pass = "llp_fast approx_topk: 1024 rows" in out.stderr
    assert says_pass == took_pass, (paths, out.stderr)
    if env:  # each of these settings turns the pass off
        assert not took_pass
    if env.get("LLP_FAST_CPU_FUSED") == "0":
        assert "float32 tile from BLAS" in paths
    if env.get("LLP_FAST_CPU_BF16_GEMM") == "0":
        assert "bf16 converted to float32" in paths


@pytest.mark.skipif(_ext.load() is None, reason="the extension is not built here")
def test_a_cpu_setting_that_names_nothing_is_one_line_at_a_commands_start(tmp_path, monkeypatch, capsys):
    """LLP_FAST_CPU_APPROX=7 was a RuntimeError traceback from the first op; the start's backends
    line now reads the settings and says it in one line."""
    from conftest import TINY_ARGS

    from llp_fast.errors import ConfigError
    from llp_fast.ops import describe_backends

    monkeypatch.setenv("LLP_FAST_CPU_APPROX", "7")
    with pytest.raises(ConfigError, match="LLP_FAST_CPU_APPROX must be 0, 1 or 2, got '7'"):
        describe_backends()
    rc = train.main([*TINY_ARGS, "--run-dir", str(tmp_path / "r"), "--baseline", "off", "--threads", "1"])
    err = capsys.readouterr().err  # the run's first lines, then the error: before any step
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "llp-fast-train: error: LLP_FAST_CPU_APPROX must be 0, 1 or 2, got '7'"
