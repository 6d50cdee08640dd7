"""bench/bench_step_overhead.py runs end to end on CPU at a tiny size: its correctness check
(stored labels against propagate_ref, bank rows moved, finite losses) passes and it writes
one row per provider, by default under $OUT (a GPU session's results come back from there), with
--profile's traces beside them in a folder it creates first. The docs/method.md §4 timing bar itself
is a GPU benchmark, never a test."""

import json
import sys
from pathlib import Path

import pytest
import torch

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_step_overhead_bench_checks_then_times(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_step_overhead
    finally:
        sys.path.remove(str(BENCH))
    torch.set_num_threads(1)
    out_dir = tmp_path / "out" / "new"  # no --out: $OUT, a folder not yet made
    monkeypatch.setenv("OUT", str(out_dir))
    rows = bench_step_overhead.main(
        ["--device", "cpu", "--image-size", "16", "--width", "4", "--batch-size", "16", "--bank-rows", "3000",
         "--reps", "2", "--warmup", "0", "--folder", str(tmp_path / "img"), "--profile", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "labels agree with propagate_ref on" in out and "vs supervised" in out
    by = {(r.op, r.provider): r for r in rows}
    assert set(by) == {("train_step", "supervised"), ("train_step", "llp"), ("refresh_density", "llp")}
    assert all(r.median_ms > 0 for r in rows)
    saved = json.loads(next(out_dir.glob("step_overhead-*.json")).read_text())
    assert {p.name for p in out_dir.glob("step_profile-*.json")} == {
        "step_profile-supervised.json",
        "step_profile-llp.json",
    }
    assert len(saved) == 3 and "q=16,m=3000" in saved[0]["shape"]
    assert len(list((tmp_path / "img").rglob("*.png"))) == 10 * 5  # 3 x 16 / 10 classes, rounded up


@pytest.mark.parametrize("fault", ["labels", "confidence"])
def test_step_overhead_bench_refuses_a_wrong_step(tmp_path, monkeypatch, fault):
    """A step storing a wrong class for a few of its unlabeled rows, or confidences 0.009 off, was
    timed (the check took 97% agreement and confidences to 1e-2)."""
    from llp_fast import MemoryBank

    sys.path.insert(0, str(BENCH))
    try:
        import bench_step_overhead
    finally:
        sys.path.remove(str(BENCH))
    real = MemoryBank.step

    def wrong(self, indices, embeddings, **kw):
        out = real(self, indices, embeddings, **kw)
        rows = self.rows(indices)
        rows = rows[rows >= self.num_labeled][:2]
        if fault == "labels":
            self.labels[rows] = (self.labels[rows] + 1) % self.num_classes
        else:
            self.confidence[rows] += 0.009
        return out

    monkeypatch.setattr(MemoryBank, "step", wrong)
    torch.set_num_threads(1)
    with pytest.raises(AssertionError, match="the labels stored by the step against propagate_ref"):
        bench_step_overhead.main(
            ["--device", "cpu", "--image-size", "16", "--width", "4", "--batch-size", "16", "--bank-rows", "3000",
             "--reps", "1", "--warmup", "0", "--folder", str(tmp_path / "img"), "--out", str(tmp_path / "out")]
        )  # fmt: skip
