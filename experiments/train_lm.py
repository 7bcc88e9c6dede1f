"""Train a decoder LM on the embedded corpus with orbax checkpoints and exact resume.

    python -m experiments.train_lm [--preset demo|tiny|llama7b|mixtral8x7b] [--set train.steps=50] [--lr 1e-3]
    python -m experiments.train_lm --init-from path/to/hf_folder --set data.tokenizer=...   # fine-tune it

The `demo` preset: a 4-layer Transformer with alternating sliding-window / global attention and MoE layers,
trained on the standard library's sources and docstrings (byte tokens + EOS) through the grain loader, on 8
fake CPU devices (data 2 × fsdp 4) when running on CPU. Writes under `train.out`: metrics.jsonl, tb/
(TensorBoard), ckpt/ (orbax: params, optimizer, step, RNG, loader state, config), loss.png, sample.txt.
Rerunning the same command resumes from the newest good checkpoint; SIGTERM / SIGINT save and exit 0 (before
the first step: nothing new to save). A second job on a `train.out` a running job holds is refused (data.run_lock).
Bad configuration exits with status 1 and one line naming the field, before anything compiles.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import operator
import os
import pathlib
import shlex
import shutil
import signal
import sys
import threading
import time

from data.cli import run_main
from experiments.run_log import (
    Logger,
    Stop,
    Throughput,
    config_changes,
    drop_records_after,
    moe_record,
    perplexity,
    plot_losses,
    segments,
    set_aside_logs,
    write_text_atomically,
)

CPU_DEVICES = 8  # fake CPU devices for the demo's FSDP mesh


def _setup_platform() -> str:
    """8 fake CPU devices, only when JAX will run on the CPU and nothing else was asked for: no accelerator
    plugin, JAX_PLATFORMS unset or 'cpu', no forced device count, backend not yet initialised. Returns a hint for a
    mesh refusal ('' if none): in a notebook or sweep that touched JAX before main() (an array, load_model) the
    backend already had its one CPU device, and the demo preset's mesh was refused naming no way out."""
    import jax
    from jax._src import xla_bridge

    wanted = os.environ.get("JAX_PLATFORMS", "")
    accel = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu",
                                                        "jax_rocm60_plugin", "jax_rocm7_plugin"))
    if (wanted in ("", "cpu") and not (accel and not wanted) and jax.config.jax_num_cpu_devices == -1
            and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
        elif jax.default_backend() == "cpu" and jax.device_count() == 1:
            return (f" (JAX was already in use in this process with one CPU device, so the {CPU_DEVICES} fake CPU "
                    f"devices the command line gets were not set up: in a notebook or script, run "
                    f"jax.config.update('jax_num_cpu_devices', {CPU_DEVICES}) before anything touches JAX, or pass "
                    f"e.g. --mesh fsdp=-1)")
    return ""


# ---- data -----------------------------------------------------------------------------------------------------


def sample_prompt(data, train) -> str:
    """The text the final sample continues: `train.sample_prompt`, else the built-in corpus's 'def __init__(self', else
    (your own tiers) the first five words of the first held-out document, a CJK character one word (a code prompt
    for any corpus read as noise)."""
    if train.sample_prompt is not None:
        return train.sample_prompt
    if data.train_dir is not None:
        import numpy as np

        from data.filters import tokens
        from data.loader import Source
        from data.shards import decode_doc, tier_shards
        from data.tokenizer import TOKENS_MAGIC
        from experiments.config import load_tokenizer

        # shard 0 may be empty (a cleaning shard that kept nothing)
        first = next(filter(None, (Source(f).first_record() for f in tier_shards(corpus_tiers(data)[1]))), None)
        if first is not None and first.startswith(TOKENS_MAGIC):  # a pretokenize output: ids, read back as text
            text = load_tokenizer(data).decode(np.frombuffer(first, np.int32, offset=len(TOKENS_MAGIC)))
        else:
            text = "" if first is None else decode_doc(first)["text"]
        end = 0
        # CJK-aware words from the first 4096 characters: split()'s first word was a whole Chinese document, a
        # prompt thousands of tokens past max_seq_len (the sample was that document, then one token)
        for w in tokens(text[:4096])[:5]:
            end = text.index(w, end) + len(w)
        if end:
            return " ".join(text[:end].split())
    return "def __init__(self"


def sample_ids(tok, text: str, sample_tokens: int, max_seq_len: int):
    """(prompt ids [P], new tokens n >= 1, prompt tokens cut) for the final sample: P + n - 1 <= max_seq_len, the
    positions fed within the trained context (the last new token is never fed back). The prompt starts as the loader
    starts every document: with the BOS, else (no BOS) the EOS that separates it from the previous one. A prompt
    longer than that keeps that first token and its last tokens (it ran past the context, and generate warned of
    positions past it)."""
    import numpy as np

    # training rows were [bos] text [eos], else [eos] text [eos] (data.loader.Tokenize): a prompt without that first
    # token was a context the model never saw a document start in
    first = getattr(tok, "bos_id", None)
    first = getattr(tok, "eos_id", None) if first is None else first
    head, body = ([] if first is None else [first]), tok.encode(text)
    cut = max(0, len(head) + len(body) - max_seq_len)
    ids = np.concatenate([head, body[cut:]]).astype(np.int32)
    return ids, max(1, min(sample_tokens, max_seq_len - len(ids))), cut


def corpus_tiers(spec) -> tuple[str, str]:
    """(train, held-out) tier directories: `spec.train_dir` / `spec.eval_dir` when given; else the embedded corpus
    as two ArrayRecord tiers (held-out: every n-th *module*, its source and its docstrings together: the
    docstrings repeat lines of the source, so splitting them would leak eval text into train), cached on disk."""
    if spec.train_dir is not None:
        return spec.train_dir, spec.eval_dir
    from data.corpus import stdlib_documents
    from data.shards import DocWriter, shard_name
    from experiments.config import cache_root

    root = pathlib.Path(cache_root(spec)) / (
        f"lm-corpus-v2-py{sys.version_info.major}{sys.version_info.minor}-{spec.max_files or 'all'}-"
        f"{spec.eval_every_nth}")  # v2: split by module (v1 split a module's source from its docstrings)
    # one build at a time in this process (`_CORPUS_BUILD`); other processes build in their own directory
    with _CORPUS_BUILD:
        if not (root / "done").exists():
            # built in a private directory and renamed into place: concurrent processes never see half a corpus
            tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
            writers = {"train": [DocWriter(tmp / "train" / f"{shard_name(i)}.array_record") for i in range(2)],
                       "eval": [DocWriter(tmp / "eval" / f"{shard_name(0)}.array_record")]}
            n = {"train": 0, "eval": 0}
            module = -1
            try:
                for doc in stdlib_documents(spec.max_files):
                    module += doc["kind"] == "code"  # each module: its source, then (if any) its docstrings
                    split = "eval" if module % spec.eval_every_nth == spec.eval_every_nth - 1 else "train"
                    ws = writers[split]
                    ws[n[split] % len(ws)].write({"id": doc["id"], "text": doc["text"]})
                    n[split] += 1
                for ws in writers.values():
                    for w in ws:
                        w.commit()
                (tmp / "done").write_text(json.dumps(n), encoding="utf-8")
            except BaseException:  # a failed build's directory was never removed (the next one builds anew)
                for w in (w for ws in writers.values() for w in ws):
                    w.abort()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                os.rename(tmp, root)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
    return str(root / "train"), str(root / "eval")


# Two sweep runs in one process's threads (a thread pool) both built the corpus in `<root>.tmp<pid>`: one renamed or
# removed the other's files (FileNotFoundError), and Python 3.11's ast.parse from two threads raised SystemError
_CORPUS_BUILD = threading.Lock()


# ---- metrics --------------------------------------------------------------------------------------------------


def peak_flops_per_device(model_dtype: str) -> tuple[float | None, str]:
    """Per-device peak FLOP/s for MFU: the datasheet value of a known accelerator (`scaling.hardware.device_peak`),
    or, on CPU, a matmul measured on this host at each call, i.e. once per run (the fake CPU devices share it, so MFU
    on CPU is over the whole host; runs in parallel threads measure it while the others train, inflating their MFU)."""
    import jax

    from scaling.hardware import device_peak, measure_cpu_peak

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_cpu_peak(n=512, repeats=3), "cpu (measured matmul)"
    return device_peak(dev.device_kind, model_dtype, jax.config.jax_default_matmul_precision)


# ---- the run --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """The command line (module docstring): parse and validate the config (exit 1 naming a bad field), then train."""
    # the SIGTERM / SIGINT handler first: installed just before the loop, a signal during the startup (importing
    # JAX, reading the data, restoring, building the model: ~6 s of the tiny preset) killed the run (status 143)
    # instead of stopping it in order; remembered from here, it stops the run before its first step (train)
    stop = Stop()
    try:
        return _main(argv, stop)
    finally:
        stop.restore()


def _main(argv, stop) -> dict:
    from experiments.config import ConfigError, load, validate

    try:
        cfg, refused = load(argv, __doc__), None
    except ConfigError as e:
        cfg, refused = None, f"config error: {e}"
    except SystemExit as e:  # argparse's: a bad flag (its usage is printed), or --help
        if not e.code:
            raise
        cfg, refused = None, e.code
    late_cpu = _setup_platform()
    import jax

    from parallel import AXES, make_mesh
    from parallel.distributed import any_process, check_batch_layout, check_same_settings, initialize

    try:
        several = initialize()  # multi-process jobs (TPU pods, SLURM, JAXSCALE_* env); a no-op for one process
    except ValueError as e:
        raise SystemExit(refused or f"config error: {e}") from None
    stop.reinstall()  # jax.distributed's preemption notifier took SIGTERM over (Stop.reinstall)
    # a command line one process refuses: the others waited in jax.distributed.initialize for it (300 s), or, a
    # setting validate() refuses, in the settings comparison (a Gloo time-out after 30 s): all exit together
    if (several and any_process(refused is not None)) or refused is not None:
        raise SystemExit(refused or "config error: another process refused its command line (its log names the "
                                    "field); start every process with the same command line")
    try:
        # compared before validate(): one process refusing a setting of its own left the others in a collective
        flat = {f"{section}.{k}": json.dumps(v, sort_keys=True)
                for section, fields in json.loads(cfg.to_json()).items() for k, v in fields.items()
                if f"{section}.{k}" not in PER_PROCESS_FIELDS}
        check_same_settings(flat, "settings")
        mesh_shape = validate(cfg, jax.device_count())
        n = jax.process_count()  # the command line has no make_mesh(dcn=): its axes nest in AXES's order
        check_batch_layout(make_mesh(mesh_shape), cfg.train.batch, cfg.train.seq,
                           hint=f"across {n} processes the outermost axis must split the batch (--mesh axes nest as "
                                f"{', '.join(AXES)}, outermost first), e.g. --mesh data={n},...")
    except (ConfigError, ValueError) as e:
        refused = f"config error: {e}" + (late_cpu if str(e).startswith("mesh") else "")
    # validate() reads each host's own disk (data.cache_dir, train.out, data.train_dir, train.init_from): one process
    # refusing its path left the others in their first collective, and itself in jax's shutdown, for good
    if (several and any_process(refused is not None)) or refused is not None:
        raise SystemExit(refused or "config error: another process refused its settings (its log names the field); "
                                    "every process needs the same settings and the paths they name")
    try:
        return train(cfg, mesh_shape, stop)
    except Exception:
        if several:  # raised before (or after) the training loop on one process: it hung both, as in the loop
            _exit_at_once()
        raise


def _exit_at_once() -> None:
    """End this process of a multi-process job now, its traceback printed: the others wait in a collective it will
    not join, and an orderly exit (closing the checkpoint manager, jax.distributed's shutdown) waits for them: both
    hung, heartbeats flowing. Ending now, the others' collective fails (or their heartbeat check stops them);
    resume from the newest checkpoint as after a crash."""
    import traceback

    import jax

    traceback.print_exc()
    print(f"process {jax.process_index()}: exiting at once so the job's other processes stop too",
          file=sys.stderr, flush=True)
    sys.stdout.flush()  # os._exit skips it: a job's log file (block-buffered) lost up to 8 KiB of log
    os._exit(1)


# Settings each process of a multi-process run may have its own of (a host's local cache, its progress bar); every
# other field must be the same on every process (`parallel.distributed.check_same_settings`).
PER_PROCESS_FIELDS = frozenset({"data.cache_dir", "train.progress"})
# How a model is executed, not which parameters it has: a run may resume with other values.
EXECUTION_FIELDS = frozenset({"attn_impl", "attn_block", "scan_layers", "scan_unroll", "remat", "swa_impl",
                              "swa_block", "pipeline_microbatches", "dtype", "matmul_impl"})
# What a Hugging Face config.json does not say (--init-from keeps the preset's): how the model runs, the training
# precision of its weights, and μP's base width (from_pretrained unfolds save_pretrained's readout fold by it; a
# --set model.mup_base_width was refused as another architecture: a μP export could only train on as standard)
KEPT_FROM_PRESET = tuple(sorted(EXECUTION_FIELDS | {"param_dtype", "mup_base_width"}))
MOE_EXECUTION_FIELDS = frozenset({"dispatch", "capacity_factor", "dropless_impl", "gmm_tile_rows"})
# How fresh weights are drawn, which a resumed run never does (it restores every parameter): not compared on resume.
# (An --init-from run saved before config_from_hf read config.json's initializer_range holds 0.02: its resume was
# refused against the folder's own value (e.g. 0.0417), which --init-from does not let one set back.)
INIT_ONLY_FIELDS = frozenset({"init_std"})
# ... of which these change what the model computes from the resumed step on (warned): capacity dispatch drops the
# tokens past an expert's capacity, bf16 compute rounds; the others only how it runs
WARNED_MODEL_FIELDS = (("dtype",), ("moe", "dispatch"), ("moe", "capacity_factor"))
# What defines the data stream: a saved loader state points into the stream these values made, not another one.
LOADER_FIELDS = (("train", "batch"), ("train", "seq"), ("train", "seed"), ("data", "max_files"), ("data", "corpus"),
                 ("data", "eval_every_nth"), ("data", "train_dir"), ("data", "tokenizer"), ("data", "eos_token"),
                 ("data", "bos_token"))
# The value a checkpoint saved before a field existed was made with (other missing fields: the current value).
# The data fields' None is what they mean unset (bytes, the stdlib corpus, '<|endoftext|>' or no EOS, no BOS), the
# stream those runs read: compared as the current value, a resume adding a BOS went on over another stream (the
# loader states of those checkpoints, before 2026-12-02, carry no stream key to refuse it either).
# ... of which these build the embedded stdlib corpus only: with the run's own data.train_dir (the same before and
# after) they choose nothing, and a resume that changed one was refused as "another data stream"
CORPUS_FIELDS = (("data", "max_files"), ("data", "corpus"), ("data", "eval_every_nth"))
SAVED_BEFORE_FIELD = {("data", "corpus"): "stdlib-v1", ("data", "train_dir"): None, ("data", "tokenizer"): None,
                      ("data", "eos_token"): None, ("data", "bos_token"): None}


RESUME_WARNINGS = (("data.", "evaluations average over other held-out batches from here on"),
                   ("model.", "the model computes differently from here on (capacity dispatch drops the tokens past "
                              "an expert's capacity; bf16 compute rounds)"),
                   ("train.eval_target", "the time to reach the target is measured afresh (against the run's start)"),
                   ("train.init_from", "the run continues from its checkpoint, not from these weights (a new --out "
                                       "starts from them)"),
                   # the same global batch in other micro-batches: not another optimizer (lm_step.make_state_step)
                   ("optim.grad_accum", "the same batch is cut into other micro-batches from here on: the updates "
                                        "differ by float rounding (and, with MoE, by the load-balancing loss, "
                                        "computed per micro-batch)"),
                   ("", "the LR schedule / optimizer differ from the saved run's from here on"))


def with_moe_execution(model, run):
    """`model` (the TransformerConfig a Hugging Face config.json gives) running its MoE as `run`'s does
    (MOE_EXECUTION_FIELDS), when both have one: as KEPT_FROM_PRESET, how it runs is the run's to set."""
    import dataclasses

    if model.moe is None or run.moe is None:
        return model
    return dataclasses.replace(model, moe=dataclasses.replace(
        model.moe, **{f: getattr(run.moe, f) for f in MOE_EXECUTION_FIELDS}))


def _model_defaults(key: str | None = None) -> dict:
    """The JSON defaults of TransformerConfig's fields (key 'moe' / 'rope_scaling': of that nested config's): what a
    run saved before a field existed computed with."""
    import dataclasses

    from models import RopeScaling, TransformerConfig
    from models.moe import MoEConfig

    cls = {None: TransformerConfig, "moe": MoEConfig, "rope_scaling": RopeScaling}[key]
    return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cls)
                                  if f.default is not dataclasses.MISSING}))


def model_config_mismatch(saved: dict, current: dict) -> list[str]:
    """Model fields (as in `TransformerConfig` JSON) whose saved value differs from the current one. Execution
    settings and INIT_ONLY_FIELDS (restored weights are not drawn again) do not count. A field added since the
    checkpoint was written counts as its default, the value that run computed with (so its default matches; another
    value, e.g. a local_rope_theta, which changes no parameter shape, is refused as any other field would be), in
    the nested configs (moe, rope_scaling) too."""
    out, defaults = [], _model_defaults()
    for k in sorted(set(saved) | set(current)):
        v = saved.get(k, defaults.get(k))
        cur = current.get(k, v)  # (a field since removed: not compared)
        if isinstance(v, dict) and isinstance(cur, dict):  # field by field: a rope_scaling saved before YaRN's fields
            skip = MOE_EXECUTION_FIELDS if k == "moe" else ()  # existed was refused whole
            nested = _model_defaults(k) if k in ("moe", "rope_scaling") else {}
            out += [f"{k}.{f}" for f in sorted(set(v) | set(cur)) if f not in skip
                    and cur.get(f, v.get(f, nested.get(f))) != v.get(f, nested.get(f))]
        elif k not in EXECUTION_FIELDS | INIT_ONLY_FIELDS and cur != v:
            out.append(k)
    return sorted(out)


def resume_mismatch(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's run config (RunConfig JSON) with this run's: (refused, warned), as lines
    'field: saved X, now Y'. Refused: model fields (other parameters) and the fields that define the data stream
    (the saved loader state would continue another stream). Warned: train.steps and optim.* (the LR schedule
    and optimizer change from the resumed step on, which may be intended, e.g. to train longer), train.init_from
    (another Hugging Face folder's weights are not loaded into a resumed run), and
    data.eval_batches / data.eval_dir (evaluations before and after average over different held-out batches)."""
    from experiments.config import PATH_FIELDS

    def line(*keys):
        before = None  # a model field added since the save: its default
        if keys[0] == "model" and (len(keys) == 2 or keys[1] in ("moe", "rope_scaling")):
            before = _model_defaults(*keys[1:2] if len(keys) == 3 else ()).get(keys[-1])
        was = _get(saved, *keys, default=SAVED_BEFORE_FIELD.get(keys, before))
        return f"{'.'.join(keys)}: saved {was!r}, now {_get(current, *keys)!r}"

    refused = [line("model", *k.split(".")) for k in model_config_mismatch(saved["model"], current["model"])]
    own_data = _get(current, "data", "train_dir") is not None and _same_path(
        _get(saved, "data", "train_dir", default=None), _get(current, "data", "train_dir"))

    def same(sec, k):  # a path field also spelled another way (./clean/augmented, absolute, a link): one directory
        was = _get(saved, sec, k, default=SAVED_BEFORE_FIELD.get((sec, k), _get(current, sec, k)))
        return (_same_path if f"{sec}.{k}" in PATH_FIELDS else operator.eq)(was, _get(current, sec, k))

    refused += [line(sec, k) for sec, k in LOADER_FIELDS
                if not (own_data and (sec, k) in CORPUS_FIELDS) and not same(sec, k)]
    warned = [line("train", "steps")] if saved["train"]["steps"] != current["train"]["steps"] else []
    warned += [line("model", *k) for k in WARNED_MODEL_FIELDS
               if _get(saved, "model", *k) is not None and _get(saved, "model", *k) != _get(current, "model", *k)]
    if _get(saved, "train", "eval_target") != _get(current, "train", "eval_target"):  # its crossing time restarts
        warned.append(line("train", "eval_target"))
    # weights are read only in a fresh run: a resumed one never sees another folder's (same architecture) weights
    if _get(saved, "train", "init_from") != _get(current, "train", "init_from"):
        warned.append(line("train", "init_from"))
    warned += [line("optim", k) for k, v in saved["optim"].items() if current["optim"].get(k, v) != v]
    # another held-out set: later eval losses (and the best checkpoint, eval_target) compare with other averages
    warned += [line("data", k) for k in ("eval_batches", "eval_dir") if not _same_path(_get(
        saved, "data", k, default=None), _get(current, "data", k)) and (k in saved.get("data", {}))]
    return refused, warned


EVAL_SET_PARTS = ("sources", "digests")  # the held-out loader's stream key parts that say which documents it holds


def eval_set_changes(meta: dict, held, saved: dict, current: dict) -> list[str]:
    """Warned lines (as `resume_mismatch`'s) for a held-out tier whose documents changed since the checkpoint
    `meta` was saved while `data.eval_dir` still names the same directory: the eval losses before and after (the
    best checkpoint, eval_target) then average other text. `held`: this run's held-out LMLoader; `meta["eval_stream"]`
    its key then (checkpoints saved before it was recorded: none, not compared). saved / current: the RunConfig JSONs.
    A shard edited in place (same size, count and ends) is named by its content digest (`data.shards.read_digest`)."""
    was = meta.get("eval_stream")
    if not isinstance(was, dict) or not _same_path(_get(saved, "data", "eval_dir", default=None),
                                                   _get(current, "data", "eval_dir")):  # (a new path: warned already)
        return []
    changes = held.stream_changes(was, EVAL_SET_PARTS)
    return [f"data.eval_dir: the held-out documents changed since the save ({'; '.join(changes)})"] if changes else []


def _same_path(saved, now) -> bool:
    """Equal values of a path field (`experiments.config.PATH_FIELDS`); two strings also when they name one file or
    directory from here (clean/augmented, ./clean/augmented, its absolute path or a link to it: a requeue that spelled
    the data directory another way was refused as another data stream). Other directories still differ."""
    if saved == now:
        return True
    return isinstance(saved, str) and isinstance(now, str) and os.path.realpath(saved) == os.path.realpath(now)


def best_given_up(ckpt_dir, keep: int) -> tuple[int, float] | None:
    """(step, eval loss) of the best checkpoint in `ckpt_dir` (the lowest eval loss orbax recorded while keep_best
    was on) if a run resumed with keep_best off deletes it at its next save: that save keeps only the newest `keep`
    steps, itself and the newest keep - 1 already there. None when no step was ranked, or the best is kept."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()) if ckpt_dir.is_dir() else []
    scored = []
    for s in steps:
        try:
            loss = json.loads((ckpt_dir / str(s) / "metrics" / "metrics").read_text(encoding="utf-8"))["eval_loss"]
        except (OSError, ValueError, KeyError, TypeError):  # no metrics (a save between evaluations): not ranked
            continue
        if isinstance(loss, int | float) and loss == loss:
            scored.append((loss, s))
    if not scored:
        return None
    loss, best = min(scored)
    return None if best in steps[max(0, len(steps) - (keep - 1)):] else (best, float(loss))


def skipped_line(skipped: dict[str, dict[str, int]]) -> str:
    """The run summary's line on documents the loaders left out (LMLoader.skipped of the train and held-out
    loaders, this process's), or "" when none was: 'no_target' ones (fewer than 2 tokens: a tokenizer without EOS,
    one-token documents) are in no batch, 'mixture_end' ones a finite mixture left unread."""
    why = {"no_target": "of fewer than 2 tokens, in no batch (no target: a tokenizer without EOS, one-token "
                        "documents; ByteTokenizer(add_eos=True) or data.pipeline's min_chars keeps every document)",
           "mixture_end": "left unread at a finite mixture's end"}
    reasons = dict.fromkeys(k for counts in skipped.values() for k in counts)
    parts = [f"{' and '.join(f'{c[k]:,} {split}' for split, c in skipped.items() if c.get(k))} documents "
             f"{why.get(k, k)}" for k in reasons if any(c.get(k) for c in skipped.values())]
    if not parts:
        return ""
    return f"data: skipped {'; '.join(parts)}"


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _optimizer(cfg):
    """(optimizer, schedule) of the run config."""
    from experiments.lm_step import make_optimizer, make_schedule

    m, o, t = cfg.model, cfg.optim, cfg.train
    optimizer = make_optimizer(o.lr, t.steps, o.warmup_steps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                               b1=o.b1, b2=o.b2, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
                               decay_frac=o.decay_frac, width_mult=m.width_mult)
    return optimizer, make_schedule(o.lr, t.steps, o.warmup_steps, o.schedule, o.min_lr_ratio, o.decay_frac)


def lr_change_line(saved_config: str, cfg, count: int) -> str | None:
    """The warning for a resume whose LR schedule (train.steps, optim.*) gives the next update (optimizer count
    `count`) another learning rate than the saved run's schedule did, naming both: a finished cosine run extended
    to 2N steps went on from its floor min_lr_ratio·lr at about half the peak, said only as "the LR schedule /
    optimizer differ". None when the two agree."""
    from experiments.config import RunConfig

    try:
        was = float(_optimizer(RunConfig.from_json(saved_config))[1](count))
    except (ValueError, TypeError, KeyError):  # a saved config this code no longer builds: nothing to compare
        return None
    now = float(_optimizer(cfg)[1](count))
    if math.isclose(was, now, rel_tol=1e-6, abs_tol=1e-12):
        return None
    return (f"warning: update {count + 1} takes lr {now:.4g} where the saved run's schedule gave {was:.4g}: the "
            f"schedule is rebuilt over train.steps={cfg.train.steps} (warmup, then {cfg.optim.schedule} to "
            f"{cfg.optim.min_lr_ratio}·lr at its last update), not continued from the saved one's")


def init_state(cfg, mesh):
    """The fresh train state on `mesh`. Returns (graphdef, optimizer, schedule, state)."""
    import jax
    from flax import nnx

    from experiments.lm_step import init_train_state
    from models import Transformer
    from parallel import create_sharded

    graphdef, params = create_sharded(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), mesh)
    optimizer, schedule = _optimizer(cfg)
    with jax.set_mesh(mesh):
        state = init_train_state(params, optimizer, cfg.train.seed)
    return graphdef, optimizer, schedule, state


def abstract_train_state(cfg, mesh):
    """`init_state`'s (graphdef, optimizer, schedule, state) with the state as ShapeDtypeStructs carrying its
    shardings: the restore target, so that resuming (or loading Hugging Face weights) never allocates a random
    state beside the one it reads (at scale, twice the train state's memory)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from experiments.aot import abstract_state
    from models import Transformer

    optimizer, schedule = _optimizer(cfg)
    graphdef, params, opt_state = abstract_state(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh)
    scalar = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))  # noqa: E731
    # init_train_state's; the raw key data of the default PRNG: uint32[2] threefry, [4] rbg (a fixed [2] refused to
    # resume every run under jax_default_prng_impl='rbg', as "does not fit: rng saved (4,), now (2,)")
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {"params": params, "opt_state": opt_state, "step": scalar((), jnp.int32),
             "skipped": scalar((), jnp.int32), "rng": scalar(rng.shape, rng.dtype)}
    return graphdef, optimizer, schedule, state


def init_from_hf(cfg, mesh, optimizer, shardings):
    """A fresh train state whose parameters are the Hugging Face checkpoint `cfg.train.init_from` (loaded straight
    onto `mesh`, one tensor at a time), placed as `shardings` (init_state's) say."""
    import jax
    from flax import nnx

    from experiments.lm_step import init_train_state
    from models.hf import from_pretrained

    m = cfg.model
    try:  # weights validate() cannot see without reading them (a truncated file, a non-zero o_proj bias)
        model = from_pretrained(cfg.train.init_from, mesh=mesh, **{k: getattr(m, k) for k in KEPT_FROM_PRESET})
    except (OSError, ValueError) as e:
        raise SystemExit(f"config error: train.init_from: {e}") from None
    if with_moe_execution(model.cfg, m) != m:  # validate() compared the configs; this is the model the weights built
        raise SystemExit(f"config error: train.init_from: {cfg.train.init_from} built another model than "
                         f"model ({model.cfg} vs {m})")
    with jax.set_mesh(mesh):
        state = init_train_state(nnx.split(model)[1], optimizer, cfg.train.seed)
    return jax.device_put(state, shardings)


def prng_mismatch(saved_impl: str | None, saved_shape,
                  what: str = "its random key data is of the saved implementation") -> str | None:
    """Why a checkpoint's raw key data (state["rng"]) cannot resume under this process's jax_default_prng_impl, or
    None. A train step reads it with the default implementation: threefry data under rbg failed in the first step
    with jax's bare "invalid PRNG key data". saved_impl: the meta's name (None before it was saved: then
    `saved_shape()`, the saved data's shape, tells threefry's [2] from rbg's [4]; None: no key saved). what: why
    the implementation matters to this checkpoint (experiments.train_video saves no key: its stream would differ)."""
    import jax

    now = jax.config.jax_default_prng_impl
    if saved_impl is None:
        shape = saved_shape()
        if shape is None or tuple(shape) == jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape:
            return None
        saved_impl = {(2,): "threefry2x32", (4,): "rbg"}.get(tuple(shape))
        if saved_impl is None:
            return f"its random key data is uint32{list(shape)}, of no jax PRNG implementation this run knows"
    if saved_impl == now:
        return None
    return (f"it was saved under jax_default_prng_impl={saved_impl!r}, this run's is {now!r} ({what}); resume under "
            f"the saved one: JAX_DEFAULT_PRNG_IMPL={saved_impl} in the environment, or "
            f"jax.config.update('jax_default_prng_impl', {saved_impl!r}) before training")


def _spread(shape, mesh):
    """A sharding of `shape` over all of `mesh`'s devices: its first dimension they divide, else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    i = next((i for i, n in enumerate(shape) if n % mesh.size == 0), None)
    return NamedSharding(mesh, P() if i is None else P(*[None] * i, mesh.axis_names))


def held_out_loss(eval_fn, params, batches) -> float:
    """Mean held-out loss of `params` over `batches`: eval_fn(params, batch) -> (nll_sum, weight_sum)
    (`lm_step.make_eval_sums`), summed over the batches, then divided (an exact mean). Each batch's sums are
    fetched before the next is dispatched: all dispatched at once (data.eval_batches=50 on 8 fake CPU devices of a
    2-core host), XLA:CPU's all-gather rendezvous timed out with one device's thread missing and aborted the run."""
    nll, n = 0.0, 0.0
    for b in batches:  # (the same additions in the same order as summing the fetched lists: the same float)
        s, w = eval_fn(params, b)
        nll, n = nll + float(s), n + float(w)
    return float(nll / n)


def load_model(out, step: int | None = None, mesh_shape: dict | None = None, log=None):
    """(model, RunConfig) of a run's newest good checkpoint (or `step`): for sampling, evaluation or
    `models.hf.save_pretrained` (for the layouts a HF architecture has). Read-only: a checkpoint that does not read
    back is reported through `log` (default: stderr) and the next older one is tried, but nothing is moved (a
    training job may be using the directory). The model lives on `mesh_shape` over the first devices it needs
    (default: one device; call it from one process); the optimizer state is restored with it (the checkpoint is
    verified whole) and dropped. Decode with `experiments.config.load_tokenizer(cfg.data)`: `log` says when the file at
    data.tokenizer is not the tokenizer the run trained with (retrained in place, or a relative path read elsewhere).

        model, cfg = load_model("runs/demo")
        ids = models.generate(model, prompt_ids, 64)
    """
    import math
    import numbers
    import sys

    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from experiments.checkpoint import CheckpointMismatch, Checkpoints, _step_number
    from experiments.config import RunConfig
    from parallel import make_mesh

    log = log or (lambda msg: print(msg, file=sys.stderr))
    # a step "8" (from sys.argv) was "no step 8 ...; saved steps: [4, 8, 12]", and 8.0 "step 8.0's meta does not read"
    step = None if step is None else _step_number(step, "load_model")
    shape = mesh_shape or {"fsdp": 1}
    # whole sizes >= 1 take the first devices they need; any other shape (a -1 to fill; 0, 2.0 or the CLI's "fsdp=2",
    # which failed here as "devices is empty", a slice TypeError or an AttributeError) goes whole to make_mesh, which
    # fills the -1 or names what is wrong
    sizes = list(shape.values()) if isinstance(shape, dict) else []
    whole = sizes and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in sizes)
    mesh = make_mesh(shape, devices=jax.devices()[:math.prod(sizes)] if whole else None)
    ckpt = Checkpoints(pathlib.Path(out) / "ckpt", keep_best=False, async_save=False, log=log, read_only=True)
    try:
        steps = sorted(ckpt.steps(), reverse=True)
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no step {step} under {pathlib.Path(out) / 'ckpt'}; saved steps: "
                                    f"{sorted(steps) or 'none'}")
        steps = steps if step is None else [step]
        for s in steps:
            try:
                meta = ckpt.mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                cfg = RunConfig.from_json(meta["config"])
            except Exception as e:  # noqa: BLE001 - an unreadable meta: the next older step
                log(f"load_model: step {s}'s meta does not read ({type(e).__name__}: {e}); trying an older step")
                continue
            graphdef, _, _, template = abstract_train_state(cfg, mesh)
            try:  # the key is dropped: read as saved, whichever jax_default_prng_impl saved it ([4] under rbg)
                saved_rng = ckpt.mgr.item_metadata(s)["state"].tree["rng"]
                template["rng"] = jax.ShapeDtypeStruct(tuple(saved_rng.shape), template["rng"].dtype,
                                                       sharding=template["rng"].sharding)
            except Exception:  # noqa: BLE001 - unreadable: the restore below reports it and tries an older step
                pass
            try:
                restored = ckpt.restore(template, s, quarantine=False)
            except CheckpointMismatch:  # the optimizer state, read only to be verified, has another layout (a μP
                # run saved before the weight decay fix of 2026-12-04): the params alone, by their own checksum
                if isinstance(meta.get("part_fingerprints"), dict):
                    restored = ckpt.restore({"params": template["params"]}, s, quarantine=False)
                else:  # saved before part checksums (2026-12-03): the whole state is verified, the optimizer
                    # state read in its saved layout, each array split over every device (replicated, each held
                    # the whole Adam state, 2x the params in float32)
                    template["opt_state"] = jax.tree.map(lambda v: jax.ShapeDtypeStruct(
                        tuple(v.shape), v.dtype, sharding=_spread(v.shape, mesh)),
                        ckpt.mgr.item_metadata(s)["state"].tree["opt_state"])
                    restored = ckpt.restore(template, s, quarantine=False)
            if restored is not None:
                if s != steps[0]:
                    log(f"load_model: using step {s} of {pathlib.Path(out) / 'ckpt'}")
                _check_tokenizer(pathlib.Path(out) / "ckpt" / str(s), cfg.data, log)
                return nnx.merge(graphdef, restored[0]["params"]), cfg
    finally:
        ckpt.close()
    raise FileNotFoundError(f"no readable checkpoint{'' if step is None else f' at step {step}'} under "
                            f"{pathlib.Path(out) / 'ckpt'}")


def _check_tokenizer(step_dir: pathlib.Path, data, log) -> None:
    """Say when `load_tokenizer(data)` (what a load_model caller decodes with: the file at data.tokenizer now, a
    relative path read from the working directory) is not the tokenizer the run trained with, by the fingerprint
    its loader state holds: a tok.json retrained in place decoded the run's ids to other text, silently (a resume
    refuses it; sampling, evaluation and export did not)."""
    if data.tokenizer is None:  # bytes + EOS: nothing read from a file
        return
    from experiments.config import load_tokenizer

    try:
        state = json.loads(next((step_dir / "loader").glob("process_0-of-*.json")).read_text(encoding="utf-8"))
        saved = state["stream"]["tokenizer"]
    except Exception:  # noqa: BLE001 - no loader state of this layout (an older save): nothing to compare with
        return
    try:
        tok = load_tokenizer(data)
    except FileNotFoundError:  # its own advice ("train one") would decode the run's ids to other text
        where = os.path.abspath(os.path.expanduser(data.tokenizer))
        log(f"load_model: data.tokenizer={data.tokenizer!r} is not there ({where}: a relative path is read from the "
            "working directory); decode this run's ids with the tokenizer file it trained with")
        return
    except Exception as e:  # noqa: BLE001 - the weights load anyway (an export needs no tokenizer)
        log(f"load_model: data.tokenizer={data.tokenizer!r} does not load here ({type(e).__name__}: {e}); decode "
            "this run's ids with the tokenizer file it trained with")
        return
    now = getattr(tok, "fingerprint", None) or f"vocab {tok.vocab_size}"
    if now != saved:
        log(f"load_model: the tokenizer at data.tokenizer={data.tokenizer!r} is not the one this run trained with "
            f"(fingerprint {now}, trained with {saved}): its ids would decode to other text; load the run's own "
            "tokenizer file (a relative path is read from the working directory)")


def train(cfg, mesh_shape: dict, stop: Stop | None = None) -> dict:
    """Train `cfg` (a validated RunConfig) on a mesh of `mesh_shape`, resuming from its newest good checkpoint;
    returns a summary: out dir, step, first / last eval loss, wall time, a generated sample, ... stop: the
    SIGTERM / SIGINT handler (`run_log.Stop`, installed by main before anything else; restored on return): a
    signal before the first step stops the run there, one later after the step it arrives in (saved); None:
    one installed here."""
    if stop is None:  # restored however train ends: a refusal before the loop (whose `finally` restores it too)
        stop = Stop()  # left it installed, and a first Ctrl-C in the caller's session was only remembered
        try:
            return train(cfg, mesh_shape, stop)
        finally:
            stop.restore()
    import jax

    from data.run_lock import DirLocked, RunLock
    from parallel.distributed import any_process, is_primary

    # one job per train.out (data.run_lock), refused before reading data or compiling: a second job on it (a double
    # launch, a requeue while the first still runs) mixed checkpoints and logs silently. The primary alone locks
    # (the job's other processes write there by design); every process stops at its refusal
    lock, refused = None, None
    if is_primary():
        try:
            lock = RunLock(pathlib.Path(cfg.train.out).absolute(), "experiments.train_lm")
        except DirLocked as e:
            refused = f"train.out: {e}"
    if (jax.process_count() > 1 and any_process(refused is not None)) or refused is not None:
        raise SystemExit(refused or "train.out: process 0 found it in use by another job (its log names it)")
    try:
        return _train(cfg, mesh_shape, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, mesh_shape: dict, stop: Stop) -> dict:
    """`train` under the run directory's lock."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from data.loader import LMLoader, LoaderConfig, Source
    from experiments.checkpoint import (
        CheckpointMismatch,
        Checkpoints,
        CheckpointSaveFailed,
        NonFiniteState,
        mesh_axes,
        other_mesh_note,
    )
    from experiments.config import load_tokenizer
    from experiments.lm_step import make_eval_sums, make_state_step
    from models import generate
    from parallel import make_mesh
    from parallel.distributed import any_process, check_same_settings, check_shared_dir, is_primary
    from scaling.flops import train_flops_per_token

    t_start = time.time()
    m, o, t = cfg.model, cfg.optim, cfg.train
    primary = is_primary()
    out = pathlib.Path(t.out).absolute()
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    try:  # checkpoints are written by every process into one directory
        check_shared_dir(out, "train.out")
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    # tqdm.write: a message printed while the progress bar is drawn lands on the bar's line (tqdm.write clears the
    # bar, writes the line, redraws the bar; with no bar open it prints)
    say = tqdm.write if primary else (lambda *a, **k: None)
    mesh = make_mesh(mesh_shape)
    tok = load_tokenizer(cfg.data)

    train_dir, eval_dir = corpus_tiers(cfg.data)
    loader = LMLoader([Source(train_dir)], tok, LoaderConfig(seq_len=t.seq, global_batch_size=t.batch, seed=t.seed),
                      mesh=mesh)
    held = LMLoader([Source(eval_dir)], tok, LoaderConfig(seq_len=t.seq, global_batch_size=t.batch, shuffle=False,
                                                          num_epochs=1), mesh=mesh)
    # each process reads its own host's copy of the data (and tokenizer): one host with other files (a stale copy, a
    # tier cleaned again) trained on silently, each process on its own documents. Compared as the loaders know them
    # (shard sizes, record counts, content digests; not where they are)
    own = cfg.data.train_dir is not None  # else the built-in corpus, built from each host's Python stdlib
    try:
        check_same_settings({f"{name} {k}": json.dumps(ld.stream.get(k), sort_keys=True)
                             for name, ld in zip(("data.train_dir", "data.eval_dir") if own else
                                                 ("built-in corpus train", "built-in corpus eval"), (loader, held))
                             for k in ("sources", "digests", "tokenizer")}, "data",
                            "every host needs the same files there (and at data.tokenizer): copy them from process "
                            "0's host" if own else "the built-in corpus is each host's Python standard library: run "
                            "one Python installation's copy on every host, or train from data.train_dir / "
                            "data.eval_dir")
    except ValueError as e:
        loader.close()
        held.close()
        raise SystemExit(f"config error: {e}") from None
    eval_batches = list(itertools.islice(held, cfg.data.eval_batches))  # the same held-out rows every time
    held.close()
    held_skipped = held.skipped  # documents of the held-out text read that no eval batch holds (said at the end)
    if len(eval_batches) < cfg.data.eval_batches:  # a repeating loader would count part of the held-out text twice
        loader.close()
        if not eval_batches:  # "use at most 0" named a value validate() refuses: the batch is what must shrink
            rows = held.dropped["rows"]
            raise SystemExit(f"config error: train.batch: the held-out tier {eval_dir} fills {rows} "
                             f"row{'s' * (rows != 1)} of {t.seq} tokens, less than one batch of {t.batch}×{t.seq} "
                             "(evaluation needs one); use a smaller train.batch or train.seq, or more held-out text "
                             "(data.eval_dir, or a lower data.eval_every_nth)")
        raise SystemExit(f"config error: data.eval_batches={cfg.data.eval_batches}: the held-out tier {eval_dir} "
                         f"fills only {len(eval_batches)} batch{'es' * (len(eval_batches) != 1)} of {t.batch}×{t.seq}; "
                         "use at most that many")

    # the held-out text the eval losses average: the first eval_batches × train.batch rows of the tier, so it grows
    # with train.batch / train.seq (and is another share of documents per process): said, to compare runs by it
    # (the batches are global arrays: on several processes each sum is the whole run's, every process joining it)
    eval_targets = int(sum(float(jnp.sum(b["weights"])) for b in eval_batches))
    graphdef, optimizer, schedule, state = abstract_train_state(cfg, mesh)  # allocated below, once we know how
    shardings = jax.tree.map(lambda x: x.sharding, state)

    ckpt = Checkpoints(out / "ckpt", keep=t.keep, keep_best=t.keep_best, async_save=t.async_save, log=say)

    def check(meta):  # runs on the saved meta before any array is read
        refused, warned = resume_mismatch(json.loads(meta["config"]), json.loads(cfg.to_json()))
        if refused:  # before the step count: another preset's run dir is past it too, and more steps would not do
            raise CheckpointMismatch(
                f"train.out: {out / 'ckpt'} (step {meta['step']}) was saved with other settings ({'; '.join(refused)})"
                "; use a new --out, or the settings it was saved with")
        if int(meta["step"]) > t.steps:  # it would report a longer-trained model under this run's name
            raise CheckpointMismatch(
                f"train.steps: {out / 'ckpt'} is at step {meta['step']}, past train.steps={t.steps}; pass "
                f"--set train.steps={meta['step']} (or more) to resume it, or a new --out")
        # μP's 1/m moved inside AdamW (make_optimizer): the state saved before has the layout [clip, adamw, 1/m]
        if m.width_mult != 1.0 and len(ckpt.mgr.item_metadata(int(meta["step"]))["state"].tree["opt_state"]) == 3:
            raise CheckpointMismatch(
                f"train.out: {out / 'ckpt'} (step {meta['step']}) holds a μP optimizer state saved before the weight "
                "decay fix of 2026-12-04 (hidden matrices now decay lr·weight_decay per update, were "
                "lr·weight_decay/m), whose layout this code does not read; use a new --out (load_model still reads "
                "its model)")
        if why := prng_mismatch(meta.get("prng_impl"), lambda: getattr(
                ckpt.mgr.item_metadata(int(meta["step"]))["state"].tree.get("rng"), "shape", None)):
            raise CheckpointMismatch(f"train.out: {out / 'ckpt'} (step {meta['step']}): {why}")
        # said once the step is restored: a newest step found corrupt after this check falls back to an older one,
        # whose check printed every warning a second time
        changed[int(meta["step"])] = config_changes(json.loads(meta["config"]), json.loads(cfg.to_json()))
        warned += eval_set_changes(meta, held, json.loads(meta["config"]), json.loads(cfg.to_json()))
        warnings[int(meta["step"])] = [f"warning: resuming step {meta['step']} with a changed {w}: "
                                       f"{next(v for k, v in RESUME_WARNINGS if w.startswith(k))}" for w in warned]
        # keep_best turned off: LatestN alone deletes the step BestN kept, at the next save, silently
        if json.loads(meta["config"])["train"].get("keep_best", True) and not t.keep_best and (
                lost := best_given_up(out / "ckpt", t.keep)):
            warnings[int(meta["step"])].append(
                f"warning: resuming step {meta['step']} with train.keep_best off (saved on): the best checkpoint, "
                f"step {lost[0]} (eval loss {lost[1]:.4f}), is deleted at the next save (train.keep={t.keep}: only "
                f"the newest {t.keep} are kept); --set train.keep_best=True keeps it, or copy "
                f"{out / 'ckpt' / str(lost[0])} aside first")

    warnings: dict[int, list[str]] = {}
    changed: dict[int, list[str]] = {}  # each checked step's config changes, for the run's segment history

    try:
        with jax.set_mesh(mesh):  # as the saves are: the checksum's jit is keyed on the mesh context (one program)
            restored = ckpt.restore(state, check=check, loader=loader)
    except CheckpointMismatch as e:
        ckpt.close()
        loader.close()
        raise SystemExit(f"config error: {e}") from None
    start = 0
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        for w in warnings.get(start, []):
            say(w)
        if lr_line := lr_change_line(meta["config"], cfg, start - int(state["skipped"])):
            say(lr_line)
        say(f"resumed from step {start} ({out / 'ckpt' / str(start)})" + other_mesh_note(meta, mesh, m.dtype))
    elif t.init_from is not None:
        state = init_from_hf(cfg, mesh, optimizer, shardings)
        say(f"initialised from {t.init_from} (Hugging Face weights)")
    else:
        state = jax.device_put(init_state(cfg, mesh)[3], shardings)  # (the same placement: no copy)

    n_params = m.param_count()
    fpt = train_flops_per_token(m, t.seq)
    peak, peak_src = peak_flops_per_device(m.dtype)
    n_mfu_devices = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
    say(f"model: {n_params:,} params ({'MoE' if m.moe else 'dense'}, windows {m.layer_windows()}); mesh "
        f"{dict(mesh.shape)}; batch {t.batch}×{t.seq}; steps {start}→{t.steps}; peak {peak_src} "
        f"{(peak or 0) / 1e9:,.1f} GFLOP/s; eval over {eval_targets:,} held-out targets ({len(eval_batches)} "
        f"batch{'es' * (len(eval_batches) != 1)} of {t.batch}×{t.seq})")

    step_fn = make_state_step(graphdef, optimizer, schedule, m.moe, o.grad_accum, shardings)
    eval_fn = make_eval_sums(graphdef, o.grad_accum)  # eval's memory: a training microbatch's, not the batch's
    if restored is None and primary and (stamp := set_aside_logs(out)):  # a run that never saved: not ours to extend
        say(f"note: {out} held the logs of a run with no checkpoint; moved aside as *.{stamp}")
    log = Logger(out, primary)
    if restored is not None:  # the steps after the checkpoint replay: their earlier events and records are stale
        log.resume(start)
        drop_records_after(log, None, start)
        # and a segment record at `start` itself is an earlier attempt's from this checkpoint, whose steps all replay
        # (`segments` leaves it out of the meta too): kept, an attempt killed before its first save, or stopped
        # before its first step, stayed in the log with the settings it changed, which no saved step was trained at
        drop_records_after(log, "segment", start - 1)
    # who made each segment (command, commit, versions, devices) and what a resume changed: saved with every
    # checkpoint, as the config alone is the newest segment's (a rerun at the last step trains nothing: no segment)
    segs = segments(meta if restored is not None else None, start, changed.get(start, []))
    if start < t.steps:
        log.write({"kind": "segment", "step": start, "segment": segs[-1]})

    def evaluate(params):
        return held_out_loss(eval_fn, params, eval_batches)

    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", disable=not (t.progress and primary),
               dynamic_ncols=True)
    first_eval = last_eval = target_time = None
    if restored is not None:  # checkpoints from before these were saved have none
        first_eval, target_time = meta.get("first_eval"), meta.get("target_time_s")
        if json.loads(meta["config"])["train"].get("eval_target") != t.eval_target:  # another target's crossing
            target_time = None
        last_eval = meta.get("eval_loss")
        # the saved clock goes on from this process's start, as a fresh run's from its own: a resume's startup
        # (restoring the checkpoint, which takes minutes at scale) was left out of wall_s and target_time_s
        t_start -= meta.get("wall_s", 0.0)
    halted, halt_why, save_failed = None, "nan_policy=halt", None
    window = Throughput()

    def target_crossed(at: int, loss: float) -> str:  # the eval target's first crossing: logged, and said
        nonlocal target_time
        if t.eval_target is None or target_time is not None or not loss <= t.eval_target:  # (NaN: not crossed)
            return ""
        target_time = time.time() - t_start
        log.write({"kind": "target", "step": at, "eval_target": t.eval_target, "wall_s": target_time})
        return f"; reached eval target {t.eval_target} after {target_time:.0f} s"

    def evaluated(at: int) -> float:  # the held-out loss of the current parameters at step `at`: logged and said
        with window.exclude():  # evaluation time is not training throughput
            loss = evaluate(state["params"])
        log.write({"kind": "eval", "step": at, "loss": loss, "ppl": perplexity(loss), "wall_s": time.time() - t_start})
        say(f"step {at}: eval loss {loss:.3f} (ppl {perplexity(loss):.4g})" + target_crossed(at, loss))
        return loss

    step, stopped = start, False
    try:
        with jax.set_mesh(mesh):
            # a signal during the startup (main installs the handler first): stop before training, with nothing new
            # to save; every process at once (they agree here, as after each step)
            if any_process(stop.signal is not None):
                stopped = True
                say(f"{stop.signal or 'SIGTERM on another process'} before the first step: nothing new to save "
                    f"({f'the run resumes from step {start}' if start else 'nothing trained'}); exiting")
            elif start == 0:
                # a fine-tuned checkpoint may start past the target: its crossing is step 0, not the next eval's
                first_eval = last_eval = evaluated(0)
            elif start == t.steps and last_eval is None:
                # resumed at its last step from a save made between evaluations (a SIGTERM stop; save_every off
                # eval_every), rerun with train.steps at that step: the evaluation at train.steps that ends every
                # other run was never made, and the summary had no eval loss
                last_eval = evaluated(start)
            for step in (() if stopped else range(start + 1, t.steps + 1)):
                batch = next(loader)
                if step in t.poison_steps:  # test hook: a NaN batch weight poisons loss and gradients
                    batch = dict(batch, weights=batch["weights"] * jnp.nan)
                compiling = step == start + 1  # this process's first step compiles: not training throughput
                with window.exclude() if compiling else contextlib.nullcontext():
                    state, mt = step_fn(state, batch)
                    mt = jax.device_get(mt)
                now = time.time()
                if not compiling:
                    window.step(t.batch * t.seq)
                bar.update(1)
                if not mt["finite"]:
                    skipped = int(state["skipped"])
                    # the norm is optax's float32 sum of squares (clip_by_global_norm's, which zeroes such an
                    # update): finite gradients with a norm over ~1.8e19 overflow it to inf and are skipped too
                    say(f"step {step}: non-finite loss ({mt['loss']}) or gradient norm ({mt['grad_norm']}; a norm "
                        "over ~1.8e19 overflows float32); "
                        f"{'halting' if t.nan_policy == 'halt' else 'step skipped'} ({skipped} skipped so far)")
                    log.write({"kind": "nonfinite", "step": step, "policy": t.nan_policy, "skipped": skipped})
                    if t.nan_policy == "halt":
                        halted = step
                        break
                elif not mt["tokens"]:  # (lm_step keeps the state: nothing to learn from, not a divergence)
                    say(f"step {step}: no target in the batch has weight > 0; step skipped "
                        f"({int(state['skipped'])} skipped so far)")
                    log.write({"kind": "empty", "step": step, "skipped": int(state["skipped"])})
                if step % t.log_every == 0 or step == t.steps:
                    tps, step_time = window.report(now)
                    rec = {"kind": "train", "step": step, "loss": float(mt["loss"]),
                           "ppl": perplexity(float(mt["loss"])), "grad_norm": float(mt["grad_norm"]),
                           "lr": float(mt["lr"]), "tokens_per_s": tps, "step_time_s": step_time,
                           "skipped": int(state["skipped"]), "wall_s": now - t_start}
                    if peak and tps is not None:
                        # not scaling.mfu, which refuses > 1 (a unit slip): a noisy window over a measured CPU
                        # peak may pass it, and a logged metric must never stop a run
                        rec["mfu"] = tps * fpt / (n_mfu_devices * peak)
                    rec.update(moe_record(mt))
                    log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", gnorm=f"{rec['grad_norm']:.2f}",
                                    tok_s="-" if tps is None else f"{tps:,.0f}")
                eval_loss = None
                if step % t.eval_every == 0 or step == t.steps:
                    eval_loss = last_eval = evaluated(step)
                    # the step's own loss and gradient norm were finite (they are the parameters' before its
                    # update), but the parameters it made compute NaN / inf: saved, this step was the "newest good
                    # checkpoint" the halt named, from which every step is non-finite again
                    if t.nan_policy == "halt" and not math.isfinite(eval_loss):
                        say(f"step {step}: non-finite eval loss ({eval_loss}): the parameters of this step diverged; "
                            "halting before its save")
                        log.write({"kind": "nonfinite", "step": step, "policy": t.nan_policy, "eval_loss": eval_loss,
                                   "skipped": int(state["skipped"])})
                        halted = step
                        break
                # SIGTERM may reach the processes of a job at different steps: all stop at the same one, or the
                # ones still stepping would wait forever in a collective for those saving
                stopping = any_process(stop.signal is not None)
                if step % t.save_every == 0 or step == t.steps or stopping:
                    with window.exclude():
                        log.flush()
                        # the run's clock and first results travel with it, so a resumed run does not restart them
                        ckpt.save(step, state, {"config": cfg.to_json(), "wall_s": time.time() - t_start,
                                                "first_eval": first_eval, "target_time_s": target_time,
                                                "prng_impl": jax.config.jax_default_prng_impl,
                                                "mesh": mesh_axes(mesh), "segments": segs,
                                                # which held-out documents the eval losses average (eval_set_changes)
                                                "eval_stream": {k: v for k, v in held.stream.items()
                                                                if k in EVAL_SET_PARTS}},
                                  eval_loss, loader=loader)
                    if t.kill_at == step and t.kill_in_save:  # test hook: die while the async save writes
                        os.kill(os.getpid(), signal.SIGKILL)
                if t.kill_at == step:  # test hook: die right after this step
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping:
                    say(f"{stop.signal or 'SIGTERM on another process'}: saved step {step}; exiting")
                    stopped = True
                    break
    except CheckpointSaveFailed as e:  # a full disk: said in one line below, not as orbax's writer traceback
        if jax.process_count() > 1:
            _exit_at_once()
        save_failed = e
    except NonFiniteState as e:
        say(str(e))
        halted, halt_why = step, "a non-finite state is never saved"  # under either nan_policy
    except Exception:
        if jax.process_count() > 1:  # before the cleanup below, which would wait for the others
            _exit_at_once()
        raise
    finally:
        bar.close()
        try:  # still under the handler: a (second) SIGTERM while the last async save finishes had killed the run
            ckpt.close()  # (143), the save left a temporary folder; a second Ctrl-C still aborts the wait
        except CheckpointSaveFailed as e:  # the last save's failure, which orbax raises at this wait
            save_failed = save_failed or e
        finally:
            stop.restore()
        saved_steps = ckpt.steps()
        skipped_docs = {"train": loader.skipped, "held-out": held_skipped}
        loader.close()
        try:  # the full disk that failed a save fails closing the logs too: said, not raised over the save's line
            log.close()
        except OSError as e:
            if save_failed is None:
                raise
            print(f"the logs could not be closed either ({e})")

    unit = "byte" if cfg.data.tokenizer is None else "token"  # the plot's loss unit (a BPE's were labelled bytes)
    result = {"out": str(out), "step": step, "first_eval": first_eval, "last_eval": last_eval,
              "skipped": int(state["skipped"]), "target_time_s": target_time, "wall_s": time.time() - t_start,
              "documents_skipped": skipped_docs, "eval_targets": eval_targets}
    if save_failed is not None:  # (before the plot, which a full disk refuses too)
        raise SystemExit(str(save_failed))
    if primary:  # every exit with metrics on disk plots them: a halted or stopped run's curve is the one to look at
        plot = plot_losses(out, unit)
        if line := skipped_line(skipped_docs):  # the loader's warning went by once, among the startup's lines
            say(line)
    if halted is not None:
        good = saved_steps
        raise SystemExit(f"halted at step {halted} ({halt_why}); newest good checkpoint: "
                         f"{good[-1] if good else 'none'} in {out / 'ckpt'}")
    # `stopped`, not this process's signal: a process stopped by another's signal at train.steps went on to the
    # sample's gather, which the signalled one never joined
    if stopped or step < t.steps or t.sample_tokens < 1:
        if primary:
            say(f"outputs in {out}: metrics.jsonl, tb/, ckpt/ (steps {saved_steps}), {plot.name}")
        return result

    # generated sample from the final parameters, on one device (gathered from every process: device_get cannot
    # fetch arrays that span other processes' devices)
    from jax.experimental import multihost_utils

    model = nnx.merge(graphdef, multihost_utils.process_allgather(state["params"], tiled=True))
    prompt_ids, n_new, cut = sample_ids(tok, sample_prompt(cfg.data, t), t.sample_tokens, m.max_seq_len)
    if cut:
        say(f"sample: the prompt is longer than model.max_seq_len={m.max_seq_len}: its first {cut} "
            f"token{'s are' if cut != 1 else ' is'} cut")
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
    ids = generate(model, prompt, n_new, temperature=0.7, top_p=0.95, rng=jax.random.key(t.seed),
                   eos_id=tok.eos_id)  # a document ends there
    sample = tok.decode(np.asarray(ids[0]))
    result["sample"] = sample
    if primary:
        write_text_atomically(out / "sample.txt", sample)  # as every other output: a cut write leaves none
        say("sample:\n" + sample)
        if first_eval is not None and last_eval is not None:  # (None: a checkpoint saved before first_eval was)
            say(f"eval loss {first_eval:.3f} → {last_eval:.3f} (ppl {perplexity(first_eval):.4g} → "
                f"{perplexity(last_eval):.4g}) in {result['wall_s']:.0f} s")
        say(f"outputs in {out}: metrics.jsonl, tb/ (tensorboard --logdir {shlex.quote(str(out / 'tb'))}), ckpt/ (steps "
            f"{saved_steps}), {plot.name}, sample.txt")
    return result


if __name__ == "__main__":
    run_main(main)
