"""Typed run configuration of the LM trainer: model × mesh × data × optimizer × train loop, named presets,
CLI overrides and validation before anything compiles.

    cfg = load(["--preset", "demo", "--set", "train.steps=50", "--lr", "1e-3"])
    validate(cfg, n_devices=8)        # ConfigError with one line naming the field, before any compilation

Overrides are `--set section.field=value` (the value converted to the field's declared type: true/false for bool,
none for optional fields, integral numbers for int, `1,2` or `(1, 2)` for tuples; `mesh=data=2,fsdp=4`) or the flat
flags `--steps --batch --seq --lr --mesh --out --seed`, applied in command-line order (the last of a key wins).
A nested config that is off (model.moe, model.rope_scaling: none) is turned on by setting its defining field
(`TURNS_ON`: model.moe.n_experts; rope_scaling.kind or .factor), its other fields taking their defaults; another of
its fields alone is refused.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import math
import os
import sys
from typing import Any, Literal

from data.cli import at_least as at_least, local_path  # at_least: the scripts import it from here
from models import TransformerConfig
from models.config import _is_int
from models.moe import MoEConfig

INT32_MAX = 2**31 - 1  # the largest train.steps: the train state's step and optax's count are int32


class ConfigError(ValueError):
    """A bad run configuration; `str(e)` is the one line to print (it names the field)."""


# the run's fields that name files or directories (relative ones below the working directory; `~` expanded,
# a URL refused: data.cli.local_path)
PATH_FIELDS = ("data.cache_dir", "data.train_dir", "data.eval_dir", "data.tokenizer", "train.out", "train.init_from")


def _check_spec(spec, section: str) -> None:
    """A DataSpec / OptimSpec / TrainSpec's fields against their annotations (`models.config.check_field_types`;
    str fields: a string, a path as its str), named as --set keys (`train.eval_every`). `--set` converts its text to
    the declared types, but specs built in Python reached `validate`, which compared them as numbers only:
    TrainSpec(eval_every=2.5) evaluated at steps 5, 10, ... only, keep_best='no' kept the best, steps=12.5 failed
    in range() after compiling, OptimSpec(lr=inf) was accepted, a numpy int or a pathlib.Path failed to_json at
    the first checkpoint."""
    from models.config import check_field_types

    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"{section}.{field}: {msg}")

    check_field_types(spec, need)
    for f in dataclasses.fields(spec):
        kind, v = str(f.type).replace(" ", ""), getattr(spec, f.name)
        if kind not in ("str", "str|None") or (v is None and kind == "str|None"):
            continue
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
            object.__setattr__(spec, f.name, v)
        need(isinstance(v, str), f.name, f"must be a string{' or None' if kind == 'str|None' else ''}, got {v!r}")
        if f"{section}.{f.name}" in PATH_FIELDS:  # ~ expanded, a URL refused (data.cli.local_path)
            try:
                object.__setattr__(spec, f.name, local_path(v))
            except ValueError as e:
                need(False, f.name, str(e))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the trainer reads through data.loader: by default the embedded stdlib corpus (module sources +
    docstrings) as byte tokens with EOS; or your own data.

    max_files: first N stdlib modules (None: all). eval_every_nth: every n-th module (source and docstrings) is
    held out.
    eval_batches: held-out batches per evaluation (fixed, the same every time in one run): the first eval_batches ×
    train.batch rows of train.seq tokens of the held-out tier (each process's share of its documents), so runs of
    another train.batch, train.seq or process count average other held-out text (the run prints how many targets).
    corpus: which build of the corpus tiers (a checkpoint's loader state points into one; read-only).
    train_dir / eval_dir: your own data instead of the stdlib corpus: tier directories of a cleaning run (`python -m
    data.pipeline ... --out RUN`: e.g. RUN/augmented for train and a held-out run's tier for eval) or
    `data.tokenizer.pretokenize` outputs; both or neither, and eval_dir neither train_dir, a copy (or links) of one of
    its shards, another tier of its cleaning run nor its pretokenize source, which are refused. tokenizer: a
    `tokenizers` JSON file (`data.tokenizer.train_bpe(...).save(path)`) to read them with; None: bytes + EOS (vocab
    257). eos_token: the tokenizer's end-of-document token when it is not '<|endoftext|>' (e.g. '</s>' in a Hugging Face
    tokenizer.json). bos_token: a token that starts every document ('<s>' for Llama, '<bos>' for Gemma: fine-tuning a
    checkpoint that always saw one first); None: documents start after the previous one's EOS."""

    max_files: int | None = None
    eval_every_nth: int = 20
    eval_batches: int = 4
    corpus: str = "stdlib-v2"  # v2: held out by module (v1, unrecorded in older checkpoints: by document)
    cache_dir: str | None = None  # default ~/.cache/jaxscale/lm-corpus-...
    train_dir: str | None = None
    eval_dir: str | None = None
    tokenizer: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None

    def __post_init__(self):
        _check_spec(self, "data")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """AdamW. schedule: 'cosine' (linear warmup, cosine to min_lr_ratio·lr) or 'wsd' (warmup, stable, linear
    decay over the last decay_frac of the steps). grad_accum: microbatches per step (batch % grad_accum == 0)."""

    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    grad_accum: int = 1

    def __post_init__(self):
        _check_spec(self, "optim")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The loop. batch: global rows per step; seq: tokens per row. Intervals in steps. keep: last N checkpoints
    (plus the best by eval loss when keep_best: only saves at an evaluated step carry an eval loss, i.e. steps that
    are multiples of both eval_every and save_every, and the last; with eval_every not dividing save_every most
    evaluations are not ranked). nan_policy: 'skip' (state unchanged, counted) or 'halt' (also at a non-finite eval
    loss, before that step is saved: a finite step may make parameters that compute NaN).
    eval_target: eval loss whose first crossing is logged with its wall time (None: no target). sample_tokens:
    tokens generated after the run, at most what fits in model.max_seq_len after the prompt (the trained context).
    sample_prompt: the text that sample continues (None: 'def __init__(self' on the built-in corpus; with your own
    tiers, data.train_dir, the first words of the first held-out document; '': the document-start token alone, a
    sample of a fresh document); one longer than model.max_seq_len keeps its last tokens.

    Test hooks (never set in real runs): poison_steps: steps whose batch weights are NaN; kill_at: SIGKILL
    this process after that step; kill_in_save: the kill comes right after an async save was issued."""

    steps: int = 300
    batch: int = 16
    seq: int = 128
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50
    keep: int = 2
    keep_best: bool = True
    nan_policy: str = "skip"
    out: str = "runs/demo"
    seed: int = 0
    init_from: str | None = None  # a Hugging Face folder: a fresh run starts from its weights (see --init-from)
    sample_tokens: int = 120
    sample_prompt: str | None = None
    eval_target: float | None = None
    async_save: bool = True
    progress: bool = True
    poison_steps: tuple[int, ...] = ()
    kill_at: int = 0
    kill_in_save: bool = False

    def __post_init__(self):
        _check_spec(self, "train")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run of `experiments.train_lm` depends on: the model, the mesh shape (one axis may be
    -1: all remaining devices), data, optimizer and loop settings. Saved with every checkpoint (`to_json`)."""

    model: TransformerConfig
    mesh: dict[str, int]
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()

    def __post_init__(self):
        # a section given as something else (model=4, a dict from JSON) failed in validate with a bare
        # AttributeError ('int' object has no attribute 'dtype') naming no field
        for f, cls in (("model", TransformerConfig), ("data", DataSpec), ("optim", OptimSpec), ("train", TrainSpec)):
            v = getattr(self, f)
            if not isinstance(v, cls):
                raise ConfigError(f"{f}: must be a {cls.__name__} instance, got {type(v).__name__} {v!r:.60} (build "
                                  f"{cls.__name__}(**fields) from a dict, or set its fields: --set {f}.<field>=...)")
        if not isinstance(self.mesh, dict):  # ('int' object is not iterable)
            raise ConfigError(f"mesh: must be a dict of axis sizes, e.g. {{'data': 2, 'fsdp': -1}}, got "
                              f"{type(self.mesh).__name__} {self.mesh!r:.60}")
        # numpy ints as Python's (a sweep's 8 // np.int64(2)): validate took them, then to_json failed at the first
        # checkpoint; anything else is left for validate to refuse by name
        object.__setattr__(self, "mesh", {a: int(n) if _is_int(n) else n for a, n in self.mesh.items()})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """The inverse of `to_json` (a checkpoint's saved config). Fields this version does not know are left out;
        fields added since the save take their defaults."""
        from models.config import RopeScaling

        def build(kind, d):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

        d = json.loads(text)
        m = dict(d["model"])
        m["moe"] = None if m.get("moe") is None else build(MoEConfig, m["moe"])
        m["rope_scaling"] = None if m.get("rope_scaling") is None else build(RopeScaling, m["rope_scaling"])
        return cls(build(TransformerConfig, m), dict(d["mesh"]), build(DataSpec, d.get("data", {})),
                   build(OptimSpec, d.get("optim", {})), build(TrainSpec, d.get("train", {})))


# ---- presets ----------------------------------------------------------------------------------------------------

BYTE_EOS_VOCAB = 257  # data.tokenizer.ByteTokenizer(add_eos=True)
# The presets' embedding and head: 257 is prime, so no tensor axis would divide it. Padded to a multiple of 64
# (as Megatron and nanoGPT pad theirs); ids >= 257 never occur in the data, and decoding skips them.
PADDED_BYTE_VOCAB = 320


def _demo() -> RunConfig:
    # Sliding-window layers alternate with global ones (Gemma 2 pattern); every other layer is MoE.
    model = TransformerConfig(vocab_size=PADDED_BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                              mlp_dim=384, max_seq_len=128, attn_pattern="alternating", sliding_window=32,
                              swa_block=64,
                              # MoE pass-through: 4 experts of width 192, top-2, in layers 1 and 3
                              moe=MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=192), moe_every=2)
    return RunConfig(model, {"data": 2, "fsdp": 4}, DataSpec(),
                     OptimSpec(lr=3e-3, warmup_steps=30),
                     TrainSpec(steps=200, batch=16, seq=128, log_every=10, eval_every=50, save_every=50,
                               out="runs/demo", eval_target=3.3))


def _tiny() -> RunConfig:
    model = TransformerConfig(vocab_size=PADDED_BYTE_VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                              mlp_dim=64, max_seq_len=32, attn_pattern="alternating", sliding_window=8, swa_block=16)
    return RunConfig(model, {"fsdp": -1}, DataSpec(max_files=40, eval_every_nth=10, eval_batches=1),
                     OptimSpec(lr=1e-2, warmup_steps=2),
                     TrainSpec(steps=12, batch=8, seq=32, log_every=1, eval_every=4, save_every=4, keep=3,
                               out="runs/tiny", sample_tokens=8, progress=False))


def _llama7b() -> RunConfig:  # full-size shapes for validation checks only (its mesh: 256 devices)
    model = TransformerConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              mlp_dim=11008, max_seq_len=4096, remat="full", dtype="bfloat16")
    return RunConfig(model, {"data": 8, "fsdp": 32}, DataSpec(), OptimSpec(lr=3e-4, warmup_steps=2000),
                     TrainSpec(steps=250_000, batch=1024, seq=4096, out="runs/llama7b"))


def _mixtral8x7b() -> RunConfig:  # full-size shapes for validation checks only (its mesh: 512 devices)
    model = TransformerConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              mlp_dim=14336, max_seq_len=32768, rope_theta=1e6, remat="full", dtype="bfloat16",
                              moe=MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=14336))
    return RunConfig(model, {"data": 4, "fsdp": 16, "expert": 8}, DataSpec(), OptimSpec(lr=3e-4, warmup_steps=2000),
                     TrainSpec(steps=250_000, batch=1024, seq=4096, out="runs/mixtral8x7b"))


PRESETS = {"demo": _demo, "tiny": _tiny, "llama7b": _llama7b, "mixtral8x7b": _mixtral8x7b}


def preset(name: str) -> RunConfig:
    """A fresh RunConfig of a named preset (`PRESETS`: demo, tiny, llama7b, mixtral8x7b)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---- overrides --------------------------------------------------------------------------------------------------


def parse_mesh(s: str) -> dict[str, int]:
    """'data=2,fsdp=-1' → {'data': 2, 'fsdp': -1} (`parallel.mesh.parse_mesh`, raising ConfigError)."""
    from parallel.mesh import parse_mesh as parse

    try:
        return parse(s)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _int(x) -> int:
    """An int from an int or an integral number (1e3); bools are not ints here."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    raise ValueError(x)


def _typed(text: str, annotation: str, key: str, namespace: dict) -> Any:
    """`text` as a value of the field's declared type (dataclass annotations are strings here: `from __future__
    import annotations`). Other names, looked up in the config's module `namespace`, are Literal string aliases
    (RematPolicy) or nested configs (MoEConfig)."""
    options = [a.strip() for a in annotation.split("|")]
    low = text.strip().lower()
    for opt in options:
        try:
            if opt == "None" and low in ("none", "null"):
                return None
            if opt == "bool" and low in ("true", "false"):
                return low == "true"
            if opt == "int":
                return _int(_literal(text))
            if opt == "float":
                v = _literal(text)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):  # 1e400 is inf
                    return float(v)
            if opt.startswith("tuple["):
                v = _literal(text if text.strip() else "()")
                return tuple(_int(x) for x in (v if isinstance(v, tuple | list) else (v,)))
        except (ValueError, TypeError, OverflowError):  # (float(10**400): an integer past float's range)
            continue
    strings = [o for o in options if o == "str" or o.startswith("Literal[")
               or getattr(namespace.get(o), "__origin__", None) is Literal]
    if strings:
        v = _literal(text)
        return v if isinstance(v, str) else text  # quotes are optional
    if any(o[:1].isupper() and o != "None" for o in options):
        raise ConfigError(f"{key}: is a nested config ({annotation}); set its fields (e.g. {key}.<field>=...)"
                          + (" or none to turn it off" if "None" in options else ""))
    want = {"int": "an integer", "float": "a number", "bool": "true or false", "None": "none",
            # it said "expected tuple[int, ...] (tuple[int, ...])": no form to write
            "tuple[int, ...]": "integers separated by commas (e.g. 3,5)"}
    raise ConfigError(f"{key}: expected {' or '.join(want.get(o, o) for o in options)} ({annotation}), "
                      f"got {text!r}")


def _replace(obj, changes: dict, where: str):
    """`dataclasses.replace(obj, **changes)`: all of one config's fields at once, so a pair that is only valid
    together (attn_pattern and sliding_window) can be set in either order."""
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as e:  # the model and MoE configs validate themselves and name their field as Class.field:
        line = str(e).splitlines()[0]  # name it as the user's --set key instead (model.moe.top_k)
        cls = f"{type(obj).__name__}."
        raise ConfigError(f"{where}.{line.removeprefix(cls)}" if line.startswith(cls) else line) from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _default_nested(annotation: str, namespace: dict):
    """The default instance of the dataclass an optional field's annotation names ('MoEConfig | None'), or None."""
    from models.moe import MoEConfig

    for name in (o.strip() for o in annotation.split("|")):
        cls = namespace.get(name) or {"MoEConfig": MoEConfig}.get(name)  # models.config imports it lazily
        if dataclasses.is_dataclass(cls):
            return cls()
    return None


# The fields that turn an optional nested config that is off on from its defaults; any other alone is refused.
# model.moe.lb_loss_weight=0.02 (or dispatch=capacity) on a dense preset made it MoEConfig's 8 experts of width 512
# in every layer (tiny: 39k -> 814k parameters), silently; rope_scaling.beta_fast=16 turned on llama3 scaling x8.
TURNS_ON = {"model.moe": ("n_experts",), "model.rope_scaling": ("kind", "factor")}


def _check_turned_on(key: str, default, deeper: dict[str, str]) -> None:
    """Refuse `deeper` (`{field: text}` under `key`, a nested config that is None) unless it names a TURNS_ON field."""
    on = TURNS_ON.get(key)
    if on is None or default is None or any(k.split(".")[0] in on for k in deeper):
        return
    first = next(iter(deeper))
    raise ConfigError(f"{key}.{first}: {key} is none (off), so this would turn it on with {type(default).__name__}'s "
                      f"defaults ({', '.join(f'{f}={getattr(default, f)!r}' for f in on)}, ...); to turn it on set "
                      f"{' or '.join(f'{key}.{f}' for f in on)} as well (e.g. --set {key}.{on[0]}="
                      f"{getattr(default, on[0])}), or drop the override")


def _close_setting(key: str, cfg: RunConfig) -> str | None:
    """The `section.field` key a misspelt section (`trian.steps`) or a field without its section (`steps`, `lr`)
    most likely meant, as a misspelt field is matched against its config's fields; None: nothing close."""
    keys = [f"{sec}.{f.name}" for sec in ("model", "data", "optim", "train")
            for f in dataclasses.fields(getattr(cfg, sec))] + [f"mesh.{a}" for a in cfg.mesh] + ["mesh"]
    if "." in key:
        return next(iter(difflib.get_close_matches(key, keys, n=1)), None)
    bare = {}  # field name -> its first key (data.seed is not a field: train.seed)
    for k in keys:
        bare.setdefault(k.split(".", 1)[-1], k)
    return bare.get(next(iter(difflib.get_close_matches(key, bare, n=1)), None))


def apply_overrides(cfg: RunConfig, sets: dict[str, str]) -> RunConfig:
    """`section.field=value` overrides (`model.moe.top_k=1` reaches nested configs; the last of a key wins), each
    config rebuilt once with all of its fields. `sets` is in command-line order: a whole config set after some of its
    fields (`model.moe.top_k=1` then `model.moe=none`) replaces them, as a later `mesh=` replaces `mesh.<axis>`."""
    keys = list(sets)
    sets = {k: v for i, (k, v) in enumerate(sets.items()) if not any(k.startswith(f"{p}.") for p in keys[i + 1:])}
    for key in [k for k in sets if k == "mesh" or k.startswith("mesh.")]:
        text = sets.pop(key)
        if key == "mesh":
            cfg = dataclasses.replace(cfg, mesh=parse_mesh(text))
            continue
        axis = key.split(".", 1)[1]
        try:
            cfg = dataclasses.replace(cfg, mesh={**cfg.mesh, axis: int(text)})
        except ValueError:
            raise ConfigError(f"{key}: expected an integer axis size (-1: the remaining devices), got {text!r}") \
                from None
    for key in sets:
        if key in ("model", "data", "optim", "train"):  # (the close key below was e.g. model.d_model)
            raise ConfigError(f"{key}: is a section, not a setting; set its fields, e.g. --set {key}.<field>=...")
        if key.split(".")[0] not in ("model", "data", "optim", "train") or "." not in key:
            close = _close_setting(key, cfg)
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(f"{key}: unknown setting; {hint}use model.*, mesh[.axis], data.*, optim.* or train.*")

    def go(obj, path: str, sub: dict[str, str]):
        fields = {f.name: f.type for f in dataclasses.fields(obj)}
        changes = {}
        for name in dict.fromkeys(k.split(".")[0] for k in sub):
            key = f"{path}{name}"
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f"did you mean {path}{close[0]}? " if close else ""
                raise ConfigError(f"{key}: unknown field; {hint}{type(obj).__name__} has {', '.join(sorted(fields))}")
            if name in sub:  # the field itself
                changes[name] = _typed(sub[name], str(fields[name]), key, vars(sys.modules[type(obj).__module__]))
            deeper = {k.split(".", 1)[1]: v for k, v in sub.items() if k.startswith(name + ".")}
            if deeper:
                child = changes.get(name, getattr(obj, name, None))
                if child is None:  # an optional nested config that is off (moe, rope_scaling): start from defaults
                    child = _default_nested(str(fields[name]), vars(sys.modules[type(obj).__module__]))
                    _check_turned_on(key, child, deeper)
                if not dataclasses.is_dataclass(child):
                    raise ConfigError(f"{key}.{next(iter(deeper))}: {name} is not a nested config")
                changes[name] = go(child, key + ".", deeper)
        return _replace(obj, changes, path.rstrip(".") or "config")

    return go(cfg, "", sets) if sets else cfg


def parser(description: str | None = None) -> argparse.ArgumentParser:
    """The trainer's command line; `description` (the trainer's docstring) is printed above this module's."""
    ap = argparse.ArgumentParser(prog="python -m experiments.train_lm",
                                 description="\n".join(d for d in (description, __doc__) if d),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.steps=50")
    ap.add_argument("--init-from", metavar="HF_FOLDER", help="fine-tune a Hugging Face checkpoint (Llama, Mistral, "
                    "Ministral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 text, Mixtral, OLMo 2; safetensors): the "
                    "model takes its architecture (the preset keeps how it runs: remat, dtype, kernels, ...) and a "
                    "fresh run its weights")
    for flag, key in FLAT.items():
        ap.add_argument(flag, dest=key, action=_AsSet, metavar="VALUE", help=f"= --set {key}=...")
    return ap


class _AsSet(argparse.Action):
    """A short flag (--steps 50) appended to --set's list (train.steps=50) in command-line order, so that the last
    of a key wins across both forms, and `--mesh fsdp=-1 --set mesh.tensor=2` adds the axis as --set's form does."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.set = [*namespace.set, f"{self.dest}={value}"]


FLAT = {"--steps": "train.steps", "--batch": "train.batch", "--seq": "train.seq", "--lr": "optim.lr",
        "--mesh": "mesh", "--out": "train.out", "--seed": "train.seed"}


def load(argv=None, description: str | None = None) -> RunConfig:
    """Preset + overrides from the command line (not yet validated against the devices)."""
    args = parser(description).parse_args(argv)
    sets = {}
    for kv in args.set:
        key, sep, text = kv.partition("=")
        if not sep or not key.strip():  # '=5' named the setting '' (": unknown setting")
            raise ConfigError(f"--set {kv!r}: write KEY=VALUE, e.g. train.steps=50")
        sets.pop(key.strip(), None)  # the last of a key wins
        sets[key.strip()] = text.strip()
    cfg = preset(args.preset)
    if args.init_from:
        cfg = dataclasses.replace(cfg, model=model_from_hf(args.init_from, cfg.model),
                                  train=dataclasses.replace(cfg.train, init_from=args.init_from))
    return apply_overrides(cfg, sets)


def model_from_hf(folder, base: TransformerConfig) -> TransformerConfig:
    """The architecture of the Hugging Face checkpoint in `folder` (its config.json, as `models.hf.from_pretrained`
    reads it), with `base`'s `experiments.train_lm.KEPT_FROM_PRESET` fields (how the model runs, float32
    parameters unless the preset says otherwise, and μP's base width, which config.json does not record) and, when
    both have a MoE, its MOE_EXECUTION_FIELDS."""
    from experiments.train_lm import KEPT_FROM_PRESET, with_moe_execution
    from models.hf_config import config_from_hf

    try:
        folder = local_path(folder)  # (--init-from is read here, before TrainSpec expands or refuses it)
    except ValueError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    path = os.path.join(folder, "config.json")
    # a run directory said only "[Errno 2] No such file or directory: .../config.json"; so did its ckpt/ or one
    # checkpoint step in it (RUN/ckpt/24), the folder one branches from
    run, step, norm = folder, None, os.path.normpath(folder)
    if os.path.basename(os.path.dirname(norm)) == "ckpt":
        run, step = os.path.dirname(os.path.dirname(norm)), os.path.basename(norm)
    elif os.path.basename(norm) == "ckpt":
        run = os.path.dirname(norm)
    if not os.path.exists(path) and os.path.isdir(os.path.join(run, "ckpt")):
        what = "a train_lm run (it holds ckpt/)" if run == folder else f"a checkpoint of the train_lm run {run!r}"
        at = f", step={int(step)}" if step is not None and step.isdigit() else ""
        raise ConfigError(f"train.init_from: {folder!r} is {what}, not a Hugging Face folder "
                          "(config.json + safetensors); start from it by exporting its model, `model, _ = "
                          f"experiments.train_lm.load_model({run!r}{at}); models.hf.save_pretrained(model, FOLDER)` "
                          "(the layouts a HF architecture has), then --init-from FOLDER; or continue the run itself: "
                          f"--out {run}")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        return with_moe_execution(config_from_hf(hf, **{k: getattr(base, k) for k in KEPT_FROM_PRESET}), base)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from: {folder!r}: {e}") from None


def load_tokenizer(d: DataSpec):
    """The run's tokenizer: `data.tokenizer.BPETokenizer.load(d.tokenizer)`, or bytes + EOS."""
    from data.tokenizer import BPETokenizer, ByteTokenizer

    return ByteTokenizer(add_eos=True) if d.tokenizer is None else BPETokenizer.load(d.tokenizer, d.eos_token,
                                                                                      d.bos_token)


# ---- validation -------------------------------------------------------------------------------------------------


def _records(shard: str) -> int:
    """The number of records in an ArrayRecord shard (its header only)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(shard)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _check_tier(path: str, field: str, tokenizer) -> None:
    """A data directory the loader can read with this tokenizer: shards, at least one document, and (for
    pre-tokenized data) the tokenizer that made it. Reads only the shards' headers."""
    from data.loader import Source

    try:
        src = Source(path)
        files = src.files()
        n = sum(_records(f) for f in files)
        if n == 0:
            raise ValueError(f"its {len(files)} shard(s) hold no documents (did the cleaning run drop them all? see "
                             "its stats.json)")
        src.check_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path!r}: {e}") from None


def _shared_shard(train_dir: str, eval_dir: str) -> tuple[str, str] | None:
    """(eval shard, train shard) of the first held-out shard that is a training one: the same file (a link) or the
    same bytes (a copy), or None. Shards of no record are skipped: a cleaning shard that kept nothing is the same
    few bytes in every tier. Only shards of equal size are compared, from their first bytes."""
    import filecmp

    from data.loader import Source

    by_size: dict[int, list[str]] = {}
    for f in Source(train_dir).files():
        by_size.setdefault(os.path.getsize(f), []).append(f)
    for e in Source(eval_dir).files():
        same = [t for t in by_size.get(os.path.getsize(e), []) if filecmp.cmp(e, t, shallow=False)]
        if same and _records(e):
            return e, same[0]
    return None


def _text_origin(path: str) -> tuple[str, str | None]:
    """(the tier a data directory's documents come from: a pretokenize output's source tier (its meta's "source"),
    else itself; the cleaning run holding that tier, or None): two tiers of one run hold the same documents, every
    later tier's a subset of an earlier one's."""
    from data.shards import TIERS, read_json

    tier = os.path.realpath(path)
    try:
        meta = read_json(os.path.join(tier, "tokenizer.json"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and isinstance(meta.get("source"), str):
        tier = os.path.realpath(meta["source"])
    run = os.path.dirname(tier)
    return tier, run if os.path.basename(tier) in TIERS and os.path.isfile(os.path.join(run, "manifest.json")) else None


def resolved_mesh(mesh: dict[str, int], n_devices: int) -> dict[str, int]:
    """The mesh shape with its -1 axis filled in for `n_devices`; a ConfigError naming `mesh` if it cannot be."""
    from parallel.mesh import _fill

    try:
        return _fill(dict(mesh), n_devices, "devices")
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None


def expert_axis_problem(model: TransformerConfig, mesh: dict[str, int]) -> str | None:
    """Why `mesh` (resolved sizes) cannot have its expert axis for `model` (None: it can); experiments.aot asks too."""
    ep = mesh.get("expert", 1)
    if ep > 1 and (model.moe is None or model.moe.n_experts % ep):
        return f"expert axis {ep} needs model.moe with a multiple of {ep} experts"
    return None


def _divisible_fix(n: int, mesh: dict[str, int], axis: str) -> str:
    """What to pass when `n` is not divisible by the (resolved) mesh `axis`: a multiple of the axis size, or the
    largest axis size below it that divides `n` with the remaining devices moved to another axis. The sharding
    refusals named the field and the axis but no value that would pass."""
    size = mesh.get(axis, 1)
    if n % size == 0:  # (validate's messages are built before their check)
        return ""
    smaller = max(d for d in range(1, size) if n % d == 0 and size % d == 0)
    rest = {a: s for a, s in mesh.items() if a != axis}
    other = next((a for a in ("fsdp", "data") if a != axis), "data")
    shape = {**rest, other: rest.get(other, 1) * size // smaller, axis: smaller}
    from parallel.mesh import AXES

    mesh_arg = ",".join(f"{a}={shape[a]}" for a in AXES if shape.get(a, 1) > 1) or f"{other}=1"
    return f"use a multiple of {size}, or a smaller {axis} axis (e.g. --mesh {mesh_arg})"


def dir_problem(path) -> str | None:
    """Why `path` cannot be (or be made) a directory this process writes in (None: it can); train_lm's validate and
    train_video's --out ask (a file in the way failed in mkdir with a traceback naming no setting)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is a file; name a directory"
    parent = os.path.abspath(path)  # the nearest existing folder must be a directory we may write in
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        return (f"{path!r} cannot be created: {parent!r} is {'not writable' if os.path.isdir(parent) else 'a file'}; "
                "name a directory you can write")
    return None


def cache_root(d: DataSpec) -> str:
    """Where the built-in corpus is cached: `data.cache_dir`, else ~/.cache/jaxscale."""
    return d.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "jaxscale")


def validate(cfg: RunConfig, n_devices: int) -> dict[str, int]:
    """Check everything that would otherwise fail deep inside compilation; returns the resolved mesh shape."""

    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"{field}: {msg}")

    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    mesh = resolved_mesh(cfg.mesh, n_devices)
    for f in ("steps", "batch", "seq", "log_every", "eval_every", "save_every", "keep"):
        need(getattr(t, f) >= 1, f"train.{f}", f"must be >= 1, got {getattr(t, f)}")
    # train.steps=1e30 (or 3e9) validated, then the wsd schedule failed with a bare OverflowError building the
    # optimizer, and a cosine run's int32 counters would wrap
    need(t.steps <= INT32_MAX, "train.steps", f"must be at most {INT32_MAX} (the step counters are int32), got "
         f"{t.steps}")
    need(t.nan_policy in ("skip", "halt"), "train.nan_policy", f"unknown {t.nan_policy!r}; use skip or halt")
    need(o.schedule in ("cosine", "wsd"), "optim.schedule", f"unknown {o.schedule!r}; use cosine or wsd")
    need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    # the cosine schedule needs an update after warmup to decay over (warmup 0 is always fine)
    hi = max(0, t.steps - 2) if o.schedule == "cosine" else t.steps - 1
    need(0 <= o.warmup_steps <= hi, "optim.warmup_steps",
         f"{o.warmup_steps} must be in [0, {hi}] for train.steps={t.steps}"
         + (" (the cosine decay needs an update after warmup)" if o.schedule == "cosine" else "")
         + f"; for a short run add e.g. --set optim.warmup_steps={min(hi, t.steps // 10)}")
    need(0 < o.decay_frac <= 1, "optim.decay_frac", f"must be in (0, 1], got {o.decay_frac}")
    need(o.clip_norm > 0, "optim.clip_norm", f"must be positive, got {o.clip_norm}")
    for f in ("b1", "b2"):  # each by its --set key ("optim.b1/b2" was no key)
        need(0 <= getattr(o, f) < 1, f"optim.{f}", f"Adam's betas must be in [0, 1), got {getattr(o, f)}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio",
         f"must be in [0, 1] (the schedule decays to min_lr_ratio·lr), got {o.min_lr_ratio}")
    need(d.corpus == DataSpec.corpus, "data.corpus", f"{d.corpus!r}: this version builds {DataSpec.corpus!r} only")
    need(d.max_files is None or d.max_files >= 1, "data.max_files",
         f"must be None (all modules) or >= 1, got {d.max_files}")
    need(t.eval_target is None or t.eval_target > 0, "train.eval_target",
         f"an eval loss (cross-entropy, > 0) to reach, or none; got {t.eval_target} (never reached)")
    need(t.sample_tokens >= 0, "train.sample_tokens", f"must be >= 0 (0: no sample), got {t.sample_tokens}")
    need(t.kill_at >= 0, "train.kill_at", f"must be >= 0 (a test hook; 0: off), got {t.kill_at}")
    need(bool(str(t.out).strip()), "train.out", "is empty: name the run's output directory, e.g. runs/demo")
    # a count first: 0 and -2 were told they "must divide train.batch=8" (-2 does)
    need(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1 (microbatches per step; 1: none), got {o.grad_accum}")
    need(t.batch % o.grad_accum == 0, "optim.grad_accum", f"{o.grad_accum} must divide train.batch={t.batch}")
    need(d.eval_every_nth >= 2, "data.eval_every_nth", f"hold out every n-th module with n >= 2, got "
         f"{d.eval_every_nth}")
    need(d.eval_batches >= 1, "data.eval_batches", f"must be >= 1 (batches per evaluation), got {d.eval_batches}")
    from data.loader import MAX_SEED

    need(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}] (the loader shuffles each source with "
         f"seed·1000 in grain's 32 bits), got {t.seed}")
    # Under a C / POSIX locale with PYTHONUTF8=0: a Chinese train.sample_prompt was sampled as U+FFFD's, and a
    # train.out in a non-ASCII directory failed in orbax's first save, after the steps it was to keep
    from data.cli import undecoded

    for sec, spec in (("data", d), ("train", t)):
        for f in dataclasses.fields(spec):
            v, field = getattr(spec, f.name), f"{sec}.{f.name}"
            if isinstance(v, str):
                need((problem := undecoded(os.path.abspath(v) if field in PATH_FIELDS else v)) is None, field, problem)
    # the directories the run writes (the built-in corpus is cached on its first use): a file in the way failed
    # with a traceback naming no setting once the run had started
    # (the default cache under $HOME too: an unwritable home failed in mkdir with a traceback naming no setting)
    # (train.out's ckpt/ too: a file there failed the first save, a save interval of training later)
    for path, field in ((t.out, "train.out"), (t.out and os.path.join(t.out, "ckpt"), "train.out"),
                        (cache_root(d) if d.train_dir is None else None, "data.cache_dir")):
        if path is None:
            continue
        need((problem := dir_problem(path)) is None, field, problem)
    # a run's ckpt/ itself (--out runs/x/ckpt, meaning to resume runs/x): a fresh run started inside it, silently
    steps = sorted((n for n in (os.listdir(t.out) if os.path.isdir(t.out) else ())
                    if n.isdigit() and os.path.isdir(os.path.join(t.out, n, "meta"))), key=int)
    need(not steps, "train.out", f"{t.out!r} holds checkpoint steps ({', '.join(steps[-3:])}): it is a run's ckpt/ "
         f"directory; pass the run's own directory, {os.path.dirname(os.path.abspath(t.out))!r}, to resume it")
    if t.init_from is not None:  # before compiling: the folder, and a model that its weights fit
        folder = str(t.init_from)
        # a resume restores every parameter from train.out and reads only config.json (the architecture): the
        # weights, deleted after the first save (a 70B download), refused a run that never reads them
        ckpt = os.path.join(t.out, "ckpt")
        resuming = any(n.isdigit() and os.path.isdir(os.path.join(ckpt, n, "meta"))
                       for n in (os.listdir(ckpt) if os.path.isdir(ckpt) else ()))
        need(resuming or any(f.endswith(".safetensors") for f in (os.listdir(folder) if os.path.isdir(folder) else ())),
             "train.init_from", f"{folder!r} holds no *.safetensors weights; pass a Hugging Face checkpoint folder")
        hf_model = model_from_hf(folder, m)
        differ = sorted(f.name for f in dataclasses.fields(m) if getattr(m, f.name) != getattr(hf_model, f.name))
        need(not differ, "train.init_from", f"model.{', model.'.join(differ)} differ from {folder!r}'s config.json "
             f"({', '.join(f'{k}={getattr(hf_model, k)!r}' for k in differ[:4])}); its weights fit only its own "
             "architecture: drop those --set model.* overrides (the --init-from flag takes the model from "
             "config.json; --set train.init_from=... alone does not)")
    need(d.max_files is None or d.max_files >= d.eval_every_nth, "data.max_files",
         f"{d.max_files} modules hold none out for evaluation (every {d.eval_every_nth}-th is held out); use at "
         f"least {d.eval_every_nth} or lower data.eval_every_nth")
    # the field that holds it is named: a param_dtype float16 was blamed on model.dtype (float32 by default)
    need("float16" not in (m.dtype, m.param_dtype), "model.dtype" if m.dtype == "float16" else "model.param_dtype",
         "float16 training needs loss scaling, which this trainer does not do (float16's 5 exponent bits: small "
         "gradients fall into its subnormals, large activations overflow); use bfloat16, or float32 on GPUs without "
         "it (V100, T4)")
    need(m.param_dtype != "bfloat16", "model.param_dtype",
         "bfloat16 parameters lose every AdamW update smaller than half their rounding step (at lr 1e-4, 99% of "
         "|p| ~ 1 entries never move; norm scales stay frozen), and this trainer keeps no float32 master copy; use "
         "param_dtype float32 with model.dtype bfloat16 (bf16 compute, float32 weights)")
    import jax

    backend = jax.default_backend()  # kernels that exist on one backend only fail at the first step otherwise
    need(m.attn_impl != "cudnn" or backend == "gpu", "model.attn_impl",
         f"'cudnn' needs a GPU (this backend: {backend}); use 'xla'")
    need(m.swa_impl not in ("cudnn", "splash") or backend == {"cudnn": "gpu", "splash": "tpu"}[m.swa_impl],
         "model.swa_impl", f"{m.swa_impl!r} needs a {'GPU' if m.swa_impl == 'cudnn' else 'TPU'} (this backend: "
         f"{backend}); use 'auto' (it picks per backend) or 'blocked'")
    need((d.train_dir is None) == (d.eval_dir is None), "data.train_dir",
         "give both data.train_dir and data.eval_dir (your own held-out tier), or neither (the stdlib corpus)")
    for f in ("train_dir", "eval_dir"):
        path = getattr(d, f)
        need(path is None or os.path.isdir(path), f"data.{f}", f"{path!r} is not a directory; pass a tier of "
             "`python -m data.pipeline` (e.g. RUN/augmented) or a data.tokenizer.pretokenize output")
    in_folder = d.tokenizer is not None and os.path.isfile(os.path.join(d.tokenizer, "tokenizer.json"))
    need(d.tokenizer is None or os.path.isfile(d.tokenizer), "data.tokenizer",
         f"{d.tokenizer!r} is a folder; pass its tokenizer.json: "  # a Hugging Face checkpoint's folder
         f"--set data.tokenizer={os.path.join(d.tokenizer, 'tokenizer.json')}" if in_folder else
         f"{d.tokenizer!r} is not a file; save one with data.tokenizer.train_bpe(texts, vocab).save(path)")
    for f in ("eos_token", "bos_token"):
        need(getattr(d, f) is None or d.tokenizer is not None, f"data.{f}",
             "names a token of data.tokenizer, which is not set (bytes + EOS have their own); pass its tokenizer "
             f"too (--set data.tokenizer=PATH/tokenizer.json) or drop data.{f} (--set data.{f}=none)")
    try:
        tokenizer = load_tokenizer(d)
    except ValueError as e:
        if "bos_token" in str(e):
            raise ConfigError(f"data.bos_token: {e} (--set data.bos_token=...)") from None
        if "eos_token" in str(e) or "special tokens" in str(e):  # the tokenizer is fine; its EOS is not known
            raise ConfigError(f"data.eos_token: {e} (--set data.eos_token=...)") from None
        raise ConfigError(f"data.tokenizer: {d.tokenizer!r} is not a tokenizers JSON file ({e}); save one with "
                          "data.tokenizer.train_bpe(texts, vocab).save(path)") from None
    # an empty prompt is the document-start token alone (the BOS, else the EOS: train_lm.sample_ids), a sample of a
    # fresh document; a tokenizer with neither gives no tokens, which generate refused after the whole run
    need(t.sample_prompt != "" or t.sample_tokens == 0 or tokenizer.eos_id is not None
         or getattr(tokenizer, "bos_id", None) is not None, "train.sample_prompt",
         "is empty and the tokenizer has no BOS / EOS to start the sample with; give some text, none for the default, "
         "or train.sample_tokens=0 for no sample")
    if d.train_dir is not None:
        need(os.path.realpath(d.train_dir) != os.path.realpath(d.eval_dir), "data.eval_dir",
             f"{d.eval_dir!r} is data.train_dir: evaluation would score training documents; pass a held-out tier")
        for f in ("train_dir", "eval_dir"):
            _check_tier(getattr(d, f), f"data.{f}", tokenizer)
        # a copy of the training tier (or a held-out directory linking its shards) passed the path check above, and
        # every evaluation scored training documents: the held-out loss, eval_target and the best checkpoint
        if shared := _shared_shard(d.train_dir, d.eval_dir):
            need(False, "data.eval_dir", f"{shared[0]!r} holds the same documents as data.train_dir's {shared[1]!r} (a "
                 "copy or a link): evaluation would score training documents; pass a held-out tier (python -m "
                 "data.pipeline HELD --out held --dedup-against TRAIN_RUN drops held-out documents that repeat "
                 "training ones)")
        # another tier of the training run (RUN/cleaned beside RUN/augmented), or the one a pretokenize output was
        # made from: other bytes, the same documents, and every evaluation scored training documents
        (t_tier, t_run), (e_tier, e_run) = _text_origin(d.train_dir), _text_origin(d.eval_dir)
        need(t_tier != e_tier and (t_run is None or t_run != e_run), "data.eval_dir",
             f"{d.eval_dir!r} holds data.train_dir's documents ("
             + (f"both come from {t_tier!r}" if t_tier == e_tier else f"both are tiers of the cleaning run {t_run!r}")
             + "): evaluation would score training documents; clean the held-out files in a run of their own "
             "(python -m data.pipeline HELD --out held --dedup-against TRAIN_RUN) and pass one of its tiers")
    vocab = tokenizer.vocab_size
    # under init_from the vocabulary is config.json's (a --set model.vocab_size is refused above): its tokenizer fits
    need(m.vocab_size >= vocab, "model.vocab_size",
         f"{m.vocab_size} < the tokenizer's {vocab} ids ({'bytes + EOS' if d.tokenizer is None else d.tokenizer})"
         + ("; raise model.vocab_size" if t.init_from is None else
            f" (vocab_size of {str(t.init_from)!r}'s config.json); train with the checkpoint's own tokenizer: "
            f"--set data.tokenizer={os.path.join(str(t.init_from), 'tokenizer.json')}"))
    # batch rows are split over every batch mesh axis, per microbatch
    from parallel.rules import ACTIVATION_RULES

    batch_axes = {a: mesh.get(a, 1) for a in ACTIVATION_RULES["batch"] if mesh.get(a, 1) > 1}
    shards = math.prod(batch_axes.values())
    micro = t.batch // o.grad_accum
    # the batch must be a multiple of grad_accum × shards (it said "a multiple of 8" to a batch of 8 at grad_accum 2)
    need(micro % shards == 0, "train.batch",
         f"{t.batch} rows / grad_accum {o.grad_accum} = {micro} per microbatch is not divisible by the batch "
         f"mesh axes {batch_axes} (= {shards}); use a multiple of {o.grad_accum * shards}"
         + (f" (grad_accum {o.grad_accum} × {shards}), or a smaller optim.grad_accum" if o.grad_accum > 1 else ""))
    # under init_from the model is config.json's (a --set model.max_seq_len is refused above): shorten the rows
    need(t.seq <= m.max_seq_len, "train.seq", f"{t.seq} > model.max_seq_len={m.max_seq_len}; raise max_seq_len"
         if t.init_from is None else f"{t.seq} > model.max_seq_len={m.max_seq_len} (max_position_embeddings of "
         f"{str(t.init_from)!r}'s config.json); use --seq {m.max_seq_len} or less")
    need(t.seq % mesh.get("sequence", 1) == 0, "train.seq",
         f"{t.seq} is not divisible by the sequence axis ({mesh.get('sequence')}); "
         f"{_divisible_fix(t.seq, mesh, 'sequence')}")
    windows = [w for w in m.layer_windows() if w is not None]
    # a model designed here with a window as long as its rows has no local layer in effect: likely a slip. A
    # checkpoint's window (init_from: Mistral's or Gemma 2's 4096) binds only past train.seq, as it did in pretraining
    need(t.init_from is not None or all(w < t.seq for w in windows), "model.sliding_window",
         f"window {max(windows, default=0)} >= train.seq={t.seq}: the local layers would be global; use a window "
         "below the sequence length (or attn_pattern='global' with sliding_window=None)")
    tp = mesh.get("tensor", 1)
    need(m.n_heads % tp == 0, "model.n_heads",
         f"{m.n_heads} head{'s are' if m.n_heads != 1 else ' is'} not divisible by the tensor axis ({tp}); "
         f"{_divisible_fix(m.n_heads, mesh, 'tensor')}")
    need(m.mlp_dim % tp == 0, "model.mlp_dim",
         f"{m.mlp_dim} is not divisible by the tensor axis ({tp}); {_divisible_fix(m.mlp_dim, mesh, 'tensor')}")
    need(m.vocab_size % tp == 0, "model.vocab_size", f"{m.vocab_size} is not divisible by the tensor axis ({tp}); "
         f"{_divisible_fix(m.vocab_size, mesh, 'tensor')}")
    fsdp = mesh.get("fsdp", 1)
    need(m.d_model % fsdp == 0, "model.d_model",
         f"{m.d_model} is not divisible by the fsdp axis ({fsdp}); {_divisible_fix(m.d_model, mesh, 'fsdp')}")
    if m.moe is not None:
        for f in ("expert_mlp_dim", "shared_mlp_dim"):
            width = getattr(m.moe, f, 0) or 0
            need(width % tp == 0, f"model.moe.{f}",
                 f"{width} is not divisible by the tensor axis ({tp}); {_divisible_fix(width, mesh, 'tensor')}")
    need((problem := expert_axis_problem(m, mesh)) is None, "mesh.expert", problem)
    stages = mesh.get("stage", 1)
    # (read by the pipeline only: without one they were ignored in silence, where experiments.aot refuses them)
    need(stages > 1 or m.pipeline_microbatches == 1, "model.pipeline_microbatches",
         f"{m.pipeline_microbatches} microbatches need a pipeline, a mesh with a 'stage' axis (e.g. --mesh "
         "stage=2,...); without one use 1 (optim.grad_accum splits a step's batch into microbatches)")
    if stages > 1:  # the pipeline runs whole pattern periods (e.g. local + global layer) per stage
        from models.transformer import pattern_period

        period = pattern_period(m)
        need(not any(m.moe_layers()), "mesh.stage",
             "MoE layers are not supported under pipeline parallelism; use a mesh without a stage axis, or "
             "model.moe=none")
        need((m.n_layers // period) % stages == 0, "mesh.stage",
             f"model.n_layers={m.n_layers} (pattern period {period}) does not split into {stages} stages; use a "
             f"multiple of {period * stages} layers or fewer stages")
        need(micro % m.pipeline_microbatches == 0, "model.pipeline_microbatches",
             f"{m.pipeline_microbatches} must divide the {micro} rows of a (grad_accum) microbatch")
        pm = micro // m.pipeline_microbatches
        need(pm % shards == 0, "model.pipeline_microbatches",
             f"{m.pipeline_microbatches} pipeline microbatches of {micro} rows give {pm} rows each, not divisible "
             f"by the batch mesh axes {batch_axes} (= {shards}); use fewer microbatches or a larger train.batch")
        need(m.scan_layers, "model.scan_layers", "must be true under pipeline parallelism (the pipeline runs the "
             "scanned layer stack)")
        import jax

        others = {a: n for a, n in mesh.items() if a != "stage" and n > 1}
        need(not (m.dtype == "bfloat16" and others and jax.default_backend() == "cpu"), "model.dtype",
             f"bfloat16 pipeline parallelism with other mesh axes {others} aborts XLA:CPU; use float32 on CPU, or "
             "a mesh with 'stage' alone")
    return mesh
