"""What every `python -m` entry point shares (data/, scaling/, experiments/, benchmarks/). Standard library only:
`scaling.plan` imports it and starts in well under a second without jax."""

from __future__ import annotations

import argparse
import codecs
import os
import re
import sys


def run_main(main, *args):
    """`main(*args)`, ended quietly with exit status 1 when the reader of stdout has gone (`... | head -1`): a
    BrokenPipeError traceback ended it, from a print or from Python's own flush at exit (the rest of the output has
    nowhere to go either way). Other exits, SystemExit included, pass through unchanged. A stdout that is not UTF-8
    (LC_ALL=C with PYTHONUTF8=0) prints what it cannot encode as escapes, as Python's stderr does: the trainer's
    first line ('16×128') or a Chinese sample raised UnicodeEncodeError there."""
    if hasattr(sys.stdout, "reconfigure") and codecs.lookup(sys.stdout.encoding).name != "utf-8":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        try:
            return main(*args)
        finally:
            sys.stdout.flush()  # a closed pipe fails here, inside the try, not in the interpreter's exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        sys.exit(1)


def undecoded(text: str) -> str | None:
    """Why `text` (a command-line value, an absolute path) cannot be used, or None: under a C / POSIX locale with
    PYTHONUTF8=0 Python reads the command line and file names as ASCII, holding each other byte as a lone surrogate,
    which tensorstore, ArrayRecord and the tokenizers take for no string (a traceback, after the work) and a sampler
    turns into U+FFFD's. Under a UTF-8 locale so are bytes that are not UTF-8 (a latin-1 directory name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if codecs.lookup(sys.getfilesystemencoding()).name == "utf-8":
            return (f"{text!r} holds bytes that are not UTF-8 (a latin-1 name?): give it in UTF-8 (rename such a "
                    "directory, e.g. convmv -f latin1 -t utf8)")
        return (f"{text!r} holds bytes this Python could not decode: it reads the command line and file names as "
                f"{sys.getfilesystemencoding()} (a C / POSIX locale with PYTHONUTF8=0); run it with PYTHONUTF8=1 or "
                "under a UTF-8 locale (LC_ALL=C.UTF-8)")
    return None


# `scheme:/` at the start of a path: a URL (gs://bucket/run), or one that pathlib.Path has already turned into
# gs:/bucket/run. Any scheme with two slashes; with one, the storage schemes only (a local folder may be named "x:")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/")
_STORES = frozenset({"gs", "gcs", "s3", "s3a", "s3n", "az", "abfs", "abfss", "wasb", "wasbs", "hdfs", "http", "https",
                     "ftp", "file"})


def local_path(path) -> str:
    """`path` (a str or os.PathLike) as the local path string every entry point reads and writes: a leading `~`
    expanded (a shell leaves `--out=~/x` and `--set train.out=~/x` as typed: the run went to a folder named `~` in
    the working directory). A URL raises ValueError: our own os / pathlib / open() calls took `gs://bucket/run` for
    the relative path gs:/bucket/run and wrote the run into a local folder named `gs:`, lost with the VM."""
    text = os.fspath(path)
    m = _URL.match(text)
    if m and (text.startswith(m.group(0) + "/") or m.group(1).lower() in _STORES):
        raise ValueError(f"{text!r} is a URL, and this code reads and writes local paths only (it would be a "
                         f"local folder named {m.group(1) + ':'!r}): mount the bucket (gcsfuse for gs://, "
                         "mountpoint-s3 or s3fs for s3://) and pass the mount's path, or use a local / shared folder "
                         "and copy it up after (gcloud storage cp -r, aws s3 cp --recursive)")
    if text.startswith("~") and (text := os.path.expanduser(text)).startswith("~"):  # ~nosuchuser/x
        raise ValueError(f"{text!r}: {text.split('/')[0]} names no home directory here; give the full path")
    return text


def path_arg(text: str) -> str:
    """argparse type of a path flag: `local_path` (its refusal as the flag's error)."""
    try:
        return local_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


path_arg.__name__ = "path"


def at_least(lo: int):
    """argparse type for a count: an int >= lo (`type=at_least(1)`), so that e.g. `--rounds 0` is refused with the
    flag's name before anything compiles, rather than failing on an empty median after minutes of work (the
    scripts of experiments/, scaling/ and benchmarks/ use it). A whole number written as a float is taken (`1e3`:
    1000, as `--set train.steps=1e3` and `scaling.plan --params 1e9` take it); `1.5` or a word raises ValueError
    (argparse: "argument --steps: invalid integer >= 1 value: '1.5'")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            number = float(text)  # (a word: ValueError)
            if not number.is_integer():  # 1.5, inf, nan
                raise ValueError(f"not a whole number: {text!r}") from None
            value = int(number)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"  # argparse's "invalid <type> value" message names it
    return parse


def cli_parser(doc: str | None, spec) -> argparse.ArgumentParser:
    """An ArgumentParser for a `python -m` entry point (`spec`: the module's `__spec__`): its usage line and errors
    name the command a user types (`python -m experiments.aot`, where argparse's default is `aot.py`, which does not
    run from the repository root), and its description is the module's docstring as written."""
    prog = f"python -m {spec.name}" if spec is not None else None
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    # before Python 3.14 (gh-124823) argparse took only -5 and -.5 for numbers: `--flops -1e23` was an unknown option,
    # refused as 'argument --flops: expected one argument' before the value's own check could name it. Any '-' then a
    # digit (or '.' and a digit) is a value, as 3.14 reads it:
    ap._negative_number_matcher = re.compile(r"-\.?\d")
    return ap
