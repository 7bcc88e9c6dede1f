"""Video diffusion benchmarks at the `default` preset of experiments.train_video.

    python -m benchmarks.video_bench [--run runs/video/default] [--steps 20]

1. DiT training step (text encoder + DiT + aligner, AdamW) for factorized vs full 3D attention, the two
   variants' steps interleaved.
2. Sampling time per clip: Euler with classifier-free guidance (two DiT passes per step), batch 64,
   plus VAE decoding.
3. VAE reconstruction PSNR on held-out clips, from the run's checkpoint (--run, refused without one; without
   --run, runs/video/default's, skipped without one).

Wall-clock and process CPU-seconds are both reported: on a shared machine the CPU-seconds are the
load-independent figure (XLA's threads on 2 cores: wall ≈ CPU / 2 when the machine is quiet).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.rounds import out_path, write_json
from data.cli import cli_parser, path_arg, run_main
from data.moving_shapes import dataset, null_tokens
from experiments.checkpoint import CheckpointMismatch
from experiments.config import at_least
from experiments.train_video import PRESETS
from experiments.video_steps import make_t2v_step, manager, restore
from models.video import TextToVideo, VideoVAE, generate
from models.video.vae import denormalize, psnr
from parallel.host import tune_cpu_allocator


def timed(fn, n: int):
    """(median wall s, median CPU s) of n calls after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def train_step_case(p, attention: str):
    """(run, info): `run()` does one DiT train step (donating and replacing the state) at the preset size."""
    cfg = dataclasses.replace(p.t2v, dit=dataclasses.replace(p.t2v.dit, attention=attention))
    graphdef, params = nnx.split(TextToVideo(cfg, rngs=nnx.Rngs(0)))
    opt = optax.adamw(1e-4)
    state = {"params": params, "opt": opt.init(params), "ema": jax.tree.map(jnp.copy, params)}
    step = make_t2v_step(graphdef, opt, null_tokens(p.data.max_caption_len))
    B = p.dit_batch
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.normal(size=(B, *cfg.dit.latent_shape, cfg.dit.latent_channels)), jnp.float32),
             "tokens": jnp.asarray(rng.integers(2, 16, (B, p.data.max_caption_len)), jnp.int32),
             "caption_id": jnp.asarray(rng.integers(0, 48, B), jnp.int32)}

    def run():
        state["params"], state["opt"], state["ema"], m = step(state["params"], state["opt"], state["ema"], batch,
                                                               jax.random.key(1), 1)
        return m["loss"]

    gflop = cfg.dit.flops_per_clip(p.data.max_caption_len) * B / 1e9
    return run, {"attention": attention, "batch": B, "tokens": cfg.dit.tokens, "params": cfg.param_count(),
                 "dit_gflop_per_step": gflop}


def bench_train_steps(p, steps: int, attentions=("factorized", "full")):
    """Train-step time of each attention variant, the variants' steps interleaved so that load changes on a
    shared machine hit them alike. Median wall and CPU seconds per step."""
    cases = {a: train_step_case(p, a) for a in attentions}
    for run, _ in cases.values():
        jax.block_until_ready(run())  # compile
    times = {a: ([], []) for a in attentions}
    for _ in range(steps):
        for a, (run, _) in cases.items():
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(run())
            times[a][0].append(time.perf_counter() - w)
            times[a][1].append(time.process_time() - c)
    return [info | {"wall_s": float(np.median(times[a][0])), "cpu_s": float(np.median(times[a][1]))}
            for a, (_, info) in cases.items()]


def bench_sampling(p, n_batches: int):
    cfg = p.t2v
    graphdef, params = nnx.split(TextToVideo(cfg, rngs=nnx.Rngs(0)))
    vgd, vparams = nnx.split(VideoVAE(p.vae, rngs=nnx.Rngs(0)))
    null = null_tokens(p.data.max_caption_len)
    B = p.eval_batch
    tok = jnp.tile(jnp.asarray(null)[None], (B, 1))
    stats = (np.zeros(cfg.dit.latent_channels, np.float32), np.ones(cfg.dit.latent_channels, np.float32))
    gen = jax.jit(lambda prm, t, k, s: generate(nnx.merge(graphdef, prm), t, null, k, s))
    dec = jax.jit(lambda vp, z: nnx.merge(vgd, vp).decode(denormalize(z, stats)))
    z = gen(params, tok, jax.random.key(0), jnp.float32(2.0))
    g_wall, g_cpu = timed(lambda: gen(params, tok, jax.random.key(0), jnp.float32(2.0)), n_batches)
    d_wall, d_cpu = timed(lambda: dec(vparams, z), n_batches)
    return {"batch": B, "steps": cfg.diffusion.sample_steps, "sample_wall_ms_per_clip": 1e3 * g_wall / B,
            "sample_cpu_ms_per_clip": 1e3 * g_cpu / B, "decode_wall_ms_per_clip": 1e3 * d_wall / B,
            "decode_cpu_ms_per_clip": 1e3 * d_cpu / B}


def bench_psnr(p, run: pathlib.Path, clips: int = 256):
    """VAE reconstruction PSNR of `run`'s VAE checkpoint on `clips` held-out clips (None: no checkpoint there).
    Raises CheckpointMismatch when the checkpoint is not preset `p`'s VAE (e.g. a `--preset tiny` run)."""
    if not (run / "ckpt" / "vae").is_dir():  # read only: a writing manager created a mistyped --run's ckpt/vae
        return None
    graphdef, params = nnx.split(VideoVAE(p.vae, rngs=nnx.Rngs(0)))
    mgr = manager(run / "ckpt" / "vae", read_only=True)  # and never sets a step of the run aside
    if mgr.latest_step() is None:
        return None
    step, trees, _ = restore(mgr, {"params": params})  # the optimizer state stays on disk
    recon = jax.jit(lambda vp, x: (lambda m: m.decode(m.encode(x)[0]))(nnx.merge(graphdef, vp)))
    ds = dataset(p.data, "heldout", 64, seed=321)
    se = [float(jnp.mean((recon(trees["params"], ds[i]["video"]) - ds[i]["video"]) ** 2)) for i in range(clips // 64)]
    return {"vae_step": step, "clips": clips, "psnr_db": float(psnr(np.mean(se)))}


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--run", type=path_arg, default=None, help="a train_video run directory, for the VAE PSNR (default "
                    "runs/video/default, skipped if it has no checkpoint)")
    ap.add_argument("--steps", type=at_least(1), default=20, help="timed train steps per variant")
    ap.add_argument("--json", type=out_path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    p = PRESETS["default"]
    run = pathlib.Path("runs/video/default" if args.run is None else args.run)
    try:  # first: a run of another preset failed only after the timed benchmarks (minutes)
        vae = bench_psnr(p, run)
    except CheckpointMismatch as e:
        shapes = str(e).split("; use another checkpoint")[0]  # (its advice is the LM trainer's train.out)
        ap.error(f"argument --run: {run} is not a run of experiments.train_video's default preset, which this "
                 f"benchmark measures (a --preset tiny run?): {shapes}")
    # a run named that holds no VAE checkpoint (a typo; a run stopped before its first save, whose ckpt/vae the
    # manager had made) was found out after the timed benchmarks, and exited 0
    if vae is None and args.run is not None:
        ap.error(f"argument --run: {args.run} holds no train_video VAE checkpoint (none saved in {run / 'ckpt' / 'vae'}"
                 "); name the --out of python -m experiments.train_video once its VAE stage has saved, or leave --run "
                 "out")
    out = {"train_step": bench_train_steps(p, args.steps), "sampling": bench_sampling(p, 3), "vae": vae}
    print("| attention | batch | tokens | params | DiT GFLOP/step | wall s/step | CPU s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in out["train_step"]:
        print(f"| {r['attention']} | {r['batch']} | {r['tokens']} | {r['params']:,} | {r['dit_gflop_per_step']:.1f} | "
              f"{r['wall_s']:.3f} | {r['cpu_s']:.3f} |")
    s = out["sampling"]
    print(f"\nsampling ({s['steps']} Euler steps, CFG, batch {s['batch']}): {s['sample_wall_ms_per_clip']:.1f} ms/clip "
          f"wall, {s['sample_cpu_ms_per_clip']:.1f} CPU-ms/clip; VAE decode {s['decode_wall_ms_per_clip']:.1f} ms/clip "
          f"wall, {s['decode_cpu_ms_per_clip']:.1f} CPU-ms/clip")
    if out["vae"] is None:
        print(f"\nVAE PSNR: no checkpoint under {run}/ckpt/vae; run `python -m experiments.train_video` first")
    else:
        v = out["vae"]
        print(f"\nVAE reconstruction PSNR on {v['clips']} held-out clips (step {v['vae_step']}): {v['psnr_db']:.2f} dB")
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
