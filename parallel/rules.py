"""The logical-axis rules table: the one place that maps model axis names to mesh axes.

Models name only logical axes (`embed`, `heads`, `batch`, ...). Parameters and activations have
separate tables so that a strategy is a rule, not a code change: FSDP is `embed -> fsdp` for
parameters while activations keep `embed` replicated; tensor parallelism is `heads/mlp/vocab ->
tensor` (Megatron column-then-row); sequence parallelism is `act_seq -> sequence`.
A mesh axis absent from the mesh (or of size 1) simply drops out, so one table serves every mesh; an override
(`use_rules`, `rules=`) that changes a table name's rule to mesh axes none of which the mesh has, where the
table's own rule would split that dimension, raises instead.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Mapping
from types import MappingProxyType

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from parallel.mesh import AXES

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axes (tried in order; all listed axes present in the mesh are used together)
PARAM_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": "fsdp",  # ZeRO-3: every weight is sharded over fsdp along its model dimension
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": "stage",  # pipeline parallelism: a mesh with a `stage` axis splits the layer stack
    "expert": "expert",
    "norm": None,
    # video diffusion (models/video)
    "conv_kernel": None,  # (t, h, w) taps of 3D convolutions
    "conv_in": "fsdp",  # conv input channels: ZeRO-3, like `embed`
    "conv_out": "tensor",  # conv output channels: column-parallel, like `mlp`
    "patch": None,  # flattened spacetime patch (pt·ph·pw·C)
    "modulation": "tensor",  # adaLN-Zero shift/scale/gate outputs
}

ACTIVATION_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    "act_seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "act_head_dim": None,
    # MoE capacity-buffer slots [B, E, C, D]: a row's queue spans its whole (sequence-sharded) row, so the
    # sequence devices split the slots instead, else each would run every slot's expert products
    "act_capacity": "sequence",
    # the video DiT's temporal attention [B, T, H·W, ...]: the tokens' split moves from frames to in-frame positions
    # (replicated when the sequence devices do not divide H·W: each then runs every position, as XLA did unasked)
    "act_frame_pos": "sequence",
    # the video VAE's frame rows [B, T, H, W, C]: each sequence device convolves a band of them, exchanging halo rows
    # (models.video.vae.Conv); replicated when the sequence devices do not divide H (each then runs every row)
    "act_height": "sequence",
}

# Axes that fall back to replication instead of raising when the dimension does not divide the
# mesh axis (MQA/GQA with fewer kv heads than tensor-parallel ranks: replicating K/V is standard).
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads", "act_kv_heads", "act_capacity", "act_frame_pos", "act_height"})

# What a refusal asks the user to change for a dimension the mesh does not divide: the config field that sizes it
# (the same names in TransformerConfig, DiTConfig and AlignConfig); "dimension 'heads' of size 3" named no field.
# The batch and sequence come from the caller's data, not the model.
_FIELD_OF = {"batch": "batch size", "act_seq": "sequence length", "expert": "MoEConfig.n_experts",
             "heads": "config n_heads", "act_heads": "config n_heads", "embed": "config d_model",
             "mlp": "config mlp_dim (an MoE's moe.expert_mlp_dim / shared_mlp_dim)", "act_mlp": "config mlp_dim",
             "vocab": "config vocab_size", "act_vocab": "config vocab_size", "layers": "config n_layers",
             "modulation": "config d_model", "conv_in": "VAEConfig channel count",
             "conv_out": "VAEConfig channel count"}

_DEFAULT_RULES = MappingProxyType({**PARAM_RULES, **ACTIVATION_RULES})
# The overrides in effect, as sorted (name, axes) pairs: a jax user context, so that they are part of jax.jit's
# cache key (a function traced before `use_rules` would otherwise keep the constraints of its first trace)
_overrides = jax.make_user_context(default_value=())


def _current() -> Mapping[str, MeshAxes]:
    over = _overrides.value
    return MappingProxyType({**_DEFAULT_RULES, **dict(over)}) if over else _DEFAULT_RULES


@contextlib.contextmanager
def use_rules(new_names: Mapping[str, MeshAxes] | None = None, /, **overrides: MeshAxes):
    """Temporarily override rules, e.g. `use_rules(layers='stage', act_seq=None)`. A misspelt logical name or
    mesh axis raises (it would silently change nothing, or replicate), and so does, where the rules are applied, an
    override to mesh axes the mesh lacks; logical names your own modules add go in `new_names`, e.g.
    `use_rules({'my_axis': 'tensor'})` (one a letter off a table name, {'kv_head': ...}, raises as a typo). A
    jitted function called inside traces again for the new rules (they are part of jax.jit's cache key)."""
    current = _current()
    unknown = sorted(set(overrides) - set(current))
    if unknown:
        near = {n: _near(n, current) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {m}?" for n, m in near.items() if m)
        raise ValueError(f"use_rules: no logical axis {unknown} in the rules table{' (' + hint + ')' if hint else ''} "
                         f"(known: {sorted(current)}); pass names your own modules add as use_rules({{'name': axes}})")
    # a new name one letter off a table name ({'kv_head': None}) is a typo: it was registered as a new name and
    # changed nothing, silently (only one-letter slips: difflib's fuzzier matches would refuse real new names)
    if typos := {n: m for n in (new_names or {}) if n not in current and (m := _near(n, current, fuzzy=False))}:
        raise ValueError(f"use_rules: no logical axis {sorted(typos)} in the rules table; did you mean "
                         f"{'; '.join(f'{m} for {n!r}' for n, m in typos.items())}? (a name of your own modules: "
                         "pick one that is not one letter off a table name)")
    check_targets({**(new_names or {}), **overrides}, "use_rules")
    new = {k: tuple(v) if isinstance(v, list) else v for k, v in {**(new_names or {}), **overrides}.items()}
    with _overrides(tuple(sorted({**dict(_overrides.value), **new}.items(), key=lambda kv: kv[0]))):
        yield


def check_targets(rules: Mapping[str, MeshAxes], where: str) -> None:
    """Each rule maps to None, a mesh axis name or a tuple of them: a misspelt axis would silently replicate."""
    from parallel.mesh import AXES

    for name, target in rules.items():
        ok = target is None or isinstance(target, str) or (isinstance(target, tuple | list) and all(
            isinstance(a, str) for a in target))
        bad = [a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if a not in AXES] if ok \
            else [target]
        if bad:
            raise ValueError(f"{where}: {name}={target!r} names mesh axes {bad}; map a logical axis to None, a name "
                             f"from {AXES}, or a tuple of them")
        if isinstance(target, tuple | list) and len(set(target)) < len(target):  # JAX refuses it at first use
            raise ValueError(f"{where}: {name}={target!r} names a mesh axis twice; name each once")


def _check_overrides(rules: Mapping[str, MeshAxes]) -> None:
    """A `rules=` argument: targets as `check_targets`; a name one letter off a table name ('embedd') raises, since
    it would change nothing. Names of your own modules' axes pass (or register them with `use_rules({...})`)."""
    check_targets(rules, "rules")
    table = _current()
    for name in rules:
        if name not in table and (near := _near(name, table)):
            raise ValueError(f"rules: no logical axis {name!r} in the rules table; did you mean {near[0]!r}? "
                             f"(a name of your own modules: register it with use_rules({{{name!r}: ...}}))")


def _near(name: str, table, fuzzy: bool = True) -> list[str]:
    """Table names `name` is probably a misspelling of: one edit away, else (fuzzy) difflib's closest at >= 0.8."""
    near = [t for t in table if _one_edit(name, t)]
    return near or (difflib.get_close_matches(name, table, n=1, cutoff=0.8) if fuzzy else [])


def _one_edit(a: str, b: str) -> bool:
    """Whether a and b differ by one inserted, deleted or replaced letter, or two adjacent letters swapped
    ('mpl', 'mlq' for 'mlp': difflib's ratio misses them in short names)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])
    return a[i + 1:] == b[i:] if len(a) > len(b) else a[i:] == b[i + 1:]


def current_rules() -> dict[str, MeshAxes]:
    """The logical → mesh axis table in effect here: the defaults with any enclosing `use_rules` overrides."""
    return dict(_current())


def _mesh_axes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def _check_mesh(mesh, sizes: dict[str, int]) -> None:
    """The table places arrays on the Auto axes named in parallel.mesh.AXES (make_mesh's meshes). A mesh from
    `jax.make_mesh((2, 4), ('dp', 'mp'))` replicated every parameter and batch over axes no rule can name, silently,
    and its Explicit axes (jax.make_mesh's default) failed inside the model in a ShardingTypeError naming neither."""
    if unknown := [a for a, n in sizes.items() if n > 1 and a not in AXES]:
        raise ValueError(f"mesh axes {unknown} are none of the axes the rules table maps to, {AXES}: every array "
                         "would be replicated over them; build the mesh with parallel.make_mesh({'data': 2, ...}) or "
                         "name its axes from those")
    if explicit := [a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t == AxisType.Explicit]:
        raise ValueError(f"mesh axes {explicit} are Explicit (jax.make_mesh's default); the rules place arrays by "
                         "sharding constraints that need Auto axes: build the mesh with parallel.make_mesh, or "
                         "jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)")


def logical_to_spec(names, mesh, shape=None, rules=None, replicate_indivisible: bool = False) -> P:
    """Map a tuple of logical names to a PartitionSpec for `mesh`.

    With `shape`, checks that each sharded dimension divides its mesh axes and raises a
    ValueError naming the logical dimension, its size and the mesh axes otherwise (replicate_indivisible:
    replicates that dimension instead, as REPLICATE_IF_INDIVISIBLE names always do).
    rules: overrides of the table in effect, e.g. {'embed': None} (every `rules=` argument of parallel/ and
    scaling/ means this; a whole table works too). A partial dict used to replace the table (KeyError 'vocab').
    A mesh with axes of other names than parallel.mesh.AXES, or Explicit axes, raises (`_check_mesh`).
    """
    if isinstance(names, str):  # one name would be read letter by letter ("logical axis 'e' has no rule")
        raise ValueError(f"logical_to_spec: names={names!r} must be a tuple of logical names, e.g. ({names!r},)")
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical_to_spec: {len(names)} names {tuple(names)} for a shape of {len(shape)} dims "
                         f"{tuple(shape)}; give one name (or None) per dimension")
    if rules:
        _check_overrides(rules)
    changed = {**dict(_overrides.value), **(rules or {})}  # the overrides in effect here, to check against the mesh
    rules = {**_current(), **rules} if rules else _current()
    if not hasattr(mesh, "axis_names"):  # a dict of axis sizes (scaling/'s form): "'dict' object has no attribute"
        raise ValueError(f"logical_to_spec: mesh={mesh!r:.80} is no jax Mesh; build one, e.g. parallel.make_mesh("
                         f"{mesh!r:.60}) for a dict of axis sizes")
    sizes = _mesh_axes(mesh)
    _check_mesh(mesh, sizes)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:  # a near miss of a table name is a typo first ('mpl'), not a name to register
            near = _near(name, rules)
            raise ValueError(f"logical axis {name!r} has no rule in the table"
                             f"{f' (did you mean {near[0]!r}?)' if near else ''}; map it for this call with rules="
                             f"{{{name!r}: 'tensor'}} (or None), or for a block of code with use_rules({{{name!r}: "
                             "...})")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if name in changed:
            _check_override_on_mesh(name, axes, sizes)
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
        if shape is not None and axes:
            n = 1
            for a in axes:
                n *= sizes[a]
            if shape[i] % n:
                if replicate_indivisible or name in REPLICATE_IF_INDIVISIBLE:
                    axes = ()
                else:
                    hint = (" (a vocabulary is usually padded to a multiple of 64 or 128 rows for this; or "
                            "replicate it with use_rules(vocab=None, act_vocab=None))") if "vocab" in name else ""
                    if name == "batch" and shape[i] == 1:  # jax.vmap over the rows (per-example gradients)
                        hint = (" (under jax.vmap over the rows, e.g. per-example gradients, each call sees a batch "
                                "of 1: run it inside parallel.use_rules(batch=None))")
                    raise ValueError(
                        f"dimension {name!r} of size {shape[i]} does not divide mesh axes {axes} "
                        f"(size {n}); use a {_FIELD_OF.get(name, 'model dimension')} that is a multiple of {n}, "
                        f"or change the mesh{hint}")
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _check_override_on_mesh(name: str, axes: tuple[str, ...], sizes: dict[str, int]) -> None:
    """An override (use_rules / rules=) that changes a table name's rule to mesh axes none of which this mesh has (or
    has at size 1, which splits nothing) replicated the dimension, silently (`use_rules(heads='expert')` on
    {data, tensor}: heads whole on every device).
    Absent axes of the default table drop out as documented (one table serves every mesh), and so do some of a
    tuple's; your own modules' names are not checked (their rules, like the table's, serve every mesh). Nor is an
    override where the default splits nothing either (embed=('fsdp', 'data') on {sequence, tensor}): the dimension is
    replicated either way, and one override serves every mesh, as the table does (memory_per_device's sweeps)."""
    default = _DEFAULT_RULES.get(name, axes)
    default = (default,) if isinstance(default, str) else tuple(default or ())
    # a size-1 axis drops out as an absent one does (make_mesh({'data': -1, 'fsdp': 1, 'tensor': 4}) with
    # mlp='fsdp' placed the MLP weights whole on every device, silently, where {'data': 2, 'tensor': 4} raised)
    if (not axes or any(sizes.get(a, 1) > 1 for a in axes) or axes == default
            or not any(sizes.get(a, 1) > 1 for a in default)):
        return
    raise ValueError(f"rules: {name}={axes[0] if len(axes) == 1 else axes!r} overrides the table with mesh axes "
                     f"this mesh does not have (its axes: {dict(sizes)}; one of size 1 splits nothing), which would "
                     f"replicate {name!r} silently; name an axis of this mesh, None to replicate, or add {list(axes)} "
                     "to the mesh")


_lenient = jax.make_user_context(default_value=False)  # part of jax.jit's cache key, as the rules are


@contextlib.contextmanager
def replicate_indivisible(on: bool = True):
    """Within it, `constrain` replicates an activation dimension that does not divide its mesh axes instead of
    raising. Models turn it on for KV-cache decoding: one new token (T = 1 under 'sequence') or one prompt
    (B = 1 under 'data') on the training mesh is normal there; in training it would be a mistake, so the
    error stays."""
    with _lenient(bool(on)):
        yield


def replicating_indivisible() -> bool:
    """Whether `replicate_indivisible()` is on here (a model's own divisibility checks then stand aside too)."""
    return bool(_lenient.value)


def _check_mesh_set(x) -> None:
    """Outside a mesh context, warn about an array that is sharded over several devices: the caller forgot
    `jax.set_mesh`. Its values come out right, but every activation constraint is skipped and GSPMD guesses: a
    forward + backward pass on {data 2, sequence 4} did 4.0x the FLOPs per device, on {fsdp 8} used 5.8x the temp
    memory. A warning, not an error: an eager look at a sharded model's logits outside a mesh is fine."""
    try:
        where = jax.typeof(x).sharding.mesh  # inside jit too: a committed input's mesh reaches its intermediates
    except (AttributeError, TypeError):  # not a jax value (a NumPy array): on the host, nothing to constrain
        return
    if not where.empty and where.size > 1:
        warnings.warn(f"an array sharded over the mesh {dict(zip(where.axis_names, where.axis_sizes))} reached a "
                      "sharding constraint, but no mesh is set, so the rules are skipped (the values stay right; "
                      "FSDP / sequence parallelism then use several times the memory / FLOPs per device): call the "
                      "model inside `with jax.set_mesh(mesh):` (a built model's mesh: "
                      "jax.tree.leaves(nnx.state(model))[0].sharding.mesh)", stacklevel=2)


def _check_same_mesh(x, mesh) -> None:
    """Inside `jax.set_mesh(mesh)`, refuse an array placed on a mesh of other axes (parameters or a batch placed on
    one mesh, the model run under another): jitted, the activations were silently laid out on the set mesh (or the
    step failed with jax's IndivisibleError naming neither mesh); eager, "Mesh shape of the input ... does not
    match". Axis names and sizes only: the manual axes of a shard_map body (gpipe, halo_map) are the same mesh."""
    try:
        where = jax.typeof(x).sharding.mesh  # a jitted function's inputs carry theirs; its intermediates the set one
    except (AttributeError, TypeError):
        return
    if where.empty or where.size == 1 or where.shape_tuple == mesh.shape_tuple:
        return
    raise ValueError(f"an array placed on the mesh {dict(where.shape_tuple)} reached a sharding constraint inside "
                     f"jax.set_mesh({dict(mesh.shape_tuple)}), another mesh: run the model inside `with "
                     "jax.set_mesh(mesh):` with the mesh its parameters and batch are on (a built model's: "
                     "jax.tree.leaves(nnx.state(model))[0].sharding.mesh), or move them onto the set mesh with "
                     "parallel.shard_state / parallel.shard_batch")


def _onto_mesh(x):
    """An eager (not traced) array on one device, e.g. `jnp.asarray(tokens)` or a plain model's activation, copied
    onto the mesh `jax.set_mesh` set: jax's eager `with_sharding_constraint` takes only mesh-sharded arrays ("The
    sharding on the input must be a `NamedSharding`"), so `model(tokens)` called eagerly inside `jax.set_mesh`
    failed unless its tokens came through `shard_batch` (NumPy ones passed)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not isinstance(x.sharding, NamedSharding):
        try:
            mesh = jax.sharding.get_mesh()
        except ValueError:  # inside jax.jit (a constant it captured): the staged constraint takes it as it is
            return x
        if not mesh.empty:
            return jax.device_put(x, NamedSharding(mesh, P()))
    return x


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside a mesh context (with a warning when x is sharded
    over several devices: `jax.set_mesh` was forgotten, see `_check_mesh_set`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        _check_mesh_set(x)
        return x
    _check_same_mesh(x, mesh)
    if all(t == AxisType.Manual for t in mesh.axis_types):  # gpipe on a mesh of 'stage' alone: nothing to split,
        return x  # and under jax.vmap (per-example gradients) jax batched it into a refused P.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(_onto_mesh(x), logical_to_spec(names, mesh, x.shape,
                                                                replicate_indivisible=_lenient.value))


def constrain_leading(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Constrain x's leading len(names) dims to those logical names' mesh axes, each replicated where its axes do
    not divide it (the first dim takes a shared axis, as in `logical_to_spec`); the other dims are left to XLA
    (UNCONSTRAINED: `constrain` would replicate them). A no-op outside a mesh. For [B, Q, ...] blocks kept as two
    dims: merged into one [B·Q] dim, a split over both matched the arriving [B / n_b, Q / n_s] tiles only at one row
    per batch shard, and XLA regathered them (sliding-window attention's whole k and v on every device of
    {sequence: 8})."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        _check_mesh_set(x)
        return x
    _check_same_mesh(x, mesh)
    if all(t == AxisType.Manual for t in mesh.axis_types):  # gpipe's shard_map on a mesh of 'stage' alone (its
        return x  # size-1 axes manual too): nothing left to split, and jax refuses P.UNCONSTRAINED there
    spec = logical_to_spec(names, mesh, x.shape[:len(names)], replicate_indivisible=True)
    return jax.lax.with_sharding_constraint(_onto_mesh(x), P(*spec, *(P.UNCONSTRAINED,) * (x.ndim - len(names))))


def sharing_axis(name: str, axis: str) -> list[str]:
    """The other logical names whose current rule maps to mesh `axis` besides `name`."""
    def axes(target):
        return (target,) if isinstance(target, str) else tuple(target or ())

    return sorted(n for n, t in _current().items() if n != name and axis in axes(t))


def mesh_axis_for(name: str) -> tuple[str | None, int]:
    """(mesh axis, size) that logical `name` maps to in the current mesh; (None, 1) if none. A rule of several
    axes gives the first of them the mesh splits, with its size alone (`batch` on {data: 2, fsdp: 4}: ('data', 2),
    not 8 ways): the whole split is the product over `logical_to_spec((name,), mesh)[0]`.

    Models use it to ask "is the layer stack split over stages?" without naming mesh axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, 1
    spec = logical_to_spec((name,), mesh)
    axis = spec[0]
    if axis is None:
        return None, 1
    axis = axis if isinstance(axis, str) else axis[0]
    return axis, _mesh_axes(mesh)[axis]
