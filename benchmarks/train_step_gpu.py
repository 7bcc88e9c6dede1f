"""The Transformer train step at GPU size on one accelerator: tokens/s and MFU against the chip's bf16 peak.

    python -m benchmarks.train_step_gpu [--chip h200] [--batch 8] [--steps 10] [--json OUT]
    python -m benchmarks.train_step_gpu --tiny      # the 1B config shrunk (bf16, heads of 128): a CPU smoke run

~1B parameters, Llama-shaped (d_model 2048, 16 layers, 16 heads × 128, SwiGLU 5632, vocab 32000 untied),
seq 2048, float32 parameters with bfloat16 compute, cuDNN attention on a GPU ('xla' elsewhere), AdamW
(`experiments.lm_step.make_train_step`, donated state). MFU = model FLOPs per token
(`TransformerConfig.flops_per_token(seq, causal=True)`) × tokens/s over `scaling.hardware.peak_flops(chip, 'bf16')`.
Results go beside the CPU numbers in docs/benchmarks.md ("Transformer train step"). Not yet run on a GPU (no
GPU was lent to the sessions so far): the cuDNN path is unverified. The H200 image has its own JAX (0.11.2, CUDA 13,
seen 2026-11) and no grain / tensorboardX / torch requirement here: this module imports none of them (nor grain's
array_record, its --json included), and `--tiny` runs under jax 0.11.2 + flax 0.12.12. One device call that falls
back to the 'xla' kernel if cuDNN's fails:

    python3 -m benchmarks.train_step_gpu --json $OUT/h200.json || \
        python3 -m benchmarks.train_step_gpu --attn xla --json $OUT/h200_xla.json
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks.rounds import out_path, write_json
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import make_optimizer, make_train_step
from models import Transformer, TransformerConfig
from parallel import create_sharded, init_optimizer, make_mesh, shard_batch
from scaling.hardware import device_peak, peak_flops

GPU_1B = TransformerConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, mlp_dim=5632, max_seq_len=2048,
                           dtype="bfloat16", attn_impl="cudnn", rope_theta=500_000.0)
# the 1B config with small sizes: the same dtypes (float32 params, bf16 compute), head_dim 128 and code path
TINY = dataclasses.replace(GPU_1B, vocab_size=256, d_model=256, n_layers=2, n_heads=2, mlp_dim=512, max_seq_len=128)


def run(cfg: TransformerConfig, batch: int, seq: int, steps: int, warmup: int = 2) -> dict:
    """`warmup` untimed steps (compilation), then the mean of `steps` timed steps on one device."""
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, params = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    opt = make_optimizer(lr=3e-4, weight_decay=0.1, clip_norm=1.0)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
    with jax.set_mesh(mesh):
        opt_state = init_optimizer(opt, params)
        data = shard_batch({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
        step = make_train_step(graphdef, opt)
        t_compile = time.perf_counter()
        for _ in range(warmup):
            params, opt_state, m = step(params, opt_state, data)
        jax.block_until_ready(m)
        t_compile = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        for _ in tqdm(range(steps), desc="timed steps"):
            params, opt_state, m = step(params, opt_state, data)
        jax.block_until_ready((params, m))
        dt = (time.perf_counter() - t0) / steps
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_ms": 1e3 * dt, "tokens_per_s": batch * seq / dt, "warmup_s": t_compile, "loss": float(m["loss"]),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--chip", default=None, help="scaling.hardware kind whose bf16 peak MFU is taken against "
                    "(default: the device's own, from jax's device_kind; h200 for --tiny on a CPU)")
    ap.add_argument("--batch", type=at_least(1), default=None, help="default 8 (--tiny: 2)")
    ap.add_argument("--seq", type=at_least(1), default=None, help="default 2048 (--tiny: 128)")
    ap.add_argument("--steps", type=at_least(1), default=10)
    ap.add_argument("--attn", default="cudnn", choices=("cudnn", "xla"),
                    help="attention kernel of the 1B config: cuDNN's fused one, or the 'xla' fallback")
    ap.add_argument("--tiny", action="store_true", help="the 1B config shrunk (bf16 compute, heads of 128); "
                    "'xla' attention off a GPU: a CPU smoke run")
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    if not args.tiny and not gpu:
        raise SystemExit(f"benchmarks.train_step_gpu: backend is {jax.default_backend()!r}; the 1B config needs a "
                         "GPU (cuDNN attention, bf16). Use --tiny for a CPU smoke run.")
    seq, batch = args.seq or (128 if args.tiny else 2048), args.batch or (2 if args.tiny else 8)
    cfg = dataclasses.replace(TINY if args.tiny else GPU_1B, max_seq_len=seq, attn_impl=args.attn if gpu else "xla")
    # the peak before the run: a wrong --chip must not cost a finished run its results
    kind = jax.devices()[0].device_kind
    known, label = device_peak(kind, "bfloat16")  # label: "<chip> bf16" when known
    # a CPU smoke run: the arithmetic against the chip this script was prepared for
    chip = args.chip or (label.split()[0] if known else None if gpu else "h200")
    if chip is None:
        raise SystemExit(f"benchmarks.train_step_gpu: no bf16 peak known for device {kind!r}; pass --chip KIND "
                         "(scaling.hardware.CHIPS)")
    try:
        peak = peak_flops(chip, "bf16")
    except ValueError as e:
        raise SystemExit(f"benchmarks.train_step_gpu: --chip: {e}") from None
    res = run(cfg, batch, seq, args.steps)
    fpt = cfg.flops_per_token(seq, causal=True)
    # the chip's name (e.g. 'NVIDIA H200' vs an NVL part), to check --chip's peak against
    out = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
           "attn_impl": cfg.attn_impl, "params": cfg.param_count(), "batch": batch,
           "seq": seq, "flops_per_token": fpt, "chip": chip, "peak_bf16_flops": peak,
           "mfu": res["tokens_per_s"] * fpt / peak, **res}
    print(f"{out['device']}: {out['params'] / 1e9:.2f} B params, batch {batch} × seq {seq}: "
          f"{res['tokens_per_s']:,.0f} tokens/s ({res['step_ms']:.0f} ms/step), MFU {100 * out['mfu']:.1f}% of "
          f"{chip} bf16 peak {peak / 1e12:.0f} TFLOP/s; warm-up {res['warmup_s']:.0f} s; loss {res['loss']:.3f}")
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    run_main(main)
