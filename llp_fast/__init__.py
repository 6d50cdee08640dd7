"""llp_fast: fast, exact Local Label Propagation (Zhuang et al.) for PyTorch.

Public ops (docs/method.md §2): :func:`local_density`, :func:`propagate`, :func:`aggregation_loss`,
:func:`bank_update_`, :func:`topk_scores` (the selection behind the first two, mergeable across key
chunks), and the :class:`MemoryBank` that ties them into the training loop; :func:`backends`
says which implementation serves each op on each device; :class:`LocalLabelPropagation`, a
scikit-learn estimator for fixed embeddings (imported on first use, so that ``import llp_fast`` does
not import scikit-learn).
"""

__version__ = "0.1.0"

from importlib.util import find_spec as _find_spec  # noqa: E402

from ._signals import held as _held  # noqa: E402
from ._signals import quiet_start as _quiet_start  # noqa: E402

# a command's Ctrl-C while torch imports: one line, once torch and NumPy are whole (llp_fast/_signals.py)
with _held(_quiet_start()):
    from .bank import MemoryBank
    from .ops import aggregation_loss, backends, bank_update_, local_density, propagate, topk_scores


def __getattr__(name: str):
    if name == "LocalLabelPropagation":
        from ._optional import need

        need("sklearn", "sklearn", "llp_fast.LocalLabelPropagation")
        from .embeddings.estimator import LocalLabelPropagation

        return LocalLabelPropagation
    if name == "train":  # the trainer's Python API (llp_fast.train.fit), imported on first use
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'llp_fast' has no attribute {name!r}")


__all__ = [
    "MemoryBank",
    "aggregation_loss",
    "backends",
    "bank_update_",
    "local_density",
    "propagate",
    "topk_scores",
    "__version__",
]
# The estimator joins ``from llp_fast import *`` only where scikit-learn is installed (without it
# the star import failed on its one-line "needs sklearn"), and ``dir()`` lists it there too: a name
# that ``dir()`` lists but whose access raises broke ``help(llp_fast)`` and ``inspect.getmembers``.
# Asked for by name without scikit-learn, it is the one-line "needs sklearn" (an ImportError).
_LAZY = {"train"} | ({"LocalLabelPropagation"} if _find_spec("sklearn") is not None else set())
if "LocalLabelPropagation" in _LAZY:
    __all__.insert(0, "LocalLabelPropagation")


def __dir__():
    return sorted(set(globals()) | _LAZY)
