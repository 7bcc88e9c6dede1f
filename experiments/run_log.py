"""A training run's bookkeeping: metrics to JSONL + TensorBoard, the loss plot, throughput windows, and a clean stop
on SIGTERM / SIGINT (used by experiments.train_lm and experiments.train_video)."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time


def set_aside_logs(out: pathlib.Path) -> str | None:
    """Move the metrics.jsonl and tb/ of an earlier run in `out` to `<name>.prev-<time>` (call when starting fresh:
    appended to, they would mix two runs' curves in the logs and the plot). Returns the suffix, None if none."""
    names = [n for n in ("metrics.jsonl", "tb") if (out / n).exists()]
    if not names:
        return None
    stamp = f"prev-{time.strftime('%Y%m%d-%H%M%S')}"
    while any((out / f"{n}.{stamp}").exists() for n in names):  # two fresh starts within a second
        stamp += "x"
    for n in names:
        (out / n).rename(out / f"{n}.{stamp}")
    return stamp


# the libraries whose versions decide what a run computes and saves (a reviewer reproducing it needs them); jaxscale
# itself first: installed from a wheel there is no git checkout, and a run named no code version at all
PROVENANCE_PACKAGES = ("jaxscale", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
                       "tokenizers")


def provenance(argv: list[str] | None = None) -> dict:
    """Who made a run segment, for its checkpoint meta and metrics.jsonl: the command line (`argv`, default
    sys.argv), this code's git commit (None unless it runs from its own git checkout) and whether its tracked files
    differed from it, the Python and library versions (`PROVENANCE_PACKAGES`; None: not installed), the JAX backend
    and device count, and the host. Without it a run folder named no code version, no library version and no command."""
    import importlib.metadata

    import jax

    root = pathlib.Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    # this code's own checkout only: installed in site-packages under a project's repository, git found the project's
    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and pathlib.Path(top).resolve() == root else None
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"argv": list(sys.argv if argv is None else argv), "git_commit": commit,
            "git_dirty": None if dirty is None else bool(dirty),
            "python": platform.python_version(), "versions": {n: version(n) for n in PROVENANCE_PACKAGES},
            "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
            "host": platform.node()}


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Every field of two nested config dicts (a RunConfig's JSON) that differs, as 'a.b: saved X, now Y' (a field
    one side lacks: None there), in sorted order."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: saved {a!r}, now {b!r}")
    return out


def segments(saved_meta: dict | None, start: int, changed: list[str], argv: list[str] | None = None) -> list[dict]:
    """The run's segments for its checkpoint meta: the restored checkpoint's (`saved_meta`, None for a fresh run;
    checkpoints from before this field: none), those starting past `start` dropped (an attempt whose steps are
    replayed), then this one: {"start_step": start, "changed": the settings a resume changed (`config_changes`' lines),
    **provenance(argv)}. The newest checkpoint's config alone is the last segment's: a resume that changed
    optim.lr at step 8 looked, from the folder, like a run at the new lr throughout."""
    kept = [s for s in (saved_meta or {}).get("segments", []) if s.get("start_step", 0) <= start]
    return kept + [{"start_step": int(start), "changed": list(changed), **provenance(argv)}]


class Logger:
    """JSONL + TensorBoard + console, on the primary process only. tb: the events' directory under `out` (one
    TensorBoard run: its own step axis, which `resume` marks)."""

    def __init__(self, out: pathlib.Path, primary: bool, tb: str = "tb"):
        self.primary = primary
        if primary:
            path = out / "metrics.jsonl"
            if path.exists() and path.stat().st_size:
                with path.open("rb+") as f:  # a line torn by a kill: cut, or the next record would extend it
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.seek(0)
                        data = f.read()
                        f.truncate(data.rfind(b"\n") + 1)
        self.jsonl = (out / "metrics.jsonl").open("a", encoding="utf-8") if primary else None
        if primary:
            # tensorboardX's EventsWriter, written synchronously: SummaryWriter queues events for a thread, and its
            # flush() does not drain that queue, so a killed run lost events its checkpoint covered
            from tensorboardX.event_file_writer import EventsWriter

            (out / tb).mkdir(parents=True, exist_ok=True)
            self.tb = EventsWriter(str(out / tb / "events"), f".{time.time_ns()}")  # a resume never reuses a name

    def write(self, record: dict):
        """One record {"kind": "train" | "eval" | ..., "step": int, ...}: a JSONL line, and each finite number as a
        TensorBoard scalar '<kind>/<key>' (an 'expert_load' list as moe/load_expert<e>). A NaN or infinite number
        is written as null: Python's json writes bare NaN / Infinity, which strict readers (JavaScript, most
        non-Python tools) refuse."""
        if not self.primary:
            return
        self.jsonl.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, int | float) and math.isfinite(v):
                self._scalar(f"{record['kind']}/{k}", v, record["step"])
            elif isinstance(v, list) and k == "expert_load":
                for e, x in enumerate(v):
                    self._scalar(f"moe/load_expert{e}", x, record["step"])

    def _scalar(self, tag: str, value: float, step: int):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self.tb.write_event(Event(wall_time=time.time(), step=int(step), summary=scalar(tag, float(value))))

    def resume(self, step: int):
        """Mark a run resumed from its checkpoint of `step`: a SessionLog START event at step + 1. The steps after
        the checkpoint are trained and logged again, and the interrupted attempt's events for them may be on disk
        (the events file is written out as its buffer fills, not only at flush). TensorBoard's Python loader
        (--load_fast=false, and scripts that read tb/ with its EventAccumulator) drops earlier events at steps >=
        this one only on such an event, else it shows both attempts at those steps; its Rust loader keeps a tag's
        last value per step either way."""
        if self.primary:
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self.tb.write_event(Event(wall_time=time.time(), step=int(step) + 1,
                                      session_log=SessionLog(status=SessionLog.START)))

    def flush(self):
        """Flushed with every checkpoint: a killed run loses no event that its checkpoint covers (those steps are
        never replayed)."""
        if self.primary:
            self.tb.flush()

    def close(self):
        if self.primary:
            self.jsonl.close()
            self.tb.close()


def drop_records_after(log: Logger, kind: str | None, step: int):
    """Remove the records of `kind` (None: of every kind) past `step` from the Logger's metrics.jsonl: a run or
    stage starting at `step` (a resume; 0: retrained from scratch, its checkpoint deleted) logs those steps again
    or not at all. Kept, a resume to fewer steps showed the interrupted attempt's tail in the curves and loss plot
    (TensorBoard's restart marker, `Logger.resume`, drops it there), and every resume left that attempt's
    duplicates beside the new records. Rewritten whole (`write_text_atomically`): a kill mid-write keeps the old
    file."""
    if log.jsonl is None:  # not the primary process: nothing written
        return
    path = pathlib.Path(log.jsonl.name)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def stale(line: str) -> bool:
        try:
            r = json.loads(line)
        except ValueError:
            return False
        return (isinstance(r, dict) and kind in (None, r.get("kind")) and isinstance(r.get("step"), int)
                and r["step"] > step)

    keep = [line for line in lines if not stale(line)]
    if len(keep) < len(lines):
        log.jsonl.close()  # appends go on to the new file, not the replaced one
        write_text_atomically(path, "".join(keep))
        log.jsonl = path.open("a", encoding="utf-8")


def _finite_or_null(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_null(v) for v in x]
    return x


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverging run's loss passes ~709.78 nats), NaN for NaN."""
    try:  # (a cut at 700 called losses of 700..709.78 nats, whose exp a float holds, inf)
        return math.exp(loss)
    except OverflowError:
        return math.inf


def moe_record(metrics) -> dict:
    """The MoE fields of a train record from a step's metrics ({} without MoE): lb_loss, z_loss, dropped_frac,
    expert_load [E] (each expert's share of the routed rows, averaged over the MoE layers: metrics["load"] is
    [L_moe, E]) and load_imbalance (each layer's busiest expert's share over its mean share, averaged over the MoE
    layers, as benchmarks/moe_train.py's max/mean: 1 when balanced; NaN, logged as null, for a step without a real
    token, whose load is all 0). Per layer: expert e of one layer is not expert e of another, so the imbalance of the
    averaged load read 1 for layers each collapsed onto a different expert."""
    if "load" not in metrics:
        return {}
    rows = [[float(x) for x in layer] for layer in metrics["load"]]  # device arrays or lists, [L_moe][E]
    load = [math.fsum(col) / len(rows) for col in zip(*rows)]
    # a layer's mean share is 0 when nothing was routed: a logged metric must never stop a run
    ratios = [max(r) * len(r) / math.fsum(r) for r in rows if math.fsum(r) > 0]
    return dict(lb_loss=float(metrics["lb_loss"]), z_loss=float(metrics["z_loss"]),
                dropped_frac=float(metrics["dropped_frac"]), expert_load=load,
                load_imbalance=math.fsum(ratios) / len(ratios) if ratios else math.nan)


def read_curves(path: pathlib.Path):
    """{kind: {step: record}} from metrics.jsonl; a step logged twice (replayed after a resume) keeps the last."""
    curves: dict[str, dict[int, dict]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line torn by a kill (the Logger cuts it when the run resumes)
                continue
            curves.setdefault(r["kind"], {})[r["step"]] = r
    return curves


# (kind, key, label, line style) of each curve train_lm plots: its train loss and the held-out loss at eval steps
LM_CURVES = (("train", "loss", "train loss", "-"), ("eval", "loss", "held-out loss", "o-"))


def plot_losses(out: pathlib.Path, unit: str = "byte", curves=LM_CURVES, name: str = "loss.png",
                ylabel: str | None = None, log_y: bool = False) -> pathlib.Path:
    """Loss curves from out/metrics.jsonl, saved as out/<name> (returned): for each (kind, key, label, style) of
    `curves`, the `key` of every record of that kind against its step (a step logged twice: its last record; a
    curve with no such record is left out), and a dotted red line at the step of each "nonfinite" record (train_lm:
    a step skipped or halted on). The default: train_lm's train and held-out loss. unit: what a loss is per ('byte'
    for bytes + EOS, 'token' for a BPE), in the default ylabel. Written to a temporary file and renamed,
    so a kill mid-write leaves the previous plot, not a truncated one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_curves(out / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = False  # a loss a log scale can show
    try:  # closed however the save ends (as video_eval.write_overview): pyplot keeps every open figure
        for kind, key, label, style in curves:
            pts = [(s, r[key]) for s, r in sorted(records.get(kind, {}).items()) if key in r]
            if pts:
                ys = [math.nan if v is None else v for _, v in pts]  # null: a non-finite loss
                positive |= any(math.isfinite(y) and y > 0 for y in ys)
                (line,) = ax.plot([s for s, _ in pts], ys, style, label=label)
                # a point with no finite neighbour is no segment's end: a style without markers ('-') drew nothing
                # for it (a run stopped after its first train record, a loss between two non-finite ones)
                ok = [math.isfinite(y) for y in ys] + [False]  # ([-1]: the index before the first is no neighbour)
                lone = [i for i in range(len(ys)) if ok[i] and not ok[i - 1] and not ok[i + 1]]
                if lone and line.get_marker() in ("None", "", " ", None):
                    line.set(marker="o", markersize=3, markevery=lone)
        # train_lm's non-finite steps (skipped or halted on): one between log steps is in no curve, and the plot of
        # a run that skipped steps looked like a clean run's
        bad = sorted(records.get("nonfinite", {}))
        for i, s in enumerate(bad):
            ax.axvline(s, color="red", ls=":", lw=1,
                       label=f"non-finite step{'s' * (len(bad) > 1)} ({len(bad)})" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel or f"loss (nats / {unit})")
        if log_y and positive:  # else the non-finite steps' lines alone (a run whose every loss was NaN) set the
            ax.set_yscale("log")  # y range to their [0, 1]: "Data cannot be log-scaled" from tight_layout
        ax.grid(alpha=0.3)
        if ax.lines:  # (legend() warns when there is nothing to label: a run stopped before its first record)
            ax.legend()
        fig.tight_layout()
        path = write_atomically(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def write_atomically(path: pathlib.Path, write) -> pathlib.Path:
    """write(tmp) to `<path>.tmp` beside `path`, then rename it over `path` (atomic on POSIX): a kill mid-write
    leaves the previous file (or none), never a truncated one that a resume or a reader then reads; a write that
    raised leaves no `.tmp` (`data.shards.write_atomically`). Returns path."""
    from data.shards import write_atomically as write_then_rename

    write_then_rename(path, write)
    return pathlib.Path(path)


def write_text_atomically(path: pathlib.Path, text: str) -> pathlib.Path:
    """`path.write_text(text)` (UTF-8, whatever the locale) through `write_atomically`."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class Throughput:
    """Tokens/s and s/step over the steps since the last report. Time spent evaluating, saving or compiling
    inside the window is subtracted from it (the loop leaves the first step of each process, which compiles,
    out entirely); the steps trained before that time still count (they are in the window)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.start, self.excluded, self.tokens, self.steps = clock(), 0.0, 0, 0

    def step(self, tokens: int):
        self.tokens += tokens
        self.steps += 1

    @contextlib.contextmanager
    def exclude(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - t0

    def report(self, now: float) -> tuple[float, float]:
        """(tokens/s, s/step) of the window ending at `now` (the end of the last step), (None, None) when it
        counted no step; starts the next one."""
        dt = max(now - self.start - self.excluded, 1e-9)
        out = (self.tokens / dt, dt / self.steps) if self.steps else (None, None)
        self.start, self.excluded, self.tokens, self.steps = now, 0.0, 0, 0
        return out


class Stop:
    """SIGTERM / SIGINT: remember it; the loop finishes the step, saves and exits 0. A second Ctrl-C (SIGINT after
    either) raises KeyboardInterrupt at once: the one way out of a save that hangs (orbax writes to a temporary
    folder and renames it when done, so no half-written step is left to restore). Python drops an exception raised
    while it runs a callback (a second Ctrl-C in JAX's garbage-collection hook went unnoticed, and the run saved and
    ended as after one), so that SIGINT also puts back the default action: a third Ctrl-C ends the process, the
    kernel releasing the run lock. A second SIGTERM is remembered
    like the first: a scheduler may send several before its kill.

    Off the main thread (a trainer's main() run in a thread: a notebook's worker, a job runner) Python refuses
    signal handlers ("signal only works in main thread"), which failed even `--help`: no handler is installed
    there (one line says so) and the run trains on, a signal acting as it would without this class."""

    def __init__(self):
        self.signal = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            print("note: not the main thread, so no SIGTERM / SIGINT handler: a signal will not stop the run in order")
            return
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def reinstall(self):
        """Install the handler again (what `restore` puts back stays the first install's): jax.distributed.initialize
        starts a preemption notifier that takes SIGTERM over below Python (signal.getsignal still names this
        handler), and a SIGTERM then never reached it: the run trained on to its end."""
        for s in self._old:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # should the exception be dropped, the next one ends it
            raise KeyboardInterrupt(f"a second signal (SIGINT after {self.signal}): stopping without the save")
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class StopAtOnce:
    """SIGTERM / SIGINT where a run has nothing to save (the video trainer's start-up, latent encoding, evaluation
    and media writing, between its stages' `Stop`s): one line naming the signal and `what` the run was doing, then
    exit status 128 + the signal's number (143 / 130), as the signal's default. There a SIGTERM ended the run
    without a word and Ctrl-C with a traceback. A second signal gets the default (the handler is gone once it ran).
    Off the main thread nothing is installed, as Stop."""

    def __init__(self, what: str, then: str = "rerun the same command to resume"):
        self.what, self.then, self._old = what, then, {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.restore()
        print(f"{signal.Signals(signum).name} during {self.what}: nothing to save there; exiting with status "
              f"{128 + signum} ({self.then})", flush=True)
        raise SystemExit(128 + signum)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
