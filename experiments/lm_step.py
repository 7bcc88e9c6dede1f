"""The LM train and eval steps: plain `jax.jit` over `nnx.split` state, donating the train state."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from models.losses import cross_entropy


def decay_mask(params):
    """Weight decay on matrices only (no decay on norm scales and biases)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(lr: float = 3e-3, total_steps: int = 1000, warmup_steps: int = 50, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay to 10% and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
                                                  end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def lm_loss(graphdef, params, batch):
    """Mean next-token loss of `batch` = {inputs, targets [B, T], optional positions, segment_ids, weights}."""
    model = nnx.merge(graphdef, params)
    logits_BTV = model(batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"))
    return cross_entropy(logits_BTV, batch["targets"], batch.get("weights"))[0]


def make_train_step(graphdef, optimizer: optax.GradientTransformation):
    """Returns jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`; donates the state."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef):
    return jax.jit(lambda params, batch: lm_loss(graphdef, params, batch))
