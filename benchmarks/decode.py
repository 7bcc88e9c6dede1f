"""KV-cache decoding: our `models.generate` against Hugging Face transformers' `generate` (torch eager, its dynamic
cache), on the same float32 weights (`models.hf.save_pretrained` → `AutoModelForCausalLM`), side by side.

    python -m benchmarks.decode [--batches 1 8] [--gens 32x64 10x1000] [--positions 10 1000] [--rounds 3]
                                [--json OUT]

Greedy generation of N new tokens after a random prompt of P tokens (--gens PxN), every batch size: tokens/s of
both (batch · N / wall time), compiled / warmed up first, then interleaved rounds (`benchmarks.rounds`); `hf_over_ours`
is the median over rounds of HF's time / ours (> 1: ours faster); `tokens_equal` the fraction of the new tokens (not
the prompt's) that are equal.
Then ms per decode step at cache position p (--positions): 8 greedy steps from position p in one call (ours one
jitted loop, as in `generate`, through a cache of max(--positions) + 10 slots, as `generate` allocates P + N of
them; HF's through its dynamic cache holding p tokens, cropped back after each round), median of the rounds / 8.
Default model: d_model 256, 4 layers, 4 heads (2 kv heads), MLP 1024, vocab 8192; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile

import numpy as np

from data.cli import cli_parser, run_main
from parallel.host import tune_cpu_allocator

STEPS = 8  # decode steps per timed call of the step timings


def gen_shape(text: str) -> tuple[int, int]:
    """argparse type of --gens: 'PxN', P prompt tokens >= 1 and N new tokens >= 1."""
    try:
        p, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PxN (prompt tokens x new tokens), e.g. 32x64") from None
    if p < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: prompt and new tokens must both be >= 1")
    return p, n


gen_shape.__name__ = "PxN shape"


def build(args):
    """(our model, HF's model of the same weights)."""
    import torch
    import transformers
    from flax import nnx

    from models import Transformer, TransformerConfig
    from models.hf import save_pretrained

    longest = max([p + n for p, n in args.gens] + [max(args.positions) + 10])
    cfg = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                            n_kv_heads=args.kv_heads, mlp_dim=args.mlp, max_seq_len=longest)
    ours = Transformer(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, hf


def generations(ours, hf, batches, gens, rounds):
    import jax.numpy as jnp
    import torch

    from benchmarks.rounds import interleaved
    from models import generate

    rows = []
    for B in batches:
        for P, N in gens:
            prompt = np.random.default_rng(B * 1000 + P).integers(0, ours.cfg.vocab_size, (B, P)).astype(np.int32)
            prompt_j, prompt_t = jnp.asarray(prompt), torch.from_numpy(prompt.astype(np.int64))
            out = {}

            def run_ours():
                out["ours"] = np.asarray(generate(ours, prompt_j, N))

            def run_hf():
                with torch.inference_mode():
                    out["hf"] = hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=N,
                                            min_new_tokens=N, do_sample=False, pad_token_id=0).numpy()

            times, _ = interleaved({"ours": lambda: (run_ours, None), "hf": lambda: (run_hf, None)}, rounds)
            ms = {k: statistics.median(t) for k, t in times.items()}
            row = {"batch": B, "prompt": P, "new": N, "ours_tok_s": B * N / ms["ours"], "hf_tok_s": B * N / ms["hf"],
                   "hf_over_ours": statistics.median(h / o for o, h in zip(times["ours"], times["hf"])),
                   # both return the prompt, then the new tokens: only the new ones are compared (with the prompt
                   # counted, a 2048x32 row that agreed on no new token read 0.985)
                   "tokens_equal": float(np.mean(out["ours"][:, P:] == out["hf"][:, P:]))}
            print(f"B {B:2d}  P {P:5d}  N {N:5d}  ours {row['ours_tok_s']:8.0f} tok/s  HF {row['hf_tok_s']:8.0f} tok/s"
                  f"  HF time / ours {row['hf_over_ours']:5.2f}  tokens equal {row['tokens_equal']:.3f}", flush=True)
            rows.append(row)
    return rows


def steps(ours, hf, batches, positions, rounds):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from benchmarks.rounds import interleaved
    from models import KVCache

    graphdef, state = nnx.split(ours)
    prefill = jax.jit(lambda st, tok, cache: nnx.merge(graphdef, st)(tok, cache=cache)[1])

    # STEPS greedy steps in one program, as in generate's loop (a call per step timed the call's overhead too: 6.4 ms
    # at B 8 for a step the loop runs in 3.5); the cache donated, else each call copied all of it
    @functools.partial(jax.jit, donate_argnums=2)
    def loop(st, tok_B1, cache):
        model = nnx.merge(graphdef, st)

        def one(_, carry):
            tok_B1, cache = carry
            logits_B1V, cache = model(tok_B1, cache=cache)
            return jnp.argmax(logits_B1V, -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, STEPS, one, (tok_B1, cache))

    slots = max(positions) + STEPS + 2
    rows = []
    for B in batches:
        for p in positions:
            ids = np.random.default_rng(p).integers(0, ours.cfg.vocab_size, (B, p + 1)).astype(np.int32)
            held = {"cache": prefill(state, jnp.asarray(ids[:, :p]), KVCache.zeros(ours.cfg, B, slots))}
            tok_j, tok_t = jnp.asarray(ids[:, p:]), torch.from_numpy(ids[:, p:].astype(np.int64))
            with torch.inference_mode():
                past = hf(torch.from_numpy(ids[:, :p].astype(np.int64)), use_cache=True).cache

            def steps_ours():
                tok, cache = loop(state, tok_j, held["cache"])
                held["cache"] = cache._replace(length=jnp.int32(p))  # as HF's crop: the next round starts at p again
                tok.block_until_ready()

            def steps_hf():
                tok = tok_t
                with torch.inference_mode():
                    for _ in range(STEPS):
                        tok = hf(tok, cache=past, use_cache=True).logits[:, -1:].argmax(-1)
                past.crop(-STEPS)  # back to p tokens: every round steps from the same position

            times, _ = interleaved({"ours": lambda: (steps_ours, None), "hf": lambda: (steps_hf, None)}, rounds)
            assert past.get_seq_length() == p, past.get_seq_length()  # each HF step timed at position p
            row = {"batch": B, "position": p, "slots": slots,
                   "ours_ms": 1e3 * statistics.median(times["ours"]) / STEPS,
                   "hf_ms": 1e3 * statistics.median(times["hf"]) / STEPS}
            print(f"B {B:2d}  step at position {p:5d}  ours {row['ours_ms']:7.3f} ms ({slots} slots)  HF "
                  f"{row['hf_ms']:7.3f} ms", flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    from benchmarks.rounds import out_path, write_json
    from experiments.config import at_least

    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--batches", type=at_least(1), nargs="+", default=[1, 8])
    ap.add_argument("--gens", type=gen_shape, nargs="+", default=[(32, 64), (10, 1000)],
                    help="generations, PxN: P prompt tokens, N new ones")
    ap.add_argument("--positions", type=at_least(1), nargs="+", default=[10, 1000],
                    help="cache positions of the per-step timings")
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--d-model", type=at_least(1), default=256)
    ap.add_argument("--layers", type=at_least(1), default=4)
    ap.add_argument("--heads", type=at_least(1), default=4)
    ap.add_argument("--kv-heads", type=at_least(1), default=2)
    ap.add_argument("--mlp", type=at_least(1), default=1024)
    ap.add_argument("--vocab", type=at_least(2), default=8192)
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    if args.heads % args.kv_heads or args.d_model % args.heads:  # else a config error after the imports
        ap.error(f"--heads {args.heads} must divide --d-model {args.d_model} and be a multiple of --kv-heads "
                 f"{args.kv_heads}")
    import torch

    tune_cpu_allocator()
    ours, hf = build(args)
    print(f"torch threads {torch.get_num_threads()}; model d_model {args.d_model}, {args.layers} "
          f"layer{'s' * (args.layers != 1)}, float32")
    res = {"torch_threads": torch.get_num_threads(), "rounds": args.rounds,
           "generate": generations(ours, hf, args.batches, args.gens, args.rounds),
           "step": steps(ours, hf, args.batches, args.positions, args.rounds)}
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    run_main(main)
