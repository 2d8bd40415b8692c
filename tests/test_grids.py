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


@pytest.mark.parametrize("args", [(1.0, 1.0, 5), (2.0, 1.0, 5), (0.0, 1.0, 1), (0.0, np.inf, 5)])
def test_bad_grids(args):
    with pytest.raises(gflow.InputError):
        gflow.linear_grid(*args)
