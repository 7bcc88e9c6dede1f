"""A small bidirectional text encoder built from the LM's `models.transformer.Block`, and caption dropout.

`EncoderBlock` is the decoder block itself (parameters, logical axes, pre-norm, RoPE, GQA, SwiGLU) with
one override: its attention mask lets every token see every non-padding token of its caption instead of
the causal mask. Token id `pad_id` (0 by convention) is padding.

Shapes: B batch, L caption tokens, E width (TransformerConfig.d_model), N heads, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import attention
from models.config import TransformerConfig, dtype_of
from models.embed import embed_lookup
from models.linear import flat_rows
from models.params import param
from models.residuals import bits_residuals
from models.rope import attention_scale, inv_frequencies
from models.transformer import REMAT_POLICIES, Block, _Ctx, check_token_ids, norm_param, rms_norm
from parallel.rules import constrain


class TextOut(NamedTuple):
    """The text encoder's output for B captions of L tokens, E wide."""

    tokens_BLE: jax.Array  # final-normed token states (cross-attention keys/values)
    valid_BL: jax.Array  # True for real tokens
    pooled_BE: jax.Array  # mean over real tokens


class EncoderBlock(Block):
    """The LM's `Block` (same parameters, logical axes, RoPE, GQA, SwiGLU) with a bidirectional mask:
    every token attends to every non-padding token of its caption."""

    def _attend(self, q_BLNH, k_BLKH, v_BLKH, ctx: _Ctx, window, cache):
        cfg = ctx.cfg
        B, L = q_BLNH.shape[:2]
        mask_B1LL = jnp.broadcast_to(ctx.padding_mask[:, None, None, :], (B, 1, L, L))
        scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        return attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LL, impl=cfg.attn_impl, scale=scale,
                         logit_softcap=cfg.attn_logit_softcap), None


class TextEncoder(nnx.Module):
    """`TextOut = encoder(tokens_BL)`; blocks stacked on a `layers` axis and scanned, like the LM's."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, pad_id: int = 0):
        self.cfg, self.pad_id = cfg, pad_id
        pd = dtype_of(cfg.param_dtype)
        with nnx.use_eager_sharding(False):
            self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd, cfg.init_std)

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return EncoderBlock(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
            self.final_norm = norm_param(rngs, (cfg.d_model,), ("norm",), cfg)  # as the LM

    def __call__(self, tokens_BL) -> TextOut:
        cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
        # first: it reads lists of ids as the LM does (they failed at `.shape`); out-of-range ids would gather NaN rows
        tokens_BL = check_token_ids(tokens_BL, cfg.vocab_size)
        if jnp.ndim(tokens_BL) != 2:
            raise ValueError(f"TextEncoder: tokens must be a batch [B, L], got shape {list(jnp.shape(tokens_BL))}; one "
                             "caption is tokens[None]")
        B, L = tokens_BL.shape
        if L == 0:  # failed inside the attention kernel ('zero-size array to reduction operation max')
            raise ValueError("TextEncoder: captions of 0 tokens; pad them to at least one (the null caption is "
                             "data.moving_shapes.null_tokens)")
        if L > cfg.max_seq_len:
            raise ValueError(f"captions of {L} tokens exceed the text encoder's TransformerConfig.max_seq_len="
                             f"{cfg.max_seq_len} (TextToVideoConfig.text): truncate the captions to {cfg.max_seq_len} "
                             "tokens or raise max_seq_len")
        valid_BL = tokens_BL != self.pad_id
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        ctx = _Ctx(cfg, positions_BL, None, valid_BL, inv_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling),
                   flat_rows=flat_rows(), rope_scale=attention_scale(cfg.rope_scaling))

        x_BLE = embed_lookup(self.embed[...], tokens_BL, cd)  # as the LM: all-gathered in cd
        if cfg.embed_scale:
            x_BLE = x_BLE * jnp.asarray(cfg.d_model ** 0.5, cd)
        x_BLE = constrain(x_BLE, ("batch", "act_seq", "act_embed"))
        graphdef, state = nnx.split(self.blocks)

        def layer(x, st):
            return nnx.merge(graphdef, st)(x, ctx, None)[0], None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat])
        x_BLE = jax.lax.scan(bits_residuals(layer, cfg.dtype), x_BLE, state)[0]  # bf16 on CPU: models.residuals
        x_BLE = rms_norm(x_BLE, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        w_BL = valid_BL.astype(jnp.float32)
        pooled = (x_BLE.astype(jnp.float32) * w_BL[..., None]).sum(1) / jnp.maximum(w_BL.sum(1), 1.0)[:, None]
        return TextOut(x_BLE, valid_BL, pooled.astype(cd))


def caption_dropout(tokens_BL, null_L, key, p: float):
    """Replace each caption by the null caption with probability p in [0, 1] (classifier-free guidance training).

    tokens_BL: captions [B, L]; null_L: the null caption [L] (data.moving_shapes.null_tokens(L))."""
    # a percentage (10 for 10%) or 1.5 dropped every caption (bernoulli past 1), a negative or NaN rate none, silently
    if not isinstance(p, jax.core.Tracer) and not 0 <= float(p) <= 1:
        raise ValueError(f"caption_dropout: p={p!r} must be a probability in [0, 1] (0.1: a tenth of the captions, as "
                         "TextToVideoConfig.caption_dropout)")
    # a list of captions failed as a bare AttributeError ('list' object has no attribute 'shape'), and one caption [L]
    # was named as a null caption of the wrong length ('[L=?]')
    tokens_BL = jnp.asarray(tokens_BL)
    if tokens_BL.ndim != 2:
        raise ValueError(f"caption_dropout: captions must be a batch of token ids [B, L], got shape "
                         f"{list(tokens_BL.shape)}; one caption is tokens[None]")
    L = jnp.shape(tokens_BL)[1:2]
    # a bare 'Incompatible shapes for broadcasting' in jnp.where (np.shape: a list without jax's list deprecation)
    if np.shape(null_L) != L:
        raise ValueError(f"caption_dropout: null_L must be the null caption's tokens [L={L[0] if L else '?'}], as long "
                         f"as the captions [B, L], got shape {list(np.shape(null_L))}; pad both to one length, e.g. "
                         "null_tokens(max_caption_len)")
    # a float32 rate: a Python float drew in float64 under jax_enable_x64 (other bits: other captions dropped)
    drop_B = jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), (tokens_BL.shape[0],))
    return jnp.where(drop_B[:, None], jnp.asarray(null_L, tokens_BL.dtype)[None], tokens_BL)
