"""Labels for precomputed embeddings: LLP's propagation (docs/method.md §1.1-1.2) and its multi-round
scheme (§7) over fixed embeddings of any size, streamed from memory-mapped ``.npy`` files.

- :mod:`.sources` — rows from an array, a ``.npy`` file or a directory of shards;
- :mod:`.engine` — the streaming passes (density, vote) and the rounds: :func:`label_embeddings`;
- :mod:`.ranks` — the same run split over ``torch.distributed`` ranks, merged exactly;
- :mod:`.outputs` — atomic ``.npy`` outputs;
- :mod:`.suspects` — suspect labels: the labeled rows whose label the final voters and the labels
  spread from the other labeled rows contradict (:mod:`.spread`: the labels spread over the voters' graph);
- :mod:`.tune` — K and tau chosen by leave-one-out accuracy of the labeled rows;
- :mod:`.model` — a saved labeller (the last round's voters) that labels new rows;
- :mod:`.estimator` — :class:`LocalLabelPropagation`, a scikit-learn estimator (imports scikit-learn).
"""

from .engine import Engine, Result, label_embeddings, select_voters
from .settings import DEFAULT_ROUNDS, Settings
from .sources import Rows, read_labels

__all__ = [
    "DEFAULT_ROUNDS",
    "Engine",
    "Result",
    "Rows",
    "Settings",
    "label_embeddings",
    "read_labels",
    "select_voters",
]
