"""bench/common.py's correctness check, which every bench_<op>.py runs before it times anything:
on CPU it must run the same kernel path as the timed shapes (the CPU top-K picks its scheme by how
many keys can score, not by K alone), and a provider wrong only at a timed shape's size must stop the
run in one line before any timing."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def common():
    sys.path.insert(0, str(BENCH))
    try:
        import common

        yield common
    finally:
        sys.path.remove(str(BENCH))


class _Bench:
    """A benchmark whose provider is wrong only where more keys than the check shape's can score
    (what a wrong bf16 pass taken at the timed size alone would look like)."""

    OP = "fake"
    SELECTS = True

    def __init__(self, common):
        self.common, self.seen = common, []
        self.PROVIDERS = {"reference": self._ref, "extension": self._ext}

    def check_shape(self):
        return self.common.Shape("check", 64, 100, 8, 5)

    def make_inputs(self, shape, dtype, seed=0):
        self.seen.append(shape)
        return torch.ones(shape.q, dtype=dtype) * shape.m

    def _ref(self, inputs, shape):
        return inputs

    def _ext(self, inputs, shape):
        return inputs + (shape.m > 100)

    def compare(self, out, ref, dtype, inputs, *, shape=None, rounded=False):
        if not torch.equal(out, ref):
            raise AssertionError("differs")
        return "equal"

    def skip(self, name, shape):
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the timed shapes' keys are checked on CPU")
def test_the_check_covers_each_timed_shapes_keys(common):
    bench = _Bench(common)
    timed = [common.Shape("k10", 20_000, 5_000, 8, 10), common.Shape("small", 10, 100, 8, 5)]
    with pytest.raises(AssertionError, match="differs; not timing"):
        common.check(bench, torch.float32, ["extension"], timed)
    # at the timed shape's keys, with enough queries for 2^23 products (the kernel's size rule)
    assert common.Shape("check", 1678, 5_000, 8, 10) in bench.seen
    bench.SELECTS = False  # an op that does not select: the check shape's size only
    bench.seen.clear()
    common.check(bench, torch.float32, ["extension"], timed)
    assert {s.m for s in bench.seen} == {100}


def test_each_labeller_benchmark_command_writes_its_own_file():
    """bench_embeddings.py named its file by mode and tag alone: `table --seeds 0-4` and `--seeds
    100-104` (both documented) wrote one file, and the second replaced the first."""
    import argparse

    sys.path.insert(0, str(BENCH))
    try:
        import bench_embeddings as b
    finally:
        sys.path.remove(str(BENCH))
    runs = [
        ("table", "0-4", None, 0.01),
        ("table", "100-104", None, 0.01),
        ("ablation", "0-4", None, 0.01),
        ("scale", "0-4", [5000, 50000], 0.01),
        ("scale", "0-4", [200000], 0.01),
        ("scale", "0-4", None, 0.01),
        ("bar", "0-4", 200000, 0.01),
        ("bar", "0-4", 1000000, 0.01),
        ("default", "0-4", 1000000, 0.1),
    ]
    names = [b._what(argparse.Namespace(mode=m, seeds=s, n=n, labeled=lab)) for m, s, n, lab in runs]
    assert len({(r[0], w) for r, w in zip(runs, names)}) == len(runs), names
    assert names[0] == "s0-4" and names[6] == "n200000-l0.01" and names[5].startswith("n5000,")


def test_a_trainer_run_with_other_flags_is_not_skipped_unsaid(tmp_path, capsys):
    """bench_trainer.py keyed its runs without --extra: the same run with other flags was skipped
    without a word, and its old row read as the new one's."""
    import json

    sys.path.insert(0, str(BENCH))
    try:
        import bench_trainer
    finally:
        sys.path.remove(str(BENCH))
    results = tmp_path / "runs.jsonl"
    results.write_text(json.dumps({"key": "d2/supervised/s0", "rc": 0, "extra": "--epochs 1"}) + "\n")
    argv = ["runs", "--plan", "d2:supervised", "--seeds", "0", "--results", str(results), "--work", str(tmp_path)]
    with pytest.raises(SystemExit, match="d2/supervised/s0 is in .* with --extra '--epochs 1', not '--epochs 2'"):
        bench_trainer.main([*argv, "--extra", "--epochs 2"])
    bench_trainer.main([*argv, "--extra", "--epochs 1"])  # the same flags: done already, and said
    assert "1 of the planned runs are in" in capsys.readouterr().out
