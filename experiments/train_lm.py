"""Train a small decoder Transformer on the embedded corpus (stdlib sources, byte tokens).

    python -m experiments.train_lm [--steps 300] [--mesh data=-1]

Prints train loss and held-out perplexity going down, then a greedy sample. The experiments issue
grows this into the full demo (grain pipeline, orbax checkpoints, FSDP, SWA and MoE layers).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from data.corpus import BYTE_VOCAB, ByteWindows, decode_bytes, encode_bytes, stdlib_text, train_eval_split
from experiments.lm_step import make_eval_step, make_optimizer, make_train_step
from models import Transformer, TransformerConfig, generate
from parallel import create_sharded, init_optimizer, make_mesh, shard_batch
from parallel.distributed import initialize

DEMO = TransformerConfig(vocab_size=BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                         max_seq_len=128)


def parse_mesh(s: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=2,tensor=2")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    initialize()  # multi-process jobs (TPU pods, SLURM, JAXSCALE_* env); a no-op for one process

    cfg = DEMO
    mesh = make_mesh(parse_mesh(args.mesh))
    if args.batch % math.prod(mesh.axis_sizes) and args.batch % mesh.shape.get("data", 1):
        raise SystemExit(f"--batch {args.batch} must be divisible by the batch mesh axes {dict(mesh.shape)}")
    tokens = encode_bytes(stdlib_text(2_000_000))
    train_tok, eval_tok = train_eval_split(tokens)
    train, held_out = ByteWindows(train_tok, args.seq, args.batch, args.seed), ByteWindows(eval_tok, args.seq, 32, 1)
    print(f"corpus: {len(tokens):,} byte tokens (stdlib sources); model: {cfg.param_count():,} params; "
          f"mesh: {dict(mesh.shape)}")

    graphdef, params = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(args.seed)), mesh)
    opt = make_optimizer(args.lr, total_steps=args.steps, warmup_steps=args.steps // 10)
    with jax.set_mesh(mesh):
        opt_state = init_optimizer(opt, params)
        step_fn, eval_fn = make_train_step(graphdef, opt), make_eval_step(graphdef)

        def evaluate():
            losses = [float(eval_fn(params, shard_batch(held_out.batch(i), mesh))) for i in range(4)]
            return float(np.mean(losses))

        first_eval = evaluate()
        print(f"step 0: eval loss {first_eval:.3f} (ppl {math.exp(first_eval):.1f})")
        t0, bar = time.time(), tqdm(range(1, args.steps + 1), desc="train", unit="step")
        for step in bar:
            params, opt_state, m = step_fn(params, opt_state, shard_batch(train.batch(step), mesh))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(m['loss']):.3f}", gnorm=f"{float(m['grad_norm']):.2f}")
            if step % args.eval_every == 0 or step == args.steps:
                ev = evaluate()
                tqdm.write(f"step {step}: train loss {float(m['loss']):.3f}  eval loss {ev:.3f} "
                           f"(ppl {math.exp(ev):.1f})  {args.batch * args.seq * step / (time.time() - t0):,.0f} tok/s")
    model = nnx.merge(graphdef, jax.device_get(params))
    prompt = jnp.asarray(encode_bytes("def __init__(self")[None])
    sample = generate(model, prompt, 80)
    print("sample:", repr(decode_bytes(np.asarray(sample[0]))))
    if not ev < first_eval:
        raise SystemExit(f"eval loss did not fall: {first_eval:.3f} -> {ev:.3f}")
    return ev


if __name__ == "__main__":
    main()
