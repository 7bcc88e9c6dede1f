"""Text-to-video in latent space: text encoder + DiT (+ alignment dual encoder), its loss and its sampler.

Used functionally like the LM: `graphdef, params = nnx.split(TextToVideo(cfg, rngs=...))` (or
`parallel.create_sharded`), then `t2v_loss(nnx.merge(graphdef, params), batch, key, null_L)` under
`jax.jit`. Latents are the VAE posterior means, normalised per channel (`models.video.vae.normalize`).

Shapes: B batch, L caption tokens, T/H/W/C latents.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.generate import _on_devices_of
from models.keys import key_error
from models.transformer import check_token_ids
from models.video.align import Aligner, info_nce
from models.video.config import TextToVideoConfig
from models.video.diffusion import diffusion_loss, guided, sample
from models.video.dit import VideoDiT
from models.video.text import TextEncoder, TextOut, caption_dropout


class TextToVideo(nnx.Module):
    """Text encoder + video DiT (+ the text–video aligner when cfg.align is set), trained by `t2v_loss` on VAE
    latents; `predict` is the DiT under encoded captions."""

    def __init__(self, cfg: TextToVideoConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with nnx.use_eager_sharding(False):
            self.text = TextEncoder(cfg.text, rngs=rngs)
            self.dit = VideoDiT(cfg.dit, rngs=rngs)
            if cfg.align is not None:
                self.align = Aligner(cfg.align, cfg.dit, rngs=rngs)

    def predict(self, x_BTHWC, t_B, text: TextOut):
        """The DiT's prediction for noisy latents x at times t under encoded captions `text`."""
        return self.dit(x_BTHWC, t_B, text.tokens_BLE, text.valid_BL, text.pooled_BE)


def _check_key_and_null(key, null_L, where: str, tokens_BL, vocab_size: int) -> None:
    """The two orders differ (`t2v_loss(..., key, null_L)`, `generate(..., null_L, key)`): a swap is named here,
    not deep inside jax.random or the text encoder; so are captions that are not a batch [B, L], a null caption
    of another length L (broadcasting errors inside jax before) and one with ids outside the text vocabulary."""
    # one key: typed, or raw data of the default PRNG (uint32[4] under rbg); a batch or another PRNG's raw data
    # is named as such, not as a swap
    if (why := key_error(key, "; were key and null_L swapped?")) is not None:
        raise TypeError(f"{where}: key must be a PRNG key (jax.random.key(0)), {why}")
    # np.ndim / np.shape: they read lists of ids (as generate takes them) without jax's deprecation of list inputs
    if not jnp.issubdtype(getattr(null_L, "dtype", jnp.asarray(null_L).dtype), jnp.integer) or np.ndim(null_L) != 1:
        raise TypeError(f"{where}: null_L must be the null caption's token ids [L] (data.moving_shapes.null_tokens), "
                        f"got {getattr(null_L, 'dtype', type(null_L).__name__)}{list(np.shape(null_L))}")
    # under jit the text encoder cannot check the ids it embeds, and an id past the vocabulary embeds as NaN: every
    # dropped caption (and every guided sample) was NaN; the null caption is usually a constant, checked here
    check_token_ids(null_L, vocab_size, f"{where}: null_L (the null caption)")
    if np.ndim(tokens_BL) != 2:
        raise ValueError(f"{where}: captions must be a batch of token ids [B, L], got shape "
                         f"{list(np.shape(tokens_BL))}; one caption is tokens[None]")
    if np.shape(null_L)[0] != np.shape(tokens_BL)[1]:
        n = np.shape(null_L)[0]
        raise ValueError(f"{where}: null_L has {n} token{'s' * (n != 1)}, the captions {np.shape(tokens_BL)[1]}; pad "
                         "both to one length, e.g. null_tokens(max_caption_len)")


def t2v_loss(model: TextToVideo, batch: dict, key, null_L):
    """batch: {"latents" [B, T, H, W, C] (normalised), "tokens" [B, L], optional "caption_id" [B]}.

    Diffusion loss on captions dropped to `null_L` with probability cfg.caption_dropout, plus
    align_weight × InfoNCE between the clean latents and the undropped captions. Returns (loss, metrics).
    """
    # a missing key was a bare KeyError, and a misspelled 'caption_id' was ignored: duplicate captions then counted
    # as each other's negatives in the alignment loss, silently
    missing = [k for k in ("latents", "tokens") if not hasattr(batch, "get") or k not in batch]
    known = ("latents", "tokens", "caption_id")
    unknown = [] if missing else sorted(str(k) for k in batch.keys() if k not in known)
    if missing or unknown:
        got = sorted(map(str, batch.keys())) if hasattr(batch, "keys") else type(batch).__name__
        raise ValueError(f"t2v_loss: batch must be a dict with 'latents' [B, T, H, W, C] and 'tokens' [B, L] and, "
                         f"optionally, 'caption_id' [B]; got {got}")
    # onto the model's devices first, as generate: an eager call inside jax.set_mesh failed the checks' reads (the ids'
    # range) of a batch committed to one device with jax's "incompatible devices ... _reduce_min"
    *values, key, null_L = _on_devices_of(nnx.state(model), *batch.values(), key, null_L)
    batch = dict(zip(batch.keys(), values))
    _check_key_and_null(key, null_L, "t2v_loss(model, batch, key, null_L)", batch["tokens"],
                        model.cfg.text.vocab_size)
    cfg = model.cfg
    k_drop, k_diff = jax.random.split(key)
    tokens = batch["tokens"]
    B = tokens.shape[0]
    # clips and captions of other batch sizes were named as the DiT's internal text_BLE, and caption ids of another
    # shape as info_nce's labels_B: neither is a key of the batch
    lat, ids = np.shape(batch["latents"]), batch.get("caption_id")
    if lat[:1] != (B,):
        raise ValueError(f"t2v_loss: batch['latents'] {list(lat)} and batch['tokens'] {list(np.shape(tokens))} must "
                         f"have one batch size B (one clip per caption)")
    if B == 0:  # failed inside diffusion_loss as a bare 'ZeroDivisionError: integer modulo by zero'
        raise ValueError("t2v_loss: an empty batch (B = 0) has no clips; pass at least one (clip, caption) pair")
    if ids is not None and np.shape(ids) != (B,):
        raise ValueError(f"t2v_loss: batch['caption_id'] must be [B={B}] (one caption id per clip) or absent, got "
                         f"{list(np.shape(ids))}")
    dropped = caption_dropout(tokens, null_L, k_drop, cfg.caption_dropout)
    both = model.text(jnp.concatenate([dropped, tokens]))  # one pass for the DiT's and the aligner's captions
    text_dit = jax.tree.map(lambda a: a[:B], both)
    loss, _, _ = diffusion_loss(lambda x, t: model.predict(x, t, text_dit), batch["latents"], k_diff, cfg.diffusion)
    metrics = {"diffusion": loss}
    if cfg.align is not None:
        video = model.align.embed_video(batch["latents"])
        text = model.align.embed_text(both.pooled_BE[B:])
        align = info_nce(video, text, model.align.logit_scale(), batch.get("caption_id"))
        loss = loss + cfg.align_weight * align
        metrics |= {"align": align, "logit_scale": model.align.logit_scale()}
    metrics["loss"] = loss
    return loss, metrics


def generate(model: TextToVideo, tokens_BL, null_L, key, cfg_scale: float = 1.0, steps: int | None = None):
    """Sample normalised latents [B, T, H, W, C] for captions `tokens_BL` with classifier-free guidance
    `cfg_scale` against the null caption `null_L` (Euler for flow models, DDIM for DDPM ones)."""
    # onto the model's devices first, as models.generate: inside jax.set_mesh the checks' eager reads (the ids'
    # range) of captions committed to one device failed with jax's "incompatible devices ... _reduce_min"
    tokens_BL, null_L, key = _on_devices_of(nnx.state(model), tokens_BL, null_L, key)
    _check_key_and_null(key, null_L, "generate(model, tokens_BL, null_L, key)", tokens_BL, model.cfg.text.vocab_size)
    concrete = not isinstance(cfg_scale, jax.core.Tracer) and np.ndim(cfg_scale) == 0  # a number or a 0-d array
    if concrete and not math.isfinite(float(cfg_scale)):  # NaN latents (all-black videos), silently, otherwise
        raise ValueError(f"generate: cfg_scale={cfg_scale} must be a finite number (1.0: no guidance)")
    cfg = model.cfg
    tokens_BL = check_token_ids(tokens_BL, cfg.text.vocab_size, "generate: tokens_BL")  # a list failed at `.shape`
    B = tokens_BL.shape[0]
    cond = model.text(tokens_BL)
    uncond = model.text(jnp.broadcast_to(jnp.asarray(null_L, tokens_BL.dtype), tokens_BL.shape))
    pred = guided(lambda x, t, text: model.predict(x, t, text), cond, uncond, cfg_scale)
    noise = jax.random.normal(key, (B, *cfg.dit.latent_shape, cfg.dit.latent_channels), jnp.float32)
    return sample(pred, noise, cfg.diffusion, steps)
