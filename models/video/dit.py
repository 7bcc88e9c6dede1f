"""Video diffusion Transformer (DiT) over spacetime patches of VAE latents, in Flax NNX, used functionally.

A block is adaLN-Zero: every sublayer (self-attention — spatial then temporal when factorized, or one
full 3D attention —, cross-attention to the caption, SwiGLU MLP) is `x + gate·f(norm(x)·(1 + scale) +
shift)` with (shift, scale, gate) regressed from the conditioning vector c = MLP(time) + proj(pooled
caption) by a zero-initialised linear layer, so a fresh block is exactly the identity. Layers are stacked
on a `layers` axis and scanned, like `models.Transformer`.

Shapes: B batch, T/H/W latent frames/rows/columns, C latent channels, S tokens, D width, E text width,
L text tokens, P = pt·ph·pw·C patch features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import dtype_of
from models.linear import add_bias
from models.moe_dispatch import mesh_shards
from models.params import param
from models.residuals import bits_residuals
from models.transformer import REMAT_POLICIES
from models.video.config import DiTConfig, token_grid
from models.video.layers import (
    CrossAttention,
    SelfAttention,
    SwiGLU,
    gated_add,
    matmul,
    modulate,
    patchify,
    plain_norm,
    timestep_embedding,
    unpatchify,
)
from parallel.rules import constrain, logical_to_spec, replicating_indivisible

ZERO = 0.0  # std=0: a zero-initialised parameter (adaLN-Zero modulation, output projection)


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Per-call values every block shares (not parameters)."""

    cfg: DiTConfig
    c_BD: jax.Array
    text_BLE: jax.Array
    text_valid_BL: jax.Array


class DiTBlock(nnx.Module):
    """adaLN-Zero block. Parameters of the full-attention block are a subset of the factorized one's
    (`attn`, `cross`, `mlp`, `ada`; factorized adds `tattn`, `ada_t`), so weights can move between them."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, pd, std = cfg.d_model, dtype_of(cfg.param_dtype), cfg.init_std
        kw = dict(qk_norm=cfg.qk_norm, std=std, dtype=pd, rngs=rngs)
        with nnx.use_eager_sharding(False):
            self.attn = SelfAttention(d, cfg.n_heads, cfg.hd, **kw)
            if cfg.factorized:
                self.tattn = SelfAttention(d, cfg.n_heads, cfg.hd, **kw)
                self.ada_t = param(rngs, (d, 3 * d), ("embed", "modulation"), pd, ZERO)
                self.ada_t_bias = param(rngs, (3 * d,), ("modulation",), pd, ZERO)
            self.cross = CrossAttention(d, cfg.text_dim, cfg.n_heads, cfg.hd, **kw)
            self.mlp = SwiGLU(d, cfg.mlp_dim, std=std, dtype=pd, rngs=rngs)
            # (attn, cross, mlp) × (shift, scale, gate)
            self.ada = param(rngs, (d, 9 * d), ("embed", "modulation"), pd, ZERO)
            self.ada_bias = param(rngs, (9 * d,), ("modulation",), pd, ZERO)

    def __call__(self, x_BSD, ctx: _Ctx):
        cfg, cd = ctx.cfg, dtype_of(ctx.cfg.dtype)
        B, D = x_BSD.shape[0], cfg.d_model
        c = jax.nn.silu(ctx.c_BD)
        m = (matmul(c, self.ada, cd) + self.ada_bias[...].astype(cd)[None]).reshape(B, 3, 3, D)
        rope = dict(rope_split=cfg.rope_dims, rope_theta=cfg.rope_theta, cd=cd, eps=cfg.norm_eps,
                    spatial_window=cfg.spatial_window, temporal_window=cfg.temporal_window, impl=cfg.attn_impl)
        norm = lambda x: plain_norm(x, cfg.norm_eps)  # noqa: E731

        h = modulate(norm(x_BSD), m[:, 0, 0], m[:, 0, 1])
        x_BSD = gated_add(x_BSD, m[:, 0, 2], self.attn(h, cfg.grid, "spatial" if cfg.factorized else "full", **rope))
        # A single frame has no time axis to mix: skipping temporal attention there makes a factorized
        # model an image model on T = 1 (joint image-video training), and equal to full attention.
        if cfg.factorized and cfg.grid[0] > 1:
            mt = (matmul(c, self.ada_t, cd) + self.ada_t_bias[...].astype(cd)[None]).reshape(B, 3, D)
            h = modulate(norm(x_BSD), mt[:, 0], mt[:, 1])
            x_BSD = gated_add(x_BSD, mt[:, 2], self.tattn(h, cfg.grid, "temporal", **rope))
        x_BSD = constrain(x_BSD, ("batch", "act_seq", "act_embed"))

        h = modulate(norm(x_BSD), m[:, 1, 0], m[:, 1, 1])
        x_BSD = gated_add(x_BSD, m[:, 1, 2], self.cross(h, ctx.text_BLE, ctx.text_valid_BL, cd=cd, eps=cfg.norm_eps,
                                                      impl=cfg.attn_impl))
        h = modulate(norm(x_BSD), m[:, 2, 0], m[:, 2, 1])
        x_BSD = gated_add(x_BSD, m[:, 2, 2], self.mlp(h, cd))
        return constrain(x_BSD, ("batch", "act_seq", "act_embed"))


def _check_token_split(cfg: DiTConfig, who: str = "VideoDiT") -> None:
    """Under a mesh that splits `act_seq`, the DiT's S = T'·H'·W' tokens must divide it: the rules' refusal at the
    first constraint said "a sequence length", which the DiT has no field of (its tokens come from latent_shape and
    patch). Not inside `parallel.rules.replicate_indivisible()`, where the constraints replicate the tokens instead.
    who: the model named in the refusal (the aligner's video tower runs on the same grid)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or replicating_indivisible():
        return
    axes = logical_to_spec(("act_seq",), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if cfg.tokens % (n := mesh_shards("act_seq")):
        raise ValueError(f"{who}: its {token_grid(cfg, 'DiTConfig.')} do not split evenly over mesh axes {axes} "
                         f"(size {n}), which the rules give the tokens (act_seq); use a latent_shape / patch whose "
                         f"T'·H'·W' is a multiple of {n}, or a mesh with fewer sequence devices")


def _check_conditioning(cfg, B: int, t_B, text_BLE, text_valid_BL, pooled_BE) -> None:
    """Name the argument whose shape or dtype is wrong (before tracing: inside, a broadcast error names none)."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"VideoDiT: {what}")

    shape = lambda a: tuple(getattr(a, "shape", ()))  # noqa: E731
    need(shape(t_B) == (B,) and jnp.issubdtype(jnp.result_type(t_B), jnp.floating),
         f"t_B must be float times in [0, 1] of shape [B]=({B},), got {jnp.result_type(t_B)}{list(shape(t_B))}")
    # values known (eager, or closed over by jit, and on this host): check the range too
    if not isinstance(t_B, jax.core.Tracer) and getattr(t_B, "is_fully_addressable", True):
        # diffusers' timesteps as floats (0..999) ran silently: the embedding is of 1000·t, so t = 500 gave an
        # arbitrary conditioning and predictions (a few ulps' slack for a user's own float32 time grid)
        t = np.asarray(t_B, np.float64)
        need(bool(((t >= -1e-6) & (t <= 1 + 1e-6)).all()),
             f"t_B must be float times in [0, 1] (0: data, 1: noise), got {t.tolist()[:8]}; for a scheduler's "
             "0..999 timesteps pass t / 1000")
    need(len(shape(text_BLE)) == 3 and shape(text_BLE)[0] == B and shape(text_BLE)[2] == cfg.text_dim,
         f"text_BLE must be [B={B}, L, DiTConfig.text_dim={cfg.text_dim}], got {list(shape(text_BLE))}")
    # L = 0 failed inside the attention kernel ('zero-size array to reduction operation max')
    need(shape(text_BLE)[1] >= 1, "text_BLE has no caption tokens (L = 0); pass at least one, e.g. a padding token "
         "with text_valid_BL False: an all-padding caption adds nothing")
    need(text_valid_BL is not None and shape(text_valid_BL) == shape(text_BLE)[:2],
         f"text_valid_BL must be a [B, L]={list(shape(text_BLE)[:2])} mask of the caption tokens, got "
         f"{None if text_valid_BL is None else list(shape(text_valid_BL))}")
    # a float 1 / 0 mask reached `attention`, whose fix for an additive bias (`bias == 0`) would invert this one
    dt = jnp.result_type(text_valid_BL)
    need(dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer),
         f"text_valid_BL must be a bool mask (True = a caption token, False = padding), got {dt}; pass "
         "text_valid_BL > 0")
    need(pooled_BE is None or shape(pooled_BE) == (B, cfg.text_dim),
         f"pooled_BE must be [B={B}, DiTConfig.text_dim={cfg.text_dim}], got {list(shape(pooled_BE))}")


class VideoDiT(nnx.Module):
    """`pred_BTHWC = dit(x_BTHWC, t_B, text_BLE, text_valid_BL, pooled_BE)`: the prediction (velocity, ε
    or v) for noisy latents x at times t in [0, 1], conditioned on caption tokens (and their mean)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p, pd, std = cfg.d_model, cfg.patch_dim, dtype_of(cfg.param_dtype), cfg.init_std
        with nnx.use_eager_sharding(False):
            self.patch_embed = param(rngs, (p, d), ("patch", "embed"), pd, std)
            self.patch_bias = param(rngs, (d,), ("embed",), pd, ZERO)
            self.time_w1 = param(rngs, (cfg.time_freq_dim, d), ("embed", "mlp"), pd, std)  # FSDP splits it
            self.time_b1 = param(rngs, (d,), ("mlp",), pd, ZERO)
            self.time_w2 = param(rngs, (d, d), ("mlp", "embed"), pd, std)
            self.time_b2 = param(rngs, (d,), ("embed",), pd, ZERO)
            if cfg.pooled_text:
                self.text_proj = param(rngs, (cfg.text_dim, d), (None, "embed"), pd, std)
                self.text_bias = param(rngs, (d,), ("embed",), pd, ZERO)

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return DiTBlock(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
            self.final_ada = param(rngs, (d, 2 * d), ("embed", "modulation"), pd, ZERO)
            self.final_ada_bias = param(rngs, (2 * d,), ("modulation",), pd, ZERO)
            self.out = param(rngs, (d, p), ("embed", "patch"), pd, ZERO)
            self.out_bias = param(rngs, (p,), ("patch",), pd, ZERO)

    def condition(self, t_B, pooled_BE=None):
        """c [B, D] = MLP(sinusoid(t)) (+ projected pooled caption)."""
        # biases as [1, D] here and in the blocks: a rank promotion is an error under jax_numpy_rank_promotion='raise'
        cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
        f = timestep_embedding(t_B, cfg.time_freq_dim).astype(cd)
        c = jax.nn.silu(matmul(f, self.time_w1, cd) + self.time_b1[...].astype(cd)[None])
        c = matmul(c, self.time_w2, cd) + self.time_b2[...].astype(cd)[None]
        if cfg.pooled_text:
            if pooled_BE is None:
                raise ValueError("this DiT has pooled_text=True: pass the pooled caption embedding")
            c = c + matmul(pooled_BE, self.text_proj, cd) + self.text_bias[...].astype(cd)[None]
        return c

    def __call__(self, x_BTHWC, t_B, text_BLE, text_valid_BL, pooled_BE=None):
        cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
        if tuple(x_BTHWC.shape[1:]) != (*cfg.latent_shape, cfg.latent_channels):
            raise ValueError(f"latents of shape {x_BTHWC.shape[1:]} do not match DiTConfig.latent_shape="
                             f"{cfg.latent_shape}, latent_channels={cfg.latent_channels}")
        _check_conditioning(cfg, x_BTHWC.shape[0], t_B, text_BLE, text_valid_BL, pooled_BE)
        _check_token_split(cfg)
        x_BSP = patchify(x_BTHWC.astype(cd), cfg.patch)
        B, S, P = x_BSP.shape
        x_BSD = add_bias(matmul(x_BSP, self.patch_embed, cd), self.patch_bias[...])  # bias grads: float32 sums
        x_BSD = constrain(x_BSD, ("batch", "act_seq", "act_embed"))
        c_BD = self.condition(t_B, pooled_BE)
        x_BSD = self._run_blocks(x_BSD, _Ctx(cfg, c_BD, text_BLE.astype(cd), text_valid_BL))

        shift, scale = jnp.split(matmul(jax.nn.silu(c_BD), self.final_ada, cd)
                                 + self.final_ada_bias[...].astype(cd)[None], 2, axis=-1)
        h = modulate(plain_norm(x_BSD, cfg.norm_eps), shift, scale)
        out_BSP = add_bias(matmul(h, self.out, cd), self.out_bias[...])
        return unpatchify(out_BSP, cfg.patch, cfg.grid, cfg.latent_channels).astype(jnp.float32)

    def _run_blocks(self, x_BSD, ctx: _Ctx):
        graphdef, state = nnx.split(self.blocks)

        def layer(x, st, c_BD, text_BLE):  # the conditioning as arguments: bits_residuals differentiates those only
            # the carry's layout stated at entry: without it XLA's partitioner mixed rows across devices inside the
            # scan on {data: 2, fsdp: 2, tensor: 2} at one row per device (tests/test_video_sharding.py)
            x = constrain(x, ("batch", "act_seq", "act_embed"))
            return nnx.merge(graphdef, st)(x, dataclasses.replace(ctx, c_BD=c_BD, text_BLE=text_BLE)), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            packed = bits_residuals(layer, self.cfg.dtype)  # bf16 on CPU: see models.residuals
            return jax.lax.scan(lambda x, st: packed(x, st, ctx.c_BD, ctx.text_BLE), x_BSD, state)[0]
        for i in range(self.cfg.n_layers):
            x_BSD = layer(x_BSD, jax.tree.map(lambda a, i=i: a[i], state), ctx.c_BD, ctx.text_BLE)[0]
        return x_BSD
