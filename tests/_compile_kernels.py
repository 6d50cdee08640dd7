"""Compiles every Triton kernel variant the launchers use for a CUDA target, without a GPU
(run as a script in a fresh process: triton.jit must not be in interpreter mode).

    python tests/_compile_kernels.py [sm ...]     # default: 90 (H100/H200)

Catches what the CPU interpreter cannot: type errors of the compiled language (loop-carried
values of the top-K merge loop, layouts of the dots) and register spills. Prints one line
per variant with registers and local-memory (spill) bytes from cuobjdump; exits non-zero if
a variant fails to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llp_fast import _optional  # noqa: E402

_optional.kernels()
from llp_fast.kernels import _launch, aggregation_loss, aggregation_loss_fused, topk_scores  # noqa: E402

DT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def _precision(dt):
    return "ieee" if dt == "fp32" else "tf32"


def variants():
    """(name, kernel, signature, constexprs, options) for the configurations the
    heuristic picks at D = 128 (and the largest buffer, K = 64)."""
    import torch

    for dtype in (torch.bfloat16, torch.float32):
        dt = DT[str(dtype)[6:]]
        sizes = dict(Q="i32", N="i32", D="i32", stride_q="i32", stride_k="i32")
        # topk_scores' kernel: propagate's K (10), local_density's T (25), the largest one-level
        # buffer (64; also every split of a two-level K above 64)
        for k in (10, 25, 64):
            bm, bn, warps, stages = _launch.tile_config(dtype, 128, k, 1 << 20)
            const = dict(K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, BLOCK_K=max(16, triton.next_power_of_2(k)),
                         INPUT_PRECISION=_precision(dt), HAS_BIAS=True, HAS_MASK=k == 25,
                         STRIDED=k == 64)  # fmt: skip
            sig = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", bias_ptr="*fp32", mask_ptr="*u8", vals_ptr="*fp32",
                       idx_ptr="*i64", **sizes, stride_part="i32", inv_tau="fp32", chunk="i32")  # fmt: skip
            yield f"topk_scores {dt} K={k}", topk_scores._topk_scores_kernel, sig, const, (warps, stages)
        stages = _launch.tile_config(dtype, 128)[3]
        const = dict(BLOCK_M=64, BLOCK_N=64 if dt == "bf16" else 32, BLOCK_D=128, INPUT_PRECISION=_precision(dt))
        common = dict(v_ptr=f"*{dt}", bank_ptr=f"*{dt}", labels_ptr="*i64", targets_ptr="*i64")
        tail = dict(B="i32", N="i32", D="i32", stride_v="i32", stride_bank="i32", inv_tau="fp32", chunk="i32")
        fwd = {**common, "lse_all_ptr": "*fp32", "lse_pos_ptr": "*fp32", **tail}
        # _aggregation_tiles.prepare: 8 warps on the GPU, 32-wide key tiles for the backward.
        yield f"aggregation fwd {dt}", aggregation_loss._aggregation_fwd_kernel, fwd, const, (8, stages)
        bwd = {**common, "lse_all_ptr": "*fp32", "lse_pos_ptr": "*fp32", "coef_all_ptr": "*fp32",
               "coef_pos_ptr": "*fp32", "grad_ptr": "*fp32", **tail}  # fmt: skip
        fused = {**common, "m_ptr": "*fp32", "l_ptr": "*fp32", "o_ptr": "*fp32", **tail, "n_splits": "i32"}
        fused_kernel = aggregation_loss_fused._aggregation_fused_kernel
        yield f"aggregation fused {dt}", fused_kernel, fused, {**const, "BLOCK_N": 32}, (8, stages)
        bwd_const = {**const, "BLOCK_N": 32}
        yield f"aggregation bwd {dt}", aggregation_loss._aggregation_bwd_kernel, bwd, bwd_const, (8, stages)


def tuned_variants():
    """The largest tiles of the LLP_FAST_AUTOTUNE=1 search space (128 x 128, 8 warps)."""
    for name, kernel, sig, const, _ in variants():
        if "bf16" in name and ("K=10" in name or "K=25" in name or "aggregation" in name):
            yield f"{name} [tuned 128x128]", kernel, sig, {**const, "BLOCK_M": 128, "BLOCK_N": 128}, (8, 3)


def resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out)
    # Spilled registers live in the stack frame (local memory).
    return f"regs {m.group(1)}, stack {m.group(2)} B, local {m.group(3)} B" if m else out.strip()


def main(argv) -> int:
    failed = 0
    for sm in [int(a) for a in argv] or [90]:
        for name, kernel, sig, const, (warps, stages) in [*variants(), *tuned_variants()]:
            # What the JIT specialises at run time for torch allocations and D = 128: 16-byte
            # aligned pointers, strides and sizes divisible by 16 (vectorised loads).
            attrs = {
                (i,): [["tt.divisibility", 16]]
                for i, arg in enumerate(sig)
                if arg.endswith("_ptr") or arg in ("D", "chunk") or arg.startswith("stride")
            }
            sig = {**sig, **{k: "constexpr" for k in const}}
            try:
                try:
                    src = ASTSource(kernel, sig, const, attrs=attrs)
                except TypeError:  # an ASTSource without attrs (other triton versions)
                    src = ASTSource(kernel, sig, const)
                ck = triton.compile(
                    src, target=GPUTarget("cuda", sm, 32),
                    options=dict(num_warps=warps, num_stages=stages),
                )  # fmt: skip
                pipelined = "cp.async" in ck.asm["ptx"]
                print(f"sm_{sm} {name}: ok, {resource_usage(ck.asm['cubin'])}, shared {ck.metadata.shared} B, "
                      f"{'pipelined' if pipelined else 'NOT pipelined'} loads")  # fmt: skip
            except Exception as exc:
                failed += 1
                print(f"sm_{sm} {name}: FAILED {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
