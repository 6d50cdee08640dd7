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
from llp_fast._op_table import OPS, extension_ops, triton_launchers
from llp_fast.ops import _common, describe_backends
from llp_fast.reference import topk_scores_ref

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
        impl, why = table[op]["cpu"]
        if op in extension_ops("cpu"):
            assert impl == "extension" and (why == "llp_fast._C loaded" or why.endswith("(JIT-built) loaded"))
        elif OPS[op].via:  # selected by topk_scores' kernel, finished in PyTorch
            assert impl == "extension" and why.startswith(f"topk_scores + {OPS[op].finish}: ")
        else:  # the fused loss serves CUDA only; on CPU the two-pass ops do
            assert table[op]["cpu"] == ("reference", f"the extension has no CPU kernel for {op}")
    line = describe_backends()
    assert line.startswith("llp_fast backends: cpu: extension (") and "\n" not in line


def test_the_table_is_what_the_extension_and_the_kernels_register():
    """One table (llp_fast/_op_table.py) of the ops and their implementations: csrc/bindings.cpp
    registers exactly its extension column, llp_fast.kernels exports exactly its Triton launchers,
    and every op of the table is declared."""
    import re

    bindings = (ROOT / "csrc" / "bindings.cpp").read_text()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        block = re.search(rf"TORCH_LIBRARY_IMPL\(llp_fast, {key}, m\) \{{(.*?)\}}", bindings, re.S).group(1)
        assert sorted(re.findall(r'm\.impl\("(\w+)"', block)) == sorted(extension_ops(device)), device
    init = (ROOT / "kernels" / "__init__.py").read_text()
    exported = set(re.findall(r'"(\w+_triton)"', init))
    assert exported == set(triton_launchers().values())
    for op in OPS:
        assert hasattr(torch.ops.llp_fast, op)


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
    for op in triton_launchers():
        assert table[op]["cuda"] == ("reference", "triton not installed")
    assert table["propagate"]["cuda"] == ("reference", "topk_scores + vote: triton not installed")
    impl, why = table["bank_update_"]["cuda"]
    assert impl in ("extension", "reference") and why
    monkeypatch.setenv("LLP_FAST_DISABLE_TRITON", "1")
    assert llp_fast.backends()["topk_scores"]["cuda"] == ("reference", "LLP_FAST_DISABLE_TRITON=1")


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
    assert "STATIC ('reference', 'topk_scores + vote: LLP_FAST_DISABLE_EXT=1')" in out.stdout
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

    fake = {
        "topk_scores_triton": launcher,
        "topk_scores_triton_declines": lambda *a: "k=2000 > 1024" if a[2] > 1024 else None,
    }
    monkeypatch.setattr(_optional, "kernel", lambda name: fake.get(name))
    body = _common.with_fallback("topk_scores_triton", lambda *args: "from reference")
    args = (None, None, None, None, 0)
    assert body(None, None, 2000, 0.07, *args) == "from reference" and calls == []
    assert llp_fast.backends(last=True)["topk_scores"]["cuda"] == ("reference", "triton declined: k=2000 > 1024")
    assert body(None, None, 10, 0.07, *args) == "from triton"
    assert llp_fast.backends(last=True)["topk_scores"]["cuda"] == ("triton", "topk_scores_triton")
    # No kernels at all: the reason is the import's.
    monkeypatch.setattr(_optional, "kernel", lambda name: None)
    monkeypatch.setenv("LLP_FAST_DISABLE_TRITON", "1")
    assert body(None, None, 10, 0.07, *args) == "from reference"
    assert fresh_record[("topk_scores", "cuda")] == ("reference", "LLP_FAST_DISABLE_TRITON=1")


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
        classes = torch.zeros(80, dtype=torch.long)
        args = (0.07, None, None, None, None, 0)
        assert kernels.topk_scores_triton_declines(q, m, 1024, *args) is None
        assert kernels.topk_scores_triton_declines(q, m, 1025, *args) == "k=1025 > 1024"
        assert kernels.topk_scores_triton_declines(q.double(), m.double(), 10, *args).startswith("dtype float64")
        wide_q, wide_m = unit_rows(4, 300), unit_rows(9, 300)
        assert kernels.topk_scores_triton_declines(wide_q, wide_m, 3, *args) == "D=300 > 256"
        assert kernels.aggregation_loss_triton_declines(q, m.bfloat16(), classes, classes[:4], 0.07) == (
            "operands of different dtypes"
        )

    def test_the_cuda_body_records_a_decline(self, fresh_record):
        """with_fallback with the real launcher, run by the interpreter on CPU tensors."""
        q, m = unit_rows(6, 8), unit_rows(70, 8)
        body = _common.with_fallback("topk_scores_triton", lambda *a: topk_scores_ref(*a))
        args = (0.07, None, None, None, None, 0)
        values, _ = body(q.double(), m.double(), 5, *args)
        assert torch.equal(values, topk_scores_ref(q.double(), m.double(), 5, *args)[0])
        assert fresh_record[("topk_scores", "cuda")][0] == "reference"
        assert fresh_record[("topk_scores", "cuda")][1].startswith("triton declined: dtype float64")
        body(q, m, 5, *args)
        assert fresh_record[("topk_scores", "cuda")] == ("triton", "topk_scores_triton")
