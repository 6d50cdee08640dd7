"""How many merge rounds the streaming top-K pays per key tile (kernels/topk_scores.py), by
simulation in NumPy on random unit vectors, no GPU needed:

    python bench/merge_rounds.py [--m 128117] [--k 10] [--block-m 128] [--block-n 64]

A tile costs as many rounds as the most insertions any row of the block takes from it; a
tile that beats no threshold costs none. Prints the mean rounds per tile and the share of
tiles with 0, 1, 2, 3, 4 and 5+ rounds.
"""

from __future__ import annotations

import argparse

import numpy as np


def rounds_per_tile(m=128_117, d=128, k=10, block_m=128, block_n=64, tau=0.07, density=True, blocks=2, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((m, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    # log_rho of about this spread (5..7) at tau = 0.07; none for local density.
    bias = (rng.random(m) * 2 + 5).astype(np.float32) if density else np.zeros(m, np.float32)
    counts = np.zeros(6)
    for _ in range(blocks):
        q = rng.standard_normal((block_m, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ keys.T / tau - bias
        best = np.full((block_m, k), -np.inf, np.float32)
        for n0 in range(0, m, block_n):
            tile = scores[:, n0 : n0 + block_n]
            merged = -np.sort(-np.concatenate([best, tile], axis=1), axis=1)[:, :k]
            inserted = np.minimum((tile >= merged[:, -1:]).sum(axis=1), k)
            counts[min(int(inserted.max()), 5)] += 1
            best = merged
    share = counts / counts.sum()
    return float((share * np.arange(6)).sum()), share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=128_117)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--no-density", action="store_true", help="no -log_rho bias (local density's case)")
    a = p.parse_args(argv)
    mean, share = rounds_per_tile(a.m, k=a.k, block_m=a.block_m, block_n=a.block_n, density=not a.no_density)
    print(f"mean rounds per tile {mean:.2f} (5+ counted as 5); share with 0..5+ rounds: {np.round(share, 3)}")


if __name__ == "__main__":
    main()
