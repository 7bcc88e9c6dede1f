"""The rules table and mesh construction (strategy equivalence lives in test_parallel.py)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import TransformerConfig
from parallel import logical_to_spec, make_mesh
from parallel.rules import use_rules
from scaling.memory import memory_per_device

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, qkv_bias=True)


def test_rules_errors_and_fallbacks():
    mesh = make_mesh({"data": 2, "tensor": 4})
    with pytest.raises(ValueError, match="'mlp' of size 6 does not divide"):
        logical_to_spec(("embed", "mlp"), mesh, shape=(32, 6))
    # MQA: one kv head cannot be split over 4 tensor ranks, so K/V are replicated instead
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, shape=(32, 1, 8)) == jax.P(None, None, None)
    # ... and the axis it could not take stays free for a later dim (a replicated dim used it up: both untested)
    assert logical_to_spec(("act_kv_heads", "act_heads"), mesh, shape=(1, 8)) == jax.P(None, "tensor")
    # MoE capacity slots, the DiT's in-frame positions and the VAE's rows too: C = 3 slots, H·W = 6 positions or 6 rows
    # on 4 sequence devices stay whole (the capacity follows the routing, not a config field a user could round)
    sp = make_mesh({"data": 2, "sequence": 4})
    for name in ("act_capacity", "act_frame_pos", "act_height"):
        assert logical_to_spec(("batch", name), sp, shape=(2, 6)) == jax.P("data", None), name
        assert logical_to_spec(("batch", name), sp, shape=(2, 8)) == jax.P("data", "sequence"), name
    # a size-1 axis drops out of the spec, as documented
    assert logical_to_spec(("batch", "vocab"), make_mesh({"data": 8, "tensor": 1})) == jax.P("data", None)
    # axes absent from the mesh drop out: fsdp is not in this mesh
    assert logical_to_spec(("embed", "vocab"), mesh) == jax.P(None, "tensor")
    # overrides: a misspelt logical name or mesh axis raises instead of changing nothing / replicating
    with use_rules(embed="data"):
        assert logical_to_spec(("embed", "vocab"), mesh) == jax.P("data", "tensor")
    with use_rules({"my_axis": "tensor"}):  # a logical name of the user's own module
        assert logical_to_spec(("my_axis",), mesh) == jax.P("tensor")
    for kw, words in [(dict(embd=None), "no logical axis"), (dict(embed="fsdp_"), "names mesh axes")]:
        with pytest.raises(ValueError, match=words), use_rules(**kw):
            pass
    with pytest.raises(ValueError, match="unknown"):  # the memory model: a typo would count as one device
        memory_per_device(CFG, {"fsdp_": 8}, 8, 64)
    # a dim over several mesh axes must divide their product (checking the first axis alone passed: 6 rows on
    # data 2 x fsdp 4 would be split 8 ways)
    dp = make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match=r"'batch' of size 6 does not divide mesh axes \('data', 'fsdp'\) \(size 8\)"):
        logical_to_spec(("batch",), dp, shape=(6,))
    assert logical_to_spec(("batch",), dp, shape=(6,), replicate_indivisible=True) == jax.P(None)
    # experts that the expert axis does not divide: the error names the config field (it said "model dimension")
    with pytest.raises(ValueError, match=r"'expert' of size 6 .* use a MoEConfig.n_experts that is a multiple of 4"):
        logical_to_spec(("expert", "embed", "mlp"), make_mesh({"expert": 4, "data": 2}), shape=(6, 16, 8))
    # ... and a dim that divides is split over all of them (the first alone left the rows whole on every fsdp device)
    assert logical_to_spec(("batch", "act_seq"), dp, shape=(8, 16)) == jax.P(("data", "fsdp"), None)
    # K / V weights split over tensor with their heads (replicating them changes no value, so only specs show it)
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded

    gqa = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, mlp_dim=64)
    _, state = create_sharded(lambda: Transformer(gqa, rngs=nnx.Rngs(0)), make_mesh({"tensor": 4, "data": 2}))
    for name in ("wk", "wv"):
        assert state["blocks"][name][...].sharding.spec == jax.P(None, None, "tensor"), name  # [L, D, K, H]
    # MQA: the parameters too replicate their one kv head (create_sharded placed them by names alone, without the
    # shapes: JAX's IndivisibleError)
    mqa = dataclasses.replace(gqa, n_kv_heads=1)
    _, state = create_sharded(lambda: Transformer(mqa, rngs=nnx.Rngs(0)), make_mesh({"tensor": 4, "data": 2}))
    assert state["blocks"]["wk"][...].sharding.spec == jax.P()
    assert state["blocks"]["wq"][...].sharding.spec == jax.P(None, None, "tensor")
    # a researcher's own module, annotated with logical names and without our modules' use_eager_sharding(False):
    # flax read 'embed' as a mesh axis at creation and create_sharded raised
    class Mine(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", "mlp"))
            self.w = nnx.Param(init(rngs.params(), (64, 64), jnp.float32))

    _, state = create_sharded(lambda: Mine(nnx.Rngs(0)), make_mesh({"fsdp": 4, "tensor": 2}))
    assert state["w"][...].sharding.spec == jax.P("fsdp", "tensor")
    # axes are laid out outermost-first (data ... tensor), whatever order the dict gives
    assert make_mesh({"tensor": 2, "data": -1}).axis_names == ("data", "tensor")


def test_models_are_shaped_and_placed_inside_a_set_mesh_as_outside():
    """Inside `with jax.set_mesh(mesh):` (where the model is then run) create_sharded, abstract_sharded,
    from_pretrained (tests/test_hf.py) and dit_memory_per_device raised flax's "Resource axis: layers of
    P('layers', 'norm') is not found in mesh": its nnx.eval_shape read the logical names as mesh axes there."""
    from flax import nnx

    from models import Transformer
    from models.video import DiTConfig
    from parallel import abstract_sharded, create_sharded
    from scaling.dit import dit_memory_per_device

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    build = lambda: Transformer(CFG, rngs=nnx.Rngs(0))  # noqa: E731
    dit = DiTConfig(latent_shape=(2, 4, 4), d_model=32, n_heads=2, mlp_dim=64, n_layers=2)
    each = lambda: (create_sharded(build, mesh)[1], abstract_sharded(build, mesh)[1],  # noqa: E731
                    dit_memory_per_device(dit, mesh, 4, 4))
    outside = each()
    with jax.set_mesh(mesh):
        inside = each()
    for a, b in zip(jax.tree.leaves(outside[0]), jax.tree.leaves(inside[0])):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    assert [x.sharding for x in jax.tree.leaves(outside[1])] == [x.sharding for x in jax.tree.leaves(inside[1])]
    assert [x.sharding for x in jax.tree.leaves(inside[1])] == [x.sharding for x in jax.tree.leaves(inside[0])]
    assert outside[2] == inside[2]


def test_a_model_placed_on_one_mesh_run_under_another_set_mesh_names_both():
    """Parameters and batch on {data 2, fsdp 2, tensor 2} run under `jax.set_mesh({data 2, sequence 4})` (one
    script, two meshes): the jitted eval step ran, its activations silently laid out on the other mesh; the train
    step raised jax's IndivisibleError (shape=[1, 2, 2, 2] ... mesh_shape data 2, sequence 4) and an eager forward
    "Mesh shape of the input ... does not match the mesh shape of the target sharding", naming neither setting."""
    from flax import nnx

    from experiments.lm_step import make_eval_step
    from models import Transformer
    from parallel import create_sharded, shard_batch

    placed, other = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), make_mesh({"data": 2, "sequence": 4})
    graphdef, state = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), placed)
    tokens = shard_batch(np.arange(32, dtype=np.int32).reshape(4, 8) % CFG.vocab_size, placed)
    both = r"\{'data': 2, 'fsdp': 2, 'tensor': 2\}.*\{'data': 2, 'sequence': 4\}"
    with jax.set_mesh(other):
        with pytest.raises(ValueError, match=both):
            make_eval_step(graphdef)(state, {"inputs": tokens, "targets": tokens})
        with pytest.raises(ValueError, match=both):
            nnx.merge(graphdef, state)(tokens)
    with jax.set_mesh(placed):  # the mesh it was placed on runs as before
        assert np.isfinite(make_eval_step(graphdef)(state, {"inputs": tokens, "targets": tokens}))


def test_a_model_dimension_the_mesh_does_not_divide_names_the_config_field():
    """3 heads on tensor 2: the refusal said "use a model dimension that is a multiple of 2", naming the logical
    'heads' but not n_heads, the field a researcher changes (likewise mlp_dim, d_model, vocab_size)."""
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded

    cfg = TransformerConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=3, n_kv_heads=1, mlp_dim=64)
    with pytest.raises(ValueError, match=r"'heads' of size 3 .* use a config n_heads that is a multiple of 2"):
        create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), make_mesh({"tensor": 2, "data": 4}))
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    for names, shape, field in ((("embed", "mlp"), (6, 8), "d_model"), (("embed", "mlp"), (8, 7), "mlp_dim"),
                                (("vocab", "embed"), (65, 8), "vocab_size")):
        with pytest.raises(ValueError, match=rf"use a config {field} "):
            logical_to_spec(names, mesh, shape=shape)


def test_rules_arguments_override_the_table_in_effect():
    """`rules=` (create_sharded, shard_state, from_pretrained, scaling.memory) is overrides, as documented: a
    partial dict replaced the whole table (KeyError 'vocab'), and no test passed one."""
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert logical_to_spec(("embed", "vocab"), mesh, rules={"embed": None}) == jax.P(None, "tensor")
    _, state = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh, rules={"embed": None})
    assert state["blocks"]["wq"][...].sharding.spec == jax.P(None, None, "tensor")  # [L, D, N, H]
    assert state["embed"][...].sharding.spec == jax.P("tensor")
    default = memory_per_device(CFG, {"fsdp": 4, "tensor": 2}, 8, 64)
    assert memory_per_device(CFG, {"fsdp": 4, "tensor": 2}, 8, 64, rules={"embed": None}).params > default.params
    # a misspelt mesh axis replicated the embedding silently, a misspelt name changed nothing; a new name passes
    for bad, says in (({"embed": "fsdpp"}, r"rules: embed='fsdpp' names mesh axes \['fsdpp'\]"),
                      ({"embed": 4}, r"rules: embed=4 names mesh axes \[4\]"),
                      ({"embedd": None}, "no logical axis 'embedd' in the rules table; did you mean 'embed'"),
                      ({"mpl": None}, "no logical axis 'mpl' .* did you mean 'mlp'"),  # short names: difflib
                      ({"mlq": None}, "no logical axis 'mlq' .* did you mean 'mlp'")):  # missed these two
        with pytest.raises(ValueError, match=says):
            create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh, rules=bad)
        with pytest.raises(ValueError, match=says):
            memory_per_device(CFG, {"fsdp": 8}, 8, 64, rules=bad)
    # a name neither in the table nor on the model's parameters changed nothing (only near misses were caught)
    with pytest.raises(ValueError, match=r"rules: no logical axis \['vocabulary'\] in the rules table or on this"):
        create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh, rules={"vocabulary": None})

    class Own(nnx.Module):  # a module of your own naming its own axis: its rule places it
        def __init__(self):
            init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("my_axis", "embed"))
            self.w = nnx.Param(init(jax.random.key(0), (4, 8)))

    _, own = create_sharded(Own, mesh, rules={"my_axis": "tensor"})
    assert own["w"][...].sharding.spec == jax.P("tensor", "fsdp")
    assert logical_to_spec(("my_axis",), mesh, rules={"my_axis": "tensor"}) == jax.P("tensor")
    with pytest.raises(ValueError, match=r"'my_axis' has no rule in the table; map it for this call with rules="):
        logical_to_spec(("my_axis",), mesh)  # a KeyError that said to edit the library's table
    with pytest.raises(ValueError, match=r"'vocab' of size 257 .* padded to a multiple of 64 .* use_rules\(vocab=None"):
        logical_to_spec(("vocab", "embed"), mesh, shape=(257, 64))
    with pytest.raises(ValueError, match=r"use_rules: embed=4"):
        with use_rules(embed=4):
            pass



def test_a_misspelt_table_name_on_a_parameter_is_named_as_such():
    """A module of your own whose parameter names 'mpl' (for 'mlp') was told to register 'mpl' as a new axis
    ("map it ... with rules={'mpl': 'tensor'}"), which would have kept the typo; the error now asks first whether
    the table's name was meant. Names far from every table name keep the advice alone."""
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    with pytest.raises(ValueError, match=r"logical axis 'mpl' has no rule in the table \(did you mean 'mlp'\?\); map"):
        logical_to_spec(("embed", "mpl"), mesh)
    with pytest.raises(ValueError, match=r"logical axis 'my_rank' has no rule in the table; map it"):
        logical_to_spec(("my_rank",), mesh)

def test_a_jitted_function_traces_again_under_other_rules():
    """The rules lived in a contextvar, which jax.jit's cache does not see: a function traced before `use_rules`
    kept its first constraints inside it (and `replicate_indivisible` likewise)."""
    import jax.numpy as jnp

    from parallel import constrain
    from parallel.rules import replicate_indivisible

    mesh = make_mesh({"data": 8})
    f = jax.jit(lambda x: constrain(x * 2, ("batch", None)))
    with jax.set_mesh(mesh):
        assert f(jnp.ones((8, 4))).sharding.spec == jax.P("data")
        with use_rules(batch=None):
            assert f(jnp.ones((8, 4))).sharding.spec == jax.P()
            with use_rules(act_seq="data"):  # nested: both overrides apply
                assert f(jnp.ones((8, 8))).sharding.spec == jax.P()
                assert logical_to_spec(("batch", "act_seq"), mesh) == jax.P(None, "data")
        assert f(jnp.ones((8, 4))).sharding.spec == jax.P("data")
        with pytest.raises(ValueError, match="'batch' of size 6 does not divide"):
            f(jnp.ones((6, 4)))
        with replicate_indivisible():
            assert f(jnp.ones((6, 4))).sharding.spec in (jax.P(), jax.P(None, None))
            # replicate_indivisible(False), the model's training call (no KV cache), turns it off again: still an error
            with replicate_indivisible(False), pytest.raises(ValueError, match="'batch' of size 6 does not divide"):
                f(jnp.ones((6, 4)))


def test_an_inner_use_rules_overrides_the_outer_one_for_the_same_name():
    """Nested overrides of one logical name: the innermost wins and leaving it restores the outer value, as nested
    contexts read (the outer one winning kept its strategy inside silently; the nested test above sets two names)."""
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with use_rules(embed=None):
        with use_rules(embed="data"):
            assert logical_to_spec(("embed", "vocab"), mesh) == jax.P("data", None)
        assert logical_to_spec(("embed", "vocab"), mesh) == jax.P(None, None)
    assert logical_to_spec(("embed", "vocab"), mesh) == jax.P("fsdp", None)


def test_use_rules_refuses_a_registered_typo_of_a_table_name():
    """`use_rules({'kv_head': None})` registered a new logical name one letter off 'kv_heads' and changed nothing:
    K/V stayed split over tensor, silently. Keyword typos raised but did not name the close match."""
    mesh = make_mesh({"data": 2, "tensor": 4})
    for typo, meant in (("kv_head", "kv_heads"), ("heds", "heads"), ("act_embd", "act_embed")):
        with pytest.raises(ValueError, match=rf"no logical axis \['{typo}'\] .*did you mean \['{meant}'\]"):
            with use_rules({typo: None}):
                pass
    with pytest.raises(ValueError, match=r"no logical axis \['kv_head'\] .*'kv_head': did you mean \['kv_heads'\]"):
        with use_rules(kv_head=None):
            pass
    with use_rules({"hidden": "tensor", "kv_heads": None}):  # a name of the user's own, and a real table name
        assert logical_to_spec(("hidden", "kv_heads"), mesh) == jax.P("tensor", None)
    # more than one letter off is a name of its own, however alike ('act_mlp_in' is difflib-close to 'act_mlp')
    with use_rules({"act_mlp_in": "tensor"}):
        assert logical_to_spec(("act_mlp_in",), mesh) == jax.P("tensor")


def test_an_override_to_mesh_axes_the_mesh_lacks_is_refused_by_name():
    """`use_rules(heads='expert')` (or rules={'heads': 'expert'}) on a {data, tensor} mesh replicated the heads,
    silently: the override was dropped with the absent axis, as the default table's axes are."""
    mesh = make_mesh({"data": 2, "tensor": 4})
    says = r"rules: heads='expert' overrides the table with mesh axes this mesh does not have \(its axes: \{'data': 2"
    with pytest.raises(ValueError, match=says), use_rules(heads="expert"):
        logical_to_spec(("embed", "heads"), mesh, (8, 8))
    with pytest.raises(ValueError, match=says):
        logical_to_spec(("embed", "heads"), mesh, (8, 8), rules={"heads": "expert"})
    # still fine: the default table's absent axes (embed -> fsdp), an override naming one present axis of a tuple,
    # an override equal to the default, a size-1 axis, and a name of the user's own
    with use_rules(batch=("data", "fsdp"), embed="fsdp", act_seq=None):
        assert logical_to_spec(("batch", "embed", "heads"), mesh) == jax.P("data", None, "tensor")
    assert logical_to_spec(("heads",), make_mesh({"data": 8, "expert": 1}), rules={"heads": "expert"}) == jax.P(None)
    with use_rules({"my_axis": "sequence"}):
        assert logical_to_spec(("my_axis",), mesh) == jax.P(None)


def test_an_override_to_a_size_1_mesh_axis_is_refused_as_an_absent_one_is():
    """A size-1 axis drops out of the rules as an absent one does, so an override to it loses the default's split
    the same way: rules={'mlp': 'fsdp'} on make_mesh({'data': -1, 'fsdp': 1, 'tensor': 4}) placed every MLP weight
    whole on each device, silently, where the same mesh spelt without 'fsdp' raised."""
    says = r"rules: mlp='fsdp' overrides the table with mesh axes this mesh does not have"
    for shape in ({"data": 2, "tensor": 4}, {"data": -1, "fsdp": 1, "tensor": 4}):
        mesh = make_mesh(shape)
        with pytest.raises(ValueError, match=says), use_rules(mlp="fsdp"):
            logical_to_spec(("embed", "mlp"), mesh, (8, 8))
        with pytest.raises(ValueError, match=says):
            logical_to_spec(("embed", "mlp"), mesh, (8, 8), rules={"mlp": "fsdp"})
    # a size-1 axis beside a present one of a tuple still serves (mlp over tensor alone)
    assert logical_to_spec(("mlp",), make_mesh({"data": -1, "fsdp": 1, "tensor": 4}),
                           rules={"mlp": ("fsdp", "tensor")}) == jax.P("tensor")


def test_an_override_on_a_mesh_the_default_does_not_split_either_is_not_refused():
    """The check above is for an override that loses a split the default rule makes on this mesh. On a mesh where the
    default names no axis either, the dimension is replicated either way: rules={'embed': ('fsdp', 'data')} on
    {sequence, tensor} (memory_per_device over candidate meshes; a debug mesh) raised 'would replicate silently'."""
    cfg = TransformerConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, mlp_dim=128)
    for rules, mesh in (({"embed": ("fsdp", "data")}, {"sequence": 2, "tensor": 2}),
                        ({"batch": ("data", "fsdp")}, {"sequence": 2, "tensor": 2}),
                        ({"heads": "expert"}, {"data": 4})):
        assert memory_per_device(cfg, mesh, 8, 64, rules=rules) == memory_per_device(cfg, mesh, 8, 64), rules
    real = make_mesh({"data": 2, "sequence": -1})
    with use_rules(heads="expert"):
        assert logical_to_spec(("batch", "heads"), real, (8, 8)) == jax.P("data", None)
    # where the default splits the dimension the override still raises (heads -> tensor on {sequence, tensor})
    with pytest.raises(ValueError, match="rules: heads='expert' overrides the table"):
        memory_per_device(cfg, {"sequence": 2, "tensor": 2}, 8, 64, rules={"heads": "expert"})


@pytest.mark.parametrize("shape,words", [({"data": 3}, "needs 3 devices"), ({"data": -1, "tensor": 3}, "not divisible"),
                                         ({"data": -1, "tensor": -1}, "only one"), ({"batch": 8}, "unknown"),
                                         ({"data": 0, "fsdp": -1}, r"\['data'\] must be >= 1"),  # not n % 0
                                         ({"data": True, "fsdp": -1}, r"\['data'\] need int sizes")])  # not 1
def test_mesh_errors(shape, words):
    with pytest.raises(ValueError, match=words):
        make_mesh(shape)


def test_make_mesh_takes_any_iterable_of_devices():
    """Reading a device grid in its flat order (np.asarray(devices).flat) made a generator, filter, iterator or set one
    0-d object array: AttributeError: 'generator' object has no attribute 'device_kind' (list(devices) took them)."""
    first_two = jax.devices()[:2]
    for given in ((d for d in first_two), filter(None, first_two), iter(first_two), {d: 0 for d in first_two}.keys()):
        assert make_mesh({"data": -1}, devices=given).devices.tolist() == first_two
    assert sorted(make_mesh({"data": -1}, devices=set(first_two)).devices.tolist(), key=lambda d: d.id) == first_two
    assert make_mesh({"data": -1}, devices=[first_two]).devices.tolist() == first_two  # a nested list: a grid


def test_mesh_fill():
    mesh = make_mesh({"tensor": 2, "data": -1})
    assert dict(mesh.shape) == {"data": 4, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 8}  # no shape: data parallel over every device
    # devices as a grid (another mesh's .devices): read row by row, "needs 8 devices but 4 are available"
    assert dict(make_mesh({"fsdp": -1}, devices=mesh.devices).shape) == {"fsdp": 8}
    assert make_mesh({"data": 2}, devices=np.asarray(jax.devices()[:2])).devices.tolist() == jax.devices()[:2]
    with pytest.raises(ValueError, match=r"mesh axes \['data'\] need int sizes, got \['2'\]"):
        make_mesh({"data": "2", "fsdp": 4})  # a TypeError comparing str with int before
    assert dict(make_mesh({"data": np.int64(2), "fsdp": -1}).shape) == {"data": 2, "fsdp": 4}
    # dcn: an axis named only across granules (processes here: one) is an axis of the mesh too, ordered by AXES
    hybrid = make_mesh({"tensor": 2, "fsdp": -1}, dcn={"data": 1})
    assert hybrid.axis_names == ("data", "fsdp", "tensor") and dict(hybrid.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    # a command line's string for dcn= too ("dictionary update sequence element #0 has length 1" before)
    with pytest.raises(ValueError, match=r"make_mesh: dcn='data=1' is a string; pass a dict, e.g. parse_mesh"):
        make_mesh({"tensor": 2, "fsdp": -1}, dcn="data=1")
    # Auto axes, as the issue asks: the model leaves shardings to GSPMD propagation from the rules' constraints
    # (nothing checked the types)
    for m in (mesh, hybrid):
        assert m.axis_types == (jax.sharding.AxisType.Auto,) * len(m.axis_names), m.axis_types


def test_mesh_strings_and_batches_the_mesh_does_not_divide_are_refused_by_name(capsys):
    """`python -m experiments.aot --mesh fsdp` failed with 'not enough values to unpack', and a batch of 6 rows on 8
    devices with JAX's IndivisibleError, which names neither the batch nor the fix."""
    import numpy as np

    from experiments import aot
    from parallel import shard_batch
    from parallel.mesh import parse_mesh

    assert parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(SystemExit):
        aot.main(["--mesh", "fsdp"])
    assert "argument --mesh: cannot parse 'fsdp'; write axis=size pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a traceback from the config before
        aot.main(["--remat", "fulll"])
    assert "error: argument --remat: TransformerConfig.remat: unknown 'fulll'" in capsys.readouterr().err
    # every mesh is checked before the first compiles (a 70B compile takes minutes): devices, batch, seq, heads
    for bad, says in ((["--mesh", "fsdp=8", "--mesh", "fsdp=3"], "needs 3 devices but 8"),
                      (["--mesh", "fsdpp=-1"], "unknown"),
                      (["--batch", "3", "--mesh", "data=-1"], "--batch=3 is not divisible by the batch axes"),
                      (["--seq", "63", "--mesh", "sequence=2,fsdp=4"], "--seq=63 is not divisible by the sequence")):
        with pytest.raises(SystemExit):
            aot.main(bad)
        err = capsys.readouterr().err
        assert "argument --mesh" in err and says in err, (bad, err)
    from models import TransformerConfig

    cfg = TransformerConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=6, head_dim=16, mlp_dim=102)
    assert aot.mesh_problem(cfg, {"data": 2, "tensor": -1}, 6, 2, 8) is None
    assert "heads=6 is not divisible by the tensor axis" in aot.mesh_problem(cfg, {"tensor": -1}, 4, 4, 8)
    odd = TransformerConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=6, head_dim=16, mlp_dim=100)
    assert "mlp_dim=100 is not divisible" in aot.mesh_problem(odd, {"tensor": 3}, 3, 3, 8)
    # what the activation checks cannot see failed after the earlier meshes compiled, as a traceback: a d_model
    # fsdp does not divide, layers a stage axis does not divide, a bf16 pipeline beside other axes on XLA:CPU
    deep = TransformerConfig(vocab_size=96, d_model=64, n_layers=4, n_heads=4, mlp_dim=96, dtype="bfloat16")
    assert "dimension 'embed' of size 64 does not divide mesh axes ('fsdp',) (size 6)" in aot.mesh_problem(
        deep, {"fsdp": 6}, 6, 6, 8)
    assert "dimension 'layers' of size 4 does not divide mesh axes ('stage',) (size 3)" in aot.mesh_problem(
        deep, {"stage": 3}, 3, 3, 8)
    assert "--dtype float32" in aot.mesh_problem(deep, {"stage": 2, "fsdp": 4}, 8, 8, 8)
    assert aot.mesh_problem(deep, {"stage": 2}, 2, 2, 8) is None
    # an expert axis on a dense model: train_lm refuses it (mesh.expert), aot compiled it (a replicated axis)
    assert "expert axis 2 needs model.moe with a multiple of 2 experts" in aot.mesh_problem(
        deep, {"expert": 2, "fsdp": -1}, 8, 8, 8)
    with pytest.raises(SystemExit):
        aot.main(["--mesh", "expert=2,fsdp=-1"])
    assert "argument --mesh {'expert': 2, 'fsdp': -1}: expert axis 2 needs model.moe" in capsys.readouterr().err
    piped = dataclasses.replace(deep, pipeline_microbatches=4)  # aot compiled every pipeline with 1 microbatch
    assert aot.mesh_problem(piped, {"stage": 2}, 2, 8, 8) is None
    assert "--batch=6 does not split into --microbatches=4" in aot.mesh_problem(piped, {"stage": 2}, 2, 6, 8)
    # each microbatch's rows, not the batch's, must divide the batch axes: the model refuses 8 rows in 4
    # microbatches of 2 over data=4 (test_parallel's pipeline test), so the check before any compile must too
    assert "--batch=8 does not split into --microbatches=4" in aot.mesh_problem(
        dataclasses.replace(piped, dtype="float32"), {"stage": 2, "data": 4}, 8, 8, 8)
    # under grad_accum the pipeline splits each grad_accum microbatch: 8 rows at grad_accum 2 give the model 4, which
    # 4 pipeline microbatches of 1 row over data=2 cannot take (accepted here, refused by the model after compiles)
    assert "--batch=8 / grad_accum 2 does not split into --microbatches=4" in (aot.mesh_problem(
        dataclasses.replace(piped, dtype="float32"), {"stage": 2, "data": 2}, 4, 8, 8, grad_accum=2) or "")
    assert aot.mesh_problem(dataclasses.replace(piped, dtype="float32"), {"stage": 2, "data": 2}, 4, 16, 8,
                            grad_accum=2) is None
    with pytest.raises(SystemExit):
        aot.main(["--microbatches", "0"])
    assert "argument --microbatches: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # ignored without a pipeline (the table looked like a pipelined run's)
        aot.main(["--microbatches", "4", "--mesh", "fsdp=8"])
    assert "argument --microbatches: 4 microbatches need a pipeline" in capsys.readouterr().err
    mesh = make_mesh({"data": 2, "sequence": 4})
    with pytest.raises(ValueError, match=r"an array \(2, 6\): dimension 'act_seq' of size 6 does not divide mesh "
                                         r"axes \('sequence',\) \(size 4\); use a sequence length that is a "
                                         r"multiple of 4"):
        shard_batch({"tokens": np.zeros((2, 6), np.int32)}, mesh)
    with pytest.raises(ValueError, match=r"an array \(3, 8\): dimension 'batch' of size 3 does not divide.*; use "
                                         r"a batch size that is a multiple of 2, or change the mesh"):
        shard_batch(np.zeros((3, 8), np.int32), mesh)
    x = shard_batch(np.arange(16, dtype=np.int32).reshape(2, 8), mesh)
    assert tuple(x.sharding.spec) == ("data", "sequence") and np.array_equal(np.asarray(x), np.arange(16).reshape(2, 8))
    # per-row entries (labels, weights) [B]: the batch axes only (an IndexError from the rules table before)
    y = shard_batch({"label": np.arange(4, dtype=np.int32)}, mesh)["label"]
    assert tuple(y.sharding.spec) == ("data",) and np.array_equal(np.asarray(y), np.arange(4))
    with pytest.raises(ValueError, match=r"leading batch dim"):
        shard_batch(np.int32(3), mesh)
    with pytest.raises(ValueError, match=r"names \['data'\] more than once"):  # was {'data': 4}, silently
        parse_mesh("data=2,data=4")


@pytest.mark.parametrize("env,started", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # a shell inside an allocation (salloc / sbatch, no srun)
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, False),  # srun with one task
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "0", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, False),  # no tasks counted is no multi-process job ('0 or 2' read it as two)
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"}, True),  # an srun job step: JAX's SLURM detection takes it from here
    # Open MPI counts its ranks; TPU pods name no count: multi-process jobs (each host trained alone if not)
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    # mpirun -n 1: one process (Open MPI 5's mpirun sets no OMPI_MCA_orte_hnp_uri, so jax found no coordinator)
    ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # inside an allocation
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
])
def test_initialize_starts_jax_distributed_only_in_a_multi_process_job(monkeypatch, env, started):
    from parallel import distributed

    for k in [k for k in os.environ if k.startswith(("SLURM_", "JAXSCALE_", "OMPI_", "TPU_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize() is started and len(calls) == started


def test_initialize_refuses_several_processes_without_a_coordinator(monkeypatch):
    """JAXSCALE_NUM_PROCESSES=2 without JAXSCALE_COORDINATOR ran every process alone, each one 'primary'."""
    from parallel import distributed

    for k in [k for k in os.environ if k.startswith(("SLURM_", "JAXSCALE_", "OMPI_", "TPU_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: pytest.fail("must not start"))
    monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXSCALE_PROCESS_ID", "1")
    with pytest.raises(ValueError, match="without a coordinator; pass coordinator='host:port' or set JAXSCALE_COORD"):
        distributed.initialize()
    monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "1")  # one process, so named: nothing to start
    monkeypatch.setenv("JAXSCALE_PROCESS_ID", "0")
    assert distributed.initialize() is False
    # a process id past the count returned False (silently not distributed); 0 processes read as "not given"
    for n, i, says in ((1, 3, "0 <= process_id < num_processes"), (2, 2, "0 <= process_id < num_processes"),
                       (0, 0, "num_processes >= 1")):  # ids count from 0: process 2 of 2 does not exist
        with pytest.raises(ValueError, match=says):
            distributed.initialize("h:1", n, i)
    monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAXSCALE_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize()
    for k in ("JAXSCALE_NUM_PROCESSES", "JAXSCALE_PROCESS_ID"):  # an srun job step whose task count is no integer
        monkeypatch.delenv(k)
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2(x2)", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"SLURM_NTASKS='2\(x2\)' must be an integer"):  # a bare int() error
        distributed.initialize()
    for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(k)
    # the environment's names when it gave them (the message named the Python arguments); process 0's port taken:
    # named before jax's 'Failed to start RPC server', which the other processes waited 300 s on
    monkeypatch.setenv("JAXSCALE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXSCALE_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAXSCALE_NUM_PROCESSES=2, JAXSCALE_PROCESS_ID=2: need"):
        distributed.initialize()
    # a bad argument beside the environment's count: each named by its source (both were named as variables)
    with pytest.raises(ValueError, match=r"JAXSCALE_NUM_PROCESSES=2, process_id=5: need"):
        distributed.initialize(process_id=5)
    import socket

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(ValueError, match=rf"port {taken.getsockname()[1]} is in use on process 0's host"):
            distributed.initialize(f"127.0.0.1:{taken.getsockname()[1]}", 2, 0)
    with pytest.raises(ValueError, match=r"parse_mesh\('data=8'\)"):
        make_mesh("data=8")


def test_process_rows_are_contiguous_equal_shares(monkeypatch):
    """Process i of n loads rows [i·B/n, (i+1)·B/n): the block its batch-axis devices hold under a dcn mesh (a
    strided share gives the same mean loss, so no numeric test noticed)."""
    from parallel.distributed import process_rows

    monkeypatch.setattr(jax, "process_count", lambda: 4)
    for i in range(4):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        assert process_rows(16) == slice(4 * i, 4 * i + 4)
    with pytest.raises(ValueError, match="global batch 10 must be divisible by the process count 4"):
        process_rows(10)


def test_process_rows_of_a_mesh_are_the_rows_its_devices_hold(monkeypatch):
    """Process 0 of 2 on a mesh over the devices in reverse order (make_mesh(devices=...), or a TPU pod's physical
    layout) holds rows [4, 8) of 8; process_rows(8) gave [0, 4), so the global batch global_batch_from_local built
    was the host batch with the processes' halves swapped (measured with two processes: rows 4..7, then 0..3),
    silently. With the mesh it gives the rows the devices hold; a mesh that gives the process no contiguous share
    is refused."""
    from parallel.distributed import process_rows

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    first = jax.devices()[:4]  # process 0's devices
    assert process_rows(8, make_mesh({"data": 2, "fsdp": 4}), local_devices=first) == slice(0, 4)
    assert process_rows(8, make_mesh({"data": 8}, devices=jax.devices()[::-1]), local_devices=first) == slice(4, 8)
    assert process_rows(8) == slice(0, 4)  # without a mesh: the process-index order
    with pytest.raises(ValueError, match=r"hold rows \[0, 8\) of the global batch of 8, but it loads 4 contiguous"):
        process_rows(8, make_mesh({"stage": 2, "fsdp": 4}), local_devices=first)


def test_numpy_integer_sizes_are_ints_to_process_rows_and_gpipe():
    """A batch or microbatch count computed with numpy (np.int64(8)) was refused as 'must be an int >= 1', while
    make_mesh takes numpy sizes; a bool or a float is still refused."""
    from parallel.distributed import process_rows
    from parallel.pipeline import gpipe

    assert process_rows(np.int64(8)) == slice(0, 8)
    x = np.arange(16, dtype=np.float32).reshape(4, 1, 4)
    with jax.set_mesh(make_mesh({"stage": 2}, devices=jax.devices()[:2])):
        out = jax.jit(lambda w, x: gpipe(lambda p, h, c: h + p, w, x, n_microbatches=np.int64(2)))(np.ones((2, 4)), x)
    np.testing.assert_array_equal(np.asarray(out), x + 2)
    for bad in (True, 8.0):
        with pytest.raises(ValueError, match="process_rows: global_batch"):
            process_rows(bad)
        with pytest.raises(ValueError, match=f"gpipe: n_microbatches={bad!r} must be an int"):  # True ran as 1
            gpipe(lambda p, h, c: h + p, np.ones((2, 4)), x, n_microbatches=bad)
    # bfloat16 on a mesh of 'stage' alone compiles on XLA:CPU (the abort needs other mesh axes too): not refused
    with jax.set_mesh(make_mesh({"stage": 2}, devices=jax.devices()[:2])):
        out = jax.jit(lambda w, x: gpipe(lambda p, h, c: h + p, w, x, n_microbatches=2))(
            jnp.ones((2, 4), jnp.bfloat16), x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and np.array_equal(np.asarray(out, np.float32), x + 2)


def test_batch_layout_across_processes_is_checked_before_anything_runs():
    """Two processes of 4 devices each: a mesh whose outermost axis is not a batch axis (stage, tensor) gives each
    process's devices the whole batch while it loads half; the loader's first step failed (a traceback)."""
    from parallel.distributed import check_batch_layout

    first = jax.devices()[:4]
    for shape in ({"fsdp": 8}, {"data": 2, "stage": 2, "fsdp": 2}, {"fsdp": 4, "tensor": 2}, {"stage": 2, "data": 4}):
        check_batch_layout(make_mesh(shape), 8, 16, n_processes=2, local_devices=first)
    for shape in ({"stage": 2, "fsdp": 4}, {"sequence": 2, "tensor": 4}):
        with pytest.raises(ValueError, match=r"this process's devices hold rows \[0, 8\) of the global batch of 8.*"
                                             r"but it loads 4 contiguous rows"):
            check_batch_layout(make_mesh(shape), 8, 16, n_processes=2, local_devices=first)
    check_batch_layout(make_mesh({"stage": 2, "fsdp": 4}), 8, 16)  # one process: nothing to check


def test_any_process_raises_the_flag_on_every_process_when_one_raises_it(monkeypatch):
    """The SIGTERM stop: a flag raised on any process stops all of them at the same step (a process that went on
    would wait forever in a collective); only one raised must do. The all-gather is faked: one real process."""
    from jax.experimental import multihost_utils

    from parallel.distributed import any_process

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for mine, other in ((False, False), (False, True), (True, False), (True, True)):
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda x, other=other: np.stack([np.int32(x), np.int32(other)]))
        assert any_process(mine) is (mine or other), (mine, other)


def test_process_texts_are_each_process_s_own_text_without_the_padding(monkeypatch):
    """Texts of other lengths travel padded to the longest: each comes back as its process sent it, the shorter
    without NUL padding (check_same_settings compares the field names it returns). The all-gather is faked."""
    from jax.experimental import multihost_utils

    from parallel.distributed import process_texts

    other = "é, a longer text".encode()

    def allgather(x):
        x = np.asarray(x)
        if x.ndim == 0:  # the lengths
            return np.stack([x, np.int32(len(other))])
        return np.stack([x, np.frombuffer(other.ljust(x.shape[0], b"\0"), np.uint8)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert process_texts("short") == ["short", "é, a longer text"]


def test_check_shared_dir_a_path_process_0_cannot_write_in_is_refused_on_every_process(tmp_path, monkeypatch):
    """A path missing (or read-only) on process 0: its open raised FileNotFoundError there alone, before the barrier
    the others waited in, and both processes hung for good (killed after 90 s on two localhost processes). Now
    process 0 joins the all-gather with its error, and every process raises a ValueError naming the path and it.
    The collectives are faked: one real process, playing process 0, then process 1."""
    from jax.experimental import multihost_utils

    from parallel.distributed import check_shared_dir

    path = tmp_path / "missing"
    error0 = b"FileNotFoundError: No such file or directory"
    gathered = []

    def allgather(x, pid):  # [process 0's, process 1's]: the other's text is process 0's error or nothing
        x = np.asarray(x)
        gathered.append(x)
        if x.ndim == 0:  # the lengths (or a flag)
            other = np.int32(len(error0) if pid == 1 else 0)
        else:
            other = np.frombuffer(error0.ljust(x.shape[0], b"\0"), np.uint8) if pid == 1 else np.zeros_like(x)
        return np.stack([x, other] if pid == 0 else [other, x])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    for pid in (0, 1):
        gathered.clear()
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, pid=pid: allgather(x, pid))
        with pytest.raises(ValueError, match=f"train.out {path}: process 0 cannot write a file there "
                                             r"\(FileNotFoundError: No such file or directory\)"):
            check_shared_dir(path, "train.out")
        assert gathered, pid  # process 0 joined the collective the others wait in before raising


@pytest.mark.parametrize("indices,ok", [
    ([(slice(0, 2), slice(None))] * 2, True),              # data across processes: rows [0, 2) of 4, all of T
    ([(slice(2, 3), slice(None)), (slice(3, 4), slice(None))], True),   # fsdp inside the process
    ([(slice(None), slice(None))] * 2, False),             # batch replicated across processes (tensor over them)
    ([(slice(0, 2), slice(0, 8)), (slice(0, 2), slice(0, 8))], False),  # sequence across processes: half of T
    ([(slice(0, 2), slice(0, 8)), (slice(0, 2), slice(8, 16))], True),  # sequence inside the process: all of T
    ([(slice(0, 1), slice(0, 8)), (slice(1, 2), slice(8, 16))], False),  # rows and T split diagonally: a gap
    ([(slice(0, 1), slice(None))] * 2, False),             # devices hold 1 row where the process loads 2
])
def test_process_share_check(indices, ok):
    """Each process's local rows must fill exactly what its devices hold of the global [4, 16] batch."""
    from parallel.distributed import check_process_share

    if ok:
        check_process_share(indices, (4, 16), 2, {"data": 2})
    else:
        with pytest.raises(ValueError, match="put the processes on the outermost batch axis"):
            check_process_share(indices, (4, 16), 2, {"tensor": 2})


def test_process_share_names_rows_with_gaps():
    """Processes on an inner batch axis (dcn={'fsdp': 2} under data 2) hold rows [0, 2) and [4, 6): the message said
    'and only part of T' (T was whole) and advised the batch axes (they were on one)."""
    from parallel.distributed import check_process_share

    gaps = [(slice(0, 2), slice(None)), (slice(4, 6), slice(None))]
    with pytest.raises(ValueError, match=r"rows \[0, 6\) of the global batch of 8, not contiguously, but it loads 4 "
                                         r"contiguous rows .* outermost batch axis \(make_mesh\(\.\.\., dcn="):
        check_process_share(gaps, (8, 16), 4, {"data": 2, "fsdp": 2})
    with pytest.raises(ValueError, match=r"and only part of T, but"):
        check_process_share([(slice(0, 2), slice(0, 8))] * 2, (4, 16), 2, {"sequence": 2})
    with pytest.raises(ValueError, match=r"and only part of T, but"):  # the second half of T: part of it too
        check_process_share([(slice(0, 2), slice(8, 16))] * 2, (4, 16), 2, {"sequence": 2})


def test_parallel_helpers_name_their_misuse():
    """Each was a raw traceback from inside JAX / shard_map / numpy (IndexError, ZeroDivisionError, ...)."""
    import numpy as np
    import optax
    from flax import nnx

    from models import Transformer
    from parallel import abstract_sharded, create_sharded, shard_batch
    from parallel.distributed import global_batch_from_local, process_rows
    from parallel.pipeline import gpipe
    from parallel.sharding import batch_sharding, init_optimizer

    mesh = make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match=r"names='embed' must be a tuple of logical names, e.g. \('embed',\)"):
        logical_to_spec("embed", mesh)
    with pytest.raises(ValueError, match=r"2 names \('embed', 'mlp'\) for a shape of 1 dims"):
        logical_to_spec(("embed", "mlp"), mesh, (8,))
    with pytest.raises(ValueError, match=r"global_batch_from_local: a local array \(7, 4\) .*'batch' of size 7"):
        global_batch_from_local(np.zeros((7, 4)), mesh)
    with pytest.raises(ValueError, match="global_batch_from_local: a scalar"):  # an IndexError before
        global_batch_from_local(np.int32(3), mesh)
    with pytest.raises(ValueError, match=r"batch=\('data', 'data'\) names a mesh axis twice"), \
            use_rules(batch=("data", "data")):  # jax's DuplicateSpecError at the first use before
        pass
    with pytest.raises(ValueError, match=r"a batch array needs a leading batch dim \[B, ...\]; got 0 dims"):
        batch_sharding(mesh, 0)  # replicated a "batch" without a word
    with pytest.raises(ValueError, match=r"init_optimizer: params holds no arrays"):
        init_optimizer(optax.adam(1e-3), {})  # an optimizer of nothing: a model that never trains
    with pytest.raises(ValueError, match="make_mesh: devices is empty"):
        make_mesh({"data": -1}, devices=[])
    for bad in (0, -4, 2.0):
        with pytest.raises(ValueError, match="process_rows: global_batch"):
            process_rows(bad)
    x = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"inside `with jax.set_mesh\(mesh\):`"):
        gpipe(lambda p, x, c: x, {"w": np.zeros((2, 8))}, x, n_microbatches=2)
    with pytest.raises(ValueError, match="n_microbatches=0 must be an int >= 1"), jax.set_mesh(mesh):
        gpipe(lambda p, x, c: x, {"w": np.zeros((2, 8))}, x, n_microbatches=0)
    # 'layers' on an axis the activations use: the model pipelined over fsdp and failed inside shard_map
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, mlp_dim=64)
    # a built module ran its forward pass ("missing 1 required positional argument: 'tokens_BT'"); a list was four
    # scalars to jax ("an array (): ..."); a string failed in jnp.asarray
    with nnx.use_eager_sharding(False):
        built = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"create_sharded\(model_fn, mesh\): model_fn builds the model, .* got "
                                        r"Transformer .* shard_state"):
        create_sharded(built, mesh)
    with pytest.raises(TypeError, match=r"abstract_sharded\(model_fn, mesh\): model_fn builds the model"):
        abstract_sharded(built, mesh)
    with pytest.raises(ValueError, match=r"shard_batch: batch\['a'\]\[0\] is a scalar; .* np.asarray\(rows\)"):
        shard_batch({"a": [1, 2, 3, 4]}, mesh)
    with pytest.raises(TypeError, match=r"shard_batch: batch\['a'\] is a str, not an array"):
        shard_batch({"a": "hello"}, mesh)
    with use_rules(layers="fsdp"):
        gd, p = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
        tok = shard_batch(np.zeros((8, 8), np.int32), mesh)
        with pytest.raises(ValueError, match=r"'layers' maps to mesh axis 'fsdp', which \[.*'embed'.*\] use too"), \
                jax.set_mesh(mesh):
            jax.jit(lambda p, t: nnx.merge(gd, p)(t))(p, tok)


def test_make_mesh_names_devices_given_twice_or_that_are_no_devices():
    """make_mesh({'data': 2}, devices=[d0, d0]) built a mesh, and its first use failed in jax's device_put with a bare
    AssertionError; device ids ([0, 1, 2, 3]) failed with "'int' object has no attribute 'device_kind'"."""
    d = jax.devices()
    with pytest.raises(ValueError, match=r"make_mesh: devices lists \[0, 1\] more than once"):
        make_mesh({"data": 2, "fsdp": 4}, devices=d[:2] * 2 + d[2:6])
    with pytest.raises(ValueError, match=r"make_mesh: devices holds int 0, not a jax Device; .*jax.devices\(\)\[i\]"):
        make_mesh({"data": 4}, devices=[0, 1, 2, 3])


def test_a_variable_the_rules_cannot_place_is_named_by_its_path():
    """logical_shardings' refusals named a logical dimension but not the variable: in an MoE model whose
    expert_mlp_dim the tensor axis does not divide, "dimension 'mlp' of size 10 ... use a config mlp_dim (an MoE's
    moe.expert_mlp_dim / shared_mlp_dim)" left the weight to guess, and a module's names of the wrong length
    ("1 names ('embed',) for a shape of 2 dims") pointed at no parameter."""
    from flax import nnx

    from models import Transformer
    from models.moe import MoEConfig
    from parallel import abstract_sharded

    moe = dataclasses.replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=10), moe_every=2)
    mesh = make_mesh({"data": 2, "tensor": 4})
    with pytest.raises(ValueError, match=r"^state\['moe_blocks'\]\['moe'\]\['w_down'\]: dimension 'mlp' of size 10"):
        abstract_sharded(lambda: Transformer(moe, rngs=nnx.Rngs(0)), mesh)

    class Mine(nnx.Module):
        def __init__(self, rngs):
            with nnx.use_eager_sharding(False):
                self.w = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(rngs.params(), (8, 8)))

    with pytest.raises(ValueError, match=r"^state\['w'\]: logical_to_spec: 1 names \('embed',\) for a shape of 2"):
        abstract_sharded(lambda: Mine(nnx.Rngs(0)), mesh)
    # a mesh the rules cannot place on is about the mesh, not the first variable: named as before
    foreign = jax.make_mesh((2, 4), ("dp", "mp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"^mesh axes \['dp', 'mp'\] are none of the axes"):
        abstract_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), foreign)


def test_meshes_the_rules_cannot_place_on_are_refused_by_name():
    """A mesh from jax.make_mesh: axes named 'dp' / 'mp' (no rule can name them) placed every parameter and batch
    replicated, silently, and Explicit axes (jax.make_mesh's default) failed in the first step with a
    ShardingTypeError from inside the embedding gather. Both are named before anything compiles."""
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded, shard_batch

    Auto, Explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    tok = np.zeros((8, 16), np.int32)
    foreign = jax.make_mesh((2, 4), ("dp", "mp"), axis_types=(Auto, Auto))
    with pytest.raises(ValueError, match=r"mesh axes \['dp', 'mp'\] are none of the axes the rules table maps to"):
        create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), foreign)
    with pytest.raises(ValueError, match=r"shard_batch: batch, an array \(8, 16\): mesh axes \['dp', 'mp'\]"):
        shard_batch(tok, foreign)
    explicit = jax.make_mesh((8,), ("data",), axis_types=(Explicit,))
    with pytest.raises(ValueError, match=r"mesh axes \['data'\] are Explicit .* parallel.make_mesh"):
        create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), explicit)
    with pytest.raises(ValueError, match=r"mesh axes \['data'\] are Explicit"):
        shard_batch(tok, explicit)
    # and a model's activation constraints under it (their skip for gpipe's all-manual mesh passed it silently)
    from parallel.rules import constrain, constrain_leading
    with jax.set_mesh(explicit):
        for fn in (constrain, constrain_leading):
            with pytest.raises(ValueError, match=r"mesh axes \['data'\] are Explicit"):
                fn(jax.numpy.ones((8, 4)), ("batch", None))
    # a size-1 axis of another name changes no placement (and make_mesh's own meshes place as the table says)
    one = jax.make_mesh((8, 1), ("data", "dp"), axis_types=(Auto, Auto))
    assert shard_batch(tok, one).sharding.spec == shard_batch(tok, make_mesh({"data": 8})).sharding.spec == \
        jax.P("data", None)


def test_shard_state_of_plain_arrays_names_the_leaf_and_the_fix():
    """A pure dict of arrays (nnx.to_pure_dict, a loaded checkpoint) has no logical names to place it by: an
    AttributeError ('numpy.ndarray' object has no attribute 'get_metadata') named neither the leaf nor the fix."""
    from flax import nnx

    from models import Transformer
    from parallel import shard_state

    mesh = make_mesh({"fsdp": 8})
    with nnx.use_eager_sharding(False):
        state = nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"state\['blocks'\]\['attn_norm'\] \(and 14 more leaves\) is a plain "
                                        r"ndarray: pass the model's state, nnx.split\(model\)\[1\]"):
        shard_state(jax.tree.map(np.asarray, nnx.to_pure_dict(state)), mesh)
    placed = shard_state(state, mesh)  # the same arrays as Variables: placed by their names, as the table says
    assert placed["embed"][...].sharding.spec == jax.P(None, "fsdp")  # [V, D]: ('vocab', 'embed')


def test_shard_state_leaves_the_plain_model_alive_after_a_donating_step():
    """shard_state's device_put aliased the replicated leaves' device-0 shard to the plain model's arrays, so the first
    donating step (make_train_step donates the state) deleted the norm scales of the model it was placed from: that
    model then failed in 'Array has been deleted' (the reference a researcher compares the sharded run against)."""
    import optax
    from flax import nnx

    from experiments.lm_step import make_train_step
    from models import Transformer
    from parallel import init_optimizer, shard_batch, shard_state

    mesh = make_mesh({"data": 4, "tensor": 2})
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    placed = shard_state(params, mesh)
    opt = optax.adamw(1e-3)
    batch = shard_batch({"inputs": np.zeros((8, 16), np.int32), "targets": np.zeros((8, 16), np.int32)}, mesh)
    with jax.set_mesh(mesh):
        make_train_step(graphdef, opt)(placed, init_optimizer(opt, placed), batch)
    assert not [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(params) if x.is_deleted()]
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 64)


def test_a_sharded_model_run_without_jax_set_mesh_warns_with_the_fix():
    """Forgetting `with jax.set_mesh(mesh):` around a step over create_sharded's state gave the right values with
    every activation constraint silently skipped (`constrain` is a no-op outside a mesh): in a forward + backward
    pass {data 2, sequence 4} did 4.0x the FLOPs per device and {fsdp 8} used 5.8x the temp memory. Sharded arrays
    now warn with the fix; a model on one device (no mesh anywhere) runs without a warning."""
    import warnings

    from flax import nnx

    from models import Transformer
    from parallel import shard_batch, shard_state

    mesh = make_mesh({"data": 2, "sequence": 4})
    tok = np.zeros((8, 16), np.int32)
    with nnx.use_eager_sharding(False):
        plain_model = Transformer(CFG, rngs=nnx.Rngs(0))
    gd, params = nnx.split(plain_model)
    params = shard_state(params, mesh)  # create_sharded's placements (without compiling an init)
    fwd = jax.jit(lambda p, t: nnx.merge(gd, p)(t))
    for batch in (shard_batch(tok, mesh), tok):  # the batch placed or not: the parameters carry the mesh
        fwd.clear_cache()  # (the warning comes from tracing)
        with pytest.warns(UserWarning, match=r"sharded over the mesh \{'data': 2, 'sequence': 4\}.* no mesh is set"
                                             r".*with jax.set_mesh\(mesh\)"):
            forgot = fwd(params, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the mesh, and on one device without one: no warning
        with jax.set_mesh(mesh):
            sharded = fwd(params, shard_batch(tok, mesh))
        plain = plain_model(jnp.asarray(tok))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-5)
    np.testing.assert_allclose(np.asarray(forgot), np.asarray(plain), atol=1e-5)  # the values were always right


def test_a_model_called_eagerly_inside_jax_set_mesh_takes_tokens_on_one_device():
    """`with jax.set_mesh(mesh): model(jnp.asarray(tokens))`, called eagerly (no jax.jit), raised jax's bare "The
    sharding on the input must be a `NamedSharding`" from the first activation constraint unless the tokens came
    through shard_batch (NumPy tokens passed), and a plain one-device model always did: eager
    with_sharding_constraint takes only mesh-sharded arrays. The logits (and a sliding-window model's, whose
    blocked kernel constrains merged rows) are the plain model's outside the mesh, laid out on the mesh."""
    from flax import nnx

    from models import Transformer
    from parallel import shard_state

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tok = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 16)), jnp.int32)  # on one device
    for cfg in (CFG, dataclasses.replace(CFG, attn_pattern="local", sliding_window=4)):
        with nnx.use_eager_sharding(False):
            plain = Transformer(cfg, rngs=nnx.Rngs(0))
        want, want_h = np.asarray(plain(tok)), np.asarray(plain.hidden_states(tok))
        gd, state = nnx.split(plain)
        state = shard_state(state, mesh)  # the plain model's parameters placed by the rules (no init compiled)
        with jax.set_mesh(mesh):
            sharded = nnx.merge(gd, state)(tok)
            np.testing.assert_allclose(np.asarray(plain(tok)), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(plain.hidden_states(tok)), want_h, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sharded), want, rtol=1e-5, atol=1e-5)
        assert sharded.sharding.spec[0] == ("data", "fsdp")  # the batch rows on the mesh's batch axes
    from parallel.rules import constrain

    with jax.set_mesh(mesh):  # an array on one device that a jitted function captures is constrained as before
        rows = jax.jit(lambda x: constrain(tok, ("batch", None)) + x)(jnp.zeros_like(tok))
    assert rows.sharding.spec[0] == ("data", "fsdp") and np.array_equal(np.asarray(rows), np.asarray(tok))


def test_a_model_built_eagerly_inside_jax_set_mesh_warns_that_it_is_replicated():
    """flax's idiom for a sharded init, `with jax.set_mesh(mesh): model = Model(...)`, gave every parameter P() on
    every device (our modules turn eager sharding off: logical names are not mesh axes), silently: on {fsdp 8}
    each device held the whole model. It now warns with the fix; create_sharded (which builds under the mesh, traced)
    and a build outside any mesh do not."""
    import warnings

    from flax import nnx

    from models import Transformer
    from parallel import create_sharded

    mesh = make_mesh({"fsdp": 8})
    with pytest.warns(UserWarning, match=r"built inside jax.set_mesh\(\{'fsdp': 8\}\) has every parameter replicated"
                                         r".*parallel.create_sharded"), jax.set_mesh(mesh):
        model = Transformer(CFG, rngs=nnx.Rngs(0))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(nnx.state(model)))  # what it warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
        with nnx.use_eager_sharding(False):
            Transformer(CFG, rngs=nnx.Rngs(0))
    assert state["embed"][...].sharding.spec == jax.P(None, "fsdp")


def test_init_optimizer_shards_factored_and_masked_optimizer_states():
    """Adafactor's factored v_row / v_col follow the parameters' tree but not their shapes, and Muon's state holds
    masked-out leaves: init_optimizer failed on both inside pjit ("incompatible with its sharding annotation", a
    pytree structure error naming MaskedNode)."""
    import optax
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded, init_optimizer

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    _, params = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    wq = params["blocks"]["wq"][...]
    for opt in (optax.adafactor(1e-3), optax.contrib.muon(1e-3)):
        state = init_optimizer(opt, params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state,
                     jax.jit(opt.init)(params))
        # the param-shaped leaves (Adafactor's v for unfactored dims, Muon's momentum) are split like their parameter
        like_wq = [x for x in jax.tree.leaves(state) if x.shape == wq.shape]
        assert like_wq and all(x.sharding.spec == wq.sharding.spec for x in like_wq), opt
        # and the rest (step counts, factored moments) replicated on the mesh, not left on one device as jax.jit's
        # init puts them (SingleDeviceSharding beside parameters on 8 devices)
        assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
                   for x in jax.tree.leaves(state)), opt


def test_optimizer_shardings_follow_the_parameters_under_a_transfer_guard():
    """optax's tree_map_params runs `init` eagerly on placeholders, whose jnp.zeros step count is a host-to-device
    transfer: under jax_transfer_guard='disallow' (a profiling session's setting) optimizer_shardings caught the
    refusal and replicated every leaf (Adam's moments whole on each device), warning of an optimizer that reads its
    parameters."""
    import warnings

    import optax
    from flax import nnx

    from models import Transformer
    from parallel import create_sharded
    from parallel.sharding import optimizer_shardings

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    _, params = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    opt = optax.adam(1e-3)
    abstract = jax.eval_shape(opt.init, params)
    want = optimizer_shardings(opt, abstract, params)
    with warnings.catch_warnings(), jax.transfer_guard("disallow"):
        warnings.simplefilter("error")
        got = optimizer_shardings(opt, abstract, params)
    assert got == want
    assert got[0].mu["blocks"]["wq"].spec == params["blocks"]["wq"][...].sharding.spec != jax.sharding.PartitionSpec()


def test_init_optimizer_takes_an_optimizer_whose_init_reads_the_parameters():
    """optax.flatten (Adam's moments as one flat vector) and optax.lbfgs read their parameters in init (a
    concatenation, a dtype): optax's tree_map_params hands init placeholders, and init_optimizer raised "Need at least
    one array to concatenate" / an IndexError. Their state is replicated on the mesh, and a flattened Adam trains
    as it does on one device (within 1e-4 at lr 1e-2: Adam's first step divides gradients near its eps), with the
    first moment (the gradient) of one device leaf by leaf."""
    import optax
    from flax import nnx

    from experiments.lm_step import init_train_state, make_state_step
    from models import Transformer
    from parallel import create_sharded, init_optimizer, shard_batch

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    graphdef, params = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    with pytest.warns(UserWarning, match=r"every state leaf is replicated on each device"):
        lbfgs = init_optimizer(optax.lbfgs(), params)
    assert all(x.sharding.mesh == mesh and x.sharding.is_fully_replicated for x in jax.tree.leaves(lbfgs))
    opt = optax.flatten(optax.adam(1e-2))
    rows = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8, 16)).astype(np.int32)
    batch = {"inputs": rows[0], "targets": rows[1]}
    with nnx.use_eager_sharding(False):
        g1, p1 = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    one, _ = make_state_step(g1, opt)(init_train_state(p1, opt), batch)
    with pytest.warns(UserWarning, match=r"optax.flatten, optax.lbfgs"):
        state = init_train_state(params, opt)
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(state["opt_state"]))
    with jax.set_mesh(mesh):
        state, _ = make_state_step(graphdef, opt)(state, shard_batch(batch, mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4), state["params"],
                 one["params"])
    # Adam's first step is ~lr·sign(g): a gradient 3% off moved no parameter. Its first moment is 0.1·g, flattened
    # in the parameters' leaf order: each leaf within 1e-4 of its own largest (the noise is <= 5e-7 of it, measured)
    leaves = jax.tree_util.tree_leaves_with_path(one["params"])
    cut = np.cumsum([x.size for _, x in leaves])[:-1]
    for (path, _), a, b in zip(leaves, np.split(np.asarray(state["opt_state"][0].mu), cut),
                               np.split(np.asarray(one["opt_state"][0].mu), cut)):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


def test_models_param_builds_in_a_module_of_your_own_without_turning_eager_sharding_off():
    """models.params.param annotates logical names; called in a researcher's module built plainly (no
    `nnx.use_eager_sharding(False)`), flax read 'embed' as a mesh axis and raised "An auto mesh context or metadata
    is required". The rules still place it: create_sharded splits it as the table says."""
    from flax import nnx

    from models.params import param
    from parallel import create_sharded

    class Mine(nnx.Module):
        def __init__(self, rngs):
            self.w = param(rngs, (16, 8), ("embed", "mlp"), jnp.float32, 0.02)

    assert Mine(nnx.Rngs(0)).w[...].shape == (16, 8)
    _, state = create_sharded(lambda: Mine(nnx.Rngs(0)), make_mesh({"fsdp": 4, "tensor": 2}))
    assert state["w"][...].sharding.spec == jax.P("fsdp", "tensor")


def test_the_rules_table_places_each_name_on_the_mesh_axes_it_names():
    """The table read by hand, name by name, on meshes where every axis it names has size 2: a rule mapped to
    another axis (or to None) changed no value anywhere and no other test looked at batch over `expert`, the MoE
    capacity slots over `sequence`, or the video rules (conv_out, modulation)."""
    from parallel.rules import mesh_axis_for, sharing_axis

    expected = {  # logical name -> the mesh axes it splits over, from the module docstring and comments
        "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "head_dim": None, "mlp": "tensor",
        "layers": "stage", "expert": "expert", "norm": None, "conv_kernel": None, "conv_in": "fsdp",
        "conv_out": "tensor", "patch": None, "modulation": "tensor", "batch": ("data", "fsdp", "expert"),
        "act_seq": "sequence", "act_embed": None, "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor",
        "act_vocab": "tensor", "act_head_dim": None, "act_capacity": "sequence"}
    for shape in ({"data": 2, "fsdp": 2, "expert": 2}, {"stage": 2, "sequence": 2, "tensor": 2}):
        mesh = make_mesh(shape)
        for name, axes in expected.items():
            want = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in shape)
            got = logical_to_spec((name,), mesh, (8,))[0]
            assert got == (None if not want else want[0] if len(want) == 1 else want), (name, shape, got)
    # what models ask of the table: the mesh axis (and its size) of a name, and the names sharing an axis with it
    with jax.set_mesh(make_mesh({"stage": 2, "fsdp": 4})):
        assert mesh_axis_for("layers") == ("stage", 2) and mesh_axis_for("embed") == ("fsdp", 4)
        assert mesh_axis_for("act_seq") == (None, 1)
    assert sharing_axis("layers", "stage") == [] and sharing_axis("embed", "fsdp") == ["batch", "conv_in"]
    with use_rules(layers="fsdp"):
        assert "layers" not in sharing_axis("layers", "fsdp") and "embed" in sharing_axis("layers", "fsdp")


def test_an_moe_model_on_a_stage_mesh_is_refused_for_its_moe_layers_not_its_layer_count():
    """MoE layers do not pipeline (the model's forward refuses them by name), but placement came first: a 2-layer
    model with one MoE layer was told 'use a config n_layers that is a multiple of 2' (its 1-layer stacks), and 4
    layers then placed, only for the forward to refuse. A dense model keeps the rules' count advice; rules that
    keep the layer stack whole (layers=None) place the MoE model as before."""
    from flax import nnx

    from models import Transformer
    from models.moe import MoEConfig
    from parallel import abstract_sharded, create_sharded, shard_state

    mesh = make_mesh({"stage": 2, "fsdp": 4})
    moe = dataclasses.replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=32), moe_every=2)
    for n_layers in (2, 4):
        cfg = dataclasses.replace(moe, n_layers=n_layers)
        for place in (create_sharded, abstract_sharded):
            with pytest.raises(ValueError, match=r"^MoE layers under pipeline parallelism are not supported .*mesh "
                                                 r"axis 'stage' \(2\) splits the layer stack.*without a 'stage' axis"):
                place(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
        # shard_state too (found by a property fuzz of the train step: {stage: 8} told a 4-layer MoE model to use
        # a multiple of 8 layers)
        _, host = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        with pytest.raises(ValueError, match=r"^MoE layers under pipeline parallelism are not supported .*this model "
                                             r"has \d MoE layers? and mesh axis 'stage' \(2\)"):
            shard_state(host, mesh)
    with pytest.raises(ValueError, match="use a config n_layers that is a multiple of 2"):  # dense: as before
        abstract_sharded(lambda: Transformer(dataclasses.replace(CFG, n_layers=1), rngs=nnx.Rngs(0)), mesh)
    _, state = abstract_sharded(lambda: Transformer(moe, rngs=nnx.Rngs(0)), mesh, rules={"layers": None})
    assert state["moe_blocks"]["attn_norm"].get_value().sharding.spec == jax.P()


def test_shard_state_and_abstract_sharded_place_by_the_rules_argument():
    """`rules=` of shard_state and abstract_sharded (the restore target) overrides the table as create_sharded's does:
    only create_sharded's was tested, so either could ignore it and place by the table (a checkpoint restored with
    another layout than the run's)."""
    from flax import nnx

    from models import Transformer
    from parallel import abstract_sharded, create_sharded, shard_state

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    build = lambda: Transformer(CFG, rngs=nnx.Rngs(0))  # noqa: E731
    _, made = create_sharded(build, mesh, rules={"embed": None})
    _, target = abstract_sharded(build, mesh, rules={"embed": None})
    with nnx.use_eager_sharding(False):
        placed = shard_state(nnx.state(build()), mesh, rules={"embed": None})
    for state in (made, target, placed):  # (abstract_sharded's are ShapeDtypeStructs)
        assert state["blocks"]["wq"].get_value().sharding.spec == jax.P(None, None, "tensor")  # [L, D, N, H]: D whole
        assert state["embed"].get_value().sharding.spec == jax.P("tensor")  # [V, D]
    _, default = abstract_sharded(build, mesh)
    assert default["embed"].get_value().sharding.spec == jax.P("tensor", "fsdp")
    # the batch helpers too: T = 6 whole on every sequence device, as rules= says (the table's split raises)
    from parallel import shard_batch
    from parallel.distributed import global_batch_from_local, process_rows

    sp = make_mesh({"data": 2, "sequence": 4})
    tok = np.arange(12, dtype=np.int32).reshape(2, 6)
    whole_t = {"act_seq": None}
    for x in (shard_batch(tok, sp, rules=whole_t), global_batch_from_local(tok, sp, rules=whole_t)):
        assert x.sharding.spec == jax.P("data", None) and np.array_equal(np.asarray(x), tok)
    assert process_rows(6, sp, rules={"batch": None}) == slice(0, 6)  # 6 rows the data axis would not divide


def test_a_mesh_without_this_process_s_devices_is_named():
    """A mesh over other processes' devices only (make_mesh(devices=...) over a subset, e.g. process 0's) gives this
    process no rows: process_rows, check_batch_layout and global_batch_from_local failed with "min() arg is an empty
    sequence"."""
    from parallel.distributed import check_batch_layout, check_process_share, process_rows

    others = make_mesh({"data": 4}, devices=jax.devices()[4:])
    says = r"none of this process's devices is in the mesh \{'data': 4\}.*devices=None"
    with pytest.raises(ValueError, match=says):
        process_rows(8, others, local_devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=says):
        check_batch_layout(others, 8, 16, n_processes=2, local_devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"none of this process's devices is in the mesh"):
        check_process_share([], (8, 16), 4, {"data": 4})


def test_check_same_settings_names_the_fields_that_differ(monkeypatch):
    """Each field is compared by its own hash across processes (only the two-process tests covered it): a field
    that differs on one process is named, and only that one; the same fields on every process pass. The
    all-gather is faked (one real process): process 1's hashes are those a first call with its settings gathers."""
    from jax.experimental import multihost_utils

    from parallel.distributed import check_same_settings

    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def gathered(settings):  # what process 1 contributes: its field count, then its fields' hashes
        sent = []
        monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: sent.append(x) or np.stack([x, x]))
        check_same_settings(settings)
        return sent

    mine = {"a": "1", "b": "2", "c": "3"}
    for other, differ in (({**mine, "b": "5"}, "b"), ({**mine, "c": "0"}, "c"), ({**mine, "a": "0", "c": "0"}, "a, c"),
                          (mine, None)):
        theirs = iter(gathered(other))
        monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, theirs=theirs: np.stack([x, next(theirs)]))
        if differ is None:
            check_same_settings(mine)
        else:
            with pytest.raises(ValueError, match=rf"processes \[1\] were started with other settings than process 0: "
                                                 rf"{differ} differ; start every process"):
                check_same_settings(mine)
    theirs = iter(gathered({**mine, "d": "4"}))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, next(theirs)]))
    with pytest.raises(ValueError, match=r"process 0 has 3 fields, process 1 has 4 fields"):
        check_same_settings(mine)


def test_initialize_with_a_coordinator_and_one_process_starts_nothing(monkeypatch):
    """One process named with a coordinator (a launcher's single-node run) is not a distributed job: nothing starts
    and process 0's port is not probed (only the refusals around it were tested)."""
    from parallel import distributed

    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: pytest.fail("must not start"))
    monkeypatch.setattr(distributed, "_check_port_free", lambda *a: pytest.fail("no port to serve"))
    assert distributed.initialize("127.0.0.1:1", 1, 0) is False
    # ... while a process id past 0 without a coordinator is a process of a larger job: refused, not run alone
    with pytest.raises(ValueError, match=r"num_processes=None, process_id=1 given without a coordinator"):
        distributed.initialize(process_id=1)


def test_a_coordinator_without_a_usable_port_is_refused_on_every_process(monkeypatch):
    """Only process 0 checked the coordinator's port: process 1 of '127.0.0.1' died in jax with 'IndexError: list
    index out of range', of '127.0.0.1:abc' or ':0' waited init_timeout_s (300 s) and aborted with DEADLINE_EXCEEDED,
    and process 0 of ':70000' raised OverflowError ('bind(): port must be 0-65535'). Every process now names it."""
    from parallel import distributed

    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: pytest.fail("must not start"))
    for bad in ("127.0.0.1", "127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:70000"):
        for pid in (0, 1):
            with pytest.raises(ValueError, match=rf"coordinator={bad!r}: give the coordinator as host:port, a port"):
                distributed.initialize(bad, 2, pid)
    monkeypatch.setenv("JAXSCALE_COORDINATOR", "host0")  # named by where it came from
    with pytest.raises(ValueError, match=r"JAXSCALE_COORDINATOR='host0': give the coordinator as host:port"):
        distributed.initialize(None, 2, 1)
    started = []  # an IPv6 address with its port, on a process past 0 (no port probed): started as given
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: started.append(a))
    assert distributed.initialize("[::1]:1234", 2, 1) is True and started == [("[::1]:1234", 2, 1)]


def test_initialize_takes_numpy_counts_and_refuses_bools(monkeypatch):
    """np.int64(2) processes (a count computed with numpy) was refused as 'need num_processes >= 1', and
    num_processes=True read as one process: nothing started, silently."""
    from parallel import distributed

    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: started.append(a))
    monkeypatch.setattr(distributed, "_check_port_free", lambda *a: None)
    assert distributed.initialize("127.0.0.1:1234", np.int64(2), np.int64(1)) is True
    assert started == [("127.0.0.1:1234", 2, 1)] and all(type(v) is int for v in started[0][1:])
    for n, i in ((True, False), (2, True), (2.0, 1)):
        with pytest.raises(ValueError, match=rf"num_processes={n!r}, process_id={i!r}: need ints with"):
            distributed.initialize("127.0.0.1:1234", n, i)
    assert len(started) == 1


def test_initialize_again_once_jax_distributed_runs_starts_nothing(monkeypatch):
    """A second initialize() in a running job (train_lm.main called twice by one script, or after the caller's own
    jax.distributed.initialize): process 0 refused its own coordinator's port as 'in use (another job)', the others
    failed in jax ('should only be called once'). It now starts nothing and says whether the job has several
    processes; values that are not the running job's are refused by name."""
    import socket

    from parallel import distributed

    for k in [k for k in os.environ if k.startswith(("SLURM_", "JAXSCALE_", "OMPI_", "TPU_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: pytest.fail("already running"))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with socket.socket() as coordinator:  # the running coordinator holds its port
        coordinator.bind(("", 0))
        coordinator.listen()
        address = f"127.0.0.1:{coordinator.getsockname()[1]}"
        assert distributed.initialize(address, 2, 0) is True
        assert distributed.initialize() is True  # no arguments: the job that runs
        monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "2")  # a count without a coordinator: the running job's
        assert distributed.initialize() is True
        with pytest.raises(ValueError, match=r"process_id=1, but jax.distributed already runs here with process_id=0"):
            distributed.initialize(address, 2, 1)
        with pytest.raises(ValueError, match=r"num_processes=1, but jax.distributed already runs here with num_proc"):
            distributed.initialize(address, 1, 0)


def test_global_batch_from_local_stacks_the_processes_rows(monkeypatch):
    """Each process's [b, T] rows are a 1/n share of a [n·b, T] global batch (not [b, n·T], nor [b, T]), and a mesh
    that gives this process's devices more than its share is refused (one real process: the count is faked, so this
    process's devices hold all 8 rows while it loads 4)."""
    from parallel.distributed import global_batch_from_local

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mesh = make_mesh({"data": 4, "sequence": 2})
    with pytest.raises(ValueError, match=r"a local array \(3, 8\) \(2 processes\): dimension 'batch' of size 6 does"):
        global_batch_from_local(np.zeros((3, 8), np.int32), mesh)
    with pytest.raises(ValueError, match=r"this process's devices hold rows \[0, 8\) of the global batch of 8, but it "
                                         r"loads 4 contiguous rows"):
        global_batch_from_local(np.zeros((4, 8), np.int32), mesh)


def test_constrain_leading_splits_the_leading_dims_and_leaves_the_rest_to_xla():
    """[B, Q, ...] blocks: B to the batch axes, Q to the sequence axes, each replicated where its axes do not divide
    it (one prompt on a data mesh: B = 1 replicated over data, its Q still split), the other dims UNCONSTRAINED (XLA
    keeps what arrives); a rule sharing an axis gives it to the first dim, as logical_to_spec does."""
    from parallel.rules import constrain_leading

    def leading(y):  # the output's spec of the two leading dims (jax trims trailing Nones)
        return (*y.sharding.spec, None, None)[:2]

    mesh = make_mesh({"data": 2, "sequence": 4})
    with jax.set_mesh(mesh):
        for shape, spec in (((8, 4, 3), ("data", "sequence")), ((16, 2, 3), ("data", None)),
                            ((1, 32, 3), (None, "sequence"))):
            x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
            y = jax.jit(lambda x: constrain_leading(x, ("batch", "act_seq")))(x)
            assert leading(y) == spec and np.array_equal(np.asarray(y), np.asarray(x)), (shape, y.sharding)
        with use_rules(act_seq=("data", "sequence")):
            y = jax.jit(lambda x: constrain_leading(x, ("batch", "act_seq")))(jnp.zeros((8, 4, 3)))
        assert leading(y) == ("data", "sequence"), y.sharding.spec


def test_parse_mesh_refuses_unknown_axis_names_as_make_mesh_does():
    """parse_mesh('dat=2') returned {'dat': 2}: the misspelt axis was accepted with the rest of the config and
    refused only when make_mesh built the mesh. It is refused at parse time, with make_mesh's message."""
    from parallel.mesh import parse_mesh

    for text, bad in (("dat=2", "dat"), ("data=2,Tensor=4", "Tensor"), ("=2", "")):
        with pytest.raises(ValueError, match=rf"mesh: mesh axes \['{bad}'\] are unknown; use names from \('data',"):
            parse_mesh(text)
    with pytest.raises(ValueError, match=r"^mesh axes \['dat'\] are unknown; use names from \('data',"):
        make_mesh({"dat": 2})
    assert parse_mesh("stage=2, fsdp=-1,tensor=1") == {"stage": 2, "fsdp": -1, "tensor": 1}


def test_parse_mesh_refuses_a_mesh_with_no_axes():
    """--mesh '' (an unset shell variable) parsed to {}: train_video's make_mesh({}) then put every device on data,
    silently, while train_lm refused it as "mesh {} needs 1 devices but 8 are available"."""
    from experiments.config import ConfigError, load, validate
    from parallel.mesh import parse_mesh

    for text in ("", " ", ",", " , "):
        with pytest.raises(ValueError, match=r"^mesh: .* names no axis; write axis=size pairs like data=2,fsdp=4 "
                                             r"\(data=-1: every device on data\)"):
            parse_mesh(text)
    with pytest.raises(ConfigError, match=r"^mesh: '' names no axis"):
        validate(load(["--preset", "tiny", "--mesh", ""]), 8)
    assert parse_mesh("data=2,") == {"data": 2}  # a trailing comma, as before


def test_parse_mesh_names_a_value_that_is_not_a_string():
    """parse_mesh(None) (an unset --mesh) and parse_mesh({'data': 2}) failed with AttributeError: 'NoneType' object
    has no attribute 'split', naming neither the mesh nor the form; experiments' ConfigError wrapper let it through."""
    from experiments.config import ConfigError, parse_mesh as parse_spec_mesh
    from parallel.mesh import parse_mesh

    for bad in (None, 2, ["data=2"]):
        with pytest.raises(ValueError, match=r"mesh: parse_mesh takes a string like 'data=2,fsdp=4', got "):
            parse_mesh(bad)
    with pytest.raises(ValueError, match=r"got dict \{'data': 2\}; a dict is already parsed: pass it to make_mesh"):
        parse_mesh({"data": 2})
    with pytest.raises(ConfigError, match=r"mesh: parse_mesh takes a string"):
        parse_spec_mesh(None)


def test_check_batch_layout_takes_the_rules_process_rows_uses(monkeypatch):
    """check_batch_layout took no rules= while process_rows / global_batch_from_local do: with rules={'batch': None}
    on {data 2, fsdp 4} over 2 processes it passed the layout that process_rows then refused (each process holds all
    8 rows), and with rules={'batch': 'sequence', 'act_seq': None} on {sequence 2, tensor 4} it refused the layout
    process_rows accepts (rows [0, 4) per process). With the same rules the two agree."""
    from parallel.distributed import check_batch_layout, process_rows

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    first = jax.devices()[:4]
    replicated, by_sequence = {"batch": None}, {"batch": "sequence", "act_seq": None}
    mesh = make_mesh({"data": 2, "fsdp": 4})
    for check in (lambda: process_rows(8, mesh, rules=replicated, local_devices=first),
                  lambda: check_batch_layout(mesh, 8, 16, n_processes=2, local_devices=first, rules=replicated)):
        with pytest.raises(ValueError, match=r"hold rows \[0, 8\) of the global batch of 8, but it loads 4"):
            check()
    mesh = make_mesh({"sequence": 2, "tensor": 4})
    assert process_rows(8, mesh, rules=by_sequence, local_devices=first) == slice(0, 4)
    check_batch_layout(mesh, 8, 16, n_processes=2, local_devices=first, rules=by_sequence)


def test_initialize_refuses_a_process_started_with_another_process_count(monkeypatch):
    """JAX takes the process count from process 0's coordinator alone: a two-process job whose process 1 was
    started with JAXSCALE_NUM_PROCESSES=3 joined and trained silently as one of 2. Every process now compares the
    count it asked for with the job's (one all-gather) and raises naming the processes and the fix."""
    from jax.experimental import multihost_utils

    from parallel import distributed

    for k in [k for k in os.environ if k.startswith(("SLURM_", "JAXSCALE_", "OMPI_", "TPU_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: None)  # the job started: 2 processes
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    asked = {}  # each process's asked count, in process order, as the all-gather returns them
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.asarray([asked[0], asked[1]], np.int32))
    asked.update({0: 2, 1: 3})
    monkeypatch.setenv("JAXSCALE_NUM_PROCESSES", "3")
    with pytest.raises(ValueError, match=r"JAXSCALE_NUM_PROCESSES: processes \[1\] were started with 3 processes, "
                                         r"but the job's coordinator \(process 0\) has 2; start every process with "
                                         r"JAXSCALE_NUM_PROCESSES=2"):
        distributed.initialize("127.0.0.1:1234", None, 1)
    monkeypatch.setattr(distributed, "_check_port_free", lambda *a: None)
    with pytest.raises(ValueError, match=r"num_processes: processes \[1\] were started with 3 processes"):
        distributed.initialize("127.0.0.1:1234", 2, 0)  # process 0, which asked for 2, refuses with it
    asked.update({1: 2})
    assert distributed.initialize("127.0.0.1:1234", 2, 1) is True  # agreeing counts start as before


def test_shard_batch_points_video_clips_to_a_batch_only_placement():
    """A VAE clip [B, 1 + 4k, H, W, C] given to shard_batch on a `sequence` mesh was told "use a sequence length that
    is a multiple of 4", which no clip of 1 + 4k frames can be (and the VAE refuses 8 frames): its frames are no token
    axis. The error names the placement that works; tokens [B, T] keep the plain message."""
    from parallel import shard_batch

    mesh = make_mesh({"data": 2, "sequence": 4})
    with pytest.raises(ValueError, match=r"dimension 'act_seq' of size 5 .* a \[B, T, H, W, C\] clip's frames are "
                                         r"no token axis: place it over the batch axes alone"):
        shard_batch({"video": np.zeros((2, 5, 4, 4, 3), np.float32)}, mesh)
    with pytest.raises(ValueError, match=r"multiple of 4, or change the mesh$"):
        shard_batch({"tokens": np.zeros((2, 6), np.int32)}, mesh)


def test_shard_batch_puts_host_rows_straight_onto_their_shards():
    """shard_batch went through jnp.asarray: every step the whole batch was copied to device 0 (an implicit transfer,
    which jax.transfer_guard('disallow') refused) and then resharded. NumPy rows now go to their shards in one
    explicit device_put, with the dtypes jnp.asarray gave (float64 -> float32, int64 -> int32 without x64); device
    arrays pass as they are."""
    from parallel import shard_batch

    mesh = make_mesh({"data": 2, "fsdp": 4})
    rows = np.arange(64).reshape(8, 8)  # int64
    with jax.transfer_guard("disallow"):
        b = shard_batch({"tokens": rows, "weights": rows / 2, "flags": rows > 3}, mesh)
        again = shard_batch(b["tokens"], mesh)  # on the mesh already: no host round trip
    assert [b[k].dtype for k in ("tokens", "weights", "flags")] == [jnp.int32, jnp.float32, jnp.bool_]
    assert np.array_equal(np.asarray(b["weights"]), rows / 2) and np.array_equal(np.asarray(again), rows)
    assert tuple(b["tokens"].sharding.spec) == (("data", "fsdp"), None)
    with pytest.raises(TypeError, match=r"shard_batch: batch\['a'\] is a ndarray, not an array of numbers"):
        shard_batch({"a": np.array([["a red circle"]])}, mesh)


def test_shard_batch_refuses_64_bit_ints_that_would_wrap():
    """Without x64, device_put stores int64 / uint64 host rows as int32 / uint32: shard_batch and
    global_batch_from_local turned an id 2**32 + 5 into 5 (and a uint64 hash into its low bits) without a word, as
    the model's own token check (models.transformer.check_token_ids) refuses. Values that fit pass as before."""
    from parallel import global_batch_from_local, shard_batch

    mesh = make_mesh({"data": 8})
    wide = np.full((8, 2), 2**32 + 5, np.int64)
    with pytest.raises(ValueError, match=r"shard_batch: batch\['tokens'\]: int64 values in \[4294967301, "
                                         r"4294967301\] do not fit the int32"):
        shard_batch({"tokens": wide}, mesh)
    with pytest.raises(ValueError, match=r"global_batch_from_local: a local array \(8, 2\): int64 values"):
        global_batch_from_local(wide, mesh)
    with pytest.raises(ValueError, match=r"uint64 values .* do not fit the uint32"):
        shard_batch(np.full((8,), 2**40 + 7, np.uint64), mesh)
    ok = np.arange(16, dtype=np.int64).reshape(8, 2) + (2**31 - 16)  # up to int32's max: unchanged
    assert np.array_equal(np.asarray(shard_batch(ok, mesh)), ok)
    assert np.array_equal(np.asarray(global_batch_from_local(ok, mesh)), ok)


def test_batch_sharding_and_logical_to_spec_name_inputs_of_the_wrong_kind():
    """batch_sharding(mesh, 2.0) failed in a bare "slice indices must be integers", ndim=True placed a 1-d batch,
    and logical_to_spec with a dict of axis sizes (scaling/'s mesh form) said "'dict' object has no attribute
    'axis_names'". Each now names the argument and the fix."""
    from parallel import batch_sharding

    mesh = make_mesh({"data": 4, "tensor": 2})
    for bad in (2.0, "2", None, True):
        with pytest.raises(ValueError, match=rf"^batch_sharding: ndim={bad!r} must be an int"):
            batch_sharding(mesh, bad)
    assert batch_sharding(mesh, np.int64(2)).spec == jax.P("data", None)
    with pytest.raises(ValueError, match=r"^logical_to_spec: mesh=\{'data': 4\} is no jax Mesh; .*make_mesh"):
        logical_to_spec(("batch",), {"data": 4})
