"""Placing models and batches on a mesh by logical names (see parallel.rules)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel.rules import _check_mesh, _check_overrides, _mesh_axes, current_rules, logical_to_spec


def logical_shardings(abstract_state, mesh, rules=None):
    """NamedSharding per variable, from each variable's `out_sharding` logical names and shape (its spec without
    trailing Nones, as jax.jit returns arrays). A `rules` name neither in the table nor on any variable raises: it
    would change nothing (`rules={'vocabulary': None}`)."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    names_of = lambda v: v.get_metadata().get("out_sharding") or (None,) * len(v.shape)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=is_var)
    if plain := [(jax.tree_util.keystr(k), v) for k, v in leaves if not is_var(v)]:  # an AttributeError before
        more = f" (and {len(plain) - 1} more leaves)" if len(plain) > 1 else ""
        raise TypeError(f"the rules place nnx Variables by their logical names, but state{plain[0][0]}{more} is a "
                        f"plain {type(plain[0][1]).__name__}: pass the model's state, nnx.split(model)[1] or "
                        "nnx.state(model), not a pure dict of arrays")
    if rules:
        _check_overrides(rules)  # misspelt targets and near misses of table names first, with their hints
        used = {n for v in jax.tree.leaves(abstract_state, is_leaf=is_var) if is_var(v) for n in names_of(v) if n}
        if unknown := sorted(set(rules) - set(current_rules()) - used):
            raise ValueError(f"rules: no logical axis {unknown} in the rules table or on this state's variables "
                             f"(theirs: {sorted(used)}); a name nothing carries would change nothing")
    _check_mesh(mesh, _mesh_axes(mesh))  # about the mesh, not the first variable: named as such below

    def place(path, v):
        try:
            return NamedSharding(mesh, trimmed_spec(logical_to_spec(names_of(v), mesh, v.shape, rules)))
        except ValueError as e:  # "dimension 'mlp' of size 10" alone left the weight to guess (dense or expert)
            raise ValueError(f"state{jax.tree_util.keystr(path)}: {e}") from None

    return jax.tree_util.tree_map_with_path(place, abstract_state, is_leaf=is_var)


def trimmed_spec(spec: P) -> P:
    """`spec` without trailing Nones: the same layout, spelt as jax.jit spells its outputs'. A state placed with
    P(None, 'fsdp', None) came back from a train step as P(None, 'fsdp'), a new cache key: the step compiled twice."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def abstract_model(model_fn: Callable[[], nnx.Module]) -> nnx.Module:
    """`model_fn()`'s module with every variable a ShapeDtypeStruct (nothing allocated), whatever mesh is set.

    flax's `nnx.eval_shape` gives each abstract variable a sharding on the mesh in effect, reading its logical names
    (`layers`, `embed`) as mesh axes: inside `with jax.set_mesh(mesh):` it failed ("Resource axis: layers ... is
    not found in mesh"). The rules table places the variables instead, so the shapes are taken with no mesh."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), nnx.use_eager_sharding(False):
        return nnx.eval_shape(model_fn)


def _check_builder(model_fn, where: str) -> None:
    if isinstance(model_fn, nnx.Module) or not callable(model_fn):  # a module is callable: its forward pass ran
        raise TypeError(f"{where}(model_fn, mesh): model_fn builds the model, e.g. `lambda: Transformer(cfg, "
                        f"rngs=nnx.Rngs(0))`; got {type(model_fn).__name__} (a built module is already whole on one "
                        "device: place it with shard_state(nnx.split(model)[1], mesh))")


def _check_moe_pipeline(model, mesh, rules) -> None:
    """A model with MoE layers (a models.Transformer: `cfg.moe_layers()`) on a mesh whose axis for 'layers' splits its
    layer stack: MoE layers do not pipeline, which its forward says by name, but placement came first and, for stacks
    that did not divide the axis, advised 'use a config n_layers that is a multiple of 2', a count that then placed
    only for the forward to refuse the model."""
    moe_layers = getattr(getattr(model, "cfg", None), "moe_layers", None)
    if callable(moe_layers) and any(moe_layers()):
        _refuse_moe_pipeline(sum(moe_layers()), mesh, rules)


def _check_moe_pipeline_state(state, mesh, rules) -> None:
    """`_check_moe_pipeline` for a state (shard_state's), whose MoE layers are models.Transformer's `moe_blocks` stack
    [L_moe, ...]: shard_state still gave the count advice that then placed only for the forward to refuse the model."""
    try:
        moe = state["moe_blocks"]
    except (KeyError, TypeError, IndexError):
        return
    if leaves := [x for x in jax.tree.leaves(moe) if getattr(x, "ndim", 0) >= 1]:
        _refuse_moe_pipeline(leaves[0].shape[0], mesh, rules)


def _refuse_moe_pipeline(n: int, mesh, rules) -> None:
    axes = logical_to_spec(("layers",), mesh, rules=rules)[0]
    if axes is None:
        return
    sizes = _mesh_axes(mesh)
    named = " × ".join(f"{a!r} ({sizes[a]})" for a in ((axes,) if isinstance(axes, str) else axes))
    raise ValueError(f"MoE layers under pipeline parallelism are not supported (their auxiliary losses do not cross "
                     f"stages yet): this model has {n} MoE layer{'s' * (n != 1)} and mesh axis {named} splits the "
                     "layer stack; use a mesh without a 'stage' axis, or a config without MoE (moe=None)")


def create_sharded(model_fn: Callable[[], nnx.Module], mesh, rules=None):
    """Build `model_fn()` directly sharded on `mesh`: abstract init, then a jitted init whose
    `out_shardings` come from the rules table, so no device ever holds the full model.

    Returns (graphdef, state) with every array placed on `mesh`. `rules` (overrides of the table) place the
    parameters only: the model's own activation constraints read the table in effect when it runs, so run it
    inside `use_rules(...)` with the same overrides.

    A module of your own with `nnx.with_partitioning(init, logical_names)` builds here as it is; built plainly
    (one device, e.g. a reference) flax reads the logical names as mesh axes and fails, so create its parameters
    inside `with nnx.use_eager_sharding(False):` in `__init__`, as models/ does (or build it under that context).
    A Transformer with MoE layers on a mesh whose 'stage' axis splits the layer stack raises: they do not pipeline.
    """
    _check_builder(model_fn, "create_sharded")
    # logical names are resolved here, by the rules table: flax would otherwise read them as mesh axes the moment a
    # variable is created (so a module of your own that does not turn eager sharding off still builds)
    abstract = abstract_model(model_fn)
    graphdef, abs_state = nnx.split(abstract)
    _check_moe_pipeline(abstract, mesh, rules)
    with nnx.use_eager_sharding(False):
        shardings = logical_shardings(abs_state, mesh, rules)
        init = jax.jit(lambda: nnx.split(model_fn())[1], out_shardings=shardings)
        with jax.set_mesh(mesh):
            state = init()
    return graphdef, state


def abstract_sharded(model_fn: Callable[[], nnx.Module], mesh, rules=None):
    """(graphdef, state) of `model_fn()` with every variable a ShapeDtypeStruct carrying the sharding the rules give
    it on `mesh`: nothing is allocated or compiled. The target to restore a checkpoint onto (a random state built
    only to be overwritten costs an init compile and the model's memory once more)."""
    _check_builder(model_fn, "abstract_sharded")
    graphdef, abs_state = nnx.split(abstract := abstract_model(model_fn))
    _check_moe_pipeline(abstract, mesh, rules)
    shardings = logical_shardings(abs_state, mesh, rules)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abs_state,
                         shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state


def shard_state(state, mesh, rules=None):
    """Move an existing (e.g. single-device) state onto `mesh` according to the rules. A Transformer state with MoE
    layers on a mesh whose 'stage' axis splits the layer stack raises, as create_sharded does.

    The placed state owns its buffers: device_put (may_alias=False too, jax 0.10.2) aliased a replicated leaf's shard
    on the source device to the source array, so a donating step (make_train_step) over the placed state deleted the
    source model's norm scales ('Array has been deleted'). Each jax.Array leaf is copied first, one at a time."""
    _check_moe_pipeline_state(state, mesh, rules)
    shardings = logical_shardings(state, mesh, rules)
    own = lambda v: jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, v)  # noqa: E731
    return jax.tree.map(lambda s, v: jax.device_put(own(v), s), shardings, state)  # a leaf at a time: one copy alive


def batch_sharding(mesh, ndim: int = 2, rules=None, shape=None) -> NamedSharding:
    """Sharding of a [B, T, ...] batch: B over the batch axes, T over `act_seq` ([B] per-row labels or weights:
    B only). With `shape`, a dimension its mesh axes do not divide raises a ValueError naming it
    (parallel.rules.logical_to_spec)."""
    if isinstance(ndim, bool) or not isinstance(ndim, numbers.Integral):  # True ran as 1; 2.0 a bare TypeError
        raise ValueError(f"batch_sharding: ndim={ndim!r} must be an int, the batch array's number of dims")
    if ndim < 1:
        raise ValueError(f"a batch array needs a leading batch dim [B, ...]; got {ndim} dims (shape {shape})")
    spec = logical_to_spec(("batch", "act_seq")[:ndim] + (None,) * (ndim - 2), mesh, shape, rules=rules)
    return NamedSharding(mesh, spec)


def host_array(x):
    """A batch leaf as `jax.device_put` should take it: a jax.Array as it is, anything else as a NumPy array, which
    device_put copies straight onto each device's shard (jnp.asarray copied the whole batch to the default device
    first, an implicit transfer that jax.transfer_guard('disallow') refuses, then resharded it: 4x the time of a
    256 MiB batch on 8 CPU devices); a TypeError for strings, objects and other non-numbers."""
    if isinstance(x, jax.Array):
        return x
    x = np.asarray(x)
    if not (x.dtype == bool or jnp.issubdtype(x.dtype, jnp.number)):  # (ml_dtypes' bfloat16 is a jnp number)
        raise TypeError(f"dtype {x.dtype} is not a valid JAX array type")
    return x


def check_fits_x32(x: np.ndarray, where: str) -> None:
    """A ValueError naming `where` for 64-bit integers that the 32-bit ints jax stores them in (x64 off) cannot hold:
    device_put wrapped them without a word (an int64 id 2**32 + 5 arrived as 5, a uint64 hash as its low bits)."""
    if x.dtype.kind not in "iu" or x.dtype.itemsize != 8 or not x.size or jax.config.jax_enable_x64:
        return
    info = np.iinfo(np.int32 if x.dtype.kind == "i" else np.uint32)
    lo, hi = int(x.min()), int(x.max())
    if lo < info.min or hi > info.max:
        raise ValueError(f"{where}: {x.dtype} values in [{lo}, {hi}] do not fit the {info.dtype} jax stores them in "
                         f"without jax_enable_x64 (they would wrap); keep them within [{info.min}, {info.max}], or "
                         "enable x64")


def shard_batch(batch, mesh, rules=None):
    """Place a host batch (a pytree of [B, T, ...] or [B] arrays, identical on every process) on the mesh; a B or T
    the mesh axes they map to do not divide raises a ValueError naming them."""

    def put(path, x):
        where = f"batch{jax.tree_util.keystr(path)}"
        try:
            x = host_array(x)
        except TypeError:
            raise TypeError(f"shard_batch: {where} is a {type(x).__name__}, not an array of numbers") from None
        if x.ndim == 0:  # a Python list is a pytree of its items to jax: [1, 2, 3] gave three scalars
            raise ValueError(f"shard_batch: {where} is a scalar; a batch holds arrays with a leading batch dim "
                             "[B, ...] (a Python list of rows is a pytree of its items to jax: pass np.asarray(rows))")
        if isinstance(x, np.ndarray):
            check_fits_x32(x, f"shard_batch: {where}")
        try:
            return jax.device_put(x, batch_sharding(mesh, x.ndim, rules, x.shape))
        except ValueError as e:
            # a clip's 1 + 4k frames never divide an even axis, and the VAE splits its rows itself: "use a sequence
            # length that is a multiple of 4" was a dead end for a video batch
            hint = ("; a [B, T, H, W, C] clip's frames are no token axis: place it over the batch axes alone, "
                    "NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (x.ndim - 1), mesh)), as "
                    "experiments.video_steps.shard does") if x.ndim >= 4 and "'act_seq'" in str(e) else ""
            raise ValueError(f"shard_batch: {where}, an array {x.shape}: {e}{hint}") from None

    return jax.tree_util.tree_map_with_path(put, batch)


def replicated(mesh) -> NamedSharding:
    """A full copy on every device of `mesh` (scalars, small state, outputs gathered for the host)."""
    return NamedSharding(mesh, P())


def init_optimizer(optimizer, params):
    """`optimizer.init(params)` with every param-shaped leaf (Adam's mu, nu, ...) sharded like its
    parameter and the rest (step counts; leaves of another shape than their parameter, like Adafactor's
    factored v_row / v_col) replicated, as is every leaf of an optimizer whose init reads its parameters' values
    (optax.flatten's one flat vector, optax.lbfgs). A plain `jax.jit(optimizer.init)` would
    replicate them: zeros carry no data dependency on the parameters to propagate sharding from.
    """
    if isinstance(params, nnx.Module):  # a pytree to jax too: Adam's moments became modules the step cannot read
        raise TypeError(f"init_optimizer: params is a built {type(params).__name__}; pass its parameter state, "
                        "nnx.split(model)[1] (or create_sharded's state)")
    leaves = jax.tree.leaves(params)
    if not leaves:  # an empty filter (e.g. nnx.split with a type nothing carries) would train nothing
        raise ValueError("init_optimizer: params holds no arrays; pass the model's parameter state, e.g. "
                         "nnx.split(model, nnx.Param, ...)[1], not an empty tree")
    abstract = jax.eval_shape(optimizer.init, params)
    first = leaves[0]
    if not isinstance(getattr(first, "sharding", None), NamedSharding):  # unsharded (one device): nothing to follow
        return jax.jit(optimizer.init)(params)
    return jax.jit(optimizer.init, out_shardings=optimizer_shardings(optimizer, abstract, params))(params)


def optimizer_shardings(optimizer, abstract_opt_state, params):
    """The shardings `init_optimizer` gives `optimizer.init(params)` (`abstract_opt_state`, e.g. its
    jax.eval_shape), for params whose leaves carry NamedShardings (arrays or ShapeDtypeStructs): one rule for the real
    state and the abstract one (experiments.aot.abstract_state, the restore target). Every leaf replicated, with a
    warning, for an optimizer whose init reads its parameters' values (optax.flatten, optax.lbfgs)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh

    def like(state, p):
        # a param-structured leaf of another shape (Adafactor's factored v_row / v_col: the raw pjit error
        # "incompatible with its sharding annotation") is replicated; masked-out leaves (optax.masked, Muon's
        # partition) hold no array
        if isinstance(state, optax.MaskedNode):
            return state
        return p.sharding if state.shape == p.shape else replicated(mesh)

    try:  # (tree_map_params runs init eagerly on placeholders: its step count's jnp.zeros is a host-to-device
        # transfer, which jax_transfer_guard='disallow' refused, and every leaf was replicated with the warning below)
        with jax.transfer_guard("allow"):
            return optax.tree_utils.tree_map_params(optimizer, like, abstract_opt_state, params,
                                                    transform_non_params=lambda _: replicated(mesh),
                                                    is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    except Exception as e:  # noqa: BLE001 - `optimizer.init` already ran on `params` (the caller's eval_shape)
        # an init that reads its parameters as arrays (optax.flatten concatenates them, optax.lbfgs reads a dtype)
        # fails on tree_map_params' placeholders, which init_optimizer raised ("Need at least one array to
        # concatenate"): no leaf can be told to follow a parameter, so all are replicated
        warnings.warn(f"optimizer_shardings: {type(e).__name__} ({e}) placing the optimizer state by its parameters "
                      "(an init that reads their values: optax.flatten, optax.lbfgs); every state leaf is replicated "
                      "on each device (its full size per device)", stacklevel=3)
        return jax.tree.map(lambda s: s if isinstance(s, optax.MaskedNode) else replicated(mesh), abstract_opt_state,
                            is_leaf=lambda x: isinstance(x, optax.MaskedNode))
