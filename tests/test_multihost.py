"""Two processes on localhost (2 fake devices each, one global mesh of 4) == one process; a stop flag raised on one
process is seen by both; a checkpoint gives each process back its own data loader state; a finite-epoch loader
stops both processes at the first that runs out; save_pretrained gathers parameters sharded across processes."""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
from flax import nnx

from experiments.lm_step import lm_loss
from models import Transformer
from models.hf import from_pretrained
from tests.multihost_common import CFG, global_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ahead of ROOT on a trainer's path: its `import torch` fails (tensorboardX's optional import of the test-only torch
# took 2 s of each trainer's start; nothing the trainer runs uses it)
NO_TORCH = os.path.join(ROOT, "tests", "no_torch")
# conftest's compile-speed flags (they halve the trainers' compile times) without the parent's device count
_COMPILE_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)


def launch(mode, workdir):
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _COMPILE_FLAGS}
    return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i), mode, str(workdir)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def worker_rows(mode, workdir, timeout):
    """Launch `mode` on two processes; each one's JSON result row, in process order. A process still running after
    `timeout` s (a hang: the bugs these modes catch) is killed, and the test fails on its return code."""
    procs = launch(mode, workdir)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    rows = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        rows.append(next(json.loads(x) for x in out.splitlines() if x.startswith("{")))  # (Gloo logs there too)
    return rows


def test_two_processes_match_single_process(tmp_path):
    procs = launch("ok", tmp_path)
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert result["devices"] == 4 and result["mesh"] == {"data": 2, "fsdp": 2}
    lines = [[json.loads(x) for x in out.splitlines() if x.startswith("{")] for out, _ in outs]
    assert not any("loss" in r for r in lines[1])  # only the primary writes
    for pid in (0, 1):
        r = next(r for r in lines[pid] if "pid" in r)
        assert r["stops"] == [True, False]
        assert r["restored_step"] == 1 and r["loader_position"] == 100 + pid
        assert r["bad_mesh_refused"]
    # a finite epoch: process 1 runs out after one step; both stop there, process 0 counts what it left unread
    f0, f1 = (next(r for r in lines[pid] if "pid" in r)["finite"] for pid in (0, 1))
    assert f0["batches"] == f1["batches"] == 1
    assert f1["unread"]["batches"] == 0 and not f1["warned"]
    assert f0["unread"]["batches"] > 5 and f0["warned"]
    assert 0 < f0["unread"]["tokens"] < f0["total_tokens"] and f0["unread"]["rows"] == 2 * f0["unread"]["batches"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "1" / "loader").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    tok = global_tokens()
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    # save_pretrained from parameters sharded across both processes: sharded files, the same parameters
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) > 2
    back = nnx.state(from_pretrained(tmp_path / "hf"))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        # an init sharded over another mesh rounds a few values differently (1 ulp); a layout error would not
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    single = float(jax.jit(lambda s: lm_loss(graphdef, s, {"inputs": tok[:, :-1], "targets": tok[:, 1:]}))(state))
    np.testing.assert_allclose(result["loss"], single, rtol=1e-5)


def test_dead_peer_ends_the_survivor_with_a_clear_error(tmp_path):
    procs = launch("die", tmp_path)
    t0 = time.time()
    _, err0 = procs[0].communicate(timeout=120)  # heartbeat timeout is 5 s: well inside this
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    assert "unhealthy" in err0 or "another task died" in err0, err0[-2000:]
    assert time.time() - t0 < 120


def test_processes_with_other_setting_fields_are_refused_on_every_process(tmp_path):
    """Process 1 with one setting more than process 0 (another version of the code on its host): the all-gather of
    the fields' hashes had another length on each process, so process 0 aborted in Gloo ("Received data size doesn't
    match expected size", SIGABRT) while process 1 named fields that were equal ("b, c differ"). Now the field counts
    are compared first and every process raises, naming both counts. With as many fields but one renamed, each
    process named only its own ("b differ" on process 0, "c differ" on process 1): now both name both."""
    procs = launch("settings", tmp_path)
    outs = [p.communicate(timeout=60) for p in procs]
    for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        row = next(json.loads(x) for x in out.splitlines() if x.startswith("{"))  # (Gloo logs there too)
        # a second initialize() in the running job: process 0 refused its own coordinator's port as taken
        assert row["again"] is True, (pid, row)
        errors = row["errors"]
        assert errors == [
            "processes [1] were started with other settings than process 0: their field lists differ (process 0 has "
            "2 fields, process 1 has 3 fields); start every process with the same command line and the same version "
            "of the code",
            "processes [1] were started with other settings than process 0: their field names differ (process 0 has "
            "b; process 1 has c); start every process with the same command line and the same version of the code"
        ], (pid, errors)


def test_a_single_device_leaf_is_refused_by_name_before_a_multiprocess_save(tmp_path):
    """A scalar made with jnp.int32(7) beside parameters on a mesh over both processes: orbax failed inside its
    writer ('Cannot serialize host local jax.Array'), naming neither the leaf nor how to place it."""
    procs = launch("local_leaf", tmp_path)
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        r = next(json.loads(x) for x in out.splitlines() if x.startswith("{"))  # (Gloo logs there too)
        assert r["error"].startswith("TypeError: Checkpoints save state: n is on this process's devices only"), r
        assert "NamedSharding(mesh, P())" in r["error"] and r["steps"] == [], r


def test_a_shard_file_damaged_on_one_process_falls_back_on_every_process(tmp_path):
    """Each process reads only its own shards and loader file: with process 1's data file cut short, its read failed
    and it went on to set the step aside (a barrier) while process 0 waited in orbax's restore barrier: both hung for
    good (killed after 200 s). Now the processes agree after each read: the step is set aside once, both start fresh,
    and a loader already set from process 0's own (good) file is put back. The primary's line names process 1's
    own error (it named only the process: no process logged why)."""
    rows = worker_rows("damaged_shard", tmp_path, 90)
    assert [(r["restored"], r["steps"]) for r in rows] == [([False, False], [])] * 2
    # the primary's line says why process 1's read failed (its own error was logged nowhere): tensorstore's short
    # read of its data file, then its empty loader file
    assert "step 1 is corrupt or incomplete (OSError: state: the read failed on processes [1] (process 1: " \
           "ValueError: OUT_OF_RANGE: Error reading" in rows[0]["logs"][0], rows
    # process 1's loader file emptied: process 0's loader, set from its own file, is put back (the run starts fresh)
    assert "step 2 is corrupt or incomplete (OSError: loader: the read failed on processes [1] (process 1: " \
           "JSONDecodeError: Expecting value" in rows[0]["logs"][1], rows
    assert [r["loader_position"] for r in rows] == [7, 7]
    assert sorted(x.name for x in (tmp_path / "ckpt-corrupt").iterdir()) == ["1", "2"]


def test_a_loader_state_one_process_refuses_stops_every_process_alike(tmp_path):
    """Process 1's loader now reads another stream than its saved state (its host's own data changed): it raised
    CheckpointMismatch while process 0, told only that process 1's read failed, took the step for corrupt, moved
    the good checkpoint to ckpt-corrupt and waited in the quarantine barrier (killed after 60 s). Now every process
    raises the same CheckpointMismatch at once, naming process 1's reason, and the step stays."""
    rows = worker_rows("loader_mismatch", tmp_path, 60)
    want = (f"CheckpointMismatch: {tmp_path / 'ckpt' / '1'}: process 1: saved over stream 'a', this loader reads "
            "'b'")
    assert [(r["error"], r["steps"], r["logs"], r["loader_position"]) for r in rows] == [(want, [1], [], 7)] * 2
    assert max(r["seconds"] for r in rows) < 20 and not (tmp_path / "ckpt-corrupt").exists()


def test_a_loader_state_saved_before_per_process_states_is_refused_on_several_processes(tmp_path):
    """A checkpoint of before per-process loader states (2026-11-30) holds one loader state, in its meta (the
    primary's, process 0's): resumed by two processes, each set its loader to it, so process 1 went on from process
    0's position in its own stream (it re-read or skipped its documents, silently). Now every process refuses it,
    naming the fix, and the step stays."""
    rows = worker_rows("legacy_loader", tmp_path, 60)
    want = (f"CheckpointMismatch: {tmp_path / 'ckpt' / '1'}: its data loader state predates per-process loader "
            "states (one state, process 0's), which cannot position the loaders of this run's 2 processes (each "
            "reads its own documents); resume it on one process if it was saved by one, or use a new checkpoint "
            "directory")
    assert [(r["error"], r["steps"], r["loader_position"]) for r in rows] == [(want, [1], 7)] * 2, rows


def run_trainers(tmp_path, argv_of, timeout=300, cwd_of=lambda pid: ROOT, out=None,
                 entry=("-m", "experiments.train_lm"), buffered=False, lm_args=True):
    """train_lm as a two-process job on localhost (2 CPU devices each; process `pid` runs `argv_of(pid)` in
    `cwd_of(pid)`, its own data cache, one --out): (processes, their (stdout, stderr)) once both have exited (within
    `timeout` s each). buffered: stdout block-buffered, as a job's log file (PYTHONUNBUFFERED unset). lm_args=False:
    `argv_of(pid)` alone (another trainer's command line: no data.cache_dir / --out added)."""
    port, procs = portpicker.pick_unused_port(), []
    base = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    for pid in range(2):
        env = {**base, "PYTHONPATH": os.pathsep.join([NO_TORCH, ROOT]), "JAX_PLATFORMS": "cpu",
               "JAXSCALE_COORDINATOR": f"127.0.0.1:{port}",
               "JAXSCALE_NUM_PROCESSES": "2", "JAXSCALE_PROCESS_ID": str(pid),
               "XLA_FLAGS": f"{_COMPILE_FLAGS} --xla_force_host_platform_device_count=2"}
        argv = [*argv_of(pid), *(("--set", f"data.cache_dir={tmp_path / f'cache_{pid}'}",
                                  "--out", out or str(tmp_path / "run")) if lm_args else ())]
        procs.append(subprocess.Popen([sys.executable, *entry, *argv], cwd=cwd_of(pid), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        return procs, [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:  # the failure said only which process timed out, not what either had printed
        alive = [p.poll() is None for p in procs]
        for p in procs:
            p.kill()
        ends = [f"process {i} ({'killed: still running' if a else f'exited {p.returncode}'}), its stderr's end:\n"
                f"{p.communicate()[1][-1500:]}" for i, (p, a) in enumerate(zip(procs, alive))]
        raise AssertionError(f"not both exited within {timeout} s\n" + "\n".join(ends)) from None
    finally:
        for p in procs:  # one left waiting (the test failed): not past the test
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_the_trainer_runs_to_the_end_on_two_processes(tmp_path):
    """train_lm over two processes through its final sample (which needs the parameters of both processes) and
    outputs: every process exits 0, only the primary writes."""
    procs, outs = run_trainers(tmp_path, lambda pid: [
        "--preset", "tiny", "--steps", "1", "--set", "optim.warmup_steps=0", "--set", "train.eval_every=1",
        "--set", "train.sample_tokens=4", "--set", "train.async_save=false", "--set", "train.progress=false"])
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert (tmp_path / "run" / "sample.txt").read_text().startswith("def __init__(self")
    assert "sample:" in outs[0][0] and "sample:" not in outs[1][0]
    # the eval set's size is summed over both processes' rows (every process joins the sum: no hang)
    assert re.search(r"eval over [\d,]+ held-out targets \(\d+ batch", outs[0][0]), outs[0][0][-2000:]
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "eval"] == [0, 1]


def test_processes_started_with_other_settings_stop_naming_them(tmp_path):
    """A user study's two processes with another --lr (or --batch) each trained on silently with their own, and
    with another --mesh hung in the first collective (SIGTERM could not stop it): the trainer now compares every
    setting across processes first and exits 1 on each, naming the fields (before compiling anything)."""
    procs, outs = run_trainers(tmp_path, lambda pid: [
        "--preset", "tiny", "--steps", "1", "--lr", ("1e-2", "1e-1")[pid], "--set", "optim.warmup_steps=0"])
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1, err[-2000:]
        assert ("config error: processes [1] were started with other settings than process 0: optim.lr differ; "
                "start every process with the same command line") in err, err[-2000:]
    assert not (tmp_path / "run" / "ckpt").exists()


def test_processes_whose_hosts_hold_other_data_stop_naming_it(tmp_path):
    """One relative data.train_dir (so one setting) from two working directories, each host's own disk, where process
    1's host holds other documents (a stale copy): each process trained on its own host's files, silently. Now every
    process exits 1 before training, naming the data that differ; the held-out tier, the same on both, passes."""
    from data.shards import DocWriter, shard_name

    for pid, word in ((0, "alpha"), (1, "omega")):
        for tier, docs in (("train", 40), ("eval", 8)):
            writer = DocWriter(str(tmp_path / f"host{pid}" / tier / f"{shard_name(0)}.array_record"))
            for i in range(docs):
                writer.write({"id": str(i), "text": f"{word if tier == 'train' else 'held'} document {i} " * 20})
            writer.commit()
    procs, outs = run_trainers(tmp_path, lambda pid: [
        "--preset", "tiny", "--steps", "2", "--set", "optim.warmup_steps=0", "--set", "train.sample_tokens=0",
        "--set", "data.train_dir=train", "--set", "data.eval_dir=eval"], timeout=120,
        cwd_of=lambda pid: tmp_path / f"host{pid}")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1, err[-2000:]
        assert ("config error: processes [1] were started with other data than process 0: data.train_dir digests, "
                "data.train_dir sources differ; every host needs the same files there") in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_command_line_one_process_refuses_stops_every_process(tmp_path):
    """A setting only one process's command line has, which that process refuses: the other exits too, at once,
    naming it. A misspelt field (refused before jax.distributed starts) left process 0 waiting 300 s in
    jax.distributed.initialize; a value validate() refuses (a batch the mesh cannot split) left it in the settings
    comparison, dying after 30 s with a Gloo time-out traceback."""
    for extra, want in ((["--set", "train.batchh=8"], ("another process refused its command line", "train.batchh:")),
                        (["--set", "train.batch=7"], ("train.batch differ",) * 2)):
        t0 = time.time()
        procs, outs = run_trainers(tmp_path, lambda pid: [
            "--preset", "tiny", "--steps", "4", *(extra if pid == 1 else [])], timeout=90)
        for p, (_, err), w in zip(procs, outs, want):
            assert p.returncode == 1 and "config error: " in err and w in err, err[-2000:]
        assert time.time() - t0 < 60
    assert not (tmp_path / "run" / "ckpt").exists()


def test_an_output_directory_the_processes_do_not_share_is_refused(tmp_path):
    """--out on each host's own disk (here: one relative --out from two working directories): process 1's first
    checkpoint save failed (FileNotFoundError in orbax) and both processes hung in it (> 200 s, heartbeats still
    flowing). Now every process exits 1 before anything compiles, naming train.out and the processes that do not
    share it."""
    for pid in range(2):
        (tmp_path / f"host{pid}").mkdir()
    procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "4"], timeout=120,
                               cwd_of=lambda pid: tmp_path / f"host{pid}", out="run")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1, err[-2000:]
        assert (f"config error: train.out {tmp_path / 'host0' / 'run'}" in err or
                f"config error: train.out {tmp_path / 'host1' / 'run'}" in err), err[-2000:]
        assert "processes [1] do not see process 0's files there" in err, err[-2000:]
    # the probe is removed again, and so is the run directory the refused run made (with its lock file)
    assert not (tmp_path / "host0" / "run").exists()


def test_a_two_process_job_on_an_out_another_job_holds_stops_on_every_process(tmp_path):
    """Process 0 alone locks train.out (data.run_lock; the job's processes share it by design): refused there, every
    process exits 1 at once (the others hung in their next collective had they gone on), none having written."""
    from data.run_lock import RunLock

    out = tmp_path / "run"
    with RunLock(out, "experiments.train_lm"):  # this test process is the running job
        procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "4"], timeout=120)
        assert [p.name for p in out.iterdir()] == [".jaxscale-run.lock"]
    assert procs[0].returncode == 1 and f"in use by another job: pid {os.getpid()} on host " in outs[0][1]
    assert procs[1].returncode == 1 and "train.out: process 0 found it in use by another job" in outs[1][1]


def test_the_video_trainer_started_on_two_processes_is_refused_on_each(tmp_path):
    """train_video runs in one process, but ignored a job's JAXSCALE_* variables: each process trained alone, the
    second refused as "another job" on the shared --out (on each host's own disk both trained a copy silently).
    Now every process exits 2 naming the process count, before anything is written."""
    procs, outs = run_trainers(tmp_path, lambda pid: [
        "--preset", "tiny", "--vae-steps", "1", "--dit-steps", "1", "--no-media", "--out", str(tmp_path / "run")],
        timeout=150, entry=("-m", "experiments.train_video"), lm_args=False)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert "experiments.train_video runs in one process, but this job has 2 processes" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_video_trainer_with_a_flag_one_process_refuses_stops_every_process_at_once(tmp_path):
    """Process 1 with a bad --seed: it exited on argparse's error before joining the job, and process 0 waited for it
    in jax.distributed.initialize (300 s), then aborted (SIGABRT, 'DEADLINE_EXCEEDED ... RegisterTask') naming
    neither the process nor the flag. Now the refusing process joins first: both exit 2 within seconds, each
    naming its own reason."""
    procs, outs = run_trainers(tmp_path, lambda pid: [
        "--preset", "tiny", "--no-media", "--out", str(tmp_path / "run"), *(["--seed", "-1"] if pid else [])],
        timeout=90, entry=("-m", "experiments.train_video"), lm_args=False)
    assert [p.returncode for p in procs] == [2, 2], [err[-1500:] for _, err in outs]
    assert "experiments.train_video runs in one process, but this job has 2 processes" in outs[0][1], outs[0][1]
    assert "argument --seed: must be an integer >= 0, got -1" in outs[1][1], outs[1][1]
    assert not (tmp_path / "run").exists()


FAIL_ON_PROCESS_1 = """
import sys

import jax

import experiments.lm_step as lm_step
from experiments import train_lm

make = lm_step.make_state_step


def failing(*args, **kwargs):  # the step raises on process 1 at its third call
    step, calls = make(*args, **kwargs), [0]

    def fn(state, batch):
        calls[0] += 1
        if jax.process_index() == 1 and calls[0] == 3:
            raise RuntimeError("injected failure on process 1")
        return step(state, batch)
    return fn


lm_step.make_state_step = failing
train_lm.main(sys.argv[1:])
"""


def test_an_error_on_one_process_mid_training_ends_every_process(tmp_path):
    """An exception on one process during training (here its step raising) hung both processes for good (> 180 s):
    its cleanup waited in the checkpoint manager's close for the other, which waited in the next step's collective,
    heartbeats flowing. The failing process now exits at once, and the other's collective fails with it."""
    wrapper = tmp_path / "fail_on_1.py"
    wrapper.write_text(FAIL_ON_PROCESS_1)
    t0 = time.time()
    procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "8"], timeout=150,
                               entry=(str(wrapper),), buffered=True)
    # process 0 ends by its own failed collective (or, at worst, its heartbeat check): nonzero either way
    assert procs[1].returncode == 1 and procs[0].returncode != 0, [err[-2000:] for _, err in outs]
    # its log (block-buffered in a job's log file) is kept: os._exit skipped the flush, and the job's log was empty
    if procs[0].returncode == 1:
        assert "step 0: eval loss" in outs[0][0], (outs[0][0][-2000:], outs[0][1][-2000:])
    assert "RuntimeError: injected failure on process 1" in outs[1][1], outs[1][1][-2000:]
    assert "process 1: exiting at once so the job's other processes stop too" in outs[1][1], outs[1][1][-2000:]
    assert time.time() - t0 < 100


def test_a_host_path_one_process_refuses_stops_every_process(tmp_path):
    """data.cache_dir (a host's own, so not compared across processes) that validate() refuses on process 1 only:
    process 1 printed its config error and then waited in jax's shutdown, process 0 in its first collective, both
    for good (killed after 90 s). Now the refusal is agreed: every process exits 1 at once, naming it or it."""
    (tmp_path / "cache_1").write_text("not a directory")  # run_trainers' data.cache_dir of process 1
    t0 = time.time()
    procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "4"], timeout=90)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1, err[-2000:]
    assert f"config error: data.cache_dir: '{tmp_path / 'cache_1'}' is a file; name a directory" in outs[1][1]
    assert "config error: another process refused its settings" in outs[0][1], outs[0][1][-2000:]
    assert time.time() - t0 < 60


FAIL_BEFORE_TRAINING_ON_PROCESS_1 = """
import sys

import jax

from experiments import train_lm

tiers = train_lm.corpus_tiers


def failing(spec):  # building the data cache fails on process 1 only (its own disk)
    if jax.process_index() == 1:
        raise OSError(28, "No space left on device (injected on process 1)")
    return tiers(spec)


train_lm.corpus_tiers = failing
train_lm.main(sys.argv[1:])
"""


def test_an_error_on_one_process_before_training_ends_every_process(tmp_path):
    """An exception on one process before the training loop (here its corpus cache failing) hung both processes for
    good (killed after 200 s): it exited in order, waiting in jax's shutdown for the other, which waited in its first
    collective. The failing process now exits at once, as in the loop, and the other's collective fails with it."""
    wrapper = tmp_path / "fail_on_1.py"
    wrapper.write_text(FAIL_BEFORE_TRAINING_ON_PROCESS_1)
    t0 = time.time()
    procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "4"], timeout=90,
                               entry=(str(wrapper),))
    assert procs[1].returncode == 1 and procs[0].returncode != 0, [err[-2000:] for _, err in outs]
    assert "OSError: [Errno 28] No space left on device (injected on process 1)" in outs[1][1], outs[1][1][-2000:]
    assert "process 1: exiting at once so the job's other processes stop too" in outs[1][1], outs[1][1][-2000:]
    assert time.time() - t0 < 60


SIGTERM_ON_PROCESS_1 = """
import os
import signal
import sys

import jax

import experiments.lm_step as lm_step
from experiments import train_lm

make = lm_step.make_state_step


def signalled(*args, **kwargs):  # process 1 gets a SIGTERM during its second step
    step, calls = make(*args, **kwargs), [0]

    def fn(state, batch):
        calls[0] += 1
        if jax.process_index() == 1 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(state, batch)
    return fn


lm_step.make_state_step = signalled
train_lm.main(sys.argv[1:])
"""


def test_a_sigterm_on_one_process_mid_training_stops_every_process_at_one_saved_step(tmp_path):
    """jax.distributed.initialize starts a preemption notifier that takes SIGTERM over below Python: with the
    trainer's handler installed before it (first thing in main, for a SIGTERM during the startup), the signal went
    to the notifier and the job trained on to its end. Both processes stop after step 2, saved, status 0."""
    wrapper = tmp_path / "sigterm_on_1.py"
    wrapper.write_text(SIGTERM_ON_PROCESS_1)
    procs, outs = run_trainers(tmp_path, lambda pid: ["--preset", "tiny", "--steps", "8",
                                                      "--set", "train.sample_tokens=0"], timeout=150,
                               entry=(str(wrapper),))
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert "SIGTERM on another process: saved step 2; exiting" in outs[0][0], outs[0][0][-2000:]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.isdigit()) == [2]
