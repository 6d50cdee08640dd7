"""Training steps of the tiny config on CPU, in a child process (a native crash fails the test).

On a 2-core AVX2-only CPU, a width-4 pre-activation ResNet-18 in channels_last with one thread
corrupted the heap inside oneDNN's convolution backward (SIGSEGV or "corrupted size vs.
prev_size") after a few steps. The model and every batch now keep the default memory format on
CPU (``llp_fast._device.memory_format``). ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN pick the
kernels such a CPU gets, whatever CPU runs the test: with channels_last it reproduced the crash
on an AVX-512 machine.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llp_fast._device import memory_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from llp_fast.train import prepare
    import pathlib
    cfg = tiny_config(pathlib.Path({tmp!r}), epochs=2, threads=1)
    trainer = prepare(cfg)
    assert all(p.is_contiguous() for p in trainer.model.parameters()), "CPU weights must be contiguous"
    x, _ = next(iter(trainer.source.train_batches(torch.arange(8), 8, trainer.gen_aug)))
    assert x.is_contiguous(), "CPU batches must be contiguous"
    trainer.fit()
    print("steps", trainer.global_step)
    """
)


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_tiny_config_trains_on_cpu_without_crashing(tmp_path, isa):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    steps = int(proc.stdout.split("steps")[-1])
    assert steps >= 10  # two epochs of ~6 steps each


def test_memory_format_is_channels_last_on_cuda_only():
    assert memory_format("cpu") == torch.contiguous_format
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
    assert memory_format("cuda") == torch.channels_last
    assert memory_format("cuda:1") == torch.channels_last
