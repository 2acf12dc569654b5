"""Deterministic procedural scenes and one-word visual questions (Pillow + numpy, no downloads).

A scene is first sampled as a plain, JSON-serialisable *description* (``dict``); the picture, the per-pixel
label map and every answer are derived from that description, so they cannot disagree:

* :func:`sample_scene` - draw a description from a ``numpy`` generator (objects, a digit plate, background).
* :func:`render` - the RGB picture of a description (``PIL.Image``, 224 x 224 by default).
* :func:`label_map` - which object / digit plate covers each pixel; :func:`patch_targets` - per-patch
  classes (colour, shape, digit) on the ViT grid, used as dense training supervision.
* :func:`make_questions` / :func:`question_of_type` - questions with one-word exact-match answers.
* :func:`make_sample` - all of the above for ``(split, seed, index)``: the same triple always gives the same
  scene, picture and questions; splits use disjoint random streams (``train`` / ``val`` / ``test``).

Scene content: 1-7 objects (circle, square, triangle, cross; eight colours; a small and a large size) placed
without overlap on a textured or noisy grey background, and (in 80 % of scenes) one small rendered digit on
a light plate. Small objects and the digit cover only a few 14 px patches: that fine detail is what token
pruning can lose.

Question types (:data:`QUESTION_TYPES`):

``exists``   "is there a red circle ?" -> yes / no; half the questions are negatives, mostly *hard* ones
             (the colour or the shape is present, but not together).
``colour``   "what colour is the triangle ?" (a shape present exactly once) -> a colour word.
``count``    "how many squares are there ?" or "how many blue objects are there ?" -> zero ... seven.
``position`` "is the red circle left or right of the blue square ?" / "... above or below ..." -> a word;
             only asked when the two centres differ by >= 20 px along that axis.
``digit``    "what digit is shown ?" -> 0 ... 9.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "QUESTION_TYPES",
    "SHAPES",
    "SPLITS",
    "SceneConfig",
    "label_map",
    "make_questions",
    "make_sample",
    "patch_targets",
    "question_of_type",
    "referents",
    "render",
    "sample_scene",
    "vocabulary",
]

#: Colour names and their exact RGB fill.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (250, 130, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven")
#: Class ids of :func:`patch_targets` (0 is "none"); plurals name the same shape.
COLOUR_IDS: dict[str, int] = {name: k + 1 for k, name in enumerate(COLOURS)}
SHAPE_IDS: dict[str, int] = {**{name: k + 1 for k, name in enumerate(SHAPES)},
                             **{PLURALS[name]: k + 1 for k, name in enumerate(SHAPES)}}
QUESTION_TYPES: tuple[str, ...] = ("exists", "colour", "count", "position", "digit")
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "checker", "blobs")
#: Random stream per split: the same (seed, index) gives unrelated scenes in different splits.
SPLITS = {"train": 0, "val": 1, "test": 2}
DIGIT_PLATE = (235, 235, 225)
DIGIT_INK = (20, 20, 20)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Scene difficulty knobs. The defaults are the benchmark; training curricula use easier variants."""

    size: int = 224
    min_objects: int = 1
    max_objects: int = 7
    small_px: int = 28  # object extent (bounding-box side) in pixels: 2-3 patches of 14 px
    large_px: int = 40
    digit_prob: float = 0.8
    digit_font_px: int = 28
    max_per_shape: int = 5  # so counts stay within COUNT_WORDS comfortably
    global_noise: float = 5.0  # mild noise over the whole picture (objects included)

    @classmethod
    def easy(cls) -> SceneConfig:
        """Curriculum scenes: few, large objects and a big digit."""
        return cls(min_objects=1, max_objects=3, small_px=36, large_px=48, digit_font_px=32)


def vocabulary() -> list[str]:
    """Every word the questions and answers use (tokenizer vocabulary, without special tokens)."""
    words = {
        "is", "there", "a", "an", "what", "colour", "the", "how", "many", "are", "objects", "of", "or",
        "left", "right", "above", "below", "digit", "shown", "yes", "no", "?",
    }
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(COUNT_WORDS)
    words.update(str(d) for d in range(10))
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------------------------


def _overlaps(box, boxes, margin: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def _place(rng: np.random.Generator, w: int, h: int, size: int, boxes, margin: int = 4, tries: int = 200):
    for _ in range(tries):
        x0 = int(rng.integers(margin, size - w - margin + 1))
        y0 = int(rng.integers(margin, size - h - margin + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, boxes, margin):
            return box
    return None


def _digit_font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> dict[str, Any]:
    """A scene description drawn from ``rng`` (JSON-serialisable; see the module docstring)."""
    size = config.size
    grey = int(rng.integers(80, 176))
    tint = rng.integers(-15, 16, size=3)
    background = {
        "kind": BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        "base": [int(np.clip(grey + t, 0, 255)) for t in tint],
        "noise": float(rng.uniform(8.0, 22.0)),
        "contrast": float(rng.uniform(10.0, 30.0)),
        "period": int(rng.integers(6, 20)),
        "seed": int(rng.integers(2**31 - 1)),
    }
    boxes: list[tuple[int, int, int, int]] = []
    digits = []
    if rng.random() < config.digit_prob:
        value = int(rng.integers(10))
        font = _digit_font(config.digit_font_px)
        left, top, right, bottom = font.getbbox(str(value))
        pad = max(2, config.digit_font_px // 6)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        box = _place(rng, w, h, size, boxes)
        if box is not None:
            boxes.append(box)
            digits.append(
                {
                    "value": value,
                    "bbox": list(box),
                    "cx": (box[0] + box[2]) / 2,
                    "cy": (box[1] + box[3]) / 2,
                    "font_px": config.digit_font_px,
                    "text_xy": [box[0] + pad - left, box[1] + pad - top],
                }
            )
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects = []
    shape_counts: Counter = Counter()
    colour_names = list(COLOURS)
    for _ in range(n_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if shape_counts[shape] >= config.max_per_shape:
            continue
        colour = colour_names[int(rng.integers(len(colour_names)))]
        large = bool(rng.random() < 0.5)
        extent = config.large_px if large else config.small_px
        box = _place(rng, extent, extent, size, boxes)
        if box is None:
            continue
        boxes.append(box)
        shape_counts[shape] += 1
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "rgb": list(COLOURS[colour]),
                "size": "large" if large else "small",
                "extent": extent,
                "bbox": list(box),
                "cx": (box[0] + box[2]) / 2,
                "cy": (box[1] + box[3]) / 2,
            }
        )
    return {
        "version": 1,
        "width": size,
        "height": size,
        "background": background,
        "objects": objects,
        "digits": digits,
        "global_noise": config.global_noise,
        "noise_seed": int(rng.integers(2**31 - 1)),
    }


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, box) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    if shape == "triangle":
        return [(x0 + w / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    if shape == "cross":
        t = w / 3
        return [
            (x0 + t, y0), (x1 - t, y0), (x1 - t, y0 + t), (x1, y0 + t), (x1, y1 - t), (x1 - t, y1 - t),
            (x1 - t, y1), (x0 + t, y1), (x0 + t, y1 - t), (x0, y1 - t), (x0, y0 + t), (x0 + t, y0 + t),
        ]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, box), fill=fill)


def _background(desc: dict[str, Any]) -> np.ndarray:
    bg = desc["background"]
    h, w = desc["height"], desc["width"]
    rng = np.random.default_rng(bg["seed"])
    base = np.asarray(bg["base"], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # noqa: RUF059 - not every texture uses both
    period, contrast = bg["period"], bg["contrast"]
    if bg["kind"] == "stripes":
        angle = rng.uniform(0, np.pi)
        texture = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif bg["kind"] == "checker":
        texture = (((xx // period) + (yy // period)) % 2) * 2.0 - 1.0
    elif bg["kind"] == "blobs":
        coarse = rng.standard_normal((h // 16 + 2, w // 16 + 2), dtype=np.float32)
        texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    else:  # noise only, with a soft gradient
        texture = (yy / h - 0.5) * 2.0
    pixels = base[None, None, :] + contrast * texture[:, :, None]
    pixels = pixels + bg["noise"] * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render(desc: dict[str, Any]) -> Image.Image:
    """The RGB picture of a scene description (deterministic)."""
    image = Image.fromarray(_background(desc), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in desc["objects"]:
        _draw_shape(draw, obj["shape"], obj["bbox"], tuple(obj["rgb"]))
    for digit in desc["digits"]:
        x0, y0, x1, y1 = digit["bbox"]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=DIGIT_PLATE)
        draw.text(tuple(digit["text_xy"]), str(digit["value"]), fill=DIGIT_INK, font=_digit_font(digit["font_px"]))
    if desc.get("global_noise", 0) > 0:
        rng = np.random.default_rng(desc["noise_seed"])
        arr = np.asarray(image, dtype=np.float32)
        arr = arr + desc["global_noise"] * rng.standard_normal(arr.shape, dtype=np.float32)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    return image


def label_map(desc: dict[str, Any]) -> np.ndarray:
    """``(H, W)`` int16: 0 background, ``i + 1`` object ``i``, ``-(j + 1)`` digit plate ``j``."""
    canvas = Image.new("I", (desc["width"], desc["height"]), 0)
    draw = ImageDraw.Draw(canvas)
    for i, obj in enumerate(desc["objects"]):
        _draw_shape(draw, obj["shape"], obj["bbox"], i + 1)
    for j, digit in enumerate(desc["digits"]):
        x0, y0, x1, y1 = digit["bbox"]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=-(j + 1))
    return np.asarray(canvas, dtype=np.int32).astype(np.int16)


#: Class counts of :func:`patch_targets` (0 is always "background / none").
PATCH_CLASSES = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "digit": 11, "centre": 2}


def patch_targets(desc: dict[str, Any], patch: int = 14, min_cover: float = 0.2) -> dict[str, np.ndarray]:
    """Per-patch classes on the ``(H/patch) x (W/patch)`` grid, flattened row-major (the ViT token order).

    ``colour`` (0 none, 1..8), ``shape`` (0 none, 1..4): the object covering the largest part of the patch if
    it covers at least ``min_cover`` of it; ``digit`` (0 none, 1..10 = value + 1) for patches on a digit
    plate; ``centre`` (1 if the patch holds an object's centre).
    """
    labels = label_map(desc)
    h, w = labels.shape
    gh, gw = h // patch, w // patch
    blocks = labels[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(gh * gw, patch * patch)
    out = {key: np.zeros(gh * gw, dtype=np.int64) for key in PATCH_CLASSES}
    need = min_cover * patch * patch
    for i, obj in enumerate(desc["objects"]):
        cover = (blocks == i + 1).sum(axis=1)
        best = cover >= need
        out["colour"][best] = COLOUR_IDS[obj["colour"]]
        out["shape"][best] = SHAPE_IDS[obj["shape"]]
        cy, cx = min(int(obj["cy"]) // patch, gh - 1), min(int(obj["cx"]) // patch, gw - 1)
        out["centre"][cy * gw + cx] = 1
    for j, digit in enumerate(desc["digits"]):
        cover = (blocks == -(j + 1)).sum(axis=1)
        out["digit"][cover >= need] = digit["value"] + 1
    return out


def referents(targets: dict[str, np.ndarray], item: dict[str, str]) -> np.ndarray:
    """Per patch: 1 on the object(s) the question is about, 2 on the second object of a position question,
    0 elsewhere. The target of the ``--match-weight`` probe (question-first only)."""
    words = item["question"].split()
    colours = [COLOUR_IDS[w] for w in words if w in COLOUR_IDS]
    shapes = [SHAPE_IDS[w] for w in words if w in SHAPE_IDS]
    out = np.zeros_like(targets["colour"])
    if item["type"] == "digit":
        out[targets["digit"] > 0] = 1
        return out
    pairs = list(zip(colours, shapes)) if item["type"] in ("exists", "position") else [
        (colours[0] if colours else None, shapes[0] if shapes else None)]
    for k, (colour, shape) in enumerate(pairs[:2]):
        hit = np.ones_like(out, dtype=bool)
        if colour is not None:
            hit &= targets["colour"] == colour
        if shape is not None:
            hit &= targets["shape"] == shape
        out[hit] = k + 1
    return out


def scene_targets(desc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Whole-image targets for the CLS head: ``present`` (colour x shape multi-hot, 32), ``shape_count``
    (count per shape, clipped to 7), ``digit`` (0 none, value + 1)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    present = np.zeros(len(colours) * len(shapes), dtype=np.float32)
    counts = np.zeros(len(shapes), dtype=np.int64)
    for obj in desc["objects"]:
        s = shapes.index(obj["shape"])
        present[colours.index(obj["colour"]) * len(shapes) + s] = 1.0
        counts[s] += 1
    digit = desc["digits"][0]["value"] + 1 if desc["digits"] else 0
    return {"present": present, "shape_count": np.minimum(counts, len(COUNT_WORDS) - 1), "digit": np.int64(digit)}


# ----------------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------------


def _name(obj) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _unique_objects(desc) -> list[dict[str, Any]]:
    names = Counter(_name(o) for o in desc["objects"])
    return [o for o in desc["objects"] if names[_name(o)] == 1]


def _exists(desc, rng):
    present = {(o["colour"], o["shape"]) for o in desc["objects"]}
    colours_present = {c for c, _ in present}
    shapes_present = {s for _, s in present}
    if present and rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        hard = [(c, s) for c, s in absent if c in colours_present or s in shapes_present]
        pool = hard if hard and rng.random() < 0.8 else absent
        colour, shape = pool[int(rng.integers(len(pool)))]
        answer = "no"
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape} ?", answer


def _colour(desc, rng):
    counts = Counter(o["shape"] for o in desc["objects"])
    candidates = [o for o in desc["objects"] if counts[o["shape"]] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return f"what colour is the {obj['shape']} ?", obj["colour"]


def _count(desc, rng):
    if rng.random() < 0.6:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n = sum(o["shape"] == shape for o in desc["objects"])
        question = f"how many {PLURALS[shape]} are there ?"
    else:
        colours = list(COLOURS)
        # favour colours that are present, so answers are not mostly "zero"
        present = sorted({o["colour"] for o in desc["objects"]})
        pool = present if present and rng.random() < 0.75 else colours
        colour = pool[int(rng.integers(len(pool)))]
        n = sum(o["colour"] == colour for o in desc["objects"])
        question = f"how many {colour} objects are there ?"
    return question, COUNT_WORDS[min(n, len(COUNT_WORDS) - 1)]


def _position(desc, rng, min_gap: float = 20.0):
    objs = _unique_objects(desc)
    pairs = []
    for a in objs:
        for b in objs:
            if a is b:
                continue
            if abs(a["cx"] - b["cx"]) >= min_gap:
                pairs.append((a, b, "x"))
            if abs(a["cy"] - b["cy"]) >= min_gap:
                pairs.append((a, b, "y"))
    if not pairs:
        return None
    a, b, axis = pairs[int(rng.integers(len(pairs)))]
    if axis == "x":
        return f"is the {_name(a)} left or right of the {_name(b)} ?", "left" if a["cx"] < b["cx"] else "right"
    return f"is the {_name(a)} above or below the {_name(b)} ?", "above" if a["cy"] < b["cy"] else "below"


def _digit(desc, rng):
    if not desc["digits"]:
        return None
    return "what digit is shown ?", str(desc["digits"][0]["value"])


_MAKERS = {"exists": _exists, "colour": _colour, "count": _count, "position": _position, "digit": _digit}


def question_of_type(desc: dict[str, Any], rng: np.random.Generator, qtype: str) -> dict[str, str] | None:
    """One question of type ``qtype`` about ``desc`` (``None`` when the scene cannot support it)."""
    made = _MAKERS[qtype](desc, rng)
    if made is None:
        return None
    return {"type": qtype, "question": made[0], "answer": made[1]}


def make_questions(
    desc: dict[str, Any], rng: np.random.Generator, n: int, types: tuple[str, ...] = QUESTION_TYPES,
    weights: tuple[float, ...] | None = None,
) -> list[dict[str, str]]:
    """``n`` questions (distinct texts) with types drawn from ``types`` (optionally weighted)."""
    probs = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(n * 6):
        if len(out) >= n:
            break
        qtype = types[int(rng.choice(len(types), p=probs))]
        qa = question_of_type(desc, rng, qtype)
        if qa is None or qa["question"] in seen:
            continue
        seen.add(qa["question"])
        out.append(qa)
    return out


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` in ``split`` for ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def make_sample(
    index: int, seed: int = 0, split: str = "train", config: SceneConfig = SceneConfig(), n_questions: int = 8,
    types: tuple[str, ...] = QUESTION_TYPES, weights: tuple[float, ...] | None = None, image: bool = True,
) -> dict[str, Any]:
    """``{"scene": description, "image": PIL picture (if image), "qa": [{"type","question","answer"}]}``."""
    rng = scene_rng(split, seed, index)
    desc = sample_scene(rng, config)
    qa = make_questions(desc, rng, n_questions, types, weights)
    return {"scene": desc, "image": render(desc) if image else None, "qa": qa}


def questions_in_rotation(split: str = "val", seed: int = 0):
    """Endless ``(index, description, qa)``: scenes ``0, 1, ...`` of ``split`` with one question each, types in
    rotation (a scene that cannot support the next type is skipped). Shipped samples and exports use it."""
    index, made = 0, 0
    while True:
        rng = scene_rng(split, seed, index)
        desc = sample_scene(rng)
        qa = question_of_type(desc, rng, QUESTION_TYPES[made % len(QUESTION_TYPES)])
        if qa is not None:
            made += 1
            yield index, desc, qa
        index += 1


def export(folder: str, n: int, seed: int = 0, split: str = "val") -> str:
    """Write ``n`` scenes of ``split`` with one question each (types in rotation) as PNGs + ``data.jsonl``
    (``{"image", "prompt", "answer", "type"}`` per line: the ``--data`` format of ``vflowopt optimize``)."""
    import itertools
    import json
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (_, desc, qa) in enumerate(itertools.islice(questions_in_rotation(split, seed), n)):
        name = f"scene_{k:03d}.png"
        render(desc).save(out / name)
        lines.append(json.dumps({"image": name, "prompt": qa["question"], "answer": qa["answer"], "type": qa["type"]}))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(out / "data.jsonl")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vflowopt.vqa.scenes",
                                description="Write procedural scenes + questions as PNGs and a data.jsonl.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=sorted(SPLITS))
    args = p.parse_args(argv)
    print(export(args.out, args.n, args.seed, args.split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
