"""Run config: bad configurations fail before compilation with one line naming the field; overrides reach
nested fields; the optimizer's decay mask and schedules; gradient accumulation matches one big batch."""

import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import run_log, train_lm
from experiments.config import ConfigError, RunConfig, load, load_tokenizer, validate
from experiments.lm_step import (
    decay_mask,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_state_step,
    make_train_step,
)
from models import Transformer, TransformerConfig
from models.losses import cross_entropy
from models.moe import MoEConfig, update_router_bias
from parallel import make_mesh

BAD = [  # (argv, n_devices, expected start of the error line after "config error: ")
    (["--preset", "gpt5"], 8, "preset: unknown 'gpt5'"),
    (["--preset", "tiny", "--mesh", "data=3"], 8, "mesh: mesh {'data': 3} needs 3 devices but 8 are available"),
    (["--preset", "tiny", "--mesh", "data=2,fsdp=2"], 8, "mesh: mesh {'data': 2, 'fsdp': 2} needs 4 devices"),
    # the -1 axis cannot fill the devices: it named the sizes but no fix
    (["--preset", "tiny", "--mesh", "data=3,fsdp=-1"], 8, "mesh: mesh {'data': 3, 'fsdp': -1}: 8 devices are not "
     "divisible by 3, the product of the axes other than 'fsdp'; make that product a divisor of 8"),
    (["--preset", "tiny", "--mesh", "pipeline=8"], 8, "mesh: mesh axes ['pipeline'] are unknown"),
    (["--preset", "tiny", "--batch", "12"], 8, "train.batch: 12 rows / grad_accum 1 = 12 per microbatch"),
    # the fix names grad_accum × the batch axes (it said "use a multiple of 8" to this batch of 8)
    (["--preset", "tiny", "--set", "optim.grad_accum=2"], 8, "train.batch: 8 rows / grad_accum 2 = 4 per microbatch "
     "is not divisible by the batch mesh axes {'fsdp': 8} (= 8); use a multiple of 16 (grad_accum 2 × 8), or a "
     "smaller optim.grad_accum"),
    (["--preset", "tiny", "--set", "optim.grad_accum=3"], 8, "optim.grad_accum: 3 must divide train.batch=8"),
    # a count first: 0 and -2 (which divides 8) were told they "must divide train.batch=8"
    (["--preset", "tiny", "--set", "optim.grad_accum=0"], 8, "optim.grad_accum: must be >= 1 (microbatches per step"),
    (["--preset", "tiny", "--set", "optim.grad_accum=-2"], 8, "optim.grad_accum: must be >= 1 (microbatches per step"),
    (["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--set", "model.head_dim=8", "--set", "model.n_heads=3",
      "--set", "model.n_kv_heads=1"], 8, "model.n_heads: 3 heads are not divisible by the tensor axis (2); use a "
     "multiple of 2, or a smaller tensor axis (e.g. --mesh fsdp=8)"),
    (["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--set", "model.n_heads=1", "--set", "model.n_kv_heads=1"], 8,
     "model.n_heads: 1 head is not divisible by the tensor axis (2)"),  # "1 heads are"
    (["--preset", "tiny", "--set", "model.sliding_window=32"], 8, "model.sliding_window: window 32 >= train.seq=32"),
    (["--preset", "tiny", "--seq", "64"], 8, "train.seq: 64 > model.max_seq_len=32"),
    (["--preset", "tiny", "--set", "model.n_kv_heads=3"], 8, "model.n_kv_heads: n_heads=2 must be"),
    (["--preset", "tiny", "--set", "train.nan_policy=ignore"], 8, "train.nan_policy: unknown 'ignore'"),
    (["--preset", "tiny", "--set", "optim.schedule=linear"], 8, "optim.schedule: unknown 'linear'"),
    (["--preset", "tiny", "--set", "optim.warmup_steps=50"], 8,
     "optim.warmup_steps: 50 must be in [0, 10] for train.steps=12 (the cosine decay needs an update after warmup); "
     "for a short run add e.g. --set optim.warmup_steps=1"),
    # one bound, said once: warmup 1 of 2 steps (within the first message's old range) leaves the cosine nothing
    (["--preset", "tiny", "--steps", "2", "--set", "optim.warmup_steps=1"], 8,
     "optim.warmup_steps: 1 must be in [0, 0] for train.steps=2 (the cosine decay needs an update after warmup); "
     "for a short run add e.g. --set optim.warmup_steps=0"),
    # the bounds themselves (each loosened by one passed): warmup as long as the run, every module held out,
    # clipping to a norm of 0
    (["--preset", "tiny", "--set", "optim.schedule=wsd", "--set", "optim.warmup_steps=12"], 8,
     "optim.warmup_steps: 12 must be in [0, 11] for train.steps=12; for a short run"),
    (["--preset", "tiny", "--set", "data.eval_every_nth=1"], 8, "data.eval_every_nth: hold out every n-th module"),
    (["--preset", "tiny", "--set", "optim.clip_norm=0"], 8, "optim.clip_norm: must be positive, got 0"),
    (["--preset", "tiny", "--set", "train.stepz=5"], 8, "train.stepz: unknown field; did you mean train.steps? "
     "TrainSpec has"),
    (["--preset", "demo", "--set", "model.moe.topk=5"], 8, "model.moe.topk: unknown field; did you mean "
     "model.moe.top_k? MoEConfig has"),
    (["--preset", "tiny", "--set", "train.xyzzy=5"], 8, "train.xyzzy: unknown field; TrainSpec has"),
    (["--preset", "tiny", "--set", "train.seed.x=1"], 8, "train.seed.x: seed is not a nested config"),
    # kernels of one backend only: they failed at the first eval, after the run directory was made
    (["--preset", "tiny", "--set", "model.attn_impl=cudnn", "--set", "model.dtype=bfloat16"], 8,
     "model.attn_impl: 'cudnn' needs a GPU"),
    (["--preset", "tiny", "--set", "model.attn_impl=cudnn"], 8, "model.attn_impl: 'cudnn' (cuDNN's fused attention) "
     "takes bfloat16 or float16"),
    (["--preset", "tiny", "--set", "model.dtype=float16"], 8, "model.dtype: float16 training needs loss scaling"),
    (["--preset", "tiny", "--set", "model.param_dtype=float16"], 8, "model.param_dtype: float16 training needs loss "
     "scaling"),
    # bf16 weights silently dropped AdamW updates below half a bf16 step (norm scales never moved)
    (["--preset", "tiny", "--set", "model.param_dtype=bfloat16"], 8, "model.param_dtype: bfloat16 parameters lose"),
    (["--preset", "tiny", "--set", "model.swa_impl=splash"], 8, "model.swa_impl: 'splash' needs a TPU"),
    (["--preset", "tiny", "--set", "model.swa_impl=cudnn"], 8, "model.swa_impl: 'cudnn' (cuDNN's fused attention) "
     "takes bfloat16"),
    (["--preset", "tiny", "--set", "train.steps"], 8, "--set 'train.steps': write KEY=VALUE"),
    (["--preset", "tiny", "--set", "data.bos_token=<s>"], 8, "data.bos_token: names a token of data.tokenizer, "
     "which is not set (bytes + EOS have their own); pass its tokenizer too (--set data.tokenizer=PATH/tokenizer.json) "
     "or drop data.bos_token (--set data.bos_token=none)"),
    (["--preset", "tiny", "--mesh", "fsdp=-1,expert=2"], 8, "mesh.expert: expert axis 2 needs model.moe"),
    (["--preset", "tiny", "--mesh", "fsdp=-1", "--batch", "12"], 3,
     "model.d_model: 32 is not divisible by the fsdp axis (3); use a multiple of 3, or a smaller fsdp axis (e.g. "
     "--mesh data=3)"),
    (["--preset", "llama7b"], 8, "mesh: mesh {'data': 8, 'fsdp': 32} needs 256 devices but 8"),
    (["--preset", "demo", "--set", "model.moe.top_k=9"], 8, "model.moe.top_k: 9 > n_experts=4"),
    # --set values are checked against the field's declared type
    (["--preset", "tiny", "--set", "train.steps=5O"], 8, "train.steps: expected an integer (int), got '5O'"),
    (["--preset", "tiny", "--set", "model.n_layers=4.5"], 8, "model.n_layers: expected an integer (int), got '4.5'"),
    (["--preset", "tiny", "--set", "train.progress=no"], 8, "train.progress: expected true or false (bool)"),
    (["--preset", "tiny", "--set", "optim.lr=3e-3x"], 8, "optim.lr: expected a number (float), got '3e-3x'"),
    (["--preset", "tiny", "--seed", "abc"], 8, "train.seed: expected an integer (int), got 'abc'"),
    (["--preset", "tiny", "--set", "mesh.data=x"], 8, "mesh.data: expected an integer axis size"),
    (["--preset", "demo", "--set", "model.moe=3"], 8, "model.moe: is a nested config (MoEConfig | None)"),
    # optimizer, data and output values that would train without complaint, but wrongly
    (["--preset", "tiny", "--set", "optim.b2=1.5"], 8, "optim.b2: Adam's betas must be in [0, 1), got 1.5"),
    (["--preset", "tiny", "--steps", "12", "--set", "optim.warmup_steps=11"], 8,
     "optim.warmup_steps: 11 must be in [0, 10] for train.steps=12 (the cosine decay"),
    (["--preset", "tiny", "--set", "optim.weight_decay=-1"], 8, "optim.weight_decay: must be >= 0"),
    (["--preset", "tiny", "--set", "optim.min_lr_ratio=2"], 8, "optim.min_lr_ratio: must be in [0, 1]"),
    # each bound at its edge (a bound loosened to it passed): Adam divides by 1 - b^t, a decay over 0 % of the run
    (["--preset", "tiny", "--set", "optim.b1=1"], 8, "optim.b1: Adam's betas must be in [0, 1), got 1"),
    (["--preset", "tiny", "--set", "optim.decay_frac=0"], 8, "optim.decay_frac: must be in (0, 1], got 0"),
    (["--preset", "tiny", "--set", "optim.lr=0"], 8, "optim.lr: must be positive, got 0"),
    # orbax's LatestN(0) deletes every save: Checkpoints refused it with a traceback once the data was loaded
    (["--preset", "tiny", "--set", "train.keep=0"], 8, "train.keep: must be >= 1, got 0"),
    (["--preset", "tiny", "--set", "data.max_files=-5"], 8, "data.max_files: must be None (all modules) or >= 1"),
    # fewer modules than every n-th held out: an empty eval split crashed the loader after the run dir was made
    (["--preset", "tiny", "--set", "data.max_files=5"], 8, "data.max_files: 5 modules hold none out for evaluation"),
    (["--preset", "tiny", "--set", "optim.lr=1e400"], 8, "optim.lr: expected a number (float), got '1e400'"),
    (["--preset", "tiny", "--set", "train.sample_tokens=-1"], 8, "train.sample_tokens: must be >= 0 (0: no sample)"),
    (["--preset", "tiny", "--set", "train.kill_at=-1"], 8, "train.kill_at: must be >= 0"),
    (["--preset", "tiny", "--set", "train.eval_target=0"], 8, "train.eval_target: an eval loss (cross-entropy, > 0)"),
    (["--preset", "tiny", "--set", "train.eval_target=-1"], 8,
     "train.eval_target: an eval loss (cross-entropy, > 0) to reach, or none; got -1.0 (never reached)"),
    (["--preset", "tiny", "--set", "train.out="], 8, "train.out: is empty"),
    (["--preset", "tiny", "--set", f"train.out={os.devnull}"], 8, f"train.out: {os.devnull!r} is a file"),
    # below a file: a NotADirectoryError traceback from mkdir before
    (["--preset", "tiny", "--set", f"train.out={os.devnull}/run"], 8,
     f"train.out: {os.devnull + '/run'!r} cannot be created: {os.devnull!r} is a file"),
    # the corpus cache: a NotADirectoryError traceback from the corpus build before, after the run had started
    (["--preset", "tiny", "--set", f"data.cache_dir={os.devnull}"], 8, f"data.cache_dir: {os.devnull!r} is a file"),
    (["--preset", "tiny", "--set", f"data.cache_dir={os.devnull}/c"], 8,
     f"data.cache_dir: {os.devnull + '/c'!r} cannot be created: {os.devnull!r} is a file"),
    # 0 was reported as data.eval_every_nth's; grain refused seeds past 32 bits (x1000) deep in the loader
    (["--preset", "tiny", "--set", "data.eval_batches=0"], 8, "data.eval_batches: must be >= 1"),
    (["--preset", "tiny", "--seed", "-1"], 8, "train.seed: must be in [0, 4294966]"),
    (["--preset", "tiny", "--seed", "5000000"], 8, "train.seed: must be in [0, 4294966]"),
    (["--preset", "tiny", "--set", "model.moe.n_experts=0"], 8, "model.moe.n_experts: "),
    # a field of a nested config that is off, without the one that turns it on: tiny silently became MoEConfig's 8
    # experts of width 512 in every layer (39k -> 814k parameters); rope_scaling turned on llama3 scaling x8
    (["--preset", "tiny", "--set", "model.moe.lb_loss_weight=0.02"], 8, "model.moe.lb_loss_weight: model.moe is none "
     "(off), so this would turn it on with MoEConfig's defaults (n_experts=8, ...); to turn it on set "
     "model.moe.n_experts as well (e.g. --set model.moe.n_experts=8), or drop the override"),
    (["--preset", "demo", "--set", "model.moe=none", "--set", "model.moe.dispatch=capacity"], 8,
     "model.moe.dispatch: model.moe is none (off), so this would turn it on"),
    (["--preset", "tiny", "--set", "model.rope_scaling.beta_fast=16"], 8, "model.rope_scaling.beta_fast: "
     "model.rope_scaling is none (off), so this would turn it on with RopeScaling's defaults (kind='llama3', "
     "factor=8.0, ...); to turn it on set model.rope_scaling.kind or model.rope_scaling.factor as well (e.g. --set "
     "model.rope_scaling.kind=llama3), or drop the override"),
    # pipeline stages run whole pattern periods, without MoE
    (["--preset", "tiny", "--mesh", "stage=2,fsdp=4"], 8,
     "mesh.stage: model.n_layers=2 (pattern period 2) does not split into 2 stages; use a multiple of 4 layers"),
    (["--preset", "demo", "--mesh", "stage=2,fsdp=4"], 8, "mesh.stage: MoE layers are not supported under pipeline"),
    (["--preset", "tiny", "--set", "model.n_layers=4", "--mesh", "stage=2,fsdp=4", "--set",
      "model.pipeline_microbatches=3"], 8, "model.pipeline_microbatches: 3 must divide the 8 rows"),
    (["--preset", "tiny", "--set", "model.sliding_window=none", "--set", "model.attn_pattern=global", "--set",
      "model.pipeline_microbatches=4", "--mesh",
      "stage=2,data=4", "--batch", "8"], 8, "model.pipeline_microbatches: 4 pipeline microbatches of 8 rows give 2"),
    # without a stage axis there is no pipeline: they were ignored in silence (experiments.aot refuses them)
    (["--preset", "tiny", "--set", "model.pipeline_microbatches=4", "--mesh", "data=8"], 8,
     "model.pipeline_microbatches: 4 microbatches need a pipeline"),
    (["--preset", "tiny", "--set", "model.sliding_window=none", "--set", "model.attn_pattern=global", "--set",
      "model.scan_layers=false", "--mesh",
      "stage=2,fsdp=4"], 8, "model.scan_layers: must be true under pipeline parallelism"),
    (["--preset", "tiny", "--set", "model.sliding_window=none", "--set", "model.attn_pattern=global", "--set",
      "model.dtype=bfloat16", "--mesh", "stage=2,fsdp=4"], 8, "model.dtype: bfloat16 pipeline parallelism"),
    (["--preset", "demo", "--set", "model.moe.expert_mlp_dim=191", "--mesh",
      "fsdp=4,tensor=2"], 8, "model.moe.expert_mlp_dim: 191 is not divisible by the tensor axis (2); use a multiple "
     "of 2, or a smaller tensor axis (e.g. --mesh fsdp=8)"),
    # what the sharded arrays need, named before compiling (a check on the wrong axis, or none, passed)
    (["--preset", "tiny", "--mesh", "sequence=4,fsdp=2", "--seq", "30"], 8,
     "train.seq: 30 is not divisible by the sequence axis (4); use a multiple of 4, or a smaller sequence axis (e.g. "
     "--mesh fsdp=4,sequence=2)"),
    (["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--set", "model.mlp_dim=65"], 8,
     "model.mlp_dim: 65 is not divisible by the tensor axis (2); use a multiple of 2, or a smaller tensor axis"),
    (["--preset", "demo", "--mesh", "fsdp=2,tensor=4", "--set", "model.mlp_dim=6"], 8,
     "model.mlp_dim: 6 is not divisible by the tensor axis (4); use a multiple of 4, or a smaller tensor axis (e.g. "
     "--mesh fsdp=4,tensor=2)"),
    (["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--set", "model.vocab_size=321"], 8,
     "model.vocab_size: 321 is not divisible by the tensor axis (2); use a multiple of 2, or a smaller tensor axis"),
    # a misspelt section, a field without its section, an empty key: the close key, as for a misspelt field
    (["--preset", "tiny", "--set", "trian.steps=5"], 8, "trian.steps: unknown setting; did you mean train.steps? use "
     "model.*, mesh[.axis], data.*, optim.* or train.*"),
    (["--preset", "tiny", "--set", "lr=1e-3"], 8, "lr: unknown setting; did you mean optim.lr? use model.*"),
    (["--preset", "tiny", "--set", "=5"], 8, "--set '=5': write KEY=VALUE"),
    # a section as a key: it suggested model.d_model
    (["--preset", "tiny", "--set", "model=none"], 8, "model: is a section, not a setting; set its fields, e.g. "
     "--set model.<field>=..."),
    # int32 step counters: 1e30 validated, then the wsd schedule failed building the optimizer (a bare OverflowError)
    (["--preset", "tiny", "--set", "train.steps=1e30"], 8, "train.steps: must be at most 2147483647 (the step "
     "counters are int32), got 1000000000000000019884624838656"),
    (["--preset", "tiny", "--set", "optim.schedule=wsd", "--steps", "2147483648"], 8,
     "train.steps: must be at most 2147483647"),
    # an integer past float's range: an OverflowError traceback named no setting
    (["--preset", "tiny", "--set", "optim.lr=1" + "0" * 400], 8, "optim.lr: expected a number (float), got '1000"),
    (["--preset", "tiny", "--set", "train.poison_steps=1.5"], 8, "train.poison_steps: expected integers separated by "
     "commas (e.g. 3,5) (tuple[int, ...]), got '1.5'"),
]


@pytest.mark.parametrize("argv,n_devices,expected", BAD, ids=[b[2].split(":")[0] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_config_fails_with_one_line_naming_the_field(argv, n_devices, expected):
    with pytest.raises(ConfigError) as e:
        validate(load(argv), n_devices)
    line = str(e.value)
    assert "\n" not in line and line.startswith(expected), line


@pytest.mark.parametrize("field", ["model", "data", "optim", "train", "mesh"])
def test_a_run_config_section_that_is_not_one_is_refused_by_name(field):
    """A number (or a dict from JSON) in place of a section failed in validate with a bare AttributeError ('int'
    object has no attribute 'dtype') or TypeError naming no field."""
    cfg = load(["--preset", "tiny"])
    for bad in (4, [] if field == "mesh" else dataclasses.asdict(getattr(cfg, field))):
        with pytest.raises(ConfigError, match=rf"^{field}: must be a .*, got {type(bad).__name__}"):
            validate(dataclasses.replace(cfg, **{field: bad}), 8)


def test_the_edges_of_each_documented_range_validate():
    """The closed ends of the ranges validate() documents: a constant lr after warmup (min_lr_ratio 1), no weight
    decay, b1 0 (RMSProp-like), a decay over the whole run, exactly one held-out module (max_files ==
    eval_every_nth), the largest seed and no sample: a bound tightened by one refused them."""
    for sets in (["optim.min_lr_ratio=1", "optim.weight_decay=0", "optim.b1=0", "optim.b2=0"],
                 ["optim.schedule=wsd", "optim.decay_frac=1"], ["data.max_files=10", "data.eval_every_nth=10"],
                 ["train.steps=2147483647", "optim.schedule=wsd"],  # the int32 step counters' largest
                 ["train.seed=4294966"],  # (2**32 - 1) // 1000 - 1: the loader's seed·1000 still fits 32 bits
                 ["train.sample_tokens=0"]):  # no sample: what the sample_prompt error tells the user to set
        validate(load(["--preset", "tiny", *(x for kv in sets for x in ("--set", kv))]), 8)


def test_cli_exits_before_compiling_with_the_line(monkeypatch):
    compiled = []
    monkeypatch.setattr(train_lm, "train", lambda *a: compiled.append(a))
    with pytest.raises(SystemExit) as e:
        train_lm.main(["--preset", "tiny", "--batch", "12"])
    assert str(e.value).startswith("config error: train.batch: 12 rows") and not compiled


def test_cli_runs_off_the_main_thread_without_a_signal_handler(monkeypatch, capsys):
    """main() installs its SIGTERM / SIGINT handler (run_log.Stop) before parsing the arguments, and Python refuses
    handlers off the main thread: run from a thread (a notebook's worker, a job runner) even --help or a config error
    failed with 'signal only works in main thread'. There Stop installs none (one line says so) and main runs."""
    import signal
    import threading

    compiled, got = [], {}
    monkeypatch.setattr(train_lm, "train", lambda *a: compiled.append(a))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(key, argv):
        try:
            train_lm.main(argv)
        except BaseException as e:  # noqa: BLE001  (SystemExit included: what the thread ended with)
            got[key] = e

    for key, argv in (("help", ["--help"]), ("bad", ["--preset", "tiny", "--batch", "12"])):
        t = threading.Thread(target=run, args=(key, argv))
        t.start()
        t.join()
    assert isinstance(got["help"], SystemExit) and got["help"].code == 0, got["help"]
    assert isinstance(got["bad"], SystemExit) and str(got["bad"]).startswith("config error: train.batch: 12 rows"), \
        got["bad"]
    assert not compiled and {s: signal.getsignal(s) for s in before} == before
    assert "not the main thread, so no SIGTERM / SIGINT handler" in capsys.readouterr().out
    stop = run_log.Stop()  # on the main thread it installs its handler, as before
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        stop.restore()


def test_a_second_job_on_a_train_out_in_use_is_refused_before_any_work(tmp_path, monkeypatch):
    """Two jobs on one train.out (a double launch, a requeue while the first still ran) both ended 0: the second set
    the first's metrics.jsonl aside as 'a run with no checkpoint' while the first went on writing it, both wrote
    tb/ events of the same steps, and the last to save each step owned ckpt/ (the first's summary named checkpoints
    of the other's run). The second is refused at once, naming the directory and the job holding it."""
    import socket

    from data.run_lock import DirLocked, RunLock

    out = tmp_path / "run"
    ran = []

    def fake_train(cfg, mesh_shape, stop):  # past the lock (the training itself is not this test's)
        with pytest.raises(DirLocked):  # held for the job's lifetime
            RunLock(out, "probe")
        ran.append(cfg.train.out)
        return {}

    monkeypatch.setattr(train_lm, "_train", fake_train)
    argv = ["--preset", "tiny", "--out", str(out)]
    holder = RunLock(out, "experiments.train_lm")  # this test process is the running job
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(SystemExit) as e:
        train_lm.main(argv)
    assert re.fullmatch(rf"train.out: {re.escape(str(out))} is in use by another job: pid "
                        rf"{os.getpid()} on host {re.escape(socket.gethostname())} \(experiments.train_lm, started "
                        r"[^)]+\); .* Wait for it, stop it, or use another --out", str(e.value)), str(e.value)
    assert not ran and sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    holder.release()
    train_lm.main(argv)  # released: runs, twice in one process (a resume), each releasing the lock on return
    train_lm.main(argv)
    assert ran == [str(out)] * 2
    RunLock(out, "next").release()


def test_cli_refuses_a_mesh_whose_batch_rows_do_not_split_over_the_processes(monkeypatch):
    """Two processes (faked: the first 4 devices this one's) with a stage axis outermost: each process's devices
    hold the whole batch; the loader failed in the first step with advice (make_mesh's dcn=) the CLI has not."""
    from parallel import distributed

    compiled = []
    monkeypatch.setattr(train_lm, "train", lambda *a: compiled.append(a))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_devices", lambda: jax.devices()[:4])
    monkeypatch.setattr(distributed, "initialize", lambda: None)
    monkeypatch.setattr(distributed, "check_same_settings", lambda *a: None)
    with pytest.raises(SystemExit) as e:
        train_lm.main(["--preset", "tiny", "--mesh", "stage=2,fsdp=4", "--set", "model.n_layers=4"])
    assert str(e.value).startswith("config error: mesh {'stage': 2, 'fsdp': 4}: this process's devices hold rows "
                                   "[0, 8)")
    assert "the outermost axis must split the batch" in str(e.value) and "--mesh data=2," in str(e.value)
    assert not compiled
    train_lm.main(["--preset", "tiny", "--mesh", "data=2,stage=2,fsdp=2", "--set", "model.n_layers=4"])
    assert len(compiled) == 1


def test_presets_and_overrides_compose():
    cfg = load(["--preset", "demo", "--set", "train.steps=50", "--lr", "1e-3", "--set", "model.moe.n_experts=8",
                "--mesh", "data=1,fsdp=-1", "--set", "train.poison_steps=3"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.moe.n_experts, cfg.train.poison_steps) == (50, 1e-3, 8, (3,))
    assert validate(cfg, 8) == {"data": 1, "fsdp": 8}
    assert cfg.model.attn_pattern == "alternating" and cfg.model.layer_windows()[0] == 32 and cfg.model.moe
    for name in ("llama7b", "mixtral8x7b"):  # AOT shapes: valid on their own meshes
        big = load(["--preset", name])
        validate(big, int(np.prod(list(big.mesh.values()))))
    assert abs(load(["--preset", "llama7b"]).model.param_count() / 6.74e9 - 1) < 0.01
    assert abs(load(["--preset", "mixtral8x7b"]).model.param_count() / 46.7e9 - 1) < 0.01


def test_an_out_that_is_a_runs_checkpoint_directory_is_refused(tmp_path):
    """--out runs/x/ckpt (meaning to resume runs/x) started a fresh run inside the checkpoint directory, silently."""
    run = tmp_path / "run"
    for step in (4, 8, 12):
        (run / "ckpt" / str(step) / "meta").mkdir(parents=True)
    with pytest.raises(ConfigError, match=re.escape(f"train.out: '{run / 'ckpt'}' holds checkpoint steps (4, 8, 12): "
                                                    f"it is a run's ckpt/ directory; pass the run's own directory, "
                                                    f"'{run}'")):
        validate(load(["--preset", "tiny", "--out", str(run / "ckpt")]), 8)
    assert validate(load(["--preset", "tiny", "--out", str(run)]), 8)  # the run's directory: resumed


def test_an_out_whose_ckpt_is_a_file_is_refused_before_training(tmp_path):
    """A file named ckpt in train.out: the run trained up to its first save_every step, then failed there
    (NotADirectoryError from orbax's writer), every step lost; a rerun did the same."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt").write_text("x")
    with pytest.raises(ConfigError, match=re.escape(f"train.out: '{run / 'ckpt'}' is a file; name a directory")):
        validate(load(["--preset", "tiny", "--out", str(run)]), 8)


def test_short_flags_and_set_apply_in_command_line_order():
    """--mesh / --steps are --set mesh= / train.steps=: the last of a key wins across both forms, and a --set of one
    mesh axis after --mesh adds to it (the short flags were applied after every --set, dropping mesh.tensor=2)."""
    assert load(["--preset", "tiny", "--mesh", "fsdp=-1", "--set", "mesh.tensor=2"]).mesh == {"fsdp": -1, "tensor": 2}
    assert load(["--preset", "tiny", "--set", "mesh.tensor=2", "--mesh", "fsdp=-1"]).mesh == {"fsdp": -1}
    assert load(["--preset", "tiny", "--steps", "10", "--set", "train.steps=50"]).train.steps == 50
    assert load(["--preset", "tiny", "--set", "train.steps=50", "--steps", "10"]).train.steps == 10
    # so is a nested config turned off after some of its fields: the later none wins, as the later --mesh does
    # (the fields were applied to MoEConfig's defaults: the "dense" run trained 8 experts)
    off = ["--preset", "demo", "--set", "model.moe.top_k=1"]
    assert load([*off, "--set", "model.moe=none"]).model.moe is None
    on = load([*off, "--set", "model.moe=none", "--set", "model.moe.n_experts=2", "--set", "model.moe.top_k=1"])
    assert (on.model.moe.n_experts, on.model.moe.top_k) == (2, 1)


def test_set_converts_to_the_declared_type():
    cfg = load(["--preset", "tiny", "--set", "train.keep_best=false", "--set", "train.async_save=FALSE",
                "--set", "train.steps=1e3", "--set", "optim.grad_accum=2.0", "--set", "train.eval_target=none",
                "--set", "data.max_files=None", "--set", "train.out=123", "--set", "optim.lr=1", "--set",
                "model.remat=none", "--set", "train.poison_steps=[3, 5]", "--set", "model.scan_unroll=true",
                "--set", "data.cache_dir=null"])
    assert cfg.train.keep_best is False and cfg.train.async_save is False  # not the truthy string 'false'
    assert cfg.train.steps == 1000 and type(cfg.train.steps) is int and cfg.optim.grad_accum == 2
    # null, as the saved config.json spells None (a str | None field took it as the directory 'null')
    assert cfg.train.eval_target is None and cfg.data.max_files is None and cfg.data.cache_dir is None
    assert cfg.train.out == "123" and cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.model.remat == "none"  # a Literal value, not None: the field is not optional
    assert cfg.train.poison_steps == (3, 5) and cfg.model.scan_unroll is True
    assert validate(load(["--preset", "tiny", "--set", "model.n_layers=4", "--mesh", "stage=2,fsdp=4"]), 8) == {
        "stage": 2, "fsdp": 4}
    # an optional nested config that is off starts from its defaults (tiny has neither MoE nor RoPE scaling)
    on = load(["--preset", "tiny", "--set", "model.moe.n_experts=4", "--set", "model.moe.expert_mlp_dim=32",
               "--set", "model.rope_scaling.factor=2"])
    assert (on.model.moe.n_experts, on.model.moe.expert_mlp_dim, on.model.moe.top_k) == (4, 32, MoEConfig().top_k)
    assert on.model.rope_scaling.factor == 2.0 and on.model.rope_scaling.kind == "llama3"


def test_specs_built_in_python_are_checked_against_their_types():
    """--set converts to the declared types, but a DataSpec / OptimSpec / TrainSpec built in Python went to validate,
    which compared its fields as numbers only: eval_every=2.5 evaluated at steps 5, 10, ... only, keep_best='no'
    kept the best, steps=12.5 failed in range() after compiling, lr=inf trained to NaN."""
    import pathlib

    from experiments.config import DataSpec, OptimSpec, TrainSpec, preset

    for spec, kw, says in ((TrainSpec, dict(eval_every=2.5), "train.eval_every: must be an int, got 2.5"),
                           (TrainSpec, dict(steps=12.5), "train.steps: must be an int"),
                           (TrainSpec, dict(keep_best="no"), "train.keep_best: must be True or False, got 'no'"),
                           (TrainSpec, dict(out=None), "train.out: must be a string, got None"),
                           (TrainSpec, dict(eval_target=math.inf), "train.eval_target: must be a finite number or"),
                           (OptimSpec, dict(lr=math.inf), "optim.lr: must be a finite number, got inf"),
                           (OptimSpec, dict(grad_accum=True), "optim.grad_accum: must be an int, got True"),
                           (DataSpec, dict(eval_batches=1.5), "data.eval_batches: must be an int"),
                           (DataSpec, dict(cache_dir=0), "data.cache_dir: must be a string or None, got 0")):
        with pytest.raises(ConfigError, match="^" + re.escape(says)):
            spec(**kw)
    # numpy numbers and paths are kept, as Python's types: the config goes to JSON with every checkpoint
    t = TrainSpec(steps=np.int64(12), out=pathlib.Path("runs/x"), eval_target=np.float32(3.5))
    assert (t.steps, t.out, t.eval_target) == (12, "runs/x", 3.5) and type(t.steps) is int
    cfg = dataclasses.replace(preset("tiny"), train=t, optim=OptimSpec(lr=1))
    assert json.loads(cfg.to_json())["train"]["steps"] == 12 and type(cfg.optim.lr) is float
    # the mesh too (8 // np.int64(2) in a sweep): it validated, then to_json failed at the first checkpoint
    cfg = dataclasses.replace(preset("tiny"), mesh={"data": np.int64(2), "fsdp": 8 // np.int64(2)})
    assert validate(cfg, 8) == {"data": 2, "fsdp": 4} and json.loads(cfg.to_json())["mesh"] == {"data": 2, "fsdp": 4}
    assert RunConfig.from_json(cfg.to_json()) == cfg
    # --set names the same key
    with pytest.raises(ConfigError, match=r"^train\.keep_best: expected true or false"):
        load(["--preset", "tiny", "--set", "train.keep_best=no"])


def test_decay_mask_by_name_not_ndim():
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_dim=32, qkv_bias=True,
                            moe=MoEConfig(4, 2, 16), moe_every=2)
    _, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(state))}
    off = {k for k, v in flat.items() if not v}
    assert "['blocks']['attn_norm'].value" in off  # stacked [L, D]: ndim 2, still no decay
    assert "['moe_blocks']['moe']['router_bias'].value" in off and "['blocks']['bq'].value" in off
    assert "['final_norm'].value" in off
    assert flat["['blocks']['wq'].value"] and flat["['moe_blocks']['moe']['w_up'].value"] and flat["['embed'].value"]
    assert len(off) == 12  # 2 stacks × (2 norms + 3 biases) + final_norm + router_bias


def test_optimizer_is_clipped_adamw_with_masked_decay_against_float64():
    """make_optimizer == a float64 NumPy AdamW on gradients clipped to the global norm, decay on weights only, lr from
    the warmup + cosine formula. Gradient norms alternate far above and below clip_norm, so the moments see clipped
    gradients (Adam's scale invariance hid a missing clip: nothing checked it)."""
    lr, steps, warm, wd, clip, b1, b2, floor = 1e-2, 6, 2, 0.1, 1.0, 0.9, 0.95, 0.1
    opt = make_optimizer(lr, steps, warm, weight_decay=wd, clip_norm=clip, b1=b1, b2=b2, min_lr_ratio=floor)
    rng = np.random.default_rng(0)
    ref = {"wq": rng.standard_normal((4, 3)), "attn_norm": 1 + 0.1 * rng.standard_normal(3)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in ref.items()}
    state = opt.init(params)
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    for c, size in enumerate((50.0, 0.3, 20.0, 0.5, 8.0, 0.1)):
        g = {k: size * rng.standard_normal(x.shape) / np.sqrt(15) for k, x in ref.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        eta = lr * c / warm if c < warm else lr * (floor + (1 - floor) * 0.5 * (
            1 + np.cos(np.pi * (c - warm) / (steps - 1 - warm))))
        for k in ref:
            gk = g[k] * min(1.0, clip / norm)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            u = (m[k] / (1 - b1 ** (c + 1))) / (np.sqrt(v[k] / (1 - b2 ** (c + 1))) + 1e-8)
            ref[k] = ref[k] - eta * (u + (wd * ref[k] if k == "wq" else 0.0))
        updates, state = opt.update({k: jnp.asarray(x, jnp.float32) for k, x in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in ref:
            np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} step {c}")


def test_bf16_params_get_the_float32_params_optimizer():
    """Adam's moments stay float32 for bf16 parameters. With gradients that do not depend on the parameters (and no
    weight decay) the updates are those of float32 parameters, exactly; with optax's moments in bf16 (the params'
    dtype), nu stopped decaying at b2 = 0.999 and the updates drifted far from them."""
    opt = make_optimizer(1e-2, total_steps=300, warmup_steps=0, weight_decay=0.0, b2=0.999, clip_norm=1e9)
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.bfloat16)}
    grads = lambda i: {"w": g["w"] * (0.02 if i > 100 else 1.0)}  # noqa: E731  (nu must decay after step 100)
    runs = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        params = {"w": jnp.ones((8, 8), dtype)}
        state = opt.init(params)
        floats = {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {jnp.dtype(jnp.float32)}
        step = jax.jit(lambda p, s, gr: opt.update(gr, s, p))
        for i in range(300):
            u, state = step(params, state, grads(i))
            params = optax.apply_updates(params, u)
        assert params["w"].dtype == dtype
        runs[dtype] = u["w"]
    np.testing.assert_array_equal(runs[jnp.bfloat16], runs[jnp.float32])


def test_weight_decay_of_bf16_params_is_that_of_their_float32_values():
    """float32_state feeds the optimizer float32 copies of bf16 parameters too, not only of the gradients: AdamW's
    decay term wd·p then is that of the float32 values (fed as bf16, wd·p was rounded to bf16: updates 2e-5 off)."""
    opt = make_optimizer(1e-2, total_steps=20, warmup_steps=0, weight_decay=0.1, clip_norm=1e9)
    rng = np.random.default_rng(0)
    w = jnp.asarray(3 * rng.standard_normal((8, 8)), jnp.bfloat16)
    g = {"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.bfloat16)}
    u16, u32 = (opt.update(g, opt.init(p), p)[0]["w"] for p in ({"w": w}, {"w": w.astype(jnp.float32)}))
    np.testing.assert_array_equal(u16, u32)


def test_schedules():
    """By optimizer count: 0 is the first update, 99 the last of 100; the last one gets min_lr_ratio·lr."""
    cos = make_schedule(1.0, 100, 10, "cosine", 0.1)
    wsd = make_schedule(1.0, 100, 10, "wsd", 0.1, decay_frac=0.2)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0) and float(cos(99)) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 40 / 89))  # cosine over counts 10..99
    assert float(cos(50)) == pytest.approx(mid)
    assert [float(wsd(s)) for s in (5, 10, 50, 79, 80)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert float(wsd(90)) == pytest.approx(1 - 0.9 * 10 / 19) and float(wsd(99)) == pytest.approx(0.1)
    for kind in ("cosine", "wsd"):  # no warmup: the first update gets the full lr
        s = make_schedule(1.0, 100, 0, kind, 0.1)
        assert float(s(0)) == pytest.approx(1.0) and float(s(99)) == pytest.approx(0.1)
    short = make_schedule(1.0, 9, 2, "wsd", 0.1, decay_frac=0.1)  # round(0.9) = 1 update of decay: still reached
    assert [float(short(s)) for s in (1, 7, 8)] == pytest.approx([0.5, 1.0, 0.1])
    # round(13 · 0.2) = round(2.6) = 3 updates of decay (10, 11, 12), not int(2.6) = 2
    odd = make_schedule(1.0, 13, 0, "wsd", 0.1, decay_frac=0.2)
    assert [float(odd(s)) for s in (9, 10, 11, 12)] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    # a warmup reaching into the decay window: the decay shortens and still ends on the last update (it ended
    # mid-decay: lr 0.4 at the last of 35 updates with warmup 30)
    for total, warm in ((35, 30), (100, 90), (10, 9)):
        overlap = make_schedule(1.0, total, warm, "wsd", 0.1, decay_frac=0.2)
        assert float(overlap(warm - 1)) < 1.0 and float(overlap(total - 1)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="leaves no update"):  # cosine after a warmup up to the last update
        make_schedule(1.0, 35, 34, "cosine", 0.1)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_the_trainers_optimizer_steps_at_the_lr_it_logs(kind):
    """train_lm builds the optimizer and the schedule it logs separately: the optimizer's lr must be that schedule's
    at every update. Adam's step on a constant gradient is lr·sign(g) (m̂ = g, v̂ = g²) and a norm scale takes no
    decay, so the update's size is the lr the optimizer used (a total or a kind passed to only one of the two
    went unnoticed: the logged-lr test recomputes the formula, never the optimizer's step)."""
    cfg = load(["--preset", "tiny", "--set", "train.steps=12", "--set", f"optim.schedule={kind}"])
    o, t = cfg.optim, cfg.train
    opt, sched = train_lm._optimizer(cfg)
    params = {"attn_norm": jnp.ones(3)}
    state = opt.init(params)
    grads = {"attn_norm": jnp.asarray([1e-3, -2e-3, 5e-4])}  # below clip_norm: unclipped
    for c in range(t.steps):
        updates, state = opt.update(grads, state, params)
        want = o.lr * c / o.warmup_steps if c < o.warmup_steps else float(sched(c))
        np.testing.assert_allclose(-np.asarray(updates["attn_norm"]) / np.sign(np.asarray(grads["attn_norm"])),
                                   float(sched(c)), rtol=1e-4, atol=1e-9, err_msg=f"update {c}")
        assert float(sched(c)) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert float(sched(t.steps - 1)) == pytest.approx(o.lr * o.min_lr_ratio)  # the last update ends the decay


def test_a_warmup_as_long_as_the_run_is_refused_by_wsd_too():
    """make_schedule(1, 10, 20, 'wsd') (the schedule cosine's refusal suggested) ramped to 0.45·lr at the last update,
    never reaching the peak nor min_lr_ratio·lr; warmup 10 of 10 ended at 0.9·lr. Both are refused as cosine's is;
    the longest warmup that still ends on min_lr_ratio·lr (total - 1) is kept."""
    for warm in (10, 20):
        with pytest.raises(ValueError, match=f"warmup_steps={warm} leaves no update of the 10 .*use at most 9"):
            make_schedule(1.0, 10, warm, "wsd", 0.1)
        with pytest.raises(ValueError, match=f"warmup_steps={warm} .*use at most 8\\)?$"):  # wsd takes no more
            make_schedule(1.0, 10, warm, "cosine", 0.1)
    assert float(make_schedule(1.0, 10, 9, "wsd", 0.1)(9)) == pytest.approx(0.1)


@pytest.mark.parametrize("kw, says", [
    # clip_norm=0 (read as "no clipping") zeroed every gradient: only the weight decay moved the weights
    (dict(clip_norm=0.0), "clip_norm=0.0 must be a positive number"),
    (dict(clip_norm=-1.0), "clip_norm=-1.0 must be a positive number"),  # flipped the gradient: ascent
    (dict(clip_norm=None), "clip_norm=None must be a positive number"),  # a TypeError inside jit at the first update
    (dict(b2=1.0), "b2=1.0 must be in [0, 1)"),  # bias correction 1 / (1 - b2^t): NaN weights after the first update
    (dict(b1=-0.1), "b1=-0.1 must be in [0, 1)"),
    (dict(lr=-1e-3), "lr=-0.001 must be a finite number >= 0"),  # gradient ascent at every step
    (dict(lr=math.nan), "lr=nan must be a finite number >= 0"),
    (dict(min_lr_ratio=-0.5), "min_lr_ratio=-0.5 must be in [0, 1]"),  # a negative lr (ascent) at the end
    (dict(min_lr_ratio=2.0), "min_lr_ratio=2.0 must be in [0, 1]"),  # the "decay" doubled the lr
    (dict(decay_frac=0.0, schedule="wsd"), "decay_frac=0.0 must be in (0, 1]"),
    (dict(decay_frac=1.5, schedule="wsd"), "decay_frac=1.5 must be in (0, 1]"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 must be a finite number >= 0"),  # weights grew
    (dict(total_steps=0), "total_steps=0 must be an int >= 1"),
    (dict(total_steps=10.5), "total_steps=10.5 must be an int >= 1"),
    (dict(warmup_steps=-3), "warmup_steps=-3 must be an int >= 0"),  # taken as 0
    (dict(warmup_steps=2.5), "warmup_steps=2.5 must be an int >= 0"),
])
def test_make_optimizer_refuses_bad_settings_naming_the_argument(kw, says):
    """make_optimizer / make_schedule called directly (benchmarks, mup_transfer, train_video, your own loop) took
    each of these silently (run config validation guards train_lm only): gradient ascent, no learning, NaN weights
    after the first update, or another schedule than the one asked for."""
    args = dict(lr=1e-2, total_steps=10, warmup_steps=1)
    args.update(kw)
    with pytest.raises(ValueError, match="^make_optimizer: " + re.escape(says)):
        make_optimizer(**args)
    # the bounds themselves and numpy numbers are kept: no clipping (inf), lr 0, betas 0, a floor of 0 or 1
    for ok in (dict(clip_norm=math.inf), dict(lr=0.0), dict(b1=0.0, b2=np.float32(0.999)), dict(min_lr_ratio=0.0),
               dict(min_lr_ratio=1.0), dict(decay_frac=1.0, schedule="wsd"), dict(total_steps=np.int64(1),
                                                                                  warmup_steps=0)):
        make_optimizer(**{**dict(lr=1e-2, total_steps=10, warmup_steps=1), **ok})
    with pytest.raises(ValueError, match=r"^make_schedule: lr=-1 must be a finite number >= 0"):
        make_schedule(-1, 10, 1)


def test_make_optimizer_warns_of_a_weight_decay_that_flips_the_weights():
    """Decoupled decay scales each decayed weight by 1 - lr·weight_decay an update: weight_decay=100 at lr 0.01 (an
    L2 coefficient's habit) zeroed every matrix at the first update, silently. Warned (a run made to diverge is one
    way to get there); usual settings say nothing."""
    p = {"w": jnp.ones((2, 2))}
    for lr, wd, factor in ((1e-2, 100.0, "0"), (2.0, 1.0, "-1")):
        with pytest.warns(UserWarning, match=re.escape(f"weight_decay={wd} with lr={lr} scales the decayed weights by "
                                                       f"1 - lr·weight_decay = {factor} an update")):
            opt = make_optimizer(lr, total_steps=10, warmup_steps=0, weight_decay=wd, clip_norm=1e9)
        u = opt.update({"w": jnp.zeros((2, 2))}, opt.init(p), p)[0]["w"]
        np.testing.assert_allclose(p["w"] + u, float(factor) * p["w"], atol=1e-6)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_optimizer(3e-3, total_steps=10, warmup_steps=0, weight_decay=0.1)


def test_make_optimizer_takes_a_jax_scalar_lr_as_before():
    """make_optimizer's argument checks refused lr=jnp.float32(1e-3) (a 0-d jax array, not a numbers.Real) as
    "must be a finite number >= 0", where it trained before them: a 0-d array is its number; others stay refused."""
    p = {"w": jnp.ones(3)}
    want, got = (make_optimizer(lr, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=jnp.float32(1.0))
                 for lr in (1e-2, jnp.float32(1e-2)))
    u_want, u_got = (o.update({"w": jnp.full(3, 0.5)}, o.init(p), p)[0]["w"] for o in (want, got))
    np.testing.assert_allclose(u_got, u_want, rtol=1e-6)
    assert float(make_schedule(jnp.asarray(1.0), np.int32(10), jnp.int32(2))(5)) == pytest.approx(
        float(make_schedule(1.0, 10, 2)(5)))
    for bad in (jnp.ones(2), jnp.asarray(True), jnp.float32(-1.0)):
        with pytest.raises(ValueError, match="^make_optimizer: lr="):
            make_optimizer(bad, total_steps=10, warmup_steps=1)
    with pytest.raises(ValueError, match="^make_optimizer: total_steps="):
        make_optimizer(1e-3, total_steps=jnp.float32(10.0), warmup_steps=1)


def test_make_optimizer_takes_a_traced_lr_for_a_sweep_under_vmap_or_jit():
    """An lr (or other float setting) traced by jax.vmap / jax.jit, as in a vmapped lr sweep, cannot be checked by
    value: the checks refused it ("lr=VmapTracer(...) must be a finite number >= 0") where optax takes it and it
    trained before them. It steps as its concrete value; traced step counts (Python control flow) stay refused."""
    p, g = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}

    def update(lr, clip_norm=1.0):
        o = make_optimizer(lr, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=clip_norm)
        return o.update(g, o.init(p), p)[0]["w"]

    np.testing.assert_allclose(jax.vmap(update)(jnp.array([1e-2, 1e-3])), [[-1e-2] * 3, [-1e-3] * 3], rtol=1e-5)
    np.testing.assert_allclose(jax.jit(update)(1e-2, 2.0), [-1e-2] * 3, rtol=1e-5)
    with pytest.raises(ValueError, match="^make_optimizer: total_steps="):
        jax.jit(lambda t: make_optimizer(1e-3, total_steps=t, warmup_steps=0).init(p))(10)


def test_grad_accumulation_equals_one_big_batch():
    cfg = load(["--preset", "tiny", "--set", "train.steps=4"])
    mesh = make_mesh({"fsdp": -1})
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 256, (16, 32), dtype=np.int32),
             "targets": rng.integers(0, 256, (16, 32), dtype=np.int32),
             "weights": (rng.random((16, 32)) > 0.3).astype(np.float32)}  # uneven token counts per microbatch
    out = {}
    graphdef, opt, sched, state0 = train_lm.init_state(cfg, mesh)
    for accum in (1, 2):
        state = jax.tree.map(jnp.copy, state0)  # the step donates its input
        step = make_state_step(graphdef, opt, sched, None, accum)
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, m = step(state, jax.tree.map(jnp.asarray, batch))
        out[accum] = (jax.device_get(state["params"]), float(m["loss"]), float(m["grad_norm"]))
    # token-weighted: the microbatches' uneven token counts combine into the big batch's mean and gradient
    assert out[1][1:] == pytest.approx(out[2][1:], rel=1e-5)
    # Adam divides by sqrt(v): a near-zero gradient entry may move by up to ~lr either way, so compare loosely
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), out[1][0], out[2][0])


def test_bf16_microbatch_gradients_are_summed_in_float32():
    """grad_accum sums bf16 parameters' microbatch gradients in float32 and rounds once: the optimizer is given
    bf16(Σ_k g_k) / Σ w, the float64 sum of the same microbatch gradients rounded to bf16 (summed in bf16, 40 % of
    the entries were off, up to 2.5x where the microbatches cancel; no test used bf16 with grad_accum)."""
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16,
                            param_dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    accum = 8
    tok = np.random.default_rng(0).integers(0, 64, (accum, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}

    def nll_sum(p, mb):
        mean, n = cross_entropy(nnx.merge(graphdef, p)(mb["inputs"]), mb["targets"], None)
        return mean * n

    grad_f = jax.jit(jax.grad(nll_sum))
    grads = [grad_f(params, jax.tree.map(lambda x: x[k::accum], batch)) for k in range(accum)]  # rows k::A
    want = jax.tree.map(lambda *g: np.asarray(jnp.asarray(np.sum(np.asarray(g, np.float64), 0), jnp.bfloat16),
                                              np.float64) / tok[:, 1:].size, *grads)
    # an optimizer whose state is the gradient it was given (its update: none)
    given = optax.GradientTransformation(lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
                                         lambda u, s, p=None: (jax.tree.map(jnp.zeros_like, u),
                                                               jax.tree.map(lambda x: x.astype(jnp.float32), u)))
    state = {"params": params, "opt_state": given.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    got = make_state_step(graphdef, given, None, None, accum)(state, batch)[0]["opt_state"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2 ** -8, atol=0), got,
                 want)


def test_a_finite_loss_with_an_overflowing_gradient_norm_is_skipped():
    """Exploding gradients overflow the norm while the loss stays finite: the step is skipped like a NaN loss (the
    NaN-batch hook poisons the loss too, so skipping on the loss alone passed every test), and the logged lr is
    the schedule's at the updates made (step - skipped)."""
    cfg = load(["--preset", "tiny", "--set", "train.steps=4"])
    mesh = make_mesh({"fsdp": -1})
    graphdef, opt, sched, state = train_lm.init_state(cfg, mesh)
    norm = state["params"]["final_norm"]  # |dW_head|² sums past float32 (set in place: the state's own tree)
    norm.set_value(norm[...] * 1e24)
    before = jax.device_get(state["params"])
    rng = np.random.default_rng(0)
    # the shapes of test_grad_accumulation_equals_one_big_batch's batch (weights included): its program
    batch = {"inputs": rng.integers(0, 256, (16, 32), dtype=np.int32),
             "targets": rng.integers(0, 256, (16, 32), dtype=np.int32), "weights": np.ones((16, 32), np.float32)}
    step = make_state_step(graphdef, opt, sched, None, 1)
    with jax.set_mesh(mesh):
        state, m = step(state, jax.tree.map(jnp.asarray, batch))
        assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"])) and not bool(m["finite"])
        assert int(state["skipped"]) == 1 and int(state["step"]) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)
        state, m = step(state, jax.tree.map(jnp.asarray, batch))
    assert float(m["lr"]) == pytest.approx(float(sched(0)))  # the second step makes the first update


@pytest.mark.parametrize("accum", [1, 2])
def test_a_step_without_weighted_tokens_makes_no_update(accum):
    """An SFT batch whose targets all weigh 0 (prompts only, answers cut) has loss 0 and a zero gradient, but the
    optimizer still stepped: Adam's momentum from the step before and the weight decay moved every weight by ~lr,
    and the schedule went on. It is skipped as a non-finite step is (state kept, skipped + 1), with a finite loss."""
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(1e-2, 10, 0, weight_decay=0.1)
    sched = make_schedule(1e-2, 10, 0)
    tok = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    full = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]), "weights": jnp.ones((4, 16))}
    step = make_state_step(graphdef, opt, sched, None, accum)
    state, _ = step(init_train_state(params, opt), full)
    before = jax.device_get({k: state[k] for k in ("params", "opt_state")})
    state, m = step(state, dict(full, weights=jnp.zeros((4, 16))))
    assert (float(m["loss"]), float(m["tokens"]), bool(m["finite"])) == (0.0, 0.0, True)
    assert (int(state["step"]), int(state["skipped"])) == (2, 1)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get({k: state[k] for k in ("params", "opt_state")}),
                 before)
    _, m = step(state, full)
    assert float(m["lr"]) == pytest.approx(float(sched(1)))  # the third step makes the second update


def test_fractional_weights_summing_below_one_average_by_their_total():
    """The step's loss is Σ w·nll / Σ w for any weights, also when Σ w < 1 (a total clamped to at least 1 passed
    every test: their weights summed to whole token counts)."""
    from flax import nnx

    cfg = load(["--preset", "tiny", "--set", "train.steps=4"])
    mesh = make_mesh({"fsdp": -1})
    graphdef, opt, sched, state = train_lm.init_state(cfg, mesh)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 256, (16, 33), dtype=np.int32)  # test_grad_accumulation_equals_one_big_batch's shapes
    weights = np.zeros((16, 32), np.float32)
    weights[0, 3] = weights[5, 17] = 0.25
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": weights}
    # the model's logits (one program, not one per eager operation), then a float64 log-softmax of them
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    logits = np.asarray(jax.device_get(forward(state["params"], jnp.asarray(tok[:, :-1]))), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, tok[:, 1:, None], -1)[..., 0]
    step = make_state_step(graphdef, opt, sched, None, 1)
    with jax.set_mesh(mesh):
        _, m = step(state, jax.tree.map(jnp.asarray, batch))
    assert float(m["loss"]) == pytest.approx((nll[0, 3] + nll[5, 17]) / 2, rel=1e-5)


def test_eval_sums_add_up_to_an_exact_mean_over_batches():
    """make_eval_sums gives (Σ w·nll, Σ w) of a batch, which the trainer's evaluation sums over its held-out batches
    before dividing: the mean over all their tokens. A per-batch mean in place of the sum gave a light batch (short
    documents, padding) the weight of a full one."""
    from experiments.lm_step import make_eval_sums

    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 64, (2, 17), dtype=np.int32)
    weights = (rng.random((2, 16)) > 0.5).astype(np.float32)
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tok[:, :-1])), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, tok[:, 1:, None], -1)[..., 0]
    total, n = make_eval_sums(graphdef)(params, {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": weights})
    assert float(n) == weights.sum() and float(total) == pytest.approx((weights * nll).sum(), rel=1e-5)


def test_eval_runs_the_train_steps_microbatches_so_a_run_grad_accum_made_fit_evaluates(tmp_path, monkeypatch):
    """train_lm sized with optim.grad_accum (experiments.aot's advice when a step does not fit) evaluated each
    held-out batch in one forward, logits of every row at once: out of memory at the first eval (measured 3.7x a
    grad_accum 8 step's temporaries). Eval now runs the step's microbatches: the same sums on a mesh, less memory."""
    from experiments.lm_step import make_eval_sums

    cfg = TransformerConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=32)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 512, (8, 33), dtype=np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": (rng.random((8, 32)) > 0.3).astype(np.float32)}
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        one, four = make_eval_sums(graphdef), make_eval_sums(graphdef, 4)
        (s1, n1), (s4, n4) = one(params, batch), four(params, batch)
        temp = [f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes for f in (one, four)]
    assert float(n4) == float(n1) == batch["weights"].sum() and float(s4) == pytest.approx(float(s1), rel=1e-6)
    assert temp[1] < temp[0] / 2, temp
    with pytest.raises(ValueError, match="make_eval_sums: grad_accum=3 must divide the batch's 8 rows"):
        make_eval_sums(graphdef, 3)(params, batch)

    import experiments.lm_step as lm_step

    asked = []

    def stop_at_eval(graphdef, grad_accum=1):  # the run's wiring only: stop before anything compiles
        asked.append(grad_accum)
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_step, "make_eval_sums", stop_at_eval)
    with pytest.raises(KeyboardInterrupt):
        train_lm.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--batch", "16", "--set",
                      "optim.grad_accum=2"])
    assert asked == [2]


def test_eval_microbatches_of_a_capacity_moe_drop_the_tokens_one_batch_drops():
    """make_eval_sums' docstring said a capacity MoE evaluated under grad_accum routed each microbatch on its own (so
    dropped other tokens than one batch). Capacity dispatch routes each row on its own: the same tokens drop at any
    grad_accum, and the eval sums equal one batch's up to summation order (at a capacity that drops half)."""
    from experiments.lm_step import lm_loss_parts, make_eval_sums

    moe = MoEConfig(4, 2, 16, dispatch="capacity", capacity_factor=0.5)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tok = np.random.default_rng(0).integers(0, 64, (8, 17), dtype=np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    assert float(lm_loss_parts(graphdef, params, batch)[2]["dropped_frac"]) > 0.3  # capacity binds
    (s1, n1), (s4, n4) = make_eval_sums(graphdef)(params, batch), make_eval_sums(graphdef, 4)(params, batch)
    assert float(n4) == float(n1) == 8 * 16 and float(s4) == pytest.approx(float(s1), rel=1e-6)


def test_lm_steps_name_a_batch_key_that_is_missing_or_misspelled():
    """A missing key was a bare KeyError ('inputs'), a tuple batch an AttributeError, and a misspelled optional key
    ('segment_id', 'weight') was ignored: padding scored and documents attending to each other, silently. Checked
    at trace time, so an abstract evaluation raises it too; the five keys the loader writes pass."""
    from experiments.lm_step import lm_loss_parts

    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    run = lambda batch: jax.eval_shape(lambda p, b: lm_loss_parts(graphdef, p, b)[0], params, batch)  # noqa: E731
    full = {"inputs": tok, "targets": tok, "positions": tok, "segment_ids": tok,
            "weights": jax.ShapeDtypeStruct((2, 8), jnp.float32)}
    assert run(full).shape == ()
    for batch, match in (({"inputs": tok}, r"batch lacks \['targets'\]:"),
                         ({"input": tok, "targets": tok}, r"lacks \['inputs'\] and has unknown keys \['input'\]"),
                         ({"inputs": tok, "targets": tok, "segment_id": tok}, r"has unknown keys \['segment_id'\]"),
                         ({"inputs": tok, "targets": tok, "weight": tok}, r"has unknown keys \['weight'\]"),
                         ((tok, tok), r"batch must be a dict .* got a tuple")):
        with pytest.raises(ValueError, match=match):
            run(batch)
    opt = make_optimizer(1e-3, 10, 0)  # the trainer's step goes through the same check
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = {"params": params, "opt_state": jax.eval_shape(opt.init, params), "step": scalar, "skipped": scalar,
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    with pytest.raises(ValueError, match=r"has unknown keys \['attention_mask'\]"):
        jax.eval_shape(make_state_step(graphdef, opt), state, {"inputs": tok, "targets": tok, "attention_mask": tok})


def test_resume_compares_the_model_not_how_it_is_executed():
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # noqa: E731  (as RunConfig.to_json)
    saved = as_json(TransformerConfig(d_model=64, n_heads=4))
    saved.pop("attn_block")  # a checkpoint written before this field existed
    now = as_json(TransformerConfig(d_model=64, n_heads=4, remat="full", scan_unroll=True))
    assert train_lm.model_config_mismatch(saved, now) == []
    now["d_model"], now["rope_theta"] = 128, 1e6
    assert train_lm.model_config_mismatch(saved, now) == ["d_model", "rope_theta"]
    moe = as_json(TransformerConfig(d_model=64, n_heads=4, moe=MoEConfig(n_experts=4)))
    other_kernels = as_json(TransformerConfig(d_model=64, n_heads=4, matmul_impl="transposed_grad",
                                              moe=MoEConfig(n_experts=4, dispatch="capacity", dropless_impl="gmm")))
    assert train_lm.model_config_mismatch(moe, other_kernels) == []
    other_kernels["moe"]["n_experts"] = 8
    assert train_lm.model_config_mismatch(moe, other_kernels) == ["moe.n_experts"]


def test_resume_takes_another_init_std():
    """init_std only draws fresh weights, which a resumed run never does (every parameter is restored). An --init-from
    run saved before config_from_hf read config.json's initializer_range holds 0.02: resumed with the same command it
    was refused against the folder's own (e.g. 1/24), naming a setting --init-from refuses to set back."""
    saved = json.loads(load(["--preset", "tiny"]).to_json())
    now = json.loads(load(["--preset", "tiny", "--set", f"model.init_std={1 / 24!r}"]).to_json())
    assert now["model"]["init_std"] != saved["model"]["init_std"]
    assert train_lm.resume_mismatch(saved, now) == ([], [])
    now["model"]["d_model"] = 2 * saved["model"]["d_model"]  # a field that makes other parameters still is
    assert train_lm.resume_mismatch(saved, now)[0] == [f"model.d_model: saved {saved['model']['d_model']}, "
                                                       f"now {now['model']['d_model']}"]


def test_resume_counts_a_model_field_added_since_the_save_as_its_default():
    """A checkpoint written before a model field existed computed with its default: resuming with another value was
    not compared at all (only the saved keys were), so a local_rope_theta, which changes no parameter, resumed an old
    run silently with other attention maths (and a qk_norm failed later on arrays, naming no field)."""
    cfg = load(["--preset", "demo"])  # (MoE layers)
    saved, now = json.loads(cfg.to_json()), json.loads(cfg.to_json())
    for f in ("qk_norm", "local_rope_theta", "qk_norm_scope", "pre_norms"):
        del saved["model"][f]  # as a checkpoint written before they existed holds it
    del saved["model"]["moe"]["renormalize"]
    assert train_lm.resume_mismatch(saved, now) == ([], [])  # their defaults: what that run computed with
    now["model"]["local_rope_theta"], now["model"]["qk_norm"] = 1e4, True
    now["model"]["qk_norm_scope"], now["model"]["pre_norms"] = "all_heads", False  # OLMo 2's (since session 52)
    now["model"]["moe"]["renormalize"] = not now["model"]["moe"]["renormalize"]
    assert train_lm.resume_mismatch(saved, now)[0] == [
        "model.local_rope_theta: saved None, now 10000.0", "model.moe.renormalize: saved True, now False",
        "model.pre_norms: saved True, now False", "model.qk_norm: saved False, now True",
        "model.qk_norm_scope: saved 'head', now 'all_heads'"]


def test_resume_ignores_rope_scaling_fields_added_since_the_save():
    """A nested config is compared field by field (as moe is): a rope_scaling saved before YaRN's fields existed
    (beta_fast ... truncate) was refused whole ("model.rope_scaling: saved {...}, now {...}"), so such a run never
    resumed, though from_json reads it back as the same config."""
    cfg = load(["--preset", "tiny", "--set", "model.rope_scaling.kind=llama3"])
    now = json.loads(cfg.to_json())
    saved = json.loads(cfg.to_json())
    for f in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
        del saved["model"]["rope_scaling"][f]  # as a checkpoint written before they existed holds it
    assert RunConfig.from_json(json.dumps(saved)) == cfg
    assert train_lm.resume_mismatch(saved, now) == ([], [])
    now["model"]["rope_scaling"]["factor"] = 4.0  # a field both have: still refused, by its own key
    assert train_lm.resume_mismatch(saved, now)[0] == ["model.rope_scaling.factor: saved 8.0, now 4.0"]
    now["model"]["rope_scaling"] = None
    assert train_lm.resume_mismatch(saved, now)[0][0].startswith("model.rope_scaling: saved {")


def test_resume_refuses_another_data_stream_and_warns_on_schedule_changes():
    saved = json.loads(load(["--preset", "tiny"]).to_json())
    same = json.loads(load(["--preset", "tiny", "--set", "train.eval_every=2"]).to_json())
    assert train_lm.resume_mismatch(saved, same) == ([], [])
    other = json.loads(load(["--preset", "tiny", "--seq", "16", "--set", "data.max_files=20", "--steps", "20",
                             "--lr", "1e-3", "--set", "data.eval_batches=3"]).to_json())
    refused, warned = train_lm.resume_mismatch(saved, other)
    assert refused == ["train.seq: saved 32, now 16", "data.max_files: saved 40, now 20"]
    assert warned == ["train.steps: saved 12, now 20", "optim.lr: saved 0.01, now 0.001",
                      f"data.eval_batches: saved {saved['data']['eval_batches']}, now 3"]
    # another held-out tier: evaluations (the best checkpoint, eval_target) compare other averages from here on
    own, moved = json.loads(json.dumps(saved)), json.loads(json.dumps(saved))
    own["data"]["eval_dir"], moved["data"]["eval_dir"] = "held/augmented", "other/augmented"
    assert train_lm.resume_mismatch(own, moved) == ([], ["data.eval_dir: saved 'held/augmented', now "
                                                          "'other/augmented'"])
    # with the run's own train_dir the stdlib corpus's settings choose nothing: a changed data.max_files or
    # eval_every_nth was refused as another stream; they still are where the corpus is read, or train_dir moved
    own["data"]["train_dir"], moved["data"]["train_dir"] = "train/augmented", "train/augmented"
    moved["data"]["max_files"], moved["data"]["eval_every_nth"] = 20, 5
    assert train_lm.resume_mismatch(own, moved)[0] == []
    moved["data"]["train_dir"] = "other/train"
    assert train_lm.resume_mismatch(own, moved)[0] == [
        "data.max_files: saved 40, now 20", "data.eval_every_nth: saved 10, now 5",
        "data.train_dir: saved 'train/augmented', now 'other/train'"]
    # what the model computes (capacity dispatch drops tokens, bf16 rounds) and the eval target: warned, with why
    moe = json.loads(load(["--preset", "tiny", "--set", "model.moe.n_experts=4"]).to_json())
    cap = json.loads(load(["--preset", "tiny", "--set", "model.moe.n_experts=4", "--set", "model.moe.dispatch=capacity",
                           "--set", "model.dtype=bfloat16", "--set", "train.eval_target=3.0"]).to_json())
    refused, warned = train_lm.resume_mismatch(moe, cap)
    assert refused == [] and warned == ["model.dtype: saved 'float32', now 'bfloat16'",
                                        "model.moe.dispatch: saved 'dropless', now 'capacity'",
                                        "train.eval_target: saved None, now 3.0"], warned
    assert [next(v for k, v in train_lm.RESUME_WARNINGS if w.startswith(k)).split()[1] for w in warned] == [
        "model", "model", "time"]
    # the other fields that define the stream: another shuffle, batch shape or tokenization of the same corpus
    other = json.loads(load(["--preset", "tiny", "--seed", "1", "--batch", "16", "--set",
                             "data.tokenizer=tok.json"]).to_json())
    assert train_lm.resume_mismatch(saved, other)[0] == [
        "train.batch: saved 8, now 16", "train.seed: saved 0, now 1", "data.tokenizer: saved None, now 'tok.json'"]
    # a checkpoint from before the corpus was held out by module points into another stream
    older = json.loads(json.dumps(saved))
    del older["data"]["corpus"]
    assert train_lm.resume_mismatch(older, saved)[0] == ["data.corpus: saved 'stdlib-v1', now 'stdlib-v2'"]


def test_a_held_out_tier_edited_in_place_since_the_save_is_warned_about(tmp_path):
    """data.eval_dir was known by its path alone: a held-out shard edited in place (same size, count and ends) since
    the checkpoint resumed in silence, and the eval losses before and after (the best checkpoint, eval_target)
    compared averages over other text. The checkpoint records the held-out loader's key (`eval_stream`); a changed
    one is warned about naming the shard, as a changed eval_dir is; an unedited copy, or a checkpoint saved before the
    key was recorded, is not."""
    import shutil

    from data.loader import LMLoader, LoaderConfig, Source
    from data.shards import DocWriter, iter_docs
    from data.tokenizer import ByteTokenizer

    held_dir = tmp_path / "held" / "augmented"
    w = DocWriter(held_dir / "shard-00000.array_record")
    for i in range(9):
        w.write({"id": str(i), "text": f"held-out document number {i} of nine"})
    w.commit()
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, shuffle=False, num_epochs=1)

    def held():
        return LMLoader([Source(str(held_dir))], ByteTokenizer(add_eos=True), cfg, process_index=0, process_count=1)

    run = json.loads(load(["--preset", "tiny", "--set", f"data.eval_dir={held_dir}",
                           "--set", "data.train_dir=train/augmented"]).to_json())
    meta = {"eval_stream": {k: v for k, v in held().stream.items() if k in train_lm.EVAL_SET_PARTS}}
    assert train_lm.eval_set_changes(meta, held(), run, run) == []
    assert train_lm.eval_set_changes({}, held(), run, run) == []  # (saved before the key was recorded)
    docs = list(iter_docs(held_dir / "shard-00000.array_record"))
    docs[4]["text"] = docs[4]["text"].replace("nine", "NINE")  # the same length
    w = DocWriter(held_dir / "shard-00000.array_record")
    for d in docs:
        w.write(d)
    w.commit()
    changed = train_lm.eval_set_changes(meta, held(), run, run)
    assert len(changed) == 1 and re.match(r"data.eval_dir: the held-out documents changed since the save \(digests: "
                                          r".*shard-00000.array_record was rewritten", changed[0]), changed
    assert next(v for k, v in train_lm.RESUME_WARNINGS if changed[0].startswith(k)).startswith("evaluations average")
    # another eval_dir: warned by resume_mismatch already, not twice
    moved = json.loads(json.dumps(run))
    moved["data"]["eval_dir"] = "other/augmented"
    assert train_lm.eval_set_changes(meta, held(), run, moved) == []
    # the edited tier copied elsewhere, saved over, and the copy resumed: the same documents
    meta = {"eval_stream": {k: v for k, v in held().stream.items() if k in train_lm.EVAL_SET_PARTS}}
    held_dir = pathlib.Path(shutil.copytree(held_dir, tmp_path / "copy" / "augmented"))
    assert train_lm.eval_set_changes(meta, held(), run, run) == []


def test_resume_reads_loader_fields_a_checkpoint_predates_as_their_defaults():
    """A checkpoint saved before data.tokenizer / train_dir (2026-12-01) or eos_token / bos_token (2026-12-02)
    existed was made with what they mean unset (bytes, the stdlib corpus, '<|endoftext|>' or none, no BOS). Such
    a field was compared as the current value, so a resume adding a BOS (or another EOS) went on in silence over
    another stream: those checkpoints' loader states carry no stream key either (measured: a 2026-12-01 run on its
    own tiers and BPE resumed by this version with --set data.bos_token='<s>' trained on, no refusal)."""
    saved = json.loads(load(["--preset", "tiny", "--set", "data.tokenizer=tok.json"]).to_json())
    older = json.loads(json.dumps(saved))
    for f in ("eos_token", "bos_token"):
        del older["data"][f]  # as a checkpoint written before they existed holds it
    assert train_lm.resume_mismatch(older, saved) == ([], [])  # the same stream: resumes
    for key, value in (("bos_token", "<s>"), ("eos_token", "</s>")):
        other = json.loads(json.dumps(saved))
        other["data"][key] = value
        assert train_lm.resume_mismatch(older, other)[0] == [f"data.{key}: saved None, now {value!r}"]
    oldest = json.loads(load(["--preset", "tiny"]).to_json())
    for f in ("corpus", "train_dir", "eval_dir", "tokenizer", "eos_token", "bos_token"):
        del oldest["data"][f]
    now = json.loads(load(["--preset", "tiny", "--set", "data.tokenizer=tok.json"]).to_json())
    assert train_lm.resume_mismatch(oldest, now)[0] == ["data.corpus: saved 'stdlib-v1', now 'stdlib-v2'",
                                                        "data.tokenizer: saved None, now 'tok.json'"]
    # a checkpoint of the stdlib-v2 corpus saved before data.train_dir existed, resumed on tiers of one's own
    stdlib_v2 = json.loads(load(["--preset", "tiny"]).to_json())
    for f in ("train_dir", "eval_dir", "tokenizer", "eos_token", "bos_token"):
        del stdlib_v2["data"][f]
    tiers = json.loads(load(["--preset", "tiny", "--set", "data.train_dir=tiers/train"]).to_json())
    assert train_lm.resume_mismatch(stdlib_v2, tiers)[0] == ["data.train_dir: saved None, now 'tiers/train'"]


def test_resume_warns_that_another_init_from_folder_is_not_loaded():
    """A run resumes from its checkpoint whatever --init-from says: another Hugging Face folder of the same
    architecture (its weights never loaded) resumed in silence, as if fine-tuning it."""
    saved = json.loads(load(["--preset", "tiny", "--set", "train.init_from=hf/a"]).to_json())
    other = json.loads(load(["--preset", "tiny", "--set", "train.init_from=hf/b"]).to_json())
    refused, warned = train_lm.resume_mismatch(saved, other)
    assert refused == [] and warned == ["train.init_from: saved 'hf/a', now 'hf/b'"]
    assert "not from these weights" in next(v for k, v in train_lm.RESUME_WARNINGS if warned[0].startswith(k))
    assert train_lm.resume_mismatch(saved, saved) == ([], [])


def test_a_tokenizer_whose_eos_is_not_endoftext(tmp_path):
    """A Hugging Face style BPE ('</s>'): the trainer had no way to name its EOS (eos_id None: documents packed with
    no separator); data.eos_token names it, and is refused without a tokenizer."""
    from data.tokenizer import train_bpe

    path = tmp_path / "tok.json"
    train_bpe(["one two three four"] * 20, vocab_size=300, special_tokens=("<s>", "</s>"), eos_token="</s>",
              show_progress=False).save(path)
    base = ["--preset", "tiny", "--set", f"data.tokenizer={path}", "--set", "model.vocab_size=320"]
    with pytest.raises(ConfigError, match=r"^data.eos_token: BPETokenizer: none of the special tokens"):
        validate(load(base), 8)
    validate(load([*base, "--set", "data.eos_token=</s>"]), 8)
    assert load_tokenizer(load([*base, "--set", "data.eos_token=</s>"]).data).eos_id == 1
    with pytest.raises(ConfigError, match="^data.eos_token: names a token of data.tokenizer, which is not set"):
        validate(load(["--preset", "tiny", "--set", "data.eos_token=</s>"]), 8)


def test_a_held_out_tier_shorter_than_one_batch_names_the_batch(tmp_path):
    """A held-out tier that fills no whole batch: the error said "fills only 0 batches ...; use at most that many",
    i.e. data.eval_batches=0, which validate refuses. It names train.batch and what to change instead."""
    from data.shards import DocWriter

    for tier, texts in (("train", ["some training text " * 40] * 4), ("held", ["a short held-out text"])):
        w = DocWriter(tmp_path / tier / "shard-00000.array_record")
        for i, text in enumerate(texts):
            w.write({"id": f"{tier}{i}", "text": text})
        w.commit()
    argv = ["--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.train_dir={tmp_path / 'train'}",
            "--set", f"data.eval_dir={tmp_path / 'held'}"]
    with pytest.raises(SystemExit) as e:
        train_lm.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("config error: train.batch: the held-out tier") and "less than one batch of 8×32" in msg, msg
    assert "use at most" not in msg


def test_an_eval_tier_holding_a_training_shard_is_refused(tmp_path):
    """data.eval_dir refused only the path of data.train_dir: a copy of the training tier, or a held-out directory
    linking one of its shards, was accepted, and every evaluation scored training documents (a held-out loss
    below the training loss, the best checkpoint picked by it). A shard of the same bytes, or the same file, is
    refused naming it; an empty shard in both tiers (a cleaning shard that kept nothing) is no overlap."""
    import shutil

    from data.shards import DocWriter

    def tier(name, texts):
        DocWriter(tmp_path / name / "shard-00000.array_record").commit()  # empty in every tier: the same bytes
        w = DocWriter(tmp_path / name / "shard-00001.array_record")
        for i, text in enumerate(texts):
            w.write({"id": f"{name}{i}", "text": text})
        w.commit()

    tier("train", ["some training text " * 40] * 4)
    tier("held", ["a held-out text " * 40] * 4)
    shutil.copytree(tmp_path / "train", tmp_path / "copy")
    (tmp_path / "linked").mkdir()
    os.symlink(tmp_path / "train" / "shard-00001.array_record", tmp_path / "linked" / "shard-00000.array_record")
    base = ["--preset", "tiny", "--set", f"data.train_dir={tmp_path / 'train'}"]
    validate(load([*base, "--set", f"data.eval_dir={tmp_path / 'held'}"]), 8)
    for held in ("copy", "linked"):
        with pytest.raises(ConfigError, match=r"^data.eval_dir: .*shard-0000[01].array_record' holds the same "
                                              r"documents as data.train_dir's .*/train/shard-00001.array_record'"):
            validate(load([*base, "--set", f"data.eval_dir={tmp_path / held}"]), 8)


def test_a_held_out_tier_of_the_training_run_or_its_pretokenized_copy_is_refused(tmp_path):
    """data.eval_dir another tier of data.train_dir's cleaning run (RUN/cleaned beside RUN/augmented: other bytes, as
    labels and augmentation change the records, the same documents), or a pretokenize output of the training tier,
    passed validation: every evaluation scored training documents (only a byte copy or a link was refused). A
    held-out run of its own is accepted."""
    from data.shards import DocWriter
    from data.synthetic import en_text
    from data.tokenizer import ByteTokenizer, pretokenize

    rng = np.random.default_rng(0)
    texts = [en_text(rng, 80) for _ in range(6)]
    for run, tier, extra in (("run", "cleaned", {}), ("run", "augmented", {"quality": 0.5}), ("held", "cleaned", {})):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "manifest.json").write_text("{}")
        w = DocWriter(tmp_path / run / tier / "shard-00000.array_record")
        for i, t in enumerate(texts[:4] if run == "run" else texts[4:]):
            w.write({"id": f"{run}{i}", "text": t, **extra})
        w.commit()
        (tmp_path / run / tier / "stats.json").write_text("{}")  # a finished run's tier
    pretokenize(tmp_path / "run" / "augmented", ByteTokenizer(add_eos=True), tmp_path / "pre", progress=False)

    def check(train, held):
        validate(load(["--preset", "tiny", "--set", f"data.train_dir={tmp_path / train}", "--set",
                       f"data.eval_dir={tmp_path / held}"]), 8)

    with pytest.raises(ConfigError, match=r"data.eval_dir: .*cleaned' holds data.train_dir's documents \(both are "
                                          r"tiers of the cleaning run .*run'\)"):
        check("run/augmented", "run/cleaned")
    with pytest.raises(ConfigError, match=r"data.eval_dir: .*pre' holds data.train_dir's documents \(both come "
                                          r"from .*augmented'\)"):
        check("run/augmented", "pre")
    with pytest.raises(ConfigError, match=r"data.eval_dir: .*cleaned' holds data.train_dir's documents"):
        check("pre", "run/cleaned")
    check("run/augmented", "held/cleaned")  # a held-out run of its own
    check("pre", "held/cleaned")


def test_a_pretokenized_copy_made_from_a_relative_path_is_traced_to_its_tier(tmp_path, monkeypatch):
    """pretokenize stored its tier_dir as typed ("run/augmented"): validate, run from another directory, resolved it
    there, found no such tier and accepted the training run's other tier (or the training tier itself) as eval_dir."""
    from data.shards import DocWriter
    from data.synthetic import en_text
    from data.tokenizer import ByteTokenizer, pretokenize

    rng = np.random.default_rng(0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    for tier in ("cleaned", "augmented"):
        w = DocWriter(tmp_path / "run" / tier / "shard-00000.array_record")
        for i in range(4):
            w.write({"id": f"{tier}{i}", "text": en_text(rng, 80)})
        w.commit()
        (tmp_path / "run" / tier / "stats.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    pretokenize("run/augmented", ByteTokenizer(add_eos=True), "pre", progress=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for held, why in (("run/augmented", "both come from"), ("run/cleaned", "both are tiers of the cleaning run")):
        with pytest.raises(ConfigError, match=rf"data.eval_dir: .* holds data.train_dir's documents \({why}"):
            validate(load(["--preset", "tiny", "--set", f"data.train_dir={tmp_path / 'pre'}", "--set",
                           f"data.eval_dir={tmp_path / held}"]), 8)


def test_a_tokenizer_folder_names_its_tokenizer_json(tmp_path):
    """`--set data.tokenizer=HF_FOLDER` (a checkpoint's folder, as --init-from takes) said only "is not a file"; it
    names the folder's tokenizer.json, which the option wants. A missing path keeps the other advice."""
    from data.tokenizer import train_bpe

    train_bpe(["one two three four"] * 20, vocab_size=300, show_progress=False).save(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .* is a folder; pass its tokenizer.json: --set "
                                          r"data.tokenizer=.*/tokenizer.json$"):
        validate(load(["--preset", "tiny", "--set", f"data.tokenizer={tmp_path}"]), 8)
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .* is not a file; save one with"):
        validate(load(["--preset", "tiny", "--set", f"data.tokenizer={tmp_path / 'nope.json'}"]), 8)


def test_an_empty_sample_prompt_starts_a_fresh_document_when_the_tokenizer_can(tmp_path):
    """train.sample_prompt='' is the document-start token alone (bytes + EOS: the EOS, as train_lm.sample_ids starts
    every prompt): it was refused unless data.bos_token was set. A tokenizer with neither BOS nor EOS gives no token
    to start from (generate refused it after the whole run): refused before the run, naming the way out."""
    from data.tokenizer import ByteTokenizer, train_bpe

    run = load(["--preset", "tiny", "--set", "train.sample_prompt="])
    validate(run, 8)
    ids, n, _ = train_lm.sample_ids(ByteTokenizer(add_eos=True), run.train.sample_prompt, 4, run.model.max_seq_len)
    assert ids.tolist() == [256] and n == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (fewer merges than asked)
        train_bpe(["one two three four"] * 20, vocab_size=300, special_tokens=(),
                  show_progress=False).save(tmp_path / "tok.json")
    with pytest.raises(ConfigError, match="^train.sample_prompt: is empty and the tokenizer has no BOS / EOS"):
        validate(load(["--preset", "tiny", "--set", "train.sample_prompt=", "--set",
                       f"data.tokenizer={tmp_path / 'tok.json'}", "--set", "model.vocab_size=320"]), 8)
    validate(load(["--preset", "tiny", "--set", "train.sample_prompt=", "--set", "train.sample_tokens=0", "--set",
                   f"data.tokenizer={tmp_path / 'tok.json'}", "--set", "model.vocab_size=320"]), 8)


def test_a_fresh_start_sets_earlier_logs_aside(tmp_path, monkeypatch):
    """A run killed before its first save left metrics.jsonl and tb/; the next fresh run in that --out appended to
    them, and the plot joined two runs' curves."""
    a = run_log.Logger(tmp_path, True)
    a.write({"kind": "train", "step": 3, "loss": 5.0})
    a.close()
    stamp = run_log.set_aside_logs(tmp_path)
    assert stamp and (tmp_path / f"metrics.jsonl.{stamp}").exists() and (tmp_path / f"tb.{stamp}").is_dir()
    b = run_log.Logger(tmp_path, True)
    b.write({"kind": "train", "step": 1, "loss": 4.0})
    b.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1] and len(list((tmp_path / "tb").iterdir())) == 1
    assert run_log.set_aside_logs(tmp_path / "empty") is None
    # fresh starts within one second: each earlier run keeps its own name (a rename over one replaced its file)
    monkeypatch.setattr(run_log.time, "strftime", lambda fmt: "20260101-000000")
    for step in (7, 8, 9):
        log = run_log.Logger(tmp_path, True)
        log.write({"kind": "train", "step": step, "loss": 1.0})
        log.close()
        run_log.set_aside_logs(tmp_path)
    kept = sorted(f.read_text() for f in tmp_path.glob("metrics.jsonl.prev-*"))
    assert len(kept) == 4 and sum('"step": 9' in t for t in kept) == 1 and sum('"step": 7' in t for t in kept) == 1


def test_throughput_window_leaves_out_eval_and_save_time():
    clock = iter([0.0, 1.0, 4.0, 6.0, 9.0, 10.0]).__next__  # start, eval 1..4 s, save 6..9 s
    w = run_log.Throughput(clock)
    w.step(100)  # step 1 ends at 1 s
    with w.exclude():  # evaluation after step 1: 3 s
        pass
    w.step(100)  # step 2 ends at 6 s
    with w.exclude():  # checkpoint save after step 2: 3 s
        pass
    w.step(100)  # step 3 ends at 10 s: 10 - 6 s of eval and save = 4 s of training for 3 steps
    assert w.report(clock()) == pytest.approx((300 / 4, 4 / 3))
    assert w.steps == w.tokens == 0 and w.excluded == 0.0



@pytest.mark.parametrize("accum", [1, 2])
def test_moe_state_step_adds_aux_losses_and_moves_the_router_bias(accum):
    """make_state_step with MoE: the gradient it applies is that of CE + lb_w·lb + z_w·z, rebuilt here from the
    model's own aux outputs (per microbatch, rows k::A, as the step cuts them; CE summed over the step's total
    weight, the aux terms weighted by the tokens each microbatch routes), and a sigmoid router's selection bias moves
    by update_router_bias(bias, mean load, rate), the load of the step's microbatches weighted as their aux losses
    are. The z-loss and the load, linear in the tokens, are then the whole batch's: with the microbatches weighted by
    their loss weight (a loss mask, not padding: the model routes weight-0 tokens), a prompt-heavy microbatch's
    routing counted for less (z-loss 1.9334 for 1.9310, the bias of 2 of 4 experts moved the wrong way)."""
    # aux weights large enough that dropping a term moves the gradient far past float32 noise
    moe = MoEConfig(4, 2, 16, router="sigmoid", lb_loss_weight=0.5, z_loss_weight=0.1, bias_update_rate=0.05)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    bias = params["moe_blocks"]["moe"]["router_bias"]  # non-zero, so that the update must add to it
    bias.set_value(jax.random.normal(jax.random.key(1), bias[...].shape) * 0.1)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 64, (4, 16), dtype=np.int32)),
             "targets": jnp.asarray(rng.integers(0, 64, (4, 16), dtype=np.int32)),
             "weights": jnp.asarray((rng.random((4, 16)) > 0.3) * (np.arange(16) < [[16], [5], [16], [5]]),
                                    jnp.float32)}  # uneven per microbatch (k::2): rows 1 and 3 mostly weight 0
    n_all, r_all = float(batch["weights"].sum()), batch["inputs"].size  # no segment ids: every token is routed

    def objective(p, mb, lb_w, z_w):  # Σ CE over the weighted tokens + the aux terms of the routed ones
        logits, aux = nnx.merge(graphdef, p)(mb["inputs"], return_aux=True)
        mean, n = cross_entropy(logits, mb["targets"], mb["weights"])
        return n * mean + n_all * mb["inputs"].size / r_all * (lb_w * aux["lb_loss"] + z_w * aux["z_loss"]), aux

    grad_f = jax.jit(jax.grad(objective, has_aux=True))
    refs, auxes = {}, []
    for k in range(accum):
        mb = jax.tree.map(lambda x: x[k::accum], batch)
        for key, w in (("full", (moe.lb_loss_weight, moe.z_loss_weight)), ("ce", (0.0, 0.0))):
            g, aux = grad_f(params, mb, *w)
            refs[key] = g if key not in refs else jax.tree.map(jnp.add, refs[key], g)
        auxes.append(jax.tree.map(lambda a: a * mb["inputs"].size / r_all, aux))
    ref, ce_only = (jax.tree.map(lambda x: x / n_all, refs[k]) for k in ("full", "ce"))

    opt = optax.sgd(1.0)  # params - new params = the gradient the step applied (no clipping, no decay)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    new, m = make_state_step(graphdef, opt, None, moe, accum)(jax.tree.map(jnp.copy, state), batch)
    new_bias = new["params"]["moe_blocks"]["moe"]["router_bias"][...]
    new["params"]["moe_blocks"]["moe"]["router_bias"].set_value(bias[...])  # compared below, on its own
    used = jax.tree.map(jnp.subtract, params, new["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), used, ref)
    # the aux terms matter here: without them the router's gradient is far off the tolerance above
    r_full, r_ce = ref["moe_blocks"]["moe"]["router"][...], ce_only["moe_blocks"]["moe"]["router"][...]
    assert float(jnp.abs(r_full - r_ce).max()) > 0.05 * float(jnp.abs(r_full).max())

    # [L_moe, E]: the microbatches' loads weighted by the tokens they route, which is the whole batch's load (as is
    # the z-loss); an unweighted mean let a mostly padded microbatch count as much as a full one
    load = np.sum([a["load"] for a in auxes], axis=0)
    np.testing.assert_allclose(m["load"], load, rtol=1e-5, atol=1e-7)
    whole = nnx.merge(graphdef, params)(batch["inputs"], return_aux=True)[1]
    np.testing.assert_allclose([m["z_loss"], *np.ravel(m["load"])], [whole["z_loss"], *np.ravel(whole["load"])],
                               rtol=1e-6)
    want = np.asarray(bias[...]) + moe.bias_update_rate * np.sign(load.mean(-1, keepdims=True) - load)
    assert np.any(want != np.asarray(bias[...]))  # the load is uneven: the update moves some experts
    np.testing.assert_allclose(new_bias, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(new_bias, update_router_bias(bias[...], load, moe.bias_update_rate), rtol=0, atol=1e-7)


def test_moe_state_step_without_moe_cfg_trains_the_models_own_aux_losses():
    """make_state_step(graphdef, opt) of a MoE model (moe_cfg left at None) dropped the load-balancing and z-loss
    gradients and never moved a sigmoid router's bias (measured: the router's update differed by 0.0222 of 0.0222,
    the bias moved 0 instead of 0.05), while its metrics still reported lb_loss: it steps as with the model's own
    MoEConfig now."""
    moe = MoEConfig(4, 2, 16, router="sigmoid", lb_loss_weight=0.5, z_loss_weight=0.1, bias_update_rate=0.05)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = optax.sgd(1.0)
    tok = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    # with weights (all 1): the batch structure of test_moe_state_step_adds_aux_losses_and_moves_the_router_bias[1],
    # whose step (the same model, optimizer and MoEConfig) is then this test's program too
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
             "weights": jnp.ones((4, 16), jnp.float32)}
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    given, default = (make_state_step(graphdef, opt, None, mc)(jax.tree.map(jnp.copy, state), batch)[0]["params"]
                      for mc in (moe, None))
    bias = lambda p: np.asarray(p["moe_blocks"]["moe"]["router_bias"][...])  # noqa: E731
    assert np.abs(bias(given) - bias(params)).max() > 0  # the load is uneven: the given config moves the bias
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), default, given)


def test_router_jitter_draws_new_noise_every_step_and_every_microbatch():
    """The jitter key is the state's rng folded with the step (and each grad-accumulation microbatch's index): the
    same step repeats exactly, another step draws other noise, and two identical microbatches are not jittered
    alike (one key for all of them reran the one-batch step's noise; one for all steps froze the noise into a bias)."""
    moe = MoEConfig(4, 2, 16, router_jitter=0.5, dispatch="capacity")  # capacity: a third of dropless's compile
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = optax.sgd(1e-2)
    tok = np.random.default_rng(0).integers(0, 64, (2, 17), dtype=np.int32)
    mb = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    twice = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), mb)  # rows k::2 of it are mb, for k = 0 and 1

    steps = {accum: make_state_step(graphdef, opt, None, moe, accum) for accum in (1, 2)}

    def loss(accum, batch, step):
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params),
                 "step": jnp.asarray(step, jnp.int32), "skipped": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.key(0))}
        return float(steps[accum](state, batch)[1]["loss"])

    at0 = loss(1, mb, 0)
    assert loss(1, mb, 0) == at0 and abs(loss(1, mb, 1) - at0) > 1e-5
    # without jitter the two-microbatch step of `twice` has the one-batch step's loss; with it, its own noise
    assert abs(loss(2, twice, 0) - at0) > 1e-5


def test_state_step_refuses_a_router_jitter_the_model_does_not_apply():
    """The MoE layers jitter by their own MoEConfig; moe_cfg's router_jitter only turns the key on or off. A
    moe_cfg with router_jitter=0.9 on a model built with 0 stepped with no jitter at all (loss equal to the
    jitter-free step's to the last bit), with 0.9 on one built with 0.2 at 0.2: refused by name now. Turning it
    off (router_jitter=0) stays accepted."""
    moe = MoEConfig(4, 2, 16, router_jitter=0.2, dispatch="capacity")
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = optax.sgd(1e-2)
    tok = np.random.default_rng(0).integers(0, 64, (2, 9), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    for given in (0.9, 0.1):
        with pytest.raises(ValueError, match=r"moe_cfg.router_jitter=.*built with router_jitter=0.2"):
            make_state_step(graphdef, opt, None, dataclasses.replace(moe, router_jitter=given))(state, batch)
    assert np.isfinite(make_state_step(graphdef, opt, None, dataclasses.replace(moe, router_jitter=0.0))(
        jax.tree.map(jnp.copy, state), batch)[1]["loss"])


def test_the_trainer_step_updates_its_donated_state_in_place():
    """The trainer's step copies no buffer of its donated state (parallel.host.step_compiler_options): XLA:CPU's
    default copy insertion copied both AdamW moments of every parameter under the skip-on-non-finite select.
    A skipped step still returns the state it was given (the in-place update reads the old values first)."""
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_dim=32, max_seq_len=16)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(1e-2, total_steps=10, warmup_steps=0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    tok = np.random.default_rng(0).integers(0, 64, (2, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    step = make_state_step(graphdef, opt)
    hlo = step.lower(state, batch).compile().as_text()
    copied = [line.strip()[:100] for line in hlo.splitlines() if " copy(%state" in line]
    assert not copied, copied

    state, _ = step(state, batch)  # moments non-zero from here on
    before = jax.tree.map(np.asarray, state)
    bad = dict(batch, weights=jnp.full(batch["targets"].shape, jnp.nan))
    after, m = step(state, bad)
    assert not bool(m["finite"]) and int(after["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in after.items() if k not in ("step", "skipped")},
                 {k: v for k, v in before.items() if k not in ("step", "skipped")})


def test_a_sharded_state_steps_with_one_compilation():
    """create_sharded placed parameters as P(None, 'fsdp', None) and the step returned them as P(None, 'fsdp') (the
    same layout, as jax.jit spells it): another cache key, so a loop of your own (no state_shardings) compiled
    make_state_step's and make_train_step's step twice."""
    from experiments.lm_step import init_train_state, make_train_step
    from parallel import create_sharded, shard_batch
    from parallel.sharding import init_optimizer

    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_dim=32, max_seq_len=16)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    opt = make_optimizer(1e-2, total_steps=10, warmup_steps=0)
    tok = np.random.default_rng(0).integers(0, 64, (8, 17), dtype=np.int32)
    batch = shard_batch({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
    graphdef, params = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    params2 = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)[1]
    step, plain = make_state_step(graphdef, opt), make_train_step(graphdef, opt)
    # train.seed seeds the state's rng (the router jitter's key): the raw data of jax.random.key(seed)
    np.testing.assert_array_equal(init_train_state(params, opt, seed=3)["rng"], jax.random.key_data(jax.random.key(3)))
    with jax.set_mesh(mesh):
        state, p, o = init_train_state(params, opt), params2, init_optimizer(opt, params2)
        for _ in range(3):
            state, m = step(state, batch)
            p, o, m_plain = plain(p, o, batch)
    assert (step._cache_size(), plain._cache_size()) == (1, 1)
    # the plain step is the trainer's without its bookkeeping: the same loss, gradient norm and update
    assert [float(m_plain[k]) for k in ("loss", "grad_norm")] == pytest.approx([float(m[k]) for k in ("loss",
                                                                                                   "grad_norm")])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jax.device_get(p),
                 jax.device_get(state["params"]))


def test_perplexity_is_exp_of_the_loss_up_to_float_overflow():
    """exp(loss) wherever a float holds it: losses of 700..709.78 nats were reported as inf perplexity (a cut at 700
    where the docstring promises inf only on overflow); inf past that, NaN for NaN."""
    for loss in (-1.0, 0.0, 3.5, 699.9, 700.0, 705.0, 709.78):
        assert run_log.perplexity(loss) == pytest.approx(np.exp(np.float64(loss)), rel=1e-12), loss
    assert run_log.perplexity(709.79) == run_log.perplexity(1e4) == math.inf
    assert math.isnan(run_log.perplexity(math.nan))


def test_throughput_window_without_steps_reports_none():
    clock = iter([0.0, 1.0, 5.0, 6.0]).__next__
    w = run_log.Throughput(clock)
    with w.exclude():  # a first step that compiles: left out entirely
        pass
    assert w.report(clock()) == (None, None)


@pytest.mark.parametrize("argv,n_devices,expected", [b for b in BAD if "(e.g. --mesh " in b[2]])
def test_the_mesh_a_sharding_refusal_suggests_validates(argv, n_devices, expected):
    """The sharding refusals named the field and the axis, but no value that would pass; the mesh they now suggest
    does (appended: the last --mesh wins)."""
    with pytest.raises(ConfigError) as e:
        validate(load(argv), n_devices)
    suggested = re.search(r"\(e\.g\. --mesh (\S+)\)", str(e.value)).group(1)
    assert math.prod(validate(load([*argv, "--mesh", suggested]), n_devices).values()) == n_devices


@pytest.mark.parametrize("preset, mesh", [("demo", "data=2,fsdp=2,tensor=2"), ("demo", "fsdp=2,tensor=4"),
                                          ("demo", "fsdp=-1,tensor=4"), ("tiny", "fsdp=4,tensor=2")])
def test_documented_meshes_validate_for_the_presets(preset, mesh):
    """docs/parallelism.md runs the presets with tensor parallelism: their (padded) vocabulary must divide it."""
    assert math.prod(validate(load(["--preset", preset, "--mesh", mesh]), 8).values()) == 8


def test_overrides_valid_only_together_apply_in_either_order():
    """attn_pattern=global and sliding_window=none are each invalid with the tiny preset's other value."""
    a = load(["--preset", "tiny", "--set", "model.attn_pattern=global", "--set", "model.sliding_window=none"])
    b = load(["--preset", "tiny", "--set", "model.sliding_window=none", "--set", "model.attn_pattern=global"])
    assert a == b and a.model.layer_windows() == (None, None)
    with pytest.raises(ConfigError, match="sliding_window: is set but attn_pattern='global' has no local layer"):
        load(["--preset", "tiny", "--set", "model.attn_pattern=global"])
    c = load(["--preset", "demo", "--set", "model.moe.top_k=1", "--set", "model.moe.n_experts=2", "--steps", "7",
              "--set", "model.moe.renormalize=False", "--set", "train.steps=9"])  # --steps is --set train.steps
    assert (c.model.moe.top_k, c.model.moe.n_experts, c.train.steps) == (1, 2, 9)


def test_trainer_keeps_padding_out_of_moe_routing():
    """Packed rows pad with segment 0: the trainer's loss must tell the MoE layers, or padding takes capacity and
    skews the load that moves the router bias."""
    from experiments.lm_step import lm_loss_parts

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                            moe=MoEConfig(4, 1, 32, router="sigmoid", dispatch="capacity", renormalize=False))
    gd, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    B, T = 4, 16
    seg = np.ones((B, T), np.int32)
    seg[:, 6:] = 0
    inp = np.where(seg > 0, np.random.default_rng(0).integers(1, 64, (B, T)), 0).astype(np.int32)
    batch = {"inputs": jnp.asarray(inp), "targets": jnp.asarray(inp), "segment_ids": jnp.asarray(seg),
             "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)),
             "weights": jnp.asarray((seg > 0).astype(np.float32))}
    _, _, aux = lm_loss_parts(gd, p, batch)
    model = nnx.merge(gd, p)
    kw = dict(positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"], return_aux=True)
    _, masked = model(batch["inputs"], padding_mask_BT=batch["segment_ids"] > 0, **kw)
    _, unmasked = model(batch["inputs"], **kw)
    for k in ("lb_loss", "z_loss", "dropped_frac", "load"):
        np.testing.assert_allclose(aux[k], masked[k], atol=1e-6)
    assert np.abs(np.asarray(unmasked["load"]) - np.asarray(masked["load"])).max() > 0.05  # the test has teeth


def test_a_batch_without_weights_does_not_score_its_padding():
    """A batch with segment_ids (0 = padding, as the loader packs) but no weights scored the padding's targets too:
    the loss of a half-padded row moved with whatever token the padding held."""
    from experiments.lm_step import lm_loss_parts

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64)
    gd, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    B, T = 2, 12
    seg = np.ones((B, T), np.int32)
    seg[:, 7:] = 0
    tok = np.random.default_rng(0).integers(1, 64, (B, T)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tok), "targets": jnp.asarray(tok), "segment_ids": jnp.asarray(seg)}
    loss, n, _ = lm_loss_parts(gd, p, batch)
    want, want_n, _ = lm_loss_parts(gd, p, {**batch, "weights": jnp.asarray((seg > 0).astype(np.float32))})
    assert float(n) == float(want_n) == 14 and np.isclose(float(loss), float(want), rtol=1e-6)
    moved = {**batch, "targets": jnp.asarray(np.where(seg > 0, tok, 5).astype(np.int32))}
    assert np.isclose(float(lm_loss_parts(gd, p, moved)[0]), float(loss), rtol=1e-6)  # padding targets unseen


def test_a_packed_row_scores_each_document_as_if_it_were_alone():
    """The trainer's loss hands the batch's segment_ids and positions to the model: a row packing two documents
    (positions restarting at 0, then padding) has the float64 loss of each document run on its own (a loss that
    left segment_ids out, letting the second document attend to the first, passed every test)."""
    from experiments.lm_step import lm_loss_parts

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, max_seq_len=16)
    gd, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, 7).astype(np.int32), rng.integers(1, 64, 10).astype(np.int32)]  # 6 + 9 targets
    total = 0.0
    for d in docs:  # reference: each document alone
        logits = np.asarray(nnx.merge(gd, p)(jnp.asarray(d[None, :-1])), np.float64)[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += (logz - logits[np.arange(len(d) - 1), d[1:]]).sum()
    pad = lambda parts: np.concatenate([*parts, [0]]).astype(np.int32)[None]  # noqa: E731  (one padding slot)
    batch = {"inputs": pad([d[:-1] for d in docs]), "targets": pad([d[1:] for d in docs]),
             "segment_ids": pad([np.full(len(d) - 1, i + 1) for i, d in enumerate(docs)]),
             "positions": pad([np.arange(len(d) - 1) for d in docs])}
    mean, n, _ = lm_loss_parts(gd, p, jax.tree.map(jnp.asarray, batch))
    assert float(n) == 15 and float(mean) == pytest.approx(total / 15, rel=1e-5)


def test_a_softmax_router_keeps_its_selection_bias():
    """Aux-loss-free balancing moves a sigmoid router's bias only (DeepSeek-V3); a softmax (Mixtral) router's bias
    stays 0 although bias_update_rate defaults to 0.001 (moving it for any router passed every test: they all
    used sigmoid routers)."""
    moe = MoEConfig(4, 2, 16, router="softmax", bias_update_rate=0.05)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    bias = np.asarray(params["moe_blocks"]["moe"]["router_bias"][...])
    tok = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    opt = optax.sgd(1e-2)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    new, m = make_state_step(graphdef, opt, None, moe, 1)(jax.tree.map(jnp.copy, state), batch)
    assert np.ptp(np.asarray(m["load"])) > 0  # an uneven load: a sigmoid router's bias would move
    np.testing.assert_array_equal(new["params"]["moe_blocks"]["moe"]["router_bias"][...], bias)


def test_state_step_and_init_optimizer_name_the_misuse():
    """A grad_accum that does not divide the batch failed in a reshape ('cannot reshape array of shape (8, 8)'); a
    built module given as params made an optimizer state the step could not read ('Incorrect number of leaves')."""
    from experiments.lm_step import init_train_state
    from parallel import init_optimizer

    model = Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32),
                        rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = optax.sgd(0.1)
    tok = jnp.zeros((8, 8), jnp.int32)
    with pytest.raises(ValueError, match="grad_accum=3 must divide the batch's 8 rows"):
        make_state_step(graphdef, opt, grad_accum=3)(init_train_state(params, opt), {"inputs": tok, "targets": tok})
    with pytest.raises(ValueError, match="grad_accum=0 must be an int >= 1"):
        make_state_step(graphdef, opt, grad_accum=0)
    # on {data: 8} a batch of 8 is fine, but 2 microbatches of 4 rows are not: the error named the batch size as 4
    mesh = make_mesh({"data": 8})
    rows = jax.device_put(tok, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"grad_accum=2 leaves 4 of the batch's 8 rows per "
                                                             r"microbatch, .* 'data' \(size 8\) .* multiple of 16"):
        make_state_step(graphdef, opt, grad_accum=2)(init_train_state(params, opt), {"inputs": rows, "targets": rows})
    with pytest.raises(TypeError, match=r"params is a built Transformer; pass its parameter state, nnx.split"):
        init_train_state(model, opt)
    with pytest.raises(TypeError, match="params is a built Transformer"):
        init_optimizer(opt, model)


def test_state_step_refuses_an_optimizer_that_needs_the_loss_by_name():
    """optax.contrib.reduce_on_plateau (update needs value=) and optax.lbfgs (value, grad, value_fn) failed in a bare
    TypeError from inside optax ("update_fn() missing 1 required keyword-only argument: 'value'"), naming neither
    the step nor what it passes."""
    graphdef, params = nnx.split(Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                                               mlp_dim=32), rngs=nnx.Rngs(0)))
    tok = jnp.zeros((2, 8), jnp.int32)
    batch = {"inputs": tok, "targets": tok}
    for opt in (optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau()), optax.lbfgs()):
        says = r"the optimizer's update needs arguments the step does not pass \(.*'value'.*\); the step calls " \
               r"optimizer.update\(grads, opt_state, params\) and nothing else"
        with pytest.raises(TypeError, match="^make_state_step: " + says):
            make_state_step(graphdef, opt)(init_train_state(jax.tree.map(jnp.copy, params), opt), batch)
        with pytest.raises(TypeError, match="^make_train_step: " + says):
            make_train_step(graphdef, opt)(jax.tree.map(jnp.copy, params), opt.init(params), batch)


def test_init_train_state_warns_of_a_user_optimizer_s_bf16_moments():
    """A user's optax optimizer keeps Adam's moments in bf16 parameters' dtype (make_optimizer's are float32): nu
    stops decaying (b2 0.999: 2.7x the float64 nu 990 steps after the gradient went to 0), silently."""
    from experiments.lm_step import float32_state

    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, param_dtype="bfloat16")
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.warns(UserWarning, match=r"^init_train_state: the optimizer state holds bfloat16 leaves .*"
                                         r"experiments.lm_step.float32_state"):
        init_train_state(params, optax.adam(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = init_train_state(params, make_optimizer(1e-3, total_steps=10, warmup_steps=0))  # float32 moments
        init_train_state(params, float32_state(optax.adam(1e-3)))
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"])} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def test_multisteps_skipped_mid_accumulation_matches_optax_by_hand():
    """optax.MultiSteps(adam, 2) through make_state_step: a NaN step between its two mini-steps leaves the mini-step
    count and the accumulator as they were (skipped + 1), and the next good step completes the update: the params
    are adam's on the mean of the two good steps' gradients, applied by hand."""
    from experiments.lm_step import lm_loss

    graphdef, params = nnx.split(Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                                               mlp_dim=32), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    b = [{k: jnp.asarray(v) for k, v in zip(("inputs", "targets"), np.split(rng.integers(0, 32, (4, 16)), 2, 1))}
         for _ in range(2)]
    opt = optax.MultiSteps(optax.adam(1e-2), 2)
    step = make_state_step(graphdef, opt)
    state, _ = step(init_train_state(jax.tree.map(jnp.copy, params), opt), b[0])
    state, m = step(state, dict(b[1], weights=jnp.full((4, 8), jnp.nan)))
    assert not bool(m["finite"]) and int(state["skipped"]) == 1 and int(state["opt_state"].mini_step) == 1
    state, _ = step(state, b[1])
    assert int(state["opt_state"].gradient_step) == 1 and int(state["opt_state"].mini_step) == 0
    grad = jax.grad(lambda p, batch: lm_loss(graphdef, p, batch))
    g = jax.tree.map(lambda x, y: (x + y) / 2, grad(params, b[0]), grad(params, b[1]))
    ref = optax.adam(1e-2)
    want = optax.apply_updates(params, ref.update(g, ref.init(params), params)[0])
    jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, atol=1e-6), state["params"], want)


@pytest.mark.parametrize("arg, field, cwd", [
    (b"train.sample_prompt=\xe4\xb8\xad\xe6\x96\x87", "train.sample_prompt", "."),
    (b"train.out=runs/\xc3\xbc", "train.out", "."),
    (b"data.eos_token=\xe2\x80\x94", "data.eos_token", "."),  # the data section's fields too
    (b"train.seed=1", "train.out", "\xfc")])  # the default train.out, relative, below a non-ASCII working directory
def test_text_an_ascii_locale_could_not_decode_is_a_config_error(arg, field, cwd, tmp_path):
    """Under LC_ALL=C PYTHONUTF8=0 Python reads argv as ASCII: a Chinese sample prompt was sampled as U+FFFD's at the
    end of the run, and a non-ASCII train.out failed in orbax's first save, after the steps it was to keep."""
    import subprocess
    import sys

    from tests.test_data_pipeline import _ascii_locale

    env = _ascii_locale(tmp_path)  # (skips where that Python could not import jax)
    cmd = [sys.executable, "-m", "experiments.train_lm", "--preset", "tiny", "--steps", "3", "--set", arg]
    (tmp_path / cwd).mkdir(exist_ok=True)
    proc = subprocess.run(cmd + ["--set", "optim.warmup_steps=0"], env=env, cwd=tmp_path / cwd,
                          capture_output=True, text=True, encoding="utf-8", errors="replace")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"config error: {field}: " in out and "PYTHONUTF8=1" in out, out
    assert not (tmp_path / cwd / "runs").exists()


def test_an_unwritable_home_is_a_config_error_naming_the_cache(tmp_path, monkeypatch):
    """The built-in corpus is cached under ~/.cache/jaxscale by default: a home where it cannot be made failed in
    mkdir with a traceback naming no setting; data.cache_dir elsewhere (or data.train_dir) avoids it."""
    (tmp_path / ".cache").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.cache_dir: .*\.cache/jaxscale.* is a file"):
        validate(load(["--preset", "tiny", "--out", str(tmp_path / "run")]), 8)
    validate(load(["--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path}/c"]), 8)


def test_text_that_is_not_utf8_under_a_utf8_locale_is_a_config_error(tmp_path):
    """Under a UTF-8 locale a byte that is not UTF-8 on the command line (a latin-1 directory name: runs/\\xfc) is
    held as a lone surrogate too: validate let it through, the run trained its steps, then orbax's first save
    failed ("Unable to cast Python instance of type <class 'str'> to C++ type"), and a sample prompt so held was
    sampled as U+FFFD's. (Measured: `--set train.out=$'runs/\\xfc'`, steps 0 -> 3, then that RuntimeError.)"""
    bad = os.fsdecode(b"runs/\xfc")  # what Python makes of those bytes in argv: 'runs/\udcfc'
    for field in ("train.out", "train.sample_prompt"):
        with pytest.raises(ConfigError, match=rf"^{field}: .*not UTF-8.*rename"):
            validate(load(["--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"{field}={bad}"]), 8)
    validate(load(["--preset", "tiny", "--out", str(tmp_path / "rün"), "--set", "train.sample_prompt=中文"]), 8)


@pytest.mark.parametrize("argv,field", [
    (["--out", "gs://bucket/run"], "train.out"), (["--set", "train.out=s3://b/x"], "train.out"),
    (["--set", "data.cache_dir=gs://b/cache"], "data.cache_dir"), (["--init-from", "gs://b/llama"], "train.init_from"),
    (["--set", "data.tokenizer=gs://b/tok.json"], "data.tokenizer")])
def test_a_bucket_url_is_refused_up_front_and_nothing_is_written(argv, field, tmp_path, monkeypatch):
    """gs://bucket/run validated as the relative path gs:/bucket/run: the run trained into a local folder named
    'gs:' (metrics, tb/, the lock), then failed at its first save in tensorstore ('Invalid file path'), its work on
    the VM's disk. (Measured: --preset tiny --steps 2 --out gs://bucket/run, 21 s, then that ValueError.)"""
    monkeypatch.chdir(tmp_path)
    compiled = []
    monkeypatch.setattr(train_lm, "train", lambda *a: compiled.append(a))
    with pytest.raises(SystemExit) as e:
        train_lm.main(["--preset", "tiny", *argv])
    assert str(e.value).startswith(f"config error: {field}: ") and "gcsfuse" in str(e.value), e.value
    assert not compiled and not os.listdir(tmp_path)


def test_a_tilde_the_shell_left_unexpanded_is_the_home_directory(tmp_path, monkeypatch):
    """The shell expands `--out ~/x` but not `--out=~/x` or `--set train.out=~/x`: the run went to a folder named
    '~' below the working directory (one `rm -rf ~` from the home directory). Every path field is expanded."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load(["--preset", "tiny", "--out=~/runs/x", "--set", "data.cache_dir=~/cache", "--set",
                "data.tokenizer=~/tok.json"])
    assert (cfg.train.out, cfg.data.cache_dir, cfg.data.tokenizer) == (
        f"{tmp_path}/runs/x", f"{tmp_path}/cache", f"{tmp_path}/tok.json")
    assert dataclasses.replace(cfg.train, out="~").out == str(tmp_path)  # specs built in Python too
    with pytest.raises(ConfigError, match=r"^train\.out: '~nosuchuser_s52/x': ~nosuchuser_s52 names no home"):
        load(["--preset", "tiny", "--set", "train.out=~nosuchuser_s52/x"])


def test_freezing_by_logical_axes_as_docs_parallelism_says_keeps_frozen_weights_bitwise():
    """docs/parallelism.md's recipe: labels from the parameters' logical-axis metadata into optax.multi_transform with
    set_to_zero (it said "an optax mask": optax.masked(make_optimizer(...), mask) adds the frozen leaves' raw
    gradients to them, so they climbed their gradient and the loss rose), plus bias_update_rate 0 for a sigmoid
    router's bias, which make_state_step moves outside the optimizer: the frozen weights stay bitwise, weight decay
    included, and the `mlp` matrices move."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "parallelism.md").read_text()
    assert "optax.multi_transform(" in text and "optax.set_to_zero()" in text and "bias_update_rate=0.0" in text
    moe = MoEConfig(4, 2, 16, router="sigmoid", bias_update_rate=0.05, dispatch="capacity")  # capacity: a quick compile
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, moe=moe)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    axes = jax.tree.map(lambda v: v.get_metadata()["out_sharding"], nnx.state(model, nnx.Param),
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
    labels = jax.tree.map(lambda a: "train" if "mlp" in a else "frozen", axes, is_leaf=lambda x: isinstance(x, tuple))
    opt = optax.multi_transform({"train": make_optimizer(1e-2, 10, 0, weight_decay=0.5),
                                 "frozen": optax.set_to_zero()}, labels)
    graphdef, params = nnx.split(model)
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    tok = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    step = make_state_step(graphdef, opt, None, dataclasses.replace(moe, bias_update_rate=0.0))
    after = [np.asarray(x) for x in jax.tree.leaves(step(state, batch)[0]["params"])]
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    for name, label, a, b in zip(names, jax.tree.leaves(labels), before, after, strict=True):
        assert np.array_equal(a, b) == (label == "frozen"), name


def test_plain_train_step_gradients_survive_float16_compute():
    """make_train_step differentiates the NLL sum, as the trainer's step does: the gradient of the mean put logit
    cotangents of ~1 / (V·tokens) into float16's subnormals, so at 512 tokens its float16-compute gradients of wq /
    wk were 6% off the float32 ones (39% at 2048; the sum's: 0.1%). SGD at lr 1 makes the step return params - g."""
    base = dict(vocab_size=97, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=64)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 97, (8, 65)), jnp.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    opt, grads = optax.sgd(1.0), {}
    for dtype in ("float32", "float16"):
        graphdef, params = nnx.split(Transformer(TransformerConfig(**base, dtype=dtype), rngs=nnx.Rngs(0)))
        before = jax.tree.map(jnp.copy, params)  # the step donates params
        after, _, _ = make_train_step(graphdef, opt)(params, opt.init(params), batch)
        grads[dtype] = jax.tree.map(jnp.subtract, before, after)
    off = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), grads["float16"], grads["float32"])
    assert max(jax.tree.leaves(off)) < 1e-2, off


def test_resume_takes_one_directory_spelled_another_way(tmp_path, monkeypatch):
    # a run started with data.train_dir=clean/augmented and requeued with $PWD/clean/augmented (or ./clean/...,
    # or a link to it) reads the same shards: it was refused as "another data stream"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clean" / "augmented").mkdir(parents=True)
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "clean")
    saved = json.loads(load(["--preset", "tiny"]).to_json())
    saved["data"] |= {"train_dir": "clean/augmented", "tokenizer": "tok.json", "eval_dir": "clean/augmented"}
    for train_dir in ("./clean/augmented", str(tmp_path / "clean" / "augmented"), "link/augmented"):
        now = json.loads(json.dumps(saved))
        now["data"] |= {"train_dir": train_dir, "tokenizer": str(tmp_path / "tok.json"), "eval_dir": train_dir}
        now["data"]["max_files"] = 20  # the stdlib corpus's setting: nothing with the run's own train_dir
        assert train_lm.resume_mismatch(saved, now) == ([], []), train_dir
    now["data"]["train_dir"] = "other/augmented"  # another directory: still refused
    assert train_lm.resume_mismatch(saved, now)[0][-1] == ("data.train_dir: saved 'clean/augmented', now "
                                                           "'other/augmented'")


def test_provenance_names_the_code_libraries_and_command():
    """A run folder named no code version, library version or command line: a checkpoint's meta (and its
    metrics.jsonl) now carry `run_log.provenance`, which must be the TRUE commit and versions of this process."""
    root = pathlib.Path(run_log.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    p = run_log.provenance(["prog", "--set", "train.steps=3"])
    assert p["argv"] == ["prog", "--set", "train.steps=3"]
    assert p["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert p["versions"]["jax"] == jax.__version__ and p["versions"]["flax"] == importlib.metadata.version("flax")
    # this code's own version: a wheel install has no git checkout, and named no code version at all
    assert p["versions"]["jaxscale"] == importlib.metadata.version("jaxscale")
    assert p["devices"] == jax.device_count() and p["backend"] == jax.default_backend()
    json.dumps(p)  # it goes into the checkpoint's JSON meta


def test_a_users_own_data_py_is_named_not_a_missing_submodule(tmp_path):
    """jaxscale's packages are top-level names: a user's data.py beside their script hid ours, and importing the
    trainer failed with "No module named 'data.cli'" and no hint. The error now names the user's file and the fix."""
    root = pathlib.Path(train_lm.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))  # the script's folder first on sys.path, then jaxscale
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=300)
    assert run("import experiments").returncode == 0  # a folder of the user's without clashing names: no error
    (tmp_path / "data.py").write_text("rows = []\n", encoding="utf-8")
    r = run("import experiments.train_lm")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "ImportError" in last, r.stderr
    assert str(tmp_path / "data.py") in last and "rename it" in last, last


def test_segments_keep_each_resume_and_what_it_changed():
    """The newest checkpoint's config is only its last segment's: a resume at step 8 with another optim.lr looked
    like a run at that lr from step 0. `segments` carries the history: each start step, its changes, its command."""
    saved = {"optim": {"lr": 0.01}, "model": {"moe": {"top_k": 2}}, "train": {"steps": 8, "seed": 7}}
    now = json.loads(json.dumps(saved))
    now["optim"]["lr"], now["train"]["steps"] = 0.005, 12
    changes = run_log.config_changes(saved, now)
    assert changes == ["optim.lr: saved 0.01, now 0.005", "train.steps: saved 8, now 12"]
    assert run_log.config_changes({"model": {"moe": {"top_k": 2}}}, {"model": {"moe": {"top_k": 1}}}) == [
        "model.moe.top_k: saved 2, now 1"]
    first = run_log.segments(None, 0, [], argv=["train", "a"])
    assert [s["start_step"] for s in first] == [0] and first[0]["changed"] == []
    crashed = first + [dict(first[0], start_step=10)]  # an attempt past the restored step: its steps replay
    second = run_log.segments({"segments": crashed}, 8, changes, argv=["train", "b"])
    assert [(s["start_step"], s["argv"][-1]) for s in second] == [(0, "a"), (8, "b")]
    assert second[-1]["changed"] == changes
    assert run_log.segments({"config": "{}"}, 4, [])[0]["start_step"] == 4  # a checkpoint saved before the field


def test_a_step_without_a_schedule_runs_under_jax_debug_nans():
    """make_state_step(graphdef, opt), no schedule (benchmarks/moe_train.py's): its metrics held lr = NaN, so under
    jax_debug_nans every healthy step raised a FloatingPointError. Without a schedule there is no lr metric."""
    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=8)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(1e-2, total_steps=10, warmup_steps=0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9), dtype=np.int32))
    with jax.debug_nans(True):
        _, m = make_state_step(graphdef, opt)(state, {"inputs": tok[:, :-1], "targets": tok[:, 1:]})
    assert bool(m["finite"]) and "lr" not in m


def test_a_mesh_refused_after_jax_was_in_use_names_jax_num_cpu_devices(tmp_path):
    """A notebook or sweep that touched JAX before train_lm.main (an array, load_model) had the backend's one CPU
    device: main could no longer set up its 8 fake devices, and the default demo mesh was refused as "needs 8 devices
    but 1 are available", naming no way out. The refusal now names jax_num_cpu_devices (and a -1 mesh)."""
    root = pathlib.Path(train_lm.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    code = ("import jax, jax.numpy as jnp\njnp.zeros(1)\nfrom experiments import train_lm\n"
            f"train_lm.main(['--preset', 'demo', '--out', {str(tmp_path / 'run')!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "needs 8 devices but 1 are available" in last, r.stderr
    assert "jax.config.update('jax_num_cpu_devices', 8)" in last and "--mesh fsdp=-1" in last, last
