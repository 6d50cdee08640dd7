"""The command-line tools, one module per command:

- :mod:`.train` — ``llp-fast-train`` (with :mod:`.launch`: the baseline beside LLP, and
  :mod:`.workers`: ``--nproc P`` as P watched local processes);
- :mod:`.propagate` — ``llp-fast-propagate``, labels for precomputed embeddings;
- :mod:`.select` — ``llp-fast-select``, extra unlabeled images for a trained network;
- :mod:`.probe` — ``llp-fast-linear-probe``, transfer by linear readout;
- :mod:`.analyze` — ``llp-fast-analyze``, pictures of a run.

Each parses its flags, calls the library, and keeps the error contract of :mod:`._common`.
``python -m llp_fast.cli`` is ``llp-fast-train``.
"""
