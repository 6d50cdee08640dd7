"""llp_fast.backends(): which implementation serves each op on each device and why, and the
record of what served the most recent call (a launcher's decline reason included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _triton_setup import kernels, triton_tests, unit_rows

import llp_fast
from llp_fast import _ext, _optional
from llp_fast.ops import _common, describe_backends
from llp_fast.ops._backends import OPS, TRITON_LAUNCHERS
from llp_fast.reference import propagate_ref

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_record(monkeypatch):
    """An empty record of the most recent calls, restored afterwards."""
    monkeypatch.setattr(_common, "LAST_CALL", {})
    return _common.LAST_CALL


def test_every_op_on_every_device():
    table = llp_fast.backends()
    assert set(table) == set(OPS)
    for op in OPS:
        assert set(table[op]) == {"cpu", "cuda"}
        for impl, why in table[op].values():
            assert impl in ("extension", "triton", "reference", "none") and isinstance(why, str) and why


def test_cpu_with_the_extension_loaded():
    if _ext.disabled() or _ext.load() is None:
        pytest.skip("the C++ extension is not loaded here")
    table = llp_fast.backends()
    for op in OPS:
        if op in _ext.CPU_OPS:
            impl, why = table[op]["cpu"]
            assert impl == "extension" and (why == "llp_fast._C loaded" or why.endswith("(JIT-built) loaded"))
        else:  # the fused loss serves CUDA only; on CPU the two-pass ops do
            assert table[op]["cpu"] == ("reference", f"the extension has no CPU kernel for {op}")
    line = describe_backends()
    assert line.startswith("llp_fast backends: cpu: extension (") and "\n" not in line


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    table = llp_fast.backends()
    assert all(table[op]["cuda"] == ("none", "no CUDA GPU") for op in OPS)
    assert "cuda: none (no CUDA GPU) for all ops" in describe_backends()


def test_cuda_without_triton(monkeypatch):
    """A GPU (pretended) but no triton: the Triton ops fall to the reference and say why; the
    bank update is the extension's CUDA kernel or the reference, with the extension's reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_optional, "triton", lambda: None)
    monkeypatch.delitem(_optional._errors, "triton", raising=False)
    table = llp_fast.backends()
    for op in TRITON_LAUNCHERS:
        assert table[op]["cuda"] == ("reference", "triton not installed")
    impl, why = table["bank_update_"]["cuda"]
    assert impl in ("extension", "reference") and why
    monkeypatch.setenv("LLP_FAST_DISABLE_TRITON", "1")
    assert llp_fast.backends()["propagate"]["cuda"] == ("reference", "LLP_FAST_DISABLE_TRITON=1")


def test_without_the_extension_in_a_fresh_process():
    script = (
        "import torch, llp_fast\n"
        "q = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)\n"
        "print('STATIC', llp_fast.backends()['propagate']['cpu'])\n"
        "llp_fast.propagate(q, q, torch.zeros(6, dtype=torch.long), k=2, num_classes=1)\n"
        "print('LAST', llp_fast.backends(last=True)['propagate']['cpu'])\n"
        "from llp_fast.ops import describe_backends\n"
        "print('LINE', describe_backends())\n"
    )
    env = dict(os.environ, LLP_FAST_DISABLE_EXT="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "STATIC ('reference', 'LLP_FAST_DISABLE_EXT=1')" in out.stdout
    assert "LAST ('reference', 'LLP_FAST_DISABLE_EXT=1')" in out.stdout
    assert "LINE llp_fast backends: cpu: reference (LLP_FAST_DISABLE_EXT=1) for all ops" in out.stdout, out.stdout


def test_a_failed_build_says_why(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "_failure", "CPU build: RuntimeError: no compiler")
    monkeypatch.delenv("LLP_FAST_DISABLE_EXT", raising=False)
    assert _ext.unavailable() == "extension not built: CPU build: RuntimeError: no compiler"


def test_the_record_says_why_a_launcher_declined(monkeypatch, fresh_record):
    """The CUDA body of an op (with_fallback), with stand-in launchers: the decline reason and
    the fallback are recorded for the op on cuda."""
    calls = []

    def launcher(*args):
        calls.append("triton")
        return "from triton"

    fake = {"propagate_triton": launcher, "propagate_triton_declines": lambda *a: "k=80 > 64" if a[4] > 64 else None}
    monkeypatch.setattr(_optional, "kernel", lambda name: fake.get(name))
    body = _common.with_fallback("propagate_triton", lambda *args: "from reference")
    assert body(None, None, None, None, 80, 0.07, 3) == "from reference" and calls == []
    assert llp_fast.backends(last=True)["propagate"]["cuda"] == ("reference", "triton declined: k=80 > 64")
    assert body(None, None, None, None, 10, 0.07, 3) == "from triton"
    assert llp_fast.backends(last=True)["propagate"]["cuda"] == ("triton", "propagate_triton")
    # No kernels at all: the reason is the import's.
    monkeypatch.setattr(_optional, "kernel", lambda name: None)
    monkeypatch.setenv("LLP_FAST_DISABLE_TRITON", "1")
    assert body(None, None, None, None, 10, 0.07, 3) == "from reference"
    assert fresh_record[("propagate", "cuda")] == ("reference", "LLP_FAST_DISABLE_TRITON=1")


def test_a_cpu_call_is_recorded(fresh_record):
    q = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    llp_fast.propagate(q, q, torch.zeros(6, dtype=torch.long), k=2, num_classes=1)
    impl, _ = llp_fast.backends(last=True)["propagate"]["cpu"]
    assert impl == llp_fast.backends()["propagate"]["cpu"][0]


class TestTritonDeclines:
    """The launchers' accept/decline functions, under TRITON_INTERPRET=1 on CPU tensors."""

    pytestmark = triton_tests

    def test_reasons(self):
        q, m = unit_rows(4, 8), unit_rows(80, 8)
        classes, rho = torch.zeros(80, dtype=torch.long), torch.rand(80)
        assert kernels.propagate_triton_declines(q, m, classes, rho, 10, 0.07, 3) is None
        assert kernels.propagate_triton_declines(q, m, classes, rho, 80, 0.07, 3) == "k=80 > 64"
        assert kernels.local_density_triton_declines(q, m, 65, 0.07, None) == "t=65 > 64"
        assert kernels.propagate_triton_declines(q.double(), m.double(), classes, rho, 10, 0.07, 3).startswith(
            "dtype float64"
        )
        wide_q, wide_m = unit_rows(4, 300), unit_rows(9, 300)
        assert kernels.topk_scores_triton_declines(wide_q, wide_m, 3, 0.07, None, None, None, None, 0) == "D=300 > 256"
        assert kernels.aggregation_loss_triton_declines(q, m.bfloat16(), classes, classes[:4], 0.07) == (
            "operands of different dtypes"
        )

    def test_the_cuda_body_records_a_decline(self, fresh_record):
        """with_fallback with the real launcher, run by the interpreter on CPU tensors."""
        q, m = unit_rows(6, 8), unit_rows(70, 8)
        classes, rho = torch.randint(0, 3, (70,)), torch.rand(70)
        body = _common.with_fallback("propagate_triton", lambda *a: propagate_ref(*a))
        labels, _ = body(q, m, classes, rho, 66, 0.07, 3)
        assert torch.equal(labels, propagate_ref(q, m, classes, rho, 66, 0.07, 3)[0])
        assert fresh_record[("propagate", "cuda")] == ("reference", "triton declined: k=66 > 64")
        body(q, m, classes, rho, 5, 0.07, 3)
        assert fresh_record[("propagate", "cuda")] == ("triton", "propagate_triton")
