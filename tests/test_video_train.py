"""The video experiment end to end on its tiny preset, sharded over 8 fake devices, and its checkpoints."""

import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments import train_video
from experiments.checkpoint import CheckpointMismatch, NonFiniteState, array_tree_handler, fingerprint
from experiments.video_steps import ema_cast, ema_init, ema_update, manager, restore, save
from models.video import VAEConfig, VideoVAE


def placed(make, mesh, scale=0.02):
    """create_sharded(make, mesh)'s (graphdef, state), its values drawn on the host from N(0, scale²): no init program
    to compile (seconds per video model on XLA:CPU), for tests whose checkpoints or steps need the model's tree and
    placement, not its initial values."""
    from parallel import abstract_sharded

    graphdef, abstract = abstract_sharded(make, mesh)
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(
        lambda s: jax.device_put((scale * rng.standard_normal(s.shape)).astype(s.dtype), s.sharding), abstract)


@pytest.mark.slow
def test_tiny_preset_runs_every_stage(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lines = _plotted(monkeypatch)
    res = train_video.main(["--preset", "tiny", "--out", str(out), "--mesh", "data=2,fsdp=2,tensor=2"])
    results = json.loads((out / "results.json").read_text())
    for cond in ("cfg 1", "cfg 2", "cfg 4"):
        for split, n in (("seen", 40), ("held-out", 8)):
            row = results[f"{cond} / {split}"]
            assert row["n"] == n and 0 <= row["colour"] <= 1 and 0 <= row["r@1"] <= 1
    assert results["null prompt / seen"]["n"] == 40
    assert res["timings"]["total_s"] > 0 and np.isfinite(res["psnr"])
    assert "| null prompt | seen |" in (out / "results.md").read_text()
    for stage, steps in (("vae", 3), ("t2v", 3)):
        assert manager(out / "ckpt" / stage).latest_step() == steps
    # each stage's losses on disk (only a progress bar showed them), and the totals its checkpoints trained toward
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("vae", 3), ("t2v", 3)]
    assert np.isfinite(records[0]["psnr"]) and np.isfinite(records[1]["diffusion"]) and (out / "tb").is_dir()
    for stage in ("vae", "t2v"):
        assert train_video.latest_meta(manager(out / "ckpt" / stage))[1]["total_steps"] == 3
    # each stage's loss plot, from the losses it logged
    from PIL import Image

    for stage in ("vae", "t2v"):
        with Image.open(out / f"loss_{stage}.png") as im:
            assert im.format == "PNG"
    for label, (i, key) in {"loss (mse + kl_weight·kl)": (0, "loss"), "reconstruction mse": (0, "mse"), "kl": (0, "kl"),
                            "loss (diffusion + align_weight·align)": (1, "loss"), "diffusion": (1, "diffusion"),
                            "align (InfoNCE)": (1, "align")}.items():
        assert lines[label] == ([3], [records[i][key]]), label
    for stage in ("vae", "t2v"):  # the events written and closed, a TensorBoard run per stage
        assert sum(f.stat().st_size for f in (out / "tb" / stage).iterdir()) > 0
    gifs = sorted((out / "samples").glob("*.gif"))
    assert len(gifs) == 48 and (out / "overview.png").stat().st_size > 0
    assert (out / "samples" / "a_red_circle_moving_up.png").exists()  # a held-out caption
    # your own captions from the finished run (it took rebuilding the preset, two managers, the EMA and the stats),
    # restored onto shapes: building both models at random first compiled their initialisers only to overwrite them
    def no_random_model(*a, **k):
        raise AssertionError("load_video_model built a random model to restore onto")

    monkeypatch.setattr(train_video, "create_sharded", no_random_model)
    sample, p = train_video.load_video_model(out, "tiny")
    a, b = sample(["a red circle moving up", ""], cfg_scale=2.0), sample(["a red circle moving up", ""], seed=1)
    assert a.shape == (2, p.data.frames, p.data.size, p.data.size, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sample(["a red circle moving up", ""], cfg_scale=2.0)) and not np.array_equal(a, b)
    # a caption's video depends on its row, not on the other captions or the batch size (the docstring said the same
    # caption in another batch gave another video: sampled alone, it is row 0's of any batch)
    assert np.array_equal(sample(["a red circle moving up"], cfg_scale=2.0)[0], a[0])
    assert not np.array_equal(sample(["", "a red circle moving up"], cfg_scale=2.0)[1], a[0])  # another row
    with pytest.raises(ValueError, match="captions must be a non-empty list of strings"):
        sample([])  # (numpy's 'need at least one array to stack')
    for bad in (float("nan"), float("inf")):  # all-black videos
        with pytest.raises(ValueError, match=r"sample: cfg_scale=(nan|inf) must be a finite number"):
            sample(["a red circle moving up"], cfg_scale=bad)
    # media of an earlier evaluation are removed when one runs with --no-media (they showed the older model)
    assert train_video.remove_media(out) == ["overview.png", "samples"] and not (out / "samples").exists()
    assert train_video.remove_media(out) == []
    full = dataclasses.replace(p, t2v=dataclasses.replace(p.t2v, dit=dataclasses.replace(p.t2v.dit, attention="full")))
    with pytest.raises(ValueError, match=r"ckpt/t2v was trained with other settings \(t2v.dit.attention: "):
        train_video.load_video_model(out, full)


def test_checkpoint_round_trip_with_optimizer_state(tmp_path):
    # random values without the RNG: eager init compiles the initialisers shape by shape (seconds on CPU)
    abstract = nnx.state(nnx.eval_shape(lambda: VideoVAE(VAEConfig(channels=(8, 16), temporal_factor=2,
                                                                   spatial_factor=4), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract)
    opt = optax.adamw(1e-3)
    # one update: non-trivial moments and step count
    opt_state = jax.jit(lambda p: opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p), p)[1])(params)
    save(manager(tmp_path), 7, {"params": params, "opt_state": opt_state}, {"psnr": 12.5})
    blank = jax.tree.map(jnp.zeros_like, {"params": params, "opt_state": opt_state})
    step, trees, meta = restore(manager(tmp_path), blank)
    assert step == 7 and meta["psnr"] == 12.5 and meta["step"] == 7
    assert isinstance(trees["params"], nnx.State)
    assert int(trees["opt_state"][0].count) == 1 and float(jnp.abs(trees["opt_state"][0].mu["encoder"]["conv_in"]["w"][
        ...]).max()) > 0
    jax.tree.map(np.testing.assert_array_equal, trees, {"params": params, "opt_state": opt_state})
    assert restore(manager(tmp_path / "empty"), blank) is None


def test_a_diverged_stage_stops_by_name_and_saves_nothing(tmp_path):
    """The video trainer trained on through NaN losses, saved NaN checkpoints and reported results."""
    with pytest.raises(SystemExit, match=r"t2v diverged: \['diffusion'\] not finite at step 25"):
        train_video._check_finite("t2v", 25, {"diffusion": np.float32("nan"), "align": np.float32(1.0)})
    train_video._check_finite("t2v", 25, {"diffusion": np.float32(0.5)})
    with pytest.raises(NonFiniteState, match="refusing to save step 3: \\['ema'\\]"):
        save(manager(tmp_path), 3, {"params": {"w": jnp.ones(2)}, "ema": {"w": jnp.array([1.0, jnp.inf])}}, {})
    assert manager(tmp_path).latest_step() is None


def test_a_video_save_checks_finiteness_with_one_program_per_state(tmp_path):
    """save checked each tree (params, opt_state, ema) for NaN / Inf and then Checkpoints.save checked the whole
    state again: 3 finiteness programs compiled per stage (4 with an EMA) and two passes over the state every save.
    One now; the trees are checked one by one only to name the non-finite ones."""
    from experiments import lm_step

    trees = {"params": {"w": jnp.ones((3, 5)), "b": jnp.ones(7)}, "ema": {"w": jnp.ones((3, 5)), "b": jnp.ones(7)},
             "opt_state": {"mu": jnp.zeros((3, 5)), "n": jnp.zeros((), jnp.int32)}}
    before = lm_step._leaves_finite._cache_size()
    save(manager(tmp_path), 1, trees, {})
    save(manager(tmp_path), 2, trees, {})
    assert lm_step._leaves_finite._cache_size() == before + 1
    assert manager(tmp_path).steps() == [1, 2]


def test_latent_cache_is_encoded_again_after_more_vae_training(tmp_path):
    p = dataclasses.replace(train_video.PRESETS["tiny"], n_latents=2 * train_video.PRESETS["tiny"].eval_batch)
    calls = []

    def encode(video):  # stands for the VAE encoder: its latents tell which call made them
        calls.append(1)
        return np.full((len(video), 1), len(calls), np.float32)

    cache = tmp_path / "latents.npz"
    first = train_video.encode_latents(p, encode, cache)[0]
    assert len(calls) == 2
    np.testing.assert_array_equal(train_video.encode_latents(p, encode, cache)[0], first)  # cached
    assert len(calls) == 2
    # resumed with --vae-steps raised: the VAE trained on, so its latents are new
    again = train_video.encode_latents(dataclasses.replace(p, vae_steps=p.vae_steps + 10), encode, cache)[0]
    assert len(calls) == 4 and again.min() == 3
    # the same settings but other VAE parameters (retrained with another seed): encoded again too
    p2 = dataclasses.replace(p, vae_steps=p.vae_steps + 10)
    assert train_video.encode_latents(p2, encode, cache, "another-vae")[0].min() == 5 and len(calls) == 6
    # a cache cut short (the run killed while writing it) is encoded again, not a BadZipFile on every rerun
    cache.write_bytes(cache.read_bytes()[:100])
    assert train_video.encode_latents(p2, encode, cache, "another-vae")[0].min() == 7 and len(calls) == 8
    assert sorted(f.name for f in tmp_path.iterdir()) == ["latents.npz"]  # written through a renamed temp file
    # other data (here its seed) under the same VAE: other clips, encoded again (the key lacked the data: stale latents)
    p3 = dataclasses.replace(p2, data=dataclasses.replace(p.data, seed=5))
    _, _, combo = train_video.encode_latents(p3, encode, cache, "another-vae")
    assert len(calls) == 10
    # the DiT trains on the training split only: a held-out combination in its latents makes the held-out eval seen
    train_ids = {p.data.combos().index(c) for c in p.data.split_combos("train")}
    assert len(combo) == p.n_latents and set(combo.tolist()) <= train_ids


def test_a_latent_cache_write_that_raises_leaves_no_temporary_file(tmp_path, monkeypatch):
    """encode_latents writes latents.npz through latents.npz.tmp.npz: a write that raised part-way (a full disk,
    Ctrl-C) left the partial temporary in the run directory for good."""
    p = dataclasses.replace(train_video.PRESETS["tiny"], n_latents=train_video.PRESETS["tiny"].eval_batch)

    def half_then_full(file, *a, **k):
        file.write_bytes(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_full)
    with pytest.raises(OSError, match="No space"):
        train_video.encode_latents(p, lambda video: np.zeros((len(video), 1), np.float32), tmp_path / "latents.npz")
    assert list(tmp_path.iterdir()) == []


def test_bf16_ema_tracks_the_float32_average():
    # with decay near 1, (1 - decay)·(p - e) is below half an ulp of a bfloat16 e: an EMA kept in bf16 freezes
    params = {"w": jnp.asarray([0.5, 0.52, 0.6, 1.0], jnp.bfloat16)}
    ema = ema_init({"w": jnp.full((4,), 0.5, jnp.bfloat16)})

    def body(i, e):  # decay as make_t2v_step computes it (weakly typed: it keeps e's dtype)
        n = 9000 + i  # decay at its 0.999 cap
        return ema_update(e, params, jnp.minimum(0.999, (1.0 + n) / (10.0 + n)))

    ema = jax.jit(lambda e: jax.lax.fori_loop(0, 1000, body, e))(ema)
    n = np.arange(9000, 10000)
    decays = np.minimum(0.999, (1 + n) / (10 + n))
    want = 0.5 + (np.asarray(params["w"], np.float64) - 0.5) * (1 - np.prod(decays))  # e_n - p = (e_0 - p)·∏d
    np.testing.assert_allclose(ema["w"], want, rtol=1e-5)  # 63% of the way to p
    assert ema["w"].dtype == jnp.float32 and ema_cast(ema, params)["w"].dtype == jnp.bfloat16


def test_resume_under_other_settings_is_refused_before_any_compute(tmp_path, capsys):
    p = train_video.PRESETS["tiny"]
    tree = {"params": {"w": jnp.ones((2,))}}
    for stage in ("vae", "t2v"):
        meta = {"step": 3, "settings": train_video.stage_settings(p, 0)[stage]}
        save(manager(tmp_path / "ckpt" / stage), 3, tree, meta)
    train_video.check_resume(p, tmp_path, 0)  # same settings
    # a --preset tiny run loaded as the docstring shows, with the default preset: the error names the preset the run
    # matches (it said "pass the preset (and overrides) the run used", naming neither the argument nor the preset)
    with pytest.raises(ValueError, match=r"other settings \(data.frames: 5 -> 9; .*\); pass preset='tiny' \(the"):
        train_video.load_video_model(tmp_path)
    with pytest.raises(ValueError, match=r"preset='tinyy' is not one of \['default', 'tiny'\]"):  # was a KeyError
        train_video.load_video_model(tmp_path, "tinyy")
    train_video.check_resume(dataclasses.replace(p, dit_steps=9), tmp_path, 0)  # training on is fine
    with pytest.raises(SystemExit, match="t2v: .* is at step 3, past --dit-steps 2"):  # fewer steps: not that model
        train_video.check_resume(dataclasses.replace(p, dit_steps=2), tmp_path, 0)
    # fewer steps *and* other settings (another preset's run): the settings, which more steps would not fix (it said
    # to pass --dit-steps >= 3, and that run then failed on the settings)
    with pytest.raises(SystemExit, match=r"t2v: .* was trained with other settings \(dit_lr: "):
        train_video.check_resume(dataclasses.replace(p, dit_steps=2, dit_lr=p.dit_lr / 2), tmp_path, 0)
    with pytest.raises(SystemExit, match=r"t2v: .* other settings \(ema_decay: 0.999 -> 0.99\)"):  # weights of two
        train_video.check_resume(dataclasses.replace(p, ema_decay=0.99), tmp_path, 0)  # averages in one EMA
    more_vae = dataclasses.replace(p, vae_steps=6)  # new latents: the DiT was trained on the old ones
    with pytest.raises(SystemExit, match=r"t2v: .* was trained with other settings \(latents.vae_steps: 3 -> 6\)"):
        train_video.check_resume(more_vae, tmp_path, 0)  # (it said '(latents)', naming no field)
    # load_video_model takes the run's own step counts: the settings pass, and the missing stats are what it names
    with pytest.raises(FileNotFoundError, match="latent_stats.json is missing"):
        train_video.load_video_model(tmp_path, more_vae)
    # ... and not how the run trained (a run trained with --dit-lr could not be loaded by its preset)
    with pytest.raises(FileNotFoundError, match="latent_stats.json is missing"):
        train_video.load_video_model(tmp_path, dataclasses.replace(p, dit_lr=p.dit_lr / 2, vae_lr=p.vae_lr / 2,
                                                                  dit_batch=2 * p.dit_batch))
    other_shift = dataclasses.replace(p, t2v=dataclasses.replace(
        p.t2v, diffusion=dataclasses.replace(p.t2v.diffusion, shift=2.0)))
    shift = p.t2v.diffusion.shift
    with pytest.raises(SystemExit, match=rf"t2v: .*\(t2v.diffusion.shift: {shift} -> 2.0\); rerun with the settings"):
        train_video.check_resume(other_shift, tmp_path, 0)
    with pytest.raises(ValueError, match=rf"load_video_model: .*\(t2v.diffusion.shift: {shift} -> 2.0\)"):
        train_video.load_video_model(tmp_path, other_shift)  # the model it samples with: still checked
    with pytest.raises(SystemExit, match=r"vae: .*\(seed: 0 -> 1\)"):
        train_video.check_resume(p, tmp_path, 1)
    # training on to more steps rebuilds the LR schedule for the new total: said at the resume (it was silent)
    assert "rebuilt for 5" in train_video._stretched({"total_steps": 3}, 5, "--dit-steps")
    assert "rebuilt for 3" in train_video._stretched({"total_steps": 5}, 3, "--dit-steps")
    assert train_video._stretched({"total_steps": 5}, 5, "--dit-steps") == train_video._stretched({}, 5, "x") == ""
    # settings saved as whole-config reprs (before they were saved field by field) still check
    legacy = {k: v for k, v in train_video.stage_settings(p, 0)["t2v"].items() if not k.startswith("t2v.")}
    save(manager(tmp_path / "legacy" / "ckpt" / "t2v"), 3, tree, {"step": 3, "settings": legacy | {"t2v": repr(p.t2v)}})
    train_video.check_resume(p, tmp_path / "legacy", 0)
    with pytest.raises(SystemExit, match=rf"other settings \(t2v: shift={shift} -> shift=2.0\)"):
        train_video.check_resume(other_shift, tmp_path / "legacy", 0)
    # settings saved before a config field existed (the text encoder's qk_norm, local_rope_theta): its default is
    # what that run trained with, so it resumes (every video run saved before them was refused: "(absent) -> False");
    # another value is refused, by name
    added = ("t2v.text.qk_norm", "t2v.text.local_rope_theta", "t2v.text.qk_norm_scope", "t2v.text.pre_norms")
    before = {k: v for k, v in train_video.stage_settings(p, 0)["t2v"].items() if k not in added}
    save(manager(tmp_path / "before" / "ckpt" / "t2v"), 3, tree, {"step": 3, "settings": before})
    train_video.check_resume(p, tmp_path / "before", 0)
    text_qk = dataclasses.replace(p, t2v=dataclasses.replace(p.t2v, text=dataclasses.replace(p.t2v.text,
                                                                                                qk_norm=True)))
    with pytest.raises(SystemExit, match=r"other settings \(t2v.text.qk_norm: False -> True\)"):
        train_video.check_resume(text_qk, tmp_path / "before", 0)
    save(manager(tmp_path / "old" / "ckpt" / "t2v"), 3, tree, {"step": 3})  # written before settings were saved
    train_video.check_resume(more_vae, tmp_path / "old", 0)
    assert "predates saved settings" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["vae", "t2v"])
def test_load_video_model_of_a_run_whose_only_checkpoint_is_damaged_names_the_stage(tmp_path, stage):
    """Each stage's record reads but its arrays do not: the read-only restore skipped the step (left in place) and
    returned None, which load_video_model indexed: "TypeError: 'NoneType' object is not subscriptable"."""
    from models.video import TextToVideo
    from parallel import make_mesh

    p = train_video.PRESETS["tiny"]
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    trees = {"vae": {"params": placed(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), mesh)[1]},
             "t2v": {"ema": ema_init(placed(lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(0)), mesh)[1])}}
    for s, tree in trees.items():
        save(manager(tmp_path / "ckpt" / s), 3, tree, {"step": 3, "settings": train_video.stage_settings(p, 0)[s]})
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    for f in (tmp_path / "ckpt" / stage / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # every array's data and b-tree nodes
            data = f.read_bytes()
            f.write_bytes(data[:64] + bytes(255 - b for b in data[64:]))
    with pytest.raises(FileNotFoundError, match=rf"ckpt/{stage} holds no readable checkpoint \(step 3 failed to "
                                                r"read or verify\); rerun the run's train_video command"):
        train_video.load_video_model(tmp_path, "tiny")
    assert (tmp_path / "ckpt" / stage / "3").is_dir()  # a reader moves nothing


def test_load_video_model_of_a_mistyped_run_folder_creates_nothing(tmp_path):
    """It opened each stage's orbax manager with create=True: a typo left <typo>/ckpt/vae behind (then said it held
    no checkpoint)."""
    with pytest.raises(FileNotFoundError, match=r"typo/ckpt/vae holds no checkpoint: pass a train_video run's --out"):
        train_video.load_video_model(tmp_path / "typo", "tiny")
    assert not (tmp_path / "typo").exists()


def test_an_out_that_cannot_be_a_directory_is_refused_naming_the_flag(tmp_path, capsys):
    """--out below a file failed in mkdir with a NotADirectoryError traceback (train_lm's validate named
    train.out): refused as argument --out before anything is built."""
    (tmp_path / "f").write_text("a file")
    for out, why in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "run", "cannot be created: .* is a file")):
        with pytest.raises(SystemExit):
            train_video.main(["--preset", "tiny", "--out", str(out)])
        assert re.search(f"argument --out: .*{why}; name a directory", capsys.readouterr().err), out
    # a file named ckpt in it: the first stage trained to its first save, which failed (NotADirectoryError)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt").write_text("a file")
    with pytest.raises(SystemExit):
        train_video.main(["--preset", "tiny", "--out", str(tmp_path / "run")])
    assert re.search(r"argument --out: '.*run/ckpt' is a file; name a directory", capsys.readouterr().err)


def test_a_one_process_job_that_started_jax_distributed_is_not_refused(monkeypatch, capsys):
    """`initialize()` says whether it started jax.distributed, not whether the job has several processes: a one-host
    TPU VM whose environment names TPU_WORKER_HOSTNAMES starts it with one process, and the trainer refused that as
    "this job has 1 processes". A stand-in that started it here (this process alone): the run goes on to its own
    checks (a bad --dit-lr, refused next)."""
    import parallel.distributed

    monkeypatch.setattr(parallel.distributed, "initialize", lambda *a, **k: True)
    assert jax.process_count() == 1
    with pytest.raises(SystemExit):
        train_video.main(["--preset", "tiny", "--dit-lr", "inf"])
    err = capsys.readouterr().err
    assert "argument --dit-lr" in err and "runs in one process" not in err, err


def test_fresh_deletes_nothing_until_every_argument_is_checked(tmp_path, capsys):
    """--fresh removed the run directory; then a typo in --mesh / --scales (or too big a mesh) failed the run."""
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "kept").write_text("trained")
    for bad in (["--mesh", "data=two"], ["--mesh", "data=3"], ["--scales", "1,,2"], ["--seed", "-1"],
                ["--shift", "0"], ["--shift", "inf"], ["--dit-lr", "inf"], ["--scales", "nan,1"],  # inf: NaN runs
                ["--scales", "-1,0"], ["--scales", "0.5,4"],  # the targets were judged on unguided samples
                ["--mesh", "tensor=8"],  # the DiT's 2 heads: found by create_sharded, after the deletion
                ["--seed", str(2**32)], ["--seed", str(2**64)]):  # the data's 32-bit shuffle, after both models' init
        with pytest.raises(SystemExit):
            train_video.main(["--preset", "tiny", "--out", str(run), "--fresh", *bad])
        assert (run / "ckpt" / "kept").exists(), bad
        assert f"argument {bad[0]}" in capsys.readouterr().err
    # --fresh deletes a video run's own directory, never one holding other files (--out runs, a typo'd path)
    (run / "notes.txt").write_text("not a run's")
    with pytest.raises(SystemExit):
        train_video.main(["--preset", "tiny", "--out", str(run), "--fresh"])
    assert "holds files this script does not write (notes.txt)" in capsys.readouterr().err
    assert (run / "notes.txt").exists() and (run / "ckpt" / "kept").exists()
    # a preset whose VAE latents the DiT cannot take is refused when it is built, not after the VAE's training
    p = train_video.PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"Preset: the VAE makes latents .* but the DiT takes"):
        dataclasses.replace(p, data=dataclasses.replace(p.data, size=2 * p.data.size))
    # a text encoder that cannot take the captions: ids past its table read NaN under jit (a NaN run), a caption
    # longer than its max_seq_len failed only after the VAE's stage
    text = lambda **kw: dataclasses.replace(p, t2v=dataclasses.replace(p.t2v, text=dataclasses.replace(  # noqa: E731
        p.t2v.text, **kw)))
    for vocab in (8, 14):  # 14: the last id (14) past the table
        with pytest.raises(ValueError, match=rf"Preset: t2v.text.vocab_size={vocab} < the 15 caption token ids"):
            text(vocab_size=vocab)
    text(vocab_size=15)
    with pytest.raises(ValueError, match=r"Preset: t2v.text.max_seq_len=7 < data.max_caption_len=8"):
        text(max_seq_len=7)
    text(max_seq_len=8)
    with pytest.raises(ValueError, match=r"Preset: t2v.dit.param_dtype='bfloat16': Adam's updates smaller"):
        dataclasses.replace(p, t2v=dataclasses.replace(p.t2v, dit=dataclasses.replace(p.t2v.dit,
                                                                                       param_dtype="bfloat16")))


def test_a_stage_mesh_axis_is_refused_since_the_video_models_do_not_pipeline(tmp_path, capsys, monkeypatch):
    """The video models have no pipeline: a 'stage' axis only split their layer stacks while every stage device ran
    the same rows (the t2v gradient on {stage 2, data 4}: 4.57e6 FLOPs per device, as {data 4}; {data 8} 2.29e6).
    The default preset's stacks divide stage=2, so it was accepted and trained at 2x the per-device work; the tiny
    preset's one-layer stacks were refused with 'use a config n_layers that is a multiple of 2', advice that led
    there. Refused by name before anything is built or deleted."""
    monkeypatch.setattr(train_video, "check_resume", lambda *a: pytest.fail("--mesh stage=2 passed the checks"))
    for preset in ("default", "tiny"):
        with pytest.raises(SystemExit):
            train_video.main(["--preset", preset, "--out", str(tmp_path / "run"), "--mesh", "stage=2,data=4"])
        err = capsys.readouterr().err
        assert re.search(r"argument --mesh: .*no pipeline.*stage=2.*e\.g\. --mesh data=8", err), err


@pytest.mark.parametrize("preset,sequence,named", [
    ("default", 8, r"DiT's 12 tokens \(grid \(3, 2, 2\) of t2v\.dit\.latent_shape \(3, 8, 8\) / patch \(1, 4, 4\)\)"),
    ("tiny", 4, r"caption length 6 \(data\.max_caption_len\)"),
])
def test_a_sequence_axis_that_does_not_split_the_tokens_is_refused_before_any_work(tmp_path, monkeypatch, preset,
                                                                                 sequence, named):
    """--mesh sequence=n splits the DiT's T'·H'·W' tokens and the captions' L (act_seq): where n divided neither, the
    run trained and saved the VAE stage and encoded its latents, then failed at the DiT stage's first batch ("a
    sequence length", not a field of the preset). Refused by name before anything is built, run or deleted."""
    p = train_video.PRESETS[preset]
    if preset == "default":  # 12 tokens of (1, 4, 4) patches on {sequence: 8}
        p = dataclasses.replace(p, t2v=dataclasses.replace(p.t2v, dit=dataclasses.replace(p.t2v.dit, patch=(1, 4, 4))))
    else:  # 8 tokens, captions of 6 on {sequence: 4}
        p = dataclasses.replace(p, data=dataclasses.replace(p.data, max_caption_len=6))
    monkeypatch.setitem(train_video.PRESETS, preset, p)
    monkeypatch.setattr(train_video, "_run", lambda *a: pytest.fail(f"--mesh sequence={sequence} passed the checks"))
    with pytest.raises(SystemExit, match=rf"--mesh: sequence={sequence} splits the {named}, which it does not divide"):
        train_video.main(["--preset", preset, "--out", str(tmp_path / "run"), "--mesh", f"data=-1,sequence={sequence}"])
    assert not (tmp_path / "run").exists()


def test_vae_and_t2v_steps_fit_a_fixed_batch():
    """The two training steps, on one fixed batch of the tiny preset: the loss falls (a sign or wiring bug in either
    step's loss, gradient or update would not), and the EMA follows the params."""
    import optax
    from flax import nnx

    from data.moving_shapes import caption, encode_caption, null_tokens, render
    from experiments.video_steps import ema_init, make_t2v_step, make_vae_step
    from models.video import TextToVideo, VideoVAE

    p = train_video.PRESETS["tiny"]
    rng = np.random.default_rng(0)
    combos = p.data.combos()[:4]
    clips = jnp.asarray(np.stack([render(p.data, c, rng) for c in combos]))
    gd, params = nnx.split(VideoVAE(p.vae, rngs=nnx.Rngs(0)))
    opt = optax.adam(3e-3)
    step, state = make_vae_step(gd, opt), (params, opt.init(params))
    losses = []
    for _ in range(25):
        *state, m = step(*state, clips, jax.random.key(0))  # one noise draw: a fixed objective
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses

    gd, params = nnx.split(TextToVideo(p.t2v, rngs=nnx.Rngs(0)))
    batch = {"latents": jnp.asarray(rng.standard_normal((4, *p.t2v.dit.latent_shape, p.t2v.dit.latent_channels)),
                                     jnp.float32),
             "tokens": jnp.asarray(np.stack([encode_caption(caption(*c), p.data.max_caption_len) for c in combos])),
             "caption_id": jnp.arange(4)}
    opt = optax.adam(3e-3)
    step = make_t2v_step(gd, opt, null_tokens(p.data.max_caption_len), ema_decay=0.9)
    init = jax.tree.map(jnp.copy, params)  # the step donates params
    state, losses = (params, opt.init(params), ema_init(params)), []
    for i in range(25):
        *state, m = step(*state, batch, jax.random.key(0), jnp.int32(i))
        losses.append(float(m["loss"]))
        if i == 0:  # the decay warms up as min(0.9, (1 + n) / (10 + n)): 0.1 at n = 0 (a fixed 0.9 passed)
            # in numpy (float32, as jax's): eagerly each leaf's arithmetic compiled its own small programs
            jax.tree.map(lambda e, p, p0: np.testing.assert_allclose(e, p0 + 0.9 * (p - p0), rtol=1e-5, atol=1e-7),
                         *jax.device_get((state[2], state[0], init)))
    assert losses[-1] < 0.7 * losses[0], losses
    def gap(a, b):
        return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    ema, params, init = jax.device_get((state[2], state[0], init))
    assert gap(ema, init) > 0 and gap(ema, params) > 0  # the average moved, and lags the params


def _fake_t2v_step(seen):
    """Stands for make_t2v_step: each step adds 1 to the params and halves the EMA's gap to them; `seen` gets each
    step number."""
    def fake_make(graphdef, opt, null, decay, shardings=None):
        def step(params, opt_state, ema, batch, key, n):
            seen.append(int(n))
            params = jax.tree.map(lambda x: x + 1.0, params)
            return params, opt_state, jax.tree.map(lambda e, q: e + 0.5 * (q - e), ema, params), {
                "diffusion": jnp.float32(0.1)}
        return step

    return fake_make


def test_t2v_training_warms_its_ema_up_by_step_and_samples_with_it(tmp_path, monkeypatch):
    """train_t2v hands the step function each 1-based step (the EMA warm-up reads it) and returns the EMA's weights
    for sampling, not the raw parameters (either bug passed every test but the tiny preset's, which checks ranges)."""
    from parallel import make_mesh

    seen = []
    monkeypatch.setattr(train_video, "make_t2v_step", _fake_t2v_step(seen))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    z = np.zeros((16, 2, 4, 4, 4), np.float32)
    with jax.set_mesh(mesh):
        _, w = train_video.train_t2v(train_video.PRESETS["tiny"], tmp_path, mesh, 0, None,
                                     {"w": jnp.zeros((4,), jnp.float32)}, z, np.zeros((16, 8), np.int32),
                                     np.zeros(16, np.int32))
    assert seen == [1, 2, 3]
    np.testing.assert_allclose(np.asarray(w["w"]), 2.125)  # e += (p - e) / 2 for p = 1, 2, 3; the params are 3


def test_a_corrupt_newest_video_checkpoint_falls_back_to_the_previous_step(tmp_path, monkeypatch, capsys):
    """Bit rot in the newest step stopped train_video with an orbax error (its checkpoints had no checksum and no
    fallback, unlike train_lm's): now the step is reported, set aside in ckpt/t2v-corrupt and the stage resumes from
    the step before; a reader (load_video_model) skips it but leaves it in place."""
    from parallel import make_mesh

    seen = []
    monkeypatch.setattr(train_video, "make_t2v_step", _fake_t2v_step(seen))
    p = dataclasses.replace(train_video.PRESETS["tiny"], dit_steps=6)  # saves at 3 and 6
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    z, tok, combo = np.zeros((16, 2, 4, 4, 4), np.float32), np.zeros((16, 8), np.int32), np.zeros(16, np.int32)

    def train():
        with jax.set_mesh(mesh):
            return train_video.train_t2v(p, tmp_path, mesh, 0, None, {"w": jnp.zeros((4,), jnp.float32)}, z, tok,
                                         combo)[1]["w"]

    stage = tmp_path / "ckpt" / "t2v"

    def rot():  # flip the bits of step 6's array data, keeping every file's size
        files = [f for f in (stage / "6").rglob("*") if f.is_file() and f.parent.name == "d"]
        for f in files:
            f.write_bytes(bytes(255 - b for b in f.read_bytes()))
        assert files

    w6 = np.asarray(train())
    assert seen == [1, 2, 3, 4, 5, 6]
    rot()
    capsys.readouterr()
    np.testing.assert_array_equal(train(), w6)  # resumed from 3, and steps 4-6 again make the same EMA
    assert seen[6:] == [4, 5, 6]
    printed = capsys.readouterr().out
    assert "checkpoint: step 6 is corrupt or incomplete" in printed and "falling back to step 3" in printed, printed
    assert (tmp_path / "ckpt" / "t2v-corrupt" / "6").is_dir() and train_video.manager(stage).steps() == [3, 6]
    rot()
    got = train_video.restore(train_video.manager(stage, read_only=True), {"ema": {"w": jnp.zeros(4)}})
    assert got[0] == 3 and (stage / "6").is_dir()  # a reader (load_video_model): skipped, left in place


def test_a_video_checkpoint_of_one_item_per_tree_still_restores(tmp_path, capsys):
    """Written before the video trainer used `Checkpoints` (params / opt_state / ema as orbax items beside the
    record, no checksum): resumed and sampled as before, never set aside as corrupt."""
    handlers = {k: array_tree_handler() for k in ("params", "opt_state", "ema")} | {"meta": ocp.JsonCheckpointHandler()}
    old = ocp.CheckpointManager(tmp_path.absolute(), options=ocp.CheckpointManagerOptions(create=True),
                                item_handlers=handlers)
    old.save(3, args=ocp.args.Composite(params=ocp.args.PyTreeSave({"w": jnp.arange(3.0)}),
                                        ema=ocp.args.PyTreeSave({"w": jnp.ones(3)}),
                                        meta=ocp.args.JsonSave({"step": 3, "total_steps": 3})))
    old.wait_until_finished()
    assert train_video.latest_meta(manager(tmp_path))[1]["total_steps"] == 3
    step, trees, meta = restore(manager(tmp_path), {"params": {"w": jnp.zeros(3)}, "ema": {"w": jnp.zeros(3)}})
    assert step == 3 and meta["step"] == 3 and "predates checksummed video checkpoints" in capsys.readouterr().out
    np.testing.assert_array_equal(trees["params"]["w"], [0, 1, 2])
    assert restore(manager(tmp_path, read_only=True), {"ema": {"w": jnp.zeros(3)}})[1]["ema"]["w"].sum() == 3
    assert not (tmp_path.parent / f"{tmp_path.name}-corrupt").exists()


def test_a_damaged_one_item_per_tree_step_falls_back_and_another_models_is_kept(tmp_path, capsys):
    """A one-item-per-tree step with a truncated array file raised orbax's raw read error out of restore (nothing
    older was tried); it is now set aside as corrupt like a new-layout step. One of another model size is a
    mismatch, kept where it is."""
    handlers = {k: array_tree_handler() for k in ("params", "ema")} | {"meta": ocp.JsonCheckpointHandler()}
    old = ocp.CheckpointManager(tmp_path.absolute(), options=ocp.CheckpointManagerOptions(create=True),
                                item_handlers=handlers)
    for s in (3, 6):
        old.save(s, args=ocp.args.Composite(params=ocp.args.PyTreeSave({"w": jnp.arange(3.0) + s}),
                                            ema=ocp.args.PyTreeSave({"w": jnp.ones(3)}),
                                            meta=ocp.args.JsonSave({"step": s, "total_steps": 6})))
    old.wait_until_finished()
    for f in (tmp_path / "6" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:5])  # a killed copy
    step, trees, _ = restore(manager(tmp_path), {"params": {"w": jnp.zeros(3)}, "ema": {"w": jnp.zeros(3)}})
    assert step == 3 and "step 6 is corrupt or incomplete" in capsys.readouterr().out
    np.testing.assert_array_equal(trees["params"]["w"], [3, 4, 5])
    assert (tmp_path.parent / f"{tmp_path.name}-corrupt" / "6").is_dir()
    with pytest.raises(CheckpointMismatch, match=r"w: saved \(3,\), now \(5,\)"):
        restore(manager(tmp_path), {"params": {"w": jnp.zeros(5)}, "ema": {"w": jnp.zeros(5)}})
    assert (tmp_path / "3").is_dir()


def test_a_corrupt_new_step_falls_back_to_an_older_layout_step_not_past_it(tmp_path, capsys):
    """A run resumed from a one-item-per-tree checkpoint (step 3) saves step 6 in the new layout; with step 6 corrupt,
    the fallback reached step 3 through `Checkpoints.restore`, which could not read its layout ('Unknown key:
    state'), set the good step aside as corrupt too and started the stage fresh (a reader got None)."""
    handlers = {k: array_tree_handler() for k in ("params", "opt_state", "ema")} | {"meta": ocp.JsonCheckpointHandler()}
    old = ocp.CheckpointManager(tmp_path.absolute(), options=ocp.CheckpointManagerOptions(create=True),
                                item_handlers=handlers)
    old.save(3, args=ocp.args.Composite(params=ocp.args.PyTreeSave({"w": jnp.arange(3.0)}),
                                        ema=ocp.args.PyTreeSave({"w": jnp.ones(3)}),
                                        meta=ocp.args.JsonSave({"step": 3})))
    old.wait_until_finished()
    save(manager(tmp_path), 6, {"params": {"w": jnp.arange(3.0) + 6}, "ema": {"w": jnp.full(3, 6.0)}}, {})
    for f in [f for f in (tmp_path / "6").rglob("*") if f.is_file() and f.parent.name == "d"]:
        f.write_bytes(bytes(255 - b for b in f.read_bytes()))  # bit rot in step 6's arrays
    template = {"params": {"w": jnp.zeros(3)}, "ema": {"w": jnp.zeros(3)}}
    assert restore(manager(tmp_path, read_only=True), template)[0] == 3  # a reader: skipped, left in place
    step, trees, meta = restore(manager(tmp_path), template)
    assert step == 3 and meta["step"] == 3 and "falling back to step 3" in capsys.readouterr().out
    np.testing.assert_array_equal(trees["params"]["w"], [0, 1, 2])
    assert manager(tmp_path).steps() == [3]
    assert sorted(p.name for p in (tmp_path.parent / f"{tmp_path.name}-corrupt").iterdir()) == ["6"]


def _finished_tiny_run(tmp_path, monkeypatch):
    """A finished tiny run's folder for load_video_model: its checkpoints' metadata, restore and generate mocked
    (zeros of the right shapes), its ckpt/vae and ckpt/t2v folders made."""
    p = train_video.PRESETS["tiny"]
    settings = train_video.stage_settings(p, 0)
    monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (
        3, {"settings": settings["vae" if "vae" in str(mgr.dir) else "t2v"]}))
    monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None: (
        3, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v) for k, v in targets.items()}, {}))
    monkeypatch.setattr(train_video, "generate", lambda model, tok, null, key, scale, steps: jnp.zeros(
        (tok.shape[0], *p.t2v.dit.latent_shape, p.t2v.dit.latent_channels)))
    for stage in ("vae", "t2v"):  # a run's checkpoint folders (their contents are the mocks above)
        (tmp_path / "ckpt" / stage).mkdir(parents=True)


def test_a_finished_run_decodes_with_its_latent_stats_in_order(tmp_path, monkeypatch):
    """load_video_model denormalises with latent_stats.json's (mean, std), in that order (swapped, every test but the
    tiny preset's passed; it only checks ranges)."""
    _finished_tiny_run(tmp_path, monkeypatch)
    got = []
    monkeypatch.setattr(train_video, "denormalize", lambda z, stats: got.append([np.asarray(s) for s in stats]) or z)
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [1.0, 2.0, 3.0, 4.0], "std": [5.0, 6.0, 7.0, 8.0]}))
    sample, _ = train_video.load_video_model(tmp_path, "tiny")
    sample(["a red circle moving up"])
    np.testing.assert_array_equal(got[0][0], [1, 2, 3, 4])
    np.testing.assert_array_equal(got[0][1], [5, 6, 7, 8])
    # read by name, not by the order of the file's keys (a file written 'std' first was denormalised swapped)
    (tmp_path / "latent_stats.json").write_text(json.dumps({"std": [5.0, 6.0, 7.0, 8.0], "mean": [1.0, 2.0, 3.0, 4.0]}))
    got.clear()
    train_video.load_video_model(tmp_path, "tiny")[0](["a red circle moving up"])
    np.testing.assert_array_equal(got[0][0], [1, 2, 3, 4])
    np.testing.assert_array_equal(got[0][1], [5, 6, 7, 8])
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [1.0, 2.0, 3.0, 4.0]}))
    with pytest.raises(ValueError, match=r"latent_stats.json must hold the latents' per-channel \{\"mean\""):
        train_video.load_video_model(tmp_path, "tiny")


def test_load_video_model_refuses_latent_stats_not_one_per_latent_channel(tmp_path, monkeypatch):
    """latent_stats.json holds one (mean, std) per latent channel: a single value was broadcast over every channel and
    sampled silently, and 8 values for the tiny preset's 4 channels failed in the sampler as a bare broadcasting
    error naming no file; a NaN or zero std gave NaN / collapsed videos."""
    _finished_tiny_run(tmp_path, monkeypatch)
    for mean, std in (([0.5], [0.4]), ([0.5] * 8, [0.4] * 8), ([0.5] * 4, [0.4, 0.4, 0.0, 0.4]),
                      ([0.5, None, 0.5, 0.5], [0.4] * 4)):
        (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
        with pytest.raises(ValueError, match=r"latent_stats.json: '(mean|std)' must be 4 finite numbers.*"
                                             r"latent_channels=4"):
            train_video.load_video_model(tmp_path, "tiny")[0](["a red circle moving up"])


def test_evaluation_draws_new_noise_per_chunk_and_the_same_at_every_scale():
    """run_eval: each chunk of prompts its own noise (one key for all made every chunk's samples alike), and every
    guidance scale the same noise, so the scales differ by guidance alone."""
    from data.moving_shapes import MovingShapesConfig, null_tokens
    from experiments.video_eval import run_eval

    cfg = MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2))
    keys = {}

    def gen_fn(tok, key, scale):
        keys.setdefault(float(scale), []).append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
        return np.zeros((len(tok), 5, 16, 16, 3), np.float32) - 1

    run_eval(gen_fn, lambda x: x, None, cfg, scales=(1.0, 2.0), per_seen=1, per_held=1, batch=16,
             null_L=null_tokens(cfg.max_caption_len))
    assert len(keys[2.0]) > 1 and len(set(keys[2.0])) == len(keys[2.0])
    assert keys[1.0][:len(keys[2.0])] == keys[2.0]


def test_a_resumed_stage_drops_its_interrupted_attempts_events_but_not_the_other_stages(tmp_path, monkeypatch):
    """Killed after logging VAE step 2 but before saving it, a run resumes the VAE at step 1 and logs step 2 again:
    TensorBoard's Python loader showed both attempts at step 2. A restart marker (SessionLog START) at the
    resumed step + 1 drops every earlier event at that step or later on its step axis: the stages share none (tb/vae,
    tb/t2v), so the DiT's marker cannot drop the VAE's events of the same step numbers."""
    from experiments.lm_step import make_optimizer
    from parallel import init_optimizer, make_mesh
    from tests.test_train_checkpoint import tb_as_python_loader_reads

    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=2, ckpt_every=1)
    # the events are the point, not the VAE's update: a stand-in step (psnr 20), one jitted program for its tree
    monkeypatch.setattr(train_video, "make_vae_step", lambda *a: jax.jit(_fake_vae_step(*a)))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    gd, params = placed(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), mesh)
    opt_state = init_optimizer(make_optimizer(p.vae_lr, total_steps=2, warmup_steps=0, weight_decay=0.0), params)
    save(manager(tmp_path / "ckpt" / "vae"), 1, {"params": params, "opt_state": opt_state}, {"step": 1})
    killed = train_video.stage_logger(tmp_path, "vae")  # the interrupted attempt: step 2 logged, not saved
    killed.write({"kind": "vae", "step": 1, "psnr": 4.0})
    killed.write({"kind": "vae", "step": 2, "psnr": -1.0})
    killed.flush()
    dit = train_video.stage_logger(tmp_path, "t2v")  # the other stage's events at the same step numbers
    dit.write({"kind": "t2v", "step": 2, "diffusion": 0.5})
    dit.close()
    time.sleep(0.01)  # the resumed attempt's events file sorts after the killed one's
    with jax.set_mesh(mesh):
        train_video.train_vae(p, tmp_path, mesh, 0, gd, params, log := train_video.stage_logger(tmp_path, "vae"))
    log.close()
    killed.close()
    vae = tb_as_python_loader_reads(tmp_path / "tb" / "vae")["vae/psnr"]
    assert [s for s, _ in vae] == [1, 2] and vae[0][1] == 4.0 and vae[1][1] != -1.0, vae
    assert tb_as_python_loader_reads(tmp_path / "tb" / "t2v") == {"t2v/diffusion": [(2, 0.5)]}


def _signalled_at(make, at: int, sig=None):
    """Wraps make_vae_step / make_t2v_step: the step function raises `sig` (SIGTERM) at its `at`-th call, as a
    preemption arriving mid-step would, after dispatching that step."""
    import signal

    def wrapped(*a, **k):
        step, calls = make(*a, **k), []

        def signalled(*args):
            out = step(*args)
            calls.append(1)
            if len(calls) == at:
                signal.raise_signal(sig or signal.SIGTERM)
            return out
        return signalled

    return wrapped


def _fake_vae_step(graphdef, opt, shardings=None):
    """Stands for make_vae_step: each step adds the clip batch's mean to the params (so a step's data shows)."""
    def step(params, opt_state, video, key):
        metrics = {"psnr": jnp.float32(20.0), "kl": jnp.float32(1.0)}
        return jax.tree.map(lambda x: x + jnp.mean(video), params), opt_state, metrics

    return step


def test_sigterm_in_either_stage_saves_that_step_and_a_rerun_ends_bit_identical(tmp_path, monkeypatch, capsys):
    """SIGTERM / Ctrl-C killed the video trainer at once: a preempted job lost every step since the last checkpoint
    (up to ckpt_every - 1 = 499 with the default preset). Now a stage caught by run_log.Stop finishes its step,
    saves it in the usual checkpoint and returns; the rerun resumes there and ends as an uninterrupted run (the DiT
    with its real step; the VAE's stands in for its)."""
    import signal

    from experiments.run_log import Stop
    from models.video import TextToVideo
    from parallel import make_mesh

    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=3, dit_steps=3, ckpt_every=100)  # saves: the last
    monkeypatch.setattr(train_video, "make_vae_step", _fake_vae_step)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    t2v_gd, t2v0 = placed(lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(0)), mesh)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((16, *p.t2v.dit.latent_shape, p.t2v.dit.latent_channels)).astype(np.float32)
    tok = np.stack([train_video.encode_caption(train_video.caption(*c), p.data.max_caption_len)
                    for c in p.data.combos()[:16]])
    combo = np.arange(16, dtype=np.int32)

    def run(stage, out, stop=None):  # one stage; the steps donate their inputs: each run starts from copies
        with jax.set_mesh(mesh):
            if stage == "vae":
                return train_video.train_vae(p, out, mesh, 0, None, {"w": jnp.zeros(4)}, stop=stop)[1]
            return train_video.train_t2v(p, out, mesh, 0, t2v_gd, jax.tree.map(jnp.copy, t2v0), z, tok, combo,
                                         stop=stop)[1]

    for stage, sig in (("t2v", signal.SIGTERM), ("vae", signal.SIGINT)):
        want, out = run(stage, tmp_path / "ref"), tmp_path / stage
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        make = {"vae": "make_vae_step", "t2v": "make_t2v_step"}[stage]
        with monkeypatch.context() as m:
            m.setattr(train_video, make, _signalled_at(getattr(train_video, make), 2, sig))
            stop = Stop()
            try:
                run(stage, out, stop)
            finally:
                stop.restore()
        assert {s: signal.getsignal(s) for s in before} == before
        assert stop.signal == sig.name
        assert f"{sig.name}: saved {stage} step 2; exiting" in capsys.readouterr().out
        assert manager(out / "ckpt" / stage).steps() == [2]  # the step it was on (no regular save before 3)
        got = run(stage, out)  # the rerun: resumes at 2
        printed = capsys.readouterr().out
        assert f"{stage}: resumed at step 2" in printed, printed
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_resumed_stage_reports_its_training_seconds_over_every_attempt(tmp_path, monkeypatch):
    """results.json's vae_s / dit_s timed only the last invocation: a VAE resumed at its last step reported the
    seconds spent restoring it as its training (18 s of a 30 s stage, tiny preset), and a stage resumed midway its
    last part only. Each checkpoint now carries the stage's seconds so far (as train_lm's wall_s), a resume adds to
    them, and results.json says what each timing covers."""
    import types

    from parallel import make_mesh

    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=2, ckpt_every=1)
    monkeypatch.setattr(train_video, "make_vae_step", _fake_vae_step)
    clock = iter(range(0, 10**6, 10))  # each reading 10 s after the one before
    monkeypatch.setattr(train_video, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    mesh, out = make_mesh({"data": 1}, devices=jax.devices()[:1]), tmp_path / "run"

    def run(q):
        with jax.set_mesh(mesh):
            train_video.train_vae(q, out, mesh, 0, None, {"w": jnp.zeros(4)})
        return train_video.latest_meta(manager(out / "ckpt" / "vae"))[1]["wall_s"]

    first = run(p)
    assert first > 0
    assert run(p) == first  # resumed at its last step: it trained no further, and nothing says it did
    assert train_video.stage_seconds(out, "vae", fallback=-1.0) == first
    assert run(dataclasses.replace(p, vae_steps=4)) > first  # trained on: the earlier attempt's seconds kept
    assert train_video.stage_seconds(tmp_path / "none", "vae", fallback=-1.0) == -1.0
    assert "all its attempts" in train_video.TIMINGS_COVER


def test_a_stopped_stage_ends_the_run_before_the_later_stages_and_the_evaluation(tmp_path, monkeypatch):
    """main returns (exit 0, as train_lm) once a stage was stopped: no encoding, no DiT, no evaluation; the
    handlers are the previous ones again, so a signal while encoding or evaluating (nothing to save) ends the run."""
    import signal

    seeds = []

    def vae_stopped(p, out, mesh, seed, graphdef, params, log=None, stop=None):
        seeds.append(seed)
        signal.raise_signal(signal.SIGTERM)  # caught by main's Stop, or this test process ends
        return graphdef, params

    def never(*a, **k):
        raise AssertionError("a later stage ran after the stop")

    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr(train_video, "train_vae", vae_stopped)
    monkeypatch.setattr(train_video, "encode_latents", never)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    res = train_video.main(["--preset", "tiny", "--out", str(tmp_path), "--seed", "3"])
    assert res["stopped"] == "SIGTERM" and "results" not in res and seeds == [3]
    assert {s: signal.getsignal(s) for s in before} == before
    assert not (tmp_path / "results.json").exists()


def test_a_signal_while_encoding_or_reconstructing_says_so_and_exits_143_or_130(tmp_path, monkeypatch, capsys):
    """Outside the stages (nothing to save) SIGTERM ended the run without a word (the default handler: status 143
    and no line saying what was lost or how to resume), Ctrl-C with a KeyboardInterrupt traceback. Now one line
    names the signal and the phase, the exit status is 128 + the signal's number, and the handlers come back."""
    import signal

    class Unhandled(Exception):  # the test's own handler: what a signal reached before the fix (not the process's end)
        pass

    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    def raiser(sig):
        def f(*a, **k):
            signal.raise_signal(sig)
            raise AssertionError("the signal did not end the run")
        return f

    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr(train_video, "train_vae", lambda p, out, mesh, seed, gd, params, *a, **k: (gd, params))
    mine = {s: signal.signal(s, unhandled) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for phase, patch, sig in (("the latent encoding", "encode_latents", signal.SIGTERM),
                                  ("the VAE's held-out reconstruction", "heldout_reconstruction", signal.SIGINT)):
            if patch == "heldout_reconstruction":  # the latents made (as if cached)
                monkeypatch.setattr(train_video, "prepare_latents", lambda *a, **k: (None, None, None, None))
            monkeypatch.setattr(train_video, patch, raiser(sig))
            with pytest.raises(SystemExit) as e:
                train_video.main(["--preset", "tiny", "--out", str(tmp_path / patch)])
            assert e.value.code == 128 + sig
            said = capsys.readouterr().out
            assert f"{sig.name} during {phase}" in said and "rerun the same command" in said, said
            assert {s: signal.getsignal(s) for s in mine} == {s: unhandled for s in mine}
    finally:
        for s, h in mine.items():
            signal.signal(s, h)


def _plotted(monkeypatch):
    """{label: (steps, values)} of every line the plots draw from here on (the data a plot is made from)."""
    from matplotlib.axes import Axes

    lines, plot = {}, Axes.plot

    def record(self, x, y, *args, label=None, **kw):
        lines[label] = (list(x), list(y))
        return plot(self, x, y, *args, label=label, **kw)

    monkeypatch.setattr(Axes, "plot", record)
    return lines


def test_each_stage_plots_its_losses_when_it_ends_stops_or_diverges(tmp_path, monkeypatch):
    """train_lm plots loss.png on every exit; the video trainer plotted nothing. Each stage now writes
    loss_<stage>.png from its metrics.jsonl records as it ends: done, stopped by SIGTERM, or diverged (its halt)."""
    import math
    import signal

    from PIL import Image

    records = [{"step": 1, "loss": 1.5, "mse": 1.25, "kl": 2.5}, {"step": 2, "loss": 0.75, "mse": 0.5, "kl": 2.5}]

    def vae_logged(then):
        def train_vae(p, out, mesh, seed, graphdef, params, log=None, stop=None):
            for r in records:
                log.write({"kind": "vae", **r})
            then()
            return graphdef, params

        return train_vae

    def diverged():
        raise SystemExit("error: vae diverged")

    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    for name, then in (("stopped", lambda: signal.raise_signal(signal.SIGTERM)), ("diverged", diverged)):
        lines, out = _plotted(monkeypatch), tmp_path / name
        monkeypatch.setattr(train_video, "train_vae", vae_logged(then))
        if name == "stopped":
            assert train_video.main(["--preset", "tiny", "--out", str(out)])["stopped"] == "SIGTERM"
        else:
            with pytest.raises(SystemExit, match="vae diverged"):
                train_video.main(["--preset", "tiny", "--out", str(out)])
        with Image.open(out / "loss_vae.png") as im:
            assert im.format == "PNG" and im.size[0] > 0
        assert lines == {"loss (mse + kl_weight·kl)": ([1, 2], [1.5, 0.75]),
                         "reconstruction mse": ([1, 2], [1.25, 0.5]), "kl": ([1, 2], [2.5, 2.5])}, name
        assert not (out / "loss_t2v.png").exists()  # the DiT's stage never started
    # the DiT's: a step replayed after a resume plots its last record, a non-finite loss (null) as a gap
    out = tmp_path / "t2v"
    out.mkdir()
    log = train_video.stage_logger(out, "t2v")
    for step, loss in ((25, 3.0), (50, 2.0), (50, 1.75), (75, float("nan"))):
        log.write({"kind": "t2v", "step": step, "loss": loss, "diffusion": loss - 0.5, "align": 2.0, "grad_norm": 1.0})
    log.close()
    lines = _plotted(monkeypatch)
    with Image.open(train_video.plot_stage(out, "t2v")) as im:
        assert im.format == "PNG"
    steps, loss = lines["loss (diffusion + align_weight·align)"]
    assert steps == [25, 50, 75] and loss[:2] == [3.0, 1.75] and math.isnan(loss[2])
    assert lines["diffusion"][1][:2] == [2.5, 1.25] and lines["align (InfoNCE)"] == ([25, 50, 75], [2.0] * 3)


def test_run_files_are_written_whole_and_fresh_removes_a_leftover_temporary(tmp_path, monkeypatch, capsys):
    """latent_stats.json (read by load_video_model) and results.json were written in place: a kill mid-write left
    a truncated file. They go to '<name>.tmp' and are renamed over the old one; --fresh deletes such a leftover."""
    import pathlib

    from experiments.video_eval import save_results

    write_text = pathlib.Path.write_text

    def killed_mid_write(self, text, *a, **k):  # half the text reaches the disk, then the process is killed
        write_text(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt("killed")

    out = tmp_path / "run"
    out.mkdir()
    (out / "latent_stats.json").write_text(json.dumps({"mean": [0.0], "std": [1.0]}))
    (out / "results.json").write_text(json.dumps({"cfg 4 / seen": {"colour": 1.0}}))
    p = train_video.PRESETS["tiny"]
    lat = np.random.default_rng(0).standard_normal((4, *p.t2v.dit.latent_shape, p.t2v.dit.latent_channels))
    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr(train_video, "train_vae", lambda p, out, mesh, seed, gd, params, log, stop: (gd, params))
    monkeypatch.setattr(train_video, "encode_latents", lambda *a: (lat.astype(np.float32), None, None))
    monkeypatch.setattr(pathlib.Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):  # killed while writing the new latent_stats.json
        train_video.main(["--preset", "tiny", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        save_results(out / "results.json", {("cfg 4", "seen"): {"colour": 0.5}}, {"seed": 0})
    monkeypatch.undo()
    assert json.loads((out / "latent_stats.json").read_text()) == {"mean": [0.0], "std": [1.0]}
    assert json.loads((out / "results.json").read_text()) == {"cfg 4 / seen": {"colour": 1.0}}
    # a write that raised removes its partial .tmp (run_log.write_atomically); only a kill (SIGKILL: no handler
    # runs) leaves one, as here: --fresh takes it as the run's own
    assert not (out / "latent_stats.json.tmp").exists() and not (out / "results.json.tmp").exists()
    (out / "latent_stats.json.tmp").write_text('{"mean": [0.')
    def stop_here(*a, **k):
        raise SystemExit("stop here")

    monkeypatch.setattr(train_video, "train_vae", stop_here)
    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    with pytest.raises(SystemExit, match="stop here"):
        train_video.main(["--preset", "tiny", "--out", str(out), "--fresh"])
    assert not (out / "latent_stats.json.tmp").exists() and not (out / "results.json").exists()


def test_a_repeated_cfg_scale_is_evaluated_once(capsys):
    """--scales 1,2,2 generated every clip at CFG 2 twice (and the GIFs and grids showed its rows twice); two scales
    of one name ('cfg 2' for 2 and 2.0000001) were both generated and one's results overwrote the other's."""
    from data.moving_shapes import MovingShapesConfig
    from experiments.video_eval import run_eval

    assert train_video.parse_scales("1,2,2,4,1.0") == (1.0, 2.0, 4.0)
    assert "--scales: '1,2,2,4,1.0' repeats a scale; evaluating 1, 2, 4 once each" in capsys.readouterr().out
    assert train_video.parse_scales("4,1") == (4.0, 1.0) and capsys.readouterr().out == ""
    assert train_video.parse_scales("4,1,4") == (4.0, 1.0)  # a repeat dropped in place: the order given is kept
    with pytest.raises(ValueError, match=r"2 and 2.0000001 are both reported as 'cfg 2'"):
        train_video.parse_scales("1,2,2.0000001")
    calls = []

    def gen_fn(tok, key, scale):
        calls.append(scale)
        return np.zeros((len(tok), 5, 16, 16, 3), np.float32)

    cfg = MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2))
    with pytest.raises(ValueError, match=r"run_eval: scales=\(2.0, 2.0\) name 'cfg 2' more than once"):
        run_eval(gen_fn, lambda x: x, None, cfg, scales=(2.0, 2.0), per_seen=1, per_held=1, batch=16)
    assert calls == []  # refused before generating anything


def test_a_stage_resumed_on_another_mesh_says_so(tmp_path, capsys, monkeypatch):
    """A stage resumed on another mesh (device count or axis sizes) goes on differing from an uninterrupted run in
    the last float32 digits (its sharded sums reduce in another order); nothing said so. Its checkpoint records the
    mesh, and the resume line notes the change (none on the same mesh)."""
    import math

    from parallel import make_mesh

    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=2, ckpt_every=100)
    monkeypatch.setattr(train_video, "make_vae_step", _fake_vae_step)

    def run(shape, steps):
        mesh = make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])
        with jax.set_mesh(mesh):
            train_video.train_vae(dataclasses.replace(p, vae_steps=steps), tmp_path, mesh, 0, None,
                                  {"w": jnp.zeros(4)})
        return capsys.readouterr().out

    run({"data": 2, "fsdp": 2}, 2)
    assert train_video.latest_meta(manager(tmp_path / "ckpt" / "vae"))[1]["mesh"] == {"data": 2, "fsdp": 2}
    printed = run({"data": 2, "fsdp": 2}, 3)
    assert "vae: resumed at step 2" in printed and "note: saved on" not in printed
    printed = run({"data": 8}, 4)
    assert "vae: resumed at step 3" in printed and ("note: saved on mesh {'data': 2, 'fsdp': 2} (4 devices), resumed "
                                                    "on {'data': 8} (8 devices): sums over the sharded axes reduce in "
                                                    "another order") in printed, printed
    assert "last float32 digits" in printed


def test_a_run_with_no_checkpoint_sets_aside_the_logs_it_would_mix_with(tmp_path, monkeypatch, capsys):
    """Killed before its first checkpoint (step 500 of the default preset's 600 VAE steps), a run left metrics.jsonl
    behind; a rerun appended to it, and the steps only the first run logged stayed in the curves (its loss plot
    showed both runs). As train_lm's: moved aside to *.prev-<time>, which --fresh deletes as the run's own."""
    import signal

    out = tmp_path / "run"
    (out / "tb" / "vae").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"kind": "vae", "step": s, "loss": 9.0}) + "\n"
                                               for s in (25, 50, 75)))

    def vae_stopped(p, out, mesh, seed, graphdef, params, log=None, stop=None):
        log.write({"kind": "vae", "step": 25, "loss": 1.0, "mse": 1.0, "kl": 0.5})
        signal.raise_signal(signal.SIGTERM)
        return graphdef, params

    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr(train_video, "train_vae", vae_stopped)
    lines = _plotted(monkeypatch)
    assert train_video.main(["--preset", "tiny", "--out", str(out)])["stopped"] == "SIGTERM"
    assert "held the logs of a run with no checkpoint; moved aside as *.prev-" in capsys.readouterr().out
    assert lines["loss (mse + kl_weight·kl)"] == ([25], [1.0])
    aside = sorted(c.name for c in out.iterdir() if ".prev-" in c.name)
    assert [n.split(".prev-")[0] for n in aside] == ["metrics.jsonl", "tb"]
    assert len((out / aside[0]).read_text().splitlines()) == 3
    def stop_here(*a, **k):
        raise SystemExit("stop here")

    monkeypatch.setattr(train_video, "train_vae", stop_here)
    with pytest.raises(SystemExit, match="stop here"):  # --fresh takes them as the run's own
        train_video.main(["--preset", "tiny", "--out", str(out), "--fresh"])
    assert not any(".prev-" in c.name for c in out.iterdir())
    # a run with a checkpoint of one stage (stopped before the DiT's first save) is extended, not set aside
    monkeypatch.setattr(train_video, "train_vae", vae_stopped)
    save(manager(out / "ckpt" / "vae"), 3, {"params": {"w": jnp.ones(2)}},
         {"step": 3, "settings": train_video.stage_settings(train_video.PRESETS["tiny"], 0)["vae"]})
    assert train_video.main(["--preset", "tiny", "--out", str(out)])["stopped"] == "SIGTERM"
    assert not any(".prev-" in c.name for c in out.iterdir()) and "moved aside" not in capsys.readouterr().out


def test_a_stage_resumes_only_under_the_prng_implementation_it_was_trained_with(tmp_path, monkeypatch):
    """The stages' keys are made from the seed and none is saved: resumed under another jax_default_prng_impl, a stage
    went on silently with another random stream (noise, timesteps). Each stage's meta records the implementation, and
    a resume under another is refused by name, as train_lm's is."""
    from experiments.video_steps import latest_meta
    from parallel import make_mesh

    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=1, ckpt_every=100)
    monkeypatch.setattr(train_video, "make_vae_step", _fake_vae_step)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    gd, params = placed(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), mesh)
    train_video.train_vae(p, tmp_path, mesh, 0, gd, params)
    now = jax.config.jax_default_prng_impl
    assert latest_meta(manager(tmp_path / "ckpt" / "vae"))[1]["prng_impl"] == now
    train_video.check_resume(p, tmp_path, 0)
    other = "rbg" if now != "rbg" else "threefry2x32"
    meta = {"step": 3, "settings": train_video.stage_settings(p, 0)["t2v"], "prng_impl": other}
    save(manager(tmp_path / "ckpt" / "t2v"), 3, {"params": {"w": jnp.ones((2,))}}, meta)
    with pytest.raises(SystemExit, match=rf"t2v: .*t2v \(step 3\): it was saved under jax_default_prng_impl="
                                         rf"'{other}', this run's is '{now}' \(.*JAX_DEFAULT_PRNG_IMPL={other}"):
        train_video.check_resume(p, tmp_path, 0)


def test_stage_warmup_and_batch_check_are_as_documented():
    """_warmup is 5% of the steps (at least 1), leaving >= 1 decay update (none for 1-2 steps); check_batch divides by
    every batch axis, fsdp included (a batch fsdp does not divide failed in the first step, after the VAE's build)."""
    import types

    assert [train_video._warmup(n) for n in (1, 2, 3, 19, 20, 100, 600, 1000)] == [0, 0, 1, 1, 1, 5, 30, 50]
    train_video.check_batch(8, types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2}), "dit_batch")
    for shape in ({"data": 1, "fsdp": 4}, {"data": 2, "expert": 2}, {"data": 4, "tensor": 2}):
        with pytest.raises(SystemExit, match=r"dit_batch=6 must be divisible by the batch mesh axes"):
            train_video.check_batch(6, types.SimpleNamespace(shape=shape), "dit_batch")


@pytest.mark.parametrize("n,vae_batch,said", [
    (6, 8, r"no mesh over these 6 devices fits: .*run on a device count that divides 8 .*e\.g\. 4 "
           r"\(JAX_NUM_CPU_DEVICES=4"),
    (4, 6, r"divides 2 \(every batch of the preset\) .*: --mesh data=2,tensor=2$"),
])
def test_a_batch_the_mesh_does_not_split_is_told_a_mesh_that_fits_or_that_none_does(tmp_path, capsys, monkeypatch, n,
                                                                                      vae_batch, said):
    """On 6 devices the tiny preset (batches 8) was told 'e.g. data=1,tensor=6', which the next check refused (its VAE
    channels are not divisible by 6): no mesh over 3, 6 or 12 devices fits it, and the message did not say so. The
    advice is now a mesh that passes every check, or the device count to use."""
    devices = jax.devices()[:n]
    monkeypatch.setattr(jax, "devices", lambda *a: devices)
    monkeypatch.setitem(train_video.PRESETS, "tiny", dataclasses.replace(train_video.PRESETS["tiny"],
                                                                          vae_batch=vae_batch))
    monkeypatch.setattr(train_video, "check_resume", lambda *a: pytest.fail("passed the checks"))
    with pytest.raises(SystemExit, match=rf"vae_batch={vae_batch} must be divisible .*{said}") as e:
        train_video.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--mesh", "data=-1"])
    if mesh := re.search(r"--mesh (\S+)$", str(e.value.code)):  # the mesh told passes every check
        monkeypatch.setattr(train_video, "check_resume", lambda *a: (_ for _ in ()).throw(RuntimeError("checked")))
        with pytest.raises(RuntimeError, match="checked"):
            train_video.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--mesh", mesh.group(1)])


def test_a_stage_resumed_toward_another_step_count_says_its_schedule_was_stretched():
    """The note appears only when the checkpoint was trained toward another total (inverted, every resume said so)."""
    assert train_video._stretched({"total_steps": 10}, 10, "--dit-steps") == ""
    assert train_video._stretched({}, 10, "--dit-steps") == ""  # a checkpoint from before totals were saved
    assert "trained so far toward 10 steps, now --dit-steps 20" in train_video._stretched({"total_steps": 10}, 20,
                                                                                          "--dit-steps")


def test_a_retrained_or_resumed_stage_drops_its_records_past_where_it_starts(tmp_path, monkeypatch):
    """Retraining a stage (its checkpoint deleted, as check_resume suggests) to fewer steps kept the old run's records
    in the shared metrics.jsonl: 100 VAE steps, then 50 again, read back steps 25..100 and plotted the old tail. A
    stage now drops its records past the step it starts from (the other stage's stay); a resume logs exactly what an
    uninterrupted run does (the interrupted attempt's unsaved step is not left beside its replay)."""
    import shutil

    from experiments.run_log import read_curves
    from parallel import make_mesh

    monkeypatch.setattr(train_video, "make_vae_step", _fake_vae_step)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])

    def run(out, steps, before=()):  # `before`: records a killed attempt logged first
        p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=steps, ckpt_every=50)
        log = train_video.stage_logger(out, "vae")
        for r in before:
            log.write(r)
        with jax.set_mesh(mesh):
            train_video.train_vae(p, out, mesh, 0, None, {"w": jnp.zeros(4)}, log)
        log.close()
        return [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    out = tmp_path / "retrain"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "t2v", "step": 75, "diffusion": 0.5}) + "\n")
    assert run(out, 100) == [("t2v", 75), ("vae", 25), ("vae", 50), ("vae", 75), ("vae", 100)]
    shutil.rmtree(out / "ckpt" / "vae")
    assert run(out, 50) == [("t2v", 75), ("vae", 25), ("vae", 50)]
    assert sorted(read_curves(out / "metrics.jsonl")["vae"]) == [25, 50]
    # resumed at its step-50 checkpoint after an attempt that logged step 75 and was killed before saving it
    killed = [{"kind": "vae", "step": 75, "psnr": -1.0, "kl": 1.0}]
    assert run(out, 100, killed) == [("t2v", 75), ("vae", 25), ("vae", 50), ("vae", 75), ("vae", 100)]
    whole = tmp_path / "whole"
    whole.mkdir()
    run(whole, 100)
    recs = lambda o: [r for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if r["kind"] == "vae"]
    assert recs(out) == recs(whole)


def test_samples_and_overview_are_written_whole(tmp_path, monkeypatch):
    """The per-prompt GIFs and grids and overview.png were written in place: a viewer (or a kill) mid-write saw a
    truncated image where the previous evaluation's had been. They go to '<name>.tmp' and are renamed over it."""
    import pathlib

    from PIL import Image

    from data.moving_shapes import MovingShapesConfig
    from experiments import video_eval

    cfg = MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2))
    sets = {"seen": video_eval.prompt_set(cfg, "train", 1)[:2] + (np.asarray([0]),)}
    clip = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
    videos = {("cfg 1", "seen"): clip, ("null prompt", "seen"): -clip}
    gif = video_eval.write_prompt_media(tmp_path / "samples", videos, sets, cfg, (1.0,))[0]
    video_eval.write_overview(tmp_path / "overview.png", videos, sets, cfg, 1.0)
    files = [gif, gif.with_suffix(".png"), tmp_path / "overview.png"]
    before = {f: f.read_bytes() for f in files}
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5

    def killed(self_or_fig, fp, *a, **k):  # a few bytes reach the disk, then the process is killed
        pathlib.Path(fp).write_bytes(b"\x89PNG")
        raise KeyboardInterrupt("killed")

    import matplotlib.figure

    monkeypatch.setattr(Image.Image, "save", killed)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed)
    for write in (lambda: video_eval.write_prompt_media(tmp_path / "samples", videos, sets, cfg, (1.0,)),
                  lambda: video_eval.write_grid(gif.with_suffix(".png"), np.zeros((1, 5, 16, 16, 3), np.uint8),
                                                ["cfg 1"], "t"),
                  lambda: video_eval.write_overview(tmp_path / "overview.png", videos, sets, cfg, 1.0)):
        with pytest.raises(KeyboardInterrupt):
            write()
    monkeypatch.undo()
    assert {f: f.read_bytes() for f in files} == before


def test_latent_stats_cover_every_encoded_batch(tmp_path):
    """Stage 2's latents are normalised by the per-channel mean and std of all n_latents clips (every encoded batch,
    the last cut short), as latent_stats.json records them; one batch's stats would shift the DiT's inputs."""
    p = dataclasses.replace(train_video.PRESETS["tiny"], n_latents=100, eval_batch=48)  # batches 48, 48, 4 of 48
    shape = (*p.t2v.dit.latent_shape, p.t2v.dit.latent_channels)
    calls = []

    def encode(video):  # each batch its own offset and scale per channel: one batch's stats differ from all's
        i = len(calls)
        calls.append(len(video))
        base = np.random.default_rng(i).standard_normal((len(video), *shape))
        return (base * (1 + i) + 3.0 * i + np.arange(shape[-1])).astype(np.float32)

    z, tokens, combo, (mean, std) = train_video.prepare_latents(p, encode, tmp_path)
    assert calls == [48, 48, 48] and z.shape == (100, *shape) and tokens.shape == (100, 8) and combo.shape == (100,)
    rows = np.concatenate([(np.random.default_rng(i).standard_normal((48, *shape)) * (1 + i) + 3.0 * i
                            + np.arange(shape[-1])).astype(np.float32) for i in range(3)])[:100].astype(np.float64)
    flat = rows.reshape(-1, shape[-1])
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-6)
    zf = z.reshape(-1, shape[-1]).astype(np.float64)
    np.testing.assert_allclose(zf.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(zf.std(0), 1, atol=1e-5)
    assert json.loads((tmp_path / "latent_stats.json").read_text()) == {"mean": mean.tolist(), "std": std.tolist()}


def test_heldout_psnr_is_over_one_batch_of_heldout_clips_and_targets_are_judged_at_the_largest_scale():
    """main's held-out PSNR: the mean squared error over every pixel of eval_batch clips of held-out combinations
    (decoded values unclipped), as 10·log10(4 / mse); its targets: the seen captions at the largest CFG scale,
    whatever the order of --scales."""
    p = train_video.PRESETS["tiny"]
    held = {p.data.combos().index(c) for c in p.data.held_out}
    noise = np.random.default_rng(0).normal(0, 0.05, (p.eval_batch, p.data.frames, p.data.size, p.data.size, 3))
    real, z_real, db, row = train_video.heldout_reconstruction(p, lambda x: x * 2, lambda z: z / 2 + noise)
    assert len(real["video"]) == p.eval_batch and set(real["combo"].tolist()) <= held
    np.testing.assert_array_equal(z_real, real["video"] * 2)
    recon = real["video"].astype(np.float64) + noise
    assert abs(db - 10 * np.log10(4 / np.mean((recon - real["video"]) ** 2))) < 1e-3, db
    assert row["n"] == p.eval_batch and 0 <= row["colour"] <= 1

    results = {("cfg 4", "seen"): {"colour": 0.95, "direction": 0.85}, ("cfg 4", "held-out"): {"colour": 0.0,
               "direction": 0.0}, ("cfg 1", "seen"): {"colour": 0.5, "direction": 0.9}}
    assert train_video.targets_met(results, (4.0, 1.0)) == {"colour >= 0.90 (seen)": True,
                                                            "direction >= 0.80 (seen)": True}
    results[("cfg 4", "seen")]["direction"] = 0.79
    assert train_video.targets_met(results, (1.0, 4.0)) == {"colour >= 0.90 (seen)": True,
                                                            "direction >= 0.80 (seen)": False}


def test_heldout_reconstructions_are_read_clipped_as_the_evaluation_reads_its_clips():
    """The real-clips row read the decoder's output unclipped: one overshooting pixel per frame (3.0) lifted each
    clip's peak and its foreground cut past the drawn object, and a perfect reconstruction read as 'no object' in
    every clip. Its PSNR stays over the unclipped values (the decoder's own error)."""
    p = train_video.PRESETS["tiny"]

    def decode(z):  # the clips back, plus one hot pixel per frame
        x = np.array(z)
        x[:, :, 0, 0] = 3.0
        return x

    real, _, db, row = train_video.heldout_reconstruction(p, lambda x: x, decode)
    assert row["no_object"] == 0.0 and row["colour"] == 1.0 and row["direction"] == 1.0, row
    err = np.mean((decode(real["video"]) - real["video"]) ** 2)
    assert abs(db - 10 * np.log10(4 / err)) < 1e-3, db


def test_a_dit_checkpoint_resumes_only_on_the_vae_it_was_trained_on(tmp_path, monkeypatch, capsys):
    """With only ckpt/vae deleted (the VAE retrained: another mesh, another machine), the old DiT checkpoint was
    resumed on the new VAE's latents: the check compared settings only. Its checkpoints record the VAE's fingerprint
    (as the latents cache does) and one of another VAE is refused, naming the fix; one saved before the fingerprint
    was recorded still resumes."""
    from parallel import make_mesh

    monkeypatch.setattr(train_video, "make_t2v_step", _fake_t2v_step([]))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    z, tok, combo = np.zeros((16, 2, 4, 4, 4), np.float32), np.zeros((16, 8), np.int32), np.zeros(16, np.int32)

    def run(steps, vae, out=tmp_path):
        p = dataclasses.replace(train_video.PRESETS["tiny"], dit_steps=steps)
        with jax.set_mesh(mesh):
            train_video.train_t2v(p, out, mesh, 0, None, {"w": jnp.zeros((4,), jnp.float32)}, z, tok, combo,
                                  vae_fingerprint=vae)
        return capsys.readouterr().out

    run(3, "vae-a")
    assert train_video.latest_meta(manager(tmp_path / "ckpt" / "t2v"))[1]["vae_fingerprint"] == "vae-a"
    with pytest.raises(SystemExit, match=r"t2v: .*ckpt/t2v \(step 3\) was trained on the latents of another VAE "
                                         r"\(fingerprint vae-a, this run's .*ckpt/vae is vae-b: retrained since\); "
                                         r"delete .*ckpt/t2v to train the DiT on this VAE's latents"):
        run(4, "vae-b")
    assert train_video.latest_meta(manager(tmp_path / "ckpt" / "t2v"))[0] == 3  # refused before any step
    assert "t2v: resumed at step 3" in run(4, "vae-a")
    run(3, None, tmp_path / "old")  # a checkpoint saved before the fingerprint was recorded
    assert "vae_fingerprint" not in train_video.latest_meta(manager(tmp_path / "old" / "ckpt" / "t2v"))[1]
    assert "t2v: resumed at step 3" in run(4, "vae-b", tmp_path / "old")


def test_load_video_model_refuses_a_dit_of_another_vae(tmp_path, monkeypatch):
    """load_video_model paired the newest VAE with a DiT trained on another VAE's latents (ckpt/vae retrained after
    the DiT): its samples decode another latent space. The DiT's recorded VAE fingerprint is compared."""
    p = train_video.PRESETS["tiny"]
    settings = train_video.stage_settings(p, 0)
    recorded = {}
    monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (3, {"settings": settings["vae"]} if "vae" in str(
        mgr.dir) else {"settings": settings["t2v"], **recorded}))
    monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None: (
        3, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v) for k, v in targets.items()}, {}))
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    for stage in ("vae", "t2v"):
        (tmp_path / "ckpt" / stage).mkdir(parents=True)
    train_video.load_video_model(tmp_path, "tiny")  # no fingerprint recorded (an older checkpoint): loaded
    recorded["vae_fingerprint"] = "0123456789abcdef"
    with pytest.raises(ValueError, match=r"ckpt/t2v was trained on the latents of another VAE \(fingerprint "
                                         r"0123456789abcdef\) than .*ckpt/vae holds"):
        train_video.load_video_model(tmp_path, "tiny")
    from parallel import abstract_sharded, make_mesh

    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    vae = abstract_sharded(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), mesh)[1]
    recorded["vae_fingerprint"] = fingerprint(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), vae))
    train_video.load_video_model(tmp_path, "tiny")  # the VAE it was trained on


def test_overview_separates_the_three_frames_of_each_clip(tmp_path, monkeypatch):
    """write_overview's first / middle / last frames were drawn edge to edge: with no line between them a left-moving
    object read as three objects stepping right, and the frame an object sat in could not be told. Each tile now
    shows the three frames in order, with tile's grey gap between them."""
    import matplotlib.axes

    from data.moving_shapes import MovingShapesConfig
    from experiments import video_eval

    cfg = MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2))
    sets = {"seen": video_eval.prompt_set(cfg, "train", 1)[:2] + (np.asarray([0]),)}
    clip = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
    shown = []
    real_imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, img, *a, **k: shown.append(np.asarray(img)) or real_imshow(self, img, *a, **k))
    video_eval.write_overview(tmp_path / "overview.png", {("cfg 1", "seen"): clip}, sets, cfg, 1.0, null=False)
    assert len(shown) == 1
    want = video_eval.tile(video_eval.to_uint8(clip[0, [0, 2, 4]])[None, :, None])[0]  # 1 row, 3 columns, grey gaps
    np.testing.assert_array_equal(shown[0], want)


def test_no_media_removes_a_leftover_overview_temporary_and_failed_plots_close_their_figures(tmp_path, monkeypatch):
    """--no-media removed an earlier overview.png and samples/ but left overview.png.tmp (a write cut short by a
    kill; only --fresh removed it). write_overview and plot_losses left their figure open in pyplot when the save
    failed (a full disk): one more figure per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from data.moving_shapes import MovingShapesConfig
    from experiments import run_log, video_eval

    for name in ("overview.png", "overview.png.tmp"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    (tmp_path / "samples").mkdir()
    assert train_video.remove_media(tmp_path) == ["overview.png", "overview.png.tmp", "samples"]
    assert not any(tmp_path.iterdir())

    cfg = MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2))
    sets = {"seen": video_eval.prompt_set(cfg, "train", 1)[:2] + (np.asarray([0]),)}
    clip = np.zeros((1, 5, 16, 16, 3), np.float32)
    videos = {("cfg 1", "seen"): clip, ("null prompt", "seen"): clip}

    def full_disk(self, fp, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    before = plt.get_fignums()
    with pytest.raises(OSError, match="No space left"):
        video_eval.write_overview(tmp_path / "overview.png", videos, sets, cfg, 1.0)
    with pytest.raises(OSError, match="No space left"):
        run_log.plot_losses(tmp_path)
    assert plt.get_fignums() == before


@pytest.mark.parametrize("every", [0, -3, 2.5, True])
def test_a_checkpoint_interval_below_one_is_refused_when_the_preset_is_built(every):
    """ckpt_every=0 built, then failed with a bare ZeroDivisionError ('integer modulo by zero') after the first
    VAE step had compiled and run (35 s on the tiny preset); -3 saved every 3rd step as if it were 3."""
    with pytest.raises(ValueError, match=rf"Preset: ckpt_every={every!r}: must be an int >= 1"):
        dataclasses.replace(train_video.PRESETS["tiny"], ckpt_every=every)


@pytest.mark.parametrize("change, match", [
    ({"ema_decay": float("nan")}, "ema_decay=nan: must be a number in [0, 1]"),
    ({"ema_decay": -1.0}, "ema_decay=-1.0: must be a number in [0, 1]"),
    ({"vae_lr": float("nan")}, "vae_lr=nan: must be a finite number > 0"),
    ({"dit_lr": -1e-3}, "dit_lr=-0.001: must be a finite number > 0"),
    ({"vae_lr": "2e-3"}, "vae_lr='2e-3': must be a finite number > 0"),
    ({"dit_batch": -8}, "dit_batch=-8: must be an int >= 1 (latents per DiT step)"),
    ({"n_latents": 0}, "n_latents=0: must be an int >= 1"),
    ({"vae_steps": 0}, "vae_steps=0: must be an int >= 1"),
    ({"dit_steps": 2.5}, "dit_steps=2.5: must be an int >= 1"),
])
def test_a_preset_with_a_nonsense_rate_decay_or_count_is_refused_when_built(change, match):
    """Only ckpt_every and eval_* were checked: ema_decay=nan built and every EMA parameter (the model sampled and
    evaluated) was NaN from the first step, ema_decay=-1 flipped the average's sign each step without converging, a
    NaN or negative learning rate trained in silence, dit_batch=-8 or n_latents=0 failed in numpy after the whole
    VAE stage. Legitimate edges stay accepted."""
    with pytest.raises(ValueError, match=re.escape(f"Preset: {match}")):
        dataclasses.replace(train_video.PRESETS["tiny"], **change)
    for ok in ({"ema_decay": 0.0}, {"ema_decay": 1}, {"vae_lr": 1}, {"n_latents": np.int64(1)}, {"dit_batch": 1}):
        dataclasses.replace(train_video.PRESETS["tiny"], **ok)


@pytest.mark.parametrize("field", ["data", "vae", "t2v"])
def test_a_preset_sub_config_that_is_not_one_is_refused_by_name(field):
    """A number (or a dict from JSON) in place of a sub-config failed with a bare AttributeError ('int' object has
    no attribute 'latent_shape') naming no field."""
    for bad in (4, dataclasses.asdict(getattr(train_video.PRESETS["tiny"], field))):
        with pytest.raises(ValueError, match=rf"Preset: {field}=.*must be a .*, got {type(bad).__name__}"):
            dataclasses.replace(train_video.PRESETS["tiny"], **{field: bad})


@pytest.mark.parametrize("field", ["eval_per_seen", "eval_per_held", "eval_batch"])
def test_an_evaluation_count_below_one_is_refused_before_any_training(field):
    """eval_per_seen=0 (or eval_per_held) built, trained both stages, then the evaluation failed as numpy's 'need at
    least one array to stack'; eval_batch=0 passed check_batch and failed after the VAE stage. run_eval, called
    directly, named neither."""
    from experiments.video_eval import run_eval

    with pytest.raises(ValueError, match=rf"Preset: {field}=0: must be an int >= 1"):
        dataclasses.replace(train_video.PRESETS["tiny"], **{field: 0})
    calls = []
    kw = {"per_seen": 1, "per_held": 1, "batch": 8, field.removeprefix("eval_"): 0}
    with pytest.raises(ValueError, match=rf"run_eval: {field.removeprefix('eval_')}=0 must be an int >= 1"):
        run_eval(lambda *a: calls.append(a), lambda x: x, None, train_video.PRESETS["tiny"].data, scales=(1.0,), **kw)
    assert calls == []  # refused before generating anything


def test_load_video_model_of_a_run_whose_newest_vae_step_is_corrupt_says_to_rerun_not_to_delete_the_dit(
        tmp_path, monkeypatch):
    """The VAE's newest step (the one the DiT trained on) fails to verify, so the read-only restore reads the step
    before: its fingerprint is not the DiT's VAE, and the refusal said the VAE was retrained and to delete ckpt/t2v,
    losing a good DiT; rerunning train_video sets the step aside and retrains the same VAE (bitwise, on one machine:
    a tiny run's DiT resumed and sampled)."""
    p = train_video.PRESETS["tiny"]
    settings = train_video.stage_settings(p, 0)
    monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (6, {"settings": settings["vae"]}) if "vae" in str(
        mgr.dir) else (6, {"settings": settings["t2v"], "vae_fingerprint": "0123456789abcdef", "total_steps": 6}))
    monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None: (
        3 if "vae" in str(mgr.dir) else 6, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
                                            for k, v in targets.items()}, {}))
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    for stage in ("vae", "t2v"):
        (tmp_path / "ckpt" / stage).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"ckpt/vae's newest step 6 does not read or verify \(left in place\), and "
                                         r"step 3, read instead, is not the VAE .*rerun the run's train_video command: "
                                         r"it sets step 6 aside") as e:
        train_video.load_video_model(tmp_path, "tiny")
    assert "delet" not in str(e.value)


def test_load_video_model_of_a_stopped_run_says_which_stage_is_missing_or_unfinished(tmp_path, monkeypatch, capsys):
    """A run stopped in the VAE stage (SIGTERM, or killed before the DiT's first save) was refused with "pass a
    train_video run's --out", though it was one; a run stopped mid-DiT sampled its partly trained EMA in silence, and
    the Preset returned gave the preset's dit_steps, not the run's."""
    p = train_video.PRESETS["tiny"]
    settings = train_video.stage_settings(p, 0)
    (tmp_path / "ckpt" / "vae").mkdir(parents=True)
    monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (
        2, {"settings": settings["vae" if "vae" in str(mgr.dir) else "t2v"], "step": 2, "total_steps": 5}))
    with pytest.raises(FileNotFoundError, match=r"ckpt/t2v holds no checkpoint: the run stopped before its DiT "
                                                r"stage saved a step; rerun its train_video command"):
        train_video.load_video_model(tmp_path, "tiny")
    (tmp_path / "ckpt" / "t2v").mkdir()
    monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None: (
        2, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v) for k, v in targets.items()}, {}))
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    _, got = train_video.load_video_model(tmp_path, "tiny")
    assert "ckpt/t2v is at step 2 of the run's 5" in capsys.readouterr().out
    assert got.dit_steps == 5
    # a finished run (step 5 of 5) says nothing; one whose step 5 does not verify samples step 3 (the reader skips
    # it) and says so: the message named the newest record's step, or said nothing when that was the last one
    for read, said in ((5, ""), (3, "ckpt/t2v is at step 3 of the run's 5")):
        monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (
            5, {"settings": settings["vae" if "vae" in str(mgr.dir) else "t2v"], "step": 5, "total_steps": 5}))
        monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None, s=read: (
            s, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v) for k, v in targets.items()}, {}))
        train_video.load_video_model(tmp_path, "tiny")
        assert said in (printed := capsys.readouterr().out) and bool(said) == ("load_video_model" in printed), printed


def test_each_stage_draws_its_own_batch_and_key_per_step_and_the_dit_logs_and_saves_its_last_step(tmp_path,
                                                                                                   monkeypatch):
    """Wiring only the stage loops own, checked with recording steps: the DiT's EMA decay is the preset's (1 - decay
    passed every test: they build make_t2v_step themselves or fake it), each stage's schedule is its own learning rate,
    step count and warmup (the stages' equal counts in the tiny preset hid a swap), every step of either stage gets its
    own key and the DiT its own batch (one key, or one batch, for every step passed), and the DiT logs the 25th and
    the last step under their numbers and saves the last, dropping only its own stale records (the tiny preset's 3
    steps ending on a checkpoint multiple hid all of it)."""
    from parallel import make_mesh

    decays, keys, batches = [], {"vae": [], "t2v": []}, []

    def vae_make(graphdef, opt, shardings=None):
        def step(params, opt_state, video, key):
            keys["vae"].append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
            return params, opt_state, {"psnr": jnp.float32(20.0), "kl": jnp.float32(1.0)}
        return step

    def t2v_make(graphdef, opt, null, decay, shardings=None):
        decays.append(decay)

        def step(params, opt_state, ema, batch, key, n):
            keys["t2v"].append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
            batches.append(tuple(np.asarray(batch["caption_id"]).tolist()))
            return params, opt_state, ema, {"diffusion": jnp.float32(0.5)}
        return step

    schedules, make_optimizer = [], train_video.make_optimizer
    monkeypatch.setattr(train_video, "make_vae_step", vae_make)
    monkeypatch.setattr(train_video, "make_t2v_step", t2v_make)
    monkeypatch.setattr(train_video, "make_optimizer", lambda lr, **k: schedules.append((lr, k["total_steps"], k[
        "warmup_steps"])) or make_optimizer(lr, **k))
    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=2, dit_steps=26, ckpt_every=10, vae_lr=0.5)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"kind": "vae", "step": 25, "loss": 1.0}, {"kind": "t2v", "step": 50, "diffusion": 9.0})))
    with jax.set_mesh(mesh):
        train_video.train_vae(p, tmp_path, mesh, 0, None, {"w": jnp.zeros(4)})
        log = train_video.stage_logger(tmp_path, "t2v")
        train_video.train_t2v(p, tmp_path, mesh, 0, None, {"w": jnp.zeros(4)}, np.zeros((64, 2, 4, 4, 4), np.float32),
                              np.zeros((64, 8), np.int32), np.arange(64, dtype=np.int32), log)
        log.close()
    assert decays == [p.ema_decay] and schedules == [(0.5, 2, 0), (p.dit_lr, 26, 1)]  # warmup: _warmup's
    assert len(set(keys["vae"])) == 2 and len(set(keys["t2v"])) == 26 and len(set(batches)) == 26
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("vae", 25), ("t2v", 25), ("t2v", 26)]
    assert manager(tmp_path / "ckpt" / "t2v").steps() == [20, 26]  # (the newest two are kept)


def test_load_video_model_of_a_run_with_its_own_seed_and_vae_steps_samples_with_the_callers_seed(tmp_path, monkeypatch):
    """A run trained with --seed 3 --vae-steps 7 loads under its preset (its seed and step counts are its own: a
    seed-0 check refused it, as 'seed: 3 -> 0'), the Preset returned carries its vae_steps, and `sample` draws with
    the seed and the documented default cfg_scale=4.0 it is given (a fixed key, or another default, passed: the
    tiny preset's run compared two samples differing in cfg_scale too)."""
    p = dataclasses.replace(train_video.PRESETS["tiny"], vae_steps=7)
    settings = train_video.stage_settings(p, 3)
    monkeypatch.setattr(train_video, "latest_meta", lambda mgr: (
        3, {"settings": settings["vae" if "vae" in str(mgr.dir) else "t2v"], "step": 3, "total_steps": 3}))
    monkeypatch.setattr(train_video, "restore", lambda mgr, targets, step=None: (
        3, {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v) for k, v in targets.items()}, {}))
    drawn = []

    def generate(model, tok, null, key, scale, steps):
        drawn.append((key, scale))
        return jnp.zeros((tok.shape[0], *p.t2v.dit.latent_shape, p.t2v.dit.latent_channels))

    monkeypatch.setattr(train_video, "generate", generate)
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    for stage in ("vae", "t2v"):
        (tmp_path / "ckpt" / stage).mkdir(parents=True)
    monkeypatch.setattr(jax, "jit", lambda f, **k: f)  # sampled eagerly: generate sees the key and scale, not tracers
    sample, got = train_video.load_video_model(tmp_path, "tiny")
    assert (got.vae_steps, got.dit_steps) == (7, 3)
    sample(["a red circle moving up"], seed=5)
    key, scale = drawn[-1]
    assert float(scale) == 4.0
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))
    # jax.random.key keeps a seed's low 32 bits: seed 2**32 + 5 sampled seed 5's videos, -1 seed 2**32 - 1's, True 1's
    for bad in (2**32 + 5, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"sample: seed=.* must be an int in \[0, 2\*\*32\)"):
            sample(["a red circle moving up"], seed=bad)
    sample(["a red circle moving up"], seed=np.uint32(2**32 - 1))  # the largest distinct seed still samples
    np.testing.assert_array_equal(jax.random.key_data(drawn[-1][0]), jax.random.key_data(jax.random.key(2**32 - 1)))


def test_check_resume_reads_the_stages_without_a_writer(tmp_path, monkeypatch):
    """check_resume only reads, but it opened a writable manager per stage: that made ckpt/vae and ckpt/t2v and started
    orbax's background clean-up of unfinished saves, free to delete the next manager's save in progress there (a
    save right after check_resume failed once in CI: 'Failed to rename ... _sharding')."""
    cleans, real = [], ocp.CheckpointManager
    monkeypatch.setattr(ocp, "CheckpointManager", lambda d, options, **kw: (
        cleans.append(options.cleanup_tmp_directories) or real(d, options=options, **kw)))
    p = train_video.PRESETS["tiny"]
    train_video.check_resume(p, tmp_path, 0)
    assert not (tmp_path / "ckpt").exists() and cleans == []
    meta = {"step": 1, "settings": train_video.stage_settings(p, 0)["vae"],
            "prng_impl": jax.config.jax_default_prng_impl}
    save(manager(tmp_path / "ckpt" / "vae"), 1, {"params": {"w": jnp.ones((2,))}}, meta)
    cleans.clear()
    train_video.check_resume(p, tmp_path, 0)
    assert cleans == [False]  # one reader, for the stage that has a checkpoint


def test_an_interrupted_save_is_named_once_per_stage_not_also_by_check_resume(tmp_path, capsys):
    """check_resume's reader and the stage's own manager both named a save cut short, with different reasons ("save
    in progress, or one cut short", then "interrupted while writing"): the reader is silent, the stage's says it."""
    p, stage_dir = train_video.PRESETS["tiny"], tmp_path / "ckpt" / "vae"
    meta = {"step": 1, "settings": train_video.stage_settings(p, 0)["vae"],
            "prng_impl": jax.config.jax_default_prng_impl}
    save(manager(stage_dir), 1, {"params": {"w": jnp.ones((2,))}}, meta)
    (stage_dir / "2.orbax-checkpoint-tmp-1700000000").mkdir()  # as a save of step 2 killed mid-write looks
    capsys.readouterr()
    train_video.check_resume(p, tmp_path, 0)
    assert "incomplete" not in capsys.readouterr().out
    manager(stage_dir).close()
    out = capsys.readouterr().out
    assert out.count("incomplete save") == 1 and "interrupted while writing" in out, out


def test_a_second_job_on_an_out_in_use_is_refused_before_fresh_deletes_anything(tmp_path, capsys, monkeypatch):
    """Two train_video jobs on one --out (a double launch, a requeue while the first still ran) both trained into
    it, the second setting aside the first's logs while it wrote them; with --fresh the second deleted the running
    job's directory. It is refused at once, naming the directory and the job holding it, and deletes nothing."""
    import os
    import socket

    from data.run_lock import LOCK_NAME, DirLocked, RunLock

    out = tmp_path / "run"
    (out / "ckpt" / "vae").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"kind": "vae", "step": 25}\n')
    holder = RunLock(out, "experiments.train_video")  # this test process is the running job
    before = sorted((str(p.relative_to(out)), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as e:
        train_video.main(["--preset", "tiny", "--out", str(out), "--fresh"])
    assert e.value.code == 2
    assert re.search(rf"argument --out: {re.escape(str(out))} is in use by another job: pid "
                     rf"{os.getpid()} on host {re.escape(socket.gethostname())} \(experiments.train_video, started "
                     r"[^)]+\); .* Wait for it, stop it, or use another --out", capsys.readouterr().err)
    assert sorted((str(p.relative_to(out)), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    holder.release()

    def stop_here(*a, **k):  # the first stage: the lock is held, --fresh has emptied the directory but for it
        with pytest.raises(DirLocked):
            RunLock(out, "probe")
        assert not (out / "ckpt").exists() and (out / "metrics.jsonl").read_text() == ""
        raise SystemExit("stop here")

    monkeypatch.setattr(train_video, "create_sharded", lambda build, mesh: (None, {"w": jnp.zeros(2)}))
    monkeypatch.setattr(train_video, "train_vae", stop_here)
    with pytest.raises(SystemExit, match="stop here"):  # released: the next job runs (--fresh keeps the lock file)
        train_video.main(["--preset", "tiny", "--out", str(out), "--fresh"])
    assert (out / LOCK_NAME).exists()
    RunLock(out, "next").release()  # free again once main returned


def test_a_bucket_url_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """--out gs://bucket/video passed dir_problem as the relative path gs:/bucket/video: the run locked, trained and
    saved into a local folder named 'gs:'. load_video_model(URL) said the local gs:/... held no checkpoint."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train_video.main(["--out", "gs://bucket/video"])
    assert re.search(r"argument --out: 'gs://bucket/video' is a URL.*gcsfuse", capsys.readouterr().err)
    with pytest.raises(ValueError, match="is a URL"):
        train_video.load_video_model("gs://bucket/video")
    assert not list(tmp_path.iterdir())


def test_stage_segments_record_the_resume_and_its_step_change():
    """A video checkpoint named no code version, library version or command, and a stage resumed with more steps
    kept no trace of where it was stretched: its meta now carries run_log.segments."""
    fresh = train_video._segments(None, 0, 3)
    assert [s["start_step"] for s in fresh] == [0] and fresh[0]["changed"] == [] and fresh[0]["git_commit"] != ""
    resumed = train_video._segments({"total_steps": 3, "segments": fresh}, 3, 5)
    assert [s["start_step"] for s in resumed] == [0, 3]
    assert resumed[-1]["changed"] == ["total_steps: saved 3, now 5"] and "versions" in resumed[-1]


def test_the_dit_progress_bar_shows_the_losses_its_logs_hold(tmp_path, monkeypatch, capsys):
    """The DiT's bar showed an exponential average (0.8 / 0.2) of the records 25 steps apart, restarted at each
    resume, under the logged names: at the end of a run it read diff=1.621 where metrics.jsonl and tb/ held 1.707 at
    that step (and at no step 1.621). Now it shows the logged step's own values, as the VAE's bar does."""
    from parallel import make_mesh

    def t2v_make(graphdef, opt, null, decay, shardings=None):
        def step(params, opt_state, ema, batch, key, n):
            return params, opt_state, ema, {"diffusion": n / 100, "align": n / 10}
        return step

    monkeypatch.setattr(train_video, "make_t2v_step", t2v_make)
    p = dataclasses.replace(train_video.PRESETS["tiny"], dit_steps=50, ckpt_every=50)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        log = train_video.stage_logger(tmp_path, "t2v")
        train_video.train_t2v(p, tmp_path, mesh, 0, None, {"w": jnp.zeros(4)}, np.zeros((64, 2, 4, 4, 4), np.float32),
                              np.zeros((64, 8), np.int32), np.arange(64, dtype=np.int32), log)
        log.close()
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert (last["step"], last["diffusion"], last["align"]) == (50, 0.5, 5.0)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [line for line in bar if "50/50" in line][-1].endswith("align=5.00, diff=0.500]"), bar[-3:]


def test_a_save_that_fails_on_a_full_disk_ends_the_run_in_one_line(tmp_path, monkeypatch):
    """A full disk failed a stage's save: a 158-line traceback, whose last exception was not the save's but an ENOSPC
    from closing the stage's logs in the `finally` (which hid it); train_lm says it in one line. Now so does this."""
    from experiments.checkpoint import CheckpointSaveFailed

    real_logger = train_video.stage_logger

    def full_disk_logger(out, stage):
        log = real_logger(out, stage)
        real_close = log.close

        def close():
            real_close()
            raise OSError(28, "No space left on device")

        log.close = close
        return log

    def failing_stage(*a, **k):
        raise CheckpointSaveFailed(f"checkpoint: a save into {tmp_path / 'ckpt' / 'vae'} failed (OSError: [Errno 28] "
                                   "No space left on device); a rerun resumes from step 2: first mend the cause")

    monkeypatch.setattr(train_video, "stage_logger", full_disk_logger)
    monkeypatch.setattr(train_video, "train_vae", failing_stage)
    monkeypatch.setattr(train_video, "create_sharded", lambda *a: (None, None))  # the stage fails before using them
    with pytest.raises(SystemExit, match=r"^checkpoint: a save into .*vae failed \(OSError: \[Errno 28\] No space left "
                                         r"on device\); a rerun resumes from step 2"):
        train_video.main(["--preset", "tiny", "--out", str(tmp_path), "--no-media"])


def test_score_joint_needs_every_attribute_and_static_needs_an_object_read():
    """video_eval.score by hand on 4 clips: joint is the share of clips with every attribute right (not the mean of
    the per-attribute accuracies), static the share whose direction is -1 while a colour was read (a clip with no
    object, colour -1, is not static). Only run_eval's near-perfect oracle checked them: both swaps passed."""
    from experiments.video_eval import score

    labels = {"colour": np.array([0, 1, 2, 3]), "direction": np.array([0, 1, 2, 3]), "shape": np.array([0, 1, 0, 1])}
    found = {"colour": np.array([0, 1, -1, 3]), "direction": np.array([0, -1, -1, 3]), "shape": np.array([0, 1, 0, 0])}
    out = score(found, labels)
    # hits: colour [1 1 0 1], direction [1 0 0 1], shape [1 1 1 0]: all three only on clip 0
    assert out == {"colour": 0.75, "direction": 0.5, "shape": 0.75, "joint": 0.25, "n": 4, "no_object": 0.25,
                   "static": 0.25}  # static: clip 1 (clip 2 has no object)
