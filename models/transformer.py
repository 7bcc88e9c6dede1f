"""Decoder-only Transformer (Llama/Mistral/Qwen family) in Flax NNX, used functionally.

Parameters carry logical axis names only; `parallel.rules` maps them to a mesh. Layers are stacked
on a leading `layers` axis and run with `jax.lax.scan` (or unrolled, same params) under a remat
policy. Shapes: B batch, T tokens, D d_model, N heads, K kv heads, H head dim, F mlp, V vocab,
L layers, S cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import attention, make_mask
from models.config import TransformerConfig, dtype_of
from models.rope import apply_rope, inv_frequencies
from parallel.rules import constrain


def param(rngs, shape, axes, dtype, std=None):
    """A parameter annotated with logical axes: normal(std) or ones (std=None)."""
    init = nnx.initializers.ones if std is None else nnx.initializers.normal(std)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class KVCache(NamedTuple):
    """Stacked per-layer cache: k/v [L, B, S, K, H]; `length` = slots filled so far (scalar)."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, max_len: int, dtype=None):
        dtype = dtype or dtype_of(cfg.dtype)
        shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.hd)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class Block(nnx.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, n, k, h, f, pd, std = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.mlp_dim,
                                  dtype_of(cfg.param_dtype), cfg.init_std)
        self.attn_norm = param(rngs, (d,), ("norm",), pd)
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, std)
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, std)
        if cfg.qkv_bias:
            zeros = dict(std=0.0)
            self.bq = param(rngs, (n, h), ("heads", "head_dim"), pd, **zeros)
            self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, **zeros)
            self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, **zeros)
        self.mlp_norm = param(rngs, (d,), ("norm",), pd)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), pd, std)

    def __call__(self, x_BTD, ctx: _Ctx, k_cache=None, v_cache=None):
        cfg, cd = ctx.cfg, dtype_of(ctx.cfg.dtype)
        w = lambda p: p[...].astype(cd)  # noqa: E731  (params stay in param_dtype; compute in cd)
        h_BTD = rms_norm(x_BTD, self.attn_norm[...], cfg.norm_eps)
        q_BTNH = jnp.einsum("btd,dnh->btnh", h_BTD, w(self.wq))
        k_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, w(self.wk))
        v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, w(self.wv))
        if cfg.qkv_bias:
            q_BTNH, k_BTKH, v_BTKH = q_BTNH + w(self.bq), k_BTKH + w(self.bk), v_BTKH + w(self.bv)
        q_BTNH = constrain(apply_rope(q_BTNH, ctx.positions, ctx.inv_freq), ("batch", "act_seq", "act_heads", None))
        k_BTKH = apply_rope(k_BTKH, ctx.positions, ctx.inv_freq)
        if k_cache is not None:  # write this step's keys at slots [length, length + T)
            start = (0, ctx.cache_start, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
            k_BTKH, v_BTKH = k_cache.astype(cd), v_cache.astype(cd)
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, ctx.mask, impl=cfg.attn_impl)
        x_BTD = x_BTD + jnp.einsum("btnh,nhd->btd", o_BTNH, w(self.wo))
        x_BTD = constrain(x_BTD, ("batch", "act_seq", "act_embed"))

        h_BTD = rms_norm(x_BTD, self.mlp_norm[...], cfg.norm_eps)
        g_BTF = jnp.einsum("btd,df->btf", h_BTD, w(self.w_gate))
        u_BTF = jnp.einsum("btd,df->btf", h_BTD, w(self.w_up))
        a_BTF = constrain(jax.nn.silu(g_BTF) * u_BTF, ("batch", "act_seq", "act_mlp"))
        x_BTD = x_BTD + jnp.einsum("btf,fd->btd", a_BTF, w(self.w_down))
        return constrain(x_BTD, ("batch", "act_seq", "act_embed")), k_cache, v_cache


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Per-call values every layer shares (not parameters)."""

    cfg: TransformerConfig
    positions: jax.Array
    mask: jax.Array
    inv_freq: object
    cache_start: jax.Array | int = 0


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """`logits_BTV = model(tokens_BT)`; with a `KVCache`, returns `(logits, new_cache)`."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, d, v = dtype_of(cfg.param_dtype), cfg.d_model, cfg.vocab_size
        # Logical names are not mesh axes, so variables must not try to shard themselves eagerly;
        # parallel.sharding places them on a mesh after an abstract init.
        with nnx.use_eager_sharding(False):
            self.embed = param(rngs, (v, d), ("vocab", "embed"), pd, cfg.init_std)

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
            self.final_norm = param(rngs, (d,), ("norm",), pd)
            if not cfg.tie_embeddings:
                self.lm_head = param(rngs, (d, v), ("embed", "vocab"), pd, cfg.init_std)

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, padding_mask_BT=None,
                 cache: KVCache | None = None):
        """tokens [B, T] int → logits [B, T, V] float32.

        positions: RoPE positions (default: arange, offset by the cache length when decoding).
        segment_ids: packed documents attend only within their own id. padding_mask: True for real
        tokens; padded keys are never attended. Causality is by slot (index in the row / cache).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        start = cache.length if cache is not None else 0
        slots_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        positions_BT = slots_BT if positions_BT is None else positions_BT
        if cache is None:
            mask = make_mask(slots_BT, slots_BT, segment_ids_BT, segment_ids_BT, padding_mask_BT)
        else:
            if segment_ids_BT is not None:
                raise ValueError("segment_ids are not supported with a KV cache; decode one document per row")
            S = cache.k.shape[2]
            k_slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            mask = make_mask(slots_BT, k_slots_BS, k_valid_BS=k_slots_BS < start + T)
        ctx = _Ctx(cfg, positions_BT, mask, inv_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling), start)

        cd = dtype_of(cfg.dtype)
        # Gather from a table replicated over `vocab` (the FSDP/TP all-gather a weight needs anyway):
        # a gather from a vocab-sharded table makes GSPMD replicate the whole activation instead.
        embed_VD = constrain(self.embed[...], (None, "act_embed"))
        x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cd)
        x_BTD = constrain(x_BTD, ("batch", "act_seq", "act_embed"))
        x_BTD, new_kv = self._run_blocks(x_BTD, ctx, cache)

        x_BTD = rms_norm(x_BTD, self.final_norm[...], cfg.norm_eps)
        head_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(cd)).astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            logits_BTV = cfg.final_logit_softcap * jnp.tanh(logits_BTV / cfg.final_logit_softcap)
        logits_BTV = constrain(logits_BTV, ("batch", "act_seq", "act_vocab"))
        if cache is None:
            return logits_BTV
        return logits_BTV, KVCache(new_kv[0], new_kv[1], start + T)

    def _run_blocks(self, x_BTD, ctx: _Ctx, cache: KVCache | None):
        graphdef, state = nnx.split(self.blocks)

        def layer(x, xs):
            st, kc, vc = xs
            x, kc, vc = nnx.merge(graphdef, st)(x, ctx, kc, vc)
            return x, (kc, vc)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        kv = (cache.k, cache.v) if cache is not None else (None, None)
        if self.cfg.scan_layers:
            return jax.lax.scan(layer, x_BTD, (state, *kv))
        outs = []
        for i in range(self.cfg.n_layers):
            x_BTD, out = layer(x_BTD, jax.tree.map(lambda a, i=i: a[i], (state, *kv)))
            outs.append(out)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outs) if cache is not None else (None, None)
