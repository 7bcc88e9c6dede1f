"""Checkpoint retention (README: "kept: last N + best eval"): Checkpoints(keep=N, keep_best=True) keeps the N
newest steps plus the one with the lowest eval loss (also across a restart), and the kept best step restores the state
saved with it; a corrupt state never moves the data loader."""

import json
import math
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoint import Checkpoints, mesh_axes, other_mesh_note

EVALS = [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, None), (6, 0.5), (7, 4.0)]  # (step, eval loss or None)


def state_at(step):
    return {"params": {"w": jnp.full((2, 3), float(step))}, "step": jnp.asarray(step, jnp.int32)}


@pytest.mark.parametrize("keep_best", [True, False])
@pytest.mark.parametrize("restart_at", [None, 3])  # 3: a new manager (a resumed run) after step 3's save
def test_keeps_the_latest_and_the_lowest_eval_loss(tmp_path, keep_best, restart_at):
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=keep_best, async_save=False, log=lambda *a: None)
    try:
        for i, (step, ev) in enumerate(EVALS):
            if step - 1 == restart_at:  # the best so far (step 2) must survive the restart's first save
                ckpt.close()
                ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=keep_best, async_save=False,
                                   log=lambda *a: None)
            ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=ev)
            # reference: the newest step, plus (keep_best) the lowest eval loss among the steps saved with one
            scored = [(e, s) for s, e in EVALS[: i + 1] if e is not None]
            want = {step} | ({min(scored)[1]} if keep_best else set())
            assert ckpt.steps() == sorted(want), (step, ckpt.steps())
        assert ckpt.steps() == ([6, 7] if keep_best else [7])  # 0.5 at step 6 is the lowest of EVALS
        best = min((e, s) for s, e in EVALS if e is not None)[1]
        if keep_best:
            assert ckpt.mgr.best_step() == best  # orbax's own notion of best agrees: the lowest loss
            state, meta = ckpt.restore(state_at(0), step=best)
            assert meta["step"] == best and meta["eval_loss"] == 0.5
            np.testing.assert_array_equal(state["params"]["w"], np.full((2, 3), float(best)))
    finally:
        ckpt.close()


def test_a_nan_eval_loss_never_replaces_the_best_step(tmp_path):
    """A diverged model can have finite parameters and a NaN eval loss: orbax's BestN sorted NaN as the best, so the
    step of the lowest loss (the one keep_best is there for) was deleted at the NaN step's save."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=True, async_save=False, log=lambda *a: None)
    try:
        for step, ev in [(1, 3.0), (2, 1.0), (3, float("nan")), (4, float("nan")), (5, 2.0), (6, float("inf"))]:
            ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=ev)
            assert ckpt.steps() == sorted({min(step, 2), step}), (step, ckpt.steps())  # the newest + the best
        assert ckpt.mgr.best_step() == 2
    finally:
        ckpt.close()
    # a NaN eval loss on disk (saved before this was fixed) is set aside when the manager opens, so the next save
    # keeps the best step (orbax ranked the NaN step best and deleted step 2)
    (tmp_path / "ckpt" / "6" / "metrics").mkdir(exist_ok=True)  # (step 6's inf was saved without metrics)
    (tmp_path / "ckpt" / "6" / "metrics" / "metrics").write_text('{"eval_loss": NaN}')
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=True, async_save=False, log=lines.append)
    try:
        assert "step 6's saved eval metrics are unreadable or NaN" in lines[0]
        ckpt.save(7, state_at(7), {"config": "{}"}, eval_loss=5.0)
        assert ckpt.steps() == [2, 7] and ckpt.mgr.best_step() == 2
    finally:
        ckpt.close()


def test_of_equal_eval_losses_the_newest_step_is_kept_as_the_best(tmp_path):
    """The class docstring's tie rule, as orbax's BestN decides it (the reference: the newest of the lowest)."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=True, async_save=False, log=lambda *a: None)
    try:
        for step, ev, want in [(1, 1.0, [1]), (2, 1.0, [2]), (3, 2.0, [2, 3]), (4, 1.0, [4]), (5, -np.inf, [4, 5]),
                               (6, 3.0, [4, 6])]:
            ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=ev)
            assert ckpt.steps() == want, (step, ckpt.steps())
        assert ckpt.mgr.best_step() == 4
    finally:
        ckpt.close()


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_state_with_one_non_finite_value_is_never_saved(tmp_path, bad):
    """One Inf / NaN in one leaf (the others finite) refuses the save and writes no step: the only fast check of
    the save's finiteness guard (an any() for all() over the leaves, or no check, passed every test of this file)."""
    from experiments.checkpoint import NonFiniteState

    state = state_at(1)
    state["params"]["v"] = jnp.ones(4).at[2].set(bad)  # beside the finite w
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, log=lambda *a: None)
    try:
        with pytest.raises(NonFiniteState, match="refusing to save step 1: the state has NaN/Inf"):
            ckpt.save(1, state, {"config": "{}"})
        ckpt.save(2, state_at(2), {"config": "{}"})  # a finite state still saves
        assert ckpt.steps() == [2]
    finally:
        ckpt.close()


def test_a_save_that_cannot_be_written_is_one_line_naming_the_cause_and_the_step_to_resume(tmp_path):
    """A full disk fails orbax's async write, which raises at the next save or wait (the trainer's next save step,
    or its close): a traceback ending in orbax's ValueError about a tensorstore chunk file, its ENOSPC the last words
    of 700 characters. Now CheckpointSaveFailed says where, why and which step a rerun resumes from. (orbax's own
    error, as a tiny tmpfs made it, is raised by the manager here: a real full disk is not a unit test's to make.)"""
    from experiments.checkpoint import CheckpointSaveFailed

    ckpt = Checkpoints(tmp_path / "ckpt", log=lambda *a: None)
    try:
        ckpt.save(1, state_at(1), {"config": "{}"})
        ckpt.wait()
        enospc = ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "'
                            + "x" * 300 + "\": Failed to write 728450 bytes to file 11: No space left on device "
                            "[os_error_code='28']")

        for method in ("save", "wait_until_finished"):  # the step's own save, or the wait for it
            real = getattr(ckpt.mgr, method)

            def full(*a, real=real, method=method, **k):  # raised once, as orbax does
                setattr(ckpt.mgr, method, real)
                raise enospc

            setattr(ckpt.mgr, method, full)
            with pytest.raises(CheckpointSaveFailed, match=rf"a save into {tmp_path / 'ckpt'} failed \(ValueError: "
                                                           r"RESOURCE_EXHAUSTED.* \.\.\. No space left on device "
                                                           r"\[os_error_code='28'\]\); a rerun resumes from step 1: "
                                                           "first mend the cause"):
                ckpt.save(2, state_at(2), {"config": "{}"}) if method == "save" else ckpt.wait()
        assert ckpt.steps() == [1]
    finally:
        ckpt.close()


def test_a_save_that_fails_in_orbax_writer_logs_no_traceback_beside_the_one_line(tmp_path, caplog, monkeypatch):
    """A full disk fails orbax's background write; orbax logged it at ERROR with its full traceback three times (the
    writer thread, the commit thread, the finalize wait: 325 lines of asyncio / tensorstore frames before
    train_lm's one-line CheckpointSaveFailed). The error is raised to the caller anyway, so those logs are dropped
    for a directory a Checkpoints writes; the exception still says what failed."""
    import logging

    from orbax.checkpoint._src.serialization import serialization

    from experiments.checkpoint import CheckpointSaveFailed

    ckpt = Checkpoints(tmp_path / "ckpt", log=lambda *a: None)
    try:
        ckpt.save(1, state_at(1), {"config": "{}"})
        ckpt.wait()

        async def full(*a, **k):
            raise OSError(28, "No space left on device", str(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp" / "d"))

        monkeypatch.setattr(serialization, "async_serialize_from_host", full)
        with caplog.at_level(logging.ERROR), pytest.raises(CheckpointSaveFailed, match="No space left on device"):
            ckpt.save(2, state_at(2), {"config": "{}"})
            ckpt.wait()
        assert [r.getMessage()[:120] for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert ckpt.steps() == [1]
    finally:
        monkeypatch.undo()
        ckpt.close()


def test_a_checkpoint_directory_that_is_a_file_is_refused_at_the_open(tmp_path):
    """A file where the directory should be: the open succeeded and the first (async) save failed, a save_every of
    training later; now the open names it. A file above it too."""
    (tmp_path / "ckpt").write_text("x")
    for where in (tmp_path / "ckpt", tmp_path / "ckpt" / "sub"):
        with pytest.raises(NotADirectoryError, match=re.escape(f"checkpoint: {tmp_path / 'ckpt'} is a file")):
            Checkpoints(where, log=lambda *a: None)


def test_templates_and_states_that_are_not_jax_arrays_are_named(tmp_path):
    """numpy / Python leaves failed with AttributeErrors ('no attribute sharding' / 'shape'); a float checkpoint
    restored into an int template was silently truncated."""
    from experiments.checkpoint import CheckpointMismatch

    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        ckpt.save(1, state_at(1), {"config": "{}"})
        with pytest.raises(TypeError, match=r"restore template: leaves must be jax.Arrays .* ndarray at params/w"):
            ckpt.restore({"params": {"w": np.ones((2, 3), np.float32)}, "step": jnp.asarray(0, jnp.int32)})
        with pytest.raises(TypeError, match=r"save state: leaves must be jax.Arrays .* float at a"):
            ckpt.save(2, {"a": 1.0}, {"config": "{}"})
        ints = {"params": {"w": jnp.zeros((2, 3), jnp.int32)}, "step": jnp.asarray(0, jnp.int32)}
        with pytest.raises(CheckpointMismatch, match=r"params/w: saved float32, now int32 \(a cast would truncate"):
            ckpt.restore(ints)
    finally:
        ckpt.close()



def test_a_model_restored_into_its_state_or_back_and_an_unsharded_abstract_template_are_named(tmp_path):
    """A model saved as nnx.state(model) and restored with the built model as template (or the reverse) was told to
    'use another checkpoint directory' (its paths differ by the Variables' /value); a template from jax.eval_shape
    (no shardings) was told its leaves must be jax.Arrays, though sharded ShapeDtypeStructs are accepted."""
    from flax import nnx

    from experiments.checkpoint import CheckpointMismatch

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (2, 3)))

    model = Tiny(nnx.Rngs(0))
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        ckpt.save(1, nnx.state(model), {"config": "{}"})
        ckpt.save(2, model, {"config": "{}"})
        with pytest.raises(CheckpointMismatch, match=r"one of them is a built model .* e.g. nnx.state\(model\)"):
            ckpt.restore(Tiny(nnx.Rngs(1)), step=1)
        with pytest.raises(CheckpointMismatch, match=r"one of them is a built model"):
            ckpt.restore(nnx.state(Tiny(nnx.Rngs(1))), step=2)
        with pytest.raises(TypeError, match=r"w is a ShapeDtypeStruct without a sharding; .*abstract_sharded"):
            ckpt.restore(jax.eval_shape(lambda: nnx.state(model)), step=1)
        state, _ = ckpt.restore(nnx.state(Tiny(nnx.Rngs(1))), step=1)  # the same kind restores, bit for bit
        np.testing.assert_array_equal(np.asarray(state["w"][...]), np.asarray(model.w[...]))
    finally:
        ckpt.close()

def test_single_device_scalars_of_a_template_are_restored_onto_its_mesh(tmp_path):
    """A template whose step counter was jnp.zeros(()) beside parameters on a mesh restored that counter committed
    to device 0, and the next jitted step refused the mix of devices; init_train_state places them right."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from experiments.lm_step import init_train_state, make_optimizer
    from parallel import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 4})
    params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp")))}
    made = init_train_state(params, make_optimizer(1e-3), seed=3)
    assert all(isinstance(made[k].sharding, NamedSharding) for k in ("step", "skipped", "rng"))
    # the run's seed reaches the step's key (router jitter): the same seed repeats it, another one differs
    again, other = (init_train_state(params, make_optimizer(1e-3), seed=s)["rng"] for s in (3, 4))
    assert np.array_equal(again, made["rng"]) and not np.array_equal(other, made["rng"])
    state = {"params": params, "step": jnp.asarray(5, jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        ckpt.save(5, state, {"config": "{}"})
        got, _ = ckpt.restore({**state, "step": jnp.zeros((), jnp.int32)})
        for k in ("step", "rng"):
            assert got[k].sharding == NamedSharding(mesh, P()), k
        assert int(got["step"]) == 5
        jax.jit(lambda s: s["step"] + s["params"]["w"].sum())(got)  # one program over one mesh
        with pytest.raises(TypeError, match="rng is a typed PRNG key, which orbax does not save; store its raw"):
            ckpt.save(6, {**state, "rng": jax.random.key(0)}, {"config": "{}"})
    finally:
        ckpt.close()
    # a reader beside the writer (read_only): restores, saves nothing, creates nothing
    reader = Checkpoints(tmp_path / "ckpt", keep_best=False, async_save=False, read_only=True)
    try:
        assert reader.steps() == [5] and int(reader.restore(state)[0]["step"]) == 5
        with pytest.raises(PermissionError, match="read_only"):
            reader.save(6, state, {"config": "{}"})
    finally:
        reader.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoints(tmp_path / "typo", read_only=True)
    assert not (tmp_path / "typo").exists()


def test_checkpoints_read_and_write_orbax_standard_format_both_ways(tmp_path):
    """array_tree_handler only changes who writes a replicated shard (one replica, not a slice from each): a sharded
    state it saved reads back through orbax's StandardCheckpointHandler, and one StandardSave wrote (earlier
    jaxscale runs, other tools) through it, onto another mesh's shardings."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from experiments.checkpoint import array_tree_handler, tree_restore_args
    from parallel import make_mesh

    mesh, other = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), make_mesh({"fsdp": 8})
    rng = np.random.default_rng(0)
    specs = {"w": P("fsdp", "tensor"), "b": P(), "e": P(None, "tensor"), "n": P()}  # P(): 8 replicas of one shard
    tree = {k: jax.device_put(rng.standard_normal((8, 6) if k != "n" else (5,)).astype(np.float32),
                              NamedSharding(mesh, s)) for k, s in specs.items()}
    tree["step"] = jax.device_put(jnp.asarray(7, jnp.int32), NamedSharding(mesh, P()))
    onto = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P())) for k, v in tree.items()}
    ours, std = {"state": array_tree_handler()}, {"state": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(tmp_path / "ours", item_handlers=ours) as m:
        m.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
    with ocp.CheckpointManager(tmp_path / "ours", item_handlers=std) as m:
        got = m.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(onto)))["state"]
    jax.tree.map(np.testing.assert_array_equal, got, tree)
    with ocp.CheckpointManager(tmp_path / "std", item_handlers=std) as m:
        m.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    with ocp.CheckpointManager(tmp_path / "std", item_handlers=ours) as m:
        got = m.restore(1, args=ocp.args.Composite(state=tree_restore_args(onto)))["state"]
    jax.tree.map(np.testing.assert_array_equal, got, tree)
    assert all(v.sharding == NamedSharding(other, P()) for v in got.values())


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, np.int64(0), np.True_])
def test_keep_below_one_is_refused(tmp_path, keep):
    """orbax's LatestN(0) deleted every checkpoint as it was saved, without a word."""
    with pytest.raises(ValueError, match="Checkpoints keep=.*: must be an int >= 1"):
        Checkpoints(tmp_path, keep=keep)


def test_keep_takes_a_numpy_int(tmp_path):
    """A NumPy int (a sweep's np.arange) is an int: it was refused as not one."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=np.int64(1), keep_best=False, async_save=False, log=lambda *a: None)
    try:
        for step in (1, 2):
            ckpt.save(step, state_at(step), {"config": "{}"})
        ckpt.wait()
        assert ckpt.steps() == [2]
    finally:
        ckpt.close()


@pytest.mark.parametrize("rewound_to", [5, 8])
def test_a_save_at_or_below_a_saved_step_is_refused_and_the_newest_step_still_restores(tmp_path, rewound_to):
    """A loop rewound to an older step (restore(step=4)) and trained on: its save of step 5 was written, restore()
    then resumed from step 12 of the abandoned run (the newest), and keep=3 (by save order) had deleted step 8 and
    kept 12; step 8 again failed in orbax ('Checkpoint for step 8 already exists')."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        for step in (4, 8, 12):
            ckpt.save(step, state_at(step), {"config": "{}"})
        assert ckpt.restore(state_at(0), step=4)[1]["step"] == 4
        with pytest.raises(ValueError, match=rf"save: step {rewound_to} is not past the steps already saved in .*"
                                             r"\[8, 12\]\).* move the newer steps out of that directory first"):
            ckpt.save(rewound_to, state_at(rewound_to), {"config": "{}"})
        assert ckpt.steps() == [4, 8, 12]  # nothing written, nothing deleted
        ckpt.save(13, state_at(13), {"config": "{}"})  # past them: saved as ever
        assert ckpt.steps() == [8, 12, 13] and ckpt.restore(state_at(0))[1]["step"] == 13
    finally:
        ckpt.close()


@pytest.mark.parametrize("bad", [4.0, np.float32(4.0), 4.5, "4", True, -4, jnp.asarray([4])],
                         ids=["float", "np.float32", "fraction", "str", "bool", "negative", "1-d array"])
def test_a_step_that_is_not_a_whole_number_is_refused_by_save_and_restore(tmp_path, bad):
    """save(4.0) (a step from true division, tokens / batch) wrote a directory named '4.0' that no later manager
    lists: the resumed run found no checkpoint and started fresh, and keep-N had already deleted the steps of
    integer names. restore(step="4") (argv) returned None, "no checkpoint", and restore(step=True) read step 1."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        ckpt.save(jnp.asarray(1, jnp.int32), state_at(1), {"config": "{}"})  # an integer array: the state's own step
        ckpt.save(np.int64(2), state_at(2), {"config": "{}"})
        assert ckpt.steps() == [1, 2] and all(type(s) is int for s in ckpt.steps())
        with pytest.raises(ValueError, match=r"Checkpoints.save: step=.* must be a whole number >= 0"):
            ckpt.save(bad, state_at(4), {"config": "{}"})
        with pytest.raises(ValueError, match=r"Checkpoints.restore: step=.* must be a whole number >= 0"):
            ckpt.restore(state_at(0), step=bad)
        assert ckpt.steps() == [1, 2] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
        assert ckpt.restore(state_at(0), step=np.int32(1))[1]["step"] == 1
    finally:
        ckpt.close()


@pytest.mark.parametrize("to_array", [jnp.float32, np.float32, jnp.asarray],
                         ids=["jnp.float32", "np.float32", "jnp.asarray"])
def test_an_eval_loss_given_as_an_array_scalar_is_saved_as_a_number(tmp_path, to_array):
    """A hand-written loop's eval loss is a jax / numpy scalar: the save failed in orbax's JSON writer ('Object of
    type ArrayImpl is not JSON serializable', naming no field) and left only a temporary directory, no step."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, async_save=False, log=lambda *a: None)
    try:
        ckpt.save(1, state_at(1), {"config": "{}"}, eval_loss=to_array(2.5))
        ckpt.save(2, state_at(2), {"config": "{}"}, eval_loss=to_array(3.5))
        assert ckpt.steps() == [1, 2] and ckpt.mgr.best_step() == 1  # the newest, and the best kept as a metric
        meta = ckpt.restore(state_at(0))[1]
        assert meta["eval_loss"] == 3.5 and type(meta["eval_loss"]) is float
    finally:
        ckpt.close()


@pytest.mark.parametrize("bad", [jnp.asarray([2.5]), np.ones((2,)), True, "2.5"],
                         ids=["1-d array", "numpy vector", "bool", "str"])
def test_an_eval_loss_that_is_not_one_number_is_refused_by_name(tmp_path, bad):
    """An eval loss kept as a [1] array failed in float() ('Only scalar arrays can be converted to Python
    scalars'), naming neither the argument nor the fix; True was ranked as a loss of 1.0."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, async_save=False, log=lambda *a: None)
    try:
        with pytest.raises(ValueError, match=r"Checkpoints.save: eval_loss=.* must be one number"):
            ckpt.save(1, state_at(1), {"config": "{}"}, eval_loss=bad)
        assert ckpt.steps() == []
        ckpt.save(1, state_at(1), {"config": "{}"}, eval_loss=2)  # an int is a number
        assert ckpt.restore(state_at(0))[1]["eval_loss"] == 2.0
    finally:
        ckpt.close()


def test_a_reader_beside_a_training_job_does_not_call_its_save_in_progress_interrupted(tmp_path):
    """read_only is for readers beside a running job (load_model): the temporary directory there is usually the
    writer's save in progress, which the reader leaves alone; it was reported as 'interrupted while writing'."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    ckpt.save(1, state_at(1), {"config": "{}"})
    ckpt.close()
    (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1700000000").mkdir()  # as a writer's save of step 2 looks
    lines = []
    reader = Checkpoints(tmp_path / "ckpt", keep_best=False, async_save=False, log=lines.append, read_only=True)
    try:
        assert reader.steps() == [1]
    finally:
        reader.close()
    assert len(lines) == 1 and "2.orbax-checkpoint-tmp-1700000000" in lines[0], lines
    assert "interrupted while writing" not in lines[0] and "save in progress" in lines[0], lines
    assert (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1700000000").is_dir()  # left to its writer
    lines = []  # a writer opening the directory: nobody else writes there, so it was a save cut short
    Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lines.append).close()
    assert len(lines) == 1 and "(interrupted while writing)" in lines[0], lines


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot"])
def test_a_second_manager_over_a_directory_lets_the_first_ones_save_in_flight_finish(tmp_path, spelling):
    """A notebook cell run again: a new Checkpoints over the directory while the first (never closed) was still
    writing an async save took that save for an interrupted one and cleaned it up under its writer: the step was
    lost, and the new manager's first save failed (OSError 'Directory not empty'). Both steps now restore, also when
    the second names the directory another way (a symlink, a path through '..': they missed the first manager)."""
    def big(step):  # 2 MiB: its async write outlasts the second manager's open
        return {"params": {"w": jnp.full((512, 1024), float(step))}, "step": jnp.asarray(step, jnp.int32)}

    first = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, log=lambda *a: None)
    first.save(1, big(1), {"config": "{}"})  # async: still writing when the cell below runs
    lines = []
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    again = {"same": tmp_path / "ckpt", "symlink": tmp_path / "link", "dotdot": tmp_path / "ckpt" / ".." / "ckpt"}
    second = Checkpoints(again[spelling], keep=3, keep_best=False, log=lines.append)
    try:
        second.save(2, big(2), {"config": "{}"})
        second.wait()
        assert second.steps() == [1, 2]
        for step in (1, 2):
            state, _ = second.restore(big(0), step)
            np.testing.assert_array_equal(state["params"]["w"], big(step)["params"]["w"])
    finally:
        second.close()
        first.close()
    assert not any("interrupted" in line for line in lines), lines


class PositionLoader:
    """Stands for data.loader.LMLoader: just a position to save and restore."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_a_corrupt_state_does_not_move_the_data_loader(tmp_path):
    """The loader is restored only after the state passed its checksum: 'starting fresh' means from the start."""
    import json

    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    ckpt.save(4, state_at(4), {"config": "{}"}, eval_loss=1.0, loader=PositionLoader(40))
    ckpt.close()
    meta_file = tmp_path / "ckpt" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "fingerprint": "0" * 16}))  # the state no longer matches
    lines, fresh = [], PositionLoader(0)
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lines.append)
    try:
        assert ckpt.restore(state_at(0), loader=fresh) is None
    finally:
        ckpt.close()
    assert "no older checkpoint: starting fresh" in lines[0] and fresh.position == 0



def test_each_fallback_line_names_the_older_step_tried_next(tmp_path):
    """Three corrupt steps: each line names the next older step restore tries, and the oldest says it starts fresh
    (`older` taken as every other candidate passed each test: a second fallback then said "falling back to step 3",
    the step just set aside)."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lambda *a: None)
    for step in (1, 2, 3):
        ckpt.save(step, state_at(step), {"config": "{}"})
    ckpt.close()
    for step in (1, 2, 3):  # the arrays no longer match their checksum
        meta_file = tmp_path / "ckpt" / str(step) / "meta" / "metadata"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fingerprint": "0" * 16}))
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lines.append)
    try:
        assert ckpt.restore(state_at(0)) is None
    finally:
        ckpt.close()
    assert [(x.split()[2], x.split("; ")[-1]) for x in lines] == [
        ("3", "falling back to step 2"), ("2", "falling back to step 1"), ("1", "no older checkpoint: starting fresh")]


def test_an_older_checkpoint_with_the_loader_state_in_its_meta_positions_the_loader(tmp_path):
    """Checkpoints written before per-process loader folders kept the (one process's) loader state in meta["loader"]
    and had no loader_saved flag: restore(loader=) sets the loader from it."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    ckpt.save(4, state_at(4), {"config": "{}", "loader": {"position": 40}})
    ckpt.close()
    meta_file = tmp_path / "ckpt" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "loader_saved"}))
    loader = PositionLoader(0)
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    try:
        state, meta = ckpt.restore(state_at(0), loader=loader)
    finally:
        ckpt.close()
    assert meta["step"] == 4 and float(state["params"]["w"][0, 0]) == 4.0 and loader.position == 40


def test_a_step_corrupted_twice_keeps_both_copies_and_loader_states_of_another_process_count_are_refused(tmp_path):
    """Quarantine never replaces an earlier copy of the same step (`<dir>-corrupt/<step>-1`, ...); a step whose loader
    states were written by another number of processes is a CheckpointMismatch, left in place (each process
    reads its own documents: the states cannot be shared out again)."""
    import os

    from experiments.checkpoint import CheckpointMismatch

    def corrupt(step):
        meta_file = tmp_path / "ckpt" / str(step) / "meta" / "metadata"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fingerprint": "0" * 16}))

    for k in range(3):
        ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
        ckpt.save(4, state_at(4 + k), {"config": "{}"}, eval_loss=1.0)
        ckpt.close()
        corrupt(4)
        ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
        try:
            assert ckpt.restore(state_at(0)) is None
        finally:
            ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt-corrupt").iterdir()) == ["4", "4-1", "4-2"]
    kept = sorted(json.loads((tmp_path / "ckpt-corrupt" / n / "meta" / "metadata").read_text())["step"]
                  for n in ("4", "4-1", "4-2"))
    assert kept == [4, 4, 4]

    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    ckpt.save(6, state_at(6), {"config": "{}"}, eval_loss=1.0, loader=PositionLoader(60))
    ckpt.close()
    states = list((tmp_path / "ckpt" / "6" / "loader").glob("process_*.json"))
    assert [p.name for p in states] == ["process_0-of-1.json"]
    os.replace(states[0], states[0].with_name("process_0-of-2.json"))
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    try:
        with pytest.raises(CheckpointMismatch, match="saved by 2 processes, this run has 1"):
            ckpt.restore(state_at(0), loader=PositionLoader(0))
        # and one process's states, read by a job of two (it said "saved by 1 processes")
        os.replace(states[0].with_name("process_0-of-2.json"), states[0])
        one_of_two = "saved by 1 process, this run has 2"
        with pytest.MonkeyPatch.context() as m, pytest.raises(CheckpointMismatch, match=one_of_two):
            m.setattr(jax, "process_count", lambda: 2)
            ckpt._check_processes(6)
    finally:
        ckpt.close()
    assert (tmp_path / "ckpt" / "6").is_dir()

def test_a_checkpoint_of_another_data_stream_is_refused_not_quarantined(tmp_path):
    """A good checkpoint whose loader state belongs to another stream (the corpus changed) was taken for a corrupt
    one: every step moved aside and training restarted from step 0, exit 0."""
    from data.loader import StreamMismatch
    from experiments.checkpoint import CheckpointMismatch

    class OtherStream(PositionLoader):
        def set_state(self, state):
            raise StreamMismatch("LMLoader.set_state: the state was saved by a loader over another stream (...)")

    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    for step in (2, 4):
        ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=1.0, loader=PositionLoader(10 * step))
    ckpt.close()
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2, async_save=False, log=lambda *a: None)
    try:
        with pytest.raises(CheckpointMismatch, match="ckpt/4: LMLoader.set_state: .*another stream"):
            ckpt.restore(state_at(0), loader=OtherStream())
        assert ckpt.steps() == [2, 4] and not (tmp_path / "ckpt-corrupt").exists()
    finally:
        ckpt.close()


def _tb_scalars(directory):
    """(tag, step, value) of every scalar in the TFRecord event files under `directory` (length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted(directory.iterdir()):
        buf, i = f.read_bytes(), 0
        while i + 12 <= len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            ev = Event.FromString(buf[i + 12:i + 12 + n])
            out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
            i += 12 + n + 4
    return out


def test_an_atomic_write_that_raises_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """run_log.write_atomically: a write that raised part-way (a full disk under savefig or write_text) kept the
    previous file, as promised, but left its partial `<name>.tmp` beside it for good."""
    from experiments.run_log import write_atomically, write_text_atomically

    path = tmp_path / "results.md"
    write_text_atomically(path, "old")

    def half_then_full(tmp):
        tmp.write_text("hal")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, half_then_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"] and path.read_text() == "old"
    assert write_text_atomically(path, "new") == path and path.read_text() == "new"


def test_tensorboard_events_are_on_disk_after_a_flush(tmp_path):
    """The trainer flushes at each checkpoint and never replays the steps it covers: after flush() (and no close,
    as when the process is then killed) every event must be in the file. SummaryWriter's flush left queued ones."""
    from experiments.run_log import Logger

    log = Logger(tmp_path, primary=True)
    for step in range(1, 5):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step})
    log.write({"kind": "train", "step": 5, "loss": float("nan")})  # a skipped step: null in the JSONL, no scalar
    log.write({"kind": "eval", "step": 4, "loss": 0.5, "expert_load": [0.25, 0.75]})
    log.flush()
    got = _tb_scalars(tmp_path / "tb")
    assert [(t, s) for t, s, _ in got if t == "train/loss"] == [("train/loss", s) for s in range(1, 5)]
    assert ("eval/loss", 4, 0.5) in got and ("moe/load_expert1", 4, 0.75) in got
    log.close()


def tb_as_python_loader_reads(directory):
    """{tag: [(step, value)]} as TensorBoard's Python loader (EventAccumulator) keeps them: event files in name order,
    and a SessionLog START event at step s drops every event read before it at a step >= s (its purge of orphaned
    data, the only one it does for 'brain.Event:2' files). A record cut by a kill ends its file."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    kept: dict[str, list] = {}
    for f in sorted(directory.iterdir()):
        buf, i = f.read_bytes(), 0
        while i + 12 <= len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            if i + 12 + n + 4 > len(buf):
                break
            ev = Event.FromString(buf[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                kept = {tag: [(s, v) for s, v in pts if s < ev.step] for tag, pts in kept.items()}
            for v in ev.summary.value:
                kept.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return kept


def test_a_resume_drops_the_interrupted_attempts_events_past_the_checkpoint(tmp_path):
    """A run saved at step 4 and killed after step 6, its events for 5 and 6 already on disk (the events file is
    written out as its buffer fills), replays 5 and 6 on resume: TensorBoard's Python loader showed both attempts
    at those steps (train/loss 5, 6, 5, 6, ... in file order). The resumed Logger marks the restart, so it keeps
    the replay only."""
    from experiments.run_log import Logger

    first = Logger(tmp_path, primary=True)
    for step in range(1, 7):
        first.write({"kind": "train", "step": step, "loss": 10.0 + step})
    first.flush()  # the buffer written out past the checkpoint of step 4; then a kill (no close)
    time.sleep(0.01)  # the next events file's name sorts after this one's
    resumed = Logger(tmp_path, primary=True)
    resumed.resume(4)
    for step in (5, 6, 7):
        resumed.write({"kind": "train", "step": step, "loss": 20.0 + step})
    resumed.close()
    first.close()
    assert tb_as_python_loader_reads(tmp_path / "tb")["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0),
                                                                         (5, 25.0), (6, 26.0), (7, 27.0)]


def test_a_metrics_line_torn_by_a_kill_neither_breaks_the_plot_nor_the_next_record(tmp_path):
    """A kill mid-write left `{"kind": "train", "st`: the resumed run's first record extended it, and reading the
    curves for loss.png raised at the end of the run."""
    import json

    from experiments.run_log import Logger, read_curves

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + '\n{"kind": "tr')
    assert read_curves(tmp_path / "metrics.jsonl") == {"train": {1: {"kind": "train", "step": 1, "loss": 2.0}}}
    log = Logger(tmp_path, primary=True)
    log.write({"kind": "train", "step": 2, "loss": 1.5})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_a_replayed_step_plots_its_last_record_and_nested_non_finite_numbers_are_null(tmp_path):
    """Steps after the last checkpoint are logged again when a run resumes: the curves keep the replay (the record
    the run's state continues from), not the lost first attempt. A NaN inside a list (an MoE expert_load) is null
    like a top-level one: bare NaN is not JSON."""
    import json
    import math

    from experiments.run_log import Logger, read_curves

    log = Logger(tmp_path, primary=True)
    for step, loss in ((1, 2.0), (2, 1.75), (2, 1.5)):  # step 2 replayed after a kill
        log.write({"kind": "train", "step": step, "loss": loss})
    log.write({"kind": "train", "step": 3, "loss": math.nan, "expert_load": [math.nan, 0.5]})
    log.close()
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert {s: r["loss"] for s, r in curves["train"].items()} == {1: 2.0, 2: 1.5, 3: None}

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1], parse_constant=refuse)
    assert last["expert_load"] == [None, 0.5]


def test_a_train_loss_with_no_finite_neighbour_is_drawn_in_the_plot(tmp_path, monkeypatch):
    """loss.png draws the train loss as a plain line ('-'): a point with no finite neighbour (the one record of a
    run stopped after its first log step, a loss between two non-finite ones) was in the legend but drew nothing.
    Checked on the rendered pixels: the train curve's colour at each logged point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from experiments.run_log import plot_losses

    figs, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figs.append(fig),
                                                                                  real_savefig(fig, *a, **k))[1])
    c0 = np.array(matplotlib.colors.to_rgb("C0")) * 255  # the first curve's colour: the train loss
    for losses in ({5: 2.0}, {1: 3.0, 2: None, 3: 2.0, 4: None, 5: 1.0, 6: 0.9}):
        lines = [json.dumps({"kind": "train", "step": s, "loss": v}) + "\n" for s, v in losses.items()]
        (tmp_path / "metrics.jsonl").write_text("".join(lines))
        plot_losses(tmp_path)
        ax, canvas = figs[-1].axes[0], FigureCanvasAgg(figs[-1])
        canvas.draw()
        img = np.asarray(canvas.buffer_rgba())[..., :3].astype(float)
        for step, loss in losses.items():
            if loss is not None:
                x, y = ax.transData.transform((step, loss)).astype(int)
                near = img[img.shape[0] - y - 2:img.shape[0] - y + 3, x - 2:x + 3]
                assert (np.abs(near - c0).sum(-1) < 60).any(), (losses, step)


def test_the_loss_plot_marks_each_non_finite_step_of_the_log(tmp_path, monkeypatch):
    """train_lm logs a skipped (or halted-on) step as a 'nonfinite' record; with log_every > 1 such a step has no
    train record, and loss.png of a run that skipped steps looked like a clean run's. Each one is a vertical line in
    the figure, at the steps metrics.jsonl names, and in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from experiments.run_log import plot_losses

    figs, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figs.append(fig),
                                                                                  real_savefig(fig, *a, **k))[1])
    records = [{"kind": "eval", "step": 0, "loss": 5.0}, {"kind": "train", "step": 10, "loss": 4.0},
               {"kind": "nonfinite", "step": 13, "policy": "skip", "skipped": 1},
               {"kind": "nonfinite", "step": 17, "policy": "skip", "skipped": 2},
               {"kind": "train", "step": 20, "loss": 3.5}, {"kind": "train", "step": 30, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_losses(tmp_path)
    ax = figs[-1].axes[0]
    vertical = sorted({line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1
                       and len(line.get_xdata()) == 2})
    assert vertical == [r["step"] for r in records if r["kind"] == "nonfinite"]
    assert any("non-finite" in t.get_text() for t in ax.get_legend().get_texts())
    # the curves themselves are the logged points
    train = next(line for line in ax.lines if line.get_label() == "train loss")
    assert list(train.get_xdata()) == [10, 20, 30] and list(train.get_ydata()) == [4.0, 3.5, 3.0]


def test_a_log_scale_loss_plot_of_a_run_whose_every_loss_was_non_finite_is_written(tmp_path):
    """plot_losses(log_y=True) of a run halted on its first step (its one train loss null, one 'nonfinite' record):
    the non-finite step's line alone set the y range, and tight_layout raised 'Data cannot be log-scaled'. The figure
    is written, with the non-finite step marked (as a linear-scale plot of the same log)."""
    from experiments.run_log import plot_losses

    records = [{"kind": "train", "step": 1, "loss": None}, {"kind": "nonfinite", "step": 1, "policy": "halt"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = plot_losses(tmp_path, log_y=True)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_step_directory_holding_another_steps_checkpoint_is_not_restored_as_that_step(tmp_path):
    """Each step directory's meta names its step: a directory holding another step's checkpoint (copied by hand,
    say) is a good checkpoint of the wrong step; resuming from it would restart the loop at the saved step while
    the directory's number stays taken. It is set aside like a corrupt one and the previous step is used."""
    import shutil

    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lambda *a: None)
    for step in (4, 8):
        ckpt.save(step, state_at(step), {"config": "{}"})
    ckpt.close()
    shutil.rmtree(tmp_path / "ckpt" / "8")
    shutil.copytree(tmp_path / "ckpt" / "4", tmp_path / "ckpt" / "8")
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lines.append)
    try:
        state, meta = ckpt.restore(state_at(0))
        assert ckpt.steps() == [4] and (tmp_path / "ckpt-corrupt" / "8").is_dir()
    finally:
        ckpt.close()
    assert meta["step"] == 4 and float(state["params"]["w"][0, 0]) == 4.0
    assert lines and lines[0].startswith("checkpoint: step 8 is corrupt") and "falling back to step 4" in lines[0]
    # its arrays are intact: the line names the step its meta holds (it said 'checksum X != saved X', the same X)
    assert "its meta is step 4's" in lines[0] and "checksum" not in lines[0], lines[0]


def test_a_corrupt_step_asked_for_by_number_does_not_say_it_starts_fresh(tmp_path):
    """restore(step=8) of a corrupt step 8 tries no other step, but its line said "no older checkpoint: starting
    fresh" beside a good step 4 (the caller decides what to do with None)."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lambda *a: None)
    for step in (4, 8):
        ckpt.save(step, state_at(step), {"config": "{}"})
    ckpt.close()
    meta_file = tmp_path / "ckpt" / "8" / "meta" / "metadata"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fingerprint": "0" * 16}))
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lines.append)
    try:
        assert ckpt.restore(state_at(0), step=8) is None
        assert ckpt.steps() == [4] and ckpt.restore(state_at(0))[1]["step"] == 4
        assert ckpt.restore(state_at(0), step=6) is None  # never saved: None, and no line calling it corrupt
    finally:
        ckpt.close()
    assert len(lines) == 1 and lines[0].startswith("checkpoint: step 8 is corrupt or incomplete (ValueError: checksum")
    assert lines[0].endswith("; not restored (the step asked for: no other step is tried)"), lines


def _many_arrays_state(step):
    """Many arrays of 8 shards each: many reads in flight when one fails (numpy's draws: 288 eager
    jax.random.normal calls took a second)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel import make_mesh

    mesh = make_mesh({"fsdp": 8})
    shard, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    rng = np.random.default_rng(step)
    return {"params": {f"w{i}": jax.device_put(rng.standard_normal((256, 64), np.float32), shard)
                       for i in range(48)}, "step": jax.device_put(jnp.asarray(step, jnp.int32), rep)}


@pytest.fixture(scope="module")
def many_arrays_ckpt(tmp_path_factory):
    """Steps 2, 4, 6, 8 of _many_arrays_state, saved once: each test damages a copy of its own."""
    path = tmp_path_factory.mktemp("many_arrays") / "ckpt"
    ckpt = Checkpoints(path, keep=4, keep_best=False, async_save=False, log=lambda *a: None)
    for step in (2, 4, 6, 8):
        ckpt.save(step, _many_arrays_state(step), {"config": "{}"})
    ckpt.close()
    return path


@pytest.mark.parametrize("damage", ["metadata", "data"])
def test_a_corrupt_step_is_reported_in_one_line_without_orbax_or_asyncio_noise(tmp_path, damage, capfd, caplog,
                                                                               monkeypatch, many_arrays_ckpt):
    """orbax reads all arrays of a step at once in an event loop it closes when a read fails; the reads still in
    flight completed later into the closed loop: one 'RuntimeError: Event loop is closed' traceback per array
    (tensorstore's, through sys.unraisablehook), 'Task exception was never retrieved' logs and reads destroyed
    mid-way, 80-550 lines around the fallback warning. Damaged b-tree nodes fail the metadata reads (every file in
    d/ flipped), damaged chunks the data reads (only the large files)."""
    import gc
    import logging
    import shutil
    import sys
    import time

    state = _many_arrays_state
    shutil.copytree(many_arrays_ckpt, tmp_path / "ckpt")
    for step in (4, 6, 8):  # three bad steps in a row: three failed reads, then step 2
        for f in (tmp_path / "ckpt" / str(step)).rglob("*"):
            if f.is_file() and f.parent.name == "d" and (damage == "metadata" or f.stat().st_size > 10_000):
                data = f.read_bytes()
                f.write_bytes(data[:64] + bytes(255 - b for b in data[64:]))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    lines = []
    with caplog.at_level(logging.WARNING):
        ckpt = Checkpoints(tmp_path / "ckpt", keep=4, keep_best=False, async_save=False, log=lines.append)
        try:
            got, meta = ckpt.restore(state(0))
        finally:
            ckpt.close()
        time.sleep(0.5)  # a read left running reports whenever it completes
        gc.collect()  # and a read destroyed mid-way when collected
    assert meta["step"] == 2 and np.array_equal(got["params"]["w0"], state(2)["params"]["w0"])
    assert len(lines) == 3 and all(x.startswith(f"checkpoint: step {s} is corrupt") for x, s in zip(lines, (8, 6, 4)))
    printed = capfd.readouterr()
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}"[:200] for u in unraisable[:3]]
    assert not printed.out.strip() and not printed.err.strip(), (printed.out + printed.err)[:2000]
    assert not caplog.records, [r.getMessage()[:200] for r in caplog.records[:3]]


def test_a_damaged_chunk_is_reported_by_its_array_and_cause(tmp_path):
    """orbax wraps a failed chunk read in a bare Exception ('Encountered error while reading array index: (slice(0,
    32, 1), ...). See full TensorStore details: <bound method ...') with tensorstore's error as its cause: the one
    line said neither which array nor what was wrong. It now quotes the cause."""
    state = {"params": {"w": jax.random.normal(jax.random.key(0), (256, 64))}, "step": jnp.asarray(8, jnp.int32)}
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=False, async_save=False, log=lambda *a: None)
    ckpt.save(8, state, {"config": "{}"})
    ckpt.close()
    for f in (tmp_path / "ckpt" / "8").rglob("*"):
        if f.is_file() and f.parent.name == "d" and f.stat().st_size > 10_000:  # the chunks, not the b-tree
            data = f.read_bytes()
            f.write_bytes(data[:64] + bytes(255 - b for b in data[64:]))
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=1, keep_best=False, async_save=False, log=lines.append)
    try:
        assert ckpt.restore(state) is None
    finally:
        ckpt.close()
    assert len(lines) == 1 and lines[0].startswith("checkpoint: step 8 is corrupt or incomplete (ValueError: "), lines
    assert 'Error reading "params.w/' in lines[0] and "bound method" not in lines[0], lines


@pytest.mark.parametrize("damage", ["no_metadata_file", "empty_state"])
def test_a_step_whose_state_has_no_array_metadata_names_it(tmp_path, damage):
    """A state/ item without its _METADATA (an emptied or half-copied step): orbax's item_metadata is None, and the
    fallback line said only "AttributeError: 'NoneType' object has no attribute 'tree'"."""
    import shutil

    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lambda *a: None)
    for step in (4, 8):
        ckpt.save(step, state_at(step), {"config": "{}"})
    ckpt.close()
    item = tmp_path / "ckpt" / "8" / "state"
    if damage == "no_metadata_file":
        (item / "_METADATA").unlink()
    else:
        shutil.rmtree(item)
        item.mkdir()
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lines.append)
    try:
        state, meta = ckpt.restore(state_at(0))
    finally:
        ckpt.close()
    assert meta["step"] == 4 and float(state["params"]["w"][0, 0]) == 4.0
    assert len(lines) == 1 and lines[0].startswith("checkpoint: step 8 is corrupt or incomplete (FileNotFoundError: "
                                                   ) and "falling back to step 4" in lines[0], lines
    assert f"{item} has no readable array metadata" in lines[0] and "NoneType" not in lines[0], lines


def test_corpus_holds_out_whole_modules(tmp_path, monkeypatch):
    """A module's docstrings repeat lines of its source: both go to the same split, so eval text is not in train."""
    from data.shards import iter_docs, tier_shards
    from experiments.config import DataSpec, cache_root
    from experiments.train_lm import corpus_tiers

    # no data.cache_dir: cached under ~/.cache/jaxscale, the directory validate checks (experiments.config.cache_root)
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = DataSpec(max_files=30, eval_every_nth=5)
    train, held = corpus_tiers(spec)
    assert pathlib.Path(train).parent.parent == tmp_path / ".cache" / "jaxscale" == pathlib.Path(cache_root(spec))
    ids = {split: {d["id"] for shard in tier_shards(path) for d in iter_docs(shard)}
           for split, path in (("train", train), ("eval", held))}
    modules = {split: {i.split("#")[0] for i in v} for split, v in ids.items()}
    assert modules["eval"] and modules["train"] and not modules["eval"] & modules["train"]
    assert any(i.endswith("#docs") for i in ids["eval"]) and len(modules["eval"]) == 30 // 5


def test_a_corpus_build_that_fails_part_way_leaves_no_directory_behind(tmp_path, monkeypatch):
    """The embedded corpus is built in `<root>.tmp<pid>`, a new name per process: a build that raised (a full disk,
    Ctrl-C) was never reused nor removed, so every failed attempt left its partial corpus in the cache for good."""
    from data import corpus
    from experiments.config import DataSpec
    from experiments.train_lm import corpus_tiers

    real = corpus.stdlib_documents

    def fail_part_way(max_files):
        docs = real(max_files)
        for _ in range(5):
            yield next(docs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus, "stdlib_documents", fail_part_way)
    spec = DataSpec(max_files=10, eval_every_nth=5, cache_dir=str(tmp_path))
    with pytest.raises(OSError, match="No space"):
        corpus_tiers(spec)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    train, held = corpus_tiers(spec)  # the next attempt builds it whole
    assert [p.name for p in tmp_path.iterdir()] == [pathlib.Path(train).parent.name]


def test_two_threads_building_the_corpus_at_once_each_get_it_whole(tmp_path, monkeypatch):
    """A sweep's thread pool: two train_lm runs in one process both built the embedded corpus in `<root>.tmp<pid>`,
    one's rename or clean-up taking the other's files (FileNotFoundError); one builds, the other waits and reads it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from data import corpus
    from data.shards import iter_docs, tier_shards
    from experiments.config import DataSpec
    from experiments.train_lm import corpus_tiers

    real, entered, both = corpus.stdlib_documents, [], threading.Event()

    def slow_start(max_files):  # the first build holds on after its first document until the second starts (1 s)
        entered.append(1)
        if len(entered) == 2:
            both.set()
        docs = real(max_files)
        yield next(docs)
        both.wait(1.0)
        yield from docs

    monkeypatch.setattr(corpus, "stdlib_documents", slow_start)
    spec = DataSpec(max_files=10, eval_every_nth=5, cache_dir=str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        tiers = [f.result() for f in [pool.submit(corpus_tiers, spec) for _ in range(2)]]
    assert tiers[0] == tiers[1]
    ids = sorted(d["id"] for tier in tiers[0] for shard in tier_shards(tier) for d in iter_docs(shard))
    assert ids == sorted(d["id"] for d in real(10))
    assert [p.name for p in tmp_path.iterdir()] == [pathlib.Path(tiers[0][0]).parent.name]  # no build left behind


def test_a_leaf_whose_dtype_changed_since_the_save_restores_and_verifies(tmp_path):
    """The checksum is over the saved bits: a bf16 leaf now kept in float32 (the MoE router bias) is verified as
    saved, then cast (it was quarantined as corrupt and training restarted from step 0)."""
    bias = jnp.asarray([0.0015, -0.25, 0.75, 1.0], jnp.bfloat16)
    ckpt = Checkpoints(tmp_path, async_save=False, keep_best=False)
    ckpt.save(5, {"w": jnp.ones((2, 3)), "bias": bias}, {})
    ckpt.close()
    ckpt = Checkpoints(tmp_path, keep_best=False)
    state, meta = ckpt.restore({"w": jnp.zeros((2, 3)), "bias": jnp.zeros((4,), jnp.float32)})
    ckpt.close()
    assert meta["step"] == 5 and state["bias"].dtype == jnp.float32
    np.testing.assert_array_equal(state["bias"], bias.astype(jnp.float32))


def test_some_entries_of_a_saved_state_restore_alone_each_verified_by_its_own_checksum(tmp_path):
    """A sampler needs a video stage's params or EMA, not its optimizer state: a dict template holding some of the
    saved entries reads only those, and a checksum that fails for one of them falls back like a whole state's."""
    ckpt = Checkpoints(tmp_path, async_save=False, keep_best=False, log=lambda *a: None)
    for step in (1, 2):
        ckpt.save(step, {"params": {"w": jnp.full(3, float(step))}, "opt_state": {"mu": jnp.zeros(3)},
                         "ema": {"w": jnp.full(3, step / 2)}}, {})
    meta = tmp_path / "2" / "meta" / "metadata"  # bit rot in step 2's EMA (its params are intact)
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"part_fingerprints": {
        **json.loads(meta.read_text())["part_fingerprints"], "ema": "0" * 16}}))
    state, meta = ckpt.restore({"params": {"w": jnp.zeros(3)}})
    assert meta["step"] == 2 and set(state) == {"params"}
    np.testing.assert_array_equal(state["params"]["w"], 2.0)
    lines = []
    ckpt.log = lines.append
    state, meta = ckpt.restore({"ema": {"w": jnp.zeros(3)}})
    assert meta["step"] == 1 and lines[0].startswith("checkpoint: step 2 is corrupt") and ckpt.steps() == [1]
    np.testing.assert_array_equal(state["ema"]["w"], 0.5)
    ckpt.close()


def test_a_missing_loader_state_or_unreadable_metrics_do_not_stop_a_restart(tmp_path):
    """A step whose loader folder is gone is corrupt (it was saved with one): the previous step is used, with its
    loader position. A step saved without a loader is refused by name when a loader asks for one. A zero-length
    metrics file (orbax reads them all when the manager opens) is set aside; its step stays restorable."""
    import shutil

    from experiments.checkpoint import CheckpointMismatch

    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, async_save=False, log=lambda *a: None)
    for step in (4, 8):
        ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=1.0 / step, loader=PositionLoader(10 * step))
    ckpt.close()
    shutil.rmtree(tmp_path / "ckpt" / "8" / "loader")  # crashed with KeyError: 'loader'
    lines, loader = [], PositionLoader(0)
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, async_save=False, log=lines.append)
    try:
        state, meta = ckpt.restore(state_at(0), loader=loader)
        assert meta["step"] == 4 and loader.position == 40 and float(state["params"]["w"][0, 0]) == 4.0
        assert "step 8 is corrupt" in lines[0] and (tmp_path / "ckpt-corrupt" / "8").is_dir()
        ckpt.save(12, state_at(12), {"config": "{}"}, eval_loss=0.01)  # no loader
        with pytest.raises(CheckpointMismatch, match="without a data loader state"):
            ckpt.restore(state_at(0), loader=loader)
    finally:
        ckpt.close()
    (tmp_path / "ckpt" / "12" / "metrics" / "metrics").write_text("")  # stopped every restart (JSONDecodeError)
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, async_save=False, log=lines.append)
    try:
        assert "step 12's saved eval metrics are unreadable or NaN" in lines[0]
        state, meta = ckpt.restore(state_at(0))
        assert meta["step"] == 12 and float(state["params"]["w"][0, 0]) == 12.0
    finally:
        ckpt.close()


def test_unreadable_metrics_stop_neither_a_run_without_keep_best_nor_a_reader(tmp_path):
    """orbax reads every step's metrics file when a manager opens, whatever the policies: a zero-length one (a power
    loss) was set aside only with keep_best, so `train.keep_best=False` and load_model (read_only) stopped on a bare
    JSONDecodeError. A writer sets it aside; a reader, which moves nothing, opens without reading them, and (orbax
    reads them with a step's metadata too) reports that step and restores the one before, as for any step that
    does not read back."""
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, async_save=False, log=lambda *a: None)
    for step in (4, 8):
        ckpt.save(step, state_at(step), {"config": "{}"}, eval_loss=1.0 / step)
    ckpt.close()
    (tmp_path / "ckpt" / "8" / "metrics" / "metrics").write_text("")
    lines = []
    reader = Checkpoints(tmp_path / "ckpt", keep_best=False, async_save=False, log=lines.append, read_only=True)
    try:
        assert reader.steps() == [4, 8] and reader.restore(state_at(0))[1]["step"] == 4
    finally:
        reader.close()
    assert len(lines) == 1 and lines[0].startswith("checkpoint: step 8 is corrupt") and "left in place" in lines[0]
    assert (tmp_path / "ckpt" / "8" / "metrics" / "metrics").exists() and not (tmp_path / "ckpt-corrupt").exists()
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep=3, keep_best=False, async_save=False, log=lines.append)
    try:
        assert "step 8's saved eval metrics are unreadable or NaN" in lines[0]
        state, meta = ckpt.restore(state_at(0))
        assert meta["step"] == 8 and float(state["params"]["w"][0, 0]) == 8.0
        ckpt.save(12, state_at(12), {"config": "{}"})
        assert ckpt.steps() == [4, 8, 12]
    finally:
        ckpt.close()


def test_the_checksum_sees_both_words_of_8_byte_leaves():
    """Under jax_enable_x64 a flip in the high 32 bits of a float64 / int64 leaf changes the fingerprint (the leaf
    sums kept only the low word of each value)."""
    from experiments.checkpoint import fingerprint

    with jax.enable_x64(True):
        for x in (np.arange(6, dtype=np.float64) + 0.5, np.arange(6, dtype=np.int64)):
            hi = x.copy()
            hi.view(np.uint32)[1::2][3] ^= 1 << 7  # the high word of element 3 (little endian)
            lo = x.copy()
            lo.view(np.uint32)[0::2][3] ^= 1 << 7
            base = fingerprint({"x": jnp.asarray(x)})
            assert fingerprint({"x": jnp.asarray(hi)}) != base != fingerprint({"x": jnp.asarray(lo)})


def test_a_state_whose_empty_nodes_or_field_order_changed_restores_by_its_arrays_still_verified(tmp_path):
    """The same arrays at the same paths in another tree: AdamW as a regrouped optax chain (its EmptyState /
    MaskedState nodes elsewhere) and a namedtuple whose fields were reordered. orbax's restore refused the first ("tree
    structures do not match") and the second failed the checksum, taken over the leaves in the saved order: both were
    taken for corruption, every step set aside and the run started again from step 0. They restore by path into the
    template's tree, verified against the checksum in the saved order, which still sets a damaged step aside."""
    import collections

    import optax

    old, new = collections.namedtuple("Old", ["z", "a"]), collections.namedtuple("New", ["a", "z"])
    params = {"b": jnp.zeros(3), "w": jnp.ones((2, 3))}
    mask, lr = {"b": False, "w": True}, optax.linear_schedule(1e-3, 0.0, 10)
    adamw = optax.adamw(lr, weight_decay=0.1, mask=mask)  # chain(adam, masked(decay), lr schedule)
    regrouped = optax.chain(optax.scale_by_adam(), optax.chain(optax.add_decayed_weights(0.1, mask)),
                            optax.scale_by_learning_rate(lr), optax.identity())
    assert jax.tree.structure(adamw.init(params)) != jax.tree.structure(regrouped.init(params))

    def saved_at(step):
        opt = jax.tree.map(lambda x: x + step, adamw.init(params))
        return {"opt_state": opt, "params": params, "pair": old(jnp.full(2, step), jnp.arange(3.0) * step)}

    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, keep_best=False, log=lambda *a: None)
    for step in (1, 2):
        ckpt.save(step, saved_at(step), {})
    ckpt.close()
    template = {"opt_state": regrouped.init(params), "params": params, "pair": new(jnp.zeros(3), jnp.zeros(2))}
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep_best=False, log=lines.append)
    try:
        state, meta = ckpt.restore(template)
        assert meta["step"] == 2 and not lines and ckpt.steps() == [1, 2]
        assert jax.tree.structure(state) == jax.tree.structure(template)
        want = saved_at(2)
        np.testing.assert_array_equal(state["opt_state"][0].nu["w"], want["opt_state"][0].nu["w"])
        np.testing.assert_array_equal(state["opt_state"][2].count, want["opt_state"][2].count)
        np.testing.assert_array_equal(state["pair"].a, want["pair"].a)
        np.testing.assert_array_equal(state["pair"].z, want["pair"].z)
        state, meta = ckpt.restore({"pair": template["pair"]})  # one entry alone, by its own checksum
        assert meta["step"] == 2 and not lines
        np.testing.assert_array_equal(state["pair"].a, want["pair"].a)
        meta_file = tmp_path / "ckpt" / "2" / "meta" / "metadata"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fingerprint": "0" * 16}))
        state, meta = ckpt.restore(template)
        assert meta["step"] == 1 and ckpt.steps() == [1] and (tmp_path / "ckpt-corrupt" / "2").is_dir()
        assert len(lines) == 1 and "checksum" in lines[0] and "falling back to step 1" in lines[0], lines
        np.testing.assert_array_equal(state["opt_state"][0].mu["b"], saved_at(1)["opt_state"][0].mu["b"])
    finally:
        ckpt.close()



def test_a_key_holding_a_slash_beside_the_nested_path_it_spells_restores_its_own_array(tmp_path):
    """Arrays are placed and the checksum ordered by path: with paths joined by '/', {"a/b": x} and {"a": {"b": y}}
    were one name, so a good step failed its checksum, was set aside, and the run started again from step 0."""
    state = {"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}, "c": {"d/e": jnp.full(3, 2.0), "d": {"e": jnp.arange(3.0)}}}
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", keep_best=False, async_save=False, log=lines.append)
    try:
        ckpt.save(1, state, {})
        got, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
        assert meta["step"] == 1 and not lines and ckpt.steps() == [1]
        jax.tree.map(np.testing.assert_array_equal, got, state)
        got, _ = ckpt.restore({"c": jax.tree.map(jnp.zeros_like, state["c"])})  # the part alone, by its own checksum
        jax.tree.map(np.testing.assert_array_equal, got["c"], state["c"])
    finally:
        ckpt.close()

def test_each_part_fingerprint_is_that_of_its_entry_in_any_key_order():
    """Each top-level entry's part fingerprint is its own leaves' checksum whatever order the dict was built in
    (init_train_state's {params, opt_state, ...} is not sorted); walking the entries in insertion order over the
    sorted leaf sums gave each entry another's, and a part restored alone then failed its checksum."""
    from experiments.checkpoint import fingerprint, part_fingerprints

    tree = {"params": {"w": jnp.arange(3.0)}, "opt_state": (jnp.ones(2), jnp.zeros(4)), "step": jnp.int32(7)}
    whole, parts = part_fingerprints(tree)
    assert whole == fingerprint(tree) and parts == {k: fingerprint(v) for k, v in tree.items()}


def test_part_fingerprints_of_many_entries_are_each_entrys_own(monkeypatch):
    """Each entry's checksum over its own leaves, in the tree's order or a given one, for a flat dict of 8,000 arrays
    (found by a scan over all the leaves once per entry, they took 11 s at every save and restore; one pass: 0.02 s,
    measured, not asserted here)."""
    import hashlib

    from experiments import checkpoint

    # each leaf's sum is its value: no 8,000-leaf program to compile, and each part's checksum is known
    monkeypatch.setattr(checkpoint, "_sums", lambda tree: np.asarray(jax.tree.leaves(tree), np.uint32).reshape(-1))
    tree = {f"w{i:04d}": np.uint32(i) for i in range(8000)} | {"empty": {}}
    _, parts = checkpoint.part_fingerprints(tree)
    _, reordered = checkpoint.part_fingerprints(tree, order=[(k,) for k in sorted(tree)[::-1] if k != "empty"])
    assert parts == reordered and parts["empty"] == hashlib.sha256(b"").hexdigest()[:16]
    assert parts["w0123"] == hashlib.sha256(np.uint32(123).tobytes()).hexdigest()[:16]


def test_a_state_with_bool_and_complex_leaves_saves_restores_and_is_checksummed(tmp_path):
    """optax.apply_if_finite keeps a bool in its state: the checksum's bitcast refused bool (and complex) leaves,
    so save() failed with a TypeError from inside jit that named neither the leaf nor a fix."""
    import optax

    from experiments.checkpoint import fingerprint

    opt_state = optax.apply_if_finite(optax.adam(1e-3), 3).init({"w": jnp.ones(3)})
    state = {"opt_state": opt_state, "z": jnp.array([1 + 2j, 3j], jnp.complex64)}
    flipped = jax.tree.map(lambda x: ~x if x.dtype == jnp.bool_ else x, state)
    other_z = {**state, "z": jnp.array([1 + 2j, 4j], jnp.complex64)}
    assert len({fingerprint(state), fingerprint(flipped), fingerprint(other_z)}) == 3
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, log=lambda *a: None)
    try:
        ckpt.save(1, state, {"config": "{}"})
        restored, meta = ckpt.restore(state)
    finally:
        ckpt.close()
    assert meta["step"] == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_sigint_like_sigterm_is_remembered_for_the_loop_and_the_handlers_come_back():
    """Ctrl-C (SIGINT) must reach the trainer's save-and-exit path as SIGTERM does (the kill test sends SIGTERM
    only, end to end): no KeyboardInterrupt mid-step, the signal's name for the exit line, the previous handlers
    afterwards. (Not raised for SIGTERM here: unhandled, it would end the test process.)"""
    import signal

    from experiments.run_log import Stop

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = Stop()
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        try:
            signal.raise_signal(signal.SIGINT)  # returns after the Python-level handler ran
        except KeyboardInterrupt:  # fail this test, not interrupt the whole session
            pytest.fail("SIGINT interrupted the step instead of asking the loop to stop")
        assert stop.signal == "SIGINT"
        signal.raise_signal(signal.SIGTERM)  # a scheduler's repeated SIGTERM: still the save-and-exit path
        assert stop.signal == "SIGTERM"
        # a second Ctrl-C is the user's way out of a hanging save: it was remembered like the first, so nothing
        # short of SIGKILL stopped the run
        with pytest.raises(KeyboardInterrupt, match="a second signal"):
            signal.raise_signal(signal.SIGINT)
        # Python drops an exception raised in a callback (a second Ctrl-C in JAX's gc hook was lost and the run went
        # on to save): the default action is back, so a third Ctrl-C ends the process
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_moe_train_record_averages_expert_load_over_the_moe_layers():
    """The trainer's MoE fields: expert_load is each expert's share averaged over the MoE layers (metrics['load'] is
    [L_moe, E]) and load_imbalance each layer's busiest share over its mean, averaged over the layers; a dense step
    adds no field."""
    from experiments.run_log import moe_record

    load_LE = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    rec = moe_record({"load": jnp.asarray(load_LE, jnp.float32), "lb_loss": jnp.float32(1.25),
                      "z_loss": jnp.float32(0.5), "dropped_frac": jnp.float32(0.125), "loss": jnp.float32(2.0)})
    want = load_LE.mean(axis=0)
    np.testing.assert_allclose(rec["expert_load"], want, rtol=1e-6)
    assert rec["load_imbalance"] == pytest.approx(np.mean(load_LE.max(-1) * 4), rel=1e-6)  # (2 + 1.6 + 1) / 3
    assert (rec["lb_loss"], rec["z_loss"], rec["dropped_frac"]) == (1.25, 0.5, 0.125)
    json.dumps(rec)  # plain floats: the record goes to metrics.jsonl as it is
    assert moe_record({"loss": jnp.float32(2.0)}) == {}
    # a step with no real token (all padding): the layer's load is all 0, by its docstring; the mean share 0 raised
    # ZeroDivisionError in the log call, which stopped the run. No imbalance to report: NaN, written as null
    rec = moe_record({"load": jnp.zeros((2, 4), jnp.float32), "lb_loss": jnp.float32(0.0),
                      "z_loss": jnp.float32(0.0), "dropped_frac": jnp.float32(0.0)})
    assert rec["expert_load"] == [0.0] * 4 and math.isnan(rec["load_imbalance"])


def test_moe_train_record_imbalance_sees_layers_collapsed_onto_different_experts():
    """Every layer sends all its tokens to one expert (lb_loss = E, its maximum), a different one per layer: the
    layer-averaged expert_load is uniform, but the imbalance is E (it read 1.0, 'balanced', from the averaged load)."""
    from experiments.run_log import moe_record

    rec = moe_record({"load": jnp.eye(4, dtype=jnp.float32), "lb_loss": jnp.float32(4.0),
                      "z_loss": jnp.float32(0.0), "dropped_frac": jnp.float32(0.0)})
    assert rec["expert_load"] == [0.25] * 4
    assert rec["load_imbalance"] == pytest.approx(4.0)


def test_a_float32_state_restored_into_a_float16_template_refuses_values_beyond_its_range(tmp_path):
    """A float32 weight of 7e4 restored into a float16 template became inf without a word (the checksum is over the
    saved bits); the run then skipped every step and refused every save. The restore names the array instead, leaves
    the checkpoint in place, and a narrowing cast that fits (bf16, or float16 within 65504) still restores."""
    w = jnp.asarray([[1.0, 7e4, 0.5], [65510.0, -2.0, 3.0]])
    ckpt = Checkpoints(tmp_path, async_save=False, keep_best=False)
    ckpt.save(5, {"params": {"w": w}, "step": jnp.asarray(5, jnp.int32)}, {}, loader=PositionLoader(40))
    ckpt.close()
    ckpt = Checkpoints(tmp_path, keep_best=False)
    f16 = {"params": {"w": jnp.zeros((2, 3), jnp.float16)}, "step": jnp.asarray(0, jnp.int32)}
    loader = PositionLoader(0)
    with pytest.raises(ValueError, match=r"would turn finite values into inf: params/w: saved float32 \(max "
                                         r"\|value\| 70000\), now float16, whose largest is 65504"):
        ckpt.restore(f16, loader=loader)
    assert ckpt.mgr.all_steps() == [5]  # refused, not quarantined as corrupt
    assert loader.position == 0  # a refused restore leaves the data stream where it was
    state, _ = ckpt.restore({"params": {"w": jnp.zeros((2, 3), jnp.bfloat16)}, "step": jnp.asarray(0, jnp.int32)},
                            loader=loader)
    assert loader.position == 40
    assert state["params"]["w"].dtype == jnp.bfloat16 and float(state["params"]["w"][0, 1]) == 70144.0
    ckpt.close()


def test_a_narrowing_restore_into_a_float8_without_inf_refuses_values_beyond_its_range(tmp_path):
    """float8_e4m3fn has no inf: a float32 weight of 500 (its largest is 448) restored into it became NaN, and the
    range check, which looked for inf, let it through silently. A weight within range still restores."""
    ckpt = Checkpoints(tmp_path, async_save=False, keep_best=False)
    ckpt.save(5, {"w": jnp.asarray([1.0, 500.0, -2.0])}, {})
    ckpt.close()
    ckpt = Checkpoints(tmp_path, keep_best=False)
    with pytest.raises(ValueError, match=r"w: saved float32 \(max \|value\| 500\), now float8_e4m3fn, whose largest "
                                         r"is 448"):
        ckpt.restore({"w": jnp.zeros(3, jnp.float8_e4m3fn)})
    assert ckpt.mgr.all_steps() == [5]  # refused, not quarantined as corrupt
    state, _ = ckpt.restore({"w": jnp.zeros(3, jnp.float8_e5m2)})  # e5m2 holds 500 (as 512)
    assert state["w"].astype(jnp.float32).tolist() == [1.0, 512.0, -2.0]
    ckpt.close()


def test_a_narrowing_restore_says_what_each_overflowing_cast_would_make(tmp_path):
    """The refusal said 'would turn finite values into inf' for a float8_e4m3fn template too, where the cast makes
    NaN (it has no inf). Each array now says what it would become: NaN in float8_e4m3fn, inf in float16."""
    ckpt = Checkpoints(tmp_path, async_save=False, keep_best=False)
    ckpt.save(5, {"a": jnp.asarray([1.0, 500.0]), "b": jnp.asarray([7e4, 0.0])}, {})
    ckpt.close()
    ckpt = Checkpoints(tmp_path, keep_best=False)
    with pytest.raises(ValueError, match=r"finite values into inf or NaN: a: saved float32 \(max \|value\| 500\), now "
                                         r"float8_e4m3fn, whose largest is 448 \(it would be NaN\); b: saved float32 "
                                         r"\(max \|value\| 70000\), now float16, whose largest is 65504 \(it would be "
                                         r"inf\)"):
        ckpt.restore({"a": jnp.zeros(2, jnp.float8_e4m3fn), "b": jnp.zeros(2, jnp.float16)})
    ckpt.close()


def _run_exiting_script(body: str, out) -> str:
    """Run `body` in a fresh interpreter (`ck(sub)`: an async Checkpoints under `out`/sub, `big(step)`: a state worth
    writing in the background); returns its stderr."""
    import subprocess
    import sys

    script = ("import sys, jax, jax.numpy as jnp\n"
              "from experiments.checkpoint import Checkpoints\n"
              "def ck(sub):\n"
              "    return Checkpoints(f'{sys.argv[1]}/{sub}', keep=5, keep_best=False, async_save=True, log=print)\n"
              "def big(step):\n"
              "    return {'w': jnp.full((512, 256), float(step))}\n" + body)
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def _restored_step(directory) -> int:
    ckpt = Checkpoints(directory, keep=5, keep_best=False, async_save=False, log=lambda *a: None)
    try:
        state, meta = ckpt.restore({"w": jnp.zeros((512, 256))})
    finally:
        ckpt.close()
    assert float(state["w"][0, 0]) == meta["step"]
    return meta["step"]


def test_async_saves_still_writing_when_the_process_exits_are_finished_not_lost(tmp_path):
    """A script that saves asynchronously and ends without close(): the newest save was still writing in the
    background when the interpreter shut down, failed with 'cannot schedule new futures after interpreter
    shutdown' and left only `<step>.orbax-checkpoint-tmp` (measured: 9 of 10 steps on disk). It is finished first."""
    err = _run_exiting_script("c = ck('ckpt')\nfor step in (1, 2, 3):\n    c.save(step, big(step), {'config': '{}'})\n",
                              tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2", "3"], err[-2000:]
    assert _restored_step(tmp_path / "ckpt") == 3


def test_an_async_save_of_a_dropped_checkpoints_is_finished_at_exit(tmp_path):
    """A Checkpoints made in a function that returns without close(): the hook held the Checkpoints weakly, which
    was gone while orbax's writer still ran, so the step was lost as at any exit (3.orbax-checkpoint-tmp)."""
    err = _run_exiting_script("def train():\n    c = ck('ckpt')\n    for step in (1, 2, 3):\n"
                              "        c.save(step, big(step), {'config': '{}'})\n"
                              "train()\nimport gc\ngc.collect()\n", tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2", "3"], err[-2000:]
    assert _restored_step(tmp_path / "ckpt") == 3


def test_a_save_failing_at_exit_does_not_lose_the_other_managers_saves(tmp_path):
    """The exit hook re-raised a failed background save: Python printed 'Exception ignored in: <module threading>'
    and skipped the remaining hooks, so a manager made earlier lost the step it was still writing. The failure is
    now one line of the failing manager's log."""
    err = _run_exiting_script(
        "first, failing = ck('first'), ck('failing')\n"
        "def disk_full():\n    raise OSError('No space left on device')\n"
        "failing.mgr.wait_until_finished = disk_full\n"
        "first.save(1, big(1), {'config': '{}'})\n", tmp_path)
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["1"], err[-2000:]
    assert _restored_step(tmp_path / "first") == 1
    assert "Exception ignored" not in err, err[-2000:]
    assert f"checkpoint: the save still writing in {tmp_path / 'failing'} at exit failed (OSError: No space left on " \
           "device)" in err, err[-2000:]


def test_the_recorded_mesh_leaves_out_axes_of_size_one():
    """A checkpoint's meta records the axes that split something: a mesh with a size-1 axis (jax.make_mesh keeps it,
    parallel.make_mesh drops it) is the same mesh, and a resume across the two gets no note."""
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert mesh_axes(mesh) == {"data": 2, "fsdp": 4}
    assert other_mesh_note({"mesh": {"data": 2, "fsdp": 4}}, mesh) == ""
    # a resume onto (or from) one device says so once: it read "(one device) (1 devices)"
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    assert other_mesh_note({"mesh": {"fsdp": 8}}, one).startswith("; note: saved on mesh {'fsdp': 8} (8 devices), "
                                                                  "resumed on one device: sums")
    assert other_mesh_note({"mesh": {}}, mesh).startswith("; note: saved on one device, resumed on {'data': 2, "
                                                          "'fsdp': 4} (8 devices): sums")
    # bfloat16 compute rounds each sharded sum to bfloat16: a tiny bf16 run resumed on another mesh logged losses
    # up to 5e-5 off (float32: up to 1e-6), which the note called "the last float32 digits"
    assert other_mesh_note({"mesh": {"fsdp": 8}}, one).endswith("in the last float32 digits")
    assert other_mesh_note({"mesh": {"fsdp": 8}}, one, "bfloat16").endswith("in the last bfloat16 digits (its "
                                                                            "compute dtype)")


def test_float64_leaves_saved_under_x64_restore_with_it_on_and_are_named_with_it_off(tmp_path):
    """A state with float64 / int64 leaves saved under jax_enable_x64 read as float32 / int32 in a process without
    it: its checksum failed, and the good checkpoint was reported corrupt and set aside (restore then found none, so
    a trainer started again from step 0). Without x64 it is refused, named, and left in place; with x64 it restores,
    cast to the template's dtypes."""
    from experiments.checkpoint import CheckpointMismatch

    with jax.enable_x64(True):
        state = {"n": jnp.arange(3, dtype=jnp.int64), "w": jnp.arange(6, dtype=jnp.float64) / 3}
        ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, log=lambda *a: None)
        ckpt.save(1, state, {"config": "{}"})
        ckpt.close()
    template = {"n": jnp.zeros(3, jnp.int32), "w": jnp.zeros(6, jnp.float32)}
    lines = []
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, log=lines.append)
    try:
        with pytest.raises(CheckpointMismatch, match=r"n: saved int64.*w: saved float64.*jax_enable_x64"):
            ckpt.restore(template)
        assert ckpt.steps() == [1] and not lines  # not reported corrupt, not set aside
        with jax.enable_x64(True):
            got, _ = ckpt.restore(template)
        assert {k: v.dtype for k, v in got.items()} == {"n": jnp.int32, "w": jnp.float32}
        np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float64).astype(np.float32) / np.float32(3))
        np.testing.assert_array_equal(got["n"], [0, 1, 2])
        # an int64 beyond int32 wrapped around in that cast, silently (2**40 + 5 restored as 5): refused, as a float
        # cast that would overflow is
        with jax.enable_x64(True):
            ckpt.save(2, {"n": jnp.asarray([2**40 + 5, -7, 1], jnp.int64), "w": state["w"]}, {"config": "{}"})
            with pytest.raises(CheckpointMismatch, match=r"would wrap integers around: n: saved int64 \(values -7 to "
                                                         r"1099511627781\), now int32, which holds -2147483648 to "):
                ckpt.restore(template)
        assert ckpt.steps() == [1, 2]
    finally:
        ckpt.close()


def test_integers_the_template_cannot_hold_are_refused_below_its_range_unsigned_and_without_float_leaves(tmp_path):
    """The wrap-around refusal of an x64 checkpoint's integers holds for a value below int32's range (-2**40 casts to
    0, as numpy's cast does), for a uint64 beyond uint32 (no lower bound to cross), and in a state with no float leaf
    to compare; beside a float64 beyond float16's range the refusal names both."""
    from experiments.checkpoint import CheckpointMismatch

    assert np.int64(-2**40).astype(np.int32) == 0 and np.uint64(2**40).astype(np.uint32) == 0  # the silent casts
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False, log=lambda *a: None)
    try:
        with jax.enable_x64(True):
            ckpt.save(1, {"n": jnp.asarray([-2**40, 1], jnp.int64), "u": jnp.asarray([3, 2**40], jnp.uint64)},
                      {"config": "{}"})
            with pytest.raises(CheckpointMismatch, match=r"would wrap integers around: n: saved int64 \(values "
                                                         r"-1099511627776 to 1\), now int32, .*; u: saved uint64 "
                                                         r"\(values 3 to 1099511627776\), now uint32"):
                ckpt.restore({"n": jnp.zeros(2, jnp.int32), "u": jnp.zeros(2, jnp.uint32)})
            ckpt.save(2, {"n": jnp.asarray([2**40, 1], jnp.int64), "w": jnp.asarray([7e4, 1.0], jnp.float64)},
                      {"config": "{}"})
            with pytest.raises(CheckpointMismatch, match=r"would turn finite values into inf and wrap integers around"):
                ckpt.restore({"n": jnp.zeros(2, jnp.int32), "w": jnp.zeros(2, jnp.float16)})
        assert ckpt.steps() == [1, 2]  # the caller's error: nothing set aside
    finally:
        ckpt.close()


def test_a_bucket_url_is_refused_before_any_local_folder_is_made(tmp_path, monkeypatch):
    """orbax writes gs:// itself, but this class's own pathlib calls made gs://b/ckpt the local folder gs:/b/ckpt
    (created, then saved into by orbax as a local path): a user of the class lost the checkpoints with the VM."""
    monkeypatch.chdir(tmp_path)
    for url in ("gs://b/ckpt", pathlib.Path("s3://b/ckpt")):
        with pytest.raises(ValueError, match=r"is a URL.*gcsfuse"):
            Checkpoints(url, async_save=False)
    assert not list(tmp_path.iterdir())


def test_the_documented_plain_orbax_read_gives_a_step_saved_on_8_devices_on_one(tmp_path):
    """experiments/checkpoint.py's recipe, run as written in a process that imports nothing from this repo and has
    one device: the state saved sharded over 8 (orbax's default restore re-creates the saved shardings and fails
    there), its meta and its config, as saved."""
    import re
    import subprocess
    import sys

    from jax.sharding import NamedSharding, PartitionSpec as P

    from experiments import checkpoint
    from parallel import make_mesh

    mesh = make_mesh({"fsdp": 8})
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    state = {"params": {"w": put(jnp.arange(32.0).reshape(8, 4), P("fsdp")), "b": put(jnp.ones(4), P())},
             "opt_state": (None, {"mu": put(jnp.full((8, 4), 0.5), P("fsdp"))}),
             "step": put(jnp.asarray(7, jnp.int32), P())}
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False)
    ckpt.save(7, state, {"config": json.dumps({"mesh": {"fsdp": 8}})}, eval_loss=2.5)
    ckpt.close()
    m = re.search(r"^    (import json, pathlib.*?)\n\n?(?=\S|\Z)", checkpoint.__doc__, re.S | re.M)
    assert m, "experiments/checkpoint.py's docstring lost its plain orbax recipe"
    code = "\n".join(line.removeprefix("    ") for line in m.group(1).splitlines())
    assert '"runs/demo/ckpt/200"' in code
    code = code.replace('"runs/demo/ckpt/200"', repr(str(tmp_path / "ckpt" / "7")))
    code += (f"\nassert len(jax.devices()) == 1\nnp.savez({str(tmp_path / 'got.npz')!r}, w=state['params']['w'], "
             "b=state['params']['b'], mu=state['opt_state'][1]['mu'], step=state['step'], "
             "none=state['opt_state'][0] is None)\nprint(json.dumps([meta['step'], meta['eval_loss'], config]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [7, 2.5, {"mesh": {"fsdp": 8}}]
    got = np.load(tmp_path / "got.npz")
    for k, want in (("w", state["params"]["w"]), ("b", state["params"]["b"]), ("mu", state["opt_state"][1]["mu"]),
                    ("step", state["step"])):
        np.testing.assert_array_equal(got[k], np.asarray(want))
    assert got["none"]
