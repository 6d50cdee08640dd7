"""Triton kernels for llp_fast (installed as ``llp_fast.kernels``).

Each launcher takes the same arguments as its op's default body and returns
``NotImplemented`` for a configuration it does not cover, so the op falls back to the
reference. Imported only where triton is importable (see ``llp_fast._optional``).
"""
