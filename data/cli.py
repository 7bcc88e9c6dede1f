"""What every `python -m` entry point shares (data/, scaling/, experiments/, benchmarks/). Standard library only:
`scaling.plan` imports it and starts in well under a second without jax."""

from __future__ import annotations

import argparse
import os
import sys


def run_main(main, *args):
    """`main(*args)`, ended quietly with exit status 1 when the reader of stdout has gone (`... | head -1`): a
    BrokenPipeError traceback ended it, from a print or from Python's own flush at exit (the rest of the output has
    nowhere to go either way). Other exits, SystemExit included, pass through unchanged."""
    try:
        try:
            return main(*args)
        finally:
            sys.stdout.flush()  # a closed pipe fails here, inside the try, not in the interpreter's exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        sys.exit(1)


def cli_parser(doc: str | None, spec) -> argparse.ArgumentParser:
    """An ArgumentParser for a `python -m` entry point (`spec`: the module's `__spec__`): its usage line and errors
    name the command a user types (`python -m experiments.aot`, where argparse's default is `aot.py`, which does not
    run from the repository root), and its description is the module's docstring as written."""
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
