"""training.ranking.rows: the request path's reads of CSR rows equal scipy's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from training.ranking.rows import dense_block, summed_rows

pytestmark = pytest.mark.fast


def _matrix(n: int = 40, m: int = 30, seed: int = 7) -> sparse.csr_matrix:
    matrix = sparse.random(n, m, density=0.2, format="csr", dtype=np.float32,
                           random_state=seed)
    matrix.sum_duplicates()
    return matrix


def test_dense_block_is_scipys_fancy_indexing() -> None:
    rng = np.random.default_rng(5)
    matrix = _matrix()
    for _ in range(30):
        rows = rng.integers(0, 40, rng.integers(0, 8)).tolist()  # repeats allowed
        cols = rng.choice(30, rng.integers(0, 6), replace=False).tolist()
        want = matrix[rows][:, cols].toarray() if rows and cols else \
            np.zeros((len(rows), len(cols)), np.float32)
        np.testing.assert_array_equal(dense_block(matrix, rows, cols), want)
    empty = sparse.csr_matrix((5, 5), dtype=np.float32)
    assert not dense_block(empty, [0, 4], [1, 2]).any()


def test_summed_rows_is_one_row_of_the_sparse_product_to_the_bit() -> None:
    rng = np.random.default_rng(2)
    matrix = _matrix(200, 150, seed=3)
    matrix.data = rng.random(len(matrix.data)).astype(np.float32) * 10  # rounding matters
    matrix.data[::17] = -matrix.data[::17]  # some sums cancel to exactly zero below
    for size in [0, 1, 2, 5, 20, 60]:
        rows = np.unique(rng.integers(0, 200, size))
        indicator = sparse.csr_matrix((np.ones(len(rows), np.float32),
                                       (np.zeros(len(rows), int), rows)), shape=(1, 200))
        want = sparse.csr_matrix(indicator @ matrix)
        want.sort_indices()
        cols, vals = summed_rows(matrix, rows)
        np.testing.assert_array_equal(cols, want.indices)
        assert vals.dtype == want.data.dtype
        assert vals.tobytes() == want.data.tobytes()
    opposite = sparse.csr_matrix(np.array([[1.5, 2.0], [-1.5, 1.0]], np.float32))
    cols, vals = summed_rows(opposite, np.array([0, 1]))  # 1.5 - 1.5 = 0: left out
    assert cols.tolist() == [1] and vals.tolist() == [3.0]
