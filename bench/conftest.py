"""Collects the ``bench_*.py`` modules as pytest-benchmark tests (``make bench`` runs
``pytest bench --benchmark-enable``; pytest's default pattern only collects ``test_*.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for p in (_HERE, _HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest's own collector takes it (twice otherwise)
        return pytest.Module.from_parent(parent, path=file_path)
    return None
