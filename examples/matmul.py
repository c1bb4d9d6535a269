"""Chunked matrix multiply: C = A @ B with one numpy task per block C[i][j] = A_i @ B_j.

A is split into row blocks and B into column blocks; `assemble` joins the block products with
np.block. Run it with: dagkube run examples/matmul.py
"""

from __future__ import annotations

import numpy as np

import dagkube

N = 256
BLOCKS = 4
SEED = 0


def make_matrices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random A (n x k) and B (k x n), with an inner size k = 3n/4 so A is not square."""
    inner = max(1, 3 * n // 4)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, inner)), rng.standard_normal((inner, n))


@dagkube.task
def multiply(a_rows: np.ndarray, b_cols: np.ndarray) -> np.ndarray:
    return a_rows @ b_cols


@dagkube.task
def assemble(blocks: list[list[np.ndarray]]) -> np.ndarray:
    return np.block(blocks)


def build_matmul(
    n: int, blocks: int, seed: int = 0
) -> tuple[dagkube.Workflow, np.ndarray, np.ndarray]:
    """A workflow computing A @ B in blocks x blocks tasks, plus the A and B it multiplies."""
    a, b = make_matrices(n, seed)
    # array_split tolerates sizes that blocks does not divide. Blocks over the inline budget
    # are stored once by content hash, so each A_i is uploaded once however many tasks use it.
    a_rows = np.array_split(a, blocks, axis=0)
    b_cols = np.array_split(b, blocks, axis=1)
    products = [[multiply(a_i, b_j) for b_j in b_cols] for a_i in a_rows]
    return dagkube.Workflow(assemble(products), name="matmul"), a, b


def build() -> dagkube.Workflow:
    workflow, _, _ = build_matmul(N, BLOCKS, SEED)
    return workflow


def verify(result: np.ndarray) -> None:
    a, b = make_matrices(N, SEED)
    expected = np.matmul(a, b)
    assert isinstance(result, np.ndarray), f"expected an ndarray, got {type(result).__name__}"
    assert result.shape == expected.shape, f"shape {result.shape}, expected {expected.shape}"
    error = float(np.max(np.abs(result - expected)))
    assert np.allclose(result, expected), f"blocked product differs from A @ B (max |diff| {error})"
