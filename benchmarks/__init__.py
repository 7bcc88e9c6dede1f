"""Benchmarks: `python -m benchmarks.<name>`; results and commands in docs/benchmarks.md."""

import argparse


def at_least(lo: int):
    """argparse type for a count: an int >= lo (`type=at_least(1)`), so that `--rounds 0` is refused with the flag's
    name before anything compiles, rather than failing on an empty median after minutes of work."""

    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"  # argparse's "invalid <type> value" message names it
    return parse
