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
