"""Checkpoint retention (README: "kept: last N + best eval"): Checkpoints(keep=N, keep_best=True) keeps the N
newest steps plus the one with the lowest eval loss, and the kept best step restores the state saved with it."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoint import Checkpoints

EVALS = [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, None), (6, 0.5), (7, 4.0)]  # (step, eval loss or None)


def state_at(step):
    return {"params": {"w": jnp.full((2, 3), float(step))}, "step": jnp.asarray(step, jnp.int32)}


@pytest.mark.parametrize("keep_best", [True, False])
def test_keeps_the_latest_and_the_lowest_eval_loss(tmp_path, keep_best):
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=keep_best, async_save=False, log=lambda *a: None)
    try:
        for i, (step, ev) in enumerate(EVALS):
            ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=ev)
            # reference: the newest step, plus (keep_best) the lowest eval loss among the steps saved with one
            scored = [(e, s) for s, e in EVALS[: i + 1] if e is not None]
            want = {step} | ({min(scored)[1]} if keep_best else set())
            assert ckpt.steps() == sorted(want), (step, ckpt.steps())
        assert ckpt.steps() == ([6, 7] if keep_best else [7])  # 0.5 at step 6 is the lowest of EVALS
        best = min((e, s) for s, e in EVALS if e is not None)[1]
        if keep_best:
            state, meta = ckpt.restore(state_at(0), step=best)
            assert meta["step"] == best and meta["eval_loss"] == 0.5
            np.testing.assert_array_equal(state["params"]["w"], np.full((2, 3), float(best)))
    finally:
        ckpt.close()
