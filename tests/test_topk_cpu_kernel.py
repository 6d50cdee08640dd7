"""The CPU top-K kernel's own paths (csrc/cpu/topk.h, csrc/cpu/scan_f32.cpp) against the reference:
large K (the bucket shrink, the radix sort, the threshold estimated from the first key tile and the
rows run again when it was too high), equal scores at every cut, and each scan variant the CPU has
(AVX-512, AVX2, baseline), the fused tile (csrc/cpu/tile_f32.cpp), the at::mm_out tile, the bf16 GEMM
and the thresholds learned without a first-tile bound or estimate, each chosen once per process
(LLP_FAST_CPU_ISA, LLP_FAST_CPU_FUSED, LLP_FAST_CPU_NO_BLAS, LLP_FAST_CPU_BF16_GEMM,
LLP_FAST_CPU_NO_BOUND, LLP_FAST_CPU_NO_ESTIMATE), so those run in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ext_setup import require_ext

from llp_fast.reference import topk_scores_ref

# Native kernels on odd shapes: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

TAU = 0.07
OP = torch.ops.llp_fast.topk_scores.default
ROOT = Path(__file__).resolve().parent.parent


def _unit(n, d, g, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _same(args, *, exact_indices=True):
    """The kernel's values and indices against the reference's: values to float32 rounding of the
    matmul's order, indices equal wherever neighbouring values are not within that rounding."""
    values, indices = OP(*args)
    ref_v, ref_i = topk_scores_ref(*args)
    torch.testing.assert_close(values, ref_v, rtol=0, atol=1e-5)
    assert torch.equal(indices < 0, ref_i < 0)
    gaps = (ref_v[:, 1:] - ref_v[:, :-1]).abs()
    clear = torch.ones_like(ref_i, dtype=torch.bool)
    clear[:, 1:] &= gaps > 1e-4
    clear[:, :-1] &= gaps > 1e-4
    if exact_indices:
        assert torch.equal(indices[clear], ref_i[clear])
    return values, indices


@pytest.fixture(autouse=True)
def _ext():
    require_ext("topk_scores")


@pytest.mark.parametrize("tile", [None, "16,64"])
@pytest.mark.parametrize("k", [33, 100, 200, 1000, 1024])
def test_large_k_matches_reference(k, tile, monkeypatch):
    """K from 33 to 1024 with a bias and a mask, over several key tiles (the threshold estimate runs
    once the keys span 4 tiles): the reference's values and indices."""
    if tile:
        monkeypatch.setenv("LLP_FAST_CPU_TILE", tile)
    g = torch.Generator().manual_seed(k)
    q, n, d = 19, max(2 * k + 301, 700), 12
    bias = torch.rand(n, generator=g) * 2 - 1
    mask = torch.rand(n, generator=g) < 0.8
    _same((_unit(q, d, g), _unit(n, d, g), k, TAU, bias, mask, None, None, 0))


@pytest.mark.parametrize("tile", ["2,1", "4,5", "3,31", "8,64"])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_small_k_bound_on_narrow_tiles(k, tile, monkeypatch):
    """K <= 16 (each row's threshold starts at the first tile's group-maxima bound) on tiles narrower
    than the 32 groups, some groups empty or masked: the reference's values and indices."""
    monkeypatch.setenv("LLP_FAST_CPU_TILE", tile)
    g = torch.Generator().manual_seed(k)
    n = 300
    bias = torch.rand(n, generator=g) * 2 - 1
    mask = torch.rand(n, generator=g) < 0.6
    _same((_unit(13, 6, g), _unit(n, 6, g), k, TAU, bias, mask, None, None, 0))


def test_estimate_too_high_runs_the_rows_again(monkeypatch):
    """The first key tile holds every query's best keys, so the threshold estimated from it is above
    the k-th best of the whole: those rows find fewer than k candidates and run again, exactly."""
    monkeypatch.setenv("LLP_FAST_CPU_TILE", "8,64")
    g = torch.Generator().manual_seed(3)
    d, k = 16, 40
    u = _unit(1, d, g)
    q = torch.nn.functional.normalize(u + 0.05 * torch.randn(20, d, generator=g), dim=1)
    near = torch.nn.functional.normalize(u + 0.1 * torch.randn(64, d, generator=g), dim=1)
    keys = torch.cat([near, _unit(600, d, g)])
    _same((q, keys, k, TAU, None, None, None, None, 0))


@pytest.mark.parametrize("tile", [None, "8,64"])
@pytest.mark.parametrize("k", [17, 25, 40, 48])
def test_small_k_cut_at_three_k(k, tile, monkeypatch):
    """K from 17 to 48 over many key tiles: where the CPU cuts in registers (AVX-512) a row is cut
    each time it holds 3K candidates (up to 128 of them, counted in registers) and sorted the same
    way at the end; elsewhere by the bucket shrink. With a bias and a mask, and with neither (one
    bias for every key): the reference's values and indices. With the default tile, 530 queries:
    query blocks taller than 252 rows where the CPU's L2 allows them at small K."""
    if tile:
        monkeypatch.setenv("LLP_FAST_CPU_TILE", tile)
    g = torch.Generator().manual_seed(k)
    q, keys = _unit(27 if tile else 530, 20, g), _unit(4000, 20, g)
    bias = torch.rand(4000, generator=g) * 2 - 1
    mask = torch.rand(4000, generator=g) < 0.7
    _same((q, keys, k, TAU, bias, mask, None, None, 0))
    _same((q, keys, k, TAU, None, None, None, None, 0))


@pytest.mark.parametrize("layout", ["float32", "strided", "bfloat16", "float64", "both bfloat16"])
@pytest.mark.parametrize("q", [9, 600])
@pytest.mark.parametrize("k", [5, 40, 200])
def test_masked_keys_are_skipped(k, q, layout):
    """Masked keys (the mask, or a bias of -inf) take no part: the keys that can score are packed one
    after another and their positions mapped back. The first 1,500 of 5,000 keys masked (whole key
    tiles, as a bank whose labeled rows come first is in local_density: the threshold's bound or
    estimate then reads the first tile of keys that can score) and a quarter of the rest at random;
    keys read in place, from a strided view and from bf16 (gathered and converted a tile at a time),
    and on the BLAS path (float64; bf16 queries and keys where the CPU has a bf16 GEMM) from one copy;
    a query block at a time (q = 9) or the keys packed once for many (q = 600); then every key but
    three masked, every key masked, and the keys in chunks merged with init equal to one call."""
    g = torch.Generator().manual_seed(k + q)
    n, d = 5000, 20
    keys = _unit(n, d, g)
    if layout == "strided":
        wide = torch.zeros(n, 2 * d)
        wide[:, ::2] = keys
        keys = wide[:, ::2]
    elif layout == "bfloat16":
        keys = keys.to(torch.bfloat16)
    queries = _unit(q, d, g)
    if layout == "float64":  # the BLAS path (float64 is never fused), reading a copy of the live keys
        keys, queries = keys.double(), queries.double()
    elif layout == "both bfloat16":  # the bf16 GEMM's path where the CPU has one, else the fused one
        keys, queries = keys.to(torch.bfloat16), queries.to(torch.bfloat16)
    mask = torch.rand(n, generator=g) < 0.75
    mask[:1500] = False
    bias = torch.rand(n, generator=g) * 2 - 1
    bias[torch.rand(n, generator=g) < 0.05] = -float("inf")  # a bias of -inf masks a key too
    v, i = _same((queries, keys, k, TAU, bias, mask, None, None, 0))
    live = mask & (bias > -float("inf"))
    assert bool(live[i.clamp_min(0)][i >= 0].all())
    top = (None, None)
    for c0 in range(0, n, 1700):
        c1 = min(c0 + 1700, n)
        top = OP(queries, keys[c0:c1], k, TAU, bias[c0:c1], mask[c0:c1], *top, c0)
    assert torch.equal(top[0], v) and torch.equal(top[1], i)
    few = torch.zeros(n, dtype=torch.bool)
    few[[3, 2600, 4999]] = True
    v, i = _same((queries, keys, k, TAU, bias.clamp_min(-1), few, None, None, 0))
    assert sorted(i[0, :3].tolist()) == [3, 2600, 4999] and bool((i[:, 3:] == -1).all())
    v, i = OP(queries, keys, k, TAU, None, torch.zeros(n, dtype=torch.bool), None, None, 0)
    assert bool((i == -1).all()) and bool(torch.isinf(v).all())


@pytest.mark.parametrize("k", [7, 300])
def test_chunks_with_init_equal_one_call(k):
    """The keys in chunks, each call merging the previous one's top-k (init) and starting from its
    k-th best (the floor), against one call over all keys: at K = 300 (the estimated threshold) and
    K = 7 (the first tile's lower bound, RowsF32::bound, which then only rises if above the floor)."""
    g = torch.Generator().manual_seed(5)
    q, keys = _unit(30, 24, g), _unit(3000, 24, g)
    bias = torch.rand(3000, generator=g)
    whole = OP(q, keys, k, TAU, bias, None, None, None, 0)
    top = (None, None)
    for c0 in range(0, 3000, 1024):
        top = OP(q, keys[c0 : c0 + 1024], k, TAU, bias[c0 : c0 + 1024], None, *top, c0)
    torch.testing.assert_close(top[0], whole[0], rtol=0, atol=0)
    assert torch.equal(top[1], whole[1])


@pytest.mark.parametrize(
    "distinct,k",
    [(7, 1), (7, 5), (7, 16), (7, 25), (7, 48), (7, 64), (7, 700), (400, 40), (400, 70), (400, 150)]
    + [(80, 300), (80, 700), (150, 500)],
)
def test_equal_scores_keep_the_lower_indices(distinct, k, monkeypatch):
    """Keys drawn from a few distinct rows (7: long runs of equal scores at a shrink's cut, at the
    first tile's lower bound for K <= 16 and at the k-th place; 400: two or three keys per score, so
    that the final sort's value buckets hold equal scores; 80 and 150: about 19 and 10 a score, a
    bucket more than one 16-word run of the AVX-512 sort can take, and one it can): the kernel keeps
    the lower indices, as the reference does."""
    monkeypatch.setenv("LLP_FAST_CPU_TILE", "8,64")
    g = torch.Generator().manual_seed(k)
    rows = _unit(distinct, 10, g)
    keys = rows[torch.randint(0, distinct, (1500,), generator=g)]
    q = _unit(9, 10, g)
    values, indices = OP(q, keys, k, TAU, None, None, None, None, 0)
    ref_v, ref_i = topk_scores_ref(q, keys, k, TAU)
    torch.testing.assert_close(values, ref_v, rtol=0, atol=1e-5)
    assert torch.equal(indices, ref_i)


def test_final_sort_with_clustered_scores():
    """One key far above the rest (a large bias), the others within a narrow band: the value buckets
    put most candidates in one bucket and the final sort falls back to the radix sort."""
    g = torch.Generator().manual_seed(2)
    q, keys, k = _unit(13, 16, g), _unit(900, 16, g), 120
    bias = torch.zeros(900)
    bias[17] = 1e4
    _same((q, keys, k, TAU, bias, None, None, None, 0))


def test_scores_of_minus_zero_keep_their_sign():
    """Scores of -0 (a product that underflows to -0 at tau = 100, plus a bias of -0) beside +0 ones
    and others, at K = 1000 (the final sort over value buckets, whose AVX-512 form reads each score
    back from its sort key, where -0 and +0 are one key): the reference's values, sign bits included,
    and indices."""
    g = torch.Generator().manual_seed(0)
    m, k = 3000, 1000
    q = torch.full((5, 1), 1e-30)
    keys = torch.where(torch.rand(m, 1, generator=g) < 0.5, -1e-15, 1e-15)
    bias = torch.rand(m, generator=g) * 1.2 - 1  # a sixth above 0: the zeros fall within the best k
    zero = torch.rand(m, generator=g) < 0.005  # few: one value bucket holds them all
    bias[zero] = torch.where(torch.rand(int(zero.sum()), generator=g) < 0.5, -0.0, 0.0)
    values, indices = OP(q, keys, k, 100.0, bias, None, None, None, 0)
    ref_v, ref_i = topk_scores_ref(q, keys, k, 100.0, bias)
    assert int((torch.signbit(ref_v) & (ref_v == 0)).sum()) > 0  # the case is there
    assert torch.equal(values, ref_v) and torch.equal(indices, ref_i)
    assert torch.equal(torch.signbit(values), torch.signbit(ref_v))


FLUSHED = """
import torch
from llp_fast.reference import topk_scores_ref
torch.set_flush_denormal(True)
g = torch.Generator().manual_seed(4)
queries, keys = torch.zeros(3, 8), torch.randn(5000, 8, generator=g)  # every score exactly 0
for k in (1, 5, 16):
    v, i = torch.ops.llp_fast.topk_scores.default(queries, keys, k, 0.07, None, None, None, None, 0)
    rv, ri = topk_scores_ref(queries, keys, k, 0.07)
    assert torch.equal(v, rv) and torch.equal(i, ri), (k, v, i)
    # An earlier call's top-k (init) all 0, with higher indices: the floor just below its k-th best
    # is a denormal; the keys' zeros still enter and win the ties by index.
    for dtype in (torch.float32, torch.float64):
        q, kk = queries.to(dtype), keys.to(dtype)
        init_v, init_i = torch.zeros(3, k, dtype=dtype), torch.arange(6000, 6000 + k).repeat(3, 1)
        v, i = torch.ops.llp_fast.topk_scores.default(q, kk, k, 0.07, None, None, init_v, init_i, 0)
        rv, ri = topk_scores_ref(q, kk, k, 0.07, None, None, init_v, init_i, 0)
        assert torch.equal(v, rv) and torch.equal(i, ri), (k, dtype, v, i, ri)
print("ok")
"""


def test_scores_of_zero_with_denormals_flushed():
    """Every score exactly 0, denormals flushed to zero (torch.set_flush_denormal, in a child
    process): the first tile's lower bound, and the floor below an earlier call's k-th best of 0
    (init), sit below 0 by a normal number, not a denormal that would read as 0, so the zeros are
    still chosen, in key order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FLUSHED], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


CHILD = """
import torch
from llp_fast import _ext
from llp_fast.reference import topk_scores_ref
assert _ext.load() is not None
g = torch.Generator().manual_seed(11)
unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
op = torch.ops.llp_fast.topk_scores.default
for q, n, d, k in [(7, 1, 3, 1), (33, 700, 17, 10), (20, 2500, 9, 300), (5, 130, 128, 129)]:
    for dtype in (torch.float32, torch.bfloat16):  # bf16: converted blocks, or the bf16 GEMM
        queries, keys = unit(q, d).to(dtype), unit(n, d).to(dtype)
        bias, mask = torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.7
        args = (queries, keys, k, 0.07, bias, mask, None, None, 0)
        v, i = op(*args)
        rv, ri = topk_scores_ref(*args)
        torch.testing.assert_close(v, rv, rtol=0, atol=1e-5)
        assert torch.equal(i < 0, ri < 0)
        top = (None, None)  # the keys in two chunks merge to the one call, exactly
        for c0, c1 in ((0, n // 2), (n // 2, n)):
            top = op(queries, keys[c0:c1], k, 0.07, bias[c0:c1], mask[c0:c1], *top, c0)
        assert torch.equal(top[0], v) and torch.equal(top[1], i)
# A masked key whose scores are NaN, in the same 64-key block as a query's best key and in the same
# vector lane (the scans pass a block over from its largest score: a NaN must not hide the others), in
# one call and in two chunks (the second starts from the first's k-th best: a high threshold at once).
keys = unit(1200, 8)
keys[[64, 72, 712]] = float("nan")
mask = torch.ones(1200, dtype=torch.bool)
mask[[64, 72, 712]] = False
queries = keys[[65, 704, 3]].clone()
for k in (1, 4):
    rv, ri = topk_scores_ref(queries, keys, k, 0.07, None, mask)
    v, i = op(queries, keys, k, 0.07, None, mask, None, None, 0)
    assert torch.equal(i[:, 0], ri[:, 0]), (k, i, ri)
    torch.testing.assert_close(v, rv, rtol=0, atol=1e-5)
    top = op(queries, keys[:600], k, 0.07, None, mask[:600], None, None, 0)
    top = op(queries, keys[600:], k, 0.07, None, mask[600:], *top, 600)
    assert torch.equal(top[1][:, 0], ri[:, 0]), (k, top, ri)
print("ok")
"""


def _flags() -> str:
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def _isas() -> list[str]:
    flags = _flags()
    return ["baseline"] + [isa for isa, flag in (("avx2", " avx2"), ("avx512", " avx512f")) if flag in flags]


def _fused_widths() -> list[str]:
    """The fused tile's widths this CPU runs (LLP_FAST_CPU_FUSED=avx2 / =avx512)."""
    flags = _flags()
    if " avx2" not in flags or " fma" not in flags:
        return []
    return ["avx2"] + (["avx512"] if " avx512f" in flags and " avx512bw" in flags else [])


# (queries, keys, D, K) of the children below: odd D, partial panels, K above the keys
ODD_SHAPES = [(1, 1, 1, 1), (13, 33, 5, 3), (37, 1000, 17, 10), (29, 2100, 128, 64), (50, 1500, 31, 300)]


# The start of every script _child runs: argv is (path, seed, ODD_SHAPES as JSON), ``g`` draws from
# the seed, ``op`` is the compiled topk_scores and ``out`` gathers what the script returns ...
CHILD_HEAD = """
import json
import sys
import torch
from llp_fast import _ext
assert _ext.load() is not None
g = torch.Generator().manual_seed(int(sys.argv[2]))
op = torch.ops.llp_fast.topk_scores.default
out = []
"""
# ... and its end: what it gathered in ``out`` saved at the path.
CHILD_TAIL = """
torch.save(out, sys.argv[1])
print("ok")
"""


def _child(script: str, path: Path, seed: int, env: dict) -> list:
    """``script`` run in a child process (each kernel choice is made once per process) with ``env``
    over the inherited environment and one thread, given ``path``, ``seed`` and ODD_SHAPES (JSON);
    what it saved at ``path``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    args = [sys.executable, "-c", script, str(path), str(seed), json.dumps(ODD_SHAPES)]
    proc = subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize(
    "env",
    [
        *({"LLP_FAST_CPU_ISA": isa} for isa in _isas()),
        {"LLP_FAST_CPU_FUSED": "0", "LLP_FAST_CPU_NO_BLAS": "1"},
        {"LLP_FAST_CPU_FUSED": "0"},
        *(
            {"LLP_FAST_CPU_FUSED": width, "LLP_FAST_CPU_TILE": tile}
            for width in _fused_widths()
            for tile in ("8,64", "7,50", "1,17", "13,33", "256,512")
        ),
        {"LLP_FAST_CPU_NO_BOUND": "1", "LLP_FAST_CPU_NO_ESTIMATE": "1"},
        {"LLP_FAST_CPU_BF16_GEMM": "1"},
        {"LLP_FAST_CPU_BF16_GEMM": "1", "LLP_FAST_CPU_NO_BLAS": "1", "LLP_FAST_CPU_FUSED": "0"},
        *(
            {"LLP_FAST_CPU_BF16_GEMM": "avx512bf16", "LLP_FAST_CPU_TILE": tile}
            for tile in ("8,64", "7,50", "1,17", "13,33", "256,512")
            if " avx512_bf16" in _flags()
        ),
        *([{"LLP_FAST_CPU_BF16_GEMM": "avx512bf16", "LLP_FAST_CPU_FUSED": "0"}] if " avx512_bf16" in _flags() else []),
    ],
)
def test_every_scan_variant_and_the_mm_out_tile(env):
    """Each scan variant this CPU can run, the tile from at::mm_out instead of the BLAS symbol, the
    fused tile (csrc/cpu/tile_f32.cpp) at each width the CPU has (AVX2: 6 x 16 blocks; AVX-512:
    12 x 32) on tiles whose rows and keys do not fill its panels, bf16 tiles from the CPU's bf16 dot
    products (dot_bf16_tile, where it has AVX512-BF16; odd D, partial panels), and bf16
    blocks multiplied by the bf16 GEMM (on any CPU here; by default only where AMX-BF16 makes it
    fast), in a child process (each choice is made once per process): fp32 and
    bf16 inputs against the reference, and keys in two chunks equal to one call; a masked key with NaN
    scores next to a query's best key does not hide it."""
    child_env = {**os.environ, "LLP_FAST_CPU_TILE": "8,64", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=child_env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


WIDTHS = (
    CHILD_HEAD
    + """unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
for q, n, d, k in json.loads(sys.argv[3]):
    args = (unit(q, d), unit(n, d), k, 0.07, torch.rand(n, generator=g) * 2 - 1, torch.rand(n, generator=g) < 0.8)
    out.append(op(*args, None, None, 0))
# Small K with one bias for every key that can score (AVX-512 then skips a row's block of keys on its
# raw products, from a threshold worked back through the scale and the bias), at several tau; the
# first 600 keys masked (whole tiles of them); and K = 17..48 (cut at 3K in registers), with duplicate keys.
queries, keys = unit(41, 24), unit(2600, 24)
mask = torch.arange(2600) >= 600
for tau in (0.07, 0.3, 1 / 3, 1.0):
    for k in (1, 10, 16):
        out.append(op(queries, keys, k, tau, None, None, None, None, 0))
        out.append(op(queries, keys, k, tau, torch.full((2600,), 2.5), mask, None, None, 0))
for k in (17, 25, 40, 48, 100):  # K = 100: a whole masked tile is skipped by its raw products at any K
    out.append(op(queries, keys, k, 0.07, torch.rand(2600, generator=g), mask, None, None, 0))
    out.append(op(queries, unit(9, 24)[torch.randint(0, 9, (2600,), generator=g)], k, 0.07, None, None, None, None, 0))
# Scores that rise with the key index: every block of every row appends and the buffers are cut again
# and again, at small and large K.
e = unit(1, 16)
ramp = torch.linspace(0, 1, 3000)[:, None]
keys = torch.nn.functional.normalize(ramp * e + (1 - ramp) * unit(3000, 16) * 0.3, dim=1)
for k in (10, 150, 1000):
    out.append(op(unit(23, 16) * 0.2 + e, keys, k, 0.07, None, None, None, None, 0))
"""
    + CHILD_TAIL
)


@pytest.mark.skipif(len(_fused_widths()) < 2, reason="needs a CPU with both AVX2 and AVX-512")
@pytest.mark.parametrize("seed", [1, 2])
def test_fused_widths_give_the_same_bits(seed, tmp_path):
    """The fused tile's AVX2 and AVX-512 loops compute every score as the same FMA sequence over d:
    on fresh random inputs with odd shapes (tiles of 7 x 50 and 256 x 512: partial panels, the first
    tile stored and scanned, the rest compared in registers), both give the same values and indices,
    bit for bit, and equal to the BLAS tile's within rounding; also with scores that rise with the
    key index (every block appends, the buffers cut again and again)."""
    outs = {}
    for width in ("avx2", "avx512", "0"):
        for tile in ("7,50", "256,512"):
            env = {"LLP_FAST_CPU_FUSED": width, "LLP_FAST_CPU_TILE": tile}
            outs[width, tile] = _child(WIDTHS, tmp_path / f"{width}-{tile}.pt", seed, env)
    for tile in ("7,50", "256,512"):
        for (v2, i2), (v5, i5), (vb, ib) in zip(outs["avx2", tile], outs["avx512", tile], outs["0", tile]):
            assert torch.equal(v2, v5) and torch.equal(i2, i5)
            torch.testing.assert_close(v5, vb, rtol=0, atol=1e-5)
            assert torch.equal(i5 < 0, ib < 0)


FLOAT64 = (
    CHILD_HEAD
    + """for q, n, d, k in json.loads(sys.argv[3]):
    queries = torch.randn(q, d, generator=g, dtype=torch.float64)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    bias = torch.rand(n, generator=g, dtype=torch.float64)
    v, i = op(queries, keys, k, 0.07, bias, None, None, None, 0)
    # every key moved by s places (wrapping): each key's score the same bits wherever it falls
    for s in (1, 3, 8, 501):
        v2, i2 = op(queries, keys.roll(s, 0), k, 0.07, bias.roll(s, 0), None, None, None, 0)
        assert torch.equal(v2.sort(dim=1).values, v.sort(dim=1).values), (q, n, d, k, s)
    out.append((v, i))
"""
    + CHILD_TAIL
)


@pytest.mark.parametrize("seed", [1, 2])
def test_float64_scores_do_not_depend_on_the_key_position(seed, tmp_path):
    """float64 tiles come from our own loop (each score summed in order of d, a multiply and an add),
    not the BLAS, whose dgemm (MKL on an AMD EPYC, Zen 4) rounded a key's products differently by
    its column in the tile, so that chunked calls did not merge exactly: on fresh random inputs with
    odd shapes, keys moved by 1, 3, 8 and 501 places give the same values bit for bit, every loop
    width this CPU runs (AVX-512, AVX2, baseline) gives the same bits, and those equal a float64 brute
    force within its rounding."""
    outs = {}
    for width in (*_fused_widths(), "0"):
        env = {"LLP_FAST_CPU_FUSED": width, "LLP_FAST_CPU_TILE": "7,50"}
        outs[width] = _child(FLOAT64, tmp_path / f"{width}.pt", seed, env)
    first = outs.pop("0")
    for other in outs.values():
        for (v0, i0), (v1, i1) in zip(first, other):
            assert torch.equal(v0, v1) and torch.equal(i0, i1)
    g = torch.Generator().manual_seed(seed)  # the child's inputs again, for the brute force
    for (q, n, d, k), (v, i) in zip(ODD_SHAPES, first):
        queries, keys = (
            torch.randn(q, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64),
        )
        bias = torch.rand(n, generator=g, dtype=torch.float64)
        full = (queries[:, None, :] * keys[None, :, :]).sum(-1) * (1 / 0.07) + bias
        ref = full.topk(min(k, n), dim=1).values
        torch.testing.assert_close(v, ref, rtol=0, atol=1e-10)
        assert torch.allclose(full.gather(1, i), v, rtol=0, atol=1e-10)


DOT = (
    CHILD_HEAD
    + """for q, n, d, k in json.loads(sys.argv[3]):
    queries = torch.randn(q, d, generator=g).bfloat16()
    keys = torch.randn(n, d, generator=g).bfloat16()
    bias, mask = torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.8
    v, i = op(queries, keys, k, 0.07, bias, mask, None, None, 0)
    for s in (1, 7, 501):  # each key's score the same bits wherever it falls
        v2, _ = op(queries, keys.roll(s, 0), k, 0.07, bias.roll(s, 0), mask.roll(s, 0), None, None, 0)
        assert torch.equal(v2, v), (q, n, d, k, s)
    out.append((v, i))
"""
    + CHILD_TAIL
)


@pytest.mark.skipif(" avx512_bf16" not in _flags() or " avx512bw" not in _flags(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("seed", [1, 2])
def test_bf16_dot_products_fused_and_stored_give_the_same_bits(seed, tmp_path):
    """bf16 queries and keys on a CPU with AVX512-BF16 (csrc/cpu/tile_f32.cpp's loop with the bf16 dot
    product, and dot_bf16_tile's stored tile): on fresh random inputs with odd D, partial panels
    and a mask, the fused tile (compared in registers) and the stored tile (LLP_FAST_CPU_FUSED=0: the
    tile written, then scanned) give the same values and indices bit for bit, a key's score does not
    depend on where it falls, and the scores equal a float64 brute force over the same bf16 values
    within float32 summation."""
    outs = {}
    for fused in ("1", "0"):
        env = {"LLP_FAST_CPU_BF16_GEMM": "avx512bf16", "LLP_FAST_CPU_FUSED": fused}
        outs[fused] = _child(DOT, tmp_path / f"{fused}.pt", seed, env)
    g = torch.Generator().manual_seed(seed)  # the child's inputs again, for the brute force
    for (q, n, d, k), (v, i), (vs, is_) in zip(ODD_SHAPES, outs["1"], outs["0"]):
        assert torch.equal(v, vs) and torch.equal(i, is_)
        queries = torch.randn(q, d, generator=g).bfloat16().double()
        keys = torch.randn(n, d, generator=g).bfloat16().double()
        bias, mask = torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.8
        full = (queries @ keys.T) * float(torch.tensor(1 / 0.07, dtype=torch.float32)) + bias.double()
        full[:, ~mask] = -float("inf")
        ref = full.topk(min(k, n), dim=1).values
        torch.testing.assert_close(v.double(), ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("value", ["yes", "avx1024"])
def test_fused_setting_names_a_width(value):
    """LLP_FAST_CPU_FUSED set to something that names no width is an error naming the variable, not
    a silent choice."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLP_FAST_CPU_FUSED": value}
    code = (
        "import torch; from llp_fast import _ext; _ext.load(); x = torch.randn(300, 8); "
        "torch.ops.llp_fast.topk_scores.default(x, x, 3, 0.07, None, None, None, None, 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "LLP_FAST_CPU_FUSED must be 0, 1, avx2 or avx512" in proc.stderr, proc.stderr[
        -2000:
    ]


APPROX = """
import os
import sys
import torch
from llp_fast import _ext
assert _ext.load() is not None
op = torch.ops.llp_fast.topk_scores.default
g = torch.Generator().manual_seed(int(sys.argv[1]))
ri = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
def both(*args, fn=op):
    os.environ["LLP_FAST_CPU_APPROX"] = "0"
    exact = fn(*args)
    os.environ["LLP_FAST_CPU_APPROX"] = "2"
    return exact, fn(*args)
pairs = []
for case in range(int(sys.argv[2])):
    q_n, m_n, d = ri(1, 200), ri(49, 700), ri(1, 70)
    k = (ri(1, 12), ri(13, 32), ri(33, 215))[ri(0, 2)]  # the three sizes of approx_k (> 200: not taken)
    kind = case % 9
    q, m = torch.randn(q_n, d, generator=g), torch.randn(m_n, d, generator=g)
    if kind == 1:
        q, m = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(m, dim=1)
    if kind == 2:  # duplicate keys: equal scores
        m[m_n // 2 :] = m[: m_n - m_n // 2].clone()
    if kind == 3:  # integer coordinates: many equal scores
        q, m = q.round(), m.round()
    if kind == 4:  # large queries, small keys of different norms
        q, m = q * 1e3, m * 1e-3 * torch.rand(m_n, 1, generator=g)
    if kind == 5:  # products below float32's normal range
        q, m = q * 1e-20, m * 1e-20
    if kind == 6:  # key norms twelve orders of magnitude apart
        m = m * torch.logspace(-6, 6, m_n)[torch.randperm(m_n, generator=g)][:, None]
    if kind == 7:  # query rows that are not finite
        q[0, 0], q[-1, -1] = float("nan"), float("inf")
    if kind == 8 and d > 1:  # every coordinate of a query equal
        q = q[:, :1].expand(q_n, d).contiguous()
    bias = torch.randn(m_n, generator=g) * (0.0, 1.0, 10.0)[case % 3]
    mask = None
    if case % 4 == 0:
        mask = torch.rand(m_n, generator=g) > 0.3
        if case % 8 == 0:
            m[~mask] = float("nan")  # masked keys are never read
    tau = (0.07, 0.005, 1.0, 5.0)[ri(0, 3)]
    pairs.append(both(q, m, k, tau, bias, mask, None, None, 0))
# Edge cases a review found (each once wrong): a finite key or query that rounds to bf16 infinity,
# squares below float32's range, a denormal query (the bf16 GEMM reads it as zero), a scale that
# underflows.
big = torch.finfo(torch.float32).max
m = torch.ones(17, 1)
m[0] = big
pairs.append(both(torch.zeros(1, 1), m, 1, 1.0, torch.cat([torch.zeros(1), -torch.ones(16)]), None, None, None, 0))
m = torch.zeros(30, 2)
m[:10, 1], m[10:, 0] = torch.arange(10.0), -1.0
pairs.append(both(torch.tensor([[big, 1.0]]), m, 3, 1.0, None, None, None, None, 0))
m = torch.zeros(21, 2)
m[0], m[20] = torch.tensor([2.0**50, 0.0]), torch.tensor([-(2.0**62), 2.0**62])
pairs.append(both(torch.tensor([[2.0**-80, 2.0**-80 * (1 + 2.0**-9)]]), m, 1, 1.0, None, None, None, None, 0))
m, b = torch.zeros(20, 32), torch.zeros(20)
m[16], b[0], b[16], b[17:] = 2.0**61, 2.0**-66, -(2.0**-70), -(2.0**-62)
pairs.append(both(torch.full((1, 32), 2.0**-130), m, 1, 1.0, b, None, None, None, 0))
m = torch.zeros(32, 1)
m[:15], m[15], m[20] = 2.0**-58, 1.25 * 2.0**-58, 1.5 * 2.0**-58
pairs.append(both(torch.tensor([[(1 + 2.0**-10) * 2.0**10]]), m, 1, 2.0**100, None, None, None, None, 0))
# A product sum that overflows while the scaled score would not (tau = 2^100): the bound assumes none
# does, so such a row runs the exact path (a review's case: the band then kept only the keys whose bf16
# score was +inf, one of them -inf exactly).
a = 2.0**66
for first in ([-a, a], [a, -a]):
    m = torch.ones(40, 2)
    m[0], m[1] = torch.tensor(first), torch.tensor([2.0**60, 2.0**60])
    pairs.append(both(torch.tensor([[a, a]]), m, 1, 2.0**100, None, None, None, None, 0))
# A key that wins exactly but whose bf16 score sits about 1.4 e below the k-th bf16 score (x against
# y; k - 1 keys along q above both, shorter than x so that the bound stays as tight; zeros below): the
# band must reach that far (with e in place of 2 e it did not), and the pass decides it (the report
# after each BAND line: no row ran the exact path).
hi, lo = 1 + 2.0**-8 - 2.0**-20, 1 + 2.0**-7 + 2.0**-8 + 2.0**-20
q = torch.tensor([[hi] * 16 + [lo] * 16])
x, y = torch.tensor([0.50390625] * 16 + [0.0] * 16), torch.tensor([0.0] * 16 + [0.5] * 16)
for k in (1, 41, 151):
    m = torch.zeros(400, 32)
    m[: k - 1] = torch.nn.functional.normalize(q, dim=1) * 1.8
    m[k - 1], m[k] = x, y
    print("BAND", k, file=sys.stderr, flush=True)
    pairs.append(both(q, m, k, 1.0, None, None, None, None, 0))
    assert pairs[-1][0][1][0, k - 1].item() == k - 1, pairs[-1][0][1][0, k - 1]
# Keys in chunks merged with init= (the earlier chunks' running top k): equal to one call, both ways.
q, m = torch.randn(120, 24, generator=g), torch.randn(900, 24, generator=g)
bias = torch.randn(900, generator=g)
for path in ("0", "2"):
    os.environ["LLP_FAST_CPU_APPROX"] = path
    whole = op(q, m, 10, 0.07, bias, None, None, None, 0)
    state = None
    for a in range(0, 900, 300):
        init = (None, None) if state is None else state
        state = op(q, m[a : a + 300], 10, 0.07, bias[a : a + 300], None, *init, a)
    assert torch.equal(whole[0], state[0]) and torch.equal(whole[1], state[1]), path
    pairs.append((whole, state))
# Strided queries, and flushed denormals.
q, m = torch.randn(90, 64, generator=g)[:, ::2], torch.randn(400, 32, generator=g)
pairs.append(both(q, m, 10, 0.07, None, None, None, None, 0))
torch.set_flush_denormal(True)
pairs.append(both(q * 1e-20, m * 1e-19, 5, 0.07, None, None, None, None, 0))
torch.set_flush_denormal(False)
# propagate's own op (its selection is topk_scores').
unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
args = (unit(300, 40), unit(500, 40), torch.randint(0, 7, (500,), generator=g), torch.rand(500, generator=g))
pairs.append(both(args[0], args[1], 10, 0.07, -args[3], None, None, None, 0))  # its selection
torch.ops.llp_fast.propagate.default(*args, 10, 0.07, 7)  # ATen's exp may round a first call differently
pairs.append(both(*args, 10, 0.07, 7, fn=torch.ops.llp_fast.propagate.default))
for exact, approx in pairs:
    for a, b in zip(exact, approx):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (a, b)
print("ok")
"""


@pytest.mark.skipif(" avx512f" not in _flags() or " fma" not in _flags(), reason="needs a CPU with AVX-512")
@pytest.mark.parametrize(
    "source", ["1", *(["avx512bf16"] if " avx512_bf16" in _flags() else [])], ids=lambda s: f"bf16-{s}"
)
@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_pass_gives_the_exact_paths_bits(seed, source):
    """float32 inputs at k <= 215 where a bf16 GEMM runs (here forced with LLP_FAST_CPU_BF16_GEMM=1:
    MKL's, and =avx512bf16 where the CPU has it: the fused tile's bf16 dot products; LLP_FAST_CPU_APPROX=2
    takes calls of any size) are selected from bf16 scores and refined exactly
    (csrc/cpu/topk.h approx_topk): on fresh random inputs of odd shapes, with equal scores, extreme
    and far-apart norms, products below the normal range, rows that are not finite, masked keys
    that are NaN, values that round to bf16 infinity or to bf16 denormals, norms whose squares
    leave float32's range, a scale that underflows, product sums that overflow, a winner far down
    the bf16 order, strided queries, flushed denormals and through propagate's op, the values and
    indices equal the exact path's bit for bit; both ways of finishing a row (refined, and run
    again exactly where its scores crowd within the bound) are taken."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "LLP_FAST_CPU_BF16_GEMM": source,
        "LLP_FAST_CPU_FUSED": "avx512",
        "LLP_FAST_CPU_APPROX_REPORT": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", APPROX, str(seed), "120"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    band = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("BAND")]
    assert len(band) == 3 and all(b.startswith("llp_fast approx_topk: 1 rows, 0 exact") for b in band), band
    reports = [line.split() for line in lines if line.startswith("llp_fast approx_topk:")]
    rows = sum(int(r[2]) for r in reports)
    exact = sum(int(r[4]) for r in reports)
    assert len(reports) >= 100 and 0 < exact < rows, (len(reports), rows, exact)


@pytest.mark.skipif(" avx512f" not in _flags() or " fma" not in _flags(), reason="needs a CPU with AVX-512")
def test_the_bf16_pass_above_k_32_needs_36_k_keys():
    """With the default setting the pass serves k > 32 only against at least 36 k keys that can score
    (below that the refinement costs what the pass saves; csrc/cpu/topk.h approx_topk): k = 50 over
    1,800 keys takes it, over 1,799 (or 1,800 with one masked) does not, and the answers are the exact
    path's all the same."""
    code = """
import os, sys, torch
from llp_fast import _ext
assert _ext.load() is not None
op = torch.ops.llp_fast.topk_scores.default
g = torch.Generator().manual_seed(5)
q = torch.randn(2400, 16, generator=g)
m = torch.randn(1800, 16, generator=g)
mask = torch.ones(1800, dtype=torch.bool)
mask[7] = False
for keys, km in ((m, None), (m[:1799], None), (m, mask)):
    print("CALL", keys.shape[0], km is not None, file=sys.stderr, flush=True)
    got = op(q, keys, 50, 0.07, None, km, None, None, 0)
    os.environ["LLP_FAST_CPU_APPROX"] = "0"
    want = op(q, keys, 50, 0.07, None, km, None, None, 0)
    del os.environ["LLP_FAST_CPU_APPROX"]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLP_FAST_")}
    env.update(OMP_NUM_THREADS="1", LLP_FAST_CPU_BF16_GEMM="1", LLP_FAST_CPU_APPROX_REPORT="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    took = [
        lines[i + 1].startswith("llp_fast approx_topk: 2400 rows") if i + 1 < len(lines) else False
        for i, line in enumerate(lines)
        if line.startswith("CALL")
    ]
    assert took == [True, False, False], proc.stderr[-3000:]


def test_approx_setting_is_checked():
    """LLP_FAST_CPU_APPROX set to something other than 0, 1 or 2 is an error naming the variable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLP_FAST_CPU_APPROX": "yes"}
    code = (
        "import torch; from llp_fast import _ext; _ext.load(); x = torch.randn(300, 8); "
        "torch.ops.llp_fast.topk_scores.default(x, x, 3, 0.07, None, None, None, None, 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "LLP_FAST_CPU_APPROX must be 0, 1 or 2" in proc.stderr, proc.stderr[-2000:]
