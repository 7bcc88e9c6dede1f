"""Checkpoints under failure (tiny preset, 8 fake CPU devices): kill -9 at two points (one while an async save is
writing) and resume → the loss of every step and the final parameters are bit-identical to an uninterrupted run;
a truncated or overwritten newest checkpoint is reported and the previous one is used; a checkpoint saved on 8
devices restores onto 4 and 1; NaN batches are skipped or halt the run as configured and never reach the disk; a
checkpoint of another model config is refused with a config error and left where it is, never quarantined."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint, run_log, train_lm
from experiments.checkpoint import CheckpointMismatch, Checkpoints, NonFiniteState
from experiments.config import load
from parallel import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 12 steps, saves at 4, 8, 12, keeps 3; the eval target is first reached at step 4
TINY = ["--preset", "tiny", "--set", "train.sample_tokens=0", "--set", "train.eval_target=5.3"]


# ahead of ROOT on a trainer's path: its `import torch` fails (tensorboardX's optional import of the test-only torch
# took 2 s of each trainer's start; nothing the trainer runs uses it)
NO_TORCH = os.path.join(ROOT, "tests", "no_torch")


def launch(out, *extra, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=os.pathsep.join([NO_TORCH, ROOT]))
    if cache:  # relaunches reuse the compiled programs (the same executables: results stay bit-identical)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, "-m", "experiments.train_lm", *TINY, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def train_records(out):
    """Every logged train step in order, replays after a resume included: [(step, loss, grad_norm)]."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]


_TEMPLATES = {}


def restore(out, devices=None, step=None, log=print):
    cfg = load(TINY)
    key = len(devices or jax.devices())
    if key not in _TEMPLATES:  # the state's shapes and shardings on a mesh of that many devices (nothing allocated)
        _TEMPLATES[key] = train_lm.abstract_train_state(cfg, make_mesh({"fsdp": -1}, devices=devices))[3]
    template = _TEMPLATES[key]
    ckpt = Checkpoints(out / "ckpt", keep=cfg.train.keep, log=log)
    try:
        return ckpt.restore(template, step)
    finally:
        ckpt.close()


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed with SIGKILL after step 5 and again right after issuing the async
    save of step 8, then resumed to the end (the reference runs alongside, from the second attempt on: by then the
    first has compiled every program both runs use, so the reference loads them instead of compiling them again;
    the same executables, as each relaunch's)."""
    base = tmp_path_factory.mktemp("train")
    ref, crashed, cache = base / "ref", base / "crashed", base / "xla-cache"
    p_ref, logs = None, []
    for extra in (["--set", "train.kill_at=5"], ["--set", "train.kill_at=8", "--set", "train.kill_in_save=True"], []):
        p = launch(crashed, *extra, cache=cache)
        if p_ref is None and logs:
            p_ref = launch(ref, cache=cache)
        logs.append(finish(p))
    ref_code, ref_log = finish(p_ref)
    assert ref_code == 0, ref_log
    (base / "ref.log").write_text(ref_log)  # the console: the CPU peak that MFU is over
    # a long run for the SIGTERM test: it starts here and trains until that test stops it
    p_term = launch(base / "term", "--set", "train.steps=100000", "--set", "train.eval_every=100000",
                    "--set", "train.save_every=100000", "--set", "train.log_every=10", cache=cache)
    yield ref, crashed, logs, (base / "term", p_term)
    if p_term.poll() is None:
        p_term.kill()
        p_term.wait()


def test_kill9_and_resume_is_bit_identical(runs):
    ref, crashed, logs, _ = runs
    assert [c for c, _ in logs] == [-signal.SIGKILL, -signal.SIGKILL, 0], logs[-1][1]
    assert "resumed from step 4" in logs[1][1]  # killed after step 5: steps 5 was lost, 4 was saved
    resumed = int(logs[2][1].split("resumed from step ")[1].split()[0])
    assert resumed in (4, 8)  # the save of 8 was either finished by orbax or discarded as incomplete
    if resumed == 4:
        assert "ignoring incomplete save" in logs[2][1]
    want = train_records(ref)
    got = train_records(crashed)
    assert [s for s, *_ in want] == list(range(1, 13))
    # the steps after each checkpoint were replayed, their interrupted attempt's records dropped: every step logged
    # once, and every replay, like every other step, matches the reference bit for bit
    assert got == want
    (ref_state, ref_meta), (state, meta) = restore(ref), restore(crashed)
    assert ref_meta["step"] == meta["step"] == 12 and int(state["step"]) == 12
    assert_trees_equal(ref_state, state)
    loader_state = lambda run: (run / "ckpt" / "12" / "loader" / "process_0-of-1.json").read_text()  # noqa: E731
    assert loader_state(crashed) == loader_state(ref)  # the data position too
    # the run's clock and first crossing of the eval target travel with the checkpoints: logged once, at step 4
    targets = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"target"' in x]
               for run in (ref, crashed)]
    assert [[r["step"] for r in t] for t in targets] == [[4], [4]], targets
    assert meta["target_time_s"] == targets[1][0]["wall_s"] and meta["first_eval"] == ref_meta["first_eval"]


def test_each_resume_marks_its_restart_in_tensorboard(runs):
    """Every resumed attempt's events file starts with a SessionLog START at its checkpoint's step + 1, so that
    TensorBoard's Python loader drops the killed attempt's events past the checkpoint (the Rust one keeps each step's
    last value anyway): read that way, the crashed run's curves are the reference run's, each step once."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    from tests.test_train_checkpoint import tb_as_python_loader_reads

    ref, crashed, logs, _ = runs
    resumed = [int(log.split("resumed from step ")[1].split()[0]) for _, log in logs[1:]]
    starts = []
    for f in sorted((crashed / "tb").iterdir()):
        buf, n = f.read_bytes(), 0
        events = []
        while n + 12 <= len(buf) and len(events) < 2:  # file_version, then the first event the run wrote
            size = int.from_bytes(buf[n:n + 8], "little")
            events.append(Event.FromString(buf[n + 12:n + 12 + size]))
            n += 12 + size + 4
        first = events[-1]
        starts.append(first.step if first.session_log.status == SessionLog.START else None)
    assert starts == [None] + [s + 1 for s in resumed], (starts, resumed)
    want, got = tb_as_python_loader_reads(ref / "tb"), tb_as_python_loader_reads(crashed / "tb")
    assert want.keys() == got.keys() and want["train/loss"] == got["train/loss"]  # replays are bit-identical
    for tag in want:  # a resume's first step compiles: it has no throughput (no tokens_per_s, step_time_s, mfu)
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)), tag
        assert tag.split("/")[1] in ("tokens_per_s", "step_time_s", "mfu") or steps == [s for s, _ in want[tag]], tag


def test_sigterm_finishes_the_step_saves_and_exits_0(runs):
    out, p = runs[3]
    deadline = time.time() + 240
    log_file = out / "metrics.jsonl"
    while not (log_file.exists() and '"kind": "train"' in log_file.read_text()):
        assert p.poll() is None and time.time() < deadline, "the long run did not start training"
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    code, log = finish(p, timeout=120)
    assert code == 0, log
    saved = int(log.split("SIGTERM: saved step ")[1].split(";")[0])
    state, meta = restore(out)
    assert meta["step"] == saved == int(state["step"]) >= 10


def test_logged_metrics_follow_their_definitions(runs):
    """Every train record of the reference run: ppl = exp(loss), lr = the warmup + cosine formula at the update it
    made, tokens/s × s/step = the batch's tokens, MFU = tokens/s × the config's FLOPs per token over the CPU peak
    printed at start (the whole host: no test read these fields, so a wrong lr step or an MFU over 8 fake devices
    passed); the same scalars in TensorBoard, and loss.png at the end."""
    from scaling.flops import train_flops_per_token
    from tests.test_train_checkpoint import _tb_scalars

    ref = runs[0]
    cfg = load(TINY)
    o, t = cfg.optim, cfg.train
    peak = float((ref.parent / "ref.log").read_text().split("peak cpu (measured matmul) ")[1].split()[0]
                 .replace(",", "")) * 1e9
    fpt = train_flops_per_token(cfg.model, t.seq)
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, t.steps + 1))
    assert train[0]["tokens_per_s"] is None and "mfu" not in train[0]  # the first step compiles: no throughput
    last = t.steps - 1
    for r in train:
        c = r["step"] - 1  # the update this step made
        lr = o.lr * c / o.warmup_steps if c < o.warmup_steps else o.lr * (
            o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * (c - o.warmup_steps) /
                                                                      (last - o.warmup_steps))))
        assert r["lr"] == pytest.approx(lr, rel=1e-5, abs=1e-9), r
        assert r["ppl"] == pytest.approx(np.exp(r["loss"]), rel=1e-9) and r["grad_norm"] > 0
        if r["step"] > 1:
            assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(t.batch * t.seq, rel=1e-9)
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / peak, rel=2e-3), r
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == list(range(0, t.steps + 1, t.eval_every))
    scalars = {(tag, s): v for tag, s, v in _tb_scalars(ref / "tb")}
    for r in train[1:]:
        for k in ("loss", "lr", "mfu", "tokens_per_s"):
            assert scalars[(f"train/{k}", r["step"])] == pytest.approx(r[k], rel=1e-6)
    assert [s for tag, s in scalars if tag == "eval/loss"] == [r["step"] for r in evals]
    assert (ref / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(runs, tmp_path, damage, capsys):
    ref = runs[0]
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    # truncate every sizeable file of the newest checkpoint, or flip the bits of its array data files (d/)
    for victim in (out / "ckpt" / "12" / "state").rglob("*"):
        if victim.is_file() and victim.stat().st_size > 10_000 and (damage == "truncate" or victim.parent.name == "d"):
            data = victim.read_bytes()
            victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else
                               data[:64] + bytes(255 - b for b in data[64:]))
    if damage == "overwrite":  # the restore path on its own: one line, then the previous step
        lines = []
        state, meta = restore(out, log=lines.append)
        assert meta["step"] == 8 and int(state["step"]) == 8
        assert len(lines) == 1 and lines[0].startswith("checkpoint: step 12 is corrupt or incomplete") \
            and lines[0].endswith("falling back to step 8"), lines
        assert_trees_equal(state, restore(ref, step=8)[0])
    else:  # the trainer: says so, resumes from 8 and redoes 9..12 exactly
        result = train_lm.main([*TINY, "--out", str(out)])
        printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("checkpoint:", "resumed"))]
        assert printed[0].startswith("checkpoint: step 12 is corrupt or incomplete (") \
            and printed[0].endswith("); falling back to step 8"), printed
        assert printed[1].startswith("resumed from step 8") and result["step"] == 12
        assert "note: saved on mesh" not in printed[1]  # the same mesh: nothing to note
        assert_trees_equal(restore(out)[0]["params"], restore(ref)[0]["params"])
    assert (out / "ckpt-corrupt" / "12").is_dir()  # kept aside for inspection, never loaded again


@pytest.mark.parametrize("n", [4, 1])
def test_restore_saved_on_8_devices_onto_fewer(runs, n):
    ref = runs[0]
    state8, _ = restore(ref)
    state, meta = restore(ref, devices=jax.devices()[:n])
    assert {d.id for x in jax.tree.leaves(state) for d in x.sharding.device_set} == {d.id for d in jax.devices()[:n]}
    assert_trees_equal(state8, state)


def test_nan_skip_leaves_state_unchanged_and_continues(tmp_path, capsys):
    out = tmp_path / "skip"  # 6 steps: the program of the other 6-step runs here
    result = train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.save_every=1",
                            "--set", "train.keep=10", "--set", "train.poison_steps=(3,)",
                            "--set", "train.nan_policy=skip"])
    assert result["skipped"] == 1 and result["step"] == 6
    # finite gradients whose float32 norm overflows are skipped too (test_train_config): the line says so (it read
    # "non-finite loss/gradients" to a run whose every gradient was finite)
    assert re.search(r"step 3: non-finite loss \(nan\) or gradient norm \(nan; a norm over ~1.8e19 overflows "
                     r"float32\); step skipped \(1 skipped so far\)", capsys.readouterr().out)
    s2, s3, s4 = (restore(out, step=s)[0] for s in (2, 3, 4))
    assert_trees_equal(s2["params"], s3["params"])  # the poisoned step changed nothing...
    assert_trees_equal(s2["opt_state"], s3["opt_state"])
    assert int(s3["skipped"]) == 1 and int(s3["step"]) == 3
    assert not np.array_equal(*(np.asarray(jax.device_get(s["params"]["embed"])) for s in (s3, s4)))  # ...4 did
    for s in (s2, s3, s4):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(s["params"])))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "nonfinite"] == [3]
    assert [r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 3] == [None]  # NaN is not JSON
    # resumed with fewer steps than it has: it reported the step-6 model as a 5-step run's, and exited 0
    with pytest.raises(SystemExit, match=r"train.steps: .* is at step 6, past train.steps=5; pass --set "
                                         r"train.steps=6 \(or more\)"):
        train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=5", "--set", "train.save_every=1",
                       "--set", "train.keep=10", "--set", "train.nan_policy=skip"])


def test_nan_halt_stops_without_saving_poison(tmp_path):
    out = tmp_path / "halt"
    with pytest.raises(SystemExit) as e:
        train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.save_every=1",
                       "--set", "train.poison_steps=(3,)", "--set", "train.nan_policy=halt"])
    assert str(e.value).startswith("halted at step 3 (nan_policy=halt); newest good checkpoint: 2")
    assert sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit()) == [1, 2]


def test_nan_halt_stops_at_a_nan_eval_before_saving_it(tmp_path):
    """lr 1e3: a step N whose loss and gradient norm are finite (its parameters' before the update) makes parameters
    that evaluate to NaN. Saved, step N was named the "newest good checkpoint" when step N + 1 halted, and every step
    resumed from it is NaN again. (N is the first step whose weights overflow: 9 on the Intel hosts, 10 on Zen 5,
    whose float32 kernels round differently; the run is read for it.)"""
    out = tmp_path / "halt_eval"
    with pytest.raises(SystemExit) as e:
        train_lm.main([*TINY, "--out", str(out), "--lr", "1e3", "--set", "train.steps=12", "--set",
                       "train.eval_every=1", "--set", "train.save_every=1", "--set", "train.keep=12", "--set",
                       "train.nan_policy=halt"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (n, eval_loss), = [(r["step"], r.get("eval_loss", 0)) for r in rows if r["kind"] == "nonfinite"]
    assert eval_loss is None and n > 1  # the evaluation found it, not the step: its loss was finite
    assert [np.isfinite(r["loss"]) for r in rows if r["kind"] == "train" and r["step"] == n] == [True]
    assert str(e.value).startswith(f"halted at step {n} (nan_policy=halt); newest good checkpoint: {n - 1}")
    steps = sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit())
    assert steps == list(range(1, n))
    assert all(np.isfinite(checkpoint.read_meta(out / "ckpt", s)["eval_loss"]) for s in steps)


def test_a_diverging_run_logs_strict_json_and_finishes(tmp_path):
    """lr 30 takes the loss past 709 nats with every number finite: exp() of the eval loss raised OverflowError
    and killed the run before its checkpoint; now ppl is inf, and every non-finite number is null in the JSONL
    (bare NaN / Infinity are not JSON: strict readers refuse the file)."""
    out = tmp_path / "diverge"
    result = train_lm.main([*TINY, "--out", str(out), "--lr", "30", "--set", "train.keep=1"])

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    rows = [json.loads(x, parse_constant=refuse) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert result["step"] == 12 and max(r["loss"] for r in evals) > 709
    assert any(r["loss"] > 709 and r["ppl"] is None for r in evals)
    assert all(r["ppl"] is None or abs(np.log(r["ppl"]) - r["loss"]) < 1e-6 for r in rows if "ppl" in r)


def test_an_eval_target_the_start_already_meets_is_crossed_at_step_0(tmp_path):
    """A run whose first evaluation is already at the target (a fine-tuned checkpoint, a loose target) crossed it at
    step 0, before any training: it was logged at the next evaluation, its time counting the first compilation."""
    out = tmp_path / "met"
    # intervals of 4 in a run of 6 (the 6-step runs' program): the last step is logged, evaluated and saved off the
    # interval too
    result = train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.eval_every=4",
                            "--set", "train.eval_target=100", "--set", "train.save_every=4",
                            "--set", "train.log_every=4"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [4, 6]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 6] and result["last_eval"] == rows[-1]["loss"]
    assert sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit()) == [4, 6]
    first_eval = next(r for r in rows if r["kind"] == "eval")
    targets = [r for r in rows if r["kind"] == "target"]
    assert first_eval["step"] == 0 and first_eval["loss"] <= 100
    assert [r["step"] for r in targets] == [0] and result["target_time_s"] == targets[0]["wall_s"]
    assert targets[0]["wall_s"] < min(r["wall_s"] for r in rows if r["kind"] == "train")  # before any step


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_nonfinite_state_is_never_saved(runs, tmp_path, where):
    """A NaN / Inf anywhere in the state: the parameters, or an optimizer moment (the check skipping opt_state
    passed when only params were poisoned)."""
    state, _ = restore(runs[0])
    if where == "params":
        norm = state["params"]["final_norm"]
        norm[...] = norm[...].at[0].set(np.inf)
    else:  # AdamW's second moment of the LM head (the last float leaf: after it comes the int step count)
        leaves, tree = jax.tree.flatten(state["opt_state"])
        k = max(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
        leaves[k] = jax.device_put(leaves[k].reshape(-1).at[0].set(jnp.inf).reshape(leaves[k].shape),
                                   leaves[k].sharding)
        state = dict(state, opt_state=jax.tree.unflatten(tree, leaves))
    ckpt = Checkpoints(tmp_path / "ckpt")
    with pytest.raises(NonFiniteState, match="refusing to save step 13"):
        ckpt.save(13, state, {})
    ckpt.close()
    time.sleep(0.1)
    assert ckpt.steps() == [] and not any(p.name.startswith("13") for p in (tmp_path / "ckpt").iterdir())


def test_resume_after_a_skipped_step_keeps_its_count(tmp_path):
    """The schedule runs at step - skipped: a resume that reset the skipped count (never tested: the kill -9 runs
    skip nothing) would train on with learning rates one update off. Resumed from step 4 after step 3 was skipped:
    the count and the parameters at step 6 are the uninterrupted run's."""
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.save_every=2", "--set",
            "train.keep=10", "--set", "train.poison_steps=(3,)", "--set", "train.nan_policy=skip", "--set",
            "train.eval_every=100", "--set", "train.progress=false"]
    train_lm.main(args)  # saves 2, 4 and 6
    ref6, _ = restore(out, step=6)
    ref6 = jax.device_get(ref6)
    shutil.rmtree(out / "ckpt" / "6")
    checkpoint._leaf_sums.clear_cache()
    result = train_lm.main(args)
    assert result["skipped"] == 1
    assert checkpoint._leaf_sums._cache_size() == 1  # the resume's checksum is the saves' program (it compiled 2)
    got6, _ = restore(out, step=6)
    assert int(got6["skipped"]) == 1
    assert_trees_equal(ref6["params"], got6["params"])


def test_only_an_evaluated_step_carries_an_eval_loss_and_a_rerun_at_its_end_evaluates_nothing(tmp_path):
    """A step saved between evaluations holds parameters nobody evaluated: it carries no eval loss (the last one
    logged, another step's, would let keep_best keep it as the best checkpoint); an evaluated step carries the loss
    logged at it. A rerun at the last step resumes that eval loss: it trains and evaluates nothing (a resume that
    dropped it evaluated the final step again and logged it twice). Neither was tested: every other run saves on
    its evaluation steps."""
    out = tmp_path / "run"  # 6 steps: the program of the other 6-step runs here
    args = [*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.eval_every=4", "--set",
            "train.save_every=2", "--set", "train.keep=10", "--set", "train.progress=false"]
    train_lm.main(args)
    rows = lambda: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    evals = {r["step"]: r["loss"] for r in rows() if r["kind"] == "eval"}
    assert sorted(evals) == [0, 4, 6]
    assert {s: checkpoint.read_meta(out / "ckpt", s)["eval_loss"] for s in (2, 4, 6)} == {
        2: None, 4: evals[4], 6: evals[6]}
    before = rows()
    result = train_lm.main(args)
    assert result["step"] == 6 and result["last_eval"] == evals[6] and rows() == before


def test_a_resume_keeps_its_eval_targets_crossing_only_for_the_same_target(tmp_path):
    """The wall time of the eval target's first crossing travels with the checkpoint; resumed with another
    train.eval_target it is dropped (that target was never crossed), with the same one it is kept and not logged
    again (the reset for another target was untested: dropping the check reported 100's crossing as 0.01's)."""
    out, out_other = tmp_path / "run", tmp_path / "other"
    args = ["--set", "train.eval_every=2", "--set", "train.save_every=1", "--set", "optim.warmup_steps=0", "--set",
            "train.progress=false", "--set", "train.steps=2"]
    first = train_lm.main([*TINY, "--out", str(out), *args, "--set", "train.eval_target=100"])  # saves 1 and 2
    assert first["target_time_s"] is not None  # crossed at step 0
    shutil.rmtree(out / "ckpt" / "2")
    shutil.copytree(out, out_other)
    # both resumes train step 2 again from step 1: one program for all three runs (that of the 2-step runs here)
    same = train_lm.main([*TINY, "--out", str(out), *args, "--set", "train.eval_target=100"])
    assert same["target_time_s"] == first["target_time_s"]
    other = train_lm.main([*TINY, "--out", str(out_other), *args, "--set", "train.eval_target=0.01"])
    assert other["step"] == 2 and other["target_time_s"] is None
    for run in (out, out_other):
        targets = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"target"' in x]
        assert [(r["step"], r["eval_target"]) for r in targets] == [(0, 100)], run


def test_a_run_saved_with_its_optimizer_chain_grouped_otherwise_resumes_not_from_step_0(tmp_path, monkeypatch,
                                                                                        capsys):
    """The same AdamW written as a nested optax chain: the same arrays at the same paths, its empty states elsewhere.
    orbax refused that tree ("tree structures do not match"), the step was set aside as corrupt and the run trained
    again from step 0 after one log line. It resumes."""
    import optax

    from experiments import lm_step

    def regrouped(lr, total_steps, warmup_steps, weight_decay, clip_norm, b1, b2, schedule, min_lr_ratio,
                  decay_frac, width_mult):  # make_optimizer's AdamW, its weight decay in a chain of its own
        sched = lm_step.make_schedule(lr, total_steps, warmup_steps, schedule, min_lr_ratio, decay_frac)
        return lm_step.float32_state(optax.chain(optax.clip_by_global_norm(clip_norm), optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2), optax.chain(optax.add_decayed_weights(weight_decay, lm_step.decay_mask)),
            optax.scale_by_learning_rate(sched))))

    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--set", "train.eval_every=100", "--set", "train.progress=false"]
    with monkeypatch.context() as mp:  # saves 4 and 6; 6 dropped: the resume trains 5 and 6 again (the program of
        mp.setattr(lm_step, "make_optimizer", regrouped)  # the 6-step runs here, as the regrouped run's own)
        train_lm.main([*args, "--set", "train.steps=6"])
    shutil.rmtree(out / "ckpt" / "6")
    capsys.readouterr()
    train_lm.main([*args, "--set", "train.steps=6"])
    printed = capsys.readouterr().out
    assert "resumed from step 4" in printed and "corrupt" not in printed, printed
    assert not (out / "ckpt-corrupt").exists() and (out / "ckpt" / "4").is_dir()


def test_resume_warnings_are_said_once_for_the_step_resumed_and_grad_accum_is_not_another_optimizer(runs, tmp_path,
                                                                                                       capsys):
    """With the newest step corrupt, the check ran on it and again on the fallback step: every warning was printed
    twice (once naming the step not resumed). grad_accum's warning said the LR schedule / optimizer differ."""
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    meta = out / "ckpt" / "12" / "meta" / "metadata"  # bit rot in the arrays: their checksum fails after the check
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"fingerprint": "0" * 16}))
    train_lm.main([*TINY, "--out", str(out), "--mesh", "fsdp=4,tensor=2", "--set", "optim.grad_accum=2",
                   "--set", "optim.clip_norm=2.0"])  # (4 rows a micro-batch: fsdp 4)
    printed = capsys.readouterr().out.splitlines()
    warned = [x for x in printed if x.startswith("warning: resuming")]
    # a resume on another mesh goes on differing in the last float32 digits (as train_video says): noted
    resumed = next(x for x in printed if x.startswith("resumed from step 8"))
    assert resumed.endswith("; note: saved on mesh {'fsdp': 8} (8 devices), resumed on {'fsdp': 4, 'tensor': 2} (8 "
                            "devices): sums over the sharded axes reduce in another order, so from here on this run "
                            "differs from an uninterrupted one in the last float32 digits"), resumed
    assert len(warned) == 2 and all(x.startswith("warning: resuming step 8 with") for x in warned), warned
    accum = next(x for x in warned if "optim.grad_accum" in x)
    assert "optimizer differ" not in accum and "micro-batches" in accum, accum
    assert "the LR schedule / optimizer differ" in next(x for x in warned if "optim.clip_norm" in x)


def test_extending_a_finished_cosine_run_says_the_lr_it_jumps_to():
    """A 12-step cosine run (warmup 2, lr 1e-2, floor 0.1·lr) resumed at its end with train.steps=24 rebuilds the
    schedule: update 13 took lr 5.84e-3 after the saved run's floor of 1e-3, said only as "the LR schedule /
    optimizer differ". The warning names both rates (by hand: optax's cosine decay over the 21 updates after
    the warmup, at its 10th); a change that leaves the rate alone (clip_norm) says nothing more."""
    import dataclasses
    import math

    saved = load(TINY)
    longer = dataclasses.replace(saved, train=dataclasses.replace(saved.train, steps=24))
    now = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 21)))
    line = train_lm.lr_change_line(saved.to_json(), longer, 12)
    assert line is not None, line
    assert line.startswith(f"warning: update 13 takes lr {now:.4g} where the saved run's schedule gave 0.001: the "
                           "schedule is rebuilt over train.steps=24"), line
    clipped = dataclasses.replace(saved, optim=dataclasses.replace(saved.optim, clip_norm=2.0))
    assert train_lm.lr_change_line(saved.to_json(), clipped, 12) is None
    assert train_lm.lr_change_line(saved.to_json(), longer, 1) is None  # both still in the same warmup


def test_other_model_config_is_refused_before_restoring_and_kept(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    before = sorted(p.name for p in (out / "ckpt").iterdir())
    with pytest.raises(SystemExit) as e:
        train_lm.main([*TINY, "--out", str(out), "--set", "model.d_model=64"])
    msg = str(e.value)
    assert msg.startswith("config error: train.out: ") and "model.d_model: saved 32, now 64" in msg, msg
    assert "use a new --out, or the settings it was saved with" in msg
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == before  # nothing moved, nothing deleted
    assert not (tmp_path / "run" / "ckpt-corrupt").exists()


def test_a_run_dir_of_another_model_and_more_steps_names_the_model_not_the_step_count(tmp_path):
    """Another preset's run dir is usually both past this run's train.steps and of another model: the refusal told
    the user to pass --set train.steps=12, which then failed again on the model. The settings that can never resume
    come first; the step count is named only for a run dir this run could continue."""
    other = load([*TINY, "--set", "model.d_model=64"])  # saved at step 12 of 12; the arrays are never read
    ckpt = Checkpoints(tmp_path / "run" / "ckpt", async_save=False, log=lambda *a: None)
    ckpt.save(12, {"w": jnp.ones(2)}, {"config": other.to_json()})
    ckpt.close()
    with pytest.raises(SystemExit) as e:
        train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", "train.steps=4"])
    msg = str(e.value)
    assert msg.startswith("config error: train.out: ") and "model.d_model: saved 64, now 32" in msg, msg
    assert "train.steps=12" not in msg, msg


def test_shape_mismatch_is_a_config_error_and_quarantine_keeps_earlier_copies(tmp_path):
    def state(width):
        return {"opt_state": {"mu": jax.numpy.ones((4, width))}, "params": {"w": jax.numpy.ones((4, width))},
                "step": jax.numpy.zeros((), jax.numpy.int32)}

    small, wide = state(8), state(16)
    ckpt = Checkpoints(tmp_path / "ckpt", keep=5, async_save=False)
    for s in (4, 8):
        ckpt.save(s, small, {"config": "{}"})
    # the model's arrays named before the optimizer's; the fix in words a hand-written loop can use too
    with pytest.raises(CheckpointMismatch, match=r"e\.g\. params/w: saved \(4, 8\), now \(4, 16\); opt_state/mu.* "
                                                 r"use another checkpoint directory \(train.out in"):
        ckpt.restore(wide)
    assert ckpt.steps() == [4, 8]  # a checkpoint of other shapes is not corrupt: both stay
    ckpt._quarantine(8)
    for _ in range(2):  # the same step number goes bad again (twice) after a fresh run rewrote it
        ckpt.save(8, small, {"config": "{}"})
        ckpt._quarantine(8)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt-corrupt").iterdir()) == ["8", "8-1", "8-2"]


def test_the_trainer_reads_your_own_tiers_with_your_tokenizer(tmp_path, monkeypatch):
    """data.train_dir / eval_dir / tokenizer: a cleaning run's tiers and a trained BPE instead of the stdlib corpus
    (the trainer had no way to read them); validation names a missing half or a vocabulary too small."""
    from data import loader as loader_mod
    from data.shards import DocWriter
    from data.synthetic import en_text
    from data.tokenizer import BPETokenizer, pretokenize, train_bpe
    from experiments.config import ConfigError, validate

    rng = np.random.default_rng(0)
    texts = [en_text(rng, 120) for _ in range(60)]
    for name, part in (("train", texts[:50]), ("eval", texts[50:])):
        w = DocWriter(tmp_path / name / "shard-00000.array_record")
        for i, t in enumerate(part):
            w.write({"id": f"{name}{i}", "text": t})
        w.commit()
    train_bpe(texts, vocab_size=300, show_progress=False).save(tmp_path / "tok.json")
    data = ["--set", f"data.train_dir={tmp_path / 'train'}", "--set", f"data.eval_dir={tmp_path / 'eval'}",
            "--set", f"data.tokenizer={tmp_path / 'tok.json'}"]
    seen = []
    real_init = loader_mod.LMLoader.__init__

    def spy(self, sources, tokenizer, *a, **kw):  # records what the trainer asks for, then loads it as usual
        seen.append(([s.path for s in sources], tokenizer.vocab_size))
        real_init(self, sources, tokenizer, *a, **kw)

    monkeypatch.setattr(loader_mod.LMLoader, "__init__", spy)
    import matplotlib.axes

    labels, real_label = [], matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, s, *a, **k: (labels.append(s),
                                                                                     real_label(ax, s, *a, **k))[1])
    result = train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", "train.steps=6", *data])
    assert seen == [([str(tmp_path / "train")], 300), ([str(tmp_path / "eval")], 300)]
    assert labels == ["loss (nats / token)"]  # loss.png: a BPE's losses are per token (they were labelled bytes)
    assert result["step"] == 6 and np.isfinite(result["last_eval"])
    # the final sample continues your held-out text, not the built-in corpus's 'def __init__(self' (a user study)
    own = load([*TINY, *data])
    assert train_lm.sample_prompt(own.data, own.train) == " ".join(texts[50].split()[:5])
    assert train_lm.sample_prompt(load(TINY).data, load(TINY).train) == "def __init__(self"
    mine = load([*TINY, *data, "--set", "train.sample_prompt=Once upon"])
    assert train_lm.sample_prompt(mine.data, mine.train) == "Once upon"
    # a held-out tier whose first shard kept nothing: the first document of the next (the prompt was '')
    import types

    DocWriter(tmp_path / "held2" / "shard-00000.array_record").commit()
    w = DocWriter(tmp_path / "held2" / "shard-00001.array_record")
    w.write({"id": "h", "text": "The quick brown fox jumps over"})
    w.commit()
    spec = types.SimpleNamespace(train_dir=str(tmp_path / "train"), eval_dir=str(tmp_path / "held2"))
    assert train_lm.sample_prompt(spec, own.train) == "The quick brown fox jumps"
    # load_model's caller decodes with load_tokenizer(cfg.data), the file at that path now: a BPE retrained over it
    # decoded the run's ids to other text, silently (a resume refuses it by fingerprint; load_model now says so)
    said = []
    train_lm.load_model(tmp_path / "run", log=said.append)
    assert said == []  # the tokenizer it trained with
    train_bpe(texts[::-1], vocab_size=290, show_progress=False).save(tmp_path / "tok.json")
    train_lm.load_model(tmp_path / "run", log=said.append)
    assert len(said) == 1 and re.search(r"load_model: the tokenizer at data.tokenizer='.*tok.json' is not the one "
                                        r"this run trained with \(fingerprint \w+, trained with \w+\)", said[0]), said
    train_bpe(texts, vocab_size=300, show_progress=False).save(tmp_path / "tok.json")  # as it was, for what follows
    # more evaluation batches than the held-out tier fills: named (the loader repeated it, counting text twice)
    with pytest.raises(SystemExit, match=r"data.eval_batches=99: the held-out tier .*eval fills only \d+ batch"):
        train_lm.main([*TINY, "--out", str(tmp_path / "run2"), "--set", "data.eval_batches=99", *data])
    with pytest.raises(ConfigError, match="data.train_dir: give both"):
        validate(load([*TINY, *data[:2]]), 8)
    with pytest.raises(ConfigError, match="model.vocab_size: 256 < the tokenizer's 300 ids"):
        validate(load([*TINY, *data, "--set", "model.vocab_size=256"]), 8)
    # data the loader cannot read is named before the run directory is made (each was a loader traceback after)
    (tmp_path / "empty").mkdir()
    DocWriter(tmp_path / "none" / "shard-00000.array_record").commit()  # a cleaning run that kept no document
    (tmp_path / "bad.json").write_text('{"vocab": 1, oops}')
    pretokenize(tmp_path / "train", BPETokenizer.load(tmp_path / "tok.json"), tmp_path / "pre")
    for sets, says in (([f"data.train_dir={tmp_path / 'empty'}"], "data.train_dir: .*no shard-\\*.array_record"),
                       ([f"data.eval_dir={tmp_path / 'none'}"], "data.eval_dir: .*hold no documents"),
                       ([f"data.eval_dir={tmp_path / 'train'}"], "data.eval_dir: .* is data.train_dir"),
                       ([f"data.tokenizer={tmp_path / 'bad.json'}"], "data.tokenizer: .* is not a tokenizers JSON"),
                       ([f"data.train_dir={tmp_path / 'pre'}", "data.tokenizer=none"],
                        "data.train_dir: .* was pre-tokenized with vocab_size=300")):
        with pytest.raises(ConfigError, match=says):
            validate(load([*TINY, *data, *(x for kv in sets for x in ("--set", kv))]), 8)


def test_the_default_sample_prompt_is_five_words_of_a_chinese_document_not_all_of_it(tmp_path):
    """Your own tiers' default prompt is the first five words of the first held-out document, CJK-aware: split()
    took a whole Chinese document (no spaces) for its first word, and the sample was that document, past
    max_seq_len (a warning), then one token."""
    import types

    from data.filters import tokens
    from data.shards import DocWriter
    from data.synthetic import zh_text

    zh = zh_text(np.random.default_rng(0), 300)
    got, texts = {}, {"zh": zh, "mixed": "我们用 Python\n写代码，很快。", "en": "The quick  brown\nfox jumps over"}
    for name, text in texts.items():
        w = DocWriter(tmp_path / name / "shard-00000.array_record")
        w.write({"id": name, "text": text})
        w.commit()
        spec = types.SimpleNamespace(train_dir=str(tmp_path / name), eval_dir=str(tmp_path / name))
        got[name] = train_lm.sample_prompt(spec, load(TINY).train)
    assert len(zh) > 300 and got["zh"] == zh[:5] and tokens(got["zh"]) == tokens(zh)[:5]
    assert got["mixed"] == "我们用 Python 写"
    assert got["en"] == "The quick brown fox jumps"  # as before: the words split() gives, one space apart


def test_the_default_sample_prompt_reads_a_pretokenized_held_out_tier(tmp_path):
    """data.eval_dir may be a data.tokenizer.pretokenize output (DataSpec says so; the run trains and evaluates on
    it): its default prompt is the same five words as its cleaned tier's, read back with the run's tokenizer. It
    raised 'the record holds token ids ... pass the cleaned tier' after the whole run: no sample, no loss.png."""
    from data.shards import DocWriter
    from data.synthetic import en_text
    from data.tokenizer import BPETokenizer, pretokenize, train_bpe

    texts = [en_text(np.random.default_rng(0), 60) for _ in range(3)]
    w = DocWriter(tmp_path / "held" / "shard-00000.array_record")
    for i, t in enumerate(texts):
        w.write({"id": f"h{i}", "text": t})
    w.commit()
    train_bpe(texts, vocab_size=300, show_progress=False).save(tmp_path / "tok.json")
    pretokenize(tmp_path / "held", BPETokenizer.load(tmp_path / "tok.json"), tmp_path / "pre", progress=False)
    got = {}
    for tier in ("held", "pre"):
        cfg = load([*TINY, "--set", f"data.train_dir={tmp_path / 'held'}", "--set", f"data.eval_dir={tmp_path / tier}",
                    "--set", f"data.tokenizer={tmp_path / 'tok.json'}"])
        got[tier] = train_lm.sample_prompt(cfg.data, cfg.train)
    assert got["pre"] == got["held"] == " ".join(texts[0].split()[:5])


def test_a_sample_prompt_longer_than_the_context_keeps_its_bos_and_last_tokens():
    """train.sample_tokens is 'at most what fits in model.max_seq_len after the prompt': a prompt past max_seq_len
    still got one new token, and generate warned of positions past the trained context (37 + 1 on the tiny model)."""
    import types
    import warnings

    from flax import nnx

    from data.tokenizer import ByteTokenizer
    from models import Transformer
    from models.generate import generate

    m = load(TINY).model
    tok = ByteTokenizer(add_eos=True)
    ids, n, cut = train_lm.sample_ids(tok, "x" * 30 + "yz" * 3, 8, m.max_seq_len)
    # no BOS: the prompt starts with the EOS every training row of a document started with (the loader's [eos] text)
    assert (len(ids), n, cut) == (m.max_seq_len, 1, 37 - m.max_seq_len) and tok.decode(ids).endswith("yzyzyz")
    assert ids[0] == tok.eos_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generate warns of positions past max_seq_len
        generate(Transformer(m, rngs=nnx.Rngs(0)), jnp.asarray(ids)[None], n, rng=jax.random.key(0))
    with_bos = types.SimpleNamespace(bos_id=7, encode=lambda s: [ord(c) for c in s])
    ids, n, cut = train_lm.sample_ids(with_bos, "abcdef", 8, 4)
    assert (ids.tolist(), n, cut) == ([7, ord("d"), ord("e"), ord("f")], 1, 3)
    ids, n, cut = train_lm.sample_ids(with_bos, "ab", 8, 32)  # a short one is whole, and n what fits
    assert (ids.tolist(), n, cut) == ([7, ord("a"), ord("b")], 8, 0)
    with_bos.eos_id = 9  # a BOS starts documents: the EOS only ends them
    assert train_lm.sample_ids(with_bos, "ab", 8, 32)[0].tolist() == [7, ord("a"), ord("b")]
    neither = types.SimpleNamespace(encode=lambda s: [ord(c) for c in s])  # no special tokens: the text alone
    assert train_lm.sample_ids(neither, "ab", 8, 32)[0].tolist() == [ord("a"), ord("b")]


def test_load_model_gives_the_checkpoints_model_for_inference(runs, monkeypatch):
    """A finished run's model, rebuilt from the config saved in its checkpoint (there was no way back from
    runs/x/ckpt to a Transformer), equals the checkpoint's params and samples; configs survive the JSON round trip.
    It restores onto an abstract target: no random train state is made beside the one read (twice the memory)."""
    from experiments.config import RunConfig, preset
    from models import generate

    def no_random_state(*a, **k):
        raise AssertionError("load_model initialised a random train state")

    ref = runs[0]
    monkeypatch.setattr(train_lm, "init_state", no_random_state)
    model, cfg = train_lm.load_model(ref)
    assert cfg == load([*TINY, "--out", str(cfg.train.out)])  # the run's own settings, read back
    state, meta = restore(ref)
    from flax import nnx

    assert_trees_equal(nnx.state(model, nnx.Param), state["params"])
    ids = generate(model, np.asarray([[100, 101, 102]]), 5)
    assert ids.shape == (1, 8)
    for name in ("demo", "tiny", "llama7b", "mixtral8x7b"):
        assert RunConfig.from_json(preset(name).to_json()) == preset(name)


def test_load_model_reads_without_moving_anything(runs, tmp_path):
    """A reader beside a training job: a damaged newest step (bad arrays) or an unreadable meta is reported and the
    older one used, and nothing is quarantined; a mesh smaller than the host takes its first devices."""
    from flax import nnx

    ref, out = runs[0], tmp_path / "run"
    shutil.copytree(ref, out)
    for victim in (out / "ckpt" / "12" / "state").rglob("*"):
        if victim.is_file() and victim.stat().st_size > 10_000 and victim.parent.name == "d":
            data = victim.read_bytes()
            victim.write_bytes(data[:64] + bytes(255 - b for b in data[64:]))
    lines = []
    model, _ = train_lm.load_model(out, log=lines.append)
    assert_trees_equal(nnx.state(model, nnx.Param), restore(ref, step=8)[0]["params"])
    assert lines[0].startswith("checkpoint: step 12 is corrupt") and lines[0].endswith("left in place"), lines
    assert lines[-1].startswith("load_model: using step 8") and not (tmp_path / "ckpt-corrupt").exists()
    assert sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit())[-1] == 12
    (out / "ckpt" / "8" / "meta" / "metadata").write_text("{garbage")
    lines = []  # the tiny preset keeps steps 4, 8 and 12
    model, _ = train_lm.load_model(out, log=lines.append)
    assert_trees_equal(nnx.state(model, nnx.Param), restore(ref, step=4)[0]["params"])
    assert any("step 8's meta does not read" in x for x in lines), lines
    with pytest.raises(FileNotFoundError, match="no readable checkpoint at step 8"):
        train_lm.load_model(out, step=8, log=lines.append)
    model, _ = train_lm.load_model(ref, mesh_shape={"fsdp": 2})  # 2 of the 8 devices
    assert {d.id for x in jax.tree.leaves(nnx.state(model)) for d in x.sharding.device_set} == {0, 1}
    # a step that was never saved is named with those that were; a mistyped run folder is not created (it was)
    with pytest.raises(FileNotFoundError, match=r"no step 5 under .*; saved steps: \[4, 8, 12\]"):
        train_lm.load_model(out, step=5)
    with pytest.raises(FileNotFoundError, match="does not exist: pass a run's --out directory"):
        train_lm.load_model(tmp_path / "no_such_run")
    assert not (tmp_path / "no_such_run").exists()


def test_load_model_refuses_a_step_that_is_not_a_whole_number_by_name(tmp_path):
    """A step read from sys.argv ("8") was "no step 8 under ...; saved steps: [4, 8, 12]", and 8.0 "step 8.0's meta
    does not read ... no readable checkpoint at step 8.0": a good step called missing or unreadable. Refused by
    name, as Checkpoints.restore refuses it, before any directory is read."""
    for bad in ("8", 8.0, True, -1):
        with pytest.raises(ValueError, match=rf"^load_model: step={re.escape(repr(bad))} must be a whole number"):
            train_lm.load_model(tmp_path / "run", step=bad)


def test_load_model_names_a_mesh_shape_it_cannot_build(tmp_path):
    """mesh_shape={"fsdp": 0} was "make_mesh: devices is empty", {"fsdp": 2.0} a slice TypeError and the CLI's
    "fsdp=2" an AttributeError ('str' object has no attribute 'values'): make_mesh's own errors name each one."""
    for bad, why in (({"fsdp": 0}, r"must be >= 1"), ({"fsdp": 2.0}, r"need int sizes, got \[2.0\]"),
                     ("fsdp=2", r"is a string; pass a dict, e.g. parse_mesh")):
        with pytest.raises(ValueError, match=why):
            train_lm.load_model(tmp_path / "run", mesh_shape=bad)


def test_a_run_resumed_at_its_last_step_from_a_save_between_evaluations_ends_with_its_eval(runs, tmp_path):
    """A checkpoint saved between evaluations (save_every off eval_every, a SIGTERM save) carries no eval loss; a
    rerun with train.steps at that step (what the 'past train.steps' error suggests) trains nothing. It crashed on
    its summary line (last_eval None), then finished with no eval loss at all (None in the summary, no final eval
    record), where a fresh run always ends with one: it evaluates its final parameters, as the uninterrupted run
    did at that step."""
    ref, out = runs[0], tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "ckpt" / "12")
    meta = out / "ckpt" / "8" / "meta" / "metadata"  # step 8 as saved between evaluations (the arrays' checksum
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), eval_loss=None)))  # is not over the meta)
    result = train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=8", "--set", "train.sample_tokens=2",
                            "--set", "train.progress=false"])
    evals = {r["step"]: r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"}
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 8 and result["first_eval"] == evals[0], result
    # the same parameters and held-out batches as the uninterrupted run's evaluation at step 8 (float32 sums)
    assert (final["kind"], final["step"]) == ("eval", 8) and final["loss"] == result["last_eval"]
    np.testing.assert_allclose(result["last_eval"], evals[8], rtol=1e-6)
    assert (out / "sample.txt").exists()


def test_the_printed_tensorboard_command_runs_from_a_path_with_spaces(runs, tmp_path, capsys):
    """The last line's `tensorboard --logdir DIR` is a command to paste: under 'my runs/' it named two arguments."""
    import shlex

    out = tmp_path / "my run ü"
    shutil.copytree(runs[0], out)  # finished at train.steps: the rerun trains nothing, then samples
    train_lm.main([*TINY, "--out", str(out), "--set", "train.sample_tokens=2", "--set", "train.progress=false"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("outputs in")][-1]
    assert shlex.split(re.search(r"\(tensorboard --logdir (.*)\), ckpt/", line).group(1)) == [str(out / "tb")], line


def test_a_resume_to_fewer_steps_drops_the_interrupted_attempts_records_past_its_checkpoint(runs, tmp_path,
                                                                                           monkeypatch):
    """A run killed past its checkpoint (here: after step 12 with only step 4 saved) and resumed to train.steps=6
    kept the killed attempt's records of steps 7..12 in metrics.jsonl: its loss.png plotted them past the run's end
    (TensorBoard's restart marker dropped them there). The resumed run drops every record past its checkpoint, as
    train_video's stages do: the log reads as an uninterrupted 6-step run's."""
    ref, out = runs[0], tmp_path / "run"
    shutil.copytree(ref, out)
    for s in (8, 12):
        shutil.rmtree(out / "ckpt" / str(s))
    # the run's clock travels with its checkpoint (not under the arrays' checksum): a resumed run continues it
    meta = out / "ckpt" / "4" / "meta" / "metadata"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), wall_s=1e6)))
    # and counts this process's startup (the restore too), as a fresh run counts its own: it went on from the saved
    # wall_s only once the checkpoint was restored. A fake clock jumps 1000 s while the corpus is found (before that)
    real, jump, tiers = time.time, [0.0], train_lm.corpus_tiers
    monkeypatch.setattr(train_lm, "time", types.SimpleNamespace(time=lambda: real() + jump[0]))
    monkeypatch.setattr(train_lm, "corpus_tiers", lambda spec: (jump.__setitem__(0, 1000.0), tiers(spec))[1])
    result = train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.progress=false"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("segment", 0), ("eval", 0), *(("train", s) for s in range(1, 5)),
                                                      ("eval", 4), ("target", 4), ("segment", 4), ("train", 5),
                                                      ("train", 6), ("eval", 6)]
    assert max(run_log.read_curves(out / "metrics.jsonl")["train"]) == 6  # what loss.png plots
    assert all(r["wall_s"] > 1e6 + 1000 for r in rows if r["step"] > 4) and result["wall_s"] > 1e6 + 1000, rows
    # the resumed process's first step compiles, as a fresh run's first: no throughput is reported for either
    assert [r["tokens_per_s"] is None for r in rows if r["kind"] == "train"] == [True, False, False, False, True, False]


def test_an_attempt_that_saved_nothing_leaves_no_segment_record_beside_the_resumes(runs, tmp_path, monkeypatch):
    """An attempt resumed from step 4 with optim.lr changed and stopped before it saved again (here: a SIGTERM
    during its startup) logged a 'segment' record at step 4 naming the lr change; the next resume from step 4
    dropped the records past 4 only, so metrics.jsonl named two segments at step 4, one with an lr no saved step was
    trained at. Its records are those of the checkpoint's segments: one per start, the last attempt's."""
    from experiments import config

    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    for s in (8, 12):
        shutil.rmtree(out / "ckpt" / str(s))
    real = config.load

    def load_then_signal(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(config, "load", load_then_signal)
        assert train_lm.main([*TINY, "--out", str(out), "--set", "optim.lr=0.02", "--set", "train.steps=6",
                              "--set", "train.progress=false"])["step"] == 4
    train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.progress=false"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    segs = [r for r in rows if r["kind"] == "segment"]
    assert [s["step"] for s in segs] == [0, 4], [(s["step"], s["segment"]["changed"]) for s in segs]
    assert not any("optim.lr" in c for c in segs[-1]["segment"]["changed"])
    assert [s["start_step"] for s in restore(out)[1]["segments"]] == [0, 4]


def test_only_the_newest_keep_checkpoints_stay_on_disk(tmp_path):
    """The tiny preset saves 3 times and keeps 3: a trainer keeping one too many passed every other test. Saves at
    5, 10 and 12 (the last, off the interval) with train.keep=2 and no best kept: the newest two stay. (The tiny
    preset's 12 steps: the program of the other 12-step runs here.)"""
    out = tmp_path / "run"
    train_lm.main([*TINY, "--out", str(out), "--set", "train.save_every=5",
                   "--set", "train.keep=2", "--set", "train.keep_best=False", "--set", "train.progress=false"])
    assert sorted(int(d.name) for d in (out / "ckpt").iterdir() if d.name.isdigit()) == [10, 12]


def test_a_sample_write_that_fails_leaves_no_truncated_sample(tmp_path, full_disk):
    """sample.txt was the one output written in place (metrics, plots, results go through run_log.write_atomically):
    a write cut short (a full disk) left a truncated sample.txt that reads as the run's whole sample."""
    full_disk("sample.txt")
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train_lm.main(["--preset", "tiny", "--out", str(out), "--set", "train.steps=2", "--set", "optim.warmup_steps=0",
                       "--set", "train.sample_tokens=2", "--set", "train.progress=false"])  # (the 2-step runs' step)
    assert (out / "metrics.jsonl").exists() and not [p.name for p in out.iterdir() if p.name.startswith("sample")]


def _console(monkeypatch):
    """stdout and stderr as one stream, as a terminal shows them (the bar is on stderr, messages on stdout)."""
    import io

    console = io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)
    return console


def _own_line(console, message):
    """The message starts a line of its own: printed while the bar was drawn, it landed after the bar's text."""
    import re

    return any(seg.startswith(message) for seg in re.split(r"[\r\n]", console.getvalue()))


def test_a_save_that_fails_on_a_full_disk_is_one_line_though_the_logs_cannot_close(tmp_path, monkeypatch):
    """The full disk that failed a save fails closing the logs too (TensorBoard's buffered events): that OSError,
    raised in the `finally`, hid the save's one line (where, why, the step a rerun resumes from) behind a traceback,
    as it did in train_video's stages."""
    from experiments.checkpoint import CheckpointSaveFailed

    def save(self, step, *a, **k):
        raise CheckpointSaveFailed(f"checkpoint: a save into {self.dir} failed (OSError: [Errno 28] No space left on "
                                   "device); a rerun resumes from step 0: first mend the cause")

    real_close = run_log.Logger.close

    def close(self):
        real_close(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    monkeypatch.setattr(run_log.Logger, "close", close)
    with pytest.raises(SystemExit, match=r"^checkpoint: a save into .*ckpt failed \(OSError: \[Errno 28\] No space "
                                         r"left on device\); a rerun resumes from step 0"):
        train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", "train.steps=4", "--set", "train.save_every=2"])


def test_a_halted_run_says_why_on_its_own_line_and_plots_its_curve(tmp_path, monkeypatch):
    """With the progress bar on, 'step 0: eval loss' and 'step 3: non-finite ...' were printed onto the bar's line
    ('train:  40%|...| 2/5 [...]step 3: non-finite'), and the halted run wrote no loss.png though metrics.jsonl
    held its curve."""
    out = tmp_path / "halt"
    console = _console(monkeypatch)
    with pytest.raises(SystemExit, match="halted at step 3"):
        train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=6", "--set", "train.progress=True",
                       "--set", "train.poison_steps=(3,)", "--set", "train.nan_policy=halt"])
    assert _own_line(console, "step 0: eval loss") and _own_line(console, "step 3: non-finite"), console.getvalue()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sigterm_stopped_run_says_so_on_its_own_line_and_plots_its_curve(tmp_path, monkeypatch):
    """SIGTERM during step 2: the run saves step 3 and exits; its message was printed onto the bar's line, and it
    wrote no loss.png (only a run that reached train.steps did)."""
    from parallel import distributed

    real, calls = distributed.any_process, []

    def any_process(flag):  # asked before the first step, then once per step: the signal arrives during step 2,
        calls.append(flag)  # seen after step 3
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(flag)

    monkeypatch.setattr(distributed, "any_process", any_process)
    out = tmp_path / "term"
    console = _console(monkeypatch)
    result = train_lm.main([*TINY, "--out", str(out), "--set", "train.progress=True", "--set", "train.eval_every=100"])
    assert result["step"] == 3 and _own_line(console, "SIGTERM: saved step 3; exiting"), console.getvalue()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_resumes_under_its_own_prng_implementation_and_another_is_named(tmp_path):
    """Under jax_default_prng_impl='rbg' the raw key in the train state is uint32[4]: the restore template's fixed
    [2] refused every such run as "does not fit: rng saved (4,), now (2,)"; a threefry checkpoint resumed under rbg
    failed in its first step with jax's bare "invalid PRNG key data". Another implementation is now named, with the
    setting that resumes it (also for checkpoints saved before the meta held the name: by the key's shape)."""
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--set", "train.save_every=1", "--set", "train.eval_every=100",
            "--set", "train.progress=false", "--set", "optim.warmup_steps=0"]
    with jax.default_prng_impl("rbg"):  # 2 steps, then step 2 dropped: the resume below trains step 2 again with
        train_lm.main([*args, "--set", "train.steps=2"])  # the program compiled here
    shutil.rmtree(out / "ckpt" / "2")
    meta = out / "ckpt" / "1" / "meta" / "metadata"
    assert json.loads(meta.read_text())["prng_impl"] == "rbg"
    for saved in ("rbg", None):  # None: a checkpoint from before the name was saved
        if saved is None:
            meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "prng_impl"}))
        with pytest.raises(SystemExit, match=r"saved under jax_default_prng_impl='rbg', this run's is 'threefry2x32'.*"
                                             r"JAX_DEFAULT_PRNG_IMPL=rbg"):
            train_lm.main([*args, "--set", "train.steps=2"])
    model, _ = train_lm.load_model(out)  # (the key is dropped: any implementation reads the weights)
    assert model.cfg == load(TINY).model
    with jax.default_prng_impl("rbg"):
        assert train_lm.main([*args, "--set", "train.steps=2"])["step"] == 2


def test_sigterm_during_the_startup_stops_the_run_in_order(runs, tmp_path, monkeypatch, capsys):
    """The handler was installed just before the loop, after JAX's import, the corpus, the restore and the model
    (6 s of the tiny preset): a SIGTERM in those seconds killed the run (status 143, -15 here). Installed first in
    main, the signal is remembered and the run stops before its first step: nothing trained, nothing new saved,
    status 0; the caller's handler is back afterwards."""
    from experiments import config

    real = config.load

    def load_then_signal(*a, **k):  # the signal arrives while the command line is read, before JAX is set up
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    def caller(signum, frame):
        raise AssertionError("SIGTERM reached the caller's handler: the run had none installed")

    monkeypatch.setattr(config, "load", load_then_signal)
    old = signal.signal(signal.SIGTERM, caller)
    try:
        fresh = train_lm.main([*TINY, "--out", str(tmp_path / "fresh")])
        resumed = tmp_path / "resumed"
        shutil.copytree(runs[0], resumed)
        again = train_lm.main([*TINY, "--out", str(resumed), "--set", "train.steps=16"])
        # at its last step (train.steps=12) a stopped run exits too: the sample after the last step is not made
        last = train_lm.main([*TINY, "--out", str(resumed), "--set", "train.sample_tokens=2"])
        assert signal.getsignal(signal.SIGTERM) is caller
    finally:
        signal.signal(signal.SIGTERM, old)
    log = capsys.readouterr().out
    assert fresh["step"] == 0 and fresh["first_eval"] is None and not any((tmp_path / "fresh" / "ckpt").glob("[0-9]*"))
    assert "SIGTERM before the first step: nothing new to save (nothing trained); exiting" in log, log
    assert again["step"] == 12 and restore(resumed)[1]["step"] == 12  # the newest checkpoint is still step 12
    assert "SIGTERM before the first step: nothing new to save (the run resumes from step 12); exiting" in log, log
    assert last["step"] == 12 and "sample" not in last and not (resumed / "sample.txt").exists(), last


def test_a_sigterm_while_the_last_save_finishes_is_remembered_and_the_save_kept(tmp_path, monkeypatch):
    """The handler was restored before the trainer waited for its last async save (Checkpoints.close): a SIGTERM there
    (a scheduler's second, or one arriving at the last step) killed the run (status 143) and left the step as orbax's
    temporary folder. Under the handler it is remembered: the save completes, the run returns, the caller's handler is
    back afterwards."""
    real = checkpoint.Checkpoints.close

    def close_then_signal(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    def caller(signum, frame):
        raise AssertionError("SIGTERM reached the caller's handler while the last save was being waited for")

    monkeypatch.setattr(checkpoint.Checkpoints, "close", close_then_signal)
    old = signal.signal(signal.SIGTERM, caller)
    out = tmp_path / "run"
    try:
        result = train_lm.main([*TINY, "--out", str(out), "--set", "train.steps=4"])
        assert signal.getsignal(signal.SIGTERM) is caller
    finally:
        monkeypatch.undo()  # (restore below closes a Checkpoints too)
        signal.signal(signal.SIGTERM, old)
    assert result["step"] == 4 and restore(out)[1]["step"] == 4
    assert not list((out / "ckpt").glob("*tmp*")), sorted(p.name for p in (out / "ckpt").iterdir())


def test_turning_keep_best_off_on_resume_warns_which_best_step_is_given_up(tmp_path, capsys):
    """A run resumed with train.keep_best off lost its best checkpoint at the next save (keep-last-N alone deletes
    it) with no word, while other changed settings are warned of on resume. The warning names the step and its
    eval loss; with keep_best left on nothing is said."""
    short = [*TINY, "--out", str(tmp_path), "--set", "train.keep=1", "--set", "train.save_every=3",
             "--set", "train.progress=False"]  # (6 and 12 steps: the programs of the other 6- and 12-step runs here)
    train_lm.main([*short, "--set", "train.steps=6"])  # saves 3 (no eval), 6 (evaluated: the best)
    assert sorted(int(d.name) for d in (tmp_path / "ckpt").iterdir() if d.name.isdigit()) == [6]
    capsys.readouterr()
    train_lm.main([*short, "--set", "train.steps=12", "--set", "train.keep_best=False"])
    printed = capsys.readouterr().out
    assert ("warning: resuming step 6 with train.keep_best off (saved on): the best checkpoint, step 6 (eval loss "
            in printed and "is deleted at the next save (train.keep=1: only the newest 1 are kept)" in printed), printed
    assert sorted(int(d.name) for d in (tmp_path / "ckpt").iterdir() if d.name.isdigit()) == [12]  # as it said
    assert train_lm.best_given_up(tmp_path / "ckpt", 1) is None  # nothing ranked any more: nothing to warn of


def test_documents_the_loader_skips_are_said_in_the_run_summary(tmp_path, capsys):
    """Documents of fewer than 2 tokens (a tokenizer without EOS, one-token documents) are in no batch; the loader
    counts them (LMLoader.skipped) but the run never reported the counts. The summary says them, and returns them."""
    from data.shards import DocWriter
    from data.tokenizer import train_bpe

    for tier, texts in (("train", ["some training text " * 40] * 8 + ["a"] * 3),
                        ("held", ["held-out text " * 60] * 4 + ["a"])):
        w = DocWriter(tmp_path / tier / "shard-00000.array_record")
        for i, text in enumerate(texts):
            w.write({"id": f"{tier}{i}", "text": text})
        w.commit()
    with pytest.warns(UserWarning):  # (the corpus is too small for 300 ids; the loader's own one-off warning)
        train_bpe(["some training text held-out a"] * 20, vocab_size=300, special_tokens=(),
                  show_progress=False).save(tmp_path / "tok.json")  # no EOS: "a" is one token
        result = train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", f"data.train_dir={tmp_path / 'train'}",
                                "--set", f"data.eval_dir={tmp_path / 'held'}", "--set",
                                f"data.tokenizer={tmp_path / 'tok.json'}", "--set", "train.steps=2", "--set",
                                "optim.warmup_steps=0", "--set", "train.progress=False"])
    assert result["documents_skipped"] == {"train": {"no_target": 3, "mixture_end": 0},
                                           "held-out": {"no_target": 1, "mixture_end": 0}}
    said = capsys.readouterr().out
    assert "data: skipped 3 train and 1 held-out documents of fewer than 2 tokens, in no batch" in said, said
    assert train_lm.skipped_line({"train": {"no_target": 0, "mixture_end": 0}}) == ""


def test_held_out_loss_fetches_each_batch_before_dispatching_the_next():
    """The held-out loss dispatched every eval batch's program before fetching any: with data.eval_batches=50 on the
    8 fake CPU devices of a 2-core host, 50 programs with all-gathers were in flight at once and XLA:CPU's
    collective rendezvous timed out (SIGABRT, 'only 7 of them arrived', the steps since the last save lost; 30
    in flight passed). One batch in flight at a time, summed in the same order (the same float)."""
    events = []

    class Fetched:
        def __init__(self, i, v):
            self.i, self.v = i, v

        def __float__(self):
            events.append(("fetch", self.i))
            return self.v

    def eval_fn(params, batch):
        events.append(("call", batch))
        return Fetched(batch, 2.0 * batch + 1), Fetched(batch, 4.0)

    loss = train_lm.held_out_loss(eval_fn, None, [0, 1, 2])
    assert loss == (1.0 + 3.0 + 5.0) / 12.0
    calls = [i for i, (what, _) in enumerate(events) if what == "call"]
    assert all(("fetch", events[c][1]) in events[c:n] for c, n in zip(calls, calls[1:])), events


def test_train_called_alone_puts_the_callers_handlers_back_when_it_refuses_early(tmp_path):
    """train(cfg, mesh_shape) without main installs its own SIGTERM / SIGINT handler (stop=None) at its start; a
    run refused before the loop (here more eval batches than the held-out tier fills) left it installed: in the
    caller's session a first Ctrl-C was then only remembered, never raised KeyboardInterrupt."""
    cfg = load([*TINY, "--out", str(tmp_path / "run"), "--set", "data.eval_batches=99999"])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit, match="data.eval_batches=99999"):
        train_lm.train(cfg, {"fsdp": 8})
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_the_run_says_and_returns_how_many_held_out_targets_its_eval_losses_average(tmp_path, capsys):
    """The eval set is the first data.eval_batches × train.batch rows of the held-out tier: a batch-size sweep at the
    same eval_batches compared eval losses over other held-out text (at the same initial weights 5.774 at batch 8 vs
    5.762 at batch 16), and nothing said how much text an eval loss averaged. Counted here from the rows themselves."""
    from data.loader import LMLoader, LoaderConfig, Source
    from experiments.config import load_tokenizer

    cfg = load(TINY)
    _, eval_dir = train_lm.corpus_tiers(cfg.data)
    t = cfg.train
    held = LMLoader([Source(eval_dir)], load_tokenizer(cfg.data), LoaderConfig(
        seq_len=t.seq, global_batch_size=t.batch, shuffle=False, num_epochs=1))
    want = int(sum(np.asarray(b["weights"]).sum() for b in itertools.islice(held, 2)))
    held.close()
    result = train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", "data.eval_batches=2", "--set",
                            "train.steps=2", "--set", "optim.warmup_steps=0"])
    assert result["eval_targets"] == want > 0
    said = capsys.readouterr().out
    assert f"eval over {want:,} held-out targets (2 batches of {t.batch}×{t.seq})" in said, said


def test_a_training_batch_without_weighted_targets_is_said_and_skipped(tmp_path, capsys, monkeypatch):
    """A batch whose targets all weigh 0 (your own masked data: an SFT batch of prompts only) made an optimizer
    update from a zero gradient (Adam's momentum, weight decay) and was logged as loss 0.0, a perfect step. lm_step
    now keeps the state and counts it skipped; the trainer says so and logs an 'empty' record."""
    from data import loader as loader_mod

    made, real_init, real_next = [], loader_mod.LMLoader.__init__, loader_mod.LMLoader.__next__

    def init(self, *a, **kw):
        made.append(self)
        real_init(self, *a, **kw)

    def nxt(self):
        batch = real_next(self)
        self.served = getattr(self, "served", 0) + 1
        if self is made[0] and self.served == 2:  # the training loader's second batch: step 2
            batch = dict(batch, weights=batch["weights"] * 0)
        return batch

    monkeypatch.setattr(loader_mod.LMLoader, "__init__", init)
    monkeypatch.setattr(loader_mod.LMLoader, "__next__", nxt)
    result = train_lm.main([*TINY, "--out", str(tmp_path / "run"), "--set", "train.steps=3", "--set",
                            "optim.warmup_steps=0", "--set", "train.log_every=1"])
    assert result["step"] == 3 and result["skipped"] == 1
    assert "step 2: no target in the batch has weight > 0; step skipped (1 skipped so far)" in capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "empty"] == [2]
    assert [r["kind"] for r in records if r["kind"] == "nonfinite"] == []


def test_load_model_names_where_a_missing_relative_tokenizer_was_looked_for(tmp_path, monkeypatch):
    """A run trained with data.tokenizer='tok.json' (relative), loaded from another directory: load_model's note
    passed on BPETokenizer.load's advice, "train one with data.tokenizer.train_bpe(...)" (a new tokenizer decodes the
    run's ids to other text), and did not say where it had looked. Now: the path it read, and the run's own file."""
    import types

    step = tmp_path / "run" / "ckpt" / "4"
    (step / "loader").mkdir(parents=True)
    (step / "loader" / "process_0-of-2.json").write_text(json.dumps({"stream": {"tokenizer": "0123abcd0123abcd"}}))
    monkeypatch.chdir(tmp_path)
    data = types.SimpleNamespace(tokenizer="tok.json", eos_token=None, bos_token=None)
    said = []
    train_lm._check_tokenizer(step, data, said.append)
    assert said == [f"load_model: data.tokenizer='tok.json' is not there ({tmp_path / 'tok.json'}: a relative path is "
                    "read from the working directory); decode this run's ids with the tokenizer file it trained with"]
