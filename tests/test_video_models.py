"""Video models: shapes and dtypes, causality of the VAE, adaLN-Zero identity, factorized == full at
T = 1, windowed spacetime attention vs a dense reference, the text encoder, and the configs' accounting."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.attention import reference_attention
from models.config import TransformerConfig
from models.video import (
    AlignConfig,
    Aligner,
    DiffusionConfig,
    DiTBlock,
    DiTConfig,
    TextEncoder,
    TextToVideoConfig,
    VAEConfig,
    VideoDiT,
    VideoVAE,
    caption_dropout,
)
from models.video.dit import _Ctx
from models.video.layers import CrossAttention, grid_positions, modulate, patchify, spacetime_attention
from tests.test_custom_vjps import check_forward_mode

DIT = DiTConfig(latent_shape=(3, 8, 8), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=2, n_heads=2,
                mlp_dim=64, text_dim=16)
TEXT = TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=8)
VAE = VAEConfig(channels=(8, 16, 16), latent_channels=4)


def randomize(model, seed=0, scale=0.1):
    """Perturb every parameter (zero-initialised gates, ones-initialised norms) so nothing hides behind 0 and 1."""
    leaves, tdef = jax.tree.flatten(nnx.state(model))
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(tdef, [x + scale * rng.standard_normal(x.shape).astype(x.dtype)
                                                for x in leaves]))
    return model


def text_inputs(B, L=6, E=16, seed=1):
    text = jax.random.normal(jax.random.key(seed), (B, L, E))
    valid = jnp.arange(L)[None].repeat(B, 0) < jnp.asarray([L, 3])[:B, None]  # second caption padded
    return text, valid, text.mean(1)


def dit_apply(model, x, t):
    text, valid, pooled = text_inputs(x.shape[0], E=model.cfg.text_dim)
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t, text, valid, pooled))(state, x, t)


def host_random(make, scale=0.1, seed=0):
    """make()'s module with every parameter drawn on the host from N(0, scale²): no initialiser compiled (eagerly each
    of its ops compiles on its own: seconds for a TextToVideo), for tests that need values, not the initial ones."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda v: jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype),
                                            abstract))


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---- shapes, dtypes, accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,frames,size,latent", [
    (VAE, 9, 16, (3, 4, 4, 4)),
    (dataclasses.replace(VAE, spatial_factor=8), 9, 16, (3, 2, 2, 4)),
    (dataclasses.replace(VAE, channels=(8, 16), temporal_factor=2, spatial_factor=4), 5, 16, (3, 4, 4, 4)),
])
def test_vae_shapes_dtypes_and_param_count(cfg, frames, size, latent):
    vae = VideoVAE(cfg, rngs=nnx.Rngs(0))
    assert n_params(vae) == cfg.param_count()
    assert cfg.latent_shape(frames, size, size) == latent
    x = jax.random.uniform(jax.random.key(0), (2, frames, size, size, 3), minval=-1, maxval=1)
    graphdef, state = nnx.split(vae)
    mean, logvar, recon = jax.jit(lambda s, x: (lambda m: (*m.encode(x), m.decode(m.encode(x)[0])))(
        nnx.merge(graphdef, s)))(state, x)
    assert mean.shape == logvar.shape == (2, *latent) and mean.dtype == jnp.float32
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    with pytest.raises(ValueError, match="temporal_factor"):
        vae.encode(x[:, :-1])
    # channels first, one clip without its batch, 8-bit frames, latents of the wrong width: named, not a reshape
    # error or a frame count blamed on temporal_factor; uint8 passed as if it were in [-1, 1]
    for bad, says in ((jnp.moveaxis(x, -1, 2), r"encode: video must be \[B, T, H, W, C\] with C = VAEConfig"),
                      (x[0], r"encode: video must be \[B, T, H, W, C\]"),
                      (jnp.zeros(x.shape, jnp.uint8), "must be floats in \\[-1, 1\\], got uint8")):
        with pytest.raises(ValueError, match=says):
            vae.encode(bad)
    with pytest.raises(ValueError, match=r"decode: latents must be \[B, T, h, w, Z\] with Z = VAEConfig"):
        vae.decode(mean[..., :-1])


@pytest.mark.parametrize("attention,dtype", [("factorized", "float32"), ("full", "float32"),
                                             ("factorized", "bfloat16")])
def test_dit_shapes_dtypes_and_param_count(attention, dtype):
    cfg = dataclasses.replace(DIT, attention=attention, dtype=dtype)
    model = randomize(VideoDiT(cfg, rngs=nnx.Rngs(0)))
    assert n_params(model) == cfg.param_count()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    out = dit_apply(model, x, jnp.asarray([0.1, 0.9]))
    assert out.shape == x.shape and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    text, valid, pooled = text_inputs(2, E=cfg.text_dim)
    t = jnp.asarray([0.1, 0.9])
    for args, says in (((x, 0.5, text, valid, pooled), r"t_B must be float times .*=\(2,\), got float32\[\]"),
                       ((x, jnp.asarray([500, 500]), text, valid, pooled), r"got int32\[2\]"),
                       # the same timesteps as floats ran: an embedding of 1000·t, arbitrary predictions
                       ((x, jnp.asarray([500.0, 0.5]), text, valid, pooled), r"t_B must be .* \[0, 1\].*t / 1000"),
                       ((x, t, text[:1], valid, pooled), r"text_BLE must be \[B=2, L, DiTConfig.text_dim"),
                       ((x, t, text, None, pooled), "text_valid_BL must be a \\[B, L\\]"),
                       ((x, t, text, valid, pooled[:, :8]), r"pooled_BE must be \[B=2, DiTConfig.text_dim")):
        with pytest.raises(ValueError, match=says):  # each was a broadcast / reshape error naming no argument
            model(*args)
    if dtype == "bfloat16":  # bf16 compute stays close to the float32 model with the same weights
        ref = dit_apply(nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: VideoDiT(DIT, rngs=nnx.Rngs(0)))),
                                  nnx.state(model)), x,
                        jnp.asarray([0.1, 0.9]))
        assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 1e-2


def test_dit_names_a_float_caption_mask_without_offering_an_inverting_fix():
    """A 1.0 / 0.0 caption mask reached `attention`, whose message (an additive bias: pass `bias == 0`) would have
    inverted it; integer masks keep working."""
    cfg = dataclasses.replace(DIT, latent_shape=(1, 2, 2), patch=(1, 1, 1), n_layers=1)
    # random weights: at init the zero output layer gives 0 whatever the mask
    model = host_random(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))
    x, t = jnp.zeros((1, 1, 2, 2, 4)), jnp.asarray([0.5])
    text, valid, pooled = text_inputs(1, E=cfg.text_dim)
    with pytest.raises(ValueError, match=r"text_valid_BL must be a bool mask .*got float32.*text_valid_BL > 0"):
        model(x, t, text, valid.astype(jnp.float32), pooled)
    run = jax.jit(lambda v: model(x, t, text, v, pooled))  # (eagerly each op compiles on its own)
    assert float(jnp.abs(run(valid)).max()) > 0
    np.testing.assert_array_equal(run(valid.astype(jnp.int32)), run(valid))
    with pytest.raises(ValueError, match=r"text_BLE has no caption tokens \(L = 0\); pass at least one"):
        model(x, t, text[:, :0], valid[:, :0], pooled)

@pytest.mark.parametrize("changes", [dict(), dict(attention="full"), dict(pooled_text=False, qk_norm=False),
                                     dict(patch=(3, 2, 2), head_dim=24)])
def test_t2v_param_count_matches_modules(changes):
    from models.video import TextToVideo

    cfg = TextToVideoConfig(dit=dataclasses.replace(DIT, **changes), text=TEXT,
                            align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
    model = nnx.eval_shape(lambda: TextToVideo(cfg, rngs=nnx.Rngs(0)))
    assert n_params(model) == cfg.param_count()


def test_t2v_loss_and_generate_name_a_swapped_key_and_null_caption():
    """t2v_loss takes (key, null_L), generate (null_L, key): the swap is named before jax.random sees tokens."""
    from models.video import TextToVideo, generate, t2v_loss

    model = nnx.eval_shape(lambda: TextToVideo(TextToVideoConfig(dit=DIT, text=TEXT), rngs=nnx.Rngs(0)))
    null, key, tok = jnp.zeros((8,), jnp.int32), jax.random.key(0), jnp.ones((2, 8), jnp.int32)
    batch = {"tokens": tok, "latents": jnp.zeros((2, *DIT.latent_shape, DIT.latent_channels))}
    with pytest.raises(TypeError, match=r"t2v_loss\(model, batch, key, null_L\): key must be a PRNG key .*swapped"):
        t2v_loss(model, batch, null, key)
    with pytest.raises(TypeError, match=r"generate\(model, tokens_BL, null_L, key\): key must be .*swapped"):
        generate(model, tok, key, null)
    with pytest.raises(TypeError, match="null_L must be the null caption's token ids"):
        generate(model, tok, jnp.zeros((8,)), jax.random.PRNGKey(0))  # a raw uint32 key passes; float tokens do not
    # a null caption of another length, one caption without its batch dim: jax broadcasting errors before
    with pytest.raises(ValueError, match=r"null_L has 6 tokens, the captions 8; .*null_tokens\(max_caption_len\)"):
        t2v_loss(model, batch, key, null[:6])
    with pytest.raises(ValueError, match=r"generate\(.*captions must be a batch of token ids \[B, L\], got shape \[8"):
        generate(model, tok[0], null, key)
    with pytest.raises(ValueError, match=r"TextEncoder: tokens must be a batch \[B, L\]"):
        model.text(tok[0])
    for bad in (float("nan"), float("inf"), jnp.float32("nan"), np.float32("inf")):  # NaN latents, silently
        with pytest.raises(ValueError, match=r"cfg_scale=(nan|inf) must be a finite number"):
            generate(model, tok, null, key, cfg_scale=bad)


def test_t2v_loss_names_the_batch_key_whose_batch_size_differs():
    """Clips and captions of other batch sizes were named as the DiT's internal `text_BLE` (either way round), and
    caption ids of another shape as info_nce's `labels_B`: neither is a key of the batch the caller passed."""
    from models.video import TextToVideo, t2v_loss

    cfg = TextToVideoConfig(dit=DIT, text=TEXT, align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
    model = nnx.eval_shape(lambda: TextToVideo(cfg, rngs=nnx.Rngs(0)))
    null, key, tok = jnp.zeros((8,), jnp.int32), jax.random.key(0), jnp.ones((3, 8), jnp.int32)
    for B in (2, 4):
        batch = {"tokens": tok, "latents": jnp.zeros((B, *DIT.latent_shape, DIT.latent_channels))}
        with pytest.raises(ValueError, match=rf"t2v_loss: batch\['latents'\] \[{B}, 3, 8, 8, 4\] and batch\['tokens'\] "
                                             r"\[3, 8\] must have one batch size"):
            t2v_loss(model, batch, key, null)
    batch = {"tokens": tok, "latents": jnp.zeros((3, *DIT.latent_shape, DIT.latent_channels))}
    for ids in (jnp.arange(2), jnp.arange(3)[:, None]):
        with pytest.raises(ValueError, match=r"t2v_loss: batch\['caption_id'\] must be \[B=3\]"):
            t2v_loss(model, {**batch, "caption_id": ids}, key, null)


def test_t2v_loss_names_an_empty_batch():
    """A batch of no clips failed inside diffusion_loss as a bare 'ZeroDivisionError: integer modulo by zero' (a
    reshape of 0 rows); the alignment loss alone would have been NaN."""
    from models.video import TextToVideo, t2v_loss

    cfg = TextToVideoConfig(dit=DIT, text=TEXT, align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
    model = nnx.eval_shape(lambda: TextToVideo(cfg, rngs=nnx.Rngs(0)))
    batch = {"tokens": jnp.ones((0, 8), jnp.int32), "latents": jnp.zeros((0, *DIT.latent_shape, DIT.latent_channels))}
    with pytest.raises(ValueError, match=r"t2v_loss: an empty batch \(B = 0\)"):
        t2v_loss(model, batch, jax.random.key(0), jnp.zeros((8,), jnp.int32))


def test_t2v_loss_names_a_batch_key_that_is_missing_or_misspelled():
    """A missing 'latents' or 'tokens' was a bare KeyError; a misspelled 'caption_ids' was ignored, so captions shared
    by several clips counted as each other's negatives in the alignment loss, silently."""
    from models.video import TextToVideo, t2v_loss

    cfg = TextToVideoConfig(dit=DIT, text=TEXT, align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
    model = nnx.eval_shape(lambda: TextToVideo(cfg, rngs=nnx.Rngs(0)))
    null, key, tok = jnp.zeros((8,), jnp.int32), jax.random.key(0), jnp.ones((3, 8), jnp.int32)
    lat = jnp.zeros((3, *DIT.latent_shape, DIT.latent_channels))
    for batch, got in (({"latents": lat}, r"\['latents'\]"), ({"tokens": tok}, r"\['tokens'\]"),
                       ({"latents": lat, "tokens": tok, "caption_ids": jnp.arange(3)},
                        r"\['caption_ids', 'latents', 'tokens'\]"), ((lat, tok), "tuple")):
        with pytest.raises(ValueError, match=r"t2v_loss: batch must be a dict with 'latents' .*'caption_id' \[B\]; "
                                             rf"got {got}"):
            t2v_loss(model, batch, key, null)


def test_t2v_loss_and_generate_name_a_null_caption_outside_the_vocabulary():
    """Under jit the text encoder cannot check the ids it embeds: a null caption with an id past the vocabulary
    embedded as NaN, so every dropped caption gave a NaN loss and every guided sample NaN latents, silently. The
    null caption is a constant (closed over, as train_video's), checked at trace time; eagerly the error named the
    captions ('tokens'), not null_L."""
    from models.video import TextToVideo, generate, t2v_loss

    model = nnx.eval_shape(lambda: TextToVideo(TextToVideoConfig(dit=DIT, text=TEXT), rngs=nnx.Rngs(0)))
    key, tok = jax.random.key(0), jnp.ones((2, 8), jnp.int32)
    batch = {"tokens": tok, "latents": jnp.zeros((2, *DIT.latent_shape, DIT.latent_channels))}
    for bad in (np.array([TEXT.vocab_size] + [0] * 7, np.int32), np.array([1, -1] + [0] * 6)):
        with pytest.raises(ValueError, match=r"t2v_loss\(.*\): null_L \(the null caption\) must hold token ids in "
                                             r"\[0, vocab_size=16\)"):
            jax.jit(lambda b, bad=bad: t2v_loss(model, b, key, bad)[0])(batch)
        with pytest.raises(ValueError, match=r"generate\(.*\): null_L \(the null caption\) must hold token ids"):
            jax.jit(lambda t, bad=bad: generate(model, t, bad, key, 2.0, steps=1))(tok)


def test_t2v_takes_raw_keys_of_the_default_prng_and_names_other_keys():
    """jax.random.PRNGKey is uint32[4] under jax_default_prng_impl='rbg': it was refused as 'were key and null_L
    swapped?', as were an rbg key's raw data under threefry and a batch of raw keys (not swaps: the fix is another)."""
    from models.video import TextToVideo, generate, t2v_loss

    # the keys' path (noise, timesteps, caption dropout) is the model's whatever its size: a one-layer DiT of 4
    # tokens, full attention (its 4 programs, one per key kind, compile in a fraction of DIT's time), random weights
    # (no initialiser compiled; and not the zero output layer, under which the DiT's prediction ignores its inputs)
    dit = dataclasses.replace(DIT, latent_shape=(1, 2, 2), patch=(1, 1, 1), n_layers=1, attention="full")
    model = host_random(lambda: TextToVideo(TextToVideoConfig(dit=dit, text=TEXT), rngs=nnx.Rngs(0)))
    null, tok = jnp.zeros((8,), jnp.int32), jnp.ones((2, 8), jnp.int32)
    batch = {"tokens": tok, "latents": jnp.zeros((2, *dit.latent_shape, dit.latent_channels))}
    with jax.default_prng_impl("rbg"):  # jitted (eagerly the models' ops compile one by one): each key kind traced
        gen = jax.jit(lambda key: generate(model, tok, null, key, steps=1))
        loss = jax.jit(lambda key: t2v_loss(model, batch, key, null)[0])
        np.testing.assert_array_equal(gen(jax.random.PRNGKey(3)), gen(jax.random.key(3)))
        assert loss(jax.random.PRNGKey(3)) == loss(jax.random.key(3))
    raw_rbg = jax.random.key_data(jax.random.key(3, impl="rbg"))
    with pytest.raises(TypeError, match=r"t2v_loss\(.*key .*uint32\[4\], .*wrap_key_data\(data, impl=\.\.\.\) .*'rbg'"):
        t2v_loss(model, batch, raw_rbg, null)
    raw_batch = jax.random.key_data(jax.random.split(jax.random.key(0)))
    for bad in (raw_batch, jax.random.split(jax.random.key(0))):  # a typed batch failed inside jax.random
        with pytest.raises(TypeError, match=r"generate\(.*key .*a batch of 2 (raw )?keys"):
            generate(model, tok, null, bad)


def test_t2v_drops_captions_for_the_dit_only_and_guidance_zero_is_the_null_caption():
    """t2v_loss: the DiT sees the dropped captions (here all, at caption_dropout 0.999), the aligner the real ones;
    generate at CFG scale 0 is the unconditional model, i.e. the null caption at scale 1. The DiT trained on
    undropped captions and generate guiding away from the caption both passed every test."""
    from unittest import mock

    from models.video import TextToVideo, generate, t2v_loss

    cfg = TextToVideoConfig(dit=DIT, text=TEXT, align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8),
                            caption_dropout=0.999)
    graphdef, state = nnx.split(randomize(TextToVideo(cfg, rngs=nnx.Rngs(0))))
    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]])
    null = jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0])
    batch = {"latents": jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4)), "tokens": tok}

    def run(st):
        model, seen = nnx.merge(graphdef, st), {}
        predict, embed_text = TextToVideo.predict, Aligner.embed_text

        def spy_predict(self, x, t, text):
            seen["dit"] = text.pooled_BE
            return predict(self, x, t, text)

        def spy_embed_text(self, pooled):
            seen["align"] = pooled
            return embed_text(self, pooled)

        with mock.patch.object(TextToVideo, "predict", spy_predict), mock.patch.object(Aligner, "embed_text",
                                                                                       spy_embed_text):
            t2v_loss(model, batch, jax.random.key(1), null)
        return seen, model.text(jnp.broadcast_to(null, tok.shape)).pooled_BE, model.text(tok).pooled_BE

    seen, null_pooled, tok_pooled = jax.jit(run)(state)
    assert float(jnp.abs(null_pooled - tok_pooled).max()) > 1e-2
    np.testing.assert_allclose(seen["dit"], null_pooled, atol=1e-6)
    np.testing.assert_allclose(seen["align"], tok_pooled, atol=1e-6)

    gen = jax.jit(lambda st, tok, s: generate(nnx.merge(graphdef, st), tok, null, jax.random.key(2), s, steps=2),
                  static_argnums=2)
    uncond, cond = gen(state, tok, 0.0), gen(state, tok, 1.0)
    assert float(jnp.abs(cond - uncond).max()) > 1e-3  # the caption matters
    np.testing.assert_allclose(uncond, gen(state, jnp.broadcast_to(null, tok.shape), 1.0), atol=1e-5)


# q / k norms: their scales were left out of the count (2·H per layer); OLMo 2's block: no pre-norms, [N·H] / [K·H]
@pytest.mark.parametrize("changes", [dict(), dict(qkv_bias=True, post_norms=True, n_kv_heads=1), dict(qk_norm=True),
                                     dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="all_heads",
                                          n_kv_heads=1)])
def test_text_encoder_is_the_lm_block_and_counts_its_params(changes):
    from models.transformer import Block
    from models.video.config import text_encoder_params

    cfg = dataclasses.replace(TEXT, **changes)
    enc = nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(enc.blocks, Block) and n_params(enc) == text_encoder_params(cfg)


def test_text_encoder_and_aligner_shapes():
    enc = TextEncoder(TEXT, rngs=nnx.Rngs(0))
    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    al = Aligner(AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8), DIT, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))

    @nnx.jit  # one program (eagerly each op of both towers compiles on its own)
    def run(enc, al):
        out = enc(tok)
        return out, al.embed_video(z), al.embed_text(out.pooled_BE)

    out, v, t = run(enc, al)
    assert out.tokens_BLE.shape == (2, 8, 16) and out.pooled_BE.shape == (2, 16)
    assert out.valid_BL.tolist()[1] == [True] + [False] * 7
    assert v.shape == t.shape == (2, 8)
    np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    assert float(al.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_configs_name_the_field_and_fix():
    with pytest.raises(ValueError, match=r"DiTConfig.patch: patch \(1, 3, 3\) must divide"):
        dataclasses.replace(DIT, patch=(1, 3, 3))
    with pytest.raises(ValueError, match="DiTConfig.rope_split"):
        dataclasses.replace(DIT, rope_split=(4, 4, 4))
    with pytest.raises(ValueError, match="VAEConfig.spatial_factor"):
        VAEConfig(spatial_factor=3)
    with pytest.raises(ValueError, match="VAEConfig.channels.*add stages"):
        VAEConfig(channels=(8, 16), temporal_factor=4)
    with pytest.raises(ValueError, match="DiffusionConfig.prediction"):
        DiffusionConfig(kind="flow", prediction="eps")
    # kind="ddpm" alone was refused (the default prediction was flow's 'velocity')
    assert (DiffusionConfig().prediction, DiffusionConfig(kind="ddpm").prediction) == ("velocity", "eps")
    with pytest.raises(ValueError, match=r"gives \(T, H, W, Z\): pass its \[:3\] here"):
        dataclasses.replace(DIT, latent_shape=VAE.latent_shape(5, 16, 16))
    from models.video.diffusion import ddim_sample, sample

    noise, pred = jnp.zeros((1, 2)), lambda x, t: x
    with pytest.raises(TypeError, match=r"cfg must be a DiffusionConfig, got int \(sample takes"):
        ddim_sample(pred, noise, DiffusionConfig(kind="ddpm"), 3)  # sample's order: a TypeError from '+' before
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample(pred, noise, DiffusionConfig(), 0)  # ran cfg.sample_steps silently
    with pytest.raises(ValueError, match="TextToVideoConfig.dit: dit.text_dim=64 must equal text.d_model=16"):
        TextToVideoConfig(dit=dataclasses.replace(DIT, text_dim=64), text=TEXT)
    # values that used to pass (or fail without a name) and give garbage later
    from scaling.dit import DiTShape

    for patch in ((0, 2, 2), (1, 2), (1, -2, -2)):
        with pytest.raises(ValueError, match=r"DiTConfig.patch: \(pt, ph, pw\) of ints >= 1"):
            dataclasses.replace(DIT, patch=patch)
        with pytest.raises(ValueError, match="DiTShape.patch"):
            DiTShape(latent_shape=DIT.latent_shape, latent_channels=4, d_model=32, n_layers=1, n_heads=2, mlp_dim=64,
                     patch=patch)
    for bad, match in [(lambda: dataclasses.replace(DIT, head_dim=0), "DiTConfig.head_dim: must be positive"),
                       (lambda: VAEConfig(kernel=(3, 3)), "VAEConfig.kernel"),
                       (lambda: VAEConfig(res_blocks=-1), "VAEConfig.res_blocks"),
                       (lambda: VAEConfig().latent_shape(-3, 32, 32), "VAEConfig.latent_shape"),
                       (lambda: DiffusionConfig(kind="ddpm", prediction="eps", cosine_s=-0.5), "cosine_s"),
                       # rope_theta 0 made NaN outputs; logit_std was reported as 'shift'
                       (lambda: dataclasses.replace(DIT, rope_theta=0.0), "DiTConfig.rope_theta: must be positive"),
                       (lambda: dataclasses.replace(DIT, latent_shape=(3.0, 8, 8)), "DiTConfig.latent_shape"),
                       (lambda: dataclasses.replace(DIT, norm_eps=-1e-6), "DiTConfig.norm_eps"),
                       (lambda: VAEConfig(in_channels=0), "VAEConfig.in_channels"),
                       (lambda: VAEConfig(kl_weight=-1.0), "VAEConfig.kl_weight"),
                       (lambda: DiffusionConfig(logit_std=0.0), "DiffusionConfig.logit_std"),
                       # the flow never reads the cosine schedule: a tuned one was dropped unannounced
                       (lambda: DiffusionConfig(cosine_s=0.02), "DiffusionConfig.cosine_s: .*kind='flow' ignores it"),
                       (lambda: DiffusionConfig(alpha_bar_min=1e-3), "DiffusionConfig.alpha_bar_min: .*kind='ddpm'"),
                       # non-finite (or float32-overflowing) time settings made every time NaN: a NaN run
                       (lambda: DiffusionConfig(shift=float("inf")), "DiffusionConfig.shift: must be a finite number"),
                       (lambda: DiffusionConfig(shift=1e300), "DiffusionConfig.shift"),
                       (lambda: DiffusionConfig(logit_mean=float("nan")), "DiffusionConfig.logit_mean"),
                       (lambda: DiffusionConfig(logit_std=float("inf")), "DiffusionConfig.logit_std"),
                       # a cap <= 0 was reported as 'AlignConfig.init_temperature' (the default 0.07, a fine value)
                       (lambda: AlignConfig(max_logit_scale=0.0), "AlignConfig.max_logit_scale: must be positive"),
                       (lambda: AlignConfig(max_logit_scale=-5.0), "AlignConfig.max_logit_scale: must be positive"),
                       (lambda: AlignConfig(init_temperature=0.005), r"AlignConfig.init_temperature: must be >= "
                                                                     r"1/max_logit_scale = 0.01, got 0.005")]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_align_init_temperature_at_its_bound_is_accepted():
    """init_temperature = 1 / max_logit_scale is the bound the message states ("must be >= 1/max_logit_scale"), but
    the check compared 1 / init_temperature <= max_logit_scale, which rounding breaks: 1.9, 7.3, 12.6 (120 of the
    caps 0.1, 0.2, ..., 200) refused 1/cap as "must be >= 0.526316, got 0.5263157894736842"."""
    for cap in (1.9, 7.3, 12.6, 100.0):
        assert AlignConfig(init_temperature=1 / cap, max_logit_scale=cap).init_temperature == 1 / cap
        with pytest.raises(ValueError, match="AlignConfig.init_temperature: must be >= 1/max_logit_scale"):
            AlignConfig(init_temperature=float(np.nextafter(1 / cap, 0)), max_logit_scale=cap)


def test_configs_check_each_field_against_its_type():
    """A float size (from JSON) failed deep inside JAX with no field named, a string flag ('no' is truthy) built
    the q/k norms it meant to switch off, a bool passed for an int; numbers and lists are normalised."""
    for bad, match in [(lambda: dataclasses.replace(DIT, qk_norm="no"), "DiTConfig.qk_norm: must be True or False"),
                       (lambda: dataclasses.replace(DIT, pooled_text="no"), "DiTConfig.pooled_text"),
                       (lambda: dataclasses.replace(DIT, scan_layers="false"), "DiTConfig.scan_layers"),
                       (lambda: dataclasses.replace(DIT, d_model=32.0), "DiTConfig.d_model: must be an int, got 32.0"),
                       (lambda: dataclasses.replace(DIT, n_layers=1.5), "DiTConfig.n_layers: must be an int"),
                       (lambda: dataclasses.replace(DIT, temporal_window=2.5),
                        "DiTConfig.temporal_window: must be an int or None"),
                       (lambda: DiffusionConfig(sample_steps=True), "DiffusionConfig.sample_steps: must be an int"),
                       (lambda: VAEConfig(res_blocks=1.5), "VAEConfig.res_blocks: must be an int"),
                       (lambda: VAEConfig(channels=(8.0, 8, 8)), "VAEConfig.channels: must be a tuple of ints"),
                       (lambda: VAEConfig(latent_channels=4.0), "VAEConfig.latent_channels"),
                       (lambda: AlignConfig(d_model="64"), "AlignConfig.d_model"),
                       (lambda: TextToVideoConfig(dit=DIT, text=TEXT, align_weight="0.1"),
                        "TextToVideoConfig.align_weight: must be a finite number"),
                       # nested configs as dicts (JSON): an AttributeError naming no field, or (align, diffusion)
                       # accepted and failing only once training ran
                       (lambda: TextToVideoConfig(dit=DIT, text=dataclasses.asdict(TEXT)),
                        "TextToVideoConfig.text: must be a models.TransformerConfig, got dict"),
                       (lambda: TextToVideoConfig(dit=DIT, text=TEXT, align={"d_model": 64}),
                        "TextToVideoConfig.align: must be a models.video.AlignConfig or None, got dict"),
                       (lambda: TextToVideoConfig(dit=DIT, text=TEXT, diffusion={"kind": "ddpm"}),
                        "TextToVideoConfig.diffusion: must be a models.video.DiffusionConfig, got dict"),
                       # as TransformerConfig: cuDNN's kernel takes no float32 and failed at trace time on the GPU
                       (lambda: dataclasses.replace(DIT, attn_impl="cudnn", dtype="float32"),
                        "DiTConfig.attn_impl: 'cudnn' .* takes bfloat16 or float16")]:
        with pytest.raises(ValueError, match=match):
            bad()
    ok = dataclasses.replace(DIT, latent_shape=list(DIT.latent_shape), d_model=np.int64(DIT.d_model), rope_theta=100)
    assert ok == DIT and hash(ok) == hash(DIT)  # a list made it unhashable (jit's static argument)
    assert type(ok.d_model) is int and type(ok.rope_theta) is float and type(ok.latent_shape) is tuple


def test_all_padding_caption_adds_nothing_for_every_attn_impl():
    with nnx.use_eager_sharding(False):
        cross = CrossAttention(32, 16, 2, 16, qk_norm=True, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (2, 5, 32))
    text = jax.random.normal(jax.random.key(1), (2, 4, 16))
    valid = jnp.asarray([[True, True, False, False], [False] * 4])  # row 1: an all-padding null caption
    graphdef, state = nnx.split(cross)

    @jax.jit  # both impls, full and cut captions, in one program (eagerly each op compiles on its own)
    def run(state):
        m = nnx.merge(graphdef, state)
        return {impl: (m(h, text, valid, cd=jnp.float32, impl=impl),
                       m(h[:1], text[:1, :2], jnp.ones((1, 2), bool), cd=jnp.float32, impl=impl))
                for impl in ("xla", "reference")}

    res = run(state)
    out = {impl: res[impl][0] for impl in res}
    np.testing.assert_allclose(out["xla"], out["reference"], atol=1e-6)
    assert float(jnp.abs(out["xla"][0]).max()) > 0 and float(jnp.abs(out["xla"][1]).max()) == 0
    # row 0's padding is never attended: the caption cut to its two tokens gives the same (both impls share the
    # mask, so their agreement alone could not show it)
    for impl in ("xla", "reference"):
        np.testing.assert_allclose(out[impl][:1], res[impl][1], atol=1e-6)

def test_cross_attention_gives_cudnn_a_bool_mask_for_the_int_one_the_dit_accepts(monkeypatch):
    """VideoDiT takes a 0/1 int caption mask ('xla' and 'reference' read its truthiness), but cuDNN's kernel refuses
    any non-bool mask: attn_impl='cudnn' failed on a GPU with jax's 'mask dtype should be bool, but got int32'."""
    with nnx.use_eager_sharding(False):
        cross = CrossAttention(32, 16, 2, 16, qk_norm=True, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (2, 5, 32))
    text = jax.random.normal(jax.random.key(1), (2, 4, 16))
    valid = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.int32)
    seen = []

    def fake_cudnn(q, k, v, *, mask, **kw):  # stands in for the GPU kernel: records what it was handed
        seen.append(mask.dtype)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    cross(h.astype(jnp.bfloat16), text.astype(jnp.bfloat16), valid, cd=jnp.bfloat16, impl="cudnn")
    assert seen == [jnp.dtype(bool)]
    np.testing.assert_array_equal(cross(h, text, valid, cd=jnp.float32), cross(h, text, valid > 0, cd=jnp.float32))


def test_cross_attention_names_a_float_mask_rather_than_reading_it_by_truthiness():
    """The bool cast for cuDNN read an additive bias (0 attended, -inf masked) as True where masked: the output was
    that of the inverted mask, silently; `attention` names a float mask (VideoDiT checks its own, CrossAttention alone
    did not)."""
    with nnx.use_eager_sharding(False):
        cross = CrossAttention(32, 16, 2, 16, qk_norm=True, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (2, 5, 32))
    text = jax.random.normal(jax.random.key(1), (2, 4, 16))
    bias = jnp.where(jnp.asarray([[True, True, False, False], [True, False, False, False]]), 0.0, -jnp.inf)
    with pytest.raises(ValueError, match=r"attention: mask_B1TS must be bool \(True = attend\), got float32"):
        cross(h, text, bias, cd=jnp.float32)


def test_rope_needs_a_channel_pair_per_axis():
    # head_dim 4 splits (2, 0, 2): rows would get no position and the DiT would not tell them apart
    with pytest.raises(ValueError, match=r"DiTConfig.head_dim: head_dim=4 \(d_model=8 / n_heads=2\).*head_dim >= 6"):
        dataclasses.replace(DIT, d_model=8)
    with pytest.raises(ValueError, match="DiTConfig.head_dim: head_dim=5"):
        dataclasses.replace(DIT, d_model=10)
    with pytest.raises(ValueError, match=r"DiTConfig.rope_split: \(0, 8, 8\) leaves axis t"):
        dataclasses.replace(DIT, rope_split=(0, 8, 8))
    assert dataclasses.replace(DIT, latent_shape=(1, 8, 8), rope_split=(0, 8, 8)).rope_dims == (0, 8, 8)  # one frame
    # two sizes left w unrotated (the DiT equivariant to permuting columns), four failed with an IndexError in the call
    for split in ((8, 8), (4, 4, 4, 4)):
        with pytest.raises(ValueError, match=rf"DiTConfig.rope_split: {re.escape(str(split))} must be three even"):
            dataclasses.replace(DIT, rope_split=split)
    for d_model, n_heads in ((20, 4), (8, 2)):  # head dims 5 (odd) and 4 (no pair for h)
        with pytest.raises(ValueError, match=f"AlignConfig.n_heads: head dim d_model={d_model} / n_heads={n_heads}"):
            AlignConfig(d_model=d_model, n_heads=n_heads)

@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_dit_forward_flops_match_cost_analysis(attention):
    cfg = dataclasses.replace(DIT, attention=attention, d_model=64, mlp_dim=192, n_heads=4, scan_layers=False)
    model = nnx.eval_shape(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    B, L = 2, 8
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((B, 3, 8, 8, 4), jnp.float32), ((B,), jnp.float32),
                                                      ((B, L, 16), jnp.float32), ((B, L), jnp.bool_),
                                                      ((B, 16), jnp.float32))]
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    xla = fwd.lower(state, *args).compile().cost_analysis()["flops"]
    ours = B * cfg.flops_per_clip(L, training=False)
    # the rest is elementwise: norms, RoPE, softmax, modulation
    assert ours <= xla <= 1.25 * ours, xla / ours


def test_vae_flops_match_cost_analysis():
    cfg = VAEConfig(channels=(16, 32, 32), latent_channels=4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 9, 16, 16, 3), jnp.float32)
    fwd = jax.jit(lambda s, x: (lambda m: m.decode(m.encode(x)[0]))(nnx.merge(graphdef, s)))
    xla = fwd.lower(state, x).compile().cost_analysis()["flops"]
    ours = cfg.flops_per_clip(9, 16, 16, training=False)
    assert ours <= xla <= 1.1 * ours, xla / ours  # the rest: norms and activations
    # valid 'same' taps when the kernel's half-width exceeds a (deep, small) map: counted one output at a time
    from models.video.config import _valid_taps

    for k, n in ((7, 2), (7, 1), (3, 1), (7, 16), (5, 3)):
        assert _valid_taps(k, n) == sum(sum(0 <= i + d < n for d in range(-(k // 2), k // 2 + 1)) for i in range(n))



def test_a_frame_count_the_temporal_factor_refuses_names_the_nearest_valid_counts():
    """'clips need 1 + 4·k frames, got 7' left the arithmetic to the reader: the refusal names the counts to crop
    or pad to (below and above)."""
    cfg = dataclasses.replace(VAE, channels=(8, 16, 16), temporal_factor=4)
    for frames, near in ((7, "5 or 9"), (2, "1 or 5"), (12, "9 or 13")):
        with pytest.raises(ValueError, match=rf"VAEConfig.temporal_factor: clips need 1 \+ 4·k frames, got {frames}: "
                                             f"crop or pad to {near}$"):
            cfg.latent_shape(frames, 16, 16)
    assert cfg.latent_shape(9, 16, 16)[0] == 3


def test_a_frame_size_the_spatial_factor_refuses_names_the_nearest_valid_sizes():
    """'frame size 18×16 is not divisible by 4' named no fix, unlike the frame count's refusal: it names the
    dimension that does not divide and the sizes to crop or pad it to (below and above, none below the factor)."""
    for (height, width), near in (((18, 16), "the height 18 to 16 or 20"), ((16, 6), "the width 6 to 4 or 8"),
                                  ((2, 30), "the height 2 to 4 and the width 30 to 28 or 32")):
        with pytest.raises(ValueError, match=rf"VAEConfig.spatial_factor: frame size {height}×{width} is not divisible "
                                             rf"by 4: crop or pad {near}$"):
            VAE.latent_shape(5, height, width)
    with pytest.raises(ValueError, match=r"crop or pad the height 18 to 16 or 20$"):  # encode's refusal is the same
        nnx.eval_shape(lambda: VideoVAE(VAE, rngs=nnx.Rngs(0))).encode(jnp.zeros((1, 5, 18, 16, 3)))
    assert VAE.latent_shape(5, 16, 20)[1:3] == (4, 5)


@pytest.mark.parametrize("frames,height,width", [(9.0, 16, 16), (9, 16.0, 16), (True, 16, 16), ("9", 16, 16)])
def test_vae_latent_shape_and_flops_refuse_a_clip_size_that_is_not_a_count(frames, height, width):
    """latent_shape(9.0, 16, 16) reported (3.0, 4, 4, 8), a float latent frame count (which DiTConfig.latent_shape
    then refused as 'need positive ints'), True counted as 1 frame, and flops_per_clip(9, 16.0, 16) failed in range()
    as "'float' object cannot be interpreted as an integer"; a string compared with 1, a bare TypeError."""
    for f in (VAE.latent_shape, VAE.flops_per_clip):
        with pytest.raises(ValueError, match=r"VAEConfig.latent_shape: frames, height and width must be ints >= 1"):
            f(frames, height, width)
    assert VAE.latent_shape(np.int64(9), np.int64(16), 16) == VAE.latent_shape(9, 16, 16)  # numpy ints are counts


@pytest.mark.parametrize("frames,size,field", [(8, 16, "temporal_factor"), (9, 18, "spatial_factor"),
                                               (0, 16, "latent_shape")])
def test_vae_flops_refuse_a_clip_the_vae_refuses(frames, size, field):
    """flops_per_clip(8, 16, 16) counted 58.4 MFLOP (and 9×18×18 82.8) for clips `encode` refuses."""
    with pytest.raises(ValueError, match=f"VAEConfig.{field}"):
        VAE.flops_per_clip(frames, size, size)
    assert VAE.flops_per_clip(1, 16, 16) > 0  # a single frame (an image) is a clip


@pytest.mark.parametrize("text_len", [-3, 2.5, None])
def test_dit_flops_refuse_a_caption_length_that_is_not_a_count(text_len):
    """flops_per_clip(-3) counted 369.7 MFLOP (fewer than with no caption) and 2.5 a fraction, silently."""
    with pytest.raises(ValueError, match=r"DiTConfig.flops_per_clip: text_len must be an int >= 0"):
        DIT.flops_per_clip(text_len)
    assert DIT.flops_per_clip(np.int64(8)) == DIT.flops_per_clip(8) > DIT.flops_per_clip(0) > 0

# ---- invariants -------------------------------------------------------------------------------------------


def test_causal_conv3d_equals_a_3d_convolution_over_the_first_frame_repeated():
    """The stacked-taps 2D convolution against lax's 3D one on the clip front-padded with copies of its first frame
    (the causal padding; zeros are causal too, so the causality test could not tell them apart)."""
    from models.video.vae import causal_conv3d

    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    b = jax.random.normal(jax.random.key(2), (4,))
    padded = jnp.pad(x, ((0, 0), (2, 0), (0, 0), (0, 0), (0, 0)), mode="edge")
    want = jax.lax.conv_general_dilated(padded, w, (1, 1, 1), [(0, 0), (1, 1), (1, 1)],
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + b
    np.testing.assert_allclose(causal_conv3d(x, w, b), want, atol=1e-4)


def test_causal_conv3d_names_a_kernel_that_does_not_fit_its_input():
    """A kernel of other input channels than x's failed as reshape's "cannot reshape array of shape (3, 3, 3, 5, 2)
    ... into shape (3, 3, 6, 2)", an even kw as a reshape of W + 1 columns into W, and an even kh ('same' rows,
    pad None) returned H + 1 rows silently. Each now names the kernel; an explicit pad keeps the documented
    H + 2·pad - kh + 1 rows for any kh (halo_map's bands)."""
    from models.video.vae import causal_conv3d

    x = jnp.zeros((1, 3, 6, 6, 2))
    for w, says in ((jnp.zeros((3, 3, 3, 5, 2)), r"w's input channels \(5\) must equal x's C \(2\)"),
                    (jnp.zeros((3, 3, 2, 2, 2)), r"needs odd kh and kw .*got \(kh, kw\)=\(3, 2\)"),
                    (jnp.zeros((3, 2, 3, 2, 2)), r"needs odd kh and kw .*got \(kh, kw\)=\(2, 3\)")):
        with pytest.raises(ValueError, match=rf"causal_conv3d: .*{says}"):
            causal_conv3d(x, w)
    with pytest.raises(ValueError, match=r"causal_conv3d: x must be \[B, T, H, W, C\], got \[3, 6, 6, 2\]"):
        causal_conv3d(x[0], jnp.zeros((3, 3, 3, 2, 2)))
    assert causal_conv3d(x, jnp.zeros((3, 2, 3, 2, 2)), pad=1).shape == (1, 3, 7, 6, 2)


def test_vae_encoder_and_decoder_are_causal():
    vae = randomize(VideoVAE(VAE, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    x = jax.random.uniform(jax.random.key(1), (1, 9, 16, 16, 3), minval=-1, maxval=1)
    mean, logvar = enc(state, x)
    for t in (1, 4, 5, 8):  # frame t lives in latent frame ceil(t / 4)
        x2 = x.at[:, t].set(jax.random.uniform(jax.random.key(t), x.shape[2:], minval=-1, maxval=1))
        mean2, logvar2 = enc(state, x2)
        j = math.ceil(t / 4)
        np.testing.assert_array_equal(mean2[:, :j], mean[:, :j])
        np.testing.assert_array_equal(logvar2[:, :j], logvar[:, :j])
        assert float(jnp.abs(mean2[:, j] - mean[:, j]).max()) > 1e-3
    y = dec(state, mean)
    for j in (1, 2):  # latent frame j decodes to frames 4j-3 .. 4j
        y2 = dec(state, mean.at[:, j].add(1.0))
        np.testing.assert_array_equal(y2[:, :4 * j - 3], y[:, :4 * j - 3])
        assert float(jnp.abs(y2[:, 4 * j - 3] - y[:, 4 * j - 3]).max()) > 1e-3


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_adaln_zero_block_is_identity_at_init(attention):
    cfg = dataclasses.replace(DIT, attention=attention)
    x = jax.random.normal(jax.random.key(0), (2, cfg.tokens, cfg.d_model))
    text, valid, _ = text_inputs(2)
    ctx = _Ctx(cfg, jax.random.normal(jax.random.key(1), (2, cfg.d_model)), text, valid)
    block = DiTBlock(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    apply = jax.jit(lambda s: nnx.merge(graphdef, s)(x, ctx))  # one program for both states (eagerly: op by op)
    np.testing.assert_array_equal(apply(state), x)
    assert float(jnp.abs(apply(nnx.state(randomize(block))) - x).max()) > 1e-2  # trained gates open it up
    out = dit_apply(VideoDiT(cfg, rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(2), (2, 3, 8, 8, 4)),
                    jnp.asarray([0.3, 0.7]))
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer: a fresh DiT predicts 0


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_dit_block_is_adaln_zero_around_its_sublayers(attention):
    """The block against its documented form, written out from its own sublayers: each of self-attention (spatial,
    then temporal, when factorized), cross-attention and the MLP adds gate·f(norm(x)·(1 + scale) + shift), with
    (shift, scale, gate) of (attn, cross, mlp) the rows of silu(c) @ ada + bias (ada_t's for temporal) and norm an
    RMSNorm without scale. The identity-at-init and factorized == full tests passed a modulation without its 1 + and
    a cross-attention gated by the self-attention's gate."""
    cfg = dataclasses.replace(DIT, attention=attention)
    B, D = 2, cfg.d_model
    block = randomize(DiTBlock(cfg, rngs=nnx.Rngs(0)), scale=0.3)
    x = jax.random.normal(jax.random.key(0), (B, cfg.tokens, D))
    text, valid, _ = text_inputs(B)
    c = jax.random.normal(jax.random.key(1), (B, D))
    rope = dict(rope_split=cfg.rope_dims, rope_theta=cfg.rope_theta, cd=jnp.float32, eps=cfg.norm_eps)

    def reference(blk, x, c):
        norm = lambda h: h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps)  # noqa: E731
        sc = c * jax.nn.sigmoid(c)

        def sub(x, mod, f):  # mod [B, 3, D]: shift, scale, gate
            return x + mod[:, 2, None] * f(norm(x) * (1 + mod[:, 1, None]) + mod[:, 0, None])

        m = (sc @ blk.ada[...] + blk.ada_bias[...]).reshape(B, 3, 3, D)
        x = sub(x, m[:, 0], lambda h: blk.attn(h, cfg.grid, "spatial" if attention == "factorized" else "full", **rope))
        if attention == "factorized":
            mt = (sc @ blk.ada_t[...] + blk.ada_t_bias[...]).reshape(B, 3, D)
            x = sub(x, mt, lambda h: blk.tattn(h, cfg.grid, "temporal", **rope))
        x = sub(x, m[:, 1], lambda h: blk.cross(h, text, valid, cd=jnp.float32, eps=cfg.norm_eps))
        return sub(x, m[:, 2], lambda h: blk.mlp(h, jnp.float32))

    graphdef, state = nnx.split(block)
    got, want = jax.jit(lambda st, x, c: (nnx.merge(graphdef, st)(x, _Ctx(cfg, c, text, valid)),
                                          reference(nnx.merge(graphdef, st), x, c)))(state, x, c)
    assert float(jnp.abs(want - x).max()) > 0.1  # every sublayer contributes
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_the_sinusoid_of_1000_t():
    """Against float64: cos then sin of 1000·t·10000^(-i/half), i < half (DiT / ADM's embedding of the step index),
    so that neighbouring steps of a 1000-step grid, 1e-3 apart, get visibly different features (of t itself they
    differed by ~1e-3, nearly equal inputs to the time MLP; no test saw the scale)."""
    from models.video.layers import timestep_embedding

    t, dim = np.array([0.0, 0.3, 0.301, 1.0]), 16
    ang = 1000 * t[:, None] * 10000.0 ** (-np.arange(dim // 2) / (dim // 2))
    want = np.concatenate([np.cos(ang), np.sin(ang)], -1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim), np.float64)
    np.testing.assert_allclose(got, want, atol=5e-4)  # float32 angles up to 1000 rad
    assert np.abs(got[1] - got[2]).max() > 0.5


def test_space_and_time_folds_keep_pixels_local_and_invert():
    """The VAE's folds against NumPy slices: space_to_depth's channels at (i, j) are the 2×2 patch at (2i, 2j) in
    (row, column, channel) order, time_fold pairs frames (0, 0), (1, 2), (3, 4); the unfolds invert them (a
    depth_to_space without its transpose, interleaving rows and columns, passed the VAE tests: both ends learn)."""
    from models.video.vae import depth_to_space, space_to_depth, time_fold, time_unfold

    x = np.random.default_rng(0).standard_normal((2, 5, 6, 8, 3)).astype(np.float32)
    s = np.asarray(space_to_depth(jnp.asarray(x)))
    assert s.shape == (2, 5, 3, 4, 12)
    np.testing.assert_array_equal(s[:, :, 1, 2], x[:, :, 2:4, 4:6].reshape(2, 5, 12))
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(s))), x)
    f = np.asarray(time_fold(jnp.asarray(x)))
    np.testing.assert_array_equal(f[:, 0], np.concatenate([x[:, 0], x[:, 0]], -1))
    np.testing.assert_array_equal(f[:, 2], np.concatenate([x[:, 3], x[:, 4]], -1))
    np.testing.assert_array_equal(np.asarray(time_unfold(jnp.asarray(f))), x)


def test_latent_normalisation_is_per_channel_and_inverts():
    """normalize(z, latent_stats(z)) has zero mean and unit variance per channel (float64), and denormalize inverts
    it; channels of different scales and offsets, so a swapped or missing division shows."""
    from models.video.vae import denormalize, latent_stats, normalize

    rng = np.random.default_rng(0)
    z = (rng.standard_normal((64, 2, 3, 3, 4)) * [0.5, 2.0, 1.0, 3.0] + [1.0, -2.0, 0.0, 5.0]).astype(np.float32)
    stats = latent_stats(z)
    n = np.asarray(normalize(jnp.asarray(z), stats), np.float64).reshape(-1, 4)
    np.testing.assert_allclose(n.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(n.std(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(denormalize(normalize(jnp.asarray(z), stats), stats), z, rtol=1e-5, atol=1e-5)
    # no latents, or a NaN / inf one, gave NaN stats silently (the std's 1e-6 floor keeps a NaN): every normalised
    # latent, and so the DiT's training, came out NaN
    diverged = z.copy()
    diverged[3, 1, 0, 2, 1], diverged[7, 0, 1, 1, 3] = np.nan, np.inf
    for bad, says in ((z[:0], "has no latents"), (diverged, "has 2 non-finite values")):
        with pytest.raises(ValueError, match=rf"latent_stats: z_NTHWZ \[.*\] {says}"):
            latent_stats(bad)
    # a nested list (latents gathered by hand) failed as "'list' object has no attribute 'shape'"
    np.testing.assert_allclose(latent_stats(z[:2].tolist())[0], latent_stats(z[:2])[0])


def test_vae_loss_samples_the_posterior_with_its_standard_deviation():
    """vae_loss decodes z = mean + exp(logvar / 2)·ε: divided by the posterior's std, z - mean is a unit normal.
    The encoder's logvar is pushed to about -3 so that a sample scaled by the variance (which passed the training
    tests) is 4x too narrow."""
    from unittest import mock

    from models.video.vae import vae_loss

    vae = VideoVAE(VAE, rngs=nnx.Rngs(0))
    Z = VAE.latent_channels
    vae.encoder.conv_out.b[...] = vae.encoder.conv_out.b[...].at[Z:].set(-3.0)
    graphdef, state = nnx.split(vae)
    x = jax.random.uniform(jax.random.key(0), (2, 9, 16, 16, 3), minval=-1, maxval=1)

    def run(state, x):
        model, seen = nnx.merge(graphdef, state), []

        def decode(self, z):  # records the sample; the decoder itself plays no part
            seen.append(z)
            return jnp.zeros(x.shape, jnp.float32)

        with mock.patch.object(VideoVAE, "decode", decode):
            vae_loss(model, x, jax.random.key(1))
        mean, logvar = model.encode(x)
        return (seen[0] - mean) * jnp.exp(-0.5 * logvar), logvar

    u, logvar = jax.jit(run)(state, x)
    assert float(logvar.mean()) < -2
    assert float(jnp.std(u)) == pytest.approx(1.0, abs=0.1)  # 384 draws


def copy_shared(src, dst):
    """dst gets every parameter that src also has (full attention's parameters ⊂ factorized ones)."""
    s, d = nnx.to_pure_dict(nnx.state(src)), nnx.to_pure_dict(nnx.state(dst))

    def fill(a, b):
        return {k: fill(a[k], v) if isinstance(v, dict) else a[k] for k, v in b.items()}

    state = nnx.state(dst)
    nnx.replace_by_pure_dict(state, fill(s, d))
    nnx.update(dst, state)
    return dst


@pytest.mark.parametrize("window", [None, 3])
def test_factorized_and_full_attention_agree_when_T_is_1(window):
    cfg = dataclasses.replace(DIT, latent_shape=(1, 8, 8), spatial_window=window)
    fact = randomize(VideoDiT(cfg, rngs=nnx.Rngs(0)))
    # (each copy is built on shapes: every parameter it has is fact's, so its own initial values were never read)
    full = copy_shared(fact, nnx.eval_shape(lambda: VideoDiT(dataclasses.replace(cfg, attention="full"),
                                                             rngs=nnx.Rngs(1))))
    x, t = jax.random.normal(jax.random.key(3), (2, 1, 8, 8, 4)), jnp.asarray([0.2, 0.8])
    np.testing.assert_allclose(dit_apply(fact, x, t), dit_apply(full, x, t), atol=1e-5)
    # with three frames they are different models
    cfg3 = dataclasses.replace(cfg, latent_shape=(3, 8, 8))
    fact3 = copy_shared(fact, nnx.eval_shape(lambda: VideoDiT(cfg3, rngs=nnx.Rngs(0))))
    full3 = copy_shared(fact, nnx.eval_shape(lambda: VideoDiT(dataclasses.replace(cfg3, attention="full"),
                                                              rngs=nnx.Rngs(0))))
    x3 = jax.random.normal(jax.random.key(4), (2, 3, 8, 8, 4))
    assert float(jnp.abs(dit_apply(fact3, x3, t) - dit_apply(full3, x3, t)).max()) > 1e-3


@pytest.mark.parametrize("layout,sw,tw", [("temporal", None, None), ("temporal", None, 2), ("spatial", None, None),
                                          ("spatial", 3, None), ("full", 3, 2)])
def test_spacetime_attention_matches_dense_masked_reference(layout, sw, tw):
    grid, B, N, K = (3, 4, 5), 2, 2, 8
    S = math.prod(grid)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, S, N, K)) for i in range(3))
    pos = grid_positions(grid)
    d = pos[:, None] - pos[None]  # query - key
    mask = np.ones((S, S), bool)
    if layout == "temporal":
        mask &= (d[..., 1] == 0) & (d[..., 2] == 0)
    if layout == "spatial":
        mask &= d[..., 0] == 0
    if sw:
        mask &= (np.abs(d[..., 1]) <= sw // 2) & (np.abs(d[..., 2]) <= sw // 2)
    if tw:
        mask &= (d[..., 0] >= 0) & (d[..., 0] < tw)
    ref = reference_attention(q, k, v, jnp.asarray(mask)[None, None], K ** -0.5)
    out = spacetime_attention(q, k, v, grid, layout, spatial_window=sw, temporal_window=tw)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("layout,sw", [("spatial", None), ("spatial", 3), ("temporal", None)])
def test_factorized_attention_gives_cudnn_its_vmapped_axis_in_front(monkeypatch, layout, sw):
    """Factorized attention vmaps one attention per frame (spatial) or per position (temporal) over axis 1 / 2 of a
    [B, T, H·W, N, K] view, but cuDNN's batching rule takes a leading batch axis only: attn_impl='cudnn' failed at
    trace time on a GPU with jax's NotImplementedError 'Currently only support batch_dim in [0, None]'. Lowered for
    CUDA from this CPU (jax told a cuDNN 9 Hopper is present: it checks for one before the batching rule runs), the
    value and gradient now hold cuDNN's forward and backward kernels; and with the GPU kernel replaced by jax's 'xla'
    one the cuDNN path's axis moves give the dense masked reference. (Odd lengths, which jax's cuDNN wrapper refuses to
    differentiate, are padded by models.attention.cudnn_attention: tests/test_attention.py.)"""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    grid, B, N, K = (4, 2, 4), 2, 2, 16
    S = math.prod(grid)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, S, N, K), jnp.bfloat16) for i in range(3))
    monkeypatch.setattr(fas, "check_cudnn_version", lambda: 90800)
    hopper = lambda capability: tuple(map(int, capability.split("."))) <= (9, 0)  # noqa: E731  (H100 / H200: 9.0)
    monkeypatch.setattr(fas, "check_compute_capability", hopper)
    monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda capability: capability == "9.0")
    attend = lambda q, k, v: spacetime_attention(q, k, v, grid, layout, spatial_window=sw, impl="cudnn")  # noqa: E731
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "@__cudnn$fmhaScaleBiasSoftmax(" in hlo and "@__cudnn$fmhaScaleBiasSoftmaxBackward(" in hlo

    dpa = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation, **kw: dpa(*a, **kw))
    pos = grid_positions(grid)
    d = pos[:, None] - pos[None]
    mask = (d[..., 1] == 0) & (d[..., 2] == 0) if layout == "temporal" else d[..., 0] == 0
    if sw:
        mask &= (np.abs(d[..., 1]) <= sw // 2) & (np.abs(d[..., 2]) <= sw // 2)
    ref = reference_attention(q, k, v, jnp.asarray(mask)[None, None], K ** -0.5)
    np.testing.assert_allclose(np.float32(attend(q, k, v)), np.float32(ref), atol=2e-2)


def test_text_encoder_is_bidirectional_and_ignores_padding():
    enc = randomize(TextEncoder(TEXT, rngs=nnx.Rngs(0)))
    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0]])
    # the three encodings in one program (eagerly each op compiles on its own); the last word changed, then the same
    # caption without its padding
    out, later, short = nnx.jit(lambda enc: (enc(tok), enc(tok.at[0, 4].set(12)), enc(tok[:, :5])))(enc)
    assert float(jnp.abs(later.tokens_BLE[0, 0] - out.tokens_BLE[0, 0]).max()) > 1e-3  # the first token sees it
    np.testing.assert_allclose(short.tokens_BLE[0], out.tokens_BLE[0, :5], atol=1e-5)
    np.testing.assert_allclose(short.pooled_BE, out.pooled_BE, atol=1e-5)
    # pooled_BE is the mean of the real tokens' states (one token's state passed the comparison above)
    np.testing.assert_allclose(out.pooled_BE[0], out.tokens_BLE[0, :5].mean(0), atol=1e-5)



def test_text_encoder_and_generate_take_lists_of_ids_as_the_lm_does():
    """check_token_ids reads lists of ids (the LM takes them); TextEncoder and generate read `tokens.shape` before it:
    an AttributeError ('list' object has no attribute 'shape') naming nothing."""
    from models.video import TextToVideo, generate

    model = TextToVideo(TextToVideoConfig(dit=DIT, text=TEXT, align=None), rngs=nnx.Rngs(0))
    ids, null = [[2, 4, 8, 3, 11, 0, 0, 0]], [1, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(model.text(ids).tokens_BLE, model.text(jnp.asarray(ids)).tokens_BLE)
    np.testing.assert_array_equal(generate(model, ids, null, jax.random.key(0), 2.0, steps=1),
                                  generate(model, jnp.asarray(ids), null, jax.random.key(0), 2.0, steps=1))


def test_generate_takes_captions_placed_elsewhere_inside_set_mesh():
    """As the LM's generate: inside jax.set_mesh, captions or a key committed to one device failed the id checks'
    eager reads as jax's "Received incompatible devices ... _reduce_min", naming no argument. They are moved onto
    the model's devices and give the numpy captions' latents."""
    from models.video import TextToVideo, generate
    from parallel import make_mesh, shard_state

    mesh = make_mesh({"data": 4, "tensor": 2})
    graphdef, params = nnx.split(TextToVideo(TextToVideoConfig(dit=DIT, text=TEXT, align=None), rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, shard_state(params, mesh))
    ids, null = np.tile(np.asarray([[2, 4, 8, 3, 11, 0, 0, 0]], np.int32), (4, 1)), np.zeros((8,), np.int32)
    one = lambda x: jax.device_put(x, jax.devices()[7])  # noqa: E731
    with jax.set_mesh(mesh):
        want = generate(model, ids, null, jax.random.key(0), steps=1)
        got = generate(model, one(ids), one(null), one(jax.random.key(0)), steps=1)
    np.testing.assert_array_equal(got, want)


def test_t2v_loss_takes_a_batch_placed_elsewhere_inside_set_mesh():
    """As generate: an eager t2v_loss (an evaluation outside jit) inside jax.set_mesh of a batch, key or null caption
    committed to one device failed the id checks' eager reads as jax's "Received incompatible devices ...
    _reduce_min", naming no argument. They are moved onto the model's devices and give the numpy batch's loss."""
    from models.video import TextToVideo, t2v_loss
    from parallel import make_mesh, shard_state

    mesh = make_mesh({"data": 4, "tensor": 2})
    graphdef, params = nnx.split(TextToVideo(TextToVideoConfig(dit=DIT, text=TEXT, align=None), rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, shard_state(params, mesh))
    ids, null = np.tile(np.asarray([[2, 4, 8, 3, 11, 0, 0, 0]], np.int32), (4, 1)), np.zeros((8,), np.int32)
    lat = np.random.default_rng(0).standard_normal((4, *DIT.latent_shape, DIT.latent_channels)).astype(np.float32)
    one = lambda x: jax.device_put(x, jax.devices()[7])  # noqa: E731
    with jax.set_mesh(mesh):
        want, _ = t2v_loss(model, {"latents": lat, "tokens": ids}, jax.random.key(0), null)
        got, _ = t2v_loss(model, {"latents": one(lat), "tokens": one(ids)}, one(jax.random.key(0)), one(null))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_text_encoder_names_the_field_and_fix_for_captions_past_max_seq_len():
    """Captions of 1 token encode; 9 tokens on max_seq_len=8 were refused naming neither the config field nor a fix."""
    enc = TextEncoder(TEXT, rngs=nnx.Rngs(0))
    assert enc(jnp.asarray([[5]])).tokens_BLE.shape == (1, 1, 16)
    with pytest.raises(ValueError, match=r"9 tokens exceed .*TransformerConfig.max_seq_len=8.*truncate"):
        enc(jnp.ones((1, 9), jnp.int32))
    with pytest.raises(ValueError, match=r"TextEncoder: captions of 0 tokens; pad them to at least one"):
        enc(jnp.ones((1, 0), jnp.int32))  # failed inside the attention kernel, naming a reduction

def test_caption_dropout_rate_and_null():
    tok = jnp.tile(jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0]]), (4000, 1))
    null = jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(caption_dropout(tok, null, jax.random.key(0), 0.0), tok)
    out = caption_dropout(tok, null, jax.random.key(0), 0.25)
    dropped = (out == null).all(1)
    assert ((out == tok).all(1) | dropped).all()
    assert abs(float(dropped.mean()) - 0.25) < 0.03
    # jax_enable_x64 drops the same captions for the same key: its float64 draw of the rate (p a Python float) used
    # other random bits, and 757 of 4000 decisions at p = 0.1 differed from x64-off's
    want = caption_dropout(tok, null, jax.random.key(1), 0.1)
    with jax.enable_x64(True):
        got = caption_dropout(tok, null, jax.random.key(1), 0.1)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("p", [10, 1.5, -0.1, float("nan")])
def test_caption_dropout_refuses_a_rate_outside_0_1(p):
    """A percentage (10 for 10%) or 1.5 dropped every caption (bernoulli past 1), -0.1 and NaN none, silently."""
    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"caption_dropout: p=.* must be a probability in \[0, 1\]"):
        caption_dropout(tok, jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0]), jax.random.key(0), p)
    np.testing.assert_array_equal(caption_dropout(tok, jnp.asarray([1] + [0] * 7), jax.random.key(0), 1.0),
                                  [[1] + [0] * 7])  # 1 and a traced rate stay accepted
    jax.jit(lambda q: caption_dropout(tok, jnp.asarray([1] + [0] * 7), jax.random.key(0), q))(0.5)


def test_caption_dropout_names_a_null_caption_of_another_length():
    """A null caption of another length failed as jnp.where's bare 'Incompatible shapes for broadcasting'."""
    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0]])
    want = r"caption_dropout: null_L must be the null caption's tokens \[L=8\].*got shape \[16\]; .*null_tokens"
    with pytest.raises(ValueError, match=want):
        caption_dropout(tok, jnp.asarray([1] + [0] * 15), jax.random.key(0), 0.1)


def test_caption_dropout_takes_a_list_of_captions_and_names_one_caption_not_a_batch():
    """A list of captions failed as a bare AttributeError ('list' object has no attribute 'shape'); one caption [L]
    was blamed on the null caption ('null_L must be the null caption's tokens [L=?]')."""
    null = [1] + [0] * 7
    got = caption_dropout([[2, 4, 8, 3, 11, 0, 0, 0]] * 2, null, jax.random.key(0), 1.0)
    np.testing.assert_array_equal(got, [null] * 2)
    with pytest.raises(ValueError, match=r"caption_dropout: captions must be a batch of token ids \[B, L\], got shape "
                                         r"\[8\]; one caption is tokens\[None\]"):
        caption_dropout(jnp.asarray([2, 4, 8, 3, 11, 0, 0, 0]), jnp.asarray(null), jax.random.key(0), 0.1)


def test_text_encoder_honours_embed_scale_and_norm_offset_and_refuses_what_it_would_ignore():
    """A Gemma-style text config: the sqrt(d) embedding scale and (1 + w) final norm change the output (as the
    LM's would); MoE and local attention, which a bidirectional dense encoder would ignore, are refused."""
    from models.moe import MoEConfig
    from models.rope import inv_frequencies
    from models.transformer import _Ctx, rms_norm

    tok = jnp.asarray([[2, 4, 8, 3, 11, 0, 0, 0]])
    base = randomize(TextEncoder(TEXT, rngs=nnx.Rngs(0)))
    gemma = dataclasses.replace(TEXT, embed_scale=True, norm_offset=1.0)
    g, st = nnx.split(base)
    enc = nnx.merge(nnx.split(TextEncoder(gemma, rngs=nnx.Rngs(0)))[0], st)  # the same weights
    # by hand: scaled embedding -> the block -> (1 + w) norm
    valid = tok != 0
    ctx = _Ctx(gemma, jnp.arange(8)[None], None, valid, inv_frequencies(gemma.hd, gemma.rope_theta))
    x = enc.embed[...][tok] * gemma.d_model ** 0.5
    block = nnx.merge(nnx.split(enc.blocks)[0], jax.tree.map(lambda a: a[0], nnx.split(enc.blocks)[1]))
    want = rms_norm(block(x, ctx, None)[0], enc.final_norm[...], gemma.norm_eps, 1.0)
    np.testing.assert_allclose(enc(tok).tokens_BLE, want, atol=1e-5)
    assert float(jnp.abs(enc(tok).tokens_BLE - base(tok).tokens_BLE).max()) > 1e-2
    # the (offset + w) final norm starts at scale 1, as the LM's and the blocks' do (it started at 2)
    fresh = TextEncoder(gemma, rngs=nnx.Rngs(0))
    assert float(jnp.abs(fresh.final_norm[...]).max()) == 0.0
    with pytest.raises(ValueError, match="vocab_size"):  # out-of-range ids gathered NaN rows
        fresh(jnp.asarray([[2, TEXT.vocab_size, 0]]))
    for bad, field in ((dict(moe=MoEConfig(2, 1, 16, renormalize=False)), "text.moe"),
                       (dict(attn_pattern="local", sliding_window=2), "text.attn_pattern")):
        with pytest.raises(ValueError, match=field):
            TextToVideoConfig(dit=DIT, text=dataclasses.replace(TEXT, **bad))


def test_vae_init_std_sets_every_convolution_and_ddpm_refuses_flow_time_settings():
    vae = nnx.eval_shape(lambda: VideoVAE(dataclasses.replace(VAE, init_std=0.5), rngs=nnx.Rngs(0)))
    real = VideoVAE(dataclasses.replace(VAE, init_std=0.5), rngs=nnx.Rngs(0))
    stds = {jax.tree_util.keystr(k): float(jnp.std(v)) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(real))
            if v.ndim >= 2 and v.size >= 256}
    assert len(stds) == len([x for x in jax.tree.leaves(nnx.state(vae)) if x.ndim >= 2 and x.size >= 256])
    assert all(0.4 < s < 0.6 for s in stds.values()), stds  # conv_in / conv_out / resamplers included
    DiffusionConfig(kind="ddpm", prediction="eps")
    with pytest.raises(ValueError, match="kind='ddpm' trains on uniform t"):
        DiffusionConfig(kind="ddpm", prediction="eps", shift=3.0)


def test_video_batches_shard_rows_not_frames_under_a_sequence_axis():
    from experiments.video_steps import shard
    from parallel import make_mesh

    mesh = make_mesh({"data": 4, "sequence": 2})
    out = shard({"video": np.zeros((8, 5, 16, 16, 3), np.float32), "latents": np.zeros((8, 3, 8, 8, 8), np.float32),
                 "tokens": np.zeros((8, 8), np.int32), "caption_id": np.zeros((8,), np.int32)}, mesh)
    assert out["video"].sharding.spec[:2] == ("data", None) and out["latents"].sharding.spec[1] is None
    assert tuple(out["tokens"].sharding.spec) == ("data", "sequence")
    assert tuple(out["caption_id"].sharding.spec) == ("data",)



def test_video_batches_name_an_array_whose_batch_the_mesh_does_not_divide():
    """Clips, latents and caption ids raised jax's IndivisibleError, naming neither the array nor the fix."""
    from experiments.video_steps import shard
    from parallel import make_mesh

    mesh = make_mesh({"data": 4, "sequence": 2})
    for key, shape in (("latents", (2, 3, 8, 8, 8)), ("caption_id", (6,))):
        with pytest.raises(ValueError, match=rf"shard: batch\['{key}'\].*'batch' of size {shape[0]} does not divide "
                                             r"mesh axes.*multiple of 4"):
            shard({key: np.zeros(shape, np.float32)}, mesh)


def test_video_batches_name_the_captions_key_when_the_mesh_does_not_divide_them():
    """Captions [B, L] went through parallel.shard_batch alone, whose error named 'batch', not the dict key (the
    other arrays' errors did); strings failed inside jax ("dtype <U1 is not a valid JAX array type")."""
    from experiments.video_steps import shard
    from parallel import make_mesh

    mesh = make_mesh({"data": 4, "sequence": 2})
    for shape, says in (((2, 8), "dimension 'batch' of size 2 does not divide mesh axes ('data',)"),
                        ((8, 7), "dimension 'act_seq' of size 7 does not divide mesh axes ('sequence',)")):
        with pytest.raises(ValueError, match="^" + re.escape(f"shard: batch['tokens'], an array {shape}: {says}")):
            shard({"tokens": np.zeros(shape, np.int32)}, mesh)
    with pytest.raises(TypeError, match=r"^shard: batch\['tokens'\] is a ndarray, not an array of numbers"):
        shard({"tokens": np.array([["a red circle"]])}, mesh)
    # host rows straight onto their shards: through jnp.asarray every training step copied the whole batch to device
    # 0 first, an implicit transfer that jax.transfer_guard('disallow') refused
    with jax.transfer_guard("disallow"):
        b = shard({"latents": np.ones((8, 2, 4, 4, 4)), "tokens": np.zeros((8, 8), np.int32)}, mesh)
    assert b["latents"].dtype == jnp.float32 and tuple(b["latents"].sharding.spec)[:2] == ("data", None)


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_bf16_dit_gradient_keeps_its_products_in_bf16_on_cpu(attention):
    """The DiT's projections go through models.linear: with bf16 compute on the CPU backend every dot of its loss
    projection (every unbatched dot) of its loss gradient reads bf16 operands (XLA:CPU runs plain bf16-output
    products as float32 dots; see models.linear), but for the weight gradients of the [B, D] conditioning products,
    which contract over the B = 2 examples. (XLA:CPU upcasts attention's tiny batched dots over T' = 3 frames.)"""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's dot lowering")
    from tests.test_linear import dots_of

    model = VideoDiT(dataclasses.replace(DIT, attention=attention, dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    text, valid, pooled = text_inputs(2, E=DIT.text_dim)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(x, jnp.asarray([0.1, 0.9]), text, valid, pooled) ** 2)  # noqa: E731
    dots = [d for d in dots_of(jax.jit(jax.grad(loss)).lower(state).compile().as_text()) if d[2] > 2 and not d[3]]
    assert len(dots) >= 2 * 2 * 7  # forward and backward projections of both blocks at least
    assert all(d[:2] == ("bf16", "bf16") for d in dots), sorted(set(dots))


def test_rope_3d_rotates_each_axis_by_its_own_coordinate():
    """Against a float64 NumPy rotation per (t, h, w) channel block, and by its invariant: q·k depends on the
    positions' difference along each axis, and on every axis (a bug that fed the frame index to all three blocks
    passed every other test: their spatial grids were 1 frame or their outputs started at 0)."""
    from models.video.layers import apply_rope_3d

    split, theta, grid = (4, 6, 6), 100.0, (3, 4, 5)
    pos = grid_positions(grid)
    x = np.random.default_rng(0).standard_normal((1, len(pos), 2, sum(split)))
    got = np.asarray(apply_rope_3d(jnp.asarray(x, jnp.float32), pos, split, theta), np.float64)
    want, start = [], 0
    for axis, size in enumerate(split):
        part = x[..., start:start + size]
        freq = 1.0 / theta ** (np.arange(0, size, 2) / size)
        ang = pos[:, axis, None] * freq  # [S, size / 2]
        c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        a, b = part[..., :size // 2], part[..., size // 2:]
        want.append(np.concatenate([a * c - b * s, b * c + a * s], -1))
        start += size
    np.testing.assert_allclose(got, np.concatenate(want, -1), atol=2e-5)

    q, k = (np.random.default_rng(i).standard_normal((1, 1, 1, sum(split))).astype(np.float32) for i in (1, 2))

    def score(pq, pk):
        rq = apply_rope_3d(jnp.asarray(q), np.asarray([pq]), split, theta)
        rk = apply_rope_3d(jnp.asarray(k), np.asarray([pk]), split, theta)
        return float(jnp.sum(rq * rk))

    base = score((1, 2, 3), (0, 1, 1))
    for axis in range(3):
        shift = np.eye(3, dtype=int)[axis] * 2
        assert score(tuple((1, 2, 3) + shift), tuple((0, 1, 1) + shift)) == pytest.approx(base, abs=1e-4)
        assert abs(score(tuple((1, 2, 3) + shift), (0, 1, 1)) - base) > 1e-3, axis  # every axis is seen


def test_patchify_unpatchify_invert_on_a_non_square_grid():
    """Square test latents hid a transposed grid in unpatchify (its zero-initialised output looks the same)."""
    from models.video.layers import patchify, unpatchify

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6, 10, 3)), jnp.float32)
    for patch in ((1, 2, 2), (2, 3, 5), (4, 1, 2)):
        grid = tuple(s // p for s, p in zip(x.shape[1:4], patch))
        tokens = patchify(x, patch)
        np.testing.assert_array_equal(unpatchify(tokens, patch, grid, 3), x)
        # token s holds the patch at grid_positions(grid)[s], t-major
        t, h, w = grid_positions(grid)[5]
        pt, ph, pw = patch
        block = x[0, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
        np.testing.assert_array_equal(tokens[0, 5], block.reshape(-1))


def test_patchify_and_unpatchify_name_a_patch_that_does_not_tile():
    """A patch that did not divide (T, H, W) (or tokens of another grid) failed inside reshape with a TypeError naming
    an 8-D shape, not the patch or the axis."""
    from models.video.layers import patchify, unpatchify

    with pytest.raises(ValueError, match=r"patch \(2, 2, 2\) does not divide .*\(T, H, W\)=\(3, 4, 4\)"):
        patchify(jnp.zeros((1, 3, 4, 4, 2)), (2, 2, 2))
    with pytest.raises(ValueError, match=r"unpatchify: tokens \[1, 4, 16\] do not match grid \(1, 2, 3\)"):
        unpatchify(jnp.zeros((1, 4, 16)), (1, 2, 2), (1, 2, 3), 4)


def test_vae_kl_matches_numerical_integration():
    """KL(N(μ, σ²) ‖ N(0, 1)) per element, against ∫ q log(q / p) by quadrature in float64."""
    from scipy import integrate, stats

    from models.video.vae import kl_divergence

    for mu, logvar in ((0.0, 0.0), (1.5, 0.0), (0.0, -2.0), (-0.7, 1.3), (2.0, -0.5)):
        q, p = stats.norm(mu, math.exp(0.5 * logvar)), stats.norm(0.0, 1.0)
        ref, _ = integrate.quad(lambda z, q=q, p=p: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), -40, 40, limit=200)
        assert float(kl_divergence(jnp.float32(mu), jnp.float32(logvar))) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_vae_kl_keeps_its_precision_near_the_prior():
    """A posterior near the prior (|μ|, |logvar| ~ 1e-3, KL ~ 8e-7): exp(logvar) - 1 - logvar in float32 cancelled
    (exp(1e-3) carries an ulp of 1.2e-7 against a difference of 5e-7): 1.5% off at μ = logvar = 1e-3, 4.7% at μ = 0,
    and 2000x on elements nearer 0; expm1(logvar) - logvar was still 3% off. Elementwise against float64 now."""
    from models.video.vae import kl_divergence

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1e-2, 1.0):
        mu, logvar = (rng.uniform(-scale, scale, 1024).astype(np.float32) for _ in range(2))
        mu64, lv64 = mu.astype(np.float64), logvar.astype(np.float64)
        ref = 0.5 * (mu64 ** 2 + np.expm1(lv64) - lv64)
        got = np.asarray(kl_divergence(jnp.asarray(mu), jnp.asarray(logvar)), np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"scale {scale}")
    kl = float(kl_divergence(jnp.float32(1e-3), jnp.float32(1e-3)))
    assert kl == pytest.approx(0.5 * (1e-6 + math.expm1(1e-3) - 1e-3), rel=1e-5)


def test_vae_kl_series_below_logvar_0_1_is_float32_exact():
    """Below |logvar| = 0.1 the KL's exp(x) - 1 - x is a Taylor series to x⁶/720: against float64 within a few
    float32 ulps (measured 1.7e-7 relative). A wrong last coefficient (x⁶/120, 1.5e-6 off near 0.1) passed the KL
    tests, whose rtol 1e-5 also covers the expm1 branch above 0.1 (6e-6 there)."""
    from models.video.vae import kl_divergence

    logvar = np.linspace(-0.0999, 0.0999, 20_000, dtype=np.float32)  # an even count: 0 itself is not a point
    lv64 = logvar.astype(np.float64)
    got = np.asarray(kl_divergence(jnp.zeros_like(logvar), jnp.asarray(logvar)), np.float64)
    np.testing.assert_allclose(got, 0.5 * (np.expm1(lv64) - lv64), rtol=5e-7)


def test_vae_kl_is_float32_for_bf16_inputs():
    """kl_divergence's docstring promises float32 per element: bf16 mean / logvar (a bf16 encoder of your own, or a
    cast) came back bf16, each element up to 4% off float64 of the same inputs (uniform in ±1: max 4.2e-2)."""
    from models.video.vae import kl_divergence

    rng = np.random.default_rng(0)
    mu, logvar = (jnp.asarray(rng.uniform(-1, 1, 1024), jnp.bfloat16) for _ in range(2))
    got = kl_divergence(mu, logvar)
    assert got.dtype == jnp.float32
    mu64, lv64 = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), 0.5 * (mu64 ** 2 + np.expm1(lv64) - lv64), rtol=1e-5)


def test_vae_encodes_and_decodes_an_empty_batch():
    """An empty batch (the tail of a sliced list of clips) gives empty latents and videos, as the DiT and the text
    encoder do; the resamplers' reshape(*lead, -1) of zero rows raised ZeroDivisionError('integer modulo by zero')."""
    # shapes only (what failed was the trace's shape arithmetic): abstract weights, traced, nothing run
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(VAE, rngs=nnx.Rngs(0))))
    mean, logvar = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state,
                                  jax.ShapeDtypeStruct((0, 9, 16, 16, 3), jnp.float32))
    assert mean.shape == logvar.shape == (0, 3, 4, 4, 4)
    assert jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, mean).shape == (0, 9, 16, 16, 3)


def test_vae_loss_and_diffusion_loss_name_an_empty_batch():
    """As t2v_loss: vae_loss of no clips was NaN (loss, mse, kl, psnr: means over nothing), silently, and
    diffusion_loss failed at its per-example reshape as a bare 'ZeroDivisionError: integer modulo by zero'."""
    from models.video.diffusion import diffusion_loss
    from models.video.vae import vae_loss

    vae = nnx.eval_shape(lambda: VideoVAE(VAE, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"vae_loss: an empty batch \(B = 0\)"):
        vae_loss(vae, jnp.zeros((0, 9, 16, 16, 3)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"diffusion_loss: an empty batch \(B = 0\)"):
        diffusion_loss(lambda x, t: x, jnp.zeros((0, 2, 4, 4, 4)), jax.random.key(0), DiffusionConfig())


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_dit_forward_is_the_documented_network_around_its_blocks(attention):
    """VideoDiT against its documented form in float64 NumPy outside the blocks (each block is pinned by
    test_dit_block_is_adaln_zero_around_its_sublayers and run here as a module, layer by layer): tokens = patches
    in (t, h, w) order, each (pt, ph, pw, C) row-major, @ patch_embed + bias; c = W2·silu(W1·sinusoid(1000·t) + b1)
    + b2 + pooled @ text_proj + bias; out = (rms(x)·(1 + scale) + shift) @ out + bias with (shift, scale) =
    silu(c) @ final_ada + bias, unpatchified. With zero-initialised final layers, the identity-at-init test could
    not see the final adaLN's order, norm or SiLU, nor the biases or the pooled caption."""
    cfg = dataclasses.replace(DIT, attention=attention, patch=(1, 2, 4), latent_shape=(3, 4, 8))
    model = randomize(VideoDiT(cfg, rngs=nnx.Rngs(0)), scale=0.3)
    B, (pt, ph, pw), C = 2, cfg.patch, cfg.latent_channels
    x = jax.random.normal(jax.random.key(3), (B, *cfg.latent_shape, C))
    t = jnp.asarray([0.2, 0.7])
    text, valid, pooled = text_inputs(B, E=cfg.text_dim)
    got = dit_apply(model, x, t)

    P = {path[0]: np.asarray(v[...], np.float64)  # the top-level parameters (blocks run as modules below)
         for path, v in nnx.to_flat_state(nnx.state(model)) if len(path) == 1}
    xn, (T, H, W) = np.asarray(x, np.float64), cfg.grid
    rms = lambda h: h / np.sqrt(np.mean(h * h, -1, keepdims=True) + cfg.norm_eps)  # noqa: E731
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731
    tokens = np.stack([xn[:, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw].reshape(B, -1)
                       for i in range(T) for j in range(H) for k in range(W)], 1)  # [B, S, P]
    h0 = tokens @ P["patch_embed"] + P["patch_bias"]
    half = cfg.time_freq_dim // 2
    ang = 1000 * np.asarray(t, np.float64)[:, None] * 10000.0 ** (-np.arange(half) / half)
    f = np.concatenate([np.cos(ang), np.sin(ang)], -1)
    c = silu(f @ P["time_w1"] + P["time_b1"]) @ P["time_w2"] + P["time_b2"]
    c = c + np.asarray(pooled, np.float64) @ P["text_proj"] + P["text_bias"]

    graphdef, state = nnx.split(model.blocks)
    blocks = jax.jit(lambda h, c: jax.lax.scan(lambda h, st: (nnx.merge(graphdef, st)(h, _Ctx(cfg, c, text, valid)),
                                                              None), h, state)[0])
    h = np.asarray(blocks(jnp.asarray(h0, jnp.float32), jnp.asarray(c, jnp.float32)), np.float64)
    shift, scale = np.split(silu(c) @ P["final_ada"] + P["final_ada_bias"], 2, -1)
    out = (rms(h) * (1 + scale[:, None]) + shift[:, None]) @ P["out"] + P["out_bias"]  # [B, S, P]
    want = np.zeros_like(xn)
    for s, (i, j, k) in enumerate((i, j, k) for i in range(T) for j in range(H) for k in range(W)):
        want[:, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw] = out[:, s].reshape(B, pt, ph, pw, C)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    # the unrolled layer loop (scan_layers=False) is the same network: layer i's weights, not layer 0's
    unrolled = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: VideoDiT(dataclasses.replace(cfg, scan_layers=False),
                                                                       rngs=nnx.Rngs(0)))), nnx.state(model))
    np.testing.assert_allclose(dit_apply(unrolled, x, t), got, rtol=1e-5, atol=1e-5)


def test_dit_sublayers_against_float64_numpy():
    """SelfAttention ('full' layout), CrossAttention and SwiGLU against float64 NumPy: q, k, v = x @ wq, wk, wv;
    RMS-normed q and k scaled by q_norm and k_norm; 3D RoPE (rotate-half per (t, h, w) block) on q and k of the
    self-attention only; softmax(q·k / √K) over the valid keys; @ wo. The block tests use the sublayers themselves as
    reference, so RoPE left off the keys or keys normed with q_norm passed every test."""
    from models.video.layers import SelfAttention, SwiGLU

    cfg = DIT
    D, N, K, E, B, L = cfg.d_model, cfg.n_heads, cfg.hd, cfg.text_dim, 2, 6
    grid, split, theta, eps = (3, 2, 4), cfg.rope_dims, cfg.rope_theta, cfg.norm_eps
    kw = dict(qk_norm=True, std=0.3, dtype=jnp.float32)
    sa = randomize(SelfAttention(D, N, K, **kw, rngs=nnx.Rngs(0)), scale=0.3)
    ca = randomize(CrossAttention(D, E, N, K, **kw, rngs=nnx.Rngs(1)), scale=0.3)
    S = math.prod(grid)
    x = jax.random.normal(jax.random.key(0), (B, S, D))
    text, valid, _ = text_inputs(B, L, E)
    got_sa = sa(x, grid, "full", rope_split=split, rope_theta=theta, cd=jnp.float32, eps=eps)
    got_ca = ca(x, text, valid, cd=jnp.float32, eps=eps)

    f64 = lambda a: np.asarray(a[...] if isinstance(a, nnx.Variable) else a, np.float64)  # noqa: E731
    rms = lambda a, w: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * f64(w)  # noqa: E731
    pos = grid_positions(grid)

    def rope(a):  # [B, S, N, K]
        out, start = [], 0
        for axis, size in enumerate(split):
            part = a[..., start:start + size]
            ang = pos[:, axis, None] * (1.0 / theta ** (np.arange(0, size, 2) / size))
            c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
            lo, hi = part[..., :size // 2], part[..., size // 2:]
            out.append(np.concatenate([lo * c - hi * s, hi * c + lo * s], -1))
            start += size
        return np.concatenate(out, -1)

    def attend(q, k, v, mask_BQK, wo):
        s = np.einsum("bqnk,bsnk->bnqs", q, k) / np.sqrt(K)
        s = np.where(mask_BQK[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bnqs,bsnk->bqnk", p / p.sum(-1, keepdims=True), v)
        return np.einsum("bqnk,nkd->bqd", o, f64(wo))

    xs, ts = f64(x), f64(text)
    q = rope(rms(np.einsum("bsd,dnk->bsnk", xs, f64(sa.wq)), sa.q_norm))
    k = rope(rms(np.einsum("bsd,dnk->bsnk", xs, f64(sa.wk)), sa.k_norm))
    v = np.einsum("bsd,dnk->bsnk", xs, f64(sa.wv))
    want_sa = attend(q, k, v, np.ones((B, S, S), bool), sa.wo)
    q = rms(np.einsum("bsd,dnk->bsnk", xs, f64(ca.wq)), ca.q_norm)
    k = rms(np.einsum("ble,enk->blnk", ts, f64(ca.wk)), ca.k_norm)
    v = np.einsum("ble,enk->blnk", ts, f64(ca.wv))
    want_ca = attend(q, k, v, np.broadcast_to(np.asarray(valid)[:, None], (B, S, L)), ca.wo)
    np.testing.assert_allclose(np.asarray(got_sa, np.float64), want_sa, rtol=1e-4, atol=1e-4 * np.abs(want_sa).max())
    np.testing.assert_allclose(np.asarray(got_ca, np.float64), want_ca, rtol=1e-4, atol=1e-4 * np.abs(want_ca).max())
    # and the MLP: SiLU on the w_gate branch (swapping the branches passed too; it matters to ported weights)
    mlp = randomize(SwiGLU(D, cfg.mlp_dim, std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(2)), scale=0.3)
    g, u = xs @ f64(mlp.w_gate), xs @ f64(mlp.w_up)
    want = (g / (1 + np.exp(-g)) * u) @ f64(mlp.w_down)
    np.testing.assert_allclose(np.asarray(mlp(x, jnp.float32), np.float64), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_vae_loss_is_mse_plus_weighted_kl_with_logvar_clipped():
    """vae_loss = mse + kl_weight·KL and psnr = 10·log10(2² / mse), recomputed in float64 from its own metrics; the
    encoder's logvar is clipped to [-20, 10] as its docstring says (exp(50) posteriors otherwise). Neither the weight,
    the peak nor the clip was seen by a test: dropping any of them passed."""
    from models.video.vae import vae_loss

    cfg = VAEConfig(channels=(8,), latent_channels=4, spatial_factor=2, temporal_factor=1, kl_weight=0.25)
    vae = VideoVAE(cfg, rngs=nnx.Rngs(0))
    Z = cfg.latent_channels
    x = jax.random.uniform(jax.random.key(0), (1, 1, 8, 8, 3), minval=-1, maxval=1)
    loss, m = vae_loss(vae, x, jax.random.key(1))
    mse, kl = float(m["mse"]), float(m["kl"])
    assert kl > 0.01 and mse > 0.01
    assert float(loss) == pytest.approx(mse + 0.25 * kl, rel=1e-5)
    assert float(m["psnr"]) == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-5)
    from models.video.vae import psnr

    assert float(psnr(0.0)) == pytest.approx(10 * np.log10(4e12), rel=1e-6)  # identical videos: the documented cap
    for bias, clipped in ((50.0, 10.0), (-50.0, -20.0)):
        vae.encoder.conv_out.b[...] = vae.encoder.conv_out.b[...].at[Z:].set(bias)
        np.testing.assert_array_equal(vae.encode(x)[1], clipped)


def test_vae_res_block_is_a_residual_around_two_norm_silu_convolutions():
    """ResBlock(x) = x + conv2(silu(norm2(conv1(silu(norm1(x)))))) with per-position RMSNorms (causal_conv3d is pinned
    by its own test); dropping the residual passed every VAE test (shapes, causality, folds)."""
    from models.video.vae import ResBlock, causal_conv3d

    blk = randomize(ResBlock(8, VAE, rngs=nnx.Rngs(0)), scale=0.3)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 8))
    norm = lambda h, w: h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + VAE.norm_eps) * w  # noqa: E731
    h = causal_conv3d(jax.nn.silu(norm(x, blk.norm1[...])), blk.conv1.w[...], blk.conv1.b[...])
    want = x + causal_conv3d(jax.nn.silu(norm(h, blk.norm2[...])), blk.conv2.w[...], blk.conv2.b[...])
    assert float(jnp.abs(want - x).max()) > 0.1
    np.testing.assert_allclose(blk(x), want, rtol=1e-5, atol=1e-5)


def test_t2v_loss_passes_caption_ids_to_the_alignment_loss_and_weights_it():
    """batch["caption_id"] reaches info_nce as its labels (duplicate captions are positives, not negatives), and the
    loss adds that InfoNCE × align_weight; dropping either passed every test."""
    from unittest import mock

    import models.video.t2v as t2v

    cfg = TextToVideoConfig(dit=DIT, text=TEXT, align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
    model = host_random(lambda: t2v.TextToVideo(cfg, rngs=nnx.Rngs(0)))
    tok = jnp.asarray([[2, 4, 0, 0, 0, 0, 0, 0], [2, 4, 0, 0, 0, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]])
    ids = jnp.asarray([3, 3, 7])
    batch = {"latents": jax.random.normal(jax.random.key(0), (3, 3, 8, 8, 4)), "tokens": tok, "caption_id": ids}
    seen, info_nce = [], t2v.info_nce

    def spy(video, text, scale, labels=None):
        seen.append(labels)
        return info_nce(video, text, scale, labels)

    def run(b):  # jitted (eagerly every op compiles on its own), the labels info_nce saw as an output
        out = t2v.t2v_loss(model, b, jax.random.key(1), jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0]))
        return out, seen[0]

    with mock.patch.object(t2v, "info_nce", spy):
        (loss, m), labels = jax.jit(run)(batch)
    np.testing.assert_array_equal(labels, ids)
    # and the total is diffusion + align_weight·InfoNCE (the weight dropped passed too)
    assert float(loss) == pytest.approx(float(m["diffusion"]) + cfg.align_weight * float(m["align"]), rel=1e-6)
    assert float(m["align"]) > 0.1


@pytest.mark.parametrize("which", ["vae", "dit"])
def test_vae_and_dit_losses_take_forward_mode_under_plain_autodiff(which):
    """jax.jvp of the VAE loss and of the DiT's diffusion loss (rms_norm, glu_linear, projections, attention on its
    path) under models.plain_autodiff against a finite difference and the default gradient; without the switch both
    raised JAX's jvp-of-custom_vjp TypeError."""
    from models.video import vae_loss
    from models.video.diffusion import diffusion_loss

    if which == "vae":
        cfg = VAEConfig(channels=(8, 16), latent_channels=4, temporal_factor=2)
        graphdef, params = nnx.split(randomize(VideoVAE(cfg, rngs=nnx.Rngs(0))))
        video = jax.random.uniform(jax.random.key(0), (1, 5, 8, 8, 3), minval=-1, maxval=1)
        loss = lambda p: vae_loss(nnx.merge(graphdef, p), video, jax.random.key(1))[0]  # noqa: E731
        check_forward_mode(loss, params, grads_too=False)
    else:
        graphdef, params = nnx.split(randomize(VideoDiT(DIT, rngs=nnx.Rngs(0))))
        text, valid, pooled = text_inputs(2)
        x0 = jax.random.normal(jax.random.key(2), (2, *DIT.latent_shape, DIT.latent_channels))
        pred = lambda p: lambda x, t: nnx.merge(graphdef, p)(x, t, text, valid, pooled)  # noqa: E731
        loss = lambda p: diffusion_loss(pred(p), x0, jax.random.key(3), DiffusionConfig())[0]  # noqa: E731
        check_forward_mode(loss, params, grads_too=False)


def bf16_token_sums(fn, *args, tokens: int):
    """The reduce_sums of `fn`'s jaxpr (sub-jaxprs included) that sum bf16 operands over >= `tokens` elements: the
    bias / gate / modulation gradients that must be summed in float32."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            for p in e.params.values():
                for s in p if isinstance(p, list | tuple) else [p]:
                    if hasattr(s, "consts") or hasattr(s, "eqns"):  # a closed or open sub-jaxpr (scan, custom_vjp)
                        walk(getattr(s, "jaxpr", s))
            if e.primitive.name == "reduce_sum" and e.invars[0].aval.dtype == jnp.bfloat16:
                if math.prod(e.invars[0].aval.shape[a] for a in e.params["axes"]) >= tokens:
                    found.append((e.invars[0].aval.shape, e.params["axes"]))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_modulate_is_float32_inside_and_sums_its_gradients_in_float32():
    # adaLN-Zero's scales start at 0 and stay small: in bf16, 1 + scale moves in steps of 2^-7 (|scale| < 2^-8 was
    # lost), and d shift / d scale, sums over the S tokens, were summed in bf16 (0.8-0.9% of the largest off)
    rng, B, S, D = np.random.default_rng(0), 2, 4096, 16
    x, g = (np.asarray(jnp.asarray(rng.normal(m, 1, (B, S, D)), jnp.bfloat16), np.float64) for m in (0, 0.5))
    shift, scale = (np.asarray(jnp.asarray(rng.normal(0, 0.01, (B, D)), jnp.bfloat16), np.float64) for _ in "ab")
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731  (exact: every array above is bf16-representable)
    out, vjp = jax.vjp(modulate, bf(x), bf(shift), bf(scale))
    _, dshift, dscale = vjp(bf(g))
    ref = x * (1 + scale[:, None]) + shift[:, None]
    assert out.dtype == jnp.bfloat16
    # one rounding of the exact value: within half a bf16 ulp, 2^-8 relative (it was off by up to 511x near 0)
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - ref), 2.0 ** -8 * np.abs(ref) + 1e-30)
    for got, want in ((dshift, g.sum(1)), (dscale, (g * x).sum(1))):  # one bf16 rounding of the float64 sums
        assert np.abs(np.asarray(got, np.float64) - want).max() <= 2.0 ** -8 * np.abs(want).max()


def test_bf16_dit_sums_bias_and_gate_gradients_over_tokens_in_float32():
    cfg = dataclasses.replace(DIT, dtype="bfloat16")
    model = randomize(VideoDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    B = 2
    x = jax.random.normal(jax.random.key(0), (B, 3, 8, 8, 4))
    text, valid, pooled = text_inputs(B, E=cfg.text_dim)
    t = jnp.linspace(0.1, 0.9, B)
    # a cotangent with a mean, bf16-representable: out_bias's gradient is its exact sum over the B·S tokens
    g = np.asarray(jnp.asarray(np.random.default_rng(1).normal(0.5, 1, x.shape), jnp.bfloat16), np.float32)

    def grads(s):
        _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s)(x, t, text, valid, pooled), s)
        return vjp(jnp.asarray(g))[0]

    want = patchify(np.asarray(g, np.float64), cfg.patch).reshape(-1, cfg.patch_dim).sum(0)
    got = np.asarray(jax.jit(grads)(state)["out_bias"][...], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # bf16 sums: ~1e-2 off
    S = math.prod(cfg.grid)
    assert bf16_token_sums(grads, state, tokens=S) == []  # patch / out biases, gates, shift / scale: all float32


def test_vae_conv_resample_and_dit_under_rank_promotion_raise():
    """jax_numpy_rank_promotion='raise' (researchers' shape check) refused the VAE and the DiT: the convolutions' and
    resamplers' [O] biases, the DiT's conditioning biases [D] on [B, D] and the aligner's patch bias were broadcast
    implicitly. Broadcast explicitly, the same outputs bit for bit."""
    from models.video.align import Aligner
    from models.video.vae import Resample, causal_conv3d

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (1, 3, 4, 4, 2)), jnp.float32)
    w, b = jnp.asarray(rng.standard_normal((2, 3, 3, 2, 4)), jnp.float32), jnp.asarray(rng.standard_normal(4),
                                                                                       jnp.float32)
    down = Resample(2, 4, True, True, False, rngs=nnx.Rngs(0), dtype=jnp.float32)
    dit = host_random(lambda: VideoDiT(DIT, rngs=nnx.Rngs(0)))
    al = host_random(lambda: Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=16), DIT,
                                     rngs=nnx.Rngs(0)))
    z = jax.random.normal(jax.random.key(0), (2, *DIT.latent_shape, DIT.latent_channels))
    t = jnp.asarray([0.3, 0.7])
    run = lambda: (causal_conv3d(x, w, b), down(x), dit_apply(dit, z, t), jax.jit(al.embed_video)(z))  # noqa: E731
    want = run()
    with jax.numpy_rank_promotion("raise"):
        got = run()
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_vae_loss_of_a_float64_video_under_x64_is_float32():
    """A float64 video under jax_enable_x64 (numpy frames / 127.5 - 1) made vae_loss's loss, mse and psnr float64: the
    float32 reconstruction minus the float64 video. Now the float32 loss of the same video in float32."""
    from models.video.vae import vae_loss

    vae = VideoVAE(VAEConfig(channels=(8,), latent_channels=4, spatial_factor=2, temporal_factor=1),
                   rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 8, 8, 3))
    want = jax.jit(lambda x: vae_loss(vae, x, jax.random.key(1)))(jnp.asarray(x, jnp.float32))
    with jax.enable_x64(True):
        got = jax.jit(lambda x: vae_loss(vae, x, jax.random.key(1)))(jnp.asarray(x, jnp.float64))
    assert {v.dtype for v in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


def test_bf16_vae_sums_bias_gradients_over_positions_in_float32():
    """Under bf16 compute the VAE's convolution and resampling biases were added as b.astype(bf16): their gradients,
    sums of the cotangent over every B·T·H·W position, were summed in bf16 (conv_out.b here 8.3% off its exact sum;
    the decoder's biases up to 11% off float32's in a random VAE). They are now added in float32 (add_bias), as the
    DiT's are."""
    from models.video.vae import space_to_depth, vae_loss

    cfg = dataclasses.replace(VAE, dtype="bfloat16")
    graphdef, state = nnx.split(randomize(VideoVAE(cfg, rngs=nnx.Rngs(0)), scale=0.05))
    z = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, cfg.latent_channels))
    # a cotangent with a mean, bf16-representable: conv_out's bias gradient is its exact sum over the positions
    g = np.asarray(jnp.asarray(np.random.default_rng(1).normal(0.5, 1, (2, 9, 16, 16, 3)), jnp.bfloat16), np.float32)

    def grads(s):
        _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s).decode(z), s)
        return vjp(jnp.asarray(g))[0]

    want = np.asarray(space_to_depth(np.asarray(g, np.float64)), np.float64).reshape(-1, 12).sum(0)
    got = np.asarray(jax.jit(grads)(state)["decoder"]["conv_out"]["b"][...], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # bf16 sums: ~1e-2 off
    x = jnp.tanh(jax.random.normal(jax.random.key(2), (2, 5, 16, 16, 3)))
    loss_grads = jax.grad(lambda s: vae_loss(nnx.merge(graphdef, s), x, jax.random.key(3))[0])
    assert bf16_token_sums(loss_grads, state, tokens=64) == []  # conv and resample biases: all float32
