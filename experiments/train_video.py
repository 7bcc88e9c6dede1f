"""Train a text-to-video model on MovingShapes on CPU, then measure how well it follows prompts.

    python -m experiments.train_video [--preset default|tiny] [--out runs/video/default] [--mesh data=-1]

Stage 1 trains the 3D causal VAE; stage 2 encodes clips to latents (the posterior means, not samples; per-channel
normalised by their mean and std over every encoded clip, kept in <out>/latent_stats.json for sampling) and trains
the text encoder + video DiT (rectified flow, caption dropout, alignment loss, EMA). Both stages
checkpoint with orbax under <out>/ckpt and resume from there (experiments.checkpoint: a newest step that does not
read back or fails its checksum is set aside in <out>/ckpt/<stage>-corrupt and the one before is used; a DiT
checkpoint records the fingerprint of the VAE whose latents it trained on, and is not resumed on another); their
losses go to <out>/metrics.jsonl (kind 'vae' / 't2v', every 25 steps and the last) and <out>/tb/vae, <out>/tb/t2v
(TensorBoard: a run per stage, each stage counting its steps from 1; a stage resumed or retrained first drops its
records past the step it starts from), plotted in <out>/loss_vae.png and
<out>/loss_t2v.png as each stage ends (also when stopped or diverged). SIGTERM or SIGINT (Ctrl-C) during a stage
finishes its step, saves it and exits 0 (as train_lm; a second Ctrl-C aborts at once), skipping the
later stages and the evaluation: rerun the same command to resume.
The evaluation generates clips for every caption at CFG 1, 2 and 4 plus a null-prompt control, reads colour,
direction and shape back from the pixels (no learned judge) and writes <out>/results.{json,md}, <out>/overview.png
and per-prompt GIFs and grids under <out>/samples. `--preset tiny` is a smoke run (1-2 minutes) of the same code.
On CPU it runs on one device; for a mesh of fake CPU devices set JAX_NUM_CPU_DEVICES=8 first (e.g. `--mesh
data=2,fsdp=2,tensor=2`). It runs in one process (its mesh over that process's devices): a multi-process job
(JAXSCALE_* variables, srun, a pod) is refused on every process. Afterwards, your own captions: `sample, p =
load_video_model("runs/video/default"); sample(["a red circle moving up"])` (uint8 videos).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import pathlib
import re
import shutil
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from data.cli import cli_parser, local_path, path_arg, run_main
from data.moving_shapes import MovingShapesConfig, caption, dataset, encode_caption, measure, null_tokens
from data.run_lock import LOCK_NAME, DirLocked, RunLock
from data.seeds import check_seed
from data.shards import write_atomically
from experiments.checkpoint import CheckpointSaveFailed, fingerprint, mesh_axes, other_mesh_note
from experiments.config import ConfigError, at_least, dir_problem, parse_mesh
from experiments.lm_step import make_optimizer
from experiments.run_log import (
    Logger,
    Stop,
    StopAtOnce,
    config_changes,
    drop_records_after,
    plot_losses,
    segments,
    set_aside_logs,
    write_text_atomically,
)
from experiments.train_lm import prng_mismatch
from experiments.video_eval import (
    chance_row,
    run_eval,
    save_results,
    score,
    table,
    to_uint8,
    write_overview,
    write_prompt_media,
)
from experiments.video_steps import (
    ema_cast,
    ema_init,
    latest_meta,
    make_t2v_step,
    make_vae_step,
    manager,
    restore,
    save,
    shard,
    shardings_of,
)
from models.config import TransformerConfig
from models.video import (
    AlignConfig,
    DiffusionConfig,
    DiTConfig,
    TextToVideo,
    TextToVideoConfig,
    VAEConfig,
    VideoVAE,
    generate,
    nearest_caption,
)
from models.video.config import token_grid
from models.video.vae import denormalize, latent_stats, normalize, psnr
from parallel import abstract_sharded, create_sharded, init_optimizer, make_mesh


@dataclasses.dataclass(frozen=True)
class Preset:
    """A text-to-video run: data, the two models, and each stage's steps, batch and learning rate (stage 1 trains
    the VAE, stage 2 the DiT on `n_latents` clips encoded once)."""

    data: MovingShapesConfig
    vae: VAEConfig
    t2v: TextToVideoConfig
    vae_steps: int
    vae_batch: int
    vae_lr: float
    n_latents: int  # clips encoded once for stage 2
    dit_steps: int
    dit_batch: int
    dit_lr: float
    ema_decay: float = 0.999
    eval_per_seen: int = 2  # clips per seen caption (40 captions)
    eval_per_held: int = 4  # clips per held-out caption (8 captions)
    eval_batch: int = 64
    ckpt_every: int = 500

    def __post_init__(self):  # the DiT is trained on the VAE's latents: a mismatch failed after the VAE's stage
        # a sub-config given as something else (vae=4, a dict from JSON) failed below with a bare AttributeError
        # ('int' object has no attribute 'latent_shape') naming no field
        for name, cls, mod in (("data", MovingShapesConfig, "data.moving_shapes"), ("vae", VAEConfig, "models.video"),
                               ("t2v", TextToVideoConfig, "models.video")):
            v = getattr(self, name)
            if not isinstance(v, cls):
                raise ValueError(f"Preset: {name}={v!r:.60}: must be a {mod}.{cls.__name__}, got {type(v).__name__} "
                                 f"(build {cls.__name__}(**fields) from a dict)")
        # 0 failed as 'integer modulo by zero' after the first step, a negative one saved as its absolute value
        # eval_per_* of 0 trained both stages, then the evaluation failed as numpy's 'need at least one array to
        # stack'; eval_batch=0 passed check_batch and failed after the VAE stage, encoding the latents
        for name, what in (("ckpt_every", "steps between checkpoints; each stage's last step is always saved"),
                           ("eval_per_seen", "clips generated per seen caption"),
                           ("eval_per_held", "clips generated per held-out caption"),
                           ("eval_batch", "clips per evaluation batch"),
                           # the stages' own numbers were unchecked too: dit_batch=-8 or n_latents=0 failed in numpy
                           # after the whole VAE stage
                           ("vae_steps", "the VAE stage's steps"), ("vae_batch", "clips per VAE step"),
                           ("n_latents", "clips encoded for the DiT stage"), ("dit_steps", "the DiT stage's steps"),
                           ("dit_batch", "latents per DiT step")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"Preset: {name}={v!r}: must be an int >= 1 ({what})")
        # ema_decay=nan made every EMA parameter (the model sampled and evaluated) NaN from the first step, -1 flipped
        # its sign each step; a NaN or negative rate trained in silence
        for name in ("vae_lr", "dit_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"Preset: {name}={v!r}: must be a finite number > 0 (the stage's peak learning rate)")
        v = self.ema_decay  # (1: the EMA follows its warm-up min(decay, (1 + n) / (10 + n)) alone, a running mean)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
            raise ValueError(f"Preset: ema_decay={v!r}: must be a number in [0, 1] (the DiT's EMA keeps decay·ema + "
                             "(1 - decay)·params each step; 0.999 is usual)")
        got = self.vae.latent_shape(self.data.frames, self.data.size, self.data.size)
        want = (*self.t2v.dit.latent_shape, self.t2v.dit.latent_channels)
        if tuple(got) != tuple(want):
            raise ValueError(f"Preset: the VAE makes latents {got} of {self.data.frames}×{self.data.size}² clips, but "
                             f"the DiT takes {want} (t2v.dit.latent_shape, latent_channels); make them agree")
        from data.moving_shapes import VOCAB

        text = self.t2v.text  # caption ids past the embedding table read NaN under jit; too long ones fail late
        if text.vocab_size < len(VOCAB):
            raise ValueError(f"Preset: t2v.text.vocab_size={text.vocab_size} < the {len(VOCAB)} caption token ids "
                             "(data.moving_shapes.VOCAB); use at least that many")
        if text.max_seq_len < self.data.max_caption_len:
            raise ValueError(f"Preset: t2v.text.max_seq_len={text.max_seq_len} < data.max_caption_len="
                             f"{self.data.max_caption_len}; the text encoder must take a whole caption")
        for name, c in (("vae", self.vae), ("t2v.dit", self.t2v.dit), ("t2v.text", self.t2v.text)):
            if c.param_dtype != "float32":  # as experiments.config refuses for the LM trainer
                raise ValueError(f"Preset: {name}.param_dtype={c.param_dtype!r}: Adam's updates smaller than half "
                                 "a low-precision step are lost (no float32 master copy is kept); use float32 "
                                 "parameters with dtype='bfloat16' compute")


PRESETS = {
    # 9×32×32 clips → 3×8×8×8 latents → 48 tokens of 1×2×2 patches; 26 min on 2 CPU cores shared with other
    # jobs (load 9-12), 561 s on a quiet machine (twenty-fifth session; docs/benchmarks.md).
    # Full 3D attention and a time shift of 3: at this budget factorized attention did not learn the
    # direction of motion (docs/benchmarks.md, "Video diffusion"), and high-noise steps decide the motion.
    "default": Preset(
        data=MovingShapesConfig(frames=9, size=32),
        vae=VAEConfig(channels=(16, 32, 64), latent_channels=8, spatial_factor=4, temporal_factor=4),
        t2v=TextToVideoConfig(
            dit=DiTConfig(latent_shape=(3, 8, 8), latent_channels=8, patch=(1, 2, 2), d_model=128, n_layers=4,
                          n_heads=4, mlp_dim=384, attention="full", text_dim=64),
            text=TransformerConfig(vocab_size=16, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, max_seq_len=8),
            align=AlignConfig(d_model=64, n_layers=1, n_heads=4, mlp_dim=128, embed_dim=64),
            diffusion=DiffusionConfig(kind="flow", shift=3.0, sample_steps=25)),
        vae_steps=600, vae_batch=8, vae_lr=2e-3, n_latents=4096, dit_steps=1000, dit_batch=32, dit_lr=1e-3),
    # 5×16×16 clips → 2×4×4×4 latents → 8 tokens: exercises every stage in about a minute (a smoke run: it learns
    # nothing, and its results table says so). Factorized attention, DiTConfig's default: the path 'default' does
    # not run.
    "tiny": Preset(
        data=MovingShapesConfig(frames=5, size=16, object_size=(5, 6), speed=(1.0, 1.2)),
        vae=VAEConfig(channels=(8, 16, 16), latent_channels=4, spatial_factor=4, temporal_factor=4),
        t2v=TextToVideoConfig(
            dit=DiTConfig(latent_shape=(2, 4, 4), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=1,
                          n_heads=2, mlp_dim=64, text_dim=16),
            text=TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=8),
            align=AlignConfig(d_model=16, n_layers=1, n_heads=2, mlp_dim=32, embed_dim=16),
            diffusion=DiffusionConfig(kind="flow", sample_steps=2)),
        vae_steps=3, vae_batch=8, vae_lr=2e-3, n_latents=64, dit_steps=3, dit_batch=8, dit_lr=1e-3,
        eval_per_seen=1, eval_per_held=1, eval_batch=48, ckpt_every=3),
}


# what a run directory holds (written by main); --fresh refuses to delete a directory holding anything else
RUN_FILES = frozenset({"ckpt", "latents.npz", "latents.npz.tmp.npz", "latent_stats.json", "results.json",
                       "results.md", "overview.png", "samples", "metrics.jsonl", "tb", "loss_vae.png", "loss_t2v.png",
                       LOCK_NAME})


def run_file(name: str) -> bool:
    """Whether `name` is one of RUN_FILES, the temporary file one is written to (`<name>.tmp`, left by a kill), or
    logs set aside by run_log.set_aside_logs (`<name>.prev-<time>`)."""
    return name in RUN_FILES or name.removesuffix(".tmp") in RUN_FILES or name.split(".prev-")[0] in RUN_FILES


# each stage's loss plot (run_log.plot_losses): (kind, key, label, style) of the losses its metrics.jsonl records
# hold; no held-out loss is measured during either stage
STAGE_CURVES = {
    "vae": (("vae", "loss", "loss (mse + kl_weight·kl)", ".-"), ("vae", "mse", "reconstruction mse", ".--"),
            ("vae", "kl", "kl", ".:")),
    "t2v": (("t2v", "loss", "loss (diffusion + align_weight·align)", ".-"), ("t2v", "diffusion", "diffusion", ".--"),
            ("t2v", "align", "align (InfoNCE)", ".:")),
}


def _end_stage(out: pathlib.Path, stage: str, log: Logger, stop: Stop) -> None:
    """A stage's `finally`: its signal handler put back, its logs closed and plotted. Where the stage failed (a save
    on a full disk), an OSError here (the same full disk) is said in one line, not raised over the stage's error."""
    failing = sys.exc_info()[1] is not None
    stop.restore()
    try:
        log.close()
        print(f"{stage}: wrote {plot_stage(out, stage)}")
    except OSError as e:
        if not failing:
            raise
        print(f"{stage}: its logs could not be closed or plotted either ({e})")


def plot_stage(out: pathlib.Path, stage: str) -> pathlib.Path:
    """out/loss_<stage>.png: the stage's losses from out/metrics.jsonl against its steps (log scale: the VAE's mse
    falls by orders of magnitude beside its kl)."""
    return plot_losses(out, curves=STAGE_CURVES[stage], name=f"loss_{stage}.png", ylabel=f"{stage} loss", log_y=True)


def remove_media(out: pathlib.Path) -> list[str]:
    """Delete a run's overview.png and samples/ (an evaluation with --no-media would leave an earlier model's
    beside its own results), and overview.png.tmp (a write cut short by a kill); the names it removed."""
    stale = [n for n in ("overview.png", "overview.png.tmp", "samples") if (out / n).exists()]
    for n in stale:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    return stale


def check_batch(batch: int, mesh, what: str, fix: str | None = None):
    """Exit with a message naming `what` unless `batch` splits over the mesh's batch axes (data·fsdp·expert). fix: what
    to do instead (main's `batch_mesh_fix`; None: data=1 and every device on tensor)."""
    n = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    if batch % n:
        fix = fix or (f"pass a --mesh whose data·fsdp·expert divides {batch} and put the remaining devices on tensor "
                      f"(e.g. data=1,tensor={math.prod(mesh.shape.values())})")
        raise SystemExit(f"--mesh: the preset's {what}={batch} must be divisible by the batch mesh axes "
                         f"(data·fsdp·expert = {n}); {fix}")


def batch_mesh_fix(p: Preset, devices) -> str:
    """A --mesh over `devices` (data the largest split of every batch of `p`, tensor the rest) that the preset's models
    fit, or, where none does, the device count to run on. 'e.g. data=1,tensor=3' (on 3 devices) was refused next, the
    tiny preset's VAE channels not divisible by 3: on 3, 6 or 12 devices no mesh fits, and nothing said so."""
    n, batch = len(devices), math.gcd(p.vae_batch, p.dit_batch, p.eval_batch)
    for d in sorted((d for d in range(1, n + 1) if n % d == 0 and batch % d == 0), reverse=True):
        shape = {"data": d, **({"tensor": n // d} if n > d else {})}
        try:
            mesh = make_mesh(shape, devices=devices)
            for build in (lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(0))):
                abstract_sharded(build, mesh)
        except ValueError:  # a width the tensor axis does not divide
            continue
        return (f"pass a --mesh whose data·fsdp·expert divides {batch} (every batch of the preset) and put the "
                f"remaining devices on tensor: --mesh " + ",".join(f"{a}={s}" for a, s in shape.items()))
    fewer = max(d for d in range(1, n) if batch % d == 0)
    return (f"no mesh over these {n} devices fits: the rest of them on tensor do not divide the preset's model widths; "
            f"run on a device count that divides {batch} (every batch of the preset), e.g. {fewer} "
            f"(JAX_NUM_CPU_DEVICES={fewer} on CPU, CUDA_VISIBLE_DEVICES on GPUs)")


def check_sequence(p: Preset, mesh):
    """Exit with a message naming the preset's field unless the DiT's tokens and the captions split over the mesh's
    `sequence` axis (act_seq): the captions' refusal came from the DiT stage's first batch, after the VAE stage had
    trained and encoded its latents (the VAE's rows are replicated where `sequence` does not divide them)."""
    n, dit = mesh.shape.get("sequence", 1), p.t2v.dit
    for size, what in ((dit.tokens, f"DiT's {token_grid(dit, 't2v.dit.')}"),
                       (p.data.max_caption_len, f"caption length {p.data.max_caption_len} (data.max_caption_len)")):
        if size % n:
            raise SystemExit(f"--mesh: sequence={n} splits the {what}, which it does not divide; pass a --mesh whose "
                             f"sequence divides {size} and put the remaining devices on data or fsdp")


def stage_settings(p: Preset, seed: int) -> dict[str, dict]:
    """What each stage's checkpoint is trained with, saved in its meta. Resuming a stage under other settings
    would mix two runs (the DiT of one VAE's latents decoded by another), so `check_resume` refuses it. Step
    counts may change (training on, with the schedule stretched); the DiT's settings include the latents'."""
    vae = {**_fields("vae", p.vae), "vae_batch": p.vae_batch, "vae_lr": p.vae_lr, **_fields("data", p.data),
           "seed": seed}
    t2v = {**_fields("t2v", p.t2v), "dit_batch": p.dit_batch, "dit_lr": p.dit_lr, "ema_decay": p.ema_decay,
           "seed": seed, "latents": latents_made_by(p)}
    return {"vae": vae, "t2v": t2v}


def _fields(prefix: str, cfg) -> dict[str, str]:
    """A config's leaves by dotted name ('t2v.diffusion.shift'), each as its repr: a refusal can name them."""
    if not dataclasses.is_dataclass(cfg):
        return {prefix: repr(cfg)}
    return {k: v for f in dataclasses.fields(cfg)
            for k, v in _fields(f"{prefix}.{f.name}", getattr(cfg, f.name)).items()}


def _defaults(cfg, prefix: str = "") -> dict[str, str]:
    """Each field of a (nested) dataclass config with a default, by dotted name, as the repr of that default: what a
    run saved before the field existed trained with."""
    out = {}
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        if dataclasses.is_dataclass(v := getattr(cfg, f.name)):
            out |= _defaults(v, f"{prefix}{f.name}.")
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = repr(f.default)
    return out


def _changed(saved: dict, now: dict, p: Preset) -> list[str]:
    """The settings that differ, as 'name: saved -> now' (the name alone for long values). A field absent from the
    saved settings (added since) counts as its default: a run saved before a config field existed (the text
    encoder's qk_norm) resumes, one setting another value is refused. (Not in the whole-config reprs of the oldest
    checkpoints, where a field's name does not say which nested config it belongs to.)"""
    whole = {"vae": p.vae, "data": p.data, "t2v": p.t2v}
    added = {f"{k}.{name}": v for k, cfg in whole.items() for name, v in _defaults(cfg).items()}
    if any(isinstance(saved.get(k), str) and k in ("vae", "data", "t2v") for k in saved):
        # written before settings were saved field by field: whole configs as reprs
        now = {k: v for k, v in now.items() if k.split(".")[0] not in whole} | {
            k: repr(whole[k]) for k in whole if k in saved}
    out = []
    for k in sorted(set(now) | set(saved)):
        a, b = saved.get(k, added.get(k, "(absent)")), now.get(k, "(absent)")
        if a != b and k in ("vae", "data", "t2v"):  # whole reprs: the fields whose 'name=value' differ
            ta, tb = re.split(r", |\(", a), re.split(r", |\(", b)
            ops = difflib.SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes()
            out.append(f"{k}: " + ", ".join(f"{' '.join(ta[i:j])} -> {' '.join(tb[m:n])}"
                                            for op, i, j, m, n in ops if op != "equal"))
        elif a != b and k == "latents" and _json_dict(a) and _json_dict(b):  # the settings the latents came from
            ja, jb = _json_dict(a), _json_dict(b)
            out += [f"latents.{f}: {ja.get(f, '(absent)')} -> {jb.get(f, '(absent)')}"
                    for f in sorted(set(ja) | set(jb)) if ja.get(f) != jb.get(f)]
        elif a != b:
            out.append(f"{k}: {a} -> {b}" if len(str(a)) + len(str(b)) < 80 else k)
    return out


def _json_dict(text) -> dict | None:
    try:
        d = json.loads(text)
    except (TypeError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _newest_meta(directory: pathlib.Path) -> tuple[int, dict] | None:
    """`latest_meta` of a stage's checkpoints, read without a writer (None when there are none): a writable manager
    makes the directory and starts orbax's clean-up of unfinished saves in the background, which can delete the save
    in progress of the next manager there (a save right after check_resume failed: 'Failed to rename ... _sharding').
    Silent: the stage's own manager, opened next, names any incomplete save (both did, with different reasons)."""
    quiet = lambda *a, **k: None  # noqa: E731
    return latest_meta(manager(directory, read_only=True, log=quiet)) if directory.is_dir() else None


def _segments(meta: dict | None, start: int, total_steps: int) -> list[dict]:
    """A stage's `run_log.segments` for its checkpoint meta (a resume may change only the stage's step count)."""
    changed = [] if meta is None else config_changes({"total_steps": meta.get("total_steps")},
                                                     {"total_steps": total_steps})
    return segments(meta, start, changed)


def check_resume(p: Preset, out: pathlib.Path, seed: int):
    """Before any compute: each stage's newest checkpoint must have been made with this run's settings."""
    for stage, now in stage_settings(p, seed).items():
        if (latest := _newest_meta(out / "ckpt" / stage)) is None:
            continue
        step, saved = latest
        # other settings before the step count: another preset's run is past it too, and more steps would not do
        changed = _changed(saved["settings"], now, p) if "settings" in saved else []
        if changed:
            raise SystemExit(f"{stage}: {out / 'ckpt' / stage} (step {step}) was trained with other settings "
                             f"({'; '.join(changed)}); "
                             f"rerun with the settings it was made with, pass --fresh to start over, or delete "
                             f"{out / 'ckpt' / stage} (and later stages) to retrain from there")
        asked = {"vae": p.vae_steps, "t2v": p.dit_steps}[stage]
        if step > asked:  # evaluating it would report a longer-trained model under the shorter run's name
            flag = {"vae": "--vae-steps", "t2v": "--dit-steps"}[stage]
            raise SystemExit(f"{stage}: {out / 'ckpt' / stage} is at step {step}, past {flag} {asked}; pass "
                             f"{flag} >= {step}, a fresh --out, or --fresh")
        # its keys are made from the seed by the default implementation: under another, another random stream
        if why := prng_mismatch(saved.get("prng_impl"), lambda: None,
                                "its keys, made from the seed, would draw another random stream"):
            raise SystemExit(f"{stage}: {out / 'ckpt' / stage} (step {step}): {why}")
        if "settings" not in saved:
            print(f"{stage}: checkpoint {step} predates saved settings; resuming it unchecked")


def _check_finite(stage: str, step: int, metrics: dict):
    """Stop a diverged stage by name (checked where the progress bar updates: the steps between run unsynced)."""
    bad = sorted(k for k, v in jax.device_get(metrics).items() if not np.all(np.isfinite(v)))
    if bad:
        raise SystemExit(f"error: {stage} diverged: {bad} not finite at step {step}; lower the stage's learning rate "
                         "or check the preset (nothing from this step on was saved)")


def _wall_s(meta: dict | None) -> float:
    """A stage's training seconds before this attempt: its checkpoint's `wall_s` (0 for none, or one saved before
    it was recorded). A resumed run's results.json timed only its own attempt: vae_s of a VAE resumed at its last
    step read as the seconds it trained."""
    v = (meta or {}).get("wall_s")
    return float(v) if isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0 else 0.0


def stage_seconds(out: pathlib.Path, stage: str, fallback: float) -> float:
    """The stage's training seconds over all its attempts, as its newest checkpoint records them; `fallback` where it
    records none."""
    latest = _newest_meta(out / "ckpt" / stage)
    return float(latest[1]["wall_s"]) if latest and "wall_s" in latest[1] else fallback


def _warmup(steps: int) -> int:
    """5% of the steps (at least 1), leaving at least one update for the cosine decay (none for 1-2 steps)."""
    return min(max(1, steps // 20), max(steps - 2, 0))


def train_vae(p: Preset, out: pathlib.Path, mesh, seed: int, graphdef, params, log=None, stop=None):
    """Stage 1: train the VAE to `p.vae_steps` (resuming from out/ckpt/vae); returns (graphdef, params). log: a
    run_log.Logger for its metrics (None: none written). stop: a run_log.Stop; once it has caught SIGTERM / SIGINT,
    the stage saves the step it is on and returns early (the caller reads stop.signal)."""
    opt = make_optimizer(p.vae_lr, total_steps=p.vae_steps, warmup_steps=_warmup(p.vae_steps), weight_decay=0.0)
    opt_state = init_optimizer(opt, params)  # moments sharded like their params
    mgr = manager(out / "ckpt" / "vae")
    start, meta = 0, None
    if (r := restore(mgr, {"params": params, "opt_state": opt_state})) is not None:
        start, trees, meta = r
        params, opt_state = trees["params"], trees["opt_state"]
        print(f"vae: resumed at step {start}" + _stretched(meta, p.vae_steps, "--vae-steps")
              + other_mesh_note(meta, mesh, p.vae.dtype))
    segs = _segments(meta, start, p.vae_steps)  # who made each part of the stage (command, commit, versions)
    t_start = time.time() - _wall_s(meta)  # the stage's seconds over its attempts, saved with each step
    ds = dataset(p.data, "train", p.vae_batch, seed=seed)
    step_fn, key = make_vae_step(graphdef, opt, shardings_of((params, opt_state))), jax.random.key(seed)
    # the steps after the checkpoint (all, with none) replay: an interrupted attempt's events for them are stale
    if log is not None:
        log.resume(start)
        drop_records_after(log, "vae", start)
    bar = tqdm(range(start + 1, p.vae_steps + 1), desc="vae", unit="step", initial=start, total=p.vae_steps)
    step = start
    for step in bar:
        video = shard(ds[step - 1]["video"], mesh)
        params, opt_state, m = step_fn(params, opt_state, video, jax.random.fold_in(key, step))
        if step % 25 == 0 or step == p.vae_steps:
            _check_finite("vae", step, m)
            bar.set_postfix(psnr=f"{float(m['psnr']):.1f}", kl=f"{float(m['kl']):.2f}")
            if log is not None:
                log.write({"kind": "vae", "step": step, **{k: float(v) for k, v in jax.device_get(m).items()}})
        stopping = stop is not None and stop.signal is not None
        if step % p.ckpt_every == 0 or step == p.vae_steps or stopping:
            _check_finite("vae", step, m)
            save(mgr, step, {"params": params, "opt_state": opt_state},
                 {"step": step, "psnr": float(m["psnr"]), "settings": stage_settings(p, seed)["vae"],
                  "total_steps": p.vae_steps, "mesh": mesh_axes(mesh), "prng_impl": jax.config.jax_default_prng_impl,
                  "segments": segs, "wall_s": time.time() - t_start})
            if log is not None:
                log.flush()
        if stopping:
            break
    _say_stopped(stop, "vae", step)
    return graphdef, params


def stage_logger(out: pathlib.Path, stage: str) -> Logger:
    """A stage's Logger: metrics.jsonl (shared, records of kind `stage`) and its own TensorBoard run, tb/<stage>.
    The stages share step numbers (each counts from 1): in one run, the restart marker of a resumed stage (which
    drops every earlier event at its step or later, whatever the tag) dropped the other stage's events too."""
    return Logger(out, primary=True, tb=f"tb/{stage}")


def _stretched(meta: dict, total: int, flag: str) -> str:
    """A note when a stage resumes toward another step count than its checkpoint was trained toward: the
    learning-rate schedule is rebuilt for the new total, so the run differs from an uninterrupted one."""
    was = meta.get("total_steps")
    if was is None or was == total:
        return ""
    return (f"; note: trained so far toward {was} step{'s' * (was != 1)}, now {flag} {total}: the learning-rate "
            "schedule is rebuilt "
            f"for {total} (its warmup and decay stretched from here on), so this run differs from an uninterrupted "
            f"{total}-step one")


def latents_made_by(p: Preset) -> str:
    """The settings the cached latents depend on, as canonical JSON (a cache made under others is re-encoded)."""
    return json.dumps({"vae": repr(p.vae), "vae_steps": p.vae_steps, "vae_batch": p.vae_batch, "vae_lr": p.vae_lr,
                       "n_latents": p.n_latents, "eval_batch": p.eval_batch, "data": repr(p.data)}, sort_keys=True)


def encode_latents(p: Preset, encode, cache: pathlib.Path, vae_fingerprint: str = ""):
    """Posterior means of n_latents training clips (cached), their tokens and caption ids.
    encode: [eval_batch, T, H, W, 3] → latents. The cache is used only if made by the same VAE (its settings and
    its parameters' `fingerprint`: a VAE retrained with another seed has another encoder), clip count and data."""
    made_by = json.dumps({"settings": latents_made_by(p), "vae_params": vae_fingerprint}, sort_keys=True)
    if cache.exists():
        try:
            with np.load(cache) as f:
                if "made_by" in f and str(f["made_by"]) == made_by:
                    return f["latents"], f["tokens"], f["combo"]
            print(f"encode: {cache.name} was made by another VAE / settings; encoding again")
        except (OSError, ValueError, zipfile.BadZipFile, KeyError) as e:  # a write cut short by a kill, say
            print(f"encode: {cache.name} is unreadable ({type(e).__name__}); encoding again")
    ds = dataset(p.data, "train", p.eval_batch, seed=1)
    lat, tok, combo = [], [], []
    for i in tqdm(range(math.ceil(p.n_latents / p.eval_batch)), desc="encode", unit="batch"):
        b = ds[i]
        lat.append(np.asarray(encode(b["video"])))
        tok.append(b["tokens"])
        combo.append(b["combo"])
    lat, tok, combo = (np.concatenate(x)[: p.n_latents] for x in (lat, tok, combo))
    tmp = cache.with_name(cache.name + ".tmp.npz")  # written whole, then renamed: a kill leaves the old cache or none
    # (a write that raised, a full disk or Ctrl-C, left its partial tmp in the run for good: now removed)
    write_atomically(cache, lambda t: np.savez(t, latents=lat, tokens=tok, combo=combo, made_by=np.array(made_by)),
                     tmp=tmp)
    return lat, tok, combo


def prepare_latents(p: Preset, encode, out: pathlib.Path, vae_fingerprint: str = ""):
    """Stage 2's inputs: `encode_latents` (cached in out/latents.npz), normalised per channel by `latent_stats` of
    all n_latents latents (every encoded batch, not one), which go to out/latent_stats.json for load_video_model.
    Returns (z [n_latents, T, H, W, Z] float32 normalised, tokens [n_latents, L], combo [n_latents],
    (mean [Z], std [Z]))."""
    lat, tokens, combo = encode_latents(p, encode, out / "latents.npz", vae_fingerprint)
    stats = latent_stats(lat)
    # whole or not at all: load_video_model reads it, and a kill mid-write left it truncated
    write_text_atomically(out / "latent_stats.json", json.dumps({"mean": stats[0].tolist(),
                                                                 "std": stats[1].tolist()}))
    return np.asarray(normalize(lat, stats)), tokens, combo, stats


def heldout_reconstruction(p: Preset, encode, decode):
    """The VAE on real clips of held-out combinations: one batch of `eval_batch` (the 'heldout' split, shuffle
    seed 123) encoded to posterior means and decoded. encode: clips [eval_batch, T, H, W, 3] → latents; decode:
    the inverse. Returns (that batch, its latents, the PSNR in dB of the mean squared error over all its pixels
    (decoded values unclipped), the evaluator's scores (`score(measure(...))`) of the reconstructions clipped to
    [-1, 1], as run_eval reads generated clips)."""
    real = dataset(p.data, "heldout", p.eval_batch, seed=123)[0]
    z_real = np.asarray(encode(real["video"]))
    recon = np.asarray(decode(z_real))
    vae_psnr = float(psnr(np.mean((recon - real["video"]) ** 2)))
    return real, z_real, vae_psnr, score(measure(np.clip(recon, -1, 1), value_range=(-1, 1)),
                                               {a: real[a] for a in ("colour", "direction", "shape")})


def targets_met(results: dict, scales) -> dict[str, bool]:
    """The run's targets, judged on the seen captions at the largest CFG scale (whatever order --scales gave)."""
    seen = results[(f"cfg {max(scales):g}", "seen")]
    return {"colour >= 0.90 (seen)": seen["colour"] >= 0.90, "direction >= 0.80 (seen)": seen["direction"] >= 0.80}


def train_t2v(p: Preset, out: pathlib.Path, mesh, seed: int, graphdef, params, z, tokens, combo, log=None,
              stop=None, vae_fingerprint: str | None = None):
    """Stage 2: train the DiT (+ aligner) on latents z with their caption tokens, keeping an EMA of the weights
    (resuming from out/ckpt/t2v); returns (graphdef, the EMA weights in the params' dtypes). stop: as train_vae's.
    vae_fingerprint: `fingerprint` of the VAE whose latents z are, saved with each checkpoint; a checkpoint saved
    with another one is refused (SystemExit naming the fix), one saved before it was recorded resumes (None: no
    check, nothing recorded)."""
    null = null_tokens(p.data.max_caption_len)
    opt = make_optimizer(p.dit_lr, total_steps=p.dit_steps, warmup_steps=_warmup(p.dit_steps), weight_decay=0.0)
    opt_state = init_optimizer(opt, params)  # moments sharded like their params
    ema = ema_init(params)  # float32 whatever param_dtype; restored as float32 too
    mgr = manager(out / "ckpt" / "t2v")

    def same_vae(meta):  # the settings match (check_resume), but a VAE retrained (ckpt/vae deleted) is another one
        was = meta.get("vae_fingerprint")
        if vae_fingerprint is not None and was is not None and was != vae_fingerprint:
            raise SystemExit(f"t2v: {out / 'ckpt' / 't2v'} (step {meta.get('step')}) was trained on the latents of "
                             f"another VAE (fingerprint {was}, this run's {out / 'ckpt' / 'vae'} is {vae_fingerprint}:"
                             f" retrained since); delete {out / 'ckpt' / 't2v'} to train the DiT on this VAE's "
                             "latents, or pass --fresh to start over")

    start, meta = 0, None
    if (r := restore(mgr, {"params": params, "opt_state": opt_state, "ema": ema}, check=same_vae)) is not None:
        start, trees, meta = r
        params, opt_state, ema = trees["params"], trees["opt_state"], trees["ema"]
        print(f"t2v: resumed at step {start}" + _stretched(meta, p.dit_steps, "--dit-steps")
              + other_mesh_note(meta, mesh, p.t2v.dit.dtype))
    segs = _segments(meta, start, p.dit_steps)
    t_start = time.time() - _wall_s(meta)  # (as train_vae's)
    step_fn = make_t2v_step(graphdef, opt, null, p.ema_decay, shardings_of((params, opt_state, ema)))
    key = jax.random.key(seed + 7)
    if log is not None:  # (as train_vae's)
        log.resume(start)
        drop_records_after(log, "t2v", start)
    bar = tqdm(range(start + 1, p.dit_steps + 1), desc="dit", unit="step", initial=start, total=p.dit_steps)
    step = start
    for step in bar:
        idx = np.random.default_rng((seed, step)).integers(0, len(z), p.dit_batch)
        batch = shard({"latents": z[idx], "tokens": tokens[idx], "caption_id": combo[idx]}, mesh)
        params, opt_state, ema, m = step_fn(params, opt_state, ema, batch, jax.random.fold_in(key, step), step)
        if step % 25 == 0 or step == p.dit_steps:
            m = jax.device_get(m)
            _check_finite("t2v", step, m)
            # the step's own values, as logged (and as the VAE's bar): an average of the records 25 steps apart,
            # restarted at each resume, showed numbers that metrics.jsonl and tb/ held at no step
            bar.set_postfix(diff=f"{m['diffusion']:.3f}", align=f"{m.get('align', 0):.2f}")
            if log is not None:
                log.write({"kind": "t2v", "step": step, **{k: float(v) for k, v in m.items()}})
        stopping = stop is not None and stop.signal is not None
        if step % p.ckpt_every == 0 or step == p.dit_steps or stopping:
            _check_finite("t2v", step, m)
            save(mgr, step, {"params": params, "opt_state": opt_state, "ema": ema},
                 {"step": step, "settings": stage_settings(p, seed)["t2v"], "total_steps": p.dit_steps,
                  "mesh": mesh_axes(mesh), "prng_impl": jax.config.jax_default_prng_impl, "segments": segs,
                  "wall_s": time.time() - t_start,
                  **({} if vae_fingerprint is None else {"vae_fingerprint": vae_fingerprint})})
            if log is not None:
                log.flush()
        if stopping:
            break
    _say_stopped(stop, "t2v", step)
    return graphdef, ema_cast(ema, params)


def _say_stopped(stop, stage: str, step: int):
    """After a stage's loop: if `stop` caught a signal, the one line saying so, through tqdm.write (the stage's bar
    may be open). `step` is saved whichever way the loop ended: the stop's save, the last step's, or (no step
    left to train) the checkpoint it resumed from."""
    if stop is not None and stop.signal is not None:
        tqdm.write(f"{stop.signal}: saved {stage} step {step}; exiting (later stages and the evaluation skipped; "
                   "rerun the same command to resume)")


# settings of how a stage trained, not of the model it made: load_video_model does not ask for them ('latents': the
# VAE settings the DiT's training latents came from, compared field by field in the VAE's own stage)
TRAINING_ONLY = frozenset({"vae_batch", "vae_lr", "vae.kl_weight", "dit_batch", "dit_lr", "ema_decay",
                           "t2v.caption_dropout", "t2v.align_weight", "latents"})


def load_video_model(out, preset: str | Preset = "default"):
    """`(sample, preset)` of a finished run in `out`: `sample(captions, cfg_scale=4.0, seed=0)` → uint8 videos
    [N, frames, size, size, 3] from the DiT's EMA weights and the VAE's newest checkpoint, on one device.

    preset: the name or `Preset` the run was trained with (with --attention / --shift overrides as its fields;
    step counts and how it trained, e.g. --dit-lr, are the run's own, read from its checkpoints); checkpoints of
    another model are refused naming the fields that differ. The Preset returned carries the run's vae_steps and
    dit_steps. A run stopped mid-DiT samples its newest checkpoint's EMA, and says so. Captions use the
    MovingShapes vocabulary, e.g. "a red circle moving up" (also held-out combinations); "" is the null caption.
    `sample(..., steps=n)`: n sampler steps instead of the preset's sample_steps. The seed draws one noise block
    for the whole batch, so a caption's video depends on its row index, not on the other captions: the same caption
    at the same row with the same seed gives the same video in any batch (sampled alone it is row 0's), at another
    row another one.

        sample, p = load_video_model("runs/video/default")
        videos = sample(["a red circle moving up", "a blue square moving left"])
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"load_video_model: preset={preset!r} is not one of {sorted(PRESETS)}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = pathlib.Path(local_path(out))
    metas, newest, dit_vae = {}, {}, None
    for stage in ("vae", "t2v"):
        # looked for first: the manager creates its directory, and a mistyped folder was left holding ckpt/vae
        latest = _newest_meta(out / "ckpt" / stage)
        if latest is None:  # a VAE without a DiT: a run stopped in stage 1 (it said to pass a run's --out: it is one)
            raise FileNotFoundError(f"{out / 'ckpt' / stage} holds no checkpoint: " + (
                "the run stopped before its DiT stage saved a step; rerun its train_video command to train it"
                if stage == "t2v" else "pass a train_video run's --out"))
        metas[stage], newest[stage] = latest[1].get("settings", {}), latest[0]
        dit_vae = latest[1].get("vae_fingerprint") if stage == "t2v" else dit_vae
    dit_total = latest[1].get("total_steps")
    seed = metas["t2v"].get("seed", 0)  # the run's own: it trained the weights, it is not asked of the caller
    made = _json_dict(metas["t2v"].get("latents"))
    # how it was trained (learning rates, batches, loss weights) does not change the model a sample runs
    keep = lambda d: {k: v for k, v in d.items() if k not in TRAINING_ONLY}  # noqa: E731

    def differs(q: Preset) -> tuple[Preset, str | None, list[str]]:
        if made and isinstance(made.get("vae_steps"), int):  # a step count, not the model: --vae-steps N is not asked
            q = dataclasses.replace(q, vae_steps=made["vae_steps"])
        for stage, now in stage_settings(q, seed).items():
            if metas[stage] and (changed := _changed(keep(metas[stage]), keep(now), q)):
                return q, stage, changed
        return q, None, []

    p, stage, changed = differs(p)
    if isinstance(dit_total, int):  # the run's own, as vae_steps (the preset's gave another run's length)
        p = dataclasses.replace(p, dit_steps=dit_total)
    if changed:  # the default preset on a --preset tiny run named no preset: say which one the run matches
        fits = [name for name, q in PRESETS.items() if differs(q)[1] is None]
        hint = (f"pass preset={fits[0]!r} (the preset they match)" if fits else
                "pass the preset (and overrides) the run used")
        raise ValueError(f"load_video_model: {out / 'ckpt' / stage} was trained with other settings "
                         f"({'; '.join(changed)}); {hint}")
    stats_path = out / "latent_stats.json"
    if not stats_path.exists():
        raise FileNotFoundError(f"{stats_path} is missing: the run stopped before encoding its latents")
    # by name: read in the file's key order, a 'std'-first file was swapped
    saved = json.loads(stats_path.read_text(encoding="utf-8"))
    if not isinstance(saved, dict) or {"mean", "std"} - set(saved):
        raise ValueError(f"{stats_path} must hold the latents' per-channel {{\"mean\": [...], \"std\": [...]}} as "
                         "train_video writes it; rerun the run's train_video command (it rewrites the file)")
    # one finite number per latent channel (std > 0): a file of one value broadcast over every channel and sampled
    # silently; one of another length failed in the sampler as a bare broadcasting error naming no file
    z = p.vae.latent_channels
    for k in ("mean", "std"):
        v = np.asarray(saved[k], dtype=object)
        ok = v.shape == (z,) and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
                                     and (k == "mean" or x > 0) for x in v)
        if not ok:
            raise ValueError(f"{stats_path}: '{k}' must be {z} finite numbers{' > 0' * (k == 'std')} (one per latent "
                             f"channel, VAEConfig.latent_channels={z}), got {saved[k]!r}; rerun the run's train_video "
                             "command (it rewrites the file)")
    stats = tuple(jnp.asarray(saved[k], jnp.float32) for k in ("mean", "std"))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    # restored onto shapes only: a random init would compile and allocate both models just to be overwritten
    vae_gd, vae_abstract = abstract_sharded(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), mesh)
    t2v_gd, t2v_abstract = abstract_sharded(lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(0)), mesh)
    ema_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), t2v_abstract)

    def restored(stage: str, targets: dict) -> tuple[int, dict]:
        # read only (a training job may be writing beside): a corrupt newest step is left in place and skipped
        ckpt = manager(out / "ckpt" / stage, read_only=True)
        if (r := restore(ckpt, targets)) is None:  # a record read (latest_meta); no step's arrays read and verified
            steps = ckpt.steps()
            raise FileNotFoundError(
                f"{out / 'ckpt' / stage} holds no readable checkpoint (step{'s' * (len(steps) > 1)} "
                f"{', '.join(map(str, steps))} failed to read or verify); rerun the run's train_video command (it "
                "sets unreadable steps aside and trains the stage again from its newest good one)")
        return r[:2]

    with jax.set_mesh(mesh):
        vae_step, vae = restored("vae", {"params": vae_abstract})
        vae_params = vae["params"]
        # the step read, not the newest record's: a newest step that fails to verify is skipped for an older one
        dit_step, dit = restored("t2v", {"ema": ema_abstract})
    ema = dit["ema"]
    if dit_vae is not None and dit_vae != (now := fingerprint(vae_params)) and vae_step < newest["vae"]:
        # the DiT's VAE is most likely the newest step, skipped: deleting ckpt/t2v, as said below, lost a good DiT
        raise ValueError(f"load_video_model: {out / 'ckpt' / 'vae'}'s newest step {newest['vae']} does not read or "
                         f"verify (left in place), and step {vae_step}, read instead, is not the VAE whose latents "
                         f"{out / 'ckpt' / 't2v'} was trained on (fingerprint {dit_vae}); rerun the run's train_video "
                         f"command: it sets step {newest['vae']} aside and trains the VAE again from step {vae_step} "
                         "(the same VAE on the same machine: the DiT is kept)")
    if dit_vae is not None and dit_vae != now:  # a VAE retrained after the DiT
        raise ValueError(f"load_video_model: {out / 'ckpt' / 't2v'} was trained on the latents of another VAE "
                         f"(fingerprint {dit_vae}) than {out / 'ckpt' / 'vae'} holds ({now}); rerun the run's "
                         f"train_video command after deleting {out / 'ckpt' / 't2v'} to train a DiT on this VAE")
    if isinstance(dit_total, int) and dit_step < dit_total:  # stopped mid-stage: sampled in silence before
        print(f"load_video_model: {out / 'ckpt' / 't2v'} is at step {dit_step} of the run's {dit_total} (stopped "
              f"before the DiT finished, or its newer steps do not read): sampling its EMA as of step {dit_step}; "
              "rerun its train_video command to finish it")
    weights = ema_cast(ema, t2v_abstract)
    null = null_tokens(p.data.max_caption_len)

    @functools.partial(jax.jit, static_argnums=3)
    def _sample(tok, key, scale, steps):
        z = generate(nnx.merge(t2v_gd, weights), tok, null, key, scale, steps)
        return nnx.merge(vae_gd, vae_params).decode(denormalize(z, stats))

    def sample(captions, cfg_scale: float = 4.0, seed: int = 0, steps: int | None = None) -> np.ndarray:
        if isinstance(captions, str) or not len(captions):
            raise ValueError(f"sample: captions must be a non-empty list of strings (\"\" is the null caption), got "
                             f"{captions!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
            raise ValueError(f"sample: cfg_scale={cfg_scale!r} must be a finite number (1.0: no guidance); NaN or inf "
                             "gave all-black videos")
        # jax.random.key keeps a seed's low 32 bits: seed 2**32 + 3 sampled seed 3's videos (and -1 2**32 - 1's, True
        # 1's), silently; a float failed as a bare tracer TypeError
        seed = check_seed(seed, "sample: seed", 2**32)
        tok = jnp.asarray(np.stack([encode_caption(c, p.data.max_caption_len) for c in captions]))
        with jax.set_mesh(mesh):
            return to_uint8(np.asarray(_sample(tok, jax.random.key(seed), jnp.float32(cfg_scale), steps)))

    return sample, p


def parse_scales(text: str) -> tuple[float, ...]:
    """--scales: comma-separated CFG scales >= 1, each once (a repeated one is dropped, with a note: it was generated
    again and reported once). Raises ValueError naming the fix."""
    try:
        scales = tuple(float(s) for s in text.split(","))
        if not all(map(math.isfinite, scales)):
            raise ValueError
    except ValueError:
        raise ValueError(f"write comma-separated finite numbers, e.g. 1,2,4, got {text!r}") from None
    if min(scales) < 1:  # the targets are judged at the largest; below 1 guidance pushes away from the caption
        raise ValueError(f"CFG scales are >= 1 (1: the conditional model alone; the table's null-prompt row is the "
                         f"unconditional one), got {text!r}")
    names = {}  # a condition's name, 'cfg <scale:g>' -> the scales of that name
    for s in scales:
        names.setdefault(f"{s:g}", set()).add(s)
    if clash := [sorted(v) for v in names.values() if len(v) > 1]:  # one name: one's results overwrote the other's
        a, b = clash[0][:2]
        raise ValueError(f"{a:.10g} and {b:.10g} are both reported as 'cfg {a:g}' (6 significant digits); pass "
                         f"scales that differ there, got {text!r}")
    if len(set(scales)) < len(scales):
        scales = tuple(dict.fromkeys(scales))
        print(f"--scales: {text!r} repeats a scale; evaluating {', '.join(f'{s:g}' for s in scales)} once each")
    return scales


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--out", type=path_arg, default=None, help="run directory (default runs/video/<preset>)")
    ap.add_argument("--mesh", default="data=-1",
                    help="e.g. data=2,fsdp=2,tensor=2 (on CPU: with JAX_NUM_CPU_DEVICES=8)")
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--vae-steps", type=at_least(1), default=None)
    ap.add_argument("--dit-steps", type=at_least(1), default=None)
    ap.add_argument("--attention", choices=("factorized", "full"), default=None, help="override the DiT's attention")
    ap.add_argument("--shift", type=float, default=None, help="override the flow time shift")
    ap.add_argument("--dit-lr", type=float, default=None)
    ap.add_argument("--scales", default="1,2,4", help="CFG scales to evaluate")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory first (no resume)")
    ap.add_argument("--no-media", action="store_true", help="skip GIFs and grids")
    try:
        args, refused = ap.parse_args(argv), None
    except SystemExit as e:  # argparse's: a bad flag (its usage is printed), or --help
        if not e.code:
            raise
        args, refused = None, e
    # one process only: its stages load, checkpoint and evaluate whole batches on this process's devices. Started
    # as a job of several (JAXSCALE_* variables, srun, a pod), each process ran alone: on one --out the others were
    # refused as "another job", on each host's own disk every host trained its own copy silently. Asked before
    # any JAX call (make_mesh below), as jax.distributed needs; every process refuses alike
    from parallel.distributed import initialize

    try:
        several = initialize()
    except ValueError as e:
        if refused is not None:
            raise refused from None
        ap.error(str(e))
    # a command line this process refuses still joins the job first: the others waited for it in
    # jax.distributed.initialize (300 s) before failing on a time-out that named neither it nor its flag
    if refused is not None:
        raise refused
    # the count, not whether it started: a one-host TPU VM's markers (TPU_WORKER_HOSTNAMES) start jax.distributed
    # with one process, which was refused as "this job has 1 processes"
    if several and jax.process_count() > 1:
        ap.error(f"experiments.train_video runs in one process, but this job has {jax.process_count()} processes "
                 "(jax.distributed: JAXSCALE_* variables, SLURM, Open MPI or a TPU pod); start it as one process, "
                 "its --mesh over that process's devices")
    if args.dit_lr is not None and not (math.isfinite(args.dit_lr) and args.dit_lr > 0):
        ap.error(f"argument --dit-lr: must be a finite number > 0, got {args.dit_lr}")
    if args.seed >= 2**32:  # MovingShapes' shuffle takes 32-bit seeds: it failed after --fresh and both models' init
        ap.error(f"argument --seed: must be an integer < 2**32 (the data's shuffle seed), got {args.seed}")

    p = PRESETS[args.preset]
    t2v = p.t2v
    if args.attention:
        t2v = dataclasses.replace(t2v, dit=dataclasses.replace(t2v.dit, attention=args.attention))
    if args.shift is not None:
        try:
            t2v = dataclasses.replace(t2v, diffusion=dataclasses.replace(t2v.diffusion, shift=args.shift))
        except ValueError as e:
            ap.error(f"argument --shift: {e}")
    given = lambda v, default: default if v is None else v  # noqa: E731  (None: the preset's)
    p = dataclasses.replace(p, t2v=t2v, vae_steps=given(args.vae_steps, p.vae_steps),
                            dit_steps=given(args.dit_steps, p.dit_steps), dit_lr=given(args.dit_lr, p.dit_lr))
    # every argument is checked before --fresh deletes anything: a typo must not cost a trained run
    try:
        mesh = make_mesh(parse_mesh(args.mesh))
    except (ConfigError, ValueError) as e:
        ap.error(f"argument --mesh: {str(e).removeprefix('mesh: ')}")
    if (stages := mesh.shape.get("stage", 1)) > 1:  # 'stage' is no batch axis: every stage device ran the same rows
        ap.error(f"argument --mesh: the video models have no pipeline, so stage={stages} would only split their layer "
                 f"stacks while each of the {stages} stage devices runs the same rows ({stages}x the work per device); "
                 "put those devices on data or fsdp, e.g. --mesh " + ",".join(
                     f"{a}={n * stages if a == 'data' else n}" for a, n in {"data": 1, **mesh.shape}.items()
                     if a != "stage" and (n > 1 or a == "data")))
    try:
        scales = parse_scales(args.scales)
    except ValueError as e:
        ap.error(f"argument --scales: {e}")
    batches = {"vae_batch": p.vae_batch, "dit_batch": p.dit_batch, "eval_batch": p.eval_batch}
    split = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    fix = batch_mesh_fix(p, list(mesh.devices.flat)) if any(b % split for b in batches.values()) else None
    for what, b in batches.items():
        check_batch(b, mesh, what, fix)
    check_sequence(p, mesh)
    try:  # the models' dimensions against the mesh, on shapes only (nothing compiled)
        for build in (lambda: VideoVAE(p.vae, rngs=nnx.Rngs(0)), lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(0))):
            abstract_sharded(build, mesh)
    except ValueError as e:
        ap.error(f"argument --mesh: {e} (in the {args.preset!r} preset's models)")
    out = pathlib.Path(args.out or f"runs/video/{args.preset}")
    # a file in the way (its ckpt/ too, which --fresh deletes: the first stage trained to its first save, which
    # failed), below it or an unwritable parent: before --fresh
    if problem := dir_problem(out) or (None if args.fresh else dir_problem(out / "ckpt")):
        ap.error(f"argument --out: {problem}")
    if args.fresh and out.exists() and (foreign := sorted(c.name for c in out.iterdir() if not run_file(c.name))):
        ap.error(f"argument --fresh: {out} holds files this script does not write ({', '.join(foreign[:5])}); "
                 f"--fresh deletes only a video run's own directory: pass another --out")
    # one job per --out (data.run_lock), before --fresh deletes anything and before any work: two at once mixed
    # their checkpoints and logs silently
    try:
        lock = RunLock(out, "experiments.train_video")
    except DirLocked as e:
        ap.error(f"argument --out: {e}")
    # a signal outside the stages (their Stop saves the step): one line and status 143 / 130, not a silent kill
    at_once = StopAtOnce("the start-up (nothing trained yet in this attempt)")
    try:
        return _run(args, p, mesh, scales, out, at_once)
    except CheckpointSaveFailed as e:  # a full disk: one line (where, why, the step a rerun resumes from), as train_lm
        raise SystemExit(str(e)) from None
    finally:
        at_once.restore()
        lock.release()


# what results.json's timings measure: a resumed run's stages trained over several attempts, the rest ran in its last
TIMINGS_COVER = ("vae_s, dit_s: each stage's training over all its attempts (resumed ones included; a killed attempt's "
                 "steps past its last checkpoint not counted); encode_s, eval_s, total_s: this invocation only")


def _run(args, p: Preset, mesh, scales, out: pathlib.Path, at_once: StopAtOnce) -> dict:
    """`main` past its arguments, under the run directory's lock. at_once: the StopAtOnce whose `what` names the
    phase a signal outside the stages cuts short."""
    if args.fresh:
        for c in out.iterdir():  # all but the lock this job holds
            if c.name != LOCK_NAME:
                shutil.rmtree(c) if c.is_dir() and not c.is_symlink() else c.unlink()
    check_resume(p, out, args.seed)
    # a run that never saved (killed before its first checkpoint): its logs are not ours to extend, as train_lm's;
    # appended to, steps only it logged stayed in this run's curves and loss plots
    if all(_newest_meta(out / "ckpt" / s) is None for s in ("vae", "t2v")) and (stamp := set_aside_logs(out)):
        print(f"note: {out} held the logs of a run with no checkpoint; moved aside as *.{stamp}")
    frames, size = p.data.frames, p.data.size
    print(f"mesh {dict(mesh.shape)}; clips {frames}×{size}×{size} → latents {p.vae.latent_shape(frames, size, size)}; "
          f"VAE {p.vae.param_count():,} params; text+DiT+aligner {p.t2v.param_count():,} params "
          f"(DiT {p.t2v.dit.param_count():,}, {p.t2v.dit.tokens} tokens, {p.t2v.dit.attention} attention)")
    timings, t0 = {}, time.time()
    # each stage's metrics where the progress bar updates (every 25 steps and the last), as train_lm's: JSONL
    # (kind 'vae' / 't2v'; a stage drops its records past the step it starts from, which it logs again) + tb/
    log = stage_logger(out, "vae")

    # built before entering the mesh context: logical names are resolved by create_sharded, not eagerly
    vae_gd, vae_params = create_sharded(lambda: VideoVAE(p.vae, rngs=nnx.Rngs(args.seed)), mesh)
    t2v_gd, t2v_params = create_sharded(lambda: TextToVideo(p.t2v, rngs=nnx.Rngs(args.seed)), mesh)
    with jax.set_mesh(mesh):
        # SIGTERM / SIGINT during a stage: it saves the step it is on and the run returns (exit 0), as train_lm's.
        # Outside the stages there is nothing to save: at_once says so and exits (status 143 / 130)
        stop = Stop()
        try:
            vae_gd, vae_params = train_vae(p, out, mesh, args.seed, vae_gd, vae_params, log, stop)
        finally:  # plotted however the stage ended (done, stopped, diverged): a halted run's curve is the one to see
            _end_stage(out, "vae", log, stop)
        timings["vae_s"] = stage_seconds(out, "vae", time.time() - t0)
        if stop.signal is not None:
            return {"stopped": stop.signal, "timings": timings}

        # one compiled encoder and decoder (batch eval_batch) serve every later stage
        enc = jax.jit(lambda vp, x: nnx.merge(vae_gd, vp).encode(x)[0])
        dec = jax.jit(lambda vp, z: nnx.merge(vae_gd, vp).decode(z))
        t1 = time.time()
        at_once.what = "the latent encoding (the VAE is saved; its latents are not cached until all are encoded)"
        vae_print = fingerprint(vae_params)  # the latents' VAE: the cache and the DiT's checkpoints are checked by it
        z, tokens, combo, stats = prepare_latents(p, lambda x: enc(vae_params, shard(x, mesh)), out, vae_print)
        timings["encode_s"] = time.time() - t1
        at_once.what = "the VAE's held-out reconstruction (the VAE and its latents are saved)"

        real, z_real, vae_psnr, real_row = heldout_reconstruction(
            p, lambda x: enc(vae_params, shard(x, mesh)), lambda zz: dec(vae_params, shard(zz, mesh)))
        print(f"vae: held-out PSNR {vae_psnr:.2f} dB")

        t2 = time.time()
        log = stage_logger(out, "t2v")
        stop = Stop()
        try:
            gd, ema = train_t2v(p, out, mesh, args.seed, t2v_gd, t2v_params, z, tokens, combo, log, stop,
                                vae_fingerprint=vae_print)
        finally:  # (as the VAE's)
            _end_stage(out, "t2v", log, stop)
        timings["dit_s"] = stage_seconds(out, "t2v", time.time() - t2)
        if stop.signal is not None:
            return {"stopped": stop.signal, "timings": timings}

        t3 = time.time()
        at_once.what = "the evaluation (both stages are saved; it is not)"
        at_once.then = "rerun the same command to evaluate again"
        null = null_tokens(p.data.max_caption_len)
        gen = jax.jit(lambda prm, tok, key, s: generate(nnx.merge(gd, prm), tok, null, key, s))
        all_tok = jnp.asarray(np.stack([encode_caption(caption(*c), p.data.max_caption_len)
                                        for c in p.data.combos()]))

        def retrieve(prm, zz):  # index of the caption (of all 48) the dual encoder finds closest, -1 for a tie
            model = nnx.merge(gd, prm)
            captions = model.align.embed_text(model.text(all_tok).pooled_BE)
            return nearest_caption(model.align.embed_video(zz), captions)

        ret = jax.jit(retrieve) if p.t2v.align is not None else None
        results, videos, sets = run_eval(
            lambda tok, key, s: gen(ema, shard(tok, mesh), key, jnp.float32(s)),
            lambda zz: dec(vae_params, shard(np.asarray(denormalize(zz, stats)), mesh)),
            None if ret is None else (lambda zz: ret(ema, shard(zz, mesh))),
            p.data, scales=scales, per_seen=p.eval_per_seen, per_held=p.eval_per_held, batch=p.eval_batch,
            seed=args.seed, null_L=null)
        if ret is not None:  # R@1 of the dual encoder on real held-out latents (its ceiling)
            zr = np.asarray(normalize(z_real, stats))
            real_row["r@1"] = float((np.asarray(ret(ema, shard(zr, mesh))) == real["combo"]).mean())
        timings["eval_s"] = time.time() - t3

    md = table(results, {("real clips → VAE", "held-out"): real_row})
    targets = targets_met(results, scales)
    null_row = results[("null prompt", "seen")]
    timings["total_s"] = time.time() - t0
    save_results(out / "results.json", results, {"vae_psnr_heldout_db": vae_psnr, "real_clips_vae": real_row,
                                                 "chance": chance_row(), "targets_met": targets, "timings": timings,
                                                 "timings_cover": TIMINGS_COVER,
                                                 "vae_steps": p.vae_steps, "dit_steps": p.dit_steps, "seed": args.seed})
    write_text_atomically(out / "results.md", md + "\n")
    print(md)
    print(f"targets at CFG {max(scales):g}: {targets}; null prompt colour {100 * null_row['colour']:.1f}% "
          f"(chance 25%); timings {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}")
    if not args.no_media:
        at_once.what = f"the media writing (results.json is written; {out / 'samples'} may lack some GIFs)"
        write_overview(out / "overview.png", videos, sets, p.data, max(scales))
        paths = write_prompt_media(out / "samples", videos, sets, p.data, scales)
        print(f"wrote {out / 'overview.png'} and {len(paths)} GIFs + grids under {out / 'samples'}")
    elif stale := remove_media(out):  # an earlier model's samples beside this model's results
        print(f"--no-media: removed {' and '.join(stale)} of an earlier evaluation (results.json is this model's)")
    return {"results": results, "psnr": vae_psnr, "real": real_row, "timings": timings}


if __name__ == "__main__":
    run_main(main)
