"""Progressive scaling: validate a small model before scaling up.

    python -m experiments.scaling_ladder            # ~10 min on 2 busy CPU cores
    python -m experiments.scaling_ladder --quick    # smoke test, 1-3.5 min on 2 busy CPU cores

Trains a ladder of five tiny byte-level LMs (6.7k ... 201k non-embedding parameters) on the
embedded corpus (stdlib sources) at four token budgets each (131k ... 1.05M tokens); fits
L(N, D) = E + A/N^alpha + B/D^beta on the four smaller models (Hoffmann et al. 2022, Approach 3:
Huber on log-loss, L-BFGS from a grid) with a bootstrap prediction interval, writes the prediction
for the largest model to disk *before* training it, then trains it and reports predicted vs actual.
Outputs under --out (default runs/scaling/): ladder.json (every run), prediction.json (written before the largest
model trains), results.json, scaling_fit.png (copied to docs/scaling_fit.png unless --no-docs, in a source
checkout: an installed package has no docs/), rungs.json (each finished rung: rerun with the same training settings
after an interruption and it resumes after them, whatever --n-boot / --level, which only the fit uses; --fresh
starts over). --replot redoes a finished ladder's fit and figure (at another --n-boot / --level if given) without
training. A diverged run's loss is null in these JSON files (strict JSON: no NaN).

Token budgets share one run per model: a warmup-stable-decay schedule (constant LR after warmup)
whose run is branched at 80% of each budget into a linear cooldown to 0 over the last 20%
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
show this matches a cosine schedule per budget). Four budgets then cost 1.18x the largest one (602 steps for 512).
The learning rate is 3e-3 up to d_model 64 and 3e-3·64/d above (Adam's optimal rate for hidden
matrices falls like 1/width; a constant 3e-3 made d=96 worse than d=64 at every budget — see
docs/scaling.md). N is the non-embedding parameter count (Kaplan et al. 2020: cleaner laws at small sizes, where the
256 x d byte embeddings are a large share); D counts training tokens; the loss is held-out nats/byte.
The optimizer is lm_step's recipe (global-norm clipping + AdamW with its decay mask) with the
learning rate injected per step so that branches share one compiled step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from data.cli import cli_parser, path_arg, run_main
from data.corpus import BYTE_VOCAB, ByteWindows, encode_bytes, stdlib_text, train_eval_split
from data.shards import write_json
from experiments.config import at_least, dir_problem
from experiments.lm_step import decay_mask, make_eval_step, make_train_step
from experiments.run_log import _finite_or_null
from models import Transformer, TransformerConfig
from scaling.flops import param_counts, train_flops_per_token
from scaling.laws import bootstrap

SEQ, BATCH = 128, 16
TOKENS_PER_STEP = SEQ * BATCH


@dataclasses.dataclass(frozen=True)
class Rung:
    """One model size of the ladder; `config()` is its TransformerConfig (SwiGLU width ~8/3·d)."""

    d_model: int
    n_layers: int
    n_heads: int

    def config(self) -> TransformerConfig:
        mlp = max(16, int(round(8 * self.d_model / 3 / 16)) * 16)  # SwiGLU width ~ 8/3 d, multiple of 16
        return TransformerConfig(vocab_size=BYTE_VOCAB, d_model=self.d_model, n_layers=self.n_layers,
                                 n_heads=self.n_heads, mlp_dim=mlp, max_seq_len=SEQ)

    @property
    def name(self) -> str:
        return f"d{self.d_model}-L{self.n_layers}"


# Sizes are bound by CPU time (~3k tokens/s at 200k parameters on a busy 2-core machine): with D up to
# 1M tokens the models must stay small enough to see >= 5 tokens per parameter, or the N-term of
# the law is not identifiable (a 24k-800k ladder at <= 524k tokens fitted E -> 0; docs/scaling.md).
LADDER = (Rung(16, 2, 2), Rung(24, 2, 2), Rung(32, 3, 2), Rung(48, 3, 3), Rung(64, 4, 4))
BUDGET_STEPS = (64, 128, 256, 512)  # x 2048 tokens = 131k, 262k, 524k, 1.05M tokens
QUICK_LADDER = (Rung(16, 1, 2), Rung(24, 1, 2), Rung(32, 1, 2), Rung(32, 2, 2), Rung(48, 2, 2))
QUICK_STEPS = (8, 12, 16)  # three token counts: B/D^beta beside E needs >= 3 (two fit any beta)


def rung_lr(base: float, rung: Rung) -> float:
    """Peak LR: `base` up to d_model 64, then ∝ 1/d_model."""
    return base * min(1.0, 64 / rung.d_model)


def make_wsd_optimizer(peak_lr: float, weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                       b2: float = 0.95) -> optax.GradientTransformation:
    """lm_step's AdamW (clipping, betas, decay mask) with the learning rate as state (set per step by `with_lr`).
    Its schedule is the ladder's own `wsd_lr`, not lm_step's: the warmup's first step is at peak / warmup (lm_step's
    is at 0) and the cooldown's last update is at peak / D for a cooldown of D steps (its ramp reaches 0 at
    decay_end, a step never trained; lm_step's last update is at min_lr_ratio · lr)."""
    # mask is static: inject_hyperparams takes any callable for a schedule of the step count, and decay_mask(count)
    # (a bare True) decayed every parameter, the RMSNorm scales too
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.inject_hyperparams(optax.adamw, static_args="mask")(
                           learning_rate=peak_lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def with_lr(opt_state, lr: float):
    """The optimizer state with its injected learning rate set to `lr` (the WSD schedule is driven from Python)."""
    inj = opt_state[1]
    return (opt_state[0], inj._replace(hyperparams={**inj.hyperparams, "learning_rate": jnp.float32(lr)}))


def wsd_lr(step: int, peak: float, warmup: int, decay_start: int | None = None, decay_end: int | None = None) -> float:
    """Warmup (linear), then constant; between decay_start and decay_end linear to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay_start is None or step < decay_start:
        return peak
    return peak * max(0.0, (decay_end - step) / (decay_end - decay_start))


def train_rung(rung: Rung, budgets: tuple[int, ...], train: ByteWindows, eval_batches, *, peak_lr: float,
               warmup: int, seed: int = 0) -> dict:
    """One WSD run of `rung`, branched into a cooldown for each budget (in steps). Returns eval losses."""
    cfg = rung.config()
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    opt = make_wsd_optimizer(peak_lr)
    opt_state = opt.init(params)
    step_fn, eval_fn = make_train_step(graphdef, opt), make_eval_step(graphdef)
    evaluate = lambda p: float(np.mean([float(eval_fn(p, b)) for b in eval_batches]))  # noqa: E731
    clone = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731  (steps donate their inputs)
    last = max(budgets)
    # cooldown's first step -> the budgets branched there (round(0.8·7) = round(0.8·8) = 6: one budget per step
    # dropped the other's run in silence)
    starts = {}
    for b in sorted(set(budgets) - {last}):
        starts.setdefault(int(round(0.8 * b)), []).append(b)
    results, t0 = {}, time.time()
    bar = tqdm(total=last + sum(b - s for s, bs in starts.items() for b in bs), desc=rung.name, unit="step",
               leave=False)
    for step in range(last):
        for end in starts.get(step, ()):  # branch: cool down to this budget on a copy
            p, o = clone(params), clone(opt_state)
            for s in range(step, end):
                p, o, m = step_fn(p, with_lr(o, wsd_lr(s, peak_lr, warmup, step, end)), train.batch(s))
                bar.update()
            results[end] = (evaluate(p), float(m["loss"]))
            del p, o
        decay = int(round(0.8 * last))
        lr = wsd_lr(step, peak_lr, warmup, decay, last)
        params, opt_state, m = step_fn(params, with_lr(opt_state, lr), train.batch(step))
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(m['loss']):.3f}")
    results[last] = (evaluate(params), float(m["loss"]))
    bar.close()
    pc = param_counts(cfg)
    runs = [dict(rung=rung.name, d_model=rung.d_model, n_layers=rung.n_layers, peak_lr=peak_lr,
                 n_params=pc.non_embedding, n_params_total=pc.total, steps=b, tokens=b * TOKENS_PER_STEP,
                 eval_loss=results[b][0], train_loss=results[b][1],
                 flops=train_flops_per_token(cfg, SEQ) * b * TOKENS_PER_STEP)
            for b in sorted(results)]
    return dict(runs=runs, seconds=time.time() - t0)


def split_diverged(runs) -> tuple[list, list]:
    """(runs with a finite eval loss, the diverged rest): one NaN / inf loss made the law's fit raise after the
    smaller rungs' ~8 minutes of training, naming a run by its index in a list the ladder never showed."""
    return ([r for r in runs if math.isfinite(r["eval_loss"])],
            [r for r in runs if not math.isfinite(r["eval_loss"])])


def _dumps(obj) -> str:
    """`obj` as JSON text with null for a NaN / inf number (a diverged run's loss): Python wrote bare NaN, which
    strict readers (JavaScript, jq) refuse; metrics.jsonl writes null too. `_loads` reads null back as NaN."""
    return json.dumps(_finite_or_null(obj), indent=1, allow_nan=False)


def _loads(text: str):
    """The ladder's own JSON with null read back as NaN (the ladder writes null only for a non-finite number)."""
    return json.loads(text, object_hook=lambda d: {k: math.nan if v is None else v for k, v in d.items()})


def _diverged_note(diverged, of: int) -> str:
    return (f"{len(diverged)} of {of} runs diverged (eval loss not finite) and are left out of the fit: "
            + ", ".join(f"{r['rung']} D={r['tokens']:,} ({r['eval_loss']})" for r in diverged))


def _percent(level: float) -> str:
    """A level as a percentage, e.g. '58%': int(0.58 * 100) truncated 57.99999999999999 to 57."""
    return f"{100 * level:g}%"


def predict(fit_runs, target_n: float, target_tokens, n_boot: int, level: float = 0.9, seed: int = 0):
    """Bootstrap the law over `fit_runs`; returns (bootstrap, prediction intervals of one new run's loss at
    `target_n` parameters for each of `target_tokens`, the fitted law's own `level` intervals there)."""
    n = np.array([r["n_params"] for r in fit_runs], float)
    d = np.array([r["tokens"] for r in fit_runs], float)
    loss = np.array([r["eval_loss"] for r in fit_runs], float)
    bs = bootstrap(n, d, loss, n_boot=n_boot, seed=seed, progress=True)
    preds = [bs.prediction_interval(lambda law, t=t: float(law.loss(target_n, t)), level) for t in target_tokens]
    fit_ci = [bs.interval(lambda law, t=t: float(law.loss(target_n, t)), level)[1:] for t in target_tokens]
    return bs, preds, fit_ci


def plot(path, all_runs, bs, target, preds, level):
    """The ladder's eval losses, the fitted law and the held-out target's predicted interval, saved to `path`; the
    diverged runs (eval loss NaN: not drawn) are named in the legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = bs.fit.law
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({r["rung"] for r in all_runs}, key=lambda s: [r["n_params"] for r in all_runs if r["rung"] == s][0])
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(names)))
    dd = np.geomspace(min(r["tokens"] for r in all_runs) / 1.3, max(r["tokens"] for r in all_runs) * 1.3, 50)
    for name, c in zip(names, colors):
        rs = [r for r in all_runs if r["rung"] == name]
        n = rs[0]["n_params"]
        held = name == target
        ax1.plot([r["tokens"] for r in rs], [r["eval_loss"] for r in rs], "*" if held else "o", color=c, ms=10 if held
                 else 6, label=f"{name} (N={n / 1e3:.0f}k){' held out' if held else ''}")
        ax1.plot(dd, law.loss(n, dd), "--" if held else "-", color=c, lw=1)
        if held:
            band = np.array([bs.prediction_interval(lambda lw, t=t: float(lw.loss(n, t)), level)[1:] for t in dd])
            ax1.fill_between(dd, band[:, 0], band[:, 1], color=c, alpha=0.2,
                             label=f"{_percent(level)} prediction interval")
    from matplotlib.ticker import FormatStrFormatter

    for ax in (ax1, ax2):
        ax.set_xscale("log")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax1.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax1.set(xlabel="training tokens D", ylabel="held-out loss (nats/byte)",
            title=f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    if diverged := split_diverged([r for r in all_runs if r["rung"] != target])[1]:  # not drawn (NaN): say so
        ax1.plot([], [], "x", color="k", label=f"{len(diverged)} diverged run(s), not fitted: "
                 + ", ".join(f"{r['rung']} D={r['tokens'] / 1e3:.0f}k" for r in diverged))
    ax1.legend(fontsize=7)
    tk = [p["tokens"] for p in preds]
    # a bootstrap interval need not contain the point fit (few resamples, a skewed fit): clip the bars at it
    ax2.errorbar(tk, [p["predicted"] for p in preds], yerr=[[max(0.0, p["predicted"] - p["low"]) for p in preds],
                 [max(0.0, p["high"] - p["predicted"]) for p in preds]], fmt="o", capsize=4,
                 label="predicted (before training)")
    ax2.plot(tk, [p["actual"] for p in preds], "*", ms=12, color="C3", label="actual")
    if gone := [p["tokens"] for p in preds if not math.isfinite(p["actual"])]:  # no star drawn (NaN): say so
        ax2.plot([], [], "x", color="C3", label=f"{target} diverged (no actual): "
                 + ", ".join(f"D={t / 1e3:.0f}k" for t in gone))
    fitted, left_out = split_diverged([r for r in all_runs if r["rung"] != target])
    n_models = len({r["rung"] for r in fitted})
    title = f"{target}: prediction from the {n_models} smaller models"
    if left_out:  # the fit saw fewer runs (maybe fewer models) than the ladder trained: say which
        title = (f"{target}: prediction from {len(fitted)} runs of {'the ' * (n_models == len(names) - 1)}"
                 f"{n_models} smaller models\n({len(left_out)} diverged run{'s' * (len(left_out) > 1)} left out)")
    ax2.set(xlabel="training tokens D", ylabel="held-out loss (nats/byte)", title=title)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"  # the documented figure, whatever the cwd
RUNGS = "rungs.json"  # {settings, done: {rung: train_rung's result}}, rewritten as each rung finishes
LADDER_FILES = ("ladder.json", "prediction.json", "results.json", "scaling_fit.png")
# the settings a rung's training depends on (not n_boot, level). `decay`: what AdamW decays (rungs.json before
# 2026-12-07 has none: its rungs decayed the RMSNorm scales too, and resumed beside these they mixed two optimizers)
TRAINING = ("ladder", "budgets", "lr", "warmup", "decay")


def _to_docs(png: pathlib.Path) -> pathlib.Path | None:
    """Copy a ladder's figure to DOCS/scaling_fit.png; None where there is no DOCS: an installed wheel has no docs/,
    and the copy into site-packages raised FileNotFoundError after the whole ladder had trained."""
    if not DOCS.is_dir():
        return None
    shutil.copy(png, DOCS / "scaling_fit.png")
    return DOCS / "scaling_fit.png"


def _same_training(out: pathlib.Path, settings: dict) -> dict | None:
    """The rungs saved in `out`/rungs.json when they were trained with `settings`' TRAINING values, else None. The
    fit's settings (n_boot, level) do not count: a changed --n-boot demanded --fresh, which retrained every rung."""
    if not (out / RUNGS).is_file():
        return None
    saved = _loads((out / RUNGS).read_text(encoding="utf-8"))
    same = all(saved.get("settings", {}).get(k) == settings[k] for k in TRAINING)
    return saved["done"] if same else None


def _resumable(out: pathlib.Path, settings: dict) -> dict | None:
    """The finished rungs of an interrupted ladder in `out` trained as `settings` say (None: nothing to resume: no
    ladder there, a finished one, or other training settings)."""
    return None if (out / "results.json").exists() else _same_training(out, settings)


def replot(out: pathlib.Path, level: float | None, docs: bool, n_boot: int | None = None):
    """Re-fit (deterministic: same runs, same bootstrap seed) and redraw the figure of a finished ladder with
    `n_boot` resamples, its intervals at `level` (None: the ladder's own for either). (Ladders before 2026-12-01
    stored the count of resamples that fitted as `n_boot`: fewer are drawn.)"""
    if out.is_file():  # (was '.../results.json/results.json does not exist' for --out naming the file itself)
        raise SystemExit(f"--replot: {out} is a file; pass the directory that holds it, the --out of a finished ladder")
    if not (out / "results.json").is_file():
        raise SystemExit(f"--replot: {out / 'results.json'} does not exist; pass the --out of a finished ladder")
    try:
        res = _loads((out / "results.json").read_text(encoding="utf-8"))
        pred = res["prediction"]
        _ = res["runs"], res["comparison"]
    except (ValueError, KeyError, TypeError) as e:  # '{}' was a bare KeyError: 'prediction'
        raise SystemExit(f"--replot: {out / 'results.json'} is not a finished ladder's results ({e!r}); pass the "
                         "--out of a finished ladder (an interrupted one resumes when rerun without --replot)") from e
    level = pred.get("level", 0.9) if level is None else level
    fit_runs = split_diverged([r for r in res["runs"] if r["rung"] != pred["target"]])[0]  # as the ladder fitted
    rows = res["comparison"]
    n_boot = pred["n_boot"] if n_boot is None else n_boot  # --n-boot was ignored here: the ladder's count was drawn
    bs, intervals, _ = predict(fit_runs, pred["n_params"], [r["tokens"] for r in rows], n_boot, level)
    # the bars at the band's level: results.json holds them at the ladder's level (one figure drew two levels)
    rows = [dict(r, low=lo, high=hi) for r, (_, lo, hi) in zip(rows, intervals)]
    plot(out / "scaling_fit.png", res["runs"], bs, pred["target"], rows, level)
    wrote = [out / "scaling_fit.png"]
    # a smoke test's figure never replaces the documented one
    if docs and not res.get("quick", False) and (copy := _to_docs(out / "scaling_fit.png")):
        wrote.append(copy)
    print(f"--replot: refitted {len(fit_runs)} runs ({n_boot} resamples); wrote "
          f"{' and '.join(map(str, wrote))}")
    return res


def _number(text: str, ok, want: str) -> float:
    """`text` as a float for which `ok` holds, else argparse's error saying `want` (a word such as 'abc' was
    "invalid _fraction value: 'abc'", naming a private function and no fix)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v < 1, "in (0, 1), e.g. 0.9")


def _positive(text: str) -> float:
    return _number(text, lambda v: v > 0 and math.isfinite(v), "a positive number, e.g. 3e-3")


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--quick", action="store_true", help="tiny ladder and budgets (smoke test)")
    ap.add_argument("--out", type=path_arg, default=None,
                    help="run directory (default runs/scaling, with --quick runs/scaling-quick)")
    ap.add_argument("--lr", type=_positive, default=None,
                    help="peak LR at d_model <= 64 (scaled by 64/d above; default 3e-3)")
    ap.add_argument("--warmup", type=at_least(0), default=None, help="warmup steps (default 16)")
    ap.add_argument("--n-boot", type=at_least(1), default=None,
                    help="bootstrap resamples (default 100; with --replot, the ladder's own)")
    ap.add_argument("--level", type=_fraction, default=None,
                    help="interval level in (0, 1) (default 0.9; with --replot, the ladder's own)")
    ap.add_argument("--no-docs", action="store_true", help="do not copy the plot to docs/scaling_fit.png")
    ap.add_argument("--replot", action="store_true", help="redo fit + plot from --out/results.json (no training)")
    ap.add_argument("--fresh", action="store_true", help="replace the ladder files already in --out")
    args = ap.parse_args(argv)
    args.out = args.out or ("runs/scaling-quick" if args.quick else "runs/scaling")
    # training settings beside --replot were ignored in silence (--fresh too: the ladder it refits was kept)
    if args.replot and (flag := next((f for f, v in (("--fresh", args.fresh), ("--lr", args.lr),
                                                     ("--warmup", args.warmup)) if v not in (None, False)), None)):
        ap.error(f"argument {flag}: not allowed with --replot, which refits the finished ladder in --out without "
                 f"training; drop {flag}, or --replot to {'start over' if flag == '--fresh' else 'train'}")
    if args.replot:
        return replot(pathlib.Path(args.out), args.level, not args.no_docs, args.n_boot)
    args.lr = 3e-3 if args.lr is None else args.lr
    args.warmup = 16 if args.warmup is None else args.warmup
    args.level = 0.9 if args.level is None else args.level
    args.n_boot = 100 if args.n_boot is None else args.n_boot

    ladder, budgets = (QUICK_LADDER, QUICK_STEPS) if args.quick else (LADDER, BUDGET_STEPS)
    warmup = min(args.warmup, min(budgets) // 2)
    n_boot = min(args.n_boot, 20) if args.quick else args.n_boot
    clamped = ([f"warmup {args.warmup} → {warmup} steps (at most half the shortest budget, {min(budgets)} steps)"]
               * (warmup != args.warmup) + [f"bootstrap resamples {args.n_boot} → {n_boot} (--quick: at most 20)"]
               * (n_boot != args.n_boot))  # only what changed: 'warmup 2 → 2 steps' was printed beside n_boot's
    if clamped:
        print(f"note: {', '.join(clamped)}")
    out = pathlib.Path(args.out)
    # (a file in its path, or a folder it may not write in, was mkdir's traceback: after the --fresh deletions)
    if problem := dir_problem(out):
        ap.error(f"argument --out: {problem}")
    settings = dict(ladder=[r.name for r in ladder], budgets=list(budgets), lr=args.lr, warmup=warmup, n_boot=n_boot,
                    level=args.level, decay="weights")
    done = _resumable(out, settings)
    old = [f for f in (*LADDER_FILES, RUNGS) if (out / f).exists()]
    if old and done is None and not args.fresh:  # a rerun rewrote ladder.json beside the last run's results
        refit = (out / "results.json").is_file() and _same_training(out, settings) is not None
        ap.error(f"argument --out: {out} holds another (or a finished) ladder's {', '.join(old)}; pass --fresh to "
                 "replace them, or another --out" + ("; --replot (with --n-boot / --level) redoes this finished "
                                                     "ladder's fit and figure without training" if refit else ""))
    if args.fresh:
        for f in old:
            (out / f).unlink()
        done = None
    done = done or {}
    if done:
        print(f"resuming {out}: rungs {', '.join(done)} are done (same training settings); training the rest")
    out.mkdir(parents=True, exist_ok=True)
    tokens = encode_bytes(stdlib_text(4_000_000))
    train_tok, eval_tok = train_eval_split(tokens)
    if max(budgets) * TOKENS_PER_STEP > len(train_tok):
        raise SystemExit(f"largest budget {max(budgets) * TOKENS_PER_STEP:,} tokens exceeds the corpus's "
                         f"{len(train_tok):,}; lower BUDGET_STEPS")
    train = ByteWindows(train_tok, SEQ, BATCH, seed=0)
    held = ByteWindows(eval_tok, SEQ, 32, seed=1)
    eval_batches = [held.batch(i) for i in range(8)]
    print(f"corpus: {len(train_tok):,} train / {len(eval_tok):,} held-out bytes; budgets "
          f"{[b * TOKENS_PER_STEP for b in budgets]} tokens; ladder "
          + ", ".join(f"{r.name}: N={param_counts(r.config()).non_embedding:,}" for r in ladder))

    t_start = time.time()
    all_runs, seconds = [], {}
    def run_rung(rung):  # each rung's result is kept as it finishes: an interrupted ladder resumes after it
        if rung.name not in done:
            done[rung.name] = train_rung(rung, budgets, train, eval_batches, peak_lr=rung_lr(args.lr, rung),
                                         warmup=warmup)
            write_json(out / RUNGS, _finite_or_null({"settings": settings, "done": done}))  # NaN: null
        return done[rung.name]

    for rung in ladder[:-1]:
        res = run_rung(rung)
        all_runs += res["runs"]
        seconds[rung.name] = res["seconds"]
        tqdm.write(f"{rung.name}: " + "  ".join(f"D={r['tokens']:,}: {r['eval_loss']:.4f}" for r in res["runs"])
                   + f"  ({res['seconds']:.0f}s)")
        (out / "ladder.json").write_text(_dumps(all_runs), encoding="utf-8")

    target = ladder[-1]
    target_n = param_counts(target.config()).non_embedding
    target_tokens = [b * TOKENS_PER_STEP for b in sorted(budgets)]
    fit_runs, diverged = split_diverged(all_runs)
    if diverged:
        print(f"note: {_diverged_note(diverged, len(all_runs))}")
    try:
        bs, preds, fit_ci = predict(fit_runs, target_n, target_tokens, n_boot, args.level)
    except ValueError as e:
        if not diverged:
            raise
        note = _diverged_note(diverged, len(all_runs))
        raise SystemExit(f"cannot fit the law on the {len(fit_runs)} runs left: {e}. {note}; rerun with a lower --lr "
                         "(and --fresh)") from e
    law = bs.fit.law
    pred_rows = [dict(tokens=t, predicted=p, low=lo, high=hi, fit_low=flo, fit_high=fhi)
                 for t, (p, lo, hi), (flo, fhi) in zip(target_tokens, preds, fit_ci)]
    prediction = dict(created=time.strftime("%Y-%m-%d %H:%M:%S"), target=target.name, n_params=target_n,
                      fit=law.as_dict(), fit_runs=len(fit_runs), n_boot=n_boot, n_boot_fitted=len(bs.laws),
                      level=args.level, diverged=[dict(rung=r["rung"], tokens=r["tokens"]) for r in diverged],
                      param_intervals=bs.param_intervals(args.level), residual_rms=float(np.sqrt(np.mean(
                          np.square(bs.residuals)))), predictions=pred_rows)
    (out / "prediction.json").write_text(_dumps(prediction), encoding="utf-8")
    print(f"fit on {len(fit_runs)} runs: E={law.E:.3f} A={law.A:.4g} alpha={law.alpha:.3f} B={law.B:.4g} "
          f"beta={law.beta:.3f}; predictions for {target.name} (N={target_n:,}) written before training it:")
    for r in pred_rows:
        print(f"  D={r['tokens']:>9,}: {r['predicted']:.4f}  [{r['low']:.4f}, {r['high']:.4f}] (fit only: "
              f"[{r['fit_low']:.4f}, {r['fit_high']:.4f}])")

    res = run_rung(target)
    seconds[target.name] = res["seconds"]
    all_runs += res["runs"]
    actual = {r["tokens"]: r["eval_loss"] for r in res["runs"]}
    for r in pred_rows:
        r["actual"] = actual[r["tokens"]]
        r["error"] = r["actual"] - r["predicted"]
        r["inside"] = bool(r["low"] <= r["actual"] <= r["high"])
        r["diverged"] = not math.isfinite(r["actual"])  # a NaN is no miss of the prediction: the run failed
    results = dict(prediction=prediction, target_runs=res["runs"], comparison=pred_rows, seconds=seconds,
                   total_seconds=time.time() - t_start, runs=all_runs, quick=args.quick)
    (out / "ladder.json").write_text(_dumps(all_runs), encoding="utf-8")
    (out / "results.json").write_text(_dumps(results), encoding="utf-8")
    plot(out / "scaling_fit.png", all_runs, bs, target.name, pred_rows, args.level)
    if not args.no_docs and not args.quick:
        _to_docs(out / "scaling_fit.png")

    print(f"{target.name} (N={target_n:,}): predicted vs actual held-out loss, {_percent(args.level)} bootstrap "
          "prediction interval:")
    for r in pred_rows:
        print(f"  D={r['tokens']:>9,}: predicted {r['predicted']:.4f} [{r['low']:.4f}, {r['high']:.4f}]  actual "
              f"{r['actual']:.4f}  error {r['error']:+.4f} ({100 * r['error'] / r['actual']:+.1f}%)"
              f"{'  DIVERGED' if r['diverged'] else '' if r['inside'] else '  OUTSIDE'}")
    print(f"total {time.time() - t_start:.0f}s; results in {out}/")
    return results


if __name__ == "__main__":
    run_main(main)
