"""Side-by-side timing for the A/B benchmarks: every contender compiled first, then interleaved rounds, so that a
load change on a shared machine hits all of them alike."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

from data.cli import path_arg


def interleaved(makers: dict, rounds: int) -> tuple[dict, dict]:
    """makers: {key: () -> (call, extra)}, `call()` running one step to completion. Each is made and called once
    (compilation), then `rounds` rounds call every contender once in turn. Returns ({key: [seconds per round]},
    {key: extra})."""
    calls, extra = {}, {}
    for key, make in tqdm(list(makers.items()), desc="compile"):
        calls[key], extra[key] = make()
        calls[key]()
    times = {k: [] for k in calls}
    for _ in tqdm(range(rounds), desc="measuring"):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return times, extra


def pair_row(times: dict, extra: dict, name, base: str, new: str) -> dict:
    """Medians of contender (name, base) and (name, new) in ms, the median over rounds of new / base time ('ratio'),
    and their `extra` values as temp_mib_<label>."""
    a, b = times[(name, base)], times[(name, new)]
    return {f"{base}_ms": 1e3 * statistics.median(a), f"{new}_ms": 1e3 * statistics.median(b),
            "ratio": statistics.median(y / x for x, y in zip(a, b)),
            f"temp_mib_{base}": extra[(name, base)], f"temp_mib_{new}": extra[(name, new)]}


class ChildFailed(subprocess.CalledProcessError):
    """A benchmark's child process exited non-zero; its message ends with the tail of the child's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()} The end of its stderr:\n{self.stderr[-4000:]}"


def run_child(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run with stdout and stderr captured as text; a child that fails raises `ChildFailed`. With
    check=True the CalledProcessError named only the exit status: the child's traceback was captured and dropped."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        raise ChildFailed(p.returncode, cmd, p.stdout, p.stderr)
    return p


def out_path(text: str) -> str:
    """argparse type of an output file (--json, --plot): its directory must exist and be writable, checked before the
    run; a mistyped directory failed only when the results were written, after minutes of timing, and lost them.
    `~` expanded, a URL refused (`data.cli.path_arg`: "the directory of gs://b/x.json does not exist; create it")."""
    text = path_arg(text)
    folder = os.path.dirname(os.path.realpath(text))  # a symlink's target is what `write_json` replaces
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a file in it")
    if not text or text.endswith(("/", os.sep)):  # '' was never written; 'res/' wrote a file named res
        raise argparse.ArgumentTypeError(f"{text!r} names no file; name one, e.g. out.json")
    if _std_stream(text) or os.path.exists(text) and not os.path.isfile(text) and os.access(text, os.W_OK):
        return text  # /dev/stdout, a FIFO: `write_json` writes through it, its directory need not be writable
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the directory of {text} does not exist; create it or name another file")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the directory of {text} is not writable; name another file")
    return text


out_path.__name__ = "output file"


def plot_path(text: str) -> str:
    """argparse type of --plot: an `out_path` whose extension matplotlib writes; savefig refused 'load.pnj' only after
    the run (moe_train lost its --json with it, written after the plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if os.path.splitext(text)[1][1:].lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text} is not an image file name; end it in one of {sorted(formats)}")
    return out_path(text)


plot_path.__name__ = "image file"


def _std_stream(path: str):
    """sys.stdout / sys.stderr where `path` is the file, pipe or terminal it writes to (/dev/stdout, /dev/fd/2), else
    None. /dev/stdout redirected to a log is a regular file: renamed over, the log was lost."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            if stream is not None and os.path.samestat(os.stat(path), os.fstat(fd)):
                return stream
        except OSError:  # no such path, or the descriptor is closed
            pass
    return None


def write_json(path: str | None, obj, indent: int = 1) -> None:
    """Write `obj` as JSON to `path` (None: nothing) through a temporary file renamed over it: `open(path, "w")`
    emptied a previous result file (a committed docs/*.json) before a dump that then failed part-way. A path that
    is no regular file (/dev/stdout, a FIFO) is written through, not renamed over."""
    if path:
        from data.shards import write_atomically

        text = json.dumps(obj, indent=indent)  # a value JSON cannot hold raises here, before any file is touched
        if stream := _std_stream(path):  # opened anew, `> log` was truncated and buffered prints came after the JSON
            stream.write(text)
            stream.flush()
            return
        if os.path.exists(path) and not os.path.isfile(path):  # --json /dev/stdout: renamed over, the device was lost
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        # a symlink keeps pointing at its (replaced) target; renamed over, it became a copy the target never saw
        write_atomically(os.path.realpath(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save(path: str | None, rounds: int, rows: dict) -> None:
    """Write {rounds, results: rows} as JSON to `path` (None: nothing)."""
    write_json(path, {"rounds": rounds, "results": rows})


def report(path: str | None, rows: list, summary: dict) -> dict:
    """Print `summary` and write {rows, summary} as JSON to `path` (None: print only); returns `summary`."""
    print(json.dumps(summary, indent=1))
    write_json(path, {"rows": rows, "summary": summary})
    return summary
