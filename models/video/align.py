"""Cross-modal alignment: a video–text dual encoder trained with symmetric InfoNCE.

The video tower is a small Transformer over clean latent patches (full 3D attention with 3D RoPE,
mean-pooled); the text side projects the text encoder's pooled caption. Trained jointly with the DiT,
its gradient shapes the shared text encoder towards what is visible in the clips; afterwards the same
dual encoder is a retrieval metric (R@1: does a clip's embedding pick its own caption among all captions).

The video tower never sees the caption, unlike the DiT's hidden states, which would make the loss trivial.

Shapes: B batch, T/H/W/C latents, S tokens, D tower width, E text width, J joint embedding, K captions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.params import param
from models.transformer import rms_norm
from models.video.config import AlignConfig, DiTConfig, default_rope_split
from models.video.dit import _check_token_split
from models.video.layers import SelfAttention, SwiGLU, matmul, patchify
from parallel.autodiff import custom_vjp
from parallel.rules import constrain


class EncoderBlock(nnx.Module):
    """Pre-norm Transformer block over the spacetime token grid (no conditioning)."""

    def __init__(self, cfg: AlignConfig, *, rngs):
        d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
        self.norm1 = param(rngs, (d,), ("norm",), jnp.float32)
        self.attn = SelfAttention(d, cfg.n_heads, hd, qk_norm=True, std=0.02, dtype=jnp.float32, rngs=rngs)
        self.norm2 = param(rngs, (d,), ("norm",), jnp.float32)
        self.mlp = SwiGLU(d, cfg.mlp_dim, std=0.02, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x_BSD, grid, rope_split):
        h = rms_norm(x_BSD, self.norm1[...], 1e-6)
        x_BSD = x_BSD + self.attn(h, grid, "full", rope_split=rope_split, rope_theta=100.0, cd=jnp.float32)
        x_BSD = x_BSD + self.mlp(rms_norm(x_BSD, self.norm2[...], 1e-6), jnp.float32)
        return constrain(x_BSD, ("batch", "act_seq", "act_embed"))


class Aligner(nnx.Module):
    """`video_emb_BJ = aligner.embed_video(latents)`, `text_emb_BJ = aligner.embed_text(pooled_BE)`: unit
    vectors; `aligner.logit_scale()` is exp(learned log-scale), capped at max_logit_scale."""

    def __init__(self, cfg: AlignConfig, dit: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg, self.dit = cfg, dit
        d, j = cfg.d_model, cfg.embed_dim
        self.rope_split = default_rope_split(d // cfg.n_heads)
        with nnx.use_eager_sharding(False):
            self.patch_embed = param(rngs, (dit.patch_dim, d), ("patch", "embed"), jnp.float32, 0.02)
            self.patch_bias = param(rngs, (d,), ("embed",), jnp.float32, 0.0)
            self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
            self.final_norm = param(rngs, (d,), ("norm",), jnp.float32)
            self.video_proj = param(rngs, (d, j), ("embed", None), jnp.float32, d ** -0.5)
            self.text_proj = param(rngs, (dit.text_dim, j), (None, None), jnp.float32, dit.text_dim ** -0.5)
            self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / cfg.init_temperature), jnp.float32))

    def embed_video(self, z_BTHWC):
        """Latent video [B, T, H, W, C] → unit-norm joint embedding [B, J] (patchify, encoder blocks, mean pool)."""
        # tokens are placed by the DiT's grid: latents of another shape with as many tokens were embedded silently
        # with every token at another position (other shapes failed inside RoPE or a dot)
        want = (*self.dit.latent_shape, self.dit.latent_channels)
        if jnp.ndim(z_BTHWC) != 5 or tuple(z_BTHWC.shape[1:]) != want:
            raise ValueError(f"Aligner.embed_video: latents must be [B, T, H, W, C] with (T, H, W) = "
                             f"DiTConfig.latent_shape={self.dit.latent_shape} and C = latent_channels="
                             f"{self.dit.latent_channels}, got {list(jnp.shape(z_BTHWC))}")
        # the tokens split over `act_seq` as the DiT's do: the rules' refusal named "a sequence length", no field here
        _check_token_split(self.dit, "Aligner.embed_video")
        p_BSP = patchify(z_BTHWC.astype(jnp.float32), self.dit.patch)
        B, S, P = p_BSP.shape
        x = matmul(p_BSP, self.patch_embed, jnp.float32) + self.patch_bias[...][None, None]  # rank_promotion='raise'
        for blk in self.blocks:
            x = blk(x, self.dit.grid, self.rope_split)
        pooled = rms_norm(x, self.final_norm[...], 1e-6).mean(1)
        return _unit(pooled @ self.video_proj[...])

    def embed_text(self, pooled_BE):
        """Pooled captions [B, E] (E = DiTConfig.text_dim, `TextOut.pooled_BE`) → unit-norm joint embedding [B, J]."""
        # another width failed as a bare dot_general TypeError; one caption [E] came back as [J], not a batch
        if jnp.ndim(pooled_BE) != 2 or jnp.shape(pooled_BE)[1] != self.dit.text_dim:
            raise ValueError(f"Aligner.embed_text: pooled_BE must be [B, E] with E = DiTConfig.text_dim="
                             f"{self.dit.text_dim} (the text encoder's pooled output, TextOut.pooled_BE), got "
                             f"{list(jnp.shape(pooled_BE))}" + (" (one caption: pooled[None])"
                                                                 if jnp.ndim(pooled_BE) == 1 else ""))
        return _unit(pooled_BE.astype(jnp.float32) @ self.text_proj[...])

    def logit_scale(self):
        return capped_exp(self.log_scale[...], self.cfg.max_logit_scale)


@custom_vjp
def capped_exp(log_scale, cap: float):
    """min(exp(log_scale), cap), whose gradient past the cap still lowers the scale when the loss asks for less.

    Plain `minimum` has a zero gradient past the cap: a log-scale that overshot it (Adam's steps are ~lr whatever
    the gradient) never came back, however much the loss wanted a lower scale. CLIP clamps the parameter after each
    step instead; this keeps the clamp inside the model. (Under `models.plain_autodiff` it is plain min(): no
    gradient past the cap.)"""
    return jnp.minimum(jnp.exp(log_scale), cap)


def _capped_exp_fwd(log_scale, cap):
    return capped_exp(log_scale, cap), (log_scale, cap)


def _capped_exp_bwd(res, g):
    log_scale, cap = res
    scale = jnp.exp(log_scale)
    # past the cap only a positive cotangent (the loss grows with the scale: descent lowers it) gets through
    d = jnp.where(scale <= cap, g * scale, jnp.maximum(g, 0.0) * cap)
    return d.astype(log_scale.dtype), jnp.zeros_like(cap)


capped_exp.defvjp(_capped_exp_fwd, _capped_exp_bwd)


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def info_nce(video_BJ, text_BJ, logit_scale, labels_B=None):
    """Symmetric InfoNCE: mean of the video→text and text→video cross-entropies over the batch.

    With `labels_B` (e.g. caption ids), every pair with equal labels is a positive and the target spreads
    evenly over them: a batch drawn from few captions holds duplicates, which are not negatives.
    video_BJ, text_BJ: [B, J] (clip i pairs with caption i); labels_B: [B] or None. Returns a scalar.
    """
    labels_B = None if labels_B is None else jnp.asarray(labels_B)  # a list failed at [:, None]: bare TypeError
    # a text of one row or labels of another shape broadcast against the batch: a loss, silently, of other pairs
    if jnp.ndim(video_BJ) != 2 or jnp.shape(text_BJ) != jnp.shape(video_BJ):
        raise ValueError(f"info_nce: video_BJ and text_BJ must be [B, J] of one shape (clip i pairs with caption i), "
                         f"got video_BJ {list(jnp.shape(video_BJ))} and text_BJ {list(jnp.shape(text_BJ))}")
    if labels_B is not None and jnp.shape(labels_B) != jnp.shape(video_BJ)[:1]:
        raise ValueError(f"info_nce: labels_B must be [B={jnp.shape(video_BJ)[0]}] (one caption id per pair) or "
                         f"None, got {list(jnp.shape(labels_B))}")
    if jnp.shape(video_BJ)[0] == 0:  # a mean over no pairs: NaN, silently
        raise ValueError("info_nce: an empty batch (B=0) has no (clip, caption) pairs; its loss would be NaN")
    if np.size(logit_scale) != 1:  # [B, 1] broadcast as a temperature per clip, silently; [B] as a bare error
        raise ValueError(f"info_nce: logit_scale must be one number (Aligner.logit_scale()), got shape "
                         f"{list(np.shape(logit_scale))}")
    # bf16 embeddings made bf16 logits and log-softmax (~1e-3 off at scale 100): float32 at least
    video_BJ, text_BJ = (jnp.asarray(x).astype(jnp.promote_types(jnp.result_type(x), jnp.float32))
                         for x in (video_BJ, text_BJ))
    logits = logit_scale * video_BJ @ text_BJ.T
    B = logits.shape[0]
    pos = jnp.eye(B, dtype=bool) if labels_B is None else labels_B[:, None] == labels_B[None, :]
    # bool / int: float64 under jax_enable_x64; bool / float32 refused under jax_numpy_dtype_promotion='strict'
    target = pos.astype(jnp.float32) / pos.sum(1, keepdims=True, dtype=jnp.float32)
    v2t = -(target * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
    t2v = -(target.T * jax.nn.log_softmax(logits, axis=0)).sum(0).mean()
    return 0.5 * (v2t + t2v)


def nearest_caption(video_BJ, captions_KJ):
    """Index of each clip's most similar caption [B] (of K candidates [K, J]), or -1 where another caption is as
    similar: argmax broke a tie towards the lowest index, so a collapsed text tower (every caption one embedding)
    'retrieved' caption 0 for every clip, a hit for each clip of caption 0."""
    sims_BK = video_BJ @ captions_KJ.T
    best_B = jnp.argmax(sims_BK, axis=1)
    tied_B = (sims_BK == sims_BK.max(1, keepdims=True)).sum(1) > 1
    return jnp.where(tied_B, -1, best_B)


def recall_at_1(video_BJ, captions_KJ, target_B):
    """Fraction of clips whose most similar caption (of K candidates) is their own (index target_B), alone: a tie for
    the top is a miss (`nearest_caption`). video_BJ [B, J], captions_KJ [K, J], target_B [B] ints in [0, K). Returns
    a scalar."""
    target_B = jnp.asarray(target_B)  # a list passed the checks, then failed at == as a bare TypeError
    B = jnp.shape(video_BJ)[0]
    if jnp.shape(target_B) != (B,):  # [B, 1] compared every clip with every target; length 1 broadcast
        raise ValueError(f"recall_at_1: target_B must be [B={B}] (each clip's caption index), "
                         f"got {list(jnp.shape(target_B))}")
    if jnp.ndim(captions_KJ) != 2 or jnp.shape(captions_KJ)[1] != jnp.shape(video_BJ)[1]:  # a bare dot_general error
        raise ValueError(f"recall_at_1: captions_KJ must be [K, J={jnp.shape(video_BJ)[1]}] (the candidates, embedded "
                         f"like video_BJ), got {list(jnp.shape(captions_KJ))}")
    if B == 0:  # a mean over no clips: NaN, silently
        raise ValueError("recall_at_1: an empty batch (B=0) has no clips to retrieve for; its recall would be NaN")
    K = jnp.shape(captions_KJ)[0]
    # a target outside [0, K) (a 1-based caption id, a -1) matched no caption: a miss, counted silently
    if not isinstance(target_B, jax.core.Tracer) and not 0 <= np.min(target_B) <= np.max(target_B) < K:
        raise ValueError(f"recall_at_1: target_B must hold caption indices in [0, K={K}), got min "
                         f"{np.min(target_B)}, max {np.max(target_B)}")
    return jnp.mean(nearest_caption(video_BJ, captions_KJ) == target_B)
