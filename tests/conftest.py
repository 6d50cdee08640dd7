import os
import random
import signal

# The code under test leaves a signal that is ignored ignored (llp_fast/_signals.py: nohup's SIGHUP, a
# script's background job's SIGINT). Where this suite itself was started so, its tests' Ctrl-C and
# SIGTERM (to this process and the commands it starts) would reach nothing: they get their usual
# handling back here, before anything installs a handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

import _isolate  # noqa: E402  (tests/ is on sys.path, as for brute.py)
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import llp_fast.reference as reference

# The fuzz tests (tests/test_fuzz_*.py) draw fresh examples on each run here; in CI (CI set) the
# same examples every run, so that a red CI is a code change, not a lucky draw.
settings.register_profile("ci", derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("CI"):
    settings.load_profile("ci")

_CONFIG: list = []  # the child's config, for report serialisation


# -- modules marked `isolated` run in a child pytest process (tests/_isolate.py) -----------------
def pytest_configure(config):
    if _isolate.in_child():
        _CONFIG.append(config)
    else:
        config._llp_isolator = _isolate.Isolator(config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    isolator = getattr(item.config, "_llp_isolator", None)
    if isolator is not None and item.get_closest_marker("isolated"):
        return isolator.run_protocol(item)
    return None


def pytest_runtest_logstart(nodeid, location):
    if _isolate.in_child():
        _isolate.child_logstart(nodeid)


def pytest_runtest_logreport(report):
    if _isolate.in_child():
        _isolate.child_logreport(_CONFIG[0], report)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds; inputs are still fresh random draws."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    """Runs a test with the default tile budget and with tiles of a few hundred elements,
    so that the chunked loops cross many row and column boundaries."""
    if request.param == "tiny":
        monkeypatch.setenv("LLP_FAST_CHUNK_MB", "0.002")
    else:
        monkeypatch.delenv("LLP_FAST_CHUNK_MB", raising=False)
    assert reference.tile_shape(10**6, 10**6)[1] > 0
    return request.param


def unit(n: int, d: int, dtype=torch.float32, device="cpu", *, gen=None) -> torch.Tensor:
    """n random unit vectors in R^d (drawn from ``gen`` when given: data built at import time, before
    the per-test seed)."""
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("LLP_FAST_NO_CUDA") != "1"


def tiny_config(tmp_path, name="run", **kw):
    """A trainer config that runs in seconds: digits at 8 px, a width-4 ResNet-18 and 30% of the
    unlabeled pool (~10 steps an epoch), the paper's method from instance ids (the mechanics most
    tests check); keyword arguments override (``method="plus"`` and ``label_init=None``,
    ``propagation_start=None`` for the default method's start)."""
    from llp_fast.train import TrainConfig

    base = dict(
        data="digits",
        run_dir=str(tmp_path / name),
        epochs=2,
        labeled_fraction=0.1,
        unlabeled_fraction=0.3,
        width=4,
        image_size=8,
        batch_size=64,
        lr=0.05,
        milestones=[1],
        k=5,
        t=10,
        quiet=True,
        method="paper",
        label_init="instance",
        propagation_start=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def own_network_settings(tmp_path, name="run", **kw):
    """tiny_config's fields as fit() keywords beside a network given in Python: ``data`` first,
    then the rest without ``width`` and ``arch`` (the module is the network: fit refuses them)."""
    import dataclasses

    settings = dataclasses.asdict(tiny_config(tmp_path, name, **kw))
    del settings["width"], settings["arch"]
    return settings.pop("data"), settings


# The command-line twin of tiny_config: llp-fast-train flags for a run that takes seconds.
TINY_ARGS = ["--epochs", "1", "--width", "4", "--image-size", "8", "--unlabeled-fraction", "0.2"]
TINY_ARGS += ["--batch-size", "64", "--k", "5", "--t", "10", "--device", "cpu"]


def one_error_line(capsys, rc, match, prog="llp-fast-train"):
    """Asserts the tools' error contract: exit status 2 and exactly one line, ``PROG: error:``,
    holding ``match``, no traceback. Returns the line."""
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]
