"""The LM train and eval steps: plain `jax.jit` over `nnx.split` state, donating the train state.

The train state is a dict pytree `{params, opt_state, step, skipped, rng}` (step / skipped int32 scalars,
rng raw uint32 key data) so that orbax saves and restores it as one tree; `init_train_state` builds it.
"""

from __future__ import annotations

import math
import numbers
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.config import MUP_HIDDEN, MUP_OUTPUT
from models.losses import cross_entropy
from models.moe import update_router_bias
from parallel.host import step_compiler_options
from parallel.rules import constrain, logical_to_spec

BIASES = ("bq", "bk", "bv")  # models.transformer.Block's q/k/v biases


def param_names(path) -> list[str]:
    """Dict keys of a pytree path (`blocks/attn_norm`), without attribute steps such as a Variable's `.value`."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def no_decay(name: str) -> bool:
    """RMSNorm scales (*norm*), q/k/v biases and any *bias* (the MoE router_bias) are not decayed."""
    return "norm" in name or "bias" in name or name in BIASES


def decay_mask(params):
    """Weight decay on weights only, by parameter name (not ndim: stacked layers make a norm scale [L, D] and
    the router bias [L_moe, E])."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not no_decay((param_names(path) or [""])[-1]), params)


def _need(who: str, name: str, x, ok, want: str, integral: bool = False):
    """A ValueError naming the argument unless `x` is a real number (an int when `integral`; numpy's too) for
    which ok(x) holds; NaN fails every comparison, so it is refused too. A concrete 0-d array (jnp.float32(1e-3))
    is read as its number: optax takes one, and it trained before these checks; a traced float scalar passes
    unchecked (a vmapped lr sweep), a traced int does not (step counts steer Python control flow)."""
    # (getattr, not jnp.ndim: jnp.ndim(None) is a DeprecationWarning, an error where tests escalate warnings)
    if (isinstance(x, jax.core.Tracer) and not integral and x.ndim == 0
            and jnp.issubdtype(x.dtype, jnp.floating)):
        return  # a float traced by vmap / jit (an lr sweep) has no value to check; optax takes it (it was refused)
    if getattr(x, "ndim", None) == 0 and not isinstance(x, numbers.Number | jax.core.Tracer):
        x = x.item()  # a bool array stays a bool (refused below); a float one is no int
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(x, bool) or not isinstance(x, kind) or not ok(x):
        raise ValueError(f"{who}: {name}={x!r} must be {want}")


def _check_schedule(who, lr, total_steps, warmup_steps, min_lr_ratio, decay_frac):
    # each was taken silently: a negative lr or floor ascended the loss, warmup -3 ran as 0, a floor of 2 doubled
    # the lr, decay_frac 0 or 1.5 ran as 1 update or 1.0 (the run config refuses them; direct callers did not)
    _need(who, "lr", lr, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (the peak learning rate)")
    _need(who, "total_steps", total_steps, lambda v: v >= 1, "an int >= 1 (optimizer updates)", integral=True)
    _need(who, "warmup_steps", warmup_steps, lambda v: v >= 0, "an int >= 0 (0: no warmup)", integral=True)
    _need(who, "min_lr_ratio", min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1] (the schedule ends at it times lr)")
    _need(who, "decay_frac", decay_frac, lambda v: 0 < v <= 1, "in (0, 1] (wsd's share of updates that decay)")


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 50, kind: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_frac: float = 0.2):
    """LR by optimizer count (0 = the first update, total_steps - 1 = the last). warmup_steps updates ramp
    linearly from 0 (none when 0: the first update gets the full lr). 'cosine': then cosine down to
    min_lr_ratio·lr at the last update. 'wsd' (warmup-stable-decay, MiniCPM): then constant lr, and a linear
    decay over the last round(decay_frac·total_steps) updates (at least 1; fewer when the warmup reaches into
    them, so that it still ends on the last update), ending at min_lr_ratio·lr. A run of one update is the
    exception: cosine gives it lr, wsd min_lr_ratio·lr (its decay). Bad values raise a ValueError."""
    _check_schedule("make_schedule", lr, total_steps, warmup_steps, min_lr_ratio, decay_frac)
    last, w = max(total_steps - 1, 1), warmup_steps
    if kind == "cosine" and w and w >= last:
        raise ValueError(f"warmup_steps={warmup_steps} leaves no update of the {total_steps} for the cosine decay; "
                         f"use at most {max(total_steps - 2, 0)}"
                         + (" (or the 'wsd' schedule)" if w < total_steps else ""))
    # a warmup through the last update never reached the peak nor min_lr_ratio·lr (it ended at w/total of the ramp)
    if kind == "wsd" and w and w >= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} leaves no update of the {total_steps} for the wsd decay (the "
                         f"run would end mid-warmup); use at most {max(total_steps - 1, 0)}")

    def with_warmup(schedules, starts):  # starts: the counts at which schedules[1:] take over
        if w:
            schedules, starts = [optax.linear_schedule(0.0, lr, w), *schedules], [w, *starts]
        return optax.join_schedules(schedules, starts) if starts else schedules[0]

    if kind == "cosine":
        return with_warmup([optax.cosine_decay_schedule(lr, max(last - w, 1), alpha=min_lr_ratio)], [])
    if kind == "wsd":
        start = max(total_steps - max(round(total_steps * decay_frac), 1), w)  # the decay's first update
        decay = max(total_steps - start, 1)  # updates start .. total_steps - 1
        down = (optax.linear_schedule(lr, lr * min_lr_ratio, decay - 1) if decay > 1 else
                optax.constant_schedule(lr * min_lr_ratio))
        return with_warmup([optax.constant_schedule(lr), down], [start])
    raise ValueError(f"schedule: unknown {kind!r}; use cosine or wsd")


def mup_hidden_mask(params):
    """True for μP hidden matrices and the MoE router (models.config.MUP_HIDDEN, MUP_OUTPUT), whose Adam step
    scales by 1 / width_mult."""
    names = MUP_HIDDEN + MUP_OUTPUT
    return jax.tree_util.tree_map_with_path(lambda path, _: (param_names(path) or [""])[-1] in names, params)


def make_optimizer(lr: float = 3e-3, total_steps: int = 1000, warmup_steps: int = 50, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95, schedule: str = "cosine",
                   min_lr_ratio: float = 0.1, decay_frac: float = 0.2,
                   width_mult: float = 1.0) -> optax.GradientTransformation:
    """AdamW (decay masked by `decay_mask`) after global-norm clipping, on a warmup + cosine / WSD schedule.

    width_mult: `TransformerConfig.width_mult` of a μP model: hidden matrices and the MoE router take Adam steps of
    lr / width_mult (μP for Adam), embeddings, norms, biases and the readout keep lr; weight decay shrinks every
    decayed weight by lr·weight_decay per update at any width (the `mup` package's MuAdamW: lr / m, decay · m).
    The optimizer works in float32 whatever the parameters' dtype (`float32_state`): Adam's moments, clipping and
    the updates, which `optax.apply_updates` adds to the parameters before rounding to their dtype.
    Bad settings (a negative lr, clip_norm <= 0, a beta outside [0, 1), ...) raise a ValueError naming them."""
    # 0 failed as a bare ZeroDivisionError; a negative or NaN multiplier was taken: hidden matrices then stepped
    # up the gradient (or to NaN) while everything else trained
    if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real) or not (
            math.isfinite(width_mult) and width_mult > 0):  # numpy floats are numbers.Real too
        raise ValueError(f"make_optimizer: width_mult={width_mult!r} must be a positive number, the μP width "
                         "multiplier d_model / mup_base_width (pass TransformerConfig.width_mult; 1.0 without μP)")
    _check_schedule("make_optimizer", lr, total_steps, warmup_steps, min_lr_ratio, decay_frac)
    # clip_norm 0 (read as "off") zeroed every gradient and a negative one flipped it; None failed inside jit;
    # a beta of 1 divides by 1 - 1 in Adam's bias correction: NaN weights after the first update
    _need("make_optimizer", "clip_norm", clip_norm, lambda v: v > 0,
          "a positive number (the global gradient norm to clip to; math.inf: no clipping)")
    for name, b in (("b1", b1), ("b2", b2)):
        _need("make_optimizer", name, b, lambda v: 0 <= v < 1, "in [0, 1) (Adam's moment decay)")
    _need("make_optimizer", "weight_decay", weight_decay, lambda v: math.isfinite(v) and v >= 0,
          "a finite number >= 0 (0: no decay)")
    # decoupled decay scales each decayed weight by 1 - lr·weight_decay an update: at lr·weight_decay >= 1 (an L2
    # coefficient's habit, weight_decay=10 at lr 0.1) every matrix flips sign or vanishes at the first step. Warned,
    # not refused: a run made to diverge (a NaN-handling test) is one way to get there
    if not any(isinstance(v, jax.core.Tracer) for v in (lr, weight_decay)) and float(lr) * float(weight_decay) >= 1:
        warnings.warn(f"make_optimizer: weight_decay={weight_decay!r} with lr={lr!r} scales the decayed weights by "
                      f"1 - lr·weight_decay = {1 - float(lr) * float(weight_decay):.3g} an update (sign flipped or "
                      "zeroed): the run will diverge; lr·weight_decay is usually 1e-5 to 1e-3 (weight_decay 0.1 at lr "
                      "3e-3)", stacklevel=2)
    sched = make_schedule(lr, total_steps, warmup_steps, schedule, min_lr_ratio, decay_frac)
    if width_mult == 1.0:
        adamw = optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    else:  # optax.adamw with the 1/m on Adam's step alone: the decay stays lr·wd per update at every width, as
        # MuAdamW's lr / m with weight_decay · m (the 1/m applied after adamw made it m times weaker)
        adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2),
                            optax.masked(optax.scale(1.0 / width_mult), mup_hidden_mask),
                            optax.add_decayed_weights(weight_decay, decay_mask), optax.scale_by_learning_rate(sched))
    return float32_state(optax.chain(optax.clip_by_global_norm(clip_norm), adamw))


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` fed float32 copies of low-precision gradients and parameters, so its state (e.g. Adam's mu / nu) and
    updates are float32; float32 inputs pass unchanged. optax keeps moments in the parameters' dtype: with bf16
    parameters nu stops decaying once b2·nu rounds back to nu (b2 >= ~0.996) and small updates vanish."""

    def up(tree):  # floats narrower than float32 only: anything else passes as it is
        low = lambda x: jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4  # noqa: E731
        return jax.tree.map(lambda x: x.astype(jnp.float32) if low(x) else x, tree)

    def update(updates, state, params=None, **extra):
        return inner.update(up(updates), state, None if params is None else up(params), **extra)

    return optax.GradientTransformationExtraArgs(lambda params: inner.init(up(params)), update)


BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")  # the first two required


def check_batch(batch) -> None:
    """A ValueError naming what is wrong with an LM batch's keys, at trace time: a missing one was a bare KeyError,
    and a misspelled optional one ('segment_id', 'weight', 'attention_mask') was ignored silently (padding scored and
    attended, documents attending across their boundaries)."""
    if not hasattr(batch, "keys") or not hasattr(batch, "get"):  # a (inputs, targets) tuple: 'has no attribute get'
        raise ValueError(f"batch must be a dict of [B, T] arrays with keys {list(BATCH_KEYS)} (the first two "
                         f"required), got a {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS[:2] if k not in batch]
    unknown = sorted(str(k) for k in batch.keys() if k not in BATCH_KEYS)
    if missing or unknown:
        raise ValueError(f"batch {'lacks ' + repr(missing) if missing else ''}{' and ' if missing and unknown else ''}"
                         f"{'has unknown keys ' + repr(unknown) if unknown else ''}: the LM steps read 'inputs' and "
                         "'targets' [B, T] and, optionally, 'positions', 'segment_ids' and 'weights' (a padding mask "
                         "is segment_ids 0; weights 0 on the padded targets only leave them out of the loss: an MoE "
                         "layer still routes them, into its capacity, balancing losses and load)")


def lm_loss_parts(graphdef, params, batch, rng=None):
    """Mean next-token NLL over weighted targets, the weight total, and the model's aux dict
    ({} for dense; MoE: lb_loss, z_loss, dropped_frac scalars and load [L_moe, E]).

    batch = {inputs, targets [B, T] int32, optional positions, segment_ids [B, T] int32, weights [B, T] f32}; without
    weights every target is scored, except segment 0 (padding) when segment_ids are given."""
    check_batch(batch)
    model = nnx.merge(graphdef, params)
    seg = batch.get("segment_ids")
    # MoE layers must know the padding (segment 0) to keep it out of expert capacity, the aux losses and the
    # load that moves the router bias; a dense model needs no mask (segments already keep attention apart)
    padding = seg > 0 if seg is not None and model.cfg.moe is not None else None
    logits_BTV, aux = model(batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=seg,
                            padding_mask_BT=padding, return_aux=True, rng=rng)
    weights = batch.get("weights")
    if weights is None and seg is not None:  # segment 0 is padding here as for MoE: never scored
        weights = (seg > 0).astype(jnp.float32)
    mean, n = cross_entropy(logits_BTV, batch["targets"], weights)
    return mean, n, aux


def lm_loss(graphdef, params, batch):
    """Mean next-token loss of `batch` (cross-entropy only; no MoE aux terms)."""
    return lm_loss_parts(graphdef, params, batch)[0]


def _objective(moe_cfg, nll, aux_weight, aux):
    """Summed CE + aux_weight · the MoE aux terms; divided by the step's total token weight later."""
    if moe_cfg is None or not aux:
        return nll
    return nll + aux_weight * (moe_cfg.lb_loss_weight * aux["lb_loss"] + moe_cfg.z_loss_weight * aux["z_loss"])


def _routed(batch):
    """How many tokens of `batch` the MoE layers route (float32): those of a segment > 0 (lm_loss_parts passes
    segment 0 to them as padding), else all."""
    seg = batch.get("segment_ids")
    return jnp.asarray(batch["inputs"].size if seg is None else (seg > 0).sum(), jnp.float32)


def _weight_total(batch):
    """The token weight lm_loss_parts' cross-entropy sums over `batch` (float32), computed without the model."""
    w, seg = batch.get("weights"), batch.get("segment_ids")
    if w is None:
        w = jnp.ones(jnp.shape(batch["targets"])) if seg is None else seg > 0
    return jnp.where(jnp.asarray(batch["targets"]) < 0, 0.0, jnp.asarray(w, jnp.float32)).sum()


def _update_router_bias(params, load_LE, moe_cfg):
    """DeepSeek-V3 aux-loss-free balancing: move `moe_blocks/moe/router_bias` [L_moe, E] against the load, outside
    the optimizer (its gradient is zero: the model reads it through stop_gradient)."""

    def one(path, x):
        names = param_names(path)
        if names[-1:] == ["router_bias"] and "moe_blocks" in names:
            return update_router_bias(x, load_LE, moe_cfg.bias_update_rate)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def _update(who: str, optimizer, grads, opt_state, params):
    """`optimizer.update(grads, opt_state, params)`, the call the steps make (no extra arguments): an optimizer whose
    update needs more (optax.contrib.reduce_on_plateau's value, optax.lbfgs's value / grad / value_fn) failed in a
    bare TypeError from inside optax, naming neither the step nor what it passes."""
    try:
        return optimizer.update(grads, opt_state, params)
    except TypeError as e:
        if "required keyword-only argument" not in str(e):
            raise
        raise TypeError(f"{who}: the optimizer's update needs arguments the step does not pass ({e}); the step calls "
                        "optimizer.update(grads, opt_state, params) and nothing else, so optimizers that read the loss "
                        "(optax.contrib.reduce_on_plateau's value, optax.lbfgs's value / grad / value_fn) are not "
                        "supported: drive them from your own step, or use a schedule (make_schedule) instead") from e


def make_train_step(graphdef, optimizer: optax.GradientTransformation):
    """Jitted `step(params, opt_state, batch) -> (params, opt_state, {loss, grad_norm})`; donates the state.
    The plain step of benchmarks and tests (cross-entropy only: an MoE model trained with it gets no load-balancing
    or z-loss and no router-bias update; `make_state_step(..., moe_cfg=cfg.moe)`, the trainer's step, adds them).
    Like it, it differentiates the weighted NLL sum and divides the gradients by the weight total afterwards: the
    mean's logit cotangents (~1 / (V·tokens)) fell into float16 subnormals under float16 compute (gradients 20% off
    at 2048 tokens, 0.2% as a sum). The sum is a fixed loss scale of the batch's token count, with no overflow
    handling: under float16 compute a weight gradient's float16 sum past 65504 is inf (an LM head's at 32768 tokens
    of one repeated id), so large float16 batches need a loss scaler of your own (train_lm refuses float16)."""

    def summed(p, batch):
        mean, n, _ = lm_loss_parts(graphdef, p, batch)
        return mean * n, (mean, n)

    def step(params, opt_state, batch):
        (_, (loss, n)), g = jax.value_and_grad(summed, has_aux=True)(params, batch)
        grads = jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0), g)  # no weight: loss and gradients 0
        updates, opt_state = _update("make_train_step", optimizer, grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1), compiler_options=step_compiler_options())


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int = 0) -> dict:
    """The train state `make_state_step` takes, for `params` as placed (e.g. by `parallel.create_sharded`): the
    optimizer state sharded like its parameters, and step / skipped / rng replicated on the parameters' mesh, so a
    `experiments.checkpoint.Checkpoints.restore` of it (its shardings are the restore target) steps on that mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel.sharding import init_optimizer

    sharding = jax.tree.leaves(params)[0].sharding
    rep = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
    put = lambda x: jax.device_put(x, rep)  # noqa: E731  (None: the default device)
    opt_state = init_optimizer(optimizer, params)
    # a user's optax optimizer keeps its moments in the parameters' dtype (make_optimizer's are float32): with bf16
    # parameters Adam's nu stopped decaying (b2 = 0.999: 2.7x the float64 nu 990 steps after the gradient went to 0)
    low = lambda tree: sorted({str(x.dtype) for x in jax.tree.leaves(tree)  # noqa: E731
                               if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4})
    if low(params) and low(opt_state):
        warnings.warn(f"init_train_state: the optimizer state holds {', '.join(low(opt_state))} leaves (optax keeps "
                      "moments in the parameters' dtype): small updates and moment decay round away; wrap the "
                      "optimizer in experiments.lm_step.float32_state (as make_optimizer does) for float32 moments",
                      stacklevel=2)
    return {"params": params, "opt_state": opt_state,
            "step": put(jnp.zeros((), jnp.int32)), "skipped": put(jnp.zeros((), jnp.int32)),
            "rng": put(jax.random.key_data(jax.random.key(seed)))}


def _microbatches(x, grad_accum: int, who: str):
    """[B, ...] -> [A, B/A, ...] with A = grad_accum: microbatch k = rows k::A, so every device keeps its rows."""
    if x.shape[0] % grad_accum:
        raise ValueError(f"{who}: grad_accum={grad_accum} must divide the batch's {x.shape[0]} "
                         f"rows (an array {tuple(x.shape)}); use a batch size that is a multiple of it")
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else logical_to_spec(("batch",), mesh)[0] or ()
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if x.shape[1] % n:  # constrain would name the microbatch's rows as if they were the whole batch
        raise ValueError(f"{who}: grad_accum={grad_accum} leaves {x.shape[1]} of the batch's "
                         f"{x.shape[0] * x.shape[1]} rows per microbatch, which the batch's mesh axes "
                         f"{axes!r} (size {n}) do not divide; use a batch that is a multiple of "
                         f"{grad_accum * n} (grad_accum x {n}), or a smaller grad_accum")
    return constrain(x, (None, "batch", "act_seq") + (None,) * (x.ndim - 3))


def make_state_step(graphdef, optimizer: optax.GradientTransformation, schedule=None, moe_cfg=None,
                    grad_accum: int = 1, state_shardings=None):
    """Jitted `step(state, batch) -> (state, metrics)` of the trainer; donates `state`.

    grad_accum = A: the [B, T] batch is cut into A microbatches of B/A rows (rows k, k+A, ... form microbatch k,
    so every device keeps its rows) and their gradients are summed in a scan before one update; the loss is
    normalised by the step's total token weight, so for a dense model A only changes the summation order. MoE
    auxiliary losses are computed per microbatch and weighted by the tokens each routes (segment > 0), as one batch
    averages them over its routed tokens; so are the step's reported routing metrics and the load that moves a sigmoid
    router's bias (a loss-weight weighting let an SFT microbatch of prompts only, routed but scored 0, count for
    nothing). The z-loss and the load then equal the one-batch ones; the load-balancing loss, nonlinear in the
    batch's routing statistics, changes the objective slightly (measured: gradients within ~3e-4 of the one-batch
    ones at lb 0.01, z 0.001; 1e-7 without aux losses).
    A non-finite loss or gradient norm leaves the state unchanged (step + 1, skipped + 1): the caller halts or goes
    on. A step whose weights sum to 0 (no target scored) is skipped the same way, with loss 0 and metrics['finite']
    True (metrics['tokens'] 0). The norm is optax's float32 sum of squares, so finite gradients with a norm over
    ~1.8e19 count too (optax.clip_by_global_norm, computing the same norm, would zero their update).
    moe_cfg: the MoEConfig whose aux-loss weights and bias rate the step applies, and whether it jitters the router
    (router_jitter 0: off; otherwise the amount must be the model's own, by which its layers jitter); None: the
    model's own (`cfg.moe`; None for a dense model). A sigmoid router's bias moves here, outside `optimizer`: one
    that the optimizer freezes (optax.multi_transform with set_to_zero) still moves unless bias_update_rate is 0.
    metrics['grad_norm'] is the global norm before clipping. Skipped steps advance neither Adam's count nor the
    schedule's, so a run with k of them ends k updates short of its schedule's end (min_lr_ratio · lr).
    schedule: the optimizer's learning-rate schedule, reported as metrics['lr'] (absent without one).
    state_shardings: pin the output state to the input layout, so a resumed run compiles the same program.
    optimizer: called as optimizer.update(grads, opt_state, params), nothing else (one that needs the loss, e.g.
    optax.contrib.reduce_on_plateau, is refused by name). optax.MultiSteps(inner, k) accumulates on top of grad_accum
    (A·k microbatches per inner update, each step's mean weighted equally); a skipped step leaves its mini-step count
    and accumulator as they were, and metrics['lr'] counts steps, not MultiSteps' inner updates.
    Schedule-free optimizers (optax.contrib.schedule_free_*) train state['params'] as their gradient point y: evaluate
    optax.contrib.schedule_free_eval_params(state['opt_state'], state['params']) (x, the paper's eval point).
    """

    if isinstance(grad_accum, bool) or not isinstance(grad_accum, numbers.Integral) or grad_accum < 1:
        raise ValueError(f"make_state_step: grad_accum={grad_accum!r} must be an int >= 1 (microbatches per step)")

    def grads_of(params, mb, rng, moe_cfg, aux_scale=None):
        def f(p):  # aux_scale: the step's weight total per routed token (None: one batch, the aux terms weigh n)
            mean, n, aux = lm_loss_parts(graphdef, p, mb, rng)
            nll = mean * n  # sums, so that microbatches combine into the exact step mean
            aux_weight = n if aux_scale is None else aux_scale * _routed(mb)
            return _objective(moe_cfg, nll, aux_weight, aux), (nll, n, aux)

        return jax.grad(f, has_aux=True)(params)

    def step(state, batch):
        params, step_i = state["params"], state["step"]
        # None trained a MoE model on cross-entropy alone (no lb / z gradients, a frozen router bias) while its
        # metrics reported lb_loss: the model's own config, read at trace time
        built = nnx.merge(graphdef, params).cfg.moe
        moe = moe_cfg if moe_cfg is not None else built
        # the layers jitter by their own config (the key only turns it on): another amount was silently not applied
        if moe_cfg is not None and built is not None and 0 < moe_cfg.router_jitter != built.router_jitter:
            raise ValueError(f"make_state_step: moe_cfg.router_jitter={moe_cfg.router_jitter}, but the model's MoE "
                             f"layers were built with router_jitter={built.router_jitter} and jitter by that; build "
                             "the model with the amount you want, or pass moe_cfg.router_jitter=0 to turn it off")
        if jnp.issubdtype(state["rng"].dtype, jax.dtypes.prng_key):  # orbax saves raw key data, not typed keys
            raise ValueError("state['rng'] is a typed key; store raw key data, jax.random.key_data(jax.random.key("
                             "seed)), as init_train_state does")
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step_i)
        # router jitter is the only randomness in the model; pass a key only when it is used
        model_rng = rng if moe is not None and moe.router_jitter > 0 else None
        if grad_accum == 1:
            g, (nll, n, aux) = grads_of(params, batch, model_rng, moe)
        else:
            # the aux terms of microbatch k weigh n_step · r_k / r_step: divided by n_step later, a mean over the
            # step's routed tokens r, as one batch's aux values are
            r_all = _routed(batch)
            aux_scale = jnp.where(r_all > 0, _weight_total(batch) / jnp.where(r_all > 0, r_all, 1.0), 0.0)

            def body(carry, xs):
                mb, k = xs
                key = None if model_rng is None else jax.random.fold_in(model_rng, k)
                g, (nll, n, aux) = grads_of(params, mb, key, moe, aux_scale)
                acc = jax.tree.map(jnp.add, carry, (g, nll, n))
                return acc, (aux, _routed(mb))

            # summed in float32 whatever the parameter dtype (32 bf16 microbatch sums lost 4x the precision of one
            # rounding), then cast back so the optimizer sees the parameters' dtype
            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32),
                     jnp.zeros((), jnp.float32))
            mbs = jax.tree.map(lambda x: _microbatches(x, grad_accum, "make_state_step"), batch)
            (g, nll, n), (auxes, rs) = jax.lax.scan(body, zeros, (mbs, jnp.arange(grad_accum)))
            g = jax.tree.map(lambda x, p: x.astype(p.dtype), g, params)
            # the routing metrics (and the load that moves the router bias) of the whole step: microbatches weighted
            # by their routed tokens, as the objective weights their aux losses (an unweighted mean let a padded
            # microbatch count as much as a full one)
            w = jnp.where(r_all > 0, rs / jnp.where(r_all > 0, r_all, 1.0), 1.0 / grad_accum)
            aux = jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), auxes)
        n_total = jnp.where(n > 0, n, 1.0)  # the step's weight total (fractional weights too); none: loss 0
        grads = jax.tree.map(lambda x: x / n_total, g)
        loss = nll / n_total
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = _update("make_state_step", optimizer, grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if moe is not None and aux and moe.router == "sigmoid" and moe.bias_update_rate > 0:
            new_params = _update_router_bias(new_params, aux["load"], moe)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a step without a weighted token (an SFT batch of prompts only) has nothing to learn from: its zero gradient
        # still moved every weight by ~lr (Adam's momentum of earlier steps, the weight decay) and the schedule on
        update = ok & (n > 0)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(update, a, b), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": step_i + 1, "skipped": state["skipped"] + (~update).astype(jnp.int32),
                     "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": ok, "tokens": n}
        if schedule is not None:  # no schedule: no lr (a NaN placeholder tripped jax_debug_nans on every step)
            metrics["lr"] = schedule(step_i - state["skipped"])
        if aux:
            metrics.update(lb_loss=aux["lb_loss"], z_loss=aux["z_loss"], dropped_frac=aux["dropped_frac"],
                           load=aux["load"])
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings, compiler_options=step_compiler_options())


def make_eval_step(graphdef):
    """Jitted `eval(params, batch) -> mean loss`."""
    return jax.jit(lambda params, batch: lm_loss(graphdef, params, batch))


def make_eval_sums(graphdef, grad_accum: int = 1):
    """Jitted `eval(params, batch) -> (nll_sum, weight_sum)`: sum over batches, then divide, for an exact mean.

    grad_accum = A: the batch's forward runs as the train step's A microbatches (rows k::A), their sums added, so
    evaluation needs no more memory than a training microbatch (one whole-batch forward, logits and all, ran out of
    memory at the first eval of a run that grad_accum had made fit). The sums only change summation order, an MoE's
    too: capacity dispatch routes each row on its own (its routing group), so the same tokens past an expert's
    capacity drop at any A, as in training (models.generate decodes dropless: its loss on the same tokens can be
    lower)."""
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, numbers.Integral) or grad_accum < 1:
        raise ValueError(f"make_eval_sums: grad_accum={grad_accum!r} must be an int >= 1 (microbatches per batch)")

    def sums(params, mb):
        mean, n, _ = lm_loss_parts(graphdef, params, mb)
        return mean * n, n

    def f(params, batch):
        if grad_accum == 1:
            return sums(params, batch)
        mbs = jax.tree.map(lambda x: _microbatches(x, grad_accum, "make_eval_sums"), batch)
        zero = jnp.zeros((), jnp.float32)
        return jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, sums(params, mb)), None), (zero, zero),
                            mbs)[0]

    return jax.jit(f)


def per_device_set(fn, leaves) -> list:
    """`fn(list of arrays) -> list of scalars`, called once per group of leaves on the same devices (one jitted
    call cannot mix a restored scalar committed to one device with weights on the mesh); results on the host,
    in leaf order."""
    groups: dict = {}
    for i, x in enumerate(leaves):
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
    out = [None] * len(leaves)
    for idx in groups.values():
        for i, v in zip(idx, jax.device_get(fn([leaves[i] for i in idx]))):
            out[i] = v
    return out


@jax.jit
def _leaves_finite(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def all_finite(tree) -> bool:
    """True when every floating leaf of `tree` is finite (checked before every checkpoint save)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(v) for v in per_device_set(_leaves_finite, leaves))
