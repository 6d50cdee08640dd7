"""How the extension is found or built (llp_fast/_ext.py): the prebuilt module's build stamp, the
JIT build into a cache directory (slow: a real compile), LLP_FAST_DISABLE_EXT, and the warn-once
fallback to the reference when no compiler works. Each scenario runs in a fresh interpreter,
because loading the extension registers kernels for the rest of a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llp_fast import _ext

ROOT = Path(__file__).resolve().parent.parent

# Runs propagate (its selection is the topk_scores kernel) and bank_update_ on CPU and compares them
# with the reference; prints which path served (the loaded module's name, or "reference").
SCRIPT = r"""
import warnings
warnings.simplefilter("always")
import torch, torch.nn.functional as F
import llp_fast
from llp_fast import _ext
from llp_fast.reference import propagate_ref, bank_update_ref_
torch.manual_seed(0)
q, m = F.normalize(torch.randn(50, 16), dim=1), F.normalize(torch.randn(40, 16), dim=1)
cls = torch.randint(0, 3, (40,))
labels, conf = llp_fast.propagate(q, m, cls, k=5, num_classes=3)
ref = propagate_ref(q, m, cls, None, 5, 0.07, 3)
assert torch.equal(labels, ref[0]) and torch.allclose(conf, ref[1], atol=1e-5)
bank, idx, vals = F.normalize(torch.randn(10, 16), dim=1), torch.tensor([1, 1, 4]), torch.randn(3, 16)
expect = bank.clone()
llp_fast.bank_update_(bank, idx, vals)
bank_update_ref_(expect, idx, vals, 0.5)
assert torch.allclose(bank, expect, atol=1e-6)
module = _ext.load()
kernel = torch._C._dispatch_has_kernel_for_dispatch_key("llp_fast::topk_scores", "CPU")
print("SERVED-BY", module.__name__ if module is not None else "reference", "CPU-KERNEL", kernel)
"""


def _run(env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LLP_FAST_DISABLE_EXT", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LLP_FAST_CACHE"] = str(tmp_path / "cache")
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)


def test_prebuilt_build_stamp_matches_torch():
    path = _ext._prebuilt_path()
    if path is None:
        pytest.skip("no prebuilt llp_fast._C (not installed with pip install -e . / build_ext --inplace)")
    import torch

    info = _ext.build_info(path)
    assert info is not None, "llp_fast._C carries no llp_fast-build stamp"
    version, _ = info
    if version != torch.__version__.split("+")[0]:
        pytest.skip(f"the prebuilt llp_fast._C is for torch {version}: load() JIT-builds instead")


def test_disabled_uses_reference(tmp_path):
    r = _run({"LLP_FAST_DISABLE_EXT": "1"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "SERVED-BY reference CPU-KERNEL False" in r.stdout


def test_no_compiler_warns_once_and_uses_reference(tmp_path):
    # Force the JIT path with a compiler that does not exist: the build fails, one warning, and the
    # reference serves every op.
    r = _run({"LLP_FAST_EXT_JIT": "1", "CXX": str(tmp_path / "no-such-c++")}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "SERVED-BY reference CPU-KERNEL False" in r.stdout
    assert r.stderr.count("the C++ extension is unavailable") == 1, r.stderr


@pytest.mark.slow
def test_jit_build_then_cached(tmp_path):
    first = _run({"LLP_FAST_EXT_JIT": "1"}, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "SERVED-BY llp_fast_C CPU-KERNEL True" in first.stdout, first.stdout + first.stderr
    assert first.stderr.count("llp_fast: building the C++") == 1, first.stderr
    second = _run({"LLP_FAST_EXT_JIT": "1"}, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "SERVED-BY llp_fast_C CPU-KERNEL True" in second.stdout
    assert "building" not in second.stderr, second.stderr


def test_build_stamp_is_read_without_loading(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF junk \x00llp_fast-build:torch=1.2.3;cuda=1;\x00 more junk")
    assert _ext.build_info(fake) == ("1.2.3", True)
    (tmp_path / "plain.so").write_bytes(b"no stamp here")
    assert _ext.build_info(tmp_path / "plain.so") is None


def test_stale_prebuilt_is_not_loaded(tmp_path, monkeypatch):
    # A prebuilt object for another torch must not be imported (that would register its kernels);
    # load() goes to the JIT build instead. Both steps are stubbed: nothing is built or loaded here.
    stale = tmp_path / "_C.so"
    stale.write_bytes(b"llp_fast-build:torch=0.0.1;cuda=0;")
    calls = []
    monkeypatch.setattr(_ext, "_prebuilt_path", lambda: str(stale))
    monkeypatch.setattr(_ext, "_import_prebuilt", lambda: calls.append("import") or "prebuilt")
    monkeypatch.setattr(_ext, "_jit_build", lambda cuda: calls.append(f"jit cuda={cuda}") or "jit")
    monkeypatch.setattr(_ext, "cuda_wanted", lambda: False)
    assert _ext._load() == "jit" and calls == ["jit cuda=False"]


def test_prebuilt_without_cuda_is_kept_as_fallback(tmp_path, monkeypatch):
    # Built for this torch but without CUDA kernels, on a machine that could use them: try a CUDA
    # JIT build, and if it fails use the prebuilt object (no CPU build: it would be the same).
    import torch

    cpu_only = tmp_path / "_C.so"
    cpu_only.write_bytes(f"llp_fast-build:torch={torch.__version__.split('+')[0]};cuda=0;".encode())
    calls = []

    def failing_jit(cuda):
        calls.append(f"jit cuda={cuda}")
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_ext, "_prebuilt_path", lambda: str(cpu_only))
    monkeypatch.setattr(_ext, "_import_prebuilt", lambda: calls.append("import") or "prebuilt")
    monkeypatch.setattr(_ext, "_jit_build", failing_jit)
    monkeypatch.setattr(_ext, "cuda_wanted", lambda: True)
    assert _ext._load() == "prebuilt"
    assert calls == ["jit cuda=True", "import"]
