"""Cross-modal alignment: after a few steps on MovingShapes the InfoNCE loss of matched (clip, caption)
pairs is far below that of shuffled pairs, and the dual encoder retrieves clips' own captions above chance (R@1)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data.moving_shapes import MovingShapesConfig, MovingShapesSource, dataset
from models import plain_autodiff
from models.config import TransformerConfig
from models.video import AlignConfig, Aligner, DiTConfig, TextEncoder, info_nce, recall_at_1
from models.video.align import capped_exp, nearest_caption
from tests.test_custom_vjps import check_forward_mode

DIT = DiTConfig(latent_shape=(3, 8, 8), latent_channels=3, patch=(1, 2, 2), d_model=32, n_layers=1, n_heads=2,
                mlp_dim=64, text_dim=32)
TEXT = TransformerConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, mlp_dim=64, max_seq_len=8)
DATA = MovingShapesConfig()


def pseudo_latents(video_BTHWC):
    """Stand-in for VAE latents: frames 0, 4, 8, average-pooled 4×4 → [B, 3, 8, 8, 3]."""
    v = video_BTHWC[:, ::4]
    B, T, H, W, C = v.shape
    return v.reshape(B, T, H // 4, 4, W // 4, 4, C).mean((3, 5))


class DualEncoder(nnx.Module):
    def __init__(self, rngs):
        self.text = TextEncoder(TEXT, rngs=rngs)
        self.align = Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=32), DIT, rngs=rngs)

    def embed(self, z, tokens):
        return self.align.embed_video(z), self.align.embed_text(self.text(tokens).pooled_BE)


def perturbed_aligner():
    """An Aligner with every parameter moved by N(0, 0.3²) noise off its init (attention weights past their 0.02
    init: no flat softmax), the noise drawn in one jitted program (eagerly: a compile per op and parameter shape)."""
    al = Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=16), DIT, rngs=nnx.Rngs(0))
    nnx.update(al, jax.jit(lambda st: jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                                                   st))(nnx.state(al, nnx.Param)))
    return al


def test_info_nce_counts_duplicate_captions_as_positives():
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    v = unit(jax.random.normal(jax.random.key(0), (4, 8)))
    t = unit(jax.random.normal(jax.random.key(1), (4, 8)))
    labels = jnp.asarray([0, 1, 1, 2])  # clips 1 and 2 have the same caption
    swap = t[jnp.asarray([0, 2, 1, 3])]  # which of the two caption copies pairs with which clip is arbitrary
    np.testing.assert_allclose(info_nce(v, t, 10.0, labels), info_nce(v, swap, 10.0, labels), rtol=1e-6)
    assert abs(float(info_nce(v, t, 10.0)) - float(info_nce(v, swap, 10.0))) > 1e-3  # without labels it is not


def _clip_loss_reference(v, t, scale, labels=None):
    """Symmetric CLIP loss in float64 loops: clip i's cross-entropy over all captions and caption j's over all
    clips, each with its target spread evenly over the pairs whose labels match (the diagonal without labels)."""
    v, t = np.asarray(v, np.float64), np.asarray(t, np.float64)
    B = len(v)
    lab = np.arange(B) if labels is None else np.asarray(labels)
    s = scale * v @ t.T  # s[i, j]: clip i against caption j

    def ce(row, positives):
        logp = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
        return -np.mean(logp[positives])

    v2t = np.mean([ce(s[i], lab == lab[i]) for i in range(B)])
    t2v = np.mean([ce(s[:, j], lab == lab[j]) for j in range(B)])
    return 0.5 * (v2t + t2v), v2t, t2v


@pytest.mark.parametrize("labels", [None, [0, 1, 1, 2, 2, 2]], ids=["distinct", "duplicates"])
def test_info_nce_is_the_symmetric_clip_loss(labels):
    """info_nce against an independent float64 loop, on random clip / caption embeddings of different scales
    (so that the logit matrix is far from symmetric and the two directions differ)."""
    v = jax.random.normal(jax.random.key(0), (6, 8)) * jnp.linspace(0.5, 2.0, 6)[:, None]
    t = jax.random.normal(jax.random.key(1), (6, 8))
    lab = None if labels is None else jnp.asarray(labels)
    want, v2t, t2v = _clip_loss_reference(v, t, 3.0, labels)
    assert abs(v2t - t2v) > 0.1  # one direction alone is ~1e4 times the tolerance below away from the average
    np.testing.assert_allclose(float(info_nce(v, t, 3.0, lab)), want, rtol=1e-5)
    # the loss is symmetric in its arguments: swapping clips and captions transposes the logits
    np.testing.assert_allclose(float(info_nce(t, v, 3.0, lab)), want, rtol=1e-5)


def test_alignment_loss_lower_for_matched_than_shuffled_pairs():
    model = DualEncoder(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p, z, tok, labels):
        m = nnx.merge(graphdef, p)
        v, t = m.embed(z, tok)
        return info_nce(v, t, m.align.logit_scale(), labels)

    @jax.jit
    def step(p, s, z, tok, labels):
        loss, g = jax.value_and_grad(loss_fn)(p, z, tok, labels)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    # evaluation: one clip per seen caption, so every caption in the batch is distinct
    src = MovingShapesSource(DATA, "train", 40)
    ev = [src[i] for i in range(40)]
    z_ev = pseudo_latents(np.stack([r["video"] for r in ev]))
    tok_ev = np.stack([r["tokens"] for r in ev])
    shuffled = np.roll(tok_ev, 5, axis=0)
    evaluate = jax.jit(loss_fn)
    before = float(evaluate(params, z_ev, tok_ev, None))

    ds = dataset(DATA, "train", batch=32, seed=1)
    for i in range(40):
        b = ds[i]
        params, opt_state, _ = step(params, opt_state, pseudo_latents(b["video"]), b["tokens"], b["combo"])

    matched, mismatched = float(evaluate(params, z_ev, tok_ev, None)), float(evaluate(params, z_ev, shuffled, None))
    assert matched < before - 0.5, (before, matched)
    assert matched < mismatched - 1.0, (matched, mismatched)

    # the same dual encoder as a retrieval metric: each clip against all 40 captions, chance 1/40
    v, t = jax.jit(lambda p: nnx.merge(graphdef, p).embed(z_ev, tok_ev))(params)
    r1 = float(recall_at_1(v, t, jnp.arange(40)))
    sims = np.asarray(v, np.float64) @ np.asarray(t, np.float64).T
    assert r1 == pytest.approx(np.mean(sims.argmax(1) == np.arange(40)), abs=1e-6)  # float32 mean of hits
    assert r1 >= 4 / 40, r1  # measured 7 / 40 after these 40 steps


def test_recall_at_1_picks_each_clips_own_caption_among_more_candidates():
    """K candidate captions for B clips (the experiment ranks all 48 captions, targets are caption ids): a hit is a
    clip whose most similar caption is its target, whatever the other clips retrieve."""
    captions = jnp.eye(5, 8)  # 5 orthogonal caption embeddings
    target = jnp.asarray([3, 0, 4])
    video = captions[target] + 0.1 * captions[jnp.asarray([0, 1, 2])]  # near each target, nudged elsewhere
    assert float(recall_at_1(video, captions, target)) == 1.0
    assert float(recall_at_1(video, captions, jnp.asarray([3, 1, 2]))) == pytest.approx(1 / 3)


def test_recall_at_1_names_targets_outside_the_candidates_and_candidates_of_another_width():
    """A target outside [0, K) matched no caption and counted as a miss, silently (1-based ids: 2 / 3 here where all
    three clips find their caption); candidates of another width failed as a bare dot_general TypeError."""
    captions = jnp.eye(3, 4)
    for target in (jnp.asarray([1, 2, 3]), np.asarray([0, 1, -1])):
        with pytest.raises(ValueError, match=r"recall_at_1: target_B must hold caption indices in \[0, K=3\)"):
            recall_at_1(captions, captions, target)
    with pytest.raises(ValueError, match=r"recall_at_1: captions_KJ must be \[K, J=4\] .*, got \[3, 5\]"):
        recall_at_1(captions, jnp.eye(3, 5), jnp.arange(3))
    assert float(recall_at_1(captions, captions, jnp.arange(3))) == 1.0
    assert float(jax.jit(recall_at_1)(captions, captions, jnp.asarray([1, 2, 3]))) == 0.0  # traced: not checked


def test_recall_at_1_counts_a_tie_for_the_top_as_a_miss():
    """argmax broke a tie for the most similar caption towards the lowest index: a collapsed text tower (every caption
    one embedding) scored R@1 = 100% on clips of caption 0 (the eval's combo 0, 'a red square moving left', is a seen
    caption) and a clip tied between its caption and a later one was a hit, a lower one a miss. A clip retrieves its
    caption only when no other candidate is as similar (nearest_caption: -1 for a tie, as the eval's retrieve)."""
    collapsed = jnp.ones((5, 4)) / 2
    video = jnp.eye(3, 4)
    assert float(recall_at_1(video, collapsed, jnp.zeros(3, int))) == 0.0
    assert np.asarray(nearest_caption(video, collapsed)).tolist() == [-1, -1, -1]
    captions = jnp.asarray([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # captions 0 and 1 tie for clip 0
    assert float(recall_at_1(video[:1], captions, jnp.asarray([0]))) == 0.0
    assert float(recall_at_1(video[:1], captions, jnp.asarray([1]))) == 0.0
    assert np.asarray(nearest_caption(video, captions)).tolist() == [-1, 2, -1]  # clip 2 ties 0-similar with all
    assert float(recall_at_1(video[:2], captions, jnp.asarray([0, 2]))) == 0.5
    assert float(jax.jit(recall_at_1)(video[1:2], captions, jnp.asarray([2]))) == 1.0


@pytest.mark.parametrize("shape", [(2, 6, 4, 8, 3), (2, 2, 8, 8, 3), (2, 3, 8, 8, 4), (3, 8, 8, 3)])
def test_embed_video_names_latents_of_another_shape(shape):
    """The video tower rotates tokens by the DiT's grid: latents [2, 6, 4, 8, 3] (as many tokens as (3, 8, 8)) were
    embedded with every token at another position, silently; other shapes failed inside RoPE or a dot."""
    align = Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=32), DIT, rngs=nnx.Rngs(0))
    assert jax.eval_shape(lambda: align.embed_video(jnp.zeros((2, 3, 8, 8, 3)))).shape == (2, 32)  # traced, not run
    with pytest.raises(ValueError, match=r"Aligner.embed_video: latents .* DiTConfig.latent_shape=\(3, 8, 8\)"):
        align.embed_video(jnp.zeros(shape))


def test_a_logit_scale_past_its_cap_can_come_back():
    """min(exp(s), cap) had a zero gradient past the cap: a log-scale that overshot it stayed there whatever the loss
    wanted. Past the cap the scale is still the cap, and a loss that grows with the scale still lowers it (not one
    that would raise it further); below the cap the gradient is exp(s), as autodiff's."""
    from models.video.align import capped_exp

    cap = 100.0
    up = jnp.float32(np.log(150.0))
    assert float(capped_exp(up, cap)) == cap
    assert float(jax.grad(lambda s: capped_exp(s, cap))(up)) == pytest.approx(cap)  # lowering it lowers the loss
    assert float(jax.grad(lambda s: -capped_exp(s, cap))(up)) == 0.0  # raising it would not change the value
    s = jnp.float32(np.log(20.0))
    assert float(jax.grad(lambda s: 3 * capped_exp(s, cap))(s)) == pytest.approx(3 * 20.0, rel=1e-6)
    for _ in range(5):  # descent on a loss preferring a small scale gets back under the cap
        up = up - 0.2 * jnp.sign(jax.grad(lambda s: capped_exp(s, cap))(up))
    assert float(jnp.exp(up)) < cap


def test_embed_video_mean_pools_the_normed_tokens_then_projects_to_a_unit_vector():
    """embed_video = unit(mean_s(rms(x_s)·final_norm) @ video_proj), x the encoder blocks' tokens (run here as
    modules, patchify pinned in test_video_models): a max-pool in place of the documented mean passed every test."""
    from models.video.layers import matmul, patchify

    al = perturbed_aligner()
    z = jax.random.normal(jax.random.key(2), (2, 3, 8, 8, 3))

    @nnx.jit  # the blocks' tokens and the embedding in one program (eagerly each op compiles on its own)
    def run(al):
        x = matmul(patchify(z, DIT.patch), al.patch_embed, jnp.float32) + al.patch_bias[...]
        for blk in al.blocks:
            x = blk(x, DIT.grid, al.rope_split)
        return x, al.embed_video(z)

    x, got = run(al)
    x = np.asarray(x, np.float64)
    pooled = (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * np.asarray(al.final_norm[...])).mean(1)
    want = pooled @ np.asarray(al.video_proj[...], np.float64)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5)


def test_info_nce_and_recall_at_1_name_inputs_of_another_shape():
    """Clip i pairs with caption i: text of one row (or labels of one, or labels [B, 1]) broadcast against the batch
    and gave a loss silently (24.4, 109.7 and 15.2 on these); a recall target [B, 1] compared every clip with every
    target (0.25 here) and one of length 1 broadcast. Each now names the argument and the shape it needs."""
    v = jax.random.normal(jax.random.key(0), (4, 8))
    t = jax.random.normal(jax.random.key(1), (4, 8))
    for text, labels, name in ((t[:1], None, "text_BJ"), (t[:3], None, "text_BJ"), (t[0], None, "text_BJ"),
                               (t, jnp.asarray([0]), "labels_B"), (t, jnp.arange(4)[:, None], "labels_B")):
        with pytest.raises(ValueError, match=rf"info_nce: .*{name}"):
            info_nce(v, text, 10.0, labels)
    with pytest.raises(ValueError, match=r"info_nce: video_BJ and text_BJ must be \[B, J\]"):
        info_nce(v[0], t[0], 10.0)
    for target in (jnp.arange(4)[:, None], jnp.arange(1)):
        with pytest.raises(ValueError, match=r"recall_at_1: target_B must be \[B=4\]"):
            recall_at_1(v, t, target)
    # legitimate inputs are unchanged: one pair (its loss is 0) and K != B candidates under jit
    assert float(info_nce(v[:1], t[:1], 10.0)) == 0.0
    assert float(jax.jit(info_nce)(v, t, 10.0, jnp.asarray([0, 1, 1, 2]))) > 0
    assert 0.0 <= float(jax.jit(recall_at_1)(v, t[:3], jnp.asarray([0, 2, 1, 0]))) <= 1.0


@pytest.mark.parametrize("shape", [(3, 33), (32,), (2, 3, 32)])
def test_embed_text_names_captions_of_another_shape(shape):
    """A pooled caption of another width failed as a bare dot_general TypeError naming neither the argument nor
    text_dim; one caption [E] came back as [J] and a [2, 3, E] stack as [2, 3, J], not a batch of embeddings."""
    align = Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=16), DIT, rngs=nnx.Rngs(0))
    assert align.embed_text(jnp.ones((3, DIT.text_dim))).shape == (3, 16)
    with pytest.raises(ValueError, match=r"Aligner.embed_text: pooled_BE must be \[B, E\] with E = "
                                         r"DiTConfig.text_dim=32 .*, got " + re.escape(str(list(shape)))):
        align.embed_text(jnp.ones(shape))


def test_logit_scale_starts_at_the_inverse_temperature_and_is_capped():
    """logit_scale() is 1 / init_temperature at init and max_logit_scale past it (AlignConfig's docstring). Only
    capped_exp itself was tested: an Aligner reading exp(log_scale) uncapped passed every test, and one initialised
    at the temperature itself (scale 0.07, logits ~200x too flat) passed all but the slow training test."""
    cfg = AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=16, init_temperature=0.05, max_logit_scale=50.0)
    align = Aligner(cfg, DIT, rngs=nnx.Rngs(0))
    assert float(align.logit_scale()) == pytest.approx(1 / 0.05, rel=1e-6)
    align.log_scale[...] = jnp.float32(np.log(80.0))
    assert float(align.logit_scale()) == 50.0


def test_the_video_tower_attends_across_every_frame_and_position():
    """The tower's blocks are full 3D attention (the module docstring): one token changed at frame 0 moves every token
    of every frame after one block. Spatial-only attention (no frame sees another) passed every test."""
    al = perturbed_aligner()
    x = jax.random.normal(jax.random.key(0), (1, math.prod(DIT.grid), 32))
    moved = nnx.jit(lambda blk: jnp.abs(blk(x.at[:, 0].add(3.0), DIT.grid, al.rope_split)
                                        - blk(x, DIT.grid, al.rope_split)).max(-1)[0])(al.blocks[0])
    assert float(moved.min()) > 1e-4, moved.reshape(DIT.grid)


def test_embed_text_projects_the_pooled_caption_to_a_unit_vector():
    """embed_text = unit(pooled @ text_proj) (float64 here): without the normalisation each caption's embedding norm
    scaled its logits, a temperature of its own per caption; the video side's test could not see it, and every
    alignment test passed."""
    al = Aligner(AlignConfig(d_model=32, n_heads=2, mlp_dim=64, embed_dim=16), DIT, rngs=nnx.Rngs(0))
    pooled = 3.0 * jax.random.normal(jax.random.key(0), (4, DIT.text_dim))
    want = np.asarray(pooled, np.float64) @ np.asarray(al.text_proj[...], np.float64)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(al.embed_text(pooled), np.float64), want, atol=1e-6)


def test_alignment_loss_takes_forward_mode_under_plain_autodiff():
    """jax.jvp of the dual encoder's InfoNCE (rms_norm, attention, glu_linear, capped_exp on its path) under
    models.plain_autodiff against a finite difference and the default path's value and gradient."""
    model = DualEncoder(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    z = jax.random.normal(jax.random.key(0), (3, 3, 8, 8, 3))
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 1, 16)

    def loss(p):
        m = nnx.merge(graphdef, p)
        return info_nce(*m.embed(z, tokens), m.align.logit_scale())

    check_forward_mode(loss, params)


def test_capped_exp_under_plain_autodiff_has_the_plain_gradient_past_its_cap():
    """The one custom VJP whose gradient is not its function's (documented in models.plain_autodiff): below the cap
    both give exp(s); past it the custom one lets a positive cotangent lower the scale, the plain min() gives 0."""
    for s, want_default, want_plain in ((1.0, np.exp(1.0), np.exp(1.0)), (3.0, 10.0, 0.0)):
        got = jax.grad(capped_exp)(s, 10.0)
        with plain_autodiff():
            plain = jax.grad(capped_exp)(s, 10.0)
        np.testing.assert_allclose([got, plain], [want_default, want_plain], rtol=1e-6)


def test_info_nce_under_jax_enable_x64_is_the_float32_loss():
    """Under jax_enable_x64 the targets (a bool count divided by an int count) were float64, and so was the loss
    (and the t2v loss it adds to) for float32 embeddings."""
    v, t = (jax.random.normal(jax.random.key(i), (4, 8)) for i in (0, 1))
    labels = jnp.asarray([0, 1, 1, 2], jnp.int32)
    want = [info_nce(v, t, 10.0), info_nce(v, t, 10.0, labels)]
    with jax.enable_x64(True):
        got = [info_nce(v, t, 10.0), info_nce(v, t, 10.0, labels)]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_info_nce_and_recall_at_1_take_labels_and_targets_as_lists():
    """Caption ids as a Python list passed the shape checks, then failed as bare TypeErrors: info_nce's 'list indices
    must be integers or slices, not tuple', recall_at_1's 'unsupported operand type(s) for ==' (a miss count)."""
    v = jnp.eye(3, 4)
    assert float(info_nce(v, v, 10.0, [0, 1, 0])) == pytest.approx(float(info_nce(v, v, 10.0, jnp.asarray([0, 1, 0]))))
    assert float(recall_at_1(v, jnp.eye(5, 4), [0, 1, 4])) == pytest.approx(2 / 3)


def test_info_nce_with_labels_under_strict_dtype_promotion():
    """jax_numpy_dtype_promotion='strict' refused info_nce given labels (and so t2v_loss with caption ids): the bool
    positives were divided by their float32 counts. Cast explicitly, the same loss."""
    rng = np.random.default_rng(0)
    v, t = (jnp.asarray(rng.standard_normal((4, 8)), jnp.float32) for _ in range(2))
    labels = jnp.asarray([0, 1, 0, 2])
    want = info_nce(v, t, jnp.float32(10.0), labels)
    with jax.numpy_dtype_promotion("strict"):
        got = info_nce(v, t, jnp.float32(10.0), labels)
    np.testing.assert_array_equal(got, want)


def test_info_nce_and_recall_at_1_name_an_empty_batch():
    """An empty batch (B = 0) gave NaN from both, silently (a mean over no pairs): a filter that dropped every clip
    logged a NaN alignment loss and R@1 with no word of why."""
    with pytest.raises(ValueError, match=r"info_nce: .*empty batch"):
        info_nce(jnp.zeros((0, 8)), jnp.zeros((0, 8)), 10.0)
    with pytest.raises(ValueError, match=r"recall_at_1: .*empty batch"):
        recall_at_1(jnp.zeros((0, 8)), jnp.eye(3, 8), jnp.zeros((0,), jnp.int32))


def test_info_nce_names_a_logit_scale_that_is_not_one_number():
    """A [B, 1] scale broadcast silently as a temperature per clip (another loss); a [B] one failed as a bare
    'Incompatible shapes for broadcasting'. A [1] scale is one number, as a 0-d one."""
    v = jnp.eye(3, 4)
    for bad in (jnp.full((3, 1), 10.0), jnp.full((3,), 10.0)):
        with pytest.raises(ValueError, match=r"info_nce: logit_scale must be one number"):
            info_nce(v, v, bad)
    assert float(info_nce(v, v, jnp.full((1,), 10.0))) == pytest.approx(float(info_nce(v, v, 10.0)))


def test_info_nce_of_bfloat16_embeddings_is_computed_in_float32():
    """bf16 embeddings (a tower of one's own in bf16) made bf16 logits and a bf16 log-softmax: at scale 100 (the cap)
    the loss was ~1e-3 off (relative) the float64 loss of the same bf16 values; in float32 it is ~1e-7."""
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    v = unit(rng.standard_normal((64, 64)))
    t = unit(v + 0.5 * rng.standard_normal((64, 64)))  # cosine ~0.45 with its own clip: a loss far from 0
    v, t = (jnp.asarray(x, jnp.bfloat16) for x in (v, t))
    want = _clip_loss_reference(np.asarray(v, np.float64), np.asarray(t, np.float64), 100.0)[0]
    assert want > 1.0, want
    np.testing.assert_allclose(float(info_nce(v, t, 100.0)), want, rtol=1e-5)
