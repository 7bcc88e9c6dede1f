"""The data generators' seeds are ints, numpy ints too; a bool or a fraction is refused by name (seed=True ran as 1:
another run's data under the seed it logged)."""

import numpy as np
import pytest

from data.corpus import ByteWindows, stdlib_text
from data.moving_shapes import MovingShapesConfig
from data.synthetic import documents


def test_bools_and_fractions_are_refused_by_name():
    tokens = np.arange(64, dtype=np.int32)
    for bad in (True, np.bool_(True), 1.5, np.float64(1.0), -1, "1"):
        with pytest.raises(ValueError, match=r"documents seed=.* must be an int >= 0"):
            documents(2, seed=bad)
        with pytest.raises(ValueError, match=r"stdlib_text seed=.* must be an int >= 0"):
            stdlib_text(100, seed=bad)
        with pytest.raises(ValueError, match=r"ByteWindows seed=.* must be an int >= 0"):
            ByteWindows(tokens, 8, 2, seed=bad)
        with pytest.raises(ValueError, match=r"MovingShapesConfig.seed=.* must be an int in \[0, 2\*\*32\)"):
            MovingShapesConfig(seed=bad)


def test_numpy_ints_are_seeds():
    """MovingShapesConfig refused np.int64(3) (a sweep's seed), which data.moving_shapes.dataset takes."""
    cfg = MovingShapesConfig(seed=np.int64(3))
    assert cfg.seed == 3 and type(cfg.seed) is int  # configs go to JSON
    assert documents(3, seed=np.int64(2)) == documents(3, seed=2)
    assert stdlib_text(100, seed=np.uint8(2)) == stdlib_text(100, seed=2)
    tokens = np.arange(64, dtype=np.int32)
    np.testing.assert_array_equal(ByteWindows(tokens, 8, 2, seed=np.int32(5)).batch(1)["inputs"],
                                  ByteWindows(tokens, 8, 2, seed=5).batch(1)["inputs"])
