"""MovingShapes: synthetic captioned clips for text-to-video experiments, as a grain data source.

One object per clip on a black background: a shape (square, circle, triangle) of a palette colour moving
in a straight line (left, right, up, down) at constant speed, captioned "a red square moving left".
Some (colour, shape, direction) combinations are held out of training so that prompt following can be
tested compositionally: every held-out triple is new, while each of its pairs was seen in training (true of the
default HELD_OUT; a `held_out` of your own is taken as given: holding out every circle trains on no circle).

`measure(video)` inverts the renderer without any learned judge: colour is the nearest palette colour
to the mean foreground RGB, direction the sign of the dominant slope of the centroid trajectory, shape
the fill ratio of the object's bounding box (square 1, circle π/4) and, for the triangle, its taper.

Shapes: B batch, T frames, S side (pixels), C = 3 RGB channels, L caption tokens. Videos are float32 in
[-1, 1] (black background = -1).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import numbers

import grain
import numpy as np

from data.seeds import check_field_types, check_seed

COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image y points down

# Latin-square style: each colour, shape and direction is held out at least twice, no pair twice, so every
# held-out triple is a new composition of pairs that all occur in training.
HELD_OUT = (("red", "circle", "up"), ("green", "triangle", "left"), ("blue", "square", "right"),
            ("yellow", "circle", "down"), ("red", "triangle", "right"), ("green", "square", "down"),
            ("blue", "circle", "left"), ("yellow", "triangle", "up"))

PAD, NULL = 0, 1  # token ids: padding, and the empty caption used for classifier-free guidance
VOCAB = ("<pad>", "<null>", "a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
SPLITS = ("train", "heldout", "all")


def caption(colour: str, shape: str, direction: str) -> str:
    """The caption of a clip, e.g. 'a red square moving left'."""
    return f"a {colour} {shape} moving {direction}"


def encode_caption(text: str, max_len: int = 8) -> np.ndarray:
    """Word-level tokens, right-padded with PAD: int32 [max_len]. The empty string is the null caption."""
    if not _count(max_len):  # "" at max_len=0 was [NULL], one token longer than asked; 1.5 a bare TypeError
        raise ValueError(f"encode_caption: max_len={max_len!r} must be an int >= 1 (the null caption takes one token)")
    if not isinstance(text, str):  # None (sample([None])) failed as a bare AttributeError, bytes as unknown words
        raise TypeError(f"encode_caption: text must be a str (a caption in the MovingShapes vocabulary; \"\" is the "
                        f"null caption), got {type(text).__name__} {text!r}")
    words = text.split()
    if len(words) > max_len:
        raise ValueError(f"caption {text!r} has {len(words)} words > max_len={max_len}")
    unknown = [w for w in words if w not in WORD_ID]
    if unknown:
        raise ValueError(f"caption words {unknown} are not in the MovingShapes vocabulary {VOCAB}")
    if special := [w for w in words if w in VOCAB[:2]]:  # '<pad> <pad>' was an all-padding caption, never trained
        raise ValueError(f"caption {text!r}: {special} are special tokens, not words; \"\" is the null caption")
    ids = [WORD_ID[w] for w in words] or [NULL]
    return np.asarray(ids + [PAD] * (max_len - len(ids)), np.int32)


def null_tokens(max_len: int = 8) -> np.ndarray:
    """The null (empty) caption's tokens [max_len], for caption dropout and classifier-free guidance."""
    return encode_caption("", max_len)


@dataclasses.dataclass(frozen=True)
class MovingShapesConfig:
    """frames: clip length (1 + 4k suits the causal video autoencoder); size: frame side in pixels.
    object_size: (min, max) object side in pixels, min >= 3; speed: (min, max) pixels per frame."""

    frames: int = 9
    size: int = 32
    object_size: tuple[int, int] = (12, 15)
    speed: tuple[float, float] = (1.25, 1.75)
    colour_jitter: float = 0.12  # brightness is scaled by U(1 - jitter, 1)
    held_out: tuple[tuple[str, str, str], ...] = HELD_OUT
    max_caption_len: int = 8
    seed: int = 0

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"MovingShapesConfig.{field}: {msg}")

        # a numpy int (from a sweep) was refused; stored as a plain int
        object.__setattr__(self, "seed", check_seed(self.seed, "MovingShapesConfig.seed", 2**32))
        check_field_types(self)  # a float count failed inside numpy or str, a bare int in unpacking
        need(self.frames >= 2, "frames", f"a clip needs >= 2 frames to show motion, got {self.frames}")
        lo, hi = self.object_size
        # a 2 px triangle is drawn as 1-2 pixels a frame, under measure's 3-pixel floor: half its clips read as empty
        need(3 <= lo <= hi, "object_size", f"need 3 <= min <= max, got {self.object_size} (a 2 px triangle is drawn "
             "as 1-2 pixels, which `measure` reads as no object)")
        need(self.speed[0] > 0 and self.speed[0] <= self.speed[1], "speed", f"need 0 < min <= max, got {self.speed}")
        travel = self.speed[1] * (self.frames - 1)
        need(hi + travel <= self.size, "size",
             f"an object of {hi}px moving {travel:.1f}px does not fit in {self.size}px; raise size or lower "
             "object_size / speed / frames")
        need(0 <= self.colour_jitter < 1, "colour_jitter", f"must be in [0, 1), got {self.colour_jitter}")
        # triples as lists (a JSON / YAML sweep's) failed as a bare "unhashable type: 'list'"; tuples: the config hashes
        held = tuple(tuple(c) if isinstance(c, list | tuple) else c for c in self.held_out)
        object.__setattr__(self, "held_out", held)
        for combo in held:
            need(combo in self.combos(), "held_out", f"{combo} is not a (colour, shape, direction) triple")
        # a triple listed twice (a typo for another) held out one fewer than written, silently
        dup = next((c for i, c in enumerate(held) if c in held[:i]), None)
        need(dup is None, "held_out", f"{dup} is listed twice; list each held-out triple once")
        need(len(set(self.held_out)) < len(self.combos()), "held_out", "cannot hold out every combination")
        longest = max(len(caption(*c).split()) for c in self.combos())
        need(self.max_caption_len >= longest, "max_caption_len",
             f"{self.max_caption_len} is shorter than the longest caption ({longest} words)")

    @staticmethod
    def combos() -> list[tuple[str, str, str]]:
        """All (colour, shape, direction) triples, in a fixed order (the `combo` id indexes this list)."""
        return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))

    def split_combos(self, split: str) -> list[tuple[str, str, str]]:
        """The (colour, shape, direction) triples of a split: 'train' (all but held_out), 'heldout', 'all'."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {SPLITS}")
        held = set(self.held_out)
        if split == "all":
            return self.combos()
        return [c for c in self.combos() if (c in held) == (split == "heldout")]


def labels_of(combo: tuple[str, str, str]) -> tuple[int, int, int]:
    """(colour, shape, direction) indices of a triple."""
    colour, shape, direction = combo
    return list(COLOURS).index(colour), SHAPES.index(shape), list(DIRECTIONS).index(direction)


def render(cfg: MovingShapesConfig, combo: tuple[str, str, str], rng: np.random.Generator) -> np.ndarray:
    """One clip of `combo` at a random size, speed, position and brightness: float32 [T, S, S, 3] in [-1, 1]."""
    colour, shape, direction = combo
    T, S = cfg.frames, cfg.size
    side = rng.integers(cfg.object_size[0], cfg.object_size[1] + 1)
    speed = rng.uniform(*cfg.speed)
    dx, dy = DIRECTIONS[direction]
    travel = speed * (T - 1)
    half = side / 2
    # Centre at frame 0, so that the whole trajectory stays inside the frame.
    lo_x, hi_x = half + max(0, -dx) * travel, S - half - max(0, dx) * travel
    lo_y, hi_y = half + max(0, -dy) * travel, S - half - max(0, dy) * travel
    cx0, cy0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    t = np.arange(T, dtype=np.float32)
    cx_T, cy_T = cx0 + dx * speed * t, cy0 + dy * speed * t
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres
    ox_TSS = xx[None] - cx_T[:, None, None]
    oy_TSS = yy[None] - cy_T[:, None, None]
    if shape == "square":
        mask = (np.abs(ox_TSS) <= half) & (np.abs(oy_TSS) <= half)
    elif shape == "circle":
        mask = ox_TSS ** 2 + oy_TSS ** 2 <= half ** 2
    else:  # apex up, base down: the half-width grows linearly from 0 to half
        mask = (np.abs(oy_TSS) <= half) & (np.abs(ox_TSS) <= (oy_TSS + half) / 2)
    rgb = np.asarray(COLOURS[colour], np.float32) * rng.uniform(1 - cfg.colour_jitter, 1.0)
    frames = mask[..., None] * rgb
    return (frames * 2 - 1).astype(np.float32)


class MovingShapesSource:
    """grain random-access source: record i is a deterministic function of (seed, split, i).

    A record is {"video" [T, S, S, 3] float32, "tokens" [L] int32, "combo" (index into cfg.combos()),
    "colour", "shape", "direction" (attribute indices)}. Combinations cycle through the split in order,
    so every `len(split_combos)` consecutive records cover each combination once.
    """

    def __init__(self, cfg: MovingShapesConfig, split: str = "train", num_records: int = 100_000):
        if not _count(num_records):  # 0 failed as a ZeroDivisionError inside grain's repeat
            raise ValueError(f"MovingShapesSource: num_records={num_records!r} must be an int >= 1")
        self.cfg, self.split, self.num_records = cfg, split, int(num_records)
        self.combos = cfg.split_combos(split)
        if not self.combos:  # (held_out=() trains on every triple) a record read failed as `i % 0` inside grain
            raise ValueError(f"split={split!r} holds no combinations: MovingShapesConfig.held_out holds "
                             f"{len(cfg.held_out)} of {len(cfg.combos())}; hold some out (the default HELD_OUT) "
                             "and keep some for training, or read split='all'")
        self.all_combos = cfg.combos()

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {i} out of range [0, {self.num_records})")
        combo = self.combos[i % len(self.combos)]
        rng = np.random.default_rng((self.cfg.seed, SPLITS.index(self.split), i))
        c, s, d = labels_of(combo)
        return {"video": render(self.cfg, combo, rng),
                "tokens": encode_caption(caption(*combo), self.cfg.max_caption_len),
                "combo": np.int32(self.all_combos.index(combo)), "colour": np.int32(c), "shape": np.int32(s),
                "direction": np.int32(d)}


def dataset(cfg: MovingShapesConfig, split: str = "train", batch: int = 16, seed: int = 0,
            num_records: int = 100_000) -> grain.MapDataset:
    """Shuffled, repeated, batched grain MapDataset (index it, or iterate `.to_iter_dataset()`).
    seed: the shuffle's, an int in [0, 2**32) (numpy ints too)."""
    seed = check_seed(seed, "dataset seed", 2**32)  # grain's shuffle read seed=1.5 (or True) as 1, silently
    if not _count(batch):  # 2.5 failed as a bare TypeError inside grain
        raise ValueError(f"dataset: batch={batch!r} must be an int >= 1")
    src = MovingShapesSource(cfg, split, num_records)
    return grain.MapDataset.source(src).shuffle(seed=seed).repeat().batch(int(batch), drop_remainder=True)


def _count(n) -> bool:
    """An int >= 1 (numpy ints too), not a bool or a float."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool | np.bool_) and n >= 1


# --- evaluation without a learned judge --------------------------------------------------------------------


def measure(videos_BTHWC: np.ndarray, rel_threshold: float = 0.5, min_threshold: float = 0.25,
            square_fill: float = 0.87, triangle_taper: float = 0.6, max_area: float = 0.5, min_speed: float = 0.2,
            value_range: tuple[float, float] | None = None, circle_fill: float = 0.65) -> dict[str, np.ndarray]:
    """Decode (colour, shape, direction) indices from clips in [-1, 1]; -1 where a clip shows no object, and a
    direction of -1 where it shows one that does not move (the centroid's slope is under min_speed pixels per frame
    on both axes; the renderer draws >= MovingShapesConfig.speed[0], 1.25 by default: lower it for slower configs).

    Foreground: pixels whose brightest channel exceeds rel_threshold × the clip's peak (at least
    min_threshold, in [0, 1] units), so dim or soft-edged generations are cut at half maximum (the renderer's dimmest
    object, green, peaks at 0.9 × (1 - MovingShapesConfig.colour_jitter): lower min_threshold for a jitter over 0.7,
    or the dimmest clean clips read as no object). A frame shows the
    object where at least 3 of its pixels are foreground, unless they reach all four edges and cover more than
    max_area of it (a uniform wash, e.g. a collapsed generator's grey: no drawn object reaches two opposite edges),
    and a clip where at least 2 frames do.
    Colour: the palette colour closest in direction (cosine) to the mean foreground RGB, so brightness
    does not matter. Direction: least-squares slope of the centroid over frames; the larger of |dx/dt|,
    |dy/dt| and its sign. Shape, per frame then the median over frames: the apex-up triangle narrows
    upwards (mean row width of the top third / bottom third of its bounding box < triangle_taper, ~0.2
    drawn, ~0.4 decoded), otherwise the fill ratio (area / bounding box) tells square (1) from circle
    (π/4 ≈ 0.79); the cut sits below their midpoint because decoded edges are soft and a blurred square
    loses its corners first (~0.91 after the VAE). A fill under circle_fill is none of the three (shape -1, a miss):
    two objects, a ring, a smear or a triangle not apex up (fill ~0.5) read as 'circle', a hit for circle prompts;
    drawn circles fill 0.77-0.80, blurred ones >= 0.74, 5-6 px ones >= 0.75, the trained model's decoded ones in
    docs/video 0.81-0.87 (0 keeps the old reading). Objects under ~9 px are too coarse for it: a rasterised circle of
    5-6 px is a few stepped rows: one with a short top row tapers and reads as a triangle, a boxy one as a square (13%
    of the 'tiny' preset's clean 5-6 px circles misread: 12% as triangles, 1.5% as squares).

    Thresholds outside their ranges are refused by name: rel_threshold in (0, 1), min_threshold in [0, 1),
    square_fill and max_area in (0, 1], triangle_taper > 0, min_speed >= 0, circle_fill in [0, square_fill).

    value_range: the clips' (black, white), e.g. (0, 1) for frames / 255; None: (-1, 1), refused for a batch with no
    pixel below 0 (frames in [0, 1] read with [-1, 1]'s black at 0.5 as a wash: every clip 'no object') unless it is
    one uniform value (no object in either range). Decoder overshoot past either end is read as it is.
    videos_BTHWC: [B, T, H, W, 3] floats (B may be 0). Returns colour, shape, direction [B] ints; fill, taper [B];
    rgb [B, 3].
    """
    videos_BTHWC = np.asarray(videos_BTHWC)
    if videos_BTHWC.ndim != 5 or videos_BTHWC.shape[-1] != 3:  # one clip [T, H, W, 3] failed in a numpy broadcast
        raise ValueError(f"measure: videos_BTHWC must be [B, T, H, W, 3], got {list(videos_BTHWC.shape)} (one clip: "
                         "pass clip[None])")
    if videos_BTHWC.dtype.kind in "biu" and value_range is None:  # min_threshold is in [0, 1] units: with uint8
        # [0, 255] read as [-1, 1] a black clip read as an object, not as none (bfloat16, numpy kind 'V', is a float)
        raise ValueError(f"measure: videos must be floats in [-1, 1], got {videos_BTHWC.dtype} (uint8 [0, 255] from "
                         "load_video_model's sample: pass videos / 127.5 - 1, or value_range=(0, 255))")
    _check_measure_args(rel_threshold=rel_threshold, min_threshold=min_threshold, square_fill=square_fill,
                        triangle_taper=triangle_taper, max_area=max_area, min_speed=min_speed, circle_fill=circle_fill)
    if circle_fill >= square_fill:  # every object under square_fill read as no shape: no clip could read 'circle'
        raise ValueError(f"measure: circle_fill={circle_fill!r} must be below square_fill={square_fill!r} (the fill "
                         "ratios from circle_fill to square_fill read as a circle)")
    B, T, H, W = videos_BTHWC.shape[:4]
    if B == 0:  # an empty batch failed in a reshape: nothing to read
        return {"colour": np.zeros(0, int), "shape": np.zeros(0, int), "direction": np.zeros(0, int),
                "fill": np.zeros(0), "taper": np.zeros(0), "rgb": np.zeros((0, 3), np.float32)}
    if min(T, H, W) == 0:  # failed as a bare numpy "zero-size array to reduction" error
        raise ValueError(f"measure: clips of shape [T, H, W] = {[T, H, W]} hold no pixels")
    x = np.asarray(videos_BTHWC, np.float32)
    if value_range is None:
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi > lo:
            raise ValueError(f"measure: no pixel of these clips is below 0 (values in [{lo:.3g}, {hi:.3g}]): clips in "
                             "[0, 1] read as [-1, 1] put black at mid-grey and every clip reads as no object; pass "
                             "value_range=(0, 1) for them, or value_range=(-1, 1) if they really are in [-1, 1]")
        value_range = (-1.0, 1.0)
    black, white = value_range
    if not (np.isfinite(black) and np.isfinite(white) and black < white):
        raise ValueError(f"measure: value_range={value_range!r} must be finite (black, white) with black < white, "
                         "e.g. (-1, 1) or (0, 1)")
    v = (x - black) / (white - black)
    bright_BTSS = v.max(-1)
    peak_B = bright_BTSS.reshape(B, -1).max(1)
    fg_BTSS = bright_BTSS > np.maximum(rel_threshold * peak_B, min_threshold)[:, None, None, None]
    count_BT = fg_BTSS.sum((2, 3))
    # a uniform frame (a collapsed generator's grey) passes the cut everywhere: it read as a square moving right
    # no drawn object reaches two opposite edges (it moves inside the frame), and a large one is still no wash
    edges_BT = fg_BTSS.any(3)[..., [0, -1]].all(-1) & fg_BTSS.any(2)[..., [0, -1]].all(-1)
    washed_BT = edges_BT & (count_BT > max_area * H * W)
    seen_BT = (count_BT >= 3) & ~washed_BT
    fg_BTSS = fg_BTSS & ~washed_BT[:, :, None, None]  # nor does a washed frame's colour count in the clip's
    count_BT = np.where(washed_BT, 0, count_BT)
    valid_B = seen_BT.sum(1) >= 2

    rgb_B3 = (v * fg_BTSS[..., None]).sum((1, 2, 3)) / np.maximum(count_BT.sum(1), 1)[:, None]
    pal_K3 = np.asarray(list(COLOURS.values()), np.float32)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)  # noqa: E731
    colour_B = np.argmax(unit(rgb_B3) @ unit(pal_K3).T, axis=1)

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cnt = np.maximum(count_BT, 1)
    cx_BT = (fg_BTSS * xx).sum((2, 3)) / cnt
    cy_BT = (fg_BTSS * yy).sum((2, 3)) / cnt
    t_T = np.arange(T, dtype=np.float32)

    def slope(c_BT):  # least squares over the frames that show the object
        w = seen_BT.astype(np.float32)
        n = np.maximum(w.sum(1), 1)
        tm = (w * t_T).sum(1) / n
        cm = (w * c_BT).sum(1) / n
        cov = (w * (t_T - tm[:, None]) * (c_BT - cm[:, None])).sum(1)
        var = (w * (t_T - tm[:, None]) ** 2).sum(1)
        return cov / np.maximum(var, 1e-6)

    sx, sy = slope(cx_BT), slope(cy_BT)
    names = list(DIRECTIONS)
    horizontal = np.abs(sx) >= np.abs(sy)
    direction_B = np.where(horizontal, np.where(sx < 0, names.index("left"), names.index("right")),
                           np.where(sy < 0, names.index("up"), names.index("down")))
    # a clip whose object stays put has no direction: a zero slope read as 'right', a hit for 'moving right' prompts
    direction_B = np.where(np.maximum(np.abs(sx), np.abs(sy)) < min_speed, -1, direction_B)

    fill_BT = np.full((B, T), np.nan)
    taper_BT = np.full((B, T), np.nan)
    for b, t in zip(*np.nonzero(seen_BT)):
        m = fg_BTSS[b, t]
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        fill_BT[b, t] = m.sum() / (h * w)
        widths = m[rows[0]:rows[-1] + 1].sum(1)
        k = max(1, h // 3)
        taper_BT[b, t] = widths[:k].mean() / max(widths[-k:].mean(), 1e-6)
    with np.errstate(all="ignore"):
        fill_B = np.where(valid_B, np.nanmedian(np.where(valid_B[:, None], fill_BT, 0.0), axis=1), np.nan)
        taper_B = np.where(valid_B, np.nanmedian(np.where(valid_B[:, None], taper_BT, 1.0), axis=1), np.nan)
    shape_B = np.where(taper_B < triangle_taper, SHAPES.index("triangle"),
                       np.where(fill_B >= square_fill, SHAPES.index("square"),
                                np.where(fill_B >= circle_fill, SHAPES.index("circle"), -1)))

    bad = ~valid_B
    return {"colour": np.where(bad, -1, colour_B), "shape": np.where(bad, -1, shape_B),
            "direction": np.where(bad, -1, direction_B), "fill": fill_B, "taper": taper_B, "rgb": rgb_B3}


# each knob's range: (low, high, low inclusive, high inclusive). rel_threshold=50 (a percent) or NaN cut every pixel,
# and every clip read as 'no object', silently; rel_threshold=1 too (a pixel must exceed the cut)
_MEASURE_RANGES = {"rel_threshold": (0, 1, False, False), "min_threshold": (0, 1, True, False),
                   "square_fill": (0, 1, False, True), "triangle_taper": (0, math.inf, False, False),
                   "max_area": (0, 1, False, True), "min_speed": (0, math.inf, True, False),
                   "circle_fill": (0, 1, True, False)}


def _check_measure_args(**knobs) -> None:
    """Each of measure's thresholds a real number in its range, or a ValueError naming it."""
    for name, v in knobs.items():
        lo, hi, lo_in, hi_in = _MEASURE_RANGES[name]
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and (
            (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi))  # NaN fails both
        if not ok:
            span = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"measure: {name}={v!r} must be a number in {span} (default "
                             f"{inspect.signature(measure).parameters[name].default})")


def chance(attribute: str) -> float:
    """Accuracy of guessing one attribute uniformly at random (1 / its number of values, whatever the label mix)."""
    sizes = {"colour": len(COLOURS), "shape": len(SHAPES), "direction": len(DIRECTIONS)}
    if attribute not in sizes:  # 'color' was a bare KeyError
        raise ValueError(f"chance: attribute={attribute!r} must be one of {tuple(sizes)}")
    return 1.0 / sizes[attribute]
