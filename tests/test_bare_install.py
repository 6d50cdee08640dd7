"""A bare install: the built wheel in a fresh virtual environment beside torch alone (no extra). Every
command's default run, and ``llp_fast.LocalLabelPropagation``, either works or ends in one line that
names the extra to install; never a ModuleNotFoundError traceback."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _step(argv, env):
    """Run one setup step; a failure shows the step's own output (pip's reason: a full disk, an index
    it cannot reach), not only its exit status."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-30:]
        free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
        pytest.fail(f"{' '.join(map(str, argv))} exited {p.returncode} ({free:.1f} GiB free):\n" + "\n".join(tail))
    return p


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """(python, bin dir, env) of a fresh venv holding torch, the wheel and its required dependencies."""
    tmp = tmp_path_factory.mktemp("bare")
    env = dict(os.environ, LLP_FAST_SKIP_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheels = tmp / "wheels"
    _step([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", wheels, ROOT], env)
    venv = tmp / "venv"
    _step([sys.executable, "-m", "venv", venv], env)
    py = str(venv / "bin" / "python")
    torch_version = torch.__version__.split("+")[0]
    _step([py, "-m", "pip", "install", "-q", f"torch=={torch_version}"], env)
    _step([py, "-m", "pip", "install", "-q", *wheels.glob("llp_fast-*.whl")], env)
    listed = _step([py, "-m", "pip", "list", "--format=freeze"], env).stdout.lower()
    for extra in ("scikit-learn", "mlxtend", "pillow", "matplotlib", "tensorboard", "nvidia-dali", "cupy"):
        assert extra not in listed, f"{extra} is installed in the bare environment"
    # no JIT build of the extension either (no compiler toolchain in a bare install is assumed)
    env = dict(os.environ, LLP_FAST_DISABLE_EXT="1", PYTHONPATH="", OMP_NUM_THREADS="1")
    yield py, venv / "bin", env, tmp
    # about 1.5 GB (pytest keeps its last three temp dirs), removed by a process of its own: the
    # suite's teardown took 10 to 90 s over it
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.Popen(["rm", "-rf", str(venv)], start_new_session=True, **quiet)


def _run(bare, *argv, cwd=None):
    py, bindir, env, tmp = bare
    exe = str(bindir / argv[0]) if argv[0].startswith("llp-fast") else argv[0]
    p = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, env=env, cwd=cwd or tmp, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _one_line(result, prog, extra):
    rc, out, err = result
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and f"pip install 'llp_fast[{extra}]'" in lines[0], lines[0]
    assert "Traceback" not in err


def test_each_command_works_or_names_the_extra(bare):
    py, bindir, env, tmp = bare
    # the default command trains on digits: scikit-learn's, so the data extra
    _one_line(_run(bare, "llp-fast-train", "--run-dir", "d"), "llp-fast-train", "data")
    _one_line(_run(bare, "llp-fast-train", "--data", "mnist5k", "--run-dir", "m"), "llp-fast-train", "data")
    (tmp / "imgs" / "a").mkdir(parents=True, exist_ok=True)
    _one_line(
        _run(bare, "llp-fast-train", "--data", f"folder:{tmp / 'imgs'}", "--run-dir", "f"), "llp-fast-train", "data"
    )

    # array data need nothing more: a tiny run trains, and the tools read its checkpoint
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    y_train = np.where(np.arange(90) % 10 == 0, y, -1)
    x = (g.random((90, 8, 8)) * 80 + y[:, None, None] * 60).astype(np.uint8)
    np.savez(tmp / "small.npz", x=x, y=y_train, x_test=x[:30], y_test=y[:30])
    tiny = ["--epochs", "1", "--width", "4", "--k", "3", "--t", "5", "--baseline", "off", "--quiet"]
    rc, out, err = _run(bare, "llp-fast-train", "--data", f"npz:{tmp / 'small.npz'}", "--run-dir", "r", *tiny)
    assert rc == 0 and "held-out top-1" in out, err
    assert "pip install 'llp_fast[tb]'" not in err  # --quiet: no note
    emb = g.standard_normal((60, 8)).astype(np.float32)
    np.save(tmp / "emb.npy", emb)
    np.save(tmp / "lab.npy", np.where(np.arange(60) % 6 == 0, np.arange(60) % 3, -1))
    rc, out, err = _run(bare, "llp-fast-propagate", "emb.npy", "lab.npy", "--out", "p.npy", "--k", "3", "--t", "5")
    assert rc == 0 and np.load(tmp / "p.npy").shape == (60,), err
    np.savez(tmp / "pool.npz", x=x[:40])
    rc, out, err = _run(
        bare,
        "llp-fast-select",
        "r",
        "--source",
        "npz:pool.npz",
        "--out",
        "sel.npz",
        "--per-class",
        "5",
        "--top-classes",
        "2",
    )
    assert rc == 0 and (tmp / "sel.npz").exists(), err
    rc, out, err = _run(bare, "llp-fast-linear-probe", "r", "--data", "npz:small.npz", "--epochs", "2")
    assert rc == 0, err
    _one_line(_run(bare, "llp-fast-analyze", "r"), "llp-fast-analyze", "analyze")
    # the report for a bug report: every extra missing, each with its pip line; and --version
    rc, out, err = _run(bare, py, "-m", "llp_fast")
    assert rc == 0 and "extension: not loaded (LLP_FAST_DISABLE_EXT=1)" in out, err
    assert "extra data: missing scikit-learn, mlxtend, pillow (pip install 'llp_fast[data]')" in out, out
    assert "extra dali: missing nvidia-dali-cuda120 (pip install 'llp_fast[dali]')" in out, out
    rc, out, err = _run(bare, "llp-fast-propagate", "--version")
    assert rc == 0 and out.startswith("llp-fast-propagate 0.") and not err, err

    # the estimator: one clear ImportError naming the extra
    code = "import llp_fast\ntry:\n    llp_fast.LocalLabelPropagation\nexcept ImportError as e:\n    print(e)\n"
    rc, out, err = _run(bare, py, "-c", code)
    assert rc == 0 and out.strip() == "llp_fast.LocalLabelPropagation needs sklearn: pip install 'llp_fast[sklearn]'"
    # the star import takes what is there (it failed on the estimator's ImportError); dir() lists what
    # can be had (it listed the estimator, and help(llp_fast) / inspect.getmembers failed on it)
    code = (
        "import inspect, pydoc, llp_fast\nfrom llp_fast import *\nprint(propagate.__name__, 'LocalLabelPropagation' "
        "in dir(llp_fast), 'train' in dir(llp_fast), len(inspect.getmembers(llp_fast)) > 9, "
        "'propagate' in pydoc.render_doc(llp_fast))"
    )
    rc, out, err = _run(bare, py, "-c", code)
    assert rc == 0 and out.strip() == "propagate False True True True", err
