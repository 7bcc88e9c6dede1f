"""Transformer train step on CPU: our JAX step vs Hugging Face Llama in PyTorch, and the XLA matmul peak.

    python -m benchmarks.train_step [--rounds 7] [--steps 3] [--json results.json]

One process measures everything in interleaved rounds (each round times every contender for
`--steps` calls), so a noisy shared machine slows all of them alike; ratios are medians of the
per-round ratios. Reference shape: d_model 256, 4 layers, 4 heads of 64, SwiGLU 1024, vocab 8192
(untied), batch 8 × seq 256, AdamW (clip 1.0, wd 0.1), float32; ours with its layers fully unrolled
(`scan_unroll=True`) and the block-causal attention kernel (default `attn_block=64`). See docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from benchmarks.rounds import out_path, write_json
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import lm_loss, make_optimizer, make_train_step
from models import Transformer, TransformerConfig
from parallel.host import tune_cpu_allocator

CFG = TransformerConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, mlp_dim=1024, max_seq_len=256,
                        scan_unroll=True)  # 4 layers: unrolling costs little compile time and saves ~5%
ABLATIONS = {"ours_jax_scanned": dict(scan_unroll=1), "ours_jax_dense_attn": dict(attn_block=None),
             "ours_jax_layer_loop": dict(scan_layers=False), "ours_jax_plain_matmul": dict(matmul_impl="plain"),
             "ours_jax_bf16_compute": dict(dtype="bfloat16"),  # outside the float32 contract: AMX / BF16 CPUs
             "ours_jax_bf16_scanned": dict(dtype="bfloat16", scan_unroll=1)}
MATMUL_N = 2048


def jax_matmul(n=MATMUL_N):
    """One jitted n×n @ n×n float32 matmul per call (2·n³ FLOPs)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (0, 1))
    f = jax.jit(jnp.matmul)
    return lambda: f(a, b).block_until_ready()


def setup(cfg, batch, seq):
    """Model, optimizer and one fixed random batch (no input pipeline in the timing)."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(lr=3e-3, weight_decay=0.1, clip_norm=1.0)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
    return graphdef, params, opt, {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}


def jax_step(cfg, batch, seq):
    """Our train step (experiments.lm_step): returns a call that runs one step to completion."""
    graphdef, params, opt, data = setup(cfg, batch, seq)
    state = [params, jax.jit(opt.init)(params)]
    step = make_train_step(graphdef, opt)

    def call():
        state[0], state[1], metrics = step(state[0], state[1], data)
        jax.block_until_ready((state, metrics))

    return call


def profile_phases(cfg, batch, seq, rounds, steps=1, warmup=1):
    """Where our step's time goes: forward, forward+backward, optimizer update and the whole step,
    timed separately (interleaved, wall and CPU-s), next to the ideal time of their FLOPs at the
    measured matmul rate. Each phase: `warmup` untimed calls (compilation), then `steps` calls per round."""
    graphdef, params, opt, data = setup(cfg, batch, seq)
    opt_state = jax.jit(opt.init)(params)
    # every array an argument: a closed-over one is a constant XLA folds (the gradient norm of constant
    # gradients was computed at compile time)
    fwd = jax.jit(lambda p, d: lm_loss(graphdef, p, d))
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p, d: lm_loss(graphdef, p, d)))
    grads = fwd_bwd(params, data)[1]
    update = jax.jit(lambda p, o, g: optax.apply_updates(p, opt.update(g, o, p)[0]))
    step = jax_step(cfg, batch, seq)
    step_flops = batch * seq * cfg.flops_per_token(seq)
    phases = {"matmul": (jax_matmul(), 2 * MATMUL_N**3),
              "forward": (lambda: jax.block_until_ready(fwd(params, data)), step_flops / 3),
              "forward+backward": (lambda: jax.block_until_ready(fwd_bwd(params, data)), step_flops),
              "optimizer update": (lambda: jax.block_until_ready(update(params, opt_state, grads)), 0),
              "whole step": (step, step_flops)}
    wall, cpu = {k: [] for k in phases}, {k: [] for k in phases}
    for call, _ in phases.values():  # as the contenders' warm-up: --warmup and --steps were ignored here (1 each)
        for _ in range(warmup):
            call()
    for _ in tqdm(range(rounds), desc="profiling"):
        for name, (call, _) in phases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                call()
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    med = statistics.median
    peak = {k: 2 * MATMUL_N**3 / min(ts["matmul"]) for k, ts in (("wall", wall), ("cpu", cpu))}
    print(f"matmul peak (best round): {peak['wall'] / 1e9:.1f} GFLOP/s, {peak['cpu'] / 1e9:.1f} GFLOP per CPU-s; "
          "ideal = the phase's FLOPs (causal count) at that rate")
    print(f"{'phase':18s} {'ms':>8s} {'ideal ms':>8s} {'CPU ms':>8s} {'ideal':>8s}")
    for name, (_, flops) in list(phases.items())[1:]:
        print(f"{name:18s} {1e3 * med(wall[name]):8.1f} {1e3 * flops / peak['wall']:8.1f} "
              f"{1e3 * med(cpu[name]):8.1f} {1e3 * flops / peak['cpu']:8.1f}")


def hf_step(cfg, batch, seq, attn, compile_=False, bf16=False):
    """HF LlamaForCausalLM of the same shape, eager or torch.compile'd, torch's AdamW with the same betas, eps,
    weight decay and gradient clipping, at a constant LR (ours warms up and decays, and spares the norm scales from
    decay: the same work per step, as the LR is read at run time). bf16: the forward under `torch.autocast` to
    bfloat16 (float32 params, as our bf16-compute step)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, max_position_embeddings=seq,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attn_implementation=attn)
    model = LlamaForCausalLM(hf_cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == cfg.param_count(), (n_params, cfg.param_count())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    fwd = torch.compile(model) if compile_ else model
    opt_step = torch.compile(opt.step) if compile_ else opt.step
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_step()
        opt.zero_grad(set_to_none=True)

    return call


def schedulable_cores() -> int:
    """CPUs this process may run on (taskset, cpusets), which XLA sizes its thread pool by; os.cpu_count() counts the
    machine's, and that many torch threads on fewer CPUs slow torch (oversubscribed OpenMP)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=7, help="interleaved measurement rounds")
    ap.add_argument("--steps", type=at_least(1), default=3, help="timed calls per contender per round")
    # at least 1: the first call compiles (jax.jit, torch.compile); with 0, round 1 timed the compilation
    ap.add_argument("--warmup", type=at_least(1), default=2, help="untimed calls per contender (compilation)")
    ap.add_argument("--batch", type=at_least(1), default=8)
    ap.add_argument("--seq", type=at_least(1), default=256)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-hf-eager-attn", action="store_true", help="skip HF with attn_implementation='eager'")
    ap.add_argument("--ablate", action="store_true", help="also time our step with the layers scanned "
                    "(scan_unroll=1), with the dense masked attention kernel, with a Python layer loop, and with "
                    "plain x @ w weight gradients (matmul_impl='plain'), and with bf16 compute (f32 params), "
                    "unrolled and scanned; and HF under torch.compile with bf16 autocast")
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    ap.add_argument("--profile", action="store_true", help="only time our step's phases (forward, backward, optimizer; "
                    "--rounds, --steps, --warmup, --batch and --seq apply)")
    args = ap.parse_args(argv)
    if args.profile and args.json:  # the phases are printed only: the file was silently never written
        ap.error("argument --json: --profile only prints its phase table; drop --json, or --profile for a JSON")
    if args.profile and args.ablate:  # the ablation rows were silently not run
        ap.error("argument --ablate: --profile times only our reference step's phases; drop --ablate, or --profile "
                 "for the ablation table")
    if args.profile:
        return profile_phases(CFG, args.batch, args.seq, args.rounds, args.steps, args.warmup)

    cores = schedulable_cores()
    tokens = args.batch * args.seq
    flops_per_token = CFG.flops_per_token(args.seq, causal=True)
    contenders = {"xla_matmul_2048": jax_matmul(), "ours_jax": jax_step(CFG, args.batch, args.seq)}
    if args.ablate:
        for name, change in ABLATIONS.items():
            contenders[name] = jax_step(dataclasses.replace(CFG, **change), args.batch, args.seq)
    failed = {}
    if not args.no_torch:
        import torch

        torch.set_num_threads(cores)
        contenders["hf_eager_sdpa"] = hf_step(CFG, args.batch, args.seq, "sdpa")
        if not args.no_hf_eager_attn:
            contenders["hf_eager_attn_eager"] = hf_step(CFG, args.batch, args.seq, "eager")
        if not args.no_compile:
            contenders["hf_torch_compile_sdpa"] = hf_step(CFG, args.batch, args.seq, "sdpa", compile_=True)
            if args.ablate:  # beside ours_jax_bf16_compute
                contenders["hf_torch_compile_bf16"] = hf_step(CFG, args.batch, args.seq, "sdpa", compile_=True,
                                                              bf16=True)

    for name, call in tqdm(list(contenders.items()), desc="warm-up / compile"):
        try:
            for _ in range(1 if name.startswith("xla") else args.warmup):
                call()
        except Exception as e:  # torch.compile may be unusable on a machine: report why, measure the rest
            if name in ("xla_matmul_2048", "ours_jax"):  # every figure is relative to these two: nothing to report
                raise
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    for name in failed:
        contenders.pop(name)

    load_before = os.getloadavg()
    # seconds per call, one entry per round, on two clocks: wall, and this process's CPU time (all
    # threads; less sensitive to other jobs on a shared machine, but it counts spinning threads too)
    wall, cpu = {name: [] for name in contenders}, {name: [] for name in contenders}
    with tqdm(total=args.rounds * len(contenders), desc="measuring") as bar:
        for _ in range(args.rounds):
            for name, call in contenders.items():
                bar.set_postfix_str(name)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    call()
                wall[name].append((time.perf_counter() - t0) / args.steps)
                cpu[name].append((time.process_time() - c0) / args.steps)
                bar.update()

    med = statistics.median
    step_flops = tokens * flops_per_token
    peak = {clock: [2 * MATMUL_N**3 / t / 1e9 for t in ts.pop("xla_matmul_2048")] for clock, ts in
            (("wall", wall), ("cpu", cpu))}  # GFLOP/s, and GFLOP per CPU-second, per round
    res = {}
    for name in wall:
        res[name] = r = {"tokens_per_s": med(tokens / t for t in wall[name]), "step_ms": 1e3 * med(wall[name]),
                         "cpu_s_per_step": med(cpu[name]), "step_ms_per_round": [1e3 * t for t in wall[name]],
                         "cpu_s_per_round": list(cpu[name]),
                         "gflops": step_flops / 1e9 / med(wall[name])}
        # against the float32 matmul's peak: the bf16 contenders' fractions can pass 1 (a bf16 product runs faster
        # on AVX512-BF16 / AMX machines), so read them as speed, not as a share of their own peak
        r["frac_of_best_peak"] = r["gflops"] / max(peak["wall"])  # the strictest: our median, the matmul's best
        r["frac_best_of_best"] = step_flops / 1e9 / min(wall[name]) / max(peak["wall"])
        r["frac_median_of_median"] = r["gflops"] / med(peak["wall"])
        for clock, ts in (("wall", wall), ("cpu", cpu)):
            # paired per round: both measured within the same round, so load drifts cancel
            r[f"frac_of_peak_{clock}"] = med(step_flops / t / 1e9 / p for t, p in zip(ts[name], peak[clock]))
            if name != "ours_jax":
                r[f"ours_speedup_{clock}"] = med(t / o for t, o in zip(ts[name], ts["ours_jax"]))
    out = {"machine": {"cores": cores, "cpu": cpu_model(), "jax": jax.__version__, "backend": jax.default_backend(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "config": {"batch": args.batch, "seq": args.seq, "rounds": args.rounds, "steps": args.steps,
                      "params": CFG.param_count(), "flops_per_token": flops_per_token,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")},
           "xla_matmul_peak": {"gflops_best": max(peak["wall"]), "gflops_median": med(peak["wall"]),
                               "gflop_per_cpu_s_median": med(peak["cpu"]),
                               # per round, so the paired measures can be recomputed from this file
                               "gflops_per_round": list(peak["wall"]), "gflop_per_cpu_s_per_round": list(peak["cpu"])},
           "results": res, "failed": failed}
    if not args.no_torch:
        import torch
        import transformers

        out["machine"].update(torch=torch.__version__, transformers=transformers.__version__,
                              torch_threads=torch.get_num_threads())

    print(f"\n{out['machine']['cpu']}, {cores} cores (1-min load {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); batch {args.batch} x seq {args.seq}; "
          f"{flops_per_token / 1e6:.2f} MFLOP/token (6N + causal attention)")
    print(f"XLA f32 matmul {MATMUL_N}^3: best {max(peak['wall']):.1f} GFLOP/s, median {med(peak['wall']):.1f}; "
          f"{med(peak['cpu']):.1f} GFLOP per CPU-second")
    print("% of peak: our median step / the best matmul round, paired with each round's matmul, on CPU-seconds,"
          " best / best round, median / median round")
    print(f"{'contender':24s} {'tokens/s':>9s} {'ms/step':>8s} {'CPU s':>6s} {'GFLOP/s':>8s} {'% of peak':>15s}"
          f"  ours is (wall / CPU)")
    for name, r in res.items():
        rel = f"{r['ours_speedup_wall']:.2f}x / {r['ours_speedup_cpu']:.2f}x" if name != "ours_jax" else ""
        pct = "/".join(f"{100 * r[k]:.0f}" for k in ("frac_of_best_peak", "frac_of_peak_wall", "frac_of_peak_cpu",
                                                      "frac_best_of_best", "frac_median_of_median"))
        print(f"{name:24s} {r['tokens_per_s']:9.0f} {r['step_ms']:8.1f} {r['cpu_s_per_step']:6.2f} "
              f"{r['gflops']:8.1f} {pct:>15s}  {rel}")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
