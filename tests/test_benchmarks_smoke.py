"""The prepared GPU benchmark runs its code path at toy size on CPU, so it cannot rot before a GPU is lent; the
scripts' command lines refuse bad counts before any work."""

import math

import pytest

from benchmarks import train_step_gpu
from scaling.hardware import peak_flops


def test_gpu_train_step_tiny_runs_and_reports_mfu():
    """--tiny is the 1B config shrunk: bf16 compute, float32 params, heads of 128 (it was a float32 toy with
    heads of 16, so the GPU run's dtype path never ran here), and it takes --batch / --seq."""
    out = train_step_gpu.main(["--tiny", "--steps", "2", "--batch", "3", "--seq", "64"])
    assert out["attn_impl"] == "xla" and out["seq"] == 64 and out["batch"] == 3 and out["chip"] == "h200"
    assert math.isfinite(out["loss"]) and out["tokens_per_s"] > 0
    tiny = train_step_gpu.TINY
    gpu = train_step_gpu.GPU_1B
    assert (tiny.dtype, tiny.param_dtype, tiny.hd) == (gpu.dtype, gpu.param_dtype, gpu.hd) == ("bfloat16", "float32",
                                                                                             128)
    assert out["params"] == tiny.param_count() and out["flops_per_token"] == tiny.flops_per_token(64, causal=True)
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * out["flops_per_token"] / peak_flops("h200", "bf16"))
    with pytest.raises(SystemExit, match="--chip: unknown hardware kind 'h2oo'"):  # before the run, not after
        train_step_gpu.main(["--tiny", "--steps", "1", "--chip", "h2oo"])


def test_gpu_train_step_writes_its_json_without_the_data_pipeline_packages(tmp_path, monkeypatch):
    """The H200 image has jax, flax, optax and tqdm but neither grain nor array_record: write_json imported
    data.shards, whose array_record import failed after the timed run, so the run's --json was never written."""
    import json
    import sys

    import data.shards

    for name in ["array_record", *(m for m in sys.modules if m.startswith("array_record."))]:
        monkeypatch.setitem(sys.modules, name, None)  # `import array_record...` raises ImportError
    monkeypatch.setattr(data, "shards", data.shards)  # the module and the package's name for it come back after
    monkeypatch.delitem(sys.modules, "data.shards")  # imported anew, as in a fresh process
    out = tmp_path / "h200.json"
    res = train_step_gpu.main(["--tiny", "--steps", "1", "--batch", "1", "--seq", "16", "--json", str(out)])
    assert json.loads(out.read_text()) == res


def test_gpu_train_step_refuses_the_1b_config_without_a_gpu():
    with pytest.raises(SystemExit, match="--tiny"):
        train_step_gpu.main(["--steps", "1"])


def test_step_profile_reads_each_dot_fusions_flops_from_the_compiled_hlo():
    import jax
    import jax.numpy as jnp

    from benchmarks.step_profile import hlo_kernels

    def f(x_MK, w_KN, q_BTH, k_BSH):
        return jnp.tanh(x_MK @ w_KN), jnp.einsum("bth,bsh->bts", q_BTH, k_BSH)

    args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((3, 16, 8)), jnp.ones((3, 24, 8)))
    kernels = hlo_kernels(jax.jit(f).lower(*args).compile().as_text())
    dots = sorted((v["flops"], v["batched"]) for v in kernels.values() if v["flops"])
    assert dots == [(2 * 3 * 16 * 24 * 8, True), (2 * 64 * 32 * 48, False)]


def test_step_profile_extends_an_eigen_dot_to_the_next_kernel():
    """An unfused dot's trace event covers only its launch: it runs until the next kernel starts (or its own end)."""
    from benchmarks.step_profile import _eigen_extended

    kernels = {"dot.1": {"eigen": True}, "fusion.2": {"eigen": False}, "dot.3": {"eigen": True}}
    evs = [(0, 5, "dot.1"), (40, 50, "fusion.2"), (45, 47, "dot.3")]
    assert _eigen_extended(evs, kernels) == [(0, 40, "dot.1"), (40, 50, "fusion.2"), (45, 47, "dot.3")]


def test_step_profile_counts_a_phase_once_while_two_of_its_kernels_run_at_once():
    """The phases summed each kernel's time: two forward kernels on the two threads counted twice, so forward +
    backward + optimizer came to more than the 'other kernels only' wall time they split (47.6 vs 37.5 ms)."""
    from benchmarks.step_profile import _union, phase_time_alone

    kernels = {"dot.1": {"flops": 10, "phase": "forward"}, "f.2": {"flops": 0, "phase": "forward"},
               "f.3": {"flops": 0, "phase": "forward"}, "f.4": {"flops": 0, "phase": "backward"}}
    evs = [(0, 10, "dot.1"), (5, 30, "f.2"), (20, 40, "f.3"), (40, 50, "f.4")]
    dots = _union((s, e) for s, e, n in evs if kernels[n]["flops"])
    assert phase_time_alone(evs, kernels, dots) == {"backward": 10, "forward": 30}  # [10, 40) once, not 20 + 20


def test_decode_benchmark_tiny_runs_both_side_by_side():
    """benchmarks.decode at toy size: ours and HF's generate give the same greedy tokens, and every batch, shape and
    cache position has its row."""
    from benchmarks import decode

    res = decode.main(["--batches", "1", "2", "--gens", "3x4", "--positions", "2", "5", "--rounds", "1",
                       "--d-model", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--mlp", "64",
                       "--vocab", "128"])
    assert [(r["batch"], r["prompt"], r["new"]) for r in res["generate"]] == [(1, 3, 4), (2, 3, 4)]
    assert all(r["tokens_equal"] == 1.0 and r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in res["generate"])
    assert [(r["batch"], r["position"], r["slots"]) for r in res["step"]] == [(1, 2, 15), (1, 5, 15), (2, 2, 15),
                                                                              (2, 5, 15)]
    assert all(r["ours_ms"] > 0 and r["hf_ms"] > 0 for r in res["step"])


def test_decode_benchmark_compares_only_the_generated_tokens(monkeypatch):
    """Both generates return the prompt followed by the new tokens: the prompt, equal by construction, was counted,
    so one new token of two equal after a 6-token prompt read 0.875, and a 2048x32 row that agreed on no new token
    0.985."""
    import types

    import numpy as np
    import torch

    import models
    from benchmarks import decode

    def ours_generate(model, prompt, n):  # new tokens [0, 0, ...]
        return np.concatenate([np.asarray(prompt), np.zeros((prompt.shape[0], n), np.int32)], 1)

    class HF:  # new tokens [0, 1, 1, ...]
        def generate(self, ids, max_new_tokens, **kw):
            new = torch.ones(ids.shape[0], max_new_tokens, dtype=ids.dtype)
            new[:, 0] = 0
            return torch.cat([ids, new], 1)

    monkeypatch.setattr(models, "generate", ours_generate)
    rows = decode.generations(types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=16)), HF(), [2], [(6, 2)], 1)
    assert rows[0]["tokens_equal"] == 0.5


@pytest.mark.parametrize("module, argv, message", [
    ("benchmarks.loop_products", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.batched_dots", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.train_step", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    # the first call compiles (jax.jit, torch.compile): with no untimed call, round 1 timed ours at 6142 ms, not 86
    ("benchmarks.train_step", ["--warmup", "0"], "argument --warmup: must be an integer >= 1, got 0"),
    ("benchmarks.moe_dispatch", ["--rounds", "1"], "argument --rounds: must be an integer >= 2, got 1"),
    # a KeyError after the shapes before it had been timed (minutes)
    ("benchmarks.moe_dispatch", ["--shapes", "mixtral,fien"], "argument --shapes: unknown shape 'fien'; choose from"),
    # the results are keyed by shape: timed twice, reported once
    ("benchmarks.moe_dispatch", ["--shapes", "mixtral,mixtral"], "argument --shapes: 'mixtral,mixtral' repeats a "
     "shape"),
    ("benchmarks.checkpoint_save", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.checkpoint_save", ["--mesh", "dta=8"], "argument --mesh: mesh axes ['dta'] are unknown"),
    ("benchmarks.checkpoint_save", ["--mesh", "data=4"], "argument --mesh: mesh {'data': 4} needs 4 devices"),
    ("benchmarks.init_compile", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.decode", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.decode", ["--gens", "32"], "argument --gens: '32' is not PxN (prompt tokens x new tokens)"),
    ("benchmarks.decode", ["--heads", "3"], "--heads 3 must divide --d-model 256 and be a multiple of --kv-heads 2"),
    ("benchmarks.loader_throughput", ["--consumed", "0"], "argument --consumed: must be a finite number > 0"),
    ("benchmarks.restore_memory", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("benchmarks.restore_memory", ["--d-model", "12"], "argument --d-model / --layers / --vocab: model.head_dim: "
     "d_model=12 is not divisible by n_heads=8"),
    ("benchmarks.scan_residuals", ["--layers", "4,0"], "argument --layers: must be an integer >= 1, got 0"),
    ("benchmarks.scan_residuals", ["--layers", "4,x"], "argument --layers: invalid comma-separated integers >= 1"),
    ("benchmarks.train_step_gpu", ["--tiny", "--steps", "x"], "argument --steps: invalid integer >= 1 value: 'x'"),
    ("experiments.train_video", ["--vae-steps", "0"], "argument --vae-steps: must be an integer >= 1, got 0"),
    ("experiments.train_video", ["--dit-lr", "0"], "argument --dit-lr: must be a finite number > 0, got 0.0"),
    ("experiments.aot", ["--devices", "0"], "argument --devices: must be an integer >= 1, got 0"),
    ("experiments.train_video", ["--mesh", "foo"], "argument --mesh: cannot parse 'foo'; write axis=size pairs"),
])
def test_cli_counts_are_refused_before_any_work(module, argv, message, capsys):
    """A count below its floor stops at argument parsing, naming the flag (benchmarks failed on an empty median
    after the timed runs, or, where each run is a child process, on a CalledProcessError that hid the child's
    message; train_video took --vae-steps 0 and --dit-lr 0 for "use the preset's", and its own
    --mesh parser failed on a bad value with a bare unpacking error)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err



@pytest.mark.parametrize("module, flag, low, later", [
    ("experiments.aot", "--seq", 1, "--devices"), ("experiments.train_video", "--vae-steps", 1, "--dit-steps"),
    ("experiments.mup_transfer", "--steps", 1, "--batch"), ("experiments.scaling_ladder", "--warmup", 0, "--n-boot"),
    ("scaling.plan", "--chips", 1, "--seq-len"), ("data.pipeline", "--workers", 1, "--max-doc-bytes"),
])
def test_cli_integer_flags_take_a_whole_number_written_as_a_float(module, flag, low, later, capsys):
    """As `python -m experiments.train_lm --steps 1e3` (and scaling.plan's --params 1e9) take it, every CLI's
    integer flag takes 1e3 as 1000 and refuses 1.5 naming the flag: the others said "invalid int value: '1e3'"
    (aot, scaling.plan, data.pipeline) or "invalid integer >= 1 value" (train_video, mup_transfer, the ladder).
    (1e3 parses: the error is the next flag's, refused at 0.)"""
    import importlib

    main = importlib.import_module(module).main
    for argv, message in (([flag, "1.5"], f"argument {flag}: invalid integer >= {low} value: '1.5'"),
                          ([flag, "1e3", later, "0"], f"argument {later}: must be an integer >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err


@pytest.mark.parametrize("module, work, argv, message", [
    # `gb > nan` is False: every kernel ran whatever its footprint; a negative cap ran none, as 0 does, unsaid
    ("benchmarks.swa", "measure", ["--max-gb", "nan"], "argument --max-gb: must be a number >= 0 (GiB; 0 runs "
     "nothing), got nan"),
    ("benchmarks.swa", "measure", ["--max-gb", "-1"], "argument --max-gb: must be a number >= 0"),
    # a repeated window printed each of its rows twice, with twice as many cells as the table has columns
    ("benchmarks.swa", "measure", ["--windows", "64", "64"], "argument --windows: 64 64 repeats a value; list each "
     "once"),
    ("benchmarks.swa", "measure", ["--lengths", "128", "256", "128"], "argument --lengths: 128 256 128 repeats a "
     "value"),
    # the results are keyed by count: '4,8,4' timed and reported L=4 once
    ("benchmarks.scan_residuals", "interleaved", ["--layers", "4,8,4"], "argument --layers: '4,8,4' repeats a layer "
     "count; list each once"),
    # XLA reads the options only when it compiles: a JaxRuntimeError naming no flag, after the default train step had
    # been lowered and compiled (33 s at --batch 1 --seq 16 on the loaded 2-core machine)
    ("benchmarks.xla_options", "programs", ["--option", "xla_cpu_no_such_option=true"], "argument --option: "
     "xla_cpu_no_such_option=true: INVALID_ARGUMENT: No such compile option: 'xla_cpu_no_such_option'"),
    ("benchmarks.xla_options", "programs", ["--option", "xla_cpu_use_onednn=maybe"], "argument --option: "
     "xla_cpu_use_onednn=maybe: INVALID_ARGUMENT: While setting option xla_cpu_use_onednn, 'maybe' is not a valid"),
])
def test_bad_values_are_refused_before_the_benchmark_runs(module, work, argv, message, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "tune_cpu_allocator", lambda: False)
    monkeypatch.setattr(mod, work, lambda *a, **k: pytest.fail(f"{module} {argv} ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("module, call", [
    ("benchmarks.restore_memory", lambda m, tmp: m.main(["--rounds", "1"])),
    ("benchmarks.checkpoint_save", lambda m, tmp: m.main(["--rounds", "1"])),
    ("benchmarks.batched_dots", lambda m, tmp: m.main(["--rounds", "1"])),
    ("benchmarks.ckpt_overhead", lambda m, tmp: m.demo_run(str(tmp / "demo"))),
])
def test_a_child_process_that_fails_shows_its_stderr(module, call, tmp_path, monkeypatch):
    """The children ran with capture_output: a crash raised a CalledProcessError naming only the exit status (the
    demo run, unchecked, a FileNotFoundError on its metrics.jsonl), the child's traceback never shown."""
    import importlib
    import sys

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ValueError: the reason the child failed' >&2\nexit 3\n")
    fake.chmod(0o755)
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr("parallel.host.tune_cpu_allocator", lambda: False)  # batched_dots imports it in main
    with pytest.raises(Exception, match="(?s)exit status 3.*ValueError: the reason the child failed"):
        call(mod, tmp_path)


def test_restore_memory_reports_mib(tmp_path):
    """Its sizes are bytes / 2**20 and ru_maxrss / 1024 KiB, i.e. MiB, but were keyed _mb: the 759 'MB' train state
    of docs/restore_memory.json is 796 MB."""
    import argparse

    from benchmarks import restore_memory

    out = restore_memory.child("save", argparse.Namespace(d_model=64, layers=1, vocab=320, dir=str(tmp_path)))
    assert out["state_mib"] == pytest.approx(12 * out["params"] / 2**20, rel=1e-3)  # float32 params + AdamW m, v

@pytest.mark.parametrize("broken", ["ours_jax", "xla_matmul_2048"])
def test_train_step_reraises_when_our_step_or_the_matmul_fails_in_warm_up(monkeypatch, broken):
    """Every figure is relative to our step and the matmul peak: a failure there (e.g. a compile error) was recorded
    as for an optional contender (torch.compile) and the run went on to a bare KeyError naming the contender."""
    from benchmarks import train_step

    def fails():
        raise RuntimeError(f"{broken} failed to compile")

    runs = lambda: None  # noqa: E731
    monkeypatch.setattr(train_step, "jax_matmul", lambda: fails if broken == "xla_matmul_2048" else runs)
    monkeypatch.setattr(train_step, "jax_step",  # the ablations run
                        lambda cfg, batch, seq: fails if broken == "ours_jax" and cfg == train_step.CFG else runs)
    argv = ["--rounds", "1", "--steps", "1", "--warmup", "1", "--no-torch", "--ablate"]
    with pytest.raises(RuntimeError, match=f"{broken} failed to compile"):
        train_step.main(argv)


def test_train_step_gives_torch_the_cores_the_process_may_run_on(monkeypatch):
    """Under taskset / a cpuset, torch got os.cpu_count() threads (the machine's) on fewer CPUs, while XLA sizes its
    pool by the CPUs it may run on: oversubscribed OpenMP threads slowed HF (5% at 2 threads on 1 CPU, measured)."""
    import os

    import torch

    from benchmarks import train_step

    runs = lambda *a, **k: (lambda: None)  # noqa: E731
    for name in ("jax_matmul", "jax_step", "hf_step"):
        monkeypatch.setattr(train_step, name, runs)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    before = torch.get_num_threads()
    try:
        out = train_step.main(["--rounds", "1", "--steps", "1", "--warmup", "1", "--no-compile"])
    finally:
        torch.set_num_threads(before)
    assert out["machine"]["cores"] == 1 and out["machine"]["torch_threads"] == 1


def test_train_step_profile_takes_steps_and_warmup_and_refuses_ablate(monkeypatch, capsys):
    """--profile timed one call per phase per round after one untimed round, whatever --steps and --warmup said, and
    ran without the --ablate rows it was given: all three silently."""
    import jax.numpy as jnp
    import optax

    from benchmarks import train_step

    calls = {"matmul": 0, "whole step": 0}

    def counted(key):
        def call():
            calls[key] += 1
        return call

    # a stand-in model (one vector, a linear loss): what is checked is how often each phase is called
    monkeypatch.setattr(train_step, "setup", lambda cfg, batch, seq: (None, jnp.ones(3), optax.sgd(0.1), jnp.ones(3)))
    monkeypatch.setattr(train_step, "lm_loss", lambda graphdef, p, d: (p * d).sum())
    monkeypatch.setattr(train_step, "jax_matmul", lambda: counted("matmul"))
    monkeypatch.setattr(train_step, "jax_step", lambda cfg, batch, seq: counted("whole step"))
    train_step.main(["--profile", "--rounds", "2", "--steps", "3", "--warmup", "2"])
    assert calls == {"matmul": 2 + 2 * 3, "whole step": 2 + 2 * 3}
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--profile", "--ablate"])
    assert exit_info.value.code == 2 and "argument --ablate: --profile times only" in capsys.readouterr().err


def test_ckpt_overhead_demo_reads_the_target_record_its_checkpoint_kept(tmp_path, monkeypatch):
    """A demo run killed after it first reached its eval target but before its next save logs the crossing twice
    at one step (the resumed attempt replays it): the killed attempt's wall time first, then the resumed one's,
    which the checkpoint keeps (measured: 6.6 s, then 11.6 s in target_time_s). demo_run took the first."""
    import json
    import subprocess

    import jax

    from experiments.run_log import Logger

    jax.devices()  # (the backend is up: the import's device-count setting must leave it alone)
    from benchmarks import ckpt_overhead

    def fake_run(cmd, **kw):  # the demo run's metrics.jsonl as the killed-and-resumed run above left it
        log = Logger(tmp_path, True)
        for r in ({"kind": "eval", "step": 0, "loss": 5.7}, {"kind": "eval", "step": 4, "loss": 4.9},
                  {"kind": "target", "step": 4, "eval_target": 5.3, "wall_s": 6.6},
                  {"kind": "eval", "step": 4, "loss": 4.9},
                  {"kind": "target", "step": 4, "eval_target": 5.3, "wall_s": 11.6},
                  {"kind": "eval", "step": 12, "loss": 4.1}):
            log.write(r)
        log.close()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    row = ckpt_overhead.demo_run(str(tmp_path))
    assert (row["target_wall_s"], row["target_step"], row["eval_first"], row["eval_last"]) == (11.6, 4, 5.7, 4.1)
    json.dumps(row)


def test_ckpt_overhead_counts_a_write_still_running_after_its_chunk(monkeypatch):
    """A save whose write outlasts its chunk (measured: --chunk 1, writes running 0.09-0.24 s past it) slowed the next
    chunk, the 'without' one in half the pairs, or ran in the untimed wait between pairs: --chunk 1 --pairs 2 read
    -0.02 s per save (-0.09 %). A one-core clock: a pending write delays the next step; each save costs 0.1 + 2 s."""
    import types

    import jax
    import jax.numpy as jnp

    jax.devices()  # (the backend is up: the import's device-count setting must leave it alone)
    from benchmarks import ckpt_overhead

    clock = types.SimpleNamespace(now=0.0, pending=0.0)

    def run_pending():
        clock.now, clock.pending = clock.now + clock.pending, 0.0

    class FakeCheckpoints:
        def __init__(self, *a, **k):
            pass

        def save(self, *a):
            clock.now, clock.pending = clock.now + 0.1, 2.0

        wait = close = lambda self: run_pending()

    def step(state, batch):
        run_pending()
        clock.now += 1.0
        return state, {"loss": jnp.zeros(())}

    monkeypatch.setattr(ckpt_overhead, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr("experiments.checkpoint.Checkpoints", FakeCheckpoints)
    monkeypatch.setattr("experiments.train_lm.init_state", lambda cfg, mesh: (None, None, None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr("experiments.lm_step.make_state_step", lambda *a: step)
    from experiments.config import preset

    row, _ = ckpt_overhead.overhead(preset("demo"), 2, 1, None)
    assert row["extra_s_per_save"] == pytest.approx(2.1) and row["step_s"] == pytest.approx(1.0)


def test_video_bench_checks_its_run_before_the_timed_benchmarks(tmp_path, monkeypatch, capsys):
    """A `--preset tiny` run given as --run (its VAE is not the default preset's) failed only after the train-step
    and sampling benchmarks had run (about 2 minutes on 2 cores), with a CheckpointMismatch traceback pointing at
    experiments.train_lm's train.out; it is now refused first, naming --run."""
    from flax import nnx

    from benchmarks import video_bench
    from experiments.train_video import PRESETS
    from experiments.video_steps import manager, save
    from models.video import VideoVAE

    tiny_vae = nnx.state(VideoVAE(PRESETS["tiny"].vae, rngs=nnx.Rngs(0)))
    save(manager(tmp_path / "ckpt" / "vae"), 1, {"params": tiny_vae}, {"stage": "vae"})

    def timed_bench(*_):
        raise AssertionError("a timed benchmark ran before --run was checked")

    monkeypatch.setattr(video_bench, "bench_train_steps", timed_bench)
    monkeypatch.setattr(video_bench, "bench_sampling", timed_bench)
    with pytest.raises(SystemExit) as exit_info:
        video_bench.main(["--run", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --run" in err and "default preset" in err


def test_video_bench_refuses_a_named_run_that_is_no_run(tmp_path, monkeypatch, capsys):
    """`--run bogus` (a typo, the LM run's folder) ran the timed benchmarks (about 2 minutes), then said no checkpoint
    was there and exited 0. A --run named is refused first; without --run, a missing default run skips the PSNR. So
    is a run stopped before its VAE stage saved a step: its ckpt/vae, made by the manager at the start, is empty."""
    from benchmarks import video_bench
    from experiments.video_steps import manager

    manager(tmp_path / "stopped" / "ckpt" / "vae")  # as train_vae opens it (a run killed before step ckpt_every)

    def timed_bench(*_):
        raise AssertionError("a timed benchmark ran before --run was checked")

    monkeypatch.setattr(video_bench, "bench_train_steps", timed_bench)
    monkeypatch.setattr(video_bench, "bench_sampling", timed_bench)
    for run in (tmp_path / "bogus", tmp_path, tmp_path / "stopped"):
        with pytest.raises(SystemExit) as exit_info:
            video_bench.main(["--run", str(run), "--steps", "1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument --run: {run} holds no train_video VAE checkpoint" in err, err
    assert not (tmp_path / "bogus").exists()


def test_video_bench_leaves_a_missing_run_directory_alone(tmp_path):
    """--run names a directory to read: a mistyped one was created (holding an empty ckpt/vae) by the
    checkpoint manager the PSNR benchmark opened for writing."""
    import pathlib

    from benchmarks import video_bench
    from experiments.train_video import PRESETS

    typo = pathlib.Path(tmp_path) / "runs" / "vidoe"
    assert video_bench.bench_psnr(PRESETS["default"], typo) is None
    assert not typo.exists()


@pytest.mark.parametrize("module, argv", [
    ("benchmarks.batched_dots", []), ("benchmarks.checkpoint_save", []), ("benchmarks.ckpt_overhead", []),
    ("benchmarks.init_compile", []), ("benchmarks.loop_products", []), ("benchmarks.moe_dispatch", []),
    ("benchmarks.moe_train", []), ("benchmarks.restore_memory", []), ("benchmarks.scan_residuals", []),
    ("benchmarks.step_profile", []), ("benchmarks.swa", []), ("benchmarks.train_step", []),
    ("benchmarks.train_step_gpu", ["--tiny"]), ("benchmarks.video_bench", []),
])
def test_a_json_file_in_a_missing_directory_is_refused_before_any_work(module, argv, tmp_path, capsys):
    """--json was opened only after the run: `init_compile --rounds 1 --json nodir/x.json` timed its inits for 19 s,
    then died on FileNotFoundError, the results lost (train_step's 9 rounds: minutes)."""
    import importlib

    out = tmp_path / "nodir" / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([*argv, "--json", str(out)])
    assert exit_info.value.code == 2
    assert f"argument --json: the directory of {out} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    ("benchmarks.swa", ["--plot", "{missing}/swa.png"], "argument --plot: the directory of {missing}/swa.png does"),
    ("benchmarks.moe_train", ["--plot", "{missing}/m.png"], "argument --plot: the directory of {missing}/m.png does"),
    # savefig refused the name after the run; moe_train's --json, written after the plot, was lost with it
    ("benchmarks.swa", ["--plot", "{tmp}/swa.pnj"], "argument --plot: {tmp}/swa.pnj is not an image file name"),
    ("benchmarks.moe_train", ["--plot", "{tmp}/load"], "argument --plot: {tmp}/load is not an image file name"),
    ("benchmarks.train_step", ["--json", "{tmp}", "--rounds", "1"], "argument --json: {tmp} is a directory"),
    # --profile prints its phase table only: the file was silently never written
    ("benchmarks.train_step", ["--profile", "--json", "{tmp}/p.json"], "argument --json: --profile only prints"),
    # a bare unpacking ValueError; one part is named alone, in the singular (it read "['cpu_use_onednn'] are not
    # XLA options"), several as a list
    ("benchmarks.xla_options", ["--option", "xla_cpu_use_onednn"],
     "argument --option: 'xla_cpu_use_onednn' has no '='; write NAME=VALUE"),
    ("benchmarks.xla_options", ["--option", "a;b=1"], "argument --option: 'a' has no '='"),
    ("benchmarks.xla_options", ["--option", "a;b"], "argument --option: ['a', 'b'] have no '='; write NAME=VALUE"),
    ("benchmarks.xla_options", ["--option", "cpu_use_onednn=1"], "argument --option: 'cpu_use_onednn' is not an XLA "
     "option (names start with xla_)"),
    ("benchmarks.xla_options", ["--option", "a=1;b=2"], "argument --option: ['a', 'b'] are not XLA options"),
    # make_mesh refused it after the reference had been timed, naming no flag
    ("benchmarks.pipeline_bubble", ["--stages", "9"], "argument --stages: 9 stages need as many devices, 8 here"),
    # '' (an unset `--json "$OUT"`) ran and wrote nothing; 'nodir/' ran, then wrote a file named nodir
    ("benchmarks.train_step_gpu", ["--tiny", "--json", ""], "argument --json: '' names no file"),
    ("benchmarks.train_step_gpu", ["--tiny", "--json", "{missing}/"], "argument --json: '{missing}/' names no file"),
])
def test_bad_flags_are_refused_before_any_work(module, argv, message, tmp_path, capsys):
    import importlib

    fill = dict(missing=tmp_path / "nodir", tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([a.format(**fill) for a in argv])
    assert exit_info.value.code == 2 and message.format(**fill) in capsys.readouterr().err


def test_swa_prints_the_footprint_of_a_kernel_it_did_not_run(monkeypatch, capsys):
    """A kernel over --dense-max is compiled, not run, and reported with its compiled footprint: rounded to whole GB,
    a short run's 0.06 GB read 'not run (0 GB)' beside cells of '0.06 GB'."""
    from benchmarks import swa

    monkeypatch.setattr(swa, "measure", lambda fn, T, reps, max_gb: (None, 0.06) if max_gb == 0 else (0.01, 0.02))
    swa.main(["--lengths", "512", "1024", "--windows", "128", "--dense-max", "512"])
    out = capsys.readouterr().out
    assert "| 128 | dense_masked | 0.01 s / 0.02 GiB | not run (0.06 GiB) |" in out


def test_swa_does_not_run_a_kernel_that_may_not_fit_in_the_memory_left(monkeypatch, capsys):
    """The default sweep, under the tuned allocator, grew to 24 GB and was killed on a 23 GB machine, every row lost:
    a kernel whose footprint may not fit in what is left (MemAvailable) is compiled, reported, and not run."""
    from benchmarks import swa

    fn = swa.kernels(8)["swa_blocked"]
    sec, gb = swa.measure(fn, 32, 1, float("inf"))
    assert sec is not None and gb > 0
    monkeypatch.setattr(swa, "memory_left_gb", lambda: 0.99 * swa.HEAP_FACTOR * gb)
    assert swa.measure(fn, 32, 1, float("inf")) == (None, gb)
    assert "T=32: not run" in capsys.readouterr().out
    assert 0 < swa.memory_left_gb() < float("inf")  # read from /proc/meminfo on this Linux machine


def test_a_results_file_survives_a_dump_that_fails(tmp_path):
    """The scripts wrote --json with open(path, "w") then json.dump: a value JSON cannot hold left the committed
    file cut off mid-object ('{"a": 1, "b": '); now the old file stays whole and no temporary is left beside it."""
    from benchmarks.rounds import report, save

    path = tmp_path / "train_step_session1.json"
    save(str(path), 3, {"ours": {"ms": 1.0}})
    before = path.read_text()
    with pytest.raises(TypeError):
        save(str(path), 3, {"ours": {"ms": {1.0}}})
    with pytest.raises(TypeError):
        report(str(path), [], {"ratio": {2.0}})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_moe_dispatch_quartiles_lie_within_the_rounds(monkeypatch):
    """statistics.quantiles' default method extrapolates past the data for few rounds: 2 rounds of paired ratios
    0.42 and 2.98 printed the quartiles -0.22-3.62 (a negative time ratio)."""
    from benchmarks import moe_dispatch

    monkeypatch.setattr(moe_dispatch, "dense_contender", lambda cfg, x, g: lambda: None)
    monkeypatch.setattr(moe_dispatch, "contenders", lambda cfg, x, g: {"gmm": lambda: None})
    seconds = iter([1.0, 0.42, 1.0, 2.98])  # each round: the dense baseline, then gmm
    monkeypatch.setattr(moe_dispatch, "timed", lambda call, steps: (next(seconds),) * 2)
    r = moe_dispatch.main(["--rounds", "2", "--shapes", "mixtral"])["shapes"]["mixtral"]["results"]["gmm"]
    assert r["vs_dense_mlp"] == pytest.approx(1.70)
    assert r["vs_dense_mlp_quartiles"] == r["cpu_vs_dense_mlp_quartiles"] == pytest.approx([1.06, 2.34])


def test_a_results_file_is_written_through_a_symlink_or_a_pipe(tmp_path):
    """write_json renamed its temporary over the path: a symlink to a results file became a copy its target never
    saw, and `--json /dev/stdout` (a link to the terminal or a pipe) had /dev/stdout itself replaced by a file."""
    import json
    import os
    import threading

    from benchmarks.rounds import out_path, write_json

    (tmp_path / "runs").mkdir()
    target, link = tmp_path / "runs" / "latest.json", tmp_path / "latest.json"
    link.symlink_to(target)
    write_json(out_path(str(link)), {"ms": 1.0})
    assert link.is_symlink() and json.loads(target.read_text()) == {"ms": 1.0}
    fifo, got = tmp_path / "stdout", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)  # as a shell pipe's reader
    reader.start()
    write_json(out_path(str(fifo)), {"ms": 2.0})
    reader.join(timeout=10)
    assert got == ['{\n "ms": 2.0\n}'] and fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json", "runs", "stdout"]


@pytest.mark.parametrize("redirect", [">", ">>"])
def test_json_to_dev_stdout_redirected_to_a_file_keeps_the_log(redirect, tmp_path):
    """`--json /dev/stdout >> run.log`: /dev/stdout resolved to run.log, a regular file, so write_json renamed its
    temporary over it: the earlier log and every line the run printed were lost, the JSON alone left (and in a pipe
    the JSON overtook the summary still in stdout's buffer). It goes through the stream, after what was printed."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    log = tmp_path / "run.log"
    log.write_text("earlier run\n")
    code = ("import sys; from benchmarks.rounds import out_path, report; "
            "report(out_path('/dev/stdout'), [], {'ms': 1.0}); print(); print('after')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as for a user
    root = pathlib.Path(__file__).parent.parent
    subprocess.run(f"{sys.executable} -c \"{code}\" {redirect} {log}", shell=True, check=True, cwd=root,
                   env={**env, "PYTHONPATH": str(root)})
    summary, result = json.dumps({"ms": 1.0}, indent=1), json.dumps({"rows": [], "summary": {"ms": 1.0}}, indent=1)
    earlier = "earlier run\n" if redirect == ">>" else ""
    assert log.read_text() == f"{earlier}{summary}\n{result}\nafter\n"


def test_moe_train_plots_into_docs_only_for_the_documented_run(tmp_path, monkeypatch):
    """--plot defaulted to docs/moe_load.png, so a 2-step smoke run replaced the committed figure; only the documented
    run (--balance-steps 150, the default) writes it now, others plot moe_load.png in the working directory."""
    import pathlib

    from benchmarks import moe_train

    plotted = []
    monkeypatch.setattr(moe_train, "balance", lambda steps: {"x": {"max_over_mean": 1.0, "cv": 0.0, "final_loss": 1.0}})
    monkeypatch.setattr(moe_train, "plot", lambda res, path: plotted.append(pathlib.Path(path)))
    monkeypatch.chdir(tmp_path)
    moe_train.main(["--skip-speed", "--balance-steps", "2"])
    moe_train.main(["--skip-speed"])
    moe_train.main(["--skip-speed", "--balance-steps", "2", "--plot", str(tmp_path / "mine.png")])
    docs = pathlib.Path(moe_train.__file__).resolve().parents[1] / "docs" / "moe_load.png"
    assert plotted == [pathlib.Path("moe_load.png"), docs, tmp_path / "mine.png"]


def test_loader_throughput_times_no_compilation(monkeypatch):
    """measure() counts each batch's target tokens with `weights.sum()`, a device reduction when the loader places
    batches on the mesh: its first call compiles (0.4 s measured on the loaded 2-core machine) inside the timed
    loop, against ~1 s of loading at the mesh row's 800 k tokens/s. The untimed first batch takes that compile."""
    import types

    from benchmarks import loader_throughput

    clock = [0.0]

    class Weights:  # a batch's [8, 256] weights whose first sum compiles for 1 s (on the fake clock)
        compiled = False

        def sum(self):
            if not Weights.compiled:
                Weights.compiled = True
                clock[0] += 1.0
            clock[0] += 0.001  # loading one batch
            return 2048.0

    monkeypatch.setattr(loader_throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    rate = loader_throughput.measure(iter([{"weights": Weights()} for _ in range(4)]), 3)
    assert rate == pytest.approx(3 * 2048 / 0.003)


def test_a_results_file_at_a_bucket_url_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """--json gs://b/x.json was refused as 'the directory of gs://b/x.json does not exist; create it or name another
    file' (creating it made a local folder gs:); `--json=~/x.json` (left to us by the shell) is the home directory."""
    import argparse

    from benchmarks.rounds import out_path

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'gs://b/x.json' is a URL.*gcsfuse"):
        out_path("gs://b/x.json")
    assert out_path("~/x.json") == str(tmp_path / "x.json")


def test_batched_dots_json_names_each_rate_s_unit(tmp_path, monkeypatch):
    """The elementwise passes are timed in GB/s, the products in GFLOP/s, but both sat in dicts keyed
    all_cores_gflops / one_core_gflops: docs/batched_dots_session32.json's 'residual add' read as 110 GFLOP/s."""
    import json
    import types

    from benchmarks import batched_dots

    names = [s[0] for s in batched_dots.SHAPES] + ["residual add  [2048 × 256]"]
    rates = {n: 10.0 for n in names}
    monkeypatch.setattr("parallel.host.tune_cpu_allocator", lambda: False)
    monkeypatch.setattr(batched_dots, "measure", lambda rounds: dict(rates))
    monkeypatch.setattr("benchmarks.rounds.run_child", lambda *a, **k: types.SimpleNamespace(stdout=json.dumps(rates)))
    monkeypatch.setattr(batched_dots, "_passes", lambda: (("residual add  [2048 × 256]", ((2048, 256),) * 2, None),))
    batched_dots.main(["--rounds", "1", "--json", str(tmp_path / "dots.json")])
    res = json.loads((tmp_path / "dots.json").read_text())["results"]
    assert not any(k.endswith("_gflops") for k in res)
    assert res["units"] == {**{s[0]: "GFLOP/s" for s in batched_dots.SHAPES}, "residual add  [2048 × 256]": "GB/s"}
    assert res["all_cores"] == res["one_core"] == rates


def test_swa_labels_its_footprints_gib(tmp_path, monkeypatch, capsys):
    """measure() divides XLA's bytes by 2**30 (GiB, as --max-gb and MemAvailable are read), but the table, its JSON
    (peak_gb) and the plot said GB: the '64 GB' dense kernel at 32K is 68.7 GB."""
    import json

    from benchmarks import swa

    monkeypatch.setattr(swa, "measure", lambda fn, T, reps, max_gb: (None, 0.5) if max_gb == 0 else (0.01, 0.25))
    swa.main(["--lengths", "512", "1024", "--windows", "128", "--dense-max", "512", "--json", str(tmp_path / "s.json")])
    assert "| 128 | dense_masked | 0.01 s / 0.25 GiB | not run (0.50 GiB) |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[0]["peak_gib"] == 0.25 and "peak_gb" not in rows[0]
