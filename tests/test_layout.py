"""The package's architecture, checked: layers import downward only (``.importlinter``, the same
contracts ``make lint`` checks) and no module grows past a size a newcomer can read."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def test_layers_import_downward_only():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    proc = subprocess.run([exe, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_module_over_the_size_limit():
    long = {}
    for path in [*(ROOT / "llp_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            long[str(path.relative_to(ROOT))] = n
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_banks_and_sources_implement_their_protocols(tmp_path):
    import numpy as np
    import torch

    from llp_fast.bank import Bank, MemoryBank
    from llp_fast.data import Source, load
    from llp_fast.distributed import ReplicatedMemoryBank, ShardedMemoryBank

    targets = torch.tensor([0, 1, -1, -1])
    assert isinstance(MemoryBank(targets, 2, dim=4), Bank)
    # the distributed banks need a process group to be built (tests/test_distributed.py builds
    # them); their classes must carry every method of the protocol
    for cls in (ShardedMemoryBank, ReplicatedMemoryBank):
        methods = [n for n, v in vars(Bank).items() if (callable(v) or isinstance(v, property)) and n != "__init__"]
        missing = [n for n in methods if not n.startswith("_abc") and not hasattr(cls, n)]
        assert not missing, (cls.__name__, missing)
    assert isinstance(load("digits", device="cpu"), Source)
    from PIL import Image

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(5):
            Image.fromarray(np.full((6, 6, 3), 40 * i + c, np.uint8)).save(tmp_path / f"c{c}" / f"{i}.png")
    assert isinstance(load(f"folder:{tmp_path}", device="cpu", labeled_fraction=0.5, workers=0), Source)
