"""Shared benchmark plumbing: timing, correctness checks, result rows, JSON output, tables.

Every ``bench_<op>.py`` is a module with the same few names (``OP``, ``PROVIDERS``,
``shapes``, ``make_inputs``, ``available``, ``check_shape``, ``compare``, ``flops``, ``skip``)
that :func:`run` drives: correctness of every provider against ``llp_fast.reference`` first,
then the median of several runs of each (CUDA events on the GPU; on CPU, interleaved rounds
timed by ``perf_counter`` and process CPU time, so that a change of load on a shared machine
hits every provider alike), and rows with op, provider, shape, dtype, median, device name,
library versions, git commit and (CPU) the ISA flags and the extension's CPU paths written to
``bench/results/<op>-<device>.json`` (a CPU's device: model name, widest instruction set, threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """Where results files go by default: ``$OUT`` when set (a GPU session's results come back from
    there), else bench/results."""
    return Path(os.environ.get("OUT") or RESULTS)


if str(ROOT) not in sys.path:  # run as `python bench/bench_x.py` from a source checkout
    sys.path.insert(0, str(ROOT))

from llp_fast import _optional  # noqa: E402

# Chunk budget of the naive and mm_only providers on a GPU: score-tile elements held at once
# (1 GiB of fp32). On CPU they take the reference's tiles, which stay in cache.
CHUNK_ELEMENTS = int(os.environ.get("LLP_FAST_BENCH_CHUNK", str(1 << 28)))


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark configuration; ``label`` names it in tables ("imagenet", "step", ...)."""

    label: str
    q: int  # queries (propagate), labeled rows (density), batch B (loss)
    m: int  # keys: labeled rows, bank rows
    d: int = 128
    k: int = 10  # K, T; unused by the loss
    num_classes: int = 1000

    def __str__(self) -> str:
        return f"{self.label}:q={self.q},m={self.m},d={self.d},k={self.k}"


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    shape: str
    dtype: str
    median_ms: float
    device: str
    torch: str
    triton: str | None
    commit: str
    reps: int
    extra: dict = dataclasses.field(default_factory=dict)
    cpu: dict | None = None  # CPU rows: cpu_info(), the ISA flags and the extension's CPU paths
    command: str = dataclasses.field(default_factory=lambda: command_line())  # what ran, flags and all


def command_line() -> str:
    """The command this process runs, as typed from the repository's root (``python bench/x.py
    --flags``): every results file records it beside its numbers."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if sys.argv and sys.argv[0] else "?"
    return " ".join(["python", script, *sys.argv[1:]])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# /proc/cpuinfo flags that decide the CPU kernels' paths, and the widest of them (first found) that names
# the CPU kind: one model name ("AMD EPYC") covers AVX2-only and AVX-512 (Zen 4) machines alike.
ISA_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "avx2", "fma")
WIDEST_ISA = (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The ``ISA_FLAGS`` this CPU has (from /proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return tuple(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return ()


def cpu_kind() -> str:
    """The widest instruction set of ``WIDEST_ISA`` this CPU has ("amx", "avx512bf16", "avx512", "avx2"),
    or "" where none is known: part of the CPU's device name and results file names."""
    return next((tag for flag, tag in WIDEST_ISA if flag in cpu_flags()), "")


@functools.cache
def cpu_info() -> dict:
    """What a CPU row records of the machine: its ISA flags and the extension's CPU paths
    (``llp_fast._ext.cpu_paths()``: the scan, the fused tile, bf16 tiles; None without the extension)."""
    try:
        from llp_fast import _ext

        paths = _ext.cpu_paths()
    except Exception as e:  # an LLP_FAST_CPU_* setting that names nothing: recorded, as the op would say
        paths = f"error: {e}"
    return {"isa": list(cpu_flags()), "cpu_paths": paths}


@functools.cache
def device_name(dev: str | None = None) -> str:
    """The GPU's name, or the CPU's model name, its widest instruction set (``cpu_kind``) and threads
    (rows and files written before the instruction set was added lack it)."""
    dev = dev or device().type
    if dev == "cuda":
        return torch.cuda.get_device_name()
    kind = cpu_kind()
    return f"{cpu_name()}{' ' + kind if kind else ''} x{torch.get_num_threads()} threads"


def device_slug(dev: str | None = None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name(dev).lower()).strip("-")


@functools.cache
def git_commit() -> str:
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        out, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "-uno")
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def triton_version() -> str | None:
    t = _optional.triton()
    return getattr(t, "__version__", None) if t is not None else None


def triton_kernels():
    """``llp_fast.kernels`` when it can run here (triton and a GPU), else None: the triton
    provider is skipped on CPU, where only the (far too slow) interpreter could run it."""
    if not torch.cuda.is_available():
        return None
    return _optional.kernels()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one ``fn()``: CUDA events when ``cuda`` (no host sync inside the timed
    region), else ``perf_counter``."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_interleaved(fns: dict[object, Callable[[], object]], *, reps: int = 10, max_seconds: float = 20.0):
    """{name: (median wall ms, runs, median process-CPU ms)} of CPU providers timed in rounds,
    each round running every provider once in turn after one warm-up call each.

    Interleaving makes a change of machine load hit every provider alike, so the ratios of
    one run hold even on a shared machine; process CPU time (all threads) is less sensitive
    to other jobs than wall time. Rounds stop once ``max_seconds`` are spent, keeping one."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    t_start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            c0 = time.process_time()
            wall[name].append(timed_call(fn, cuda=False))
            cpu[name].append((time.process_time() - c0) * 1e3)
        if time.perf_counter() - t_start > max_seconds:
            break
    return {name: (statistics.median(wall[name]), len(wall[name]), statistics.median(cpu[name])) for name in fns}


def measure(fn: Callable[[], object], *, reps: int = 10, warmup: int = 2, max_seconds: float = 20.0):
    """(median milliseconds, runs): ``fn`` timed ``reps`` times after ``warmup`` calls.

    CUDA events on the GPU (no host sync inside the timed region), ``perf_counter`` on CPU.
    Runs stop early once ``max_seconds`` are spent (slow baselines at the ImageNet shape),
    keeping at least one."""
    cuda = torch.cuda.is_available()
    t_start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - t_start > max_seconds / 4:
            break
    synchronize()
    times: list[float] = []
    t_start = time.perf_counter()
    for _ in range(reps):
        times.append(timed_call(fn, cuda))
        if time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times), len(times)


def peak_extra_mb(fn: Callable[[], object], baseline_bytes: int | None = None) -> float | None:
    """Peak CUDA memory allocated by ``fn`` beyond what was allocated before, in MB."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    before = torch.cuda.memory_allocated() if baseline_bytes is None else baseline_bytes
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def row(op: str, provider: str, shape: Shape, dtype: torch.dtype, ms: float, reps: int, **extra) -> Row:
    return Row(
        op=op,
        provider=provider,
        shape=str(shape),
        dtype=str(dtype).removeprefix("torch."),
        median_ms=round(ms, 4),
        device=device_name(),
        torch=torch.__version__,
        triton=triton_version(),
        commit=git_commit(),
        reps=reps,
        extra=extra,
        cpu=cpu_info() if device().type == "cpu" else None,
    )


def write_results(
    name: str, rows: list[Row], out_dir: Path | None = None, dev: str | None = None, tag: str | None = None
) -> Path:
    """Writes ``rows`` to ``<out_dir or bench/results>/<name>-<device>[-<tag>].json`` (``dev``:
    "cuda" or "cpu", default the GPU when there is one; ``tag``: keeps a run beside the others of
    its op and device instead of replacing the last one)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_slug(dev)}{'-' + tag if tag else ''}.json"
    path.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return path


def table(rows: list[Row], *, baseline: str = "naive", floor: str = "mm_only") -> str:
    """Markdown table with each row's speed-up over ``baseline``, its time as a multiple of
    ``floor`` on the same shape/dtype and, on CPU, its GEMM rate: the ``gemm_tile`` provider's time
    over its own (docs/method.md §4's 90% bar), in wall and in process CPU time."""
    times = lambda name, key="median_ms": {
        (r.shape, r.dtype): (r.median_ms if key == "median_ms" else r.extra.get(key))
        for r in rows
        if r.provider == name
    }
    base, low, tile, tile_cpu = times(baseline), times(floor), times("gemm_tile"), times("gemm_tile", "cpu_ms")
    lines = [
        f"| op | shape | dtype | provider | median ms | {baseline}/x | x/{floor} | GEMM rate (cpu) | notes |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b, f, t = base.get((r.shape, r.dtype)), low.get((r.shape, r.dtype)), tile.get((r.shape, r.dtype))
        tc, cpu = tile_cpu.get((r.shape, r.dtype)), r.extra.get("cpu_ms")
        ratio = f"{b / r.median_ms:.2f}x" if b and r.median_ms > 0 else ""
        share = f"{r.median_ms / f:.2f}x" if f else ""
        rate = f"{t / r.median_ms:.0%}" if t and r.median_ms > 0 else ""
        rate += f" ({tc / cpu:.0%})" if tc and cpu else ""
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.provider} | {r.median_ms:.3f} | {ratio} | {share} | {rate} |"
            f" {notes} |"
        )
    return "\n".join(lines)


def sweep_ratios(rows: list[Row], provider: str = "extension") -> str:
    """For a K/T sweep (shape labels k10, k25, ... or t25, t100, ...): ``provider``'s time at each K
    over its time at the sweep's first K, wall and process CPU time (docs/method.md §4's 1.5x / 3x
    bars), as one line; empty when the rows hold no sweep."""
    mine = [r for r in rows if r.provider == provider and re.match(r"[kt]\d+:", r.shape)]
    if len(mine) < 2:
        return ""
    first = mine[0]
    parts = []
    for r in [r for r in mine[1:] if r.dtype == first.dtype]:
        cpu = r.extra.get("cpu_ms"), first.extra.get("cpu_ms")
        c = f", cpu {cpu[0] / cpu[1]:.2f}x" if all(cpu) else ""
        parts.append(f"{r.shape.split(':')[0]} {r.median_ms / first.median_ms:.2f}x{c}")
    return f"{provider} over {first.shape.split(':')[0]} ({first.dtype}): " + "; ".join(parts)


def unit_rows(n: int, d: int, dtype: torch.dtype, dev: torch.device, seed: int) -> torch.Tensor:
    """Random unit rows, generated in chunks on the device (ImageNet banks are 1.3M rows)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(n, d, dtype=dtype, device=dev)
    step = 1 << 18
    for r0 in range(0, n, step):
        x = torch.randn(min(step, n - r0), d, generator=g, device=dev)
        out[r0 : r0 + step] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def row_chunk(n_cols: int, n_rows: int | None = None) -> int:
    """Rows of a (rows, n_cols) score chunk of the naive and mm_only providers."""
    if not torch.cuda.is_available() and "LLP_FAST_BENCH_CHUNK" not in os.environ:
        from llp_fast.reference import tile_shape

        return tile_shape(n_rows or 1 << 30, n_cols)[0]
    return max(1, CHUNK_ELEMENTS // max(n_cols, 1))


def mm_only(queries: torch.Tensor, keys: torch.Tensor, tau: float, bias: torch.Tensor | None = None):
    """The floor proxy: chunked ``torch.mm`` producing the scores (in the input dtype, as
    the fastest GEMM does) into a preallocated output; no scaling, no selection."""
    rc = row_chunk(keys.shape[0], queries.shape[0])
    buf = torch.empty(min(rc, queries.shape[0]), keys.shape[0], dtype=queries.dtype, device=queries.device)
    kt = keys.T
    for r0 in range(0, queries.shape[0], rc):
        q = queries[r0 : r0 + rc]
        torch.mm(q, kt, out=buf[: q.shape[0]])
    return buf


_TILE: dict = {}


def gemm_tile(queries: torch.Tensor, keys: torch.Tensor, tau: float = 1.0):
    """The GEMM-rate floor of the fused CPU kernel: one 256 x 512 x D score tile's ``torch.mm``
    (the tile the kernel multiplies, csrc/cpu/topk.h) in the queries' dtype (bf16 runs MKL's bf16
    GEMM, on AMX where the CPU has it), repeated for as many multiply-adds as the whole (Q, M)
    problem holds. Its time is the problem's time at that tile's GEMM rate."""
    d, dtype = queries.shape[1], queries.dtype
    if (d, dtype) not in _TILE:
        _TILE[d, dtype] = (
            torch.randn(256, d).to(dtype),
            torch.randn(512, d).to(dtype),
            torch.empty(256, 512, dtype=dtype),
        )
    a, b, c = _TILE[d, dtype]
    for _ in range(max(1, round(queries.shape[0] * keys.shape[0] / (256 * 512)))):
        torch.mm(a, b.T, out=c)
    return c


def kept_for(cache: dict, tensors: tuple, build: Callable[[], object], *extra):
    """``build()`` once per set of ``tensors`` (by identity: the same objects, alive) and ``extra``
    values, kept in ``cache`` while they live: several shapes timed in interleaved rounds each keep
    theirs, where one slot for the last set rebuilt it on every timed call."""
    key = (*(id(t) if t is not None else None for t in tensors), *extra)
    for k in [k for k, (refs, _) in cache.items() if any(r is not None and r() is None for r in refs)]:
        del cache[k]  # a set whose tensors are gone (its ids may be reused)
    hit = cache.get(key)
    if hit is None or any((r() if r is not None else None) is not t for r, t in zip(hit[0], tensors)):
        hit = cache[key] = (tuple(weakref.ref(t) if t is not None else None for t in tensors), build())
    return hit[1]


_FAISS: dict = {}  # (keys, bias, tau) -> its index


def faiss_index(keys: torch.Tensor, tau: float, bias: torch.Tensor | None):
    """A flat inner-product index over ``[keys / tau, -bias]`` (``keys`` alone without a bias),
    built once per key set (outside the timing, like the other providers' inputs)."""
    import faiss

    def build():
        kk = keys.float() if bias is None else torch.cat([keys.float() / tau, -bias.float()[:, None]], dim=1)
        index = faiss.IndexFlatIP(kk.shape[1])
        index.add(kk.contiguous().numpy())
        return index

    return kept_for(_FAISS, (keys, bias), build, tau)


def faiss_search(queries: torch.Tensor, keys: torch.Tensor, k: int, tau: float, bias: torch.Tensor | None = None):
    """(scores, indices) of the ``k`` best keys per query by faiss-cpu's flat inner-product
    search: ``q . m / tau - bias`` with a bias (through [q, 1] . [m / tau, -bias]), the raw
    similarity ``q . m`` without."""
    q = queries.float() if bias is None else torch.cat([queries.float(), torch.ones(queries.shape[0], 1)], dim=1)
    scores, idx = faiss_index(keys, tau, bias).search(q.contiguous().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(idx)


def available(name: str) -> bool:
    """Whether a provider can run here: ``triton*`` needs a GPU and the kernels,
    ``extension`` the compiled CPU kernels (and no GPU: on a GPU the benches time its
    kernels), ``faiss`` faiss-cpu (CPU runs only); every other provider always runs."""
    if name.startswith("triton"):
        return triton_kernels() is not None
    if name == "extension":
        return extension_loaded()
    if name == "faiss":
        return not torch.cuda.is_available() and importlib.util.find_spec("faiss") is not None
    if name == "gemm_tile":
        return not torch.cuda.is_available()
    return True


def matmul_flops(shape: Shape) -> float:
    """The useful work of a (q x m) score matrix of dot products of length d."""
    return 2.0 * shape.q * shape.m * shape.d


def skip_slow_reference(name: str, shape: Shape) -> bool:
    """Leaves the chunked reference out of shapes where one run takes minutes (ImageNet)."""
    return name == "reference" and shape.q * shape.m > 2e10


def extension_loaded() -> bool:
    """The compiled extension serves this machine's CPU ops (the ``extension`` providers)."""
    from llp_fast import _ext

    return not torch.cuda.is_available() and _ext.load() is not None


def benchmark_provider(benchmark, bench, provider: str, *, gpu_shape: int = 0):
    """The pytest-benchmark body of every bench_<op>.py (``bench``, the module): one provider
    at the small float32 shape on CPU, or at the ``gpu_shape``-th per-step bfloat16 shape on a
    GPU."""
    import pytest

    dev = device()
    if not bench.available(provider):
        pytest.skip(f"{provider} is not available on {dev.type}")
    shape = bench.shapes("small")[0] if dev.type == "cpu" else bench.shapes("step")[gpu_shape]
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    check(bench, dtype, [provider], [shape])  # correctness first, as the script mode
    inputs = bench.make_inputs(shape, dtype)
    fn = bench.PROVIDERS[provider]

    def run():
        out = fn(inputs, shape)
        synchronize()
        return out

    benchmark(run)


def entry_points(bench, *, gpu_shape: int = 0, memory: bool = False):
    """``(main, test)`` of a bench_<op>.py (``bench``, the module): ``main(argv)`` runs
    :func:`run` on it; ``test`` is its pytest-benchmark test, one per provider (see
    :func:`benchmark_provider`)."""
    import pytest

    def main(argv=None) -> list[Row]:
        return run(bench, argv, memory=memory)

    @pytest.mark.parametrize("provider", list(bench.PROVIDERS))
    def test(benchmark, provider):
        benchmark_provider(benchmark, bench, provider, gpu_shape=gpu_shape)

    return main, test


class UnknownShapes(KeyError):
    """``--shapes`` names a set the benchmark does not have (its message names the known ones; a KeyError,
    as run_gpu.py catches for a missing set)."""

    def __str__(self) -> str:
        return str(self.args[0])


def pick_shapes(table: dict[str, list[Shape]], which: str) -> list[Shape]:
    """The shapes of the comma list ``which`` of ``table``'s sets; :class:`UnknownShapes` for a name
    not in it (a bare KeyError before)."""
    names = which.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UnknownShapes(f"unknown {', '.join(map(repr, unknown))} (this benchmark has auto, {', '.join(table)})")
    return [s for name in names for s in table[name]]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def dtypes_arg(text: str) -> str:
    if text != "auto":
        bad = [n for n in text.split(",") if n not in ("float32", "bfloat16", "float16", "float64")]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad))} (auto, or a comma list of float32, bfloat16, float16, float64)"
            )
    return text


def parse_args(argv=None, *, description: str = ""):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="auto", help="auto (GPU: step, sweep, imagenet; CPU: small, sweep), or a "
                   "comma list of small, cpu, step, imagenet, sweep, ksweep (K or T from 10 to 1000)")  # fmt: skip
    p.add_argument(
        "--dtypes",
        type=dtypes_arg,
        default="auto",
        help="comma list: float32,bfloat16 (auto: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--providers", default="all", help="comma list of providers to time")
    p.add_argument("--tag", default=None, help="added to the results file's name (a run kept beside the others)")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per (provider, shape)")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or None,
        help="folder for the JSON results (default $OUT if set, else bench/results)",
    )
    args = p.parse_args(argv)
    args.parser = p  # run() names a bad --shapes through it
    return args


def providers_from(bench, arg: str) -> list[str]:
    """``--providers``: "all" (those available here), or names each of which must exist and be
    available (a misspelt or unavailable one wrote an empty results file over the last one)."""
    if arg == "all":
        return [n for n in bench.PROVIDERS if bench.available(n)]
    names = arg.split(",")
    unknown = [n for n in names if n not in bench.PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {', '.join(unknown)} (this benchmark has {', '.join(bench.PROVIDERS)})")
    missing = [n for n in names if not bench.available(n)]
    if missing:
        raise SystemExit(f"--providers: {', '.join(missing)} not available on this machine")
    return names


def dtypes_from(arg: str) -> list[torch.dtype]:
    if arg == "auto":
        return [torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
    return [getattr(torch, name) for name in arg.split(",")]


# Providers that produce no output to compare (timing floors) and the yardstick itself.
UNCHECKED = ("mm_only", "gemm_tile", "bank_read", "reference")
# Providers whose scores are rounded to the inputs' dtype (a GEMM with a bf16 or fp16 output) before
# the float32 work: checked against the reference with a tolerance sized for that rounding
# (:func:`score_ulp`), every other provider with its op's own.
ROUNDED = ("naive",)
REDUCED = (torch.bfloat16, torch.float16)


def slack() -> float:
    """How far a provider that computes float32 products may be from the reference in the checks (a
    score, a log-density, a confidence): 2e-5 on CPU, where every provider here was measured within
    4.3e-6 of it (FAISS's values; 1e-6 for confidences and log-densities; K and T from 10 to 1000,
    float32 and bf16 inputs), so that a provider selecting K - 1 or K + 1 neighbours, or the T+1-th
    in place of the T-th, fails (each passed under the 1e-3 this was); 1e-3 on a GPU, where a Triton
    kernel's products may run in TF32 (not measured yet)."""
    return 1e-3 if torch.cuda.is_available() else 2e-5


def score_ulp(dots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each ``|dot|`` (as float32): twice the worst error of a
    dot product rounded to ``dtype`` (round to nearest), the rounding of a GEMM whose output is ``dtype``.
    Divide by tau for the error of a score ``dot / tau``."""
    a = dots.detach().abs().float().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * torch.finfo(dtype).eps


def check(bench, dtype: torch.dtype, names, shapes=()) -> None:
    """Every provider in ``names`` against the reference provider on ``bench.check_shape()``, once
    at its own K (or T) and class count and once at each K and class count of ``shapes`` (the timed
    shapes: above 32 or 64 other selection schemes run, and the vote has a dense and a sparse path
    chosen by K and the class count, so a check at K = 10 and 50 classes alone never ran the others;
    the class count only where the op votes, ``bench.VOTES``); ``bench.compare(out, ref, dtype,
    inputs, shape=, rounded=)`` raises AssertionError with the numbers when they differ, else returns
    them as a line (``rounded``: the provider rounds its scores to a bf16 or fp16 output, ROUNDED).
    On CPU, where the op selects (``bench.SELECTS``), each timed shape is also checked with its own
    keys and a slice of its queries (at least 2^23 query-key products, as the timed call has): the CPU
    kernel chooses its scheme by how many keys can score too (its bf16 pass above K = 32 needs 36 K of
    them, and 2^22 products), so a check on the check shape's keys alone ran another path than the
    timed one at some K. Nothing is timed after a failure."""
    base = bench.check_shape()
    votes = getattr(bench, "VOTES", False)
    variants = dict.fromkeys(
        [(base.k, base.num_classes), *((s.k, s.num_classes if votes else base.num_classes) for s in shapes)]
    )
    checks = [dataclasses.replace(base, k=min(k, base.m), num_classes=c) for k, c in variants]
    if getattr(bench, "SELECTS", False) and not torch.cuda.is_available():
        timed = (dataclasses.replace(s, label="check", q=min(s.q, max(base.q, -(-(1 << 23) // s.m)))) for s in shapes)
        checks += [s for s in dict.fromkeys(timed) if s not in checks]
    for shape in checks:
        _check_at(bench, dtype, names, shape)


def _check_at(bench, dtype: torch.dtype, names, shape: Shape) -> None:
    inputs = bench.make_inputs(shape, dtype, seed=123)
    ref = bench.PROVIDERS["reference"](inputs, shape)
    for name in names:
        if name in UNCHECKED or bench.skip(name, shape):
            continue
        rounded = name in ROUNDED and dtype in REDUCED
        what = f"{bench.OP}/{name} {str(dtype)[6:]}{' (scores rounded to it)' if rounded else ''} at {shape}"
        what += f", {shape.num_classes} classes" if getattr(bench, "VOTES", False) else ""
        try:
            summary = bench.compare(
                bench.PROVIDERS[name](inputs, shape), ref, dtype, inputs, shape=shape, rounded=rounded
            )
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}; not timing") from None
        print(f"check {what}: {summary}", flush=True)


def run(bench, argv=None, *, memory: bool = False) -> list[Row]:
    """The script mode of a ``bench_<op>.py`` (``bench``, the module): correctness first, then
    every available provider timed on every shape, a table printed and the rows written to
    ``bench/results/<op>-<device>.json``.

    ``bench.PROVIDERS[name](inputs, shape)`` runs one call; ``bench.flops(shape)`` gives the
    useful work (reported as TFLOP/s); ``bench.skip(name, shape)`` leaves a provider out of a
    shape (a baseline that would take minutes); ``memory`` also records the peak extra CUDA
    memory of a call. On CPU every provider on every shape of a dtype is timed in interleaved
    rounds (so that a change of load hits the shapes of a sweep alike, and the ratios between them,
    the K sweeps' bars, hold on a shared machine too) and each row also holds the median process
    CPU time."""
    args = parse_args(argv, description=bench.__doc__)
    names = providers_from(bench, args.providers)
    cuda = torch.cuda.is_available()
    rows = []
    try:
        shapes = bench.shapes(args.shapes)
    except UnknownShapes as e:
        args.parser.error(f"argument --shapes: {e}")
    for dtype in dtypes_from(args.dtypes):
        try:
            check(bench, dtype, names, shapes)
        except AssertionError as e:  # one line with the numbers (it was a traceback, the message last)
            raise SystemExit(f"{bench.OP}: correctness check failed: {e}") from None
        if not cuda:  # one set of rounds over every shape and provider
            inputs = [bench.make_inputs(shape, dtype) for shape in shapes]
            fns = {
                (i, n): functools.partial(bench.PROVIDERS[n], inputs[i], shape)
                for i, shape in enumerate(shapes)
                for n in names
                if not bench.skip(n, shape)
            }
            timed = measure_interleaved(fns, reps=args.reps, max_seconds=args.max_seconds * len(shapes))
            del inputs, fns
        for i, shape in enumerate(shapes):
            if cuda:
                inputs = bench.make_inputs(shape, dtype)
                synchronize()
                fns = {
                    n: functools.partial(bench.PROVIDERS[n], inputs, shape) for n in names if not bench.skip(n, shape)
                }
                timings = {
                    n: (*measure(fn, reps=args.reps, max_seconds=args.max_seconds), None) for n, fn in fns.items()
                }
            else:
                timings = {n: timed[(j, n)] for (j, n) in timed if j == i}
            for name, (ms, reps, cpu_ms) in timings.items():
                extra = {"tflops": float(f"{bench.flops(shape) / (ms * 1e-3) / 1e12:.3g}")}
                if cpu_ms is not None:
                    extra["cpu_ms"] = round(cpu_ms, 3)
                if memory and cuda:
                    extra["extra_mb"] = round(peak_extra_mb(fns[name]), 2)
                rows.append(row(bench.OP, name, shape, dtype, ms, reps, **extra))
                print(f"{shape} {str(dtype)[6:]} {name}: {ms:.3f} ms ({reps} runs)", flush=True)
            if cuda:
                del inputs, fns
    print(table(rows))
    for name in ("extension", "triton", "op"):
        line = sweep_ratios(rows, name)
        if line:
            print(line)
    if not cuda and hasattr(os, "getloadavg"):
        print(f"load average after the run: {os.getloadavg()[0]:.1f} ({device_name()})")
    print("wrote", write_results(bench.OP, rows, args.out, tag=args.tag))
    return rows
