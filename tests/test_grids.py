"""Save-time grids."""

import numpy as np
import pytest

import gflow


def test_linear_grid():
    np.testing.assert_array_equal(gflow.linear_grid(1.0, 3.0, 5), [1.0, 1.5, 2.0, 2.5, 3.0])


def test_log_grid_is_geometric_after_t0():
    grid = gflow.log_grid(2.0, 12.0, 6, first=0.01)
    assert grid[0] == 2.0 and grid[-1] == 12.0
    offsets = grid[1:] - 2.0
    ratios = offsets[1:] / offsets[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)
    np.testing.assert_allclose(offsets[0], 0.01)
    assert np.all(np.diff(grid) > 0)


@pytest.mark.parametrize("t0, t1, n", [(1e-2, 2000.0, 300), (3.0, 7.0, 5), (1e-9, 1e6, 40)])
def test_log_grid_is_geometric_from_a_positive_t0(t0, t1, n):
    grid = gflow.log_grid(t0, t1, n)
    assert grid.shape == (n,) and grid[0] == t0 and grid[-1] == t1
    ratios = grid[1:] / grid[:-1]
    np.testing.assert_allclose(ratios, (t1 / t0) ** (1 / (n - 1)), rtol=1e-12)


def test_log_grid_from_zero_spans_four_decades_of_offsets():
    # The documented rule for t0 = 0: t0, then geometric from 1e-4 (t1 - t0) to t1.
    grid = gflow.log_grid(0.0, 50.0, 101)
    assert grid[0] == 0.0 and grid[-1] == 50.0
    np.testing.assert_allclose(grid[1], 5e-3, rtol=1e-12)
    np.testing.assert_allclose(grid[2:] / grid[1:-1], 10 ** (4 / 99), rtol=1e-12)


@pytest.mark.parametrize("args", [(1.0, 1.0, 5), (2.0, 1.0, 5), (0.0, 1.0, 1), (0.0, np.inf, 5)])
def test_bad_grids(args):
    with pytest.raises(gflow.InputError):
        gflow.linear_grid(*args)
