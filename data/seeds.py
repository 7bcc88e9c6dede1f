"""One check for the seeds of the data generators: an int (numpy ints too), never a bool or a fraction."""

from __future__ import annotations

import numbers

import numpy as np


def check_seed(seed, where: str, below: int | None = None) -> int:
    """`seed` as a plain int (configs go to JSON), or a ValueError naming `where`. seed=True ran as seed 1, and a
    float failed inside numpy naming neither the seed nor its owner (grain's shuffle ran 1.5 as 1): another run's
    data under the seed it logged. below: an exclusive upper bound (grain's shuffle takes seeds below 2**32)."""
    if (isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or seed < 0
            or (below is not None and seed >= below)):
        span = "an int >= 0" if below is None else f"an int in [0, {'2**32' if below == 2**32 else below})"
        raise ValueError(f"{where}={seed!r} must be {span} (a numpy int too), not a float or bool")
    return int(seed)
