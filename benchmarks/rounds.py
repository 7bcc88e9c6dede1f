"""Side-by-side timing for the A/B benchmarks: every contender compiled first, then interleaved rounds, so that a
load change on a shared machine hits all of them alike."""

from __future__ import annotations

import json
import statistics
import time

from tqdm import tqdm


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


def save(path: str | None, rounds: int, rows: dict) -> None:
    """Write {rounds, results: rows} as JSON to `path` (None: nothing)."""
    if path:
        with open(path, "w") as f:
            json.dump({"rounds": rounds, "results": rows}, f, indent=1)


def report(path: str | None, rows: list, summary: dict) -> dict:
    """Print `summary` and write {rows, summary} as JSON to `path` (None: print only); returns `summary`."""
    print(json.dumps(summary, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    return summary
