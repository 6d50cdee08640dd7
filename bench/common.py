"""Shared benchmark plumbing: timing, result rows, JSON output, tables.

Every benchmark checks correctness against ``llp_fast.reference`` before timing, takes the
median of several runs (CUDA events on the GPU, ``perf_counter`` on CPU), and writes rows
with op, provider, shape, dtype, median, device name, library versions and git commit to
``bench/results/<name>-<device>.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run as `python bench/bench_x.py` from a source checkout
    sys.path.insert(0, str(ROOT))

from llp_fast import _optional  # noqa: E402

# Chunk budget of the naive and mm_only providers: score-tile elements held at once.
CHUNK_ELEMENTS = int(os.environ.get("LLP_FAST_BENCH_CHUNK", str(1 << 28)))  # 1 GiB of fp32


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


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def device_name(dev: str | None = None) -> str:
    dev = dev or device().type
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


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
    )


def write_results(name: str, rows: list[Row], out_dir: Path | None = None, dev: str | None = None) -> Path:
    """Writes ``rows`` to ``<out_dir or bench/results>/<name>-<device>.json`` (``dev``: "cuda"
    or "cpu", default the GPU when there is one)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_slug(dev)}.json"
    path.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return path


def table(rows: list[Row], *, baseline: str = "naive") -> str:
    """Markdown table with each row's speed-up over ``baseline`` on the same shape/dtype."""
    base = {(r.shape, r.dtype): r.median_ms for r in rows if r.provider == baseline}
    lines = [
        "| op | shape | dtype | provider | median ms | vs " + baseline + " | notes |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        b = base.get((r.shape, r.dtype))
        ratio = f"{b / r.median_ms:.2f}x" if b and r.median_ms > 0 else ""
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.provider} | {r.median_ms:.3f} | {ratio} | {notes} |")
    return "\n".join(lines)


def unit_rows(n: int, d: int, dtype: torch.dtype, dev: torch.device, seed: int) -> torch.Tensor:
    """Random unit rows, generated in chunks on the device (ImageNet banks are 1.3M rows)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(n, d, dtype=dtype, device=dev)
    step = 1 << 18
    for r0 in range(0, n, step):
        x = torch.randn(min(step, n - r0), d, generator=g, device=dev)
        out[r0 : r0 + step] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def row_chunk(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(n_cols, 1))


def mm_only(queries: torch.Tensor, keys: torch.Tensor, tau: float, bias: torch.Tensor | None = None):
    """The floor proxy: chunked ``torch.mm`` producing the scores (in the input dtype, as
    the fastest GEMM does) with the scaling folded into a preallocated output; no selection."""
    rc = row_chunk(keys.shape[0])
    buf = torch.empty(min(rc, queries.shape[0]), keys.shape[0], dtype=queries.dtype, device=queries.device)
    kt = keys.T
    for r0 in range(0, queries.shape[0], rc):
        q = queries[r0 : r0 + rc]
        torch.mm(q, kt, out=buf[: q.shape[0]])
    return buf


def benchmark_provider(benchmark, provider: str, *, shapes, make_inputs, providers, available, gpu_shape: int = 0):
    """The pytest-benchmark body of every bench_<op>.py: one provider at the small float32
    shape on CPU, or at the ``gpu_shape``-th per-step bfloat16 shape on a GPU."""
    import pytest

    dev = device()
    if not available(provider):
        pytest.skip(f"{provider} is not available on {dev.type}")
    shape = shapes("small")[0] if dev.type == "cpu" else shapes("step")[gpu_shape]
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    inputs = make_inputs(shape, dtype)
    fn = providers[provider]

    def run():
        out = fn(inputs, shape)
        synchronize()
        return out

    benchmark(run)


def parse_args(argv=None, *, description: str = ""):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shapes", default="auto", help="auto (GPU: all; CPU: small), small, step, imagenet, sweep")
    p.add_argument("--dtypes", default="auto", help="comma list: float32,bfloat16 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--providers", default="all", help="comma list of providers to time")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per (provider, shape)")
    p.add_argument("--out", default=None, help="folder for the JSON results (default bench/results)")
    return p.parse_args(argv)


def dtypes_from(arg: str) -> list[torch.dtype]:
    if arg == "auto":
        return [torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
    return [getattr(torch, name) for name in arg.split(",")]


def run(
    op: str,
    argv,
    *,
    description: str,
    shapes: Callable[[str], list[Shape]],
    make_inputs: Callable[[Shape, torch.dtype], tuple],
    providers: dict[str, Callable],
    available: Callable[[str], bool],
    check: Callable[[torch.dtype, list[str]], None],
    flops: Callable[[Shape], float],
    skip: Callable[[str, Shape], bool] = lambda name, shape: False,
    memory: bool = False,
) -> list[Row]:
    """The script mode of a ``bench_<op>.py``: correctness first, then every provider timed
    on every shape, a table printed and the rows written to ``bench/results``.

    ``providers[name](inputs, shape)`` runs one call; ``flops(shape)`` gives the useful work
    (reported as TFLOP/s); ``memory`` also records the peak extra CUDA memory of a call."""
    args = parse_args(argv, description=description)
    names = list(providers) if args.providers == "all" else args.providers.split(",")
    names = [n for n in names if n in providers and available(n)]
    rows = []
    for dtype in dtypes_from(args.dtypes):
        check(dtype, names)
        for shape in shapes(args.shapes):
            inputs = make_inputs(shape, dtype)
            synchronize()
            for name in names:
                if skip(name, shape):
                    continue
                fn = functools.partial(providers[name], inputs, shape)
                ms, reps = measure(fn, reps=args.reps, max_seconds=args.max_seconds)
                extra = {"tflops": float(f"{flops(shape) / (ms * 1e-3) / 1e12:.3g}")}
                if memory and torch.cuda.is_available():
                    extra["extra_mb"] = round(peak_extra_mb(fn), 2)
                rows.append(row(op, name, shape, dtype, ms, reps, **extra))
                print(f"{shape} {str(dtype)[6:]} {name}: {ms:.3f} ms ({reps} runs)", flush=True)
            del inputs
    print(table(rows))
    print("wrote", write_results(op, rows, args.out))
    return rows
