"""Video models sharded over the 8 fake devices give the single-device loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.video_steps import shard
from models.config import TransformerConfig
from models.video import (
    AlignConfig,
    DiTConfig,
    TextToVideo,
    TextToVideoConfig,
    VAEConfig,
    VideoDiT,
    VideoVAE,
    t2v_loss,
    vae_loss,
)
from parallel import abstract_sharded, batch_sharding, logical_shardings, logical_to_spec, make_mesh, shard_state

T2V = TextToVideoConfig(
    dit=DiTConfig(latent_shape=(3, 4, 4), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=2, n_heads=2,
                  mlp_dim=64, text_dim=16),
    text=TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=8),
    align=AlignConfig(d_model=16, n_heads=2, mlp_dim=32, embed_dim=8))
VAE = VAEConfig(channels=(8, 16), latent_channels=4, temporal_factor=2)  # 5 frames → 3 latent frames
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
NULL = jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0])


def grads(loss_fn, graphdef, state, batch):
    return jax.jit(jax.value_and_grad(lambda s, b: loss_fn(nnx.merge(graphdef, s), b)[0]))(state, batch)


def random_params(make):
    """(graphdef, state) of `make()` with every parameter drawn on the host from N(0, 0.1²): no init program to
    compile (seconds per model on XLA:CPU), and no parameter at a special value (adaLN-Zero's zeros make the DiT
    the identity, which compared nothing: a layer scan that mixed rows across devices on this mesh passed). Host
    (numpy) arrays: put on a mesh from the host, where a device array's placement compiles a slicing program per
    leaf shape and sharding."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(lambda v: (0.1 * rng.standard_normal(v.shape)).astype(v.dtype), abstract)


def compare(make, loss_fn, batch, check_split, mesh_shape=MESH):
    graphdef, state = random_params(make)
    l1, g1 = grads(loss_fn, graphdef, state, batch)
    mesh = make_mesh(mesh_shape)
    sstate = shard_state(state, mesh)  # by the rules table, as create_sharded places a fresh model
    check_split(sstate, mesh)
    with jax.set_mesh(mesh):
        l2, g2 = grads(loss_fn, graphdef, sstate, shard(batch, mesh))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    # each leaf within 1e-4 of its own largest gradient: the summation-order noise is <= ~2e-6 of it (measured: 1.1e-6
    # on 5 of the 7 meshes, 1.8e-6 on {sequence: 8}), and a flat atol=2e-5 exceeded whole leaves (largest 3e-7 to
    # 7e-6): a zero gradient passed. strict: the leaves pair up one to one (a plain zip stops at the shorter tree)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-4 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


def test_t2v_sharded_equals_single_device():
    """One row per device (batch 4 over data·fsdp): XLA's partitioner mixed rows 1 and 2 inside the DiT's layer scan
    until the scan body constrained its carry (models.video.dit._run_blocks)."""
    tok = jax.random.randint(jax.random.key(0), (4, 8), 2, 16).at[:, 6:].set(0)
    batch = {"latents": jax.random.normal(jax.random.key(1), (4, 3, 4, 4, 4)), "tokens": tok,
             "caption_id": jnp.arange(4) % 3}

    def check(state, mesh):
        wq = state["dit"]["blocks"]["attn"]["wq"][...]
        spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), mesh)
        assert wq.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), wq.ndim)
        assert wq.addressable_shards[0].data.shape[1:3] == (32 // 2, 2 // 2)  # embed over fsdp, heads over tensor
        ada = state["dit"]["blocks"]["ada"][...]
        assert ada.addressable_shards[0].data.shape[2] == 9 * 32 // 2  # modulation over tensor

    compare(lambda: TextToVideo(T2V, rngs=nnx.Rngs(0)),
            lambda m, b: t2v_loss(m, b, jax.random.key(2), NULL), batch, check)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 3)])
def test_vae_sharded_equals_single_device(kernel):
    """kernel (1, 3, 3): one temporal tap left the kernel's input channels split over fsdp into the convolution (kt > 1
    merges them with the taps, which gathers them), and XLA's partitioner gave wrong gradients: 7e-4 of the largest
    here, as large as the largest with weights of std 0.3 (found by a fuzz of the video configs)."""
    import dataclasses

    video = jax.random.uniform(jax.random.key(0), (4, 5, 16, 16, 3), minval=-1, maxval=1)

    def check(state, mesh):
        w = state["encoder"]["res"][1][0]["conv1"]["w"][...]
        assert w.addressable_shards[0].data.shape[3:] == (16 // 2, 16 // 2)  # conv_in over fsdp, conv_out tensor

    cfg = dataclasses.replace(VAE, kernel=kernel)
    compare(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)), lambda m, x: vae_loss(m, x, jax.random.key(1)), video, check)


@pytest.mark.parametrize("mesh_shape,frames,height,kernel", [
    ({"data": 2, "sequence": 4}, 5, 16, (3, 3, 3)),
    ({"fsdp": 2, "sequence": 2, "tensor": 2}, 5, 16, (3, 3, 3)),
    ({"sequence": 8}, 3, 32, (2, 5, 3)),
    ({"data": 2, "sequence": 4}, 5, 12, (3, 3, 3)),
], ids=["data2-seq4", "fsdp2-seq2-tensor2", "seq8-2hop", "seq4-indivisible"])
def test_sequence_parallel_vae_equals_single_device(mesh_shape, frames, height, kernel):
    """The VAE's rows split over `sequence` (each device convolves its band, halo rows from its neighbours:
    models.video.vae.Conv) give one device's loss and gradients. On {fsdp 2, sequence 2, tensor 2} a height split left
    to XLA gave wrong gradients (docs/parallelism.md); on {sequence 8} the 5-row kernel's halo of 2 comes from two
    neighbours at the 1-row latent bands; 12 rows on 4 devices fold to 6 the stem's convolutions cannot split, whose
    weight gradients came out wrong when XLA carried the input's 3-row split into them."""
    import dataclasses

    cfg = dataclasses.replace(VAE, kernel=kernel)
    video = jax.random.uniform(jax.random.key(0), (4, frames, height, 8, 3), minval=-1, maxval=1)
    compare(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)), lambda m, x: vae_loss(m, x, jax.random.key(1)), video,
            lambda state, mesh: None, mesh_shape)


def test_sequence_parallel_vae_takes_forward_mode_under_plain_autodiff():
    """The VAE with its rows split over `sequence` (halo_map's shard_map and its custom VJP): jax.jvp of the loss under
    models.plain_autodiff equals a finite difference and the default path's gradient along the direction."""
    from tests.test_custom_vjps import check_forward_mode

    graphdef, state = random_params(lambda: VideoVAE(VAE, rngs=nnx.Rngs(0)))
    video = jax.random.uniform(jax.random.key(0), (2, 5, 16, 8, 3), minval=-1, maxval=1)
    mesh = make_mesh({"data": 2, "sequence": 4})
    with jax.set_mesh(mesh):
        check_forward_mode(lambda s: vae_loss(nnx.merge(graphdef, s), shard(video, mesh), jax.random.key(1))[0],
                           shard_state(state, mesh), grads_too=False)


def per_device_cost(make, loss_fn, batch):
    """({'dp': FLOPs, 'sp': ...}, {'dp': temp bytes, ...}), the last compiled program: per device, jax.grad of
    loss_fn(model, batch) compiled (not run: abstract parameters laid out by the rules table) on {data 8} ('dp')
    and {data 2, sequence 4} ('sp')."""
    flops, temp = {}, {}
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    loss = lambda s, b: loss_fn(nnx.merge(graphdef, s), b)  # noqa: E731
    for name, shape in (("dp", {"data": 8}), ("sp", {"data": 2, "sequence": 4})):
        mesh = make_mesh(shape)
        state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                             logical_shardings(abstract, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
        with jax.set_mesh(mesh):
            c = jax.jit(jax.grad(loss)).lower(state, shard(batch, mesh)).compile()
        ca = c.cost_analysis()
        flops[name] = (ca[0] if isinstance(ca, list) else ca)["flops"]
        temp[name] = c.memory_analysis().temp_size_in_bytes
    return (flops, temp), c


def test_sequence_parallel_vae_splits_its_rows():
    """Per device, the VAE's compiled loss gradient on {data 2, sequence 4} stays near {data 8}'s FLOPs and temp
    bytes: every sequence device ran its batch shard's whole encoder and decoder, 3.9x the FLOPs and 3.7x the temp
    bytes; now 1.12x / 1.5x (the halo rows of 2-row bands: XLA counts no FLOPs for a single device's zero padding,
    and each band's convolution input is stored with its halo rows). No activation is gathered."""
    video = jax.random.uniform(jax.random.key(0), (8, 5, 16, 16, 3), minval=-1, maxval=1)
    (flops, temp), c = per_device_cost(lambda: VideoVAE(VAE, rngs=nnx.Rngs(0)),
                                       lambda m, x: vae_loss(m, x, jax.random.key(1))[0], video)
    assert " all-gather(" not in c.as_text()
    assert flops["sp"] <= 1.15 * flops["dp"], flops
    assert temp["sp"] <= 1.6 * temp["dp"], temp


def test_sequence_parallel_dit_splits_its_projections():
    """Per device, the compiled t2v gradient on {data 2, sequence 4} stays near {data 8}'s FLOPs and temp bytes
    (flattened [B, S] rows of a sharded sequence made XLA gather it: 3.4x the FLOPs; then the factorized attention's
    frames and columns merged into the batch, which XLA gathered whole: 1.17x the FLOPs, 1.44x the temp bytes; now
    1.05x, 1.05x, the rest being per-clip work that every sequence device repeats)."""
    import dataclasses

    cfg = dataclasses.replace(T2V, dit=dataclasses.replace(T2V.dit, latent_shape=(4, 8, 8)))
    batch = {"latents": jax.random.normal(jax.random.key(1), (8, 4, 8, 8, 4)),
             "tokens": jax.random.randint(jax.random.key(0), (8, 8), 2, 16), "caption_id": jnp.arange(8) % 3}
    (flops, temp), _ = per_device_cost(lambda: TextToVideo(cfg, rngs=nnx.Rngs(0)),
                                       lambda m, b: t2v_loss(m, b, jax.random.key(0), NULL)[0], batch)
    assert flops["sp"] <= 1.1 * flops["dp"], flops
    assert temp["sp"] <= 1.15 * temp["dp"], temp


@pytest.mark.parametrize("windows", [{}, {"spatial_window": 3, "temporal_window": 2}])
def test_sequence_parallel_dit_equals_single_device(windows):
    """{data 2, sequence 4}, one latent frame per sequence device: the factorized DiT's output and gradients equal one
    device's, and its temporal attention moves q, k, v from the frame split to a split of the H·W positions by
    all-to-all (models.video.layers.spacetime_attention): XLA all-gathered them whole, [B/2, S, N, K], on every
    sequence device. The weights being replicated here, nothing is gathered now."""
    cfg = DiTConfig(latent_shape=(4, 8, 8), latent_channels=4, d_model=32, n_layers=2, n_heads=2, mlp_dim=64,
                    text_dim=16, **windows)
    k = jax.random.split(jax.random.key(0), 5)
    args = (jax.random.normal(k[0], (4, 4, 8, 8, 4)), jax.random.uniform(k[1], (4,)),
            jax.random.normal(k[2], (4, 8, 16)), jnp.arange(8)[None] < jnp.array([[8], [3], [1], [5]]),
            jax.random.normal(k[3], (4, 16)))
    target = jax.random.normal(k[4], args[0].shape)
    graphdef, state = random_params(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))

    def run(state, args):
        def loss(s):
            pred = nnx.merge(graphdef, s)(*args)
            return jnp.sum(pred * target), pred
        return jax.grad(loss, has_aux=True)(state)

    g1, pred1 = jax.jit(run)(state, args)
    mesh = make_mesh({"data": 2, "sequence": 4})
    rows = jax.NamedSharding(mesh, jax.P(batch_sharding(mesh).spec[0]))  # (`shard` splits a [B, E] as a caption)
    sstate, sargs = shard_state(state, mesh), jax.device_put(args, rows)
    with jax.set_mesh(mesh):
        compiled = jax.jit(run).lower(sstate, sargs).compile()
        g2, pred2 = compiled(sstate, sargs)
    ops = {op: compiled.as_text().count(f" {op}(") for op in ("all-gather", "all-to-all")}
    assert ops["all-gather"] == 0 and ops["all-to-all"] > 0, ops
    np.testing.assert_allclose(pred1, np.asarray(pred2), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-5), g1, g2)


def test_dit_tokens_the_sequence_axis_does_not_divide_are_refused_by_name_before_tracing():
    """12 tokens (latent_shape (3, 4, 4) in (1, 2, 2) patches) on {sequence: 8}: the rules refused the first
    constraint with "use a sequence length that is a multiple of 8", a length the DiT has no field of. Now the DiT
    names its grid, latent_shape and patch, before patchifying anything."""
    cfg = DiTConfig(latent_shape=(3, 4, 4), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=1, n_heads=2,
                    mlp_dim=64, text_dim=16)
    mesh = make_mesh({"data": 1, "sequence": 8})
    graphdef, state = abstract_sharded(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)), mesh)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (f32(2, 3, 4, 4, 4), f32(2), f32(2, 8, 16), jax.ShapeDtypeStruct((2, 8), bool), f32(2, 16))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"VideoDiT: its 12 tokens \(grid \(3, 2, 2\) of "
                                           r"DiTConfig\.latent_shape \(3, 4, 4\) / patch \(1, 2, 2\)\) do not split "
                                           r"evenly over mesh axes \('sequence',\) \(size 8\)"):
        jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *args)


def test_aligner_tokens_the_sequence_axis_does_not_divide_are_refused_by_name():
    """The aligner's video tower runs on the DiT's token grid: 12 tokens on {sequence: 8} were refused by the rules
    with "use a sequence length that is a multiple of 8", a length the aligner has no field of (the DiT named its
    grid, latent_shape and patch). Now embed_video names them too, before tracing; a grid that divides runs."""
    from models.video import Aligner

    dit = DiTConfig(latent_shape=(3, 4, 4), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=1, n_heads=2,
                    mlp_dim=64, text_dim=16)
    mesh = make_mesh({"data": 1, "sequence": 8})
    graphdef, state = abstract_sharded(lambda: Aligner(T2V.align, dit, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"Aligner\.embed_video: its 12 tokens \(grid \(3, 2, 2\) "
                                           r"of DiTConfig\.latent_shape \(3, 4, 4\) / patch \(1, 2, 2\)\) do not split "
                                           r"evenly over mesh axes \('sequence',\) \(size 8\)"):
        jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).embed_video(z), state,
                       jax.ShapeDtypeStruct((2, 3, 4, 4, 4), jnp.float32))
    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})):  # 12 tokens on 4 sequence devices
        out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).embed_video(z), state,
                             jax.ShapeDtypeStruct((2, 3, 4, 4, 4), jnp.float32))
    assert out.shape == (2, T2V.align.embed_dim)


def test_fsdp_shards_every_large_video_parameter():
    """ZeRO-3 keeps 1/N of the weights per device: the cross-attention's text-side wk / wv were annotated (None,
    heads, head_dim) and sat whole on every fsdp device (device 0 held 0.168 of the default preset's T2V bytes on
    {fsdp: 8}, not 0.125), as was the timestep MLP's first weight. Every weight of >= 256 elements (biases and norms
    aside) is split over fsdp. (The VAE's first convolutions, RGB / latent-channel sized, stay whole by design.)"""
    _, state = random_params(lambda: TextToVideo(T2V, rngs=nnx.Rngs(0)))
    sstate = shard_state(state, make_mesh({"fsdp": 8}))
    whole = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(sstate)
             if v.size >= 256 and v.sharding.is_fully_replicated
             and not any(w in jax.tree_util.keystr(p) for w in ("bias", "norm"))]
    assert not whole, whole


_T2V_NO_REMATERIALIZATION = """
import sys, jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_compilation_cache", False)  # a cached program is not partitioned again: no warning
from flax import nnx
from experiments.video_steps import shard
from models.video import TextToVideo, t2v_loss
from parallel import logical_shardings, make_mesh
from tests.test_video_sharding import NULL, T2V
batch = {"latents": jax.numpy.zeros((8, 3, 4, 4, 4)), "tokens": jax.numpy.ones((8, 8), "int32"),
         "caption_id": jax.numpy.arange(8) % 3}
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TextToVideo(T2V, rngs=nnx.Rngs(0))))
for shape in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
    print("mesh", shape, file=sys.stderr, flush=True)
    mesh = make_mesh(shape)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                         logical_shardings(abstract, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
    loss = lambda s, b: t2v_loss(nnx.merge(graphdef, s), b, jax.random.key(0), NULL)[0]
    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss)).lower(state, shard(batch, mesh)).compile()
"""


def test_t2v_gradient_has_no_involuntary_full_rematerialization():
    """The t2v gradient on the {data, fsdp} meshes (`train_video --mesh data=2,fsdp=2,tensor=2`, as its docstring
    suggests) compiles without XLA's "Involuntary full rematerialization": the captions concatenated for the text
    encoder's one pass were split along L over the batch axes, and the embedding's backward, which lays its ids out
    over `data` alone, could only reach that by replicating them. XLA's warning is on stderr: a subprocess's, with
    jax's compilation cache off (as tests/test_parallel.py's LM step)."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _T2V_NO_REMATERIALIZATION], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("mesh {") == 2, run.stderr[-3000:]
    assert "Involuntary full rematerialization" not in run.stderr, run.stderr[-3000:]


def test_shard_refuses_64_bit_ints_that_would_wrap():
    """experiments.video_steps.shard, the video twin of parallel.shard_batch, placed int64 / uint64 host rows as
    int32 / uint32 (x64 off) without a word, as shard_batch did before it refused them: a uint64 caption hash
    2**40 + 7 arrived as 7. Now it names the key; values that fit pass unchanged."""
    mesh = make_mesh({"data": 8})
    with pytest.raises(ValueError, match=r"^shard: batch\['caption_id'\]: uint64 values .* do not fit the uint32"):
        shard({"caption_id": np.full((8,), 2**40 + 7, np.uint64)}, mesh)
    ok = np.arange(8, dtype=np.int64) + (2**31 - 8)
    assert np.array_equal(np.asarray(shard({"caption_id": ok}, mesh)["caption_id"]), ok)
