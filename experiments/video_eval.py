"""Prompt-following evaluation of the text-to-video model without a learned judge, and its media.

Clips are generated for every caption (seen and held-out combinations) at each CFG scale, decoded by
the VAE, clipped to [-1, 1] as the GIFs show them, and read back by `data.moving_shapes.measure` (colour,
direction, shape). The null-prompt control generates from the empty caption and scores against the same
labels: it must sit at chance. R@1 of the alignment dual encoder is reported alongside (a learned metric, for
reference only).
"""

from __future__ import annotations

import json
import math
import numbers
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data.moving_shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    MovingShapesConfig,
    caption,
    chance,
    encode_caption,
    labels_of,
    measure,
    null_tokens,
)
from data.seeds import check_seed
from experiments.run_log import write_atomically, write_text_atomically

ATTRS = ("colour", "direction", "shape")


def score(found: dict, labels: dict) -> dict:
    """Per-attribute and joint accuracy of decoded attributes against labels (arrays of indices [N], -1 in `found`
    for no object), n, and the fractions of clips with no object and with an object that does not move (direction
    -1, colour read)."""
    for a in ATTRS:  # labels of length 1 broadcast over every clip (a score, silently); other lengths as numpy's error
        if np.shape(labels[a]) != np.shape(found[a]):
            raise ValueError(f"score: labels[{a!r}] has shape {list(np.shape(labels[a]))}, found[{a!r}] "
                             f"{list(np.shape(found[a]))}: pass one label per measured clip")
    if np.size(found["colour"]) == 0:  # every accuracy was NaN (numpy's mean of nothing), with a warning only
        raise ValueError("score: no clips to score (found and labels are empty); measure at least one clip")
    hits = {a: np.asarray(found[a]) == np.asarray(labels[a]) for a in ATTRS}
    out = {a: float(hits[a].mean()) for a in ATTRS}
    out["joint"] = float(np.logical_and.reduce([hits[a] for a in ATTRS]).mean())
    out["n"] = int(len(hits["colour"]))
    out["no_object"] = float((np.asarray(found["colour"]) < 0).mean())
    out["static"] = float(((np.asarray(found["direction"]) < 0) & (np.asarray(found["colour"]) >= 0)).mean())
    return out


def chance_row() -> dict:
    """The accuracy of a random guess per attribute and for all three jointly (a results table's floor)."""
    row = {a: chance(a) for a in ATTRS}
    row["joint"] = math.prod(row.values())
    return row


def prompt_set(data_cfg: MovingShapesConfig, split: str, per_prompt: int):
    """(tokens [N, L], labels {attr: [N]}, combo ids [N]) with every combination of `split` repeated."""
    if not data_cfg.split_combos(split):  # held_out=() failed in np.stack as a bare "need at least one array"
        raise ValueError(f"prompt_set: split={split!r} holds no combinations (MovingShapesConfig.held_out holds "
                         f"{len(data_cfg.held_out)} of {len(data_cfg.combos())}); hold some out to evaluate held-out "
                         "prompts (the default HELD_OUT)")
    combos = [c for c in data_cfg.split_combos(split) for _ in range(per_prompt)]
    tokens = np.stack([encode_caption(caption(*c), data_cfg.max_caption_len) for c in combos])
    lab = np.asarray([labels_of(c) for c in combos])
    labels = {"colour": lab[:, 0], "shape": lab[:, 1], "direction": lab[:, 2]}
    all_combos = data_cfg.combos()
    return tokens, labels, np.asarray([all_combos.index(c) for c in combos])


def chunked(fn, n: int, batch: int, desc: str | None = None):
    """Concatenate fn(start, stop) over [0, n) in chunks of `batch` (the last chunk padded by the caller)."""
    outs = []
    for s in tqdm(range(0, n, batch), desc=desc, leave=False, disable=desc is None):
        outs.append(np.asarray(fn(s, min(s + batch, n))))
    return np.concatenate(outs)


def pad_to(x, n):
    """x [m, ...] padded to n rows by repeating its last row (a fixed batch size for the jitted samplers)."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)]) if len(x) < n else x


def run_eval(gen_fn, decode_fn, embed_fn, data_cfg: MovingShapesConfig, *, scales=(1.0, 2.0, 4.0),
             per_seen: int = 2, per_held: int = 4, batch: int = 64, seed: int = 0, null_L=None):
    """gen_fn(tokens [b, L], key, scale) -> latents; decode_fn(latents) -> videos [-1, 1];
    embed_fn(latents) -> each clip's retrieved combo index (-1 for a tie: a miss, `models.video.nearest_caption`)
    or None; null_L: the null caption's tokens [L] for the null-prompt control (None:
    `null_tokens(data_cfg.max_caption_len)`).

    Returns (results, videos, sets) where results[(condition, split)] = scores, videos[(condition, split)] =
    decoded clips aligned with prompt_set(split) (condition: 'cfg <scale>' or 'null prompt') and sets[split] =
    prompt_set(...) ('seen', 'held-out').
    """
    for name, v in (("per_seen", per_seen), ("per_held", per_held), ("batch", batch)):  # 0 failed in np.stack / range
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"run_eval: {name}={v!r} must be an int >= 1 (clips per caption, or per generation batch)")
    seed = check_seed(seed, "run_eval: seed", 2**32)  # jax.random.key keeps its low 32 bits: 2**32 ran as 0
    names = [f"cfg {s:g}" for s in scales]  # a condition's name in results and videos
    if dup := sorted({n for n in names if names.count(n) > 1}):  # generated again, then overwriting the first
        raise ValueError(f"run_eval: scales={tuple(scales)} name {', '.join(map(repr, dup))} more than once (names "
                         "keep 6 significant digits); pass each scale once")
    results, videos = {}, {}
    # None crashed the null-prompt condition (an object array into gen_fn), after every guided one had run
    null_L = null_tokens(data_cfg.max_caption_len) if null_L is None else np.asarray(null_L)
    if null_L.shape != (data_cfg.max_caption_len,):  # else a numpy broadcast error, after the guided conditions
        raise ValueError(f"run_eval: null_L must be the null caption's tokens [max_caption_len="
                         f"{data_cfg.max_caption_len}] (null_tokens(max_caption_len)), got shape {list(null_L.shape)}")
    sets = {"seen": prompt_set(data_cfg, "train", per_seen), "held-out": prompt_set(data_cfg, "heldout", per_held)}
    key = jax.random.key(seed)
    conditions = [(f"cfg {s:g}", s, split) for s in scales for split in sets]
    conditions.append(("null prompt", 1.0, "seen"))
    for name, scale, split in tqdm(conditions, desc="eval"):
        tokens, labels, combo = sets[split]
        if name == "null prompt":
            tokens = np.broadcast_to(null_L, tokens.shape)
        n = len(tokens)
        # same noise for every scale of a split: the scales differ only by guidance
        k = jax.random.fold_in(key, 0 if split == "seen" else 1)

        def gen(s, e, tokens=tokens, k=k, scale=scale):
            tok = pad_to(tokens[s:e], batch)
            return np.asarray(gen_fn(jnp.asarray(tok), jax.random.fold_in(k, s), scale))[: e - s]

        lat = chunked(gen, n, batch)
        vid = chunked(lambda s, e, lat=lat: np.asarray(decode_fn(jnp.asarray(pad_to(lat[s:e], batch))))[: e - s],
                      n, batch)
        # the decoder's range: a grey wash is no object. Clipped as the media and sample() show it: one overshooting
        # pixel raised an unclipped clip's peak, and with it the foreground cut, past a plainly drawn object
        row = score(measure(np.clip(vid, -1, 1), value_range=(-1, 1)), labels)
        if embed_fn is not None:
            retrieved = chunked(lambda s, e, lat=lat: np.asarray(embed_fn(jnp.asarray(pad_to(lat[s:e], batch))))[
                : e - s], n, batch)
            row["r@1"] = float((retrieved == combo).mean())
        results[(name, split)] = row
        videos[(name, split)] = vid
    return results, videos, sets


def table(results: dict, real: dict | None = None) -> str:
    """Markdown table of the evaluation (accuracies in %)."""
    lines = ["| condition | prompts | n | colour | direction | shape | joint | R@1 (dual encoder) |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "" if x is None else f"{100 * x:.1f}"

    rows = list(results.items()) + ([] if real is None else list(real.items()))
    for (name, split), r in rows:
        lines.append(f"| {name} | {split} | {r.get('n', '')} | {fmt(r['colour'])} | {fmt(r['direction'])} | "
                     f"{fmt(r['shape'])} | {fmt(r['joint'])} | {fmt(r.get('r@1'))} |")
    c = chance_row()
    n_combos = len(COLOURS) * len(SHAPES) * len(DIRECTIONS)
    lines.append(f"| chance | | | {fmt(c['colour'])} | {fmt(c['direction'])} | {fmt(c['shape'])} | {fmt(c['joint'])} "
                 f"| {fmt(1 / n_combos)} |")
    if real and all(r["colour"] <= 1.5 * c["colour"] for r in real.values()):
        # the reference that needs no DiT reads barely above chance: every row would look alike (a smoke run)
        best = max(r["colour"] for r in real.values())
        lines.append(f"\nnote: real clips read back through the VAE score {fmt(best)}% on colour (chance "
                     f"{fmt(c['colour'])}%): the VAE is too short-trained for this table to tell the conditions "
                     "apart; train it longer (--vae-steps) before reading the rows")
    return "\n".join(lines)


def save_results(path, results: dict, extra: dict):
    """The eval results keyed '<name> / <split>', plus `extra`, as indented JSON at `path` (written whole or not at
    all: a kill mid-write left a truncated file)."""
    out = {f"{name} / {split}": r for (name, split), r in results.items()} | extra
    write_text_atomically(pathlib.Path(path), json.dumps(out, indent=2))


# --- media ---------------------------------------------------------------------------------------------------


def to_uint8(video):
    """Video in [-1, 1] (any shape, any float dtype) → uint8 in [0, 255]. Mapped in float64: a bfloat16 video mapped in
    its own dtype put ~23% of its pixels one level off."""
    return (np.clip((np.asarray(video, np.float64) + 1) / 2, 0, 1) * 255).round().astype(np.uint8)


def tile(clips_RCTHW3, gap: int = 2):
    """[R, C, T, H, W, 3] uint8 → [T, R·(H+gap) - gap, C·(W+gap) - gap, 3] (grey gaps between clips only)."""
    R, C, T, H, W, _ = clips_RCTHW3.shape
    out = np.full((T, R * (H + gap) - gap, C * (W + gap) - gap, 3), 64, np.uint8)
    for r in range(R):
        for c in range(C):
            out[:, r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = clips_RCTHW3[r, c]
    return out


def write_gif(path, frames_THW3, scale: int = 2, ms: int = 120):
    """uint8 frames [T, H, W, 3] as a looping GIF, upscaled `scale`× (nearest), `ms` per frame. Written to
    `<path>.tmp` and renamed (run_log.write_atomically): a viewer or a kill mid-write never sees a partial GIF."""
    imgs = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames_THW3]
    write_atomically(pathlib.Path(path), lambda tmp: imgs[0].save(tmp, format="GIF", save_all=True,
                                                                  append_images=imgs[1:], duration=ms, loop=0,
                                                                  optimize=True))


def write_grid(path, rows_RTHW3, labels, title: str, scale: int = 2):
    """One row per clip, frames left to right, a label on each row and a title line: a PNG at `path`, written whole
    (as write_gif's)."""
    R, T, H, W, _ = rows_RTHW3.shape
    strip = tile(rows_RTHW3[:, :, None], gap=1)  # R rows × T columns, a single 'frame'
    img = Image.fromarray(strip[0]).resize((strip.shape[2] * scale, strip.shape[1] * scale), Image.NEAREST)
    pad_l, pad_t = 48, 14
    canvas = Image.new("RGB", (img.width + pad_l, img.height + pad_t), (255, 255, 255))
    canvas.paste(img, (pad_l, pad_t))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=(0, 0, 0))
    for r, lab in enumerate(labels):
        draw.text((2, pad_t + r * (H + 1) * scale + H * scale // 2 - 5), lab, fill=(0, 0, 0))
    write_atomically(pathlib.Path(path), lambda tmp: canvas.save(tmp, format="PNG", optimize=True))


def write_prompt_media(out_dir, videos: dict, sets: dict, data_cfg: MovingShapesConfig, scales, per_gif: int = 2):
    """Per prompt: `<caption>.gif` (rows: CFG scales, columns: samples, animated) and `<caption>.png`
    (rows: CFG scale × sample, columns: frames)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, (_, _, combo) in sets.items():
        all_combos = data_cfg.combos()
        for cid in dict.fromkeys(combo.tolist()):
            idx = np.flatnonzero(combo == cid)[:per_gif]
            clips = np.stack([to_uint8(videos[(f"cfg {s:g}", split)][idx]) for s in scales])  # [R, C, T, H, W, 3]
            name = caption(*all_combos[cid]).replace(" ", "_")
            write_gif(out / f"{name}.gif", tile(clips))
            rows = clips.reshape(-1, *clips.shape[2:])
            labels = [f"cfg {s:g}" for s in scales for _ in idx]
            write_grid(out / f"{name}.png", rows, labels, f"{caption(*all_combos[cid])} ({split})")
            paths.append(out / f"{name}.gif")
    return paths


def write_overview(path, videos: dict, sets: dict, data_cfg: MovingShapesConfig, scale: float, null=True):
    """One image: for every caption its first generated clip at `scale` (first, middle, last frame), held-out
    captions marked, and a row of null-prompt clips. A PNG at `path`, written whole (as write_gif's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = []
    for split, (_, _, combo) in sets.items():
        for cid in dict.fromkeys(combo.tolist()):
            i = int(np.flatnonzero(combo == cid)[0])
            items.append((caption(*data_cfg.combos()[cid])[2:], split, videos[(f"cfg {scale:g}", split)][i]))
    if null:
        nv = videos[("null prompt", "seen")]
        items += [("null prompt", "null", nv[i]) for i in range(min(8, len(nv)))]
    cols = 8
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 0.95))
    try:  # closed however the save ends: pyplot keeps every open figure (a failed save leaked one per call)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (text, split, clip) in zip(axes.ravel(), items):
            T = clip.shape[0]
            # tile's grey gap between the frames: edge to edge, a left-moving object read as three stepping right
            strip = tile(to_uint8(clip[[0, T // 2, T - 1]])[None, :, None])[0]
            ax.imshow(strip, interpolation="nearest")
            ax.set_title(text.replace("moving ", "→ "), fontsize=6.5, color={"seen": "black", "held-out": "red"}.get(
                split, "grey"))
        fig.suptitle(f"first / middle / last frame at CFG {scale:g}; red = held-out combination, grey = null prompt",
                     fontsize=8)
        fig.tight_layout(pad=0.2, rect=(0, 0, 1, 0.97))  # room for the title
        write_atomically(pathlib.Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
