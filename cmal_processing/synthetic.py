"""The synthetic scene world: CMAL's embedded default data, seeded, fast, and correct by construction.

A scene is a small image with a few coloured shapes on a noisy grey background. What a detector would give is
simulated without knowing the answers: the regions are the objects' boxes (exact, then jittered by a pixel or two
like a detector's), plus some lower-scored "part" detections; the tags are shape names only (a detector names the
class, not the colour, so colour must be learned from the features); the region features are computed from the
pixels inside each box (`region_features_from_pixels`). Captions come from varied templates with synonyms
(`disc` for circle, `hoop` for ring, `crimson` for red, ...), so that anchoring has real work to do.

From the same scenes come the four downstream tasks with ground truth:

- VQA: 8 distinct questions per scene (`questions_per_scene`), two of each of four types where the scene allows:
  "what color is the ⟨shape⟩?" (a shape that occurs once), "what shape is the ⟨colour⟩ object?" (a colour that
  occurs once), "how many ⟨shapes⟩ are there?" (0–4, sometimes a shape the scene lacks) and "is there a ⟨colour⟩
  ⟨shape⟩?". A type the scene cannot support (no shape occurs once: no colour question) is not asked and its share
  goes to the possible types; a question is never turned into another type. Existence questions come in pairs, one
  yes and one no per pair in a seeded order, so every split has exactly as many yes as no (`vqa_questions`);
- NLVR2: statements about two images (count comparisons, existence in both / either / exactly one image); every
  scene is the left image of one pair with one true and one false statement: exactly balanced in every split;
- SNLI-VE: premise = a caption, hypotheses that are entailed, contradicted or undecidable from the image; one of
  each label per scene;
- RefCOCO+: referring expressions to one object; `region_ious` of every region with the referred box.

`build_synthetic_corpus(root, num_scenes, seed)` writes them in the column layout of `cmal_processing.schema`, the
same as the real-format builders, so every script runs on it unchanged::

    root/
      pretrain/   train, validation            (one row per image x caption)
      vqa/        train, validation + answer_vocab.json
      nlvr2/      train, validation
      snli_ve/    train, validation
      refcoco/    train, validation
      synthetic_config.json                    (seed, sizes, feature_dim, shapes, colours; written last)

Each split folder holds its task table and, in `images/`, each scene's regions once (`cmal_processing/corpus.py`);
`cmal_processing.corpus.load_corpus(root / "vqa")` reads a task with the regions joined to every row.

From the shell: ``python -m cmal_processing.synthetic --output DIR --num-scenes N --seed S [--questions-per-scene Q]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from .builders import _install_folder, _own_progress_bar_only, _prepare_root, _save_atomically, _write_text_atomically
from .corpus import image_suffixes, separate_images, split_features
from .readers import RegionsDict
from .schema import (
    ANSWER_VOCAB_FILE,
    NLVR2_LABELS,
    SNLI_VE_LABELS,
    nlvr2_features,
    pretrain_features,
    refcoco_features,
    snli_ve_features,
    vqa_features,
)

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "ring", "cross")
# Words a caption may use for a shape; each maps to the shape's concept in the default lexicon.
SHAPE_WORDS = {"circle": ("circle", "disc", "disk"), "ring": ("ring", "hoop"), "diamond": ("diamond", "rhombus")}
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215), "yellow": (235, 210, 45),
    "purple": (135, 55, 175), "orange": (240, 135, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
COLOUR_WORDS = {"red": ("red", "crimson"), "purple": ("purple", "violet"), "yellow": ("yellow", "golden")}
SIZES = {"small": (7.0, 10.0), "large": (13.0, 18.0)}  # radius range in pixels
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUND = (128, 128, 128)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")
MATERIALS = ("wood", "paper", "metal", "glass", "plastic")
DEFAULT_IMAGE_SIZE = (128, 128)
DEFAULT_FEATURE_DIM = 64
CONFIG_FILE = "synthetic_config.json"
TASKS = ("pretrain", "vqa", "nlvr2", "snli_ve", "refcoco")

# --------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {rng!r}")
    return rng


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Pixels (offsets `dx`, `dy` from the centre) covered by `shape` of the given radius."""
    x, y = dx / radius, dy / radius
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.82
    if shape == "triangle":  # apex up, base at y = 0.8
        return (y <= 0.8) & (y >= -1.0) & (np.abs(x) <= (y + 1.0) / 1.8)
    if shape == "star":
        angle = np.arctan2(y, x) + np.pi / 2
        return np.hypot(x, y) <= 0.55 + 0.45 * np.cos(5 * angle) ** 2
    if shape == "heart":
        u, v = 1.25 * x, -1.25 * y + 0.25
        return (u**2 + v**2 - 1.0) ** 3 - u**2 * v**3 <= 0.0
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "ring":
        distance = np.hypot(x, y)
        return (distance <= 1.0) & (distance >= 0.55)
    if shape == "cross":
        return ((np.abs(x) <= 0.33) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= 0.33) & (np.abs(x) <= 1.0))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _object_pixels(obj: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the pixels an object covers."""
    cx, cy, radius = obj["center"][0], obj["center"][1], obj["radius"]
    span = int(math.ceil(radius)) + 1
    ys, xs = np.mgrid[int(cy) - span:int(cy) + span + 1, int(cx) - span:int(cx) + span + 1]
    mask = _shape_mask(obj["shape"], xs - cx, ys - cy, radius)
    return ys[mask], xs[mask]


def _position_word(center: Sequence[float], image_size: tuple[int, int]) -> str:
    """Where an object lies: the stronger of its horizontal and vertical offsets from the image centre."""
    width, height = image_size
    x, y = center[0] / width - 0.5, center[1] / height - 0.5
    if abs(x) >= abs(y):
        return "on the left" if x < 0 else "on the right"
    return "at the top" if y < 0 else "at the bottom"


def generate_scene(rng: np.random.Generator, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                   min_objects: int = 1, max_objects: int = 4, partial_caption_probability: float = 0.0) -> dict:
    """A random scene: `max_objects` at most non-overlapping shapes, each a distinct (shape, colour) pair.

    Returns a dict with `image_size` `(width, height)`, `objects` (dicts with `shape`, `colour`, `size`, `center`,
    `radius`, `box` — exact `x1, y1, x2, y2` pixel bounds of the drawn pixels — and `position`), `captions` (three
    captions from different templates; see `caption` for `partial_caption_probability`) and `noise_seed` (the
    background noise of `render_scene`).
    """
    rng = _check_rng(rng)
    _check_probability(partial_caption_probability, "partial_caption_probability")
    width, height = (_check_positive_int(value, "image_size") for value in image_size)
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    count = int(rng.integers(min_objects, max_objects + 1))
    objects, used = [], set()
    for _ in range(count * 20):
        if len(objects) == count:
            break
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        if (shape, colour) in used:
            continue
        size = "small" if rng.random() < 0.5 else "large"
        radius = float(rng.uniform(*SIZES[size]))
        margin = radius + 2
        if 2 * margin >= min(width, height):
            raise ValueError(f"image_size {image_size} is too small for a {size} shape")
        center = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
        if any(math.dist(center, other["center"]) < radius + other["radius"] + 3 for other in objects):
            continue
        obj = {"shape": shape, "colour": colour, "size": size, "center": center, "radius": radius}
        rows, columns = _object_pixels(obj)
        obj["box"] = (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
        obj["position"] = _position_word(center, (width, height))
        objects.append(obj)
        used.add((shape, colour))
    scene = {"image_size": (width, height), "objects": objects, "noise_seed": int(rng.integers(2**31))}
    scene["captions"] = [caption(scene, rng, template, partial_caption_probability)
                         for template in rng.permutation(len(CAPTION_TEMPLATES))[:3]]
    return scene


def render_scene(scene: dict) -> np.ndarray:
    """The scene's pixels, `uint8` `[H, W, 3]`: background grey with seeded noise, shapes drawn in order."""
    width, height = scene["image_size"]
    noise = np.random.default_rng(scene["noise_seed"]).normal(0.0, 6.0, size=(height, width, 3))
    image = np.clip(np.asarray(BACKGROUND, dtype=np.float64) + noise, 0, 255)
    for obj in scene["objects"]:
        rows, columns = _object_pixels(obj)
        image[rows, columns] = COLOURS[obj["colour"]]
    return image.round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Region features from pixels
# --------------------------------------------------------------------------------------------------------------

_PROTOTYPES = np.asarray([BACKGROUND, *COLOURS.values()], dtype=np.float32) / 255.0
_GRID = 6
_BASE_DIM = len(_PROTOTYPES) + _GRID * _GRID + 3 + 3 + 3


def _projection(feature_dim: int) -> np.ndarray | None:
    """A fixed random projection from the base descriptor to `feature_dim` (None when the sizes agree)."""
    if feature_dim == _BASE_DIM:
        return None
    matrix = np.random.default_rng(20220710).normal(size=(_BASE_DIM, feature_dim)).astype(np.float32)
    return (matrix / np.sqrt(_BASE_DIM)).astype(np.float32)


def region_features_from_pixels(pixels: np.ndarray, boxes: np.ndarray, feature_dim: int = DEFAULT_FEATURE_DIM
                                ) -> np.ndarray:
    """Detector-free region features computed only from the pixels inside each box.

    Per box: the share of pixels nearest to each colour prototype (background grey and the eight colours), a 6 x 6
    grid of foreground occupancy (how far each cell is from the background, estimated from the image border), the
    mean and standard deviation of the colour, and the box geometry (width, height, fill ratio). This base
    descriptor (57 values) is mapped to `feature_dim` by a fixed random projection.

    Args:
        pixels: `uint8` `[H, W, 3]`.
        boxes: `[M, 4]` `x1, y1, x2, y2` in pixels.
        feature_dim: output size `Dv`.
    Returns: `float32` `[M, feature_dim]`.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be an [H, W, 3] array, got shape {pixels.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    feature_dim = _check_positive_int(feature_dim, "feature_dim")
    height, width = pixels.shape[:2]
    image = pixels.astype(np.float32) / 255.0
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    features = np.zeros((len(boxes), _BASE_DIM), dtype=np.float32)
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        left, top = int(np.clip(np.floor(x1), 0, width - 1)), int(np.clip(np.floor(y1), 0, height - 1))
        right, bottom = int(np.clip(np.ceil(x2), left + 1, width)), int(np.clip(np.ceil(y2), top + 1, height))
        crop = image[top:bottom, left:right]
        flat = crop.reshape(-1, 3)
        nearest = np.argmin(((flat[:, None, :] - _PROTOTYPES[None]) ** 2).sum(-1), axis=1)
        histogram = np.bincount(nearest, minlength=len(_PROTOTYPES)) / len(flat)
        foreground = np.abs(crop - background).sum(-1)
        row_cells = np.array_split(np.arange(crop.shape[0]), _GRID)
        column_cells = np.array_split(np.arange(crop.shape[1]), _GRID)
        grid = np.asarray([[foreground[np.ix_(rows, columns)].mean() if len(rows) and len(columns) else 0.0
                            for columns in column_cells] for rows in row_cells], dtype=np.float32)
        box_width, box_height = (right - left) / width, (bottom - top) / height
        fill = float((foreground > 0.25).mean())
        features[index] = np.concatenate([histogram, grid.ravel(), flat.mean(0), flat.std(0),
                                          [box_width, box_height, fill]])
    projection = _projection(feature_dim)
    return features if projection is None else features @ projection


def scene_regions(scene: dict, image: np.ndarray, feature_dim: int = DEFAULT_FEATURE_DIM,
                  rng: np.random.Generator | None = None) -> dict:
    """What a detector would report for a rendered scene: the `regions` dict of `CmalProcessor`.

    One region per object (its box jittered by 1 pixel, 2 for large objects, score 0.75–1.0, tag = shape name) and, with a
    seeded chance, a "part" detection of an object (about half its box, score 0.3–0.6, same tag). Regions are
    shuffled. Returns `visual_feats` `[M, feature_dim]`, `visual_pos` `[M, 4]` in pixels, `image_size`, `tags` and
    `scores`: the `regions` dict `CmalProcessor` takes, as is (a `RegionsDict`: `features` / `boxes` still read, with
    a FutureWarning).
    """
    rng = _check_rng(rng) if rng is not None else np.random.default_rng(scene["noise_seed"] + 1)
    width, height = scene["image_size"]
    boxes, tags, scores = [], [], []
    for obj in scene["objects"]:
        jitter = 1 if obj["size"] == "small" else 2  # a detector's box error, kept IoU >= 0.5 with the object
        x1, y1, x2, y2 = (coordinate + rng.integers(-jitter, jitter + 1) for coordinate in obj["box"])
        boxes.append((max(0, x1), max(0, y1), min(width, max(x2, x1 + 2)), min(height, max(y2, y1 + 2))))
        tags.append(obj["shape"])
        scores.append(float(rng.uniform(0.75, 1.0)))
        if rng.random() < 0.3:
            bx1, by1, bx2, by2 = obj["box"]
            half_width, half_height = (bx2 - bx1) / 2, (by2 - by1) / 2
            px, py = bx1 + rng.uniform(0, half_width), by1 + rng.uniform(0, half_height)
            boxes.append((int(px), int(py), int(np.ceil(px + half_width)) + 1, int(np.ceil(py + half_height)) + 1))
            tags.append(obj["shape"])
            scores.append(float(rng.uniform(0.3, 0.6)))
        order = rng.permutation(len(boxes))
    boxes_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[order]
    return RegionsDict(
        visual_feats=region_features_from_pixels(image, boxes_array, feature_dim),
        visual_pos=boxes_array,
        image_size=(width, height),
        tags=[tags[index] for index in order],
        scores=np.asarray(scores, dtype=np.float32)[order],
    )


def box_iou(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """IoU of each of `boxes` `[M, 4]` with one `box` (same coordinates) → `[M]`."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x2, y2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    intersection = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Language
# --------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _shape_word(shape: str, rng: np.random.Generator, plural: bool = False) -> str:
    word = _pick(rng, SHAPE_WORDS.get(shape, (shape,)))
    if not plural:
        return word
    return word + ("es" if word.endswith(("s", "x")) else "s")


def _noun_phrase(obj: dict, rng: np.random.Generator, with_size: bool | None = None) -> str:
    with_size = rng.random() < 0.4 if with_size is None else with_size
    words = [_pick(rng, SIZE_WORDS[obj["size"]])] if with_size else []
    words += [_pick(rng, COLOUR_WORDS.get(obj["colour"], (obj["colour"],))), _shape_word(obj["shape"], rng)]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption_list(scene, rng):
    phrases = [_article(_noun_phrase(obj, rng)) for obj in rng.permutation(scene["objects"])]
    return _listing(phrases) + _pick(rng, ("", " on a grey background", " in a picture"))


def _caption_positions(scene, rng):
    return _listing([f"{_article(_noun_phrase(obj, rng))} {obj['position']}" for obj in scene["objects"]])


def _caption_count(scene, rng):
    count = len(scene["objects"])
    noun = "shape" if count == 1 else "shapes"
    return f"{NUMBER_WORDS[count]} {noun} : " + _listing([_article(_noun_phrase(obj, rng)) for obj in scene["objects"]])


def _caption_relation(scene, rng):
    objects = scene["objects"]
    if len(objects) < 2:
        return f"there is {_article(_noun_phrase(objects[0], rng))} {objects[0]['position']}"
    first, second = (objects[index] for index in rng.choice(len(objects), size=2, replace=False))
    relation = "to the left of" if first["center"][0] < second["center"][0] else "to the right of"
    return f"{_article(_noun_phrase(first, rng))} {relation} {_article(_noun_phrase(second, rng))}"


def _caption_there_is(scene, rng):
    phrases = [_article(_noun_phrase(obj, rng)) for obj in scene["objects"]]
    return _pick(rng, ("there is ", "we can see ", "the image shows ")) + _listing(phrases)


CAPTION_TEMPLATES = (_caption_list, _caption_positions, _caption_count, _caption_relation, _caption_there_is)
# The templates that stay true when they name only some of the objects (the count template claims them all).
PARTIAL_CAPTION_TEMPLATES = (_caption_list, _caption_positions, _caption_there_is)


def caption(scene: dict, rng: np.random.Generator, template: int | None = None,
            partial_caption_probability: float = 0.0) -> str:
    """A caption of the scene from one template (random when `template` is None).

    With probability `partial_caption_probability`, a caption of a listing template (`PARTIAL_CAPTION_TEMPLATES`) of
    a scene with several objects names a random proper subset of them, as people's captions name the objects they
    notice ("we can see a white square" of a three-shape scene). At 0 (the default) every listing names every object
    and no random number is drawn for it, so a seed's captions are those of a world without the option.
    """
    _check_probability(partial_caption_probability, "partial_caption_probability")
    index = int(rng.integers(len(CAPTION_TEMPLATES))) if template is None else int(template)
    objects = scene["objects"]
    if (partial_caption_probability > 0 and CAPTION_TEMPLATES[index] in PARTIAL_CAPTION_TEMPLATES
            and len(objects) > 1 and rng.random() < partial_caption_probability):
        keep = rng.choice(len(objects), size=int(rng.integers(1, len(objects))), replace=False)
        scene = dict(scene, objects=[objects[position] for position in sorted(keep)])
    return CAPTION_TEMPLATES[index](scene, rng)


def _check_probability(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------


def _count(scene: dict, shape: str | None = None, colour: str | None = None) -> int:
    return sum((shape is None or obj["shape"] == shape) and (colour is None or obj["colour"] == colour)
               for obj in scene["objects"])


QUESTION_TYPES = ("what color is the", "what shape is the", "how many", "is there a")
DEFAULT_QUESTIONS_PER_SCENE = 8


def _question_capacity(scene: dict) -> dict[str, int]:
    """How many distinct questions of each type the scene supports: a colour question per shape that occurs once,
    a shape question per colour that occurs once, a count question per shape of the world, and an existence pair
    (one yes, one no: two questions) per object."""
    objects = scene["objects"]
    return {"what color is the": sum(_count(scene, shape=obj["shape"]) == 1 for obj in objects),
            "what shape is the": sum(_count(scene, colour=obj["colour"]) == 1 for obj in objects),
            "how many": len(SHAPES),
            "is there a": 2 * len(objects)}


def _question_quota(scene: dict, rng: np.random.Generator, num_questions: int) -> dict[str, int]:
    """How many questions of each type to ask: the types take turns, the one with the fewest questions so far
    first (ties in a seeded order), each only while the scene supports another question of it; existence questions
    come two at a time (a yes and a no). A type the scene cannot support gives its turns to the others."""
    capacity = _question_capacity(scene)
    order = [QUESTION_TYPES[index] for index in rng.permutation(len(QUESTION_TYPES))]
    quota = dict.fromkeys(QUESTION_TYPES, 0)
    while (remaining := num_questions - sum(quota.values())) > 0:
        step = {kind: 2 if kind == "is there a" else 1 for kind in QUESTION_TYPES}
        open_kinds = [kind for kind in order if step[kind] <= remaining and quota[kind] + step[kind] <= capacity[kind]]
        if not open_kinds:
            break
        kind = min(open_kinds, key=lambda name: quota[name])  # min keeps the first of equals: the seeded order
        quota[kind] += step[kind]
    return quota


def vqa_questions(scene: dict, rng: np.random.Generator, num_questions: int = DEFAULT_QUESTIONS_PER_SCENE
                  ) -> list[dict]:
    """Up to `num_questions` distinct questions about the scene, each a dict `question_type`, `text`, `answer`.

    The four types (`QUESTION_TYPES`), each asked only where the scene supports it and always answered as its type:

    - "what color is the ⟨shape⟩?": the colour of a shape that occurs exactly once;
    - "what shape is the ⟨colour⟩ object?": the shape of a colour that occurs exactly once;
    - "how many ⟨shapes⟩ are there?": the count (0–4) of a shape, one of the scene's 60 % of the time, else any;
    - "is there a ⟨colour⟩ ⟨shape⟩?": existence, in pairs: one question whose answer is yes (an object of the scene)
      and one whose answer is no (an object of the scene with its colour or its shape changed), in a seeded order,
      so that every scene, hence every split, has exactly as many yes as no.

    `num_questions` is how many questions the scene gets, shared as evenly as the scene allows among the types
    (8: two of each type; see `_question_quota`). A type the scene cannot support (no shape occurs once: no colour
    question) is not asked, and its share goes to the types that are possible; never is a question of one type
    turned into another. Fewer than `num_questions` come back only when the scene supports no more distinct
    questions. Questions come in a seeded order.
    """
    num_questions = _check_positive_int(num_questions, "num_questions")
    quota = _question_quota(scene, rng, num_questions)
    objects = scene["objects"]
    questions = []
    unique_shape = [obj for obj in objects if _count(scene, shape=obj["shape"]) == 1]
    for index in rng.permutation(len(unique_shape))[:quota["what color is the"]]:
        obj = unique_shape[index]
        text = f"what color is the {_shape_word(obj['shape'], rng)}?"
        questions.append({"question_type": "what color is the", "text": text, "answer": obj["colour"]})
    unique_colour = [obj for obj in objects if _count(scene, colour=obj["colour"]) == 1]
    for index in rng.permutation(len(unique_colour))[:quota["what shape is the"]]:
        obj = unique_colour[index]
        text = (f"what shape is the {_pick(rng, COLOUR_WORDS.get(obj['colour'], (obj['colour'],)))} "
                f"{_pick(rng, ('object', 'thing', 'shape'))}?")
        questions.append({"question_type": "what shape is the", "text": text, "answer": obj["shape"]})
    asked: set[str] = set()
    for _ in range(quota["how many"]):
        in_scene = sorted({obj["shape"] for obj in objects} - asked, key=SHAPES.index)
        pool = in_scene if in_scene and rng.random() < 0.6 else [shape for shape in SHAPES if shape not in asked]
        shape = _pick(rng, pool)
        asked.add(shape)
        text = f"how many {_shape_word(shape, rng, plural=True)} are there?"
        questions.append({"question_type": "how many", "text": text, "answer": str(_count(scene, shape=shape))})
    asked_pairs: set[tuple[str, str]] = set()
    for index in rng.permutation(len(objects))[:quota["is there a"] // 2]:
        present = objects[index]
        while True:  # an absent pair near the present one: its colour changed, or its shape (4 objects of 64 pairs)
            if rng.random() < 0.5:
                colour, shape = _pick(rng, list(COLOURS)), present["shape"]
            else:
                colour, shape = present["colour"], _pick(rng, SHAPES)
            if _count(scene, shape, colour) == 0 and (colour, shape) not in asked_pairs:
                break
        asked_pairs.add((colour, shape))
        pair = [(present["colour"], present["shape"], "yes"), (colour, shape, "no")]
        for colour, shape, answer in (pair if rng.random() < 0.5 else pair[::-1]):
            text = f"is there a {colour} {_shape_word(shape, rng)}?"
            questions.append({"question_type": "is there a", "text": text, "answer": answer})
    return [questions[index] for index in rng.permutation(len(questions))]


def _count_phrase(count: int, shape: str, rng: np.random.Generator) -> str:
    return f"{NUMBER_WORDS[count]} {_shape_word(shape, rng, plural=count != 1)}"


def _nlvr2_candidates(template: int, left: dict, right: dict, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Statements of one template about a pair of scenes, with their truth. Every template yields true and false
    statements from the same words, so that the sentence alone does not give the label away."""
    sides = {"left": left, "right": right}
    shapes = sorted({obj["shape"] for obj in left["objects"] + right["objects"]})
    shapes.append(SHAPES[rng.integers(len(SHAPES))])  # sometimes a shape neither image has
    candidates = []
    for shape in shapes:
        counts = {side: _count(scene, shape) for side, scene in sides.items()}
        plural = _shape_word(shape, rng, plural=True)
        if template == 0:
            first, second = ("left", "right") if rng.random() < 0.5 else ("right", "left")
            candidates.append((f"there are more {plural} in the {first} image than in the {second} image",
                               counts[first] > counts[second]))
        elif template == 1:
            side = "left" if rng.random() < 0.5 else "right"
            candidates.append((f"the {side} image contains at least one {_shape_word(shape, rng)}", counts[side] > 0))
        elif template == 2:
            candidates.append((f"both images contain a {_shape_word(shape, rng)}", min(counts.values()) > 0))
        elif template == 3:
            candidates.append((f"exactly one image contains a {_shape_word(shape, rng)}",
                               (counts["left"] > 0) != (counts["right"] > 0)))
        else:
            side = "left" if rng.random() < 0.5 else "right"
            for count in {counts[side], max(0, counts[side] + int(rng.choice([-1, 1])))}:
                candidates.append((f"the {side} image shows {_count_phrase(count, shape, rng)}",
                                   count == counts[side]))
    return candidates


NUM_NLVR2_TEMPLATES = 5


def nlvr2_statement(left: dict, right: dict, rng: np.random.Generator, want_true: bool) -> tuple[str, bool]:
    """A statement about a pair of scenes and its truth, always `want_true`: a template drawn uniformly, then a
    statement of it with that truth (another template when this one has none for the pair). Every pair has both:
    "the left image shows ⟨its count of one of its shapes⟩" is true, with that count changed by one it is false."""
    for template in rng.permutation(NUM_NLVR2_TEMPLATES):
        wanted = [candidate for candidate in _nlvr2_candidates(int(template), left, right, rng)
                  if candidate[1] == want_true]
        if wanted:
            return wanted[rng.integers(len(wanted))]
    raise RuntimeError(f"no {'true' if want_true else 'false'} statement for the pair: scenes without objects?")


def _absent_pair(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) the scene does not have; the shape is one of the scene's half of the time."""
    shapes = [obj["shape"] for obj in scene["objects"]] if rng.random() < 0.5 else list(SHAPES)
    while True:
        shape, colour = shapes[rng.integers(len(shapes))], list(COLOURS)[rng.integers(len(COLOURS))]
        if _count(scene, shape, colour) == 0:
            return colour, shape


def _neutral_claim(colour: str, shape: str, rng: np.random.Generator) -> str:
    """A claim about an object that no image can settle (when the object is there)."""
    phrase = f"{_pick(rng, COLOUR_WORDS.get(colour, (colour,)))} {_shape_word(shape, rng)}"
    options = [f"the {phrase} is made of {_pick(rng, MATERIALS)}",
               f"the {phrase} was drawn by {_pick(rng, ('a child', 'an artist', 'a robot'))}",
               f"someone is about to pick up the {phrase}"]
    return options[rng.integers(len(options))]


def snli_ve_hypothesis(scene: dict, rng: np.random.Generator, label: str) -> str:
    """A hypothesis about the scene with the given label (`entailment`, `neutral`, `contradiction`).

    Two families of sentences, each shared by two labels so that the words alone do not decide: facts (there is a
    ..., the picture contains n shapes, a ... is on the left) are entailed or contradicted by the image; claims no
    image can settle (the ... is made of wood) are neutral about an object that is there, and a contradiction about
    one that is not (half of the contradictions are of each family).
    """
    obj = scene["objects"][rng.integers(len(scene["objects"]))]
    count = len(scene["objects"])
    if label == "entailment":
        options = [f"there is {_article(_noun_phrase(obj, rng))}",
                   f"the picture contains {NUMBER_WORDS[count]} {'shape' if count == 1 else 'shapes'}",
                   f"{_article(_noun_phrase(obj, rng, with_size=False))} is {obj['position']}"]
    elif label == "contradiction":
        colour, shape = _absent_pair(scene, rng)
        if rng.random() < 0.5:
            return _neutral_claim(colour, shape, rng)
        wrong_count = int(rng.choice([n for n in range(1, 6) if n != count]))
        other_position = _pick(rng, [p for p in ("on the left", "on the right", "at the top", "at the bottom")
                                     if p != obj["position"]])
        absent = f"{_pick(rng, COLOUR_WORDS.get(colour, (colour,)))} {_shape_word(shape, rng)}"
        options = [f"there is {_article(absent)}",
                   f"the picture contains {NUMBER_WORDS[wrong_count]} {'shape' if wrong_count == 1 else 'shapes'}",
                   f"{_article(_noun_phrase(obj, rng, with_size=False))} is {other_position}"]
    elif label == "neutral":
        return _neutral_claim(obj["colour"], obj["shape"], rng)
    else:
        raise ValueError(f"label must be one of {SNLI_VE_LABELS}, got {label!r}")
    return options[rng.integers(len(options))]


def referring_expression(scene: dict, index: int, rng: np.random.Generator) -> str:
    """An expression that picks out object `index` and no other."""
    obj = scene["objects"][index]
    options = [f"the {_noun_phrase(obj, rng, with_size=False)}"]  # (shape, colour) pairs are unique in a scene
    if _count(scene, shape=obj["shape"]) == 1:
        options.append(f"the {_shape_word(obj['shape'], rng)}")
    if _count(scene, colour=obj["colour"]) == 1:
        options.append(f"the {_pick(rng, COLOUR_WORDS.get(obj['colour'], (obj['colour'],)))} one")
    options.append(f"the {_noun_phrase(obj, rng, with_size=False)} {obj['position']}")
    return options[rng.integers(len(options))]


# --------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------


def _image_columns(scene_id: str, scene: dict, regions: dict, suffix: str = "") -> dict:
    width, height = scene["image_size"]
    scale = np.asarray([width, height, width, height], dtype=np.float32)
    return {
        f"image_id{suffix}": scene_id,
        f"image_width{suffix}": width,
        f"image_height{suffix}": height,
        f"visual_feats{suffix}": regions["visual_feats"].astype(np.float16),
        f"visual_pos{suffix}": regions["visual_pos"] / scale,
        f"tags{suffix}": list(regions["tags"]),
        f"scores{suffix}": regions["scores"].tolist(),
    }


def _scene_rows(scene_id: str, scene: dict, regions: dict, rng: np.random.Generator, answers: dict,
                questions_per_scene: int = DEFAULT_QUESTIONS_PER_SCENE) -> dict:
    """The pre-training, VQA, SNLI-VE and RefCOCO rows of one scene."""
    image = _image_columns(scene_id, scene, regions)
    rows = {"pretrain": [dict(image, text=text) for text in scene["captions"][:2]], "vqa": [], "snli_ve": [],
            "refcoco": []}
    for number, question in enumerate(vqa_questions(scene, rng, questions_per_scene)):
        answers.setdefault(question["answer"], len(answers))
        rows["vqa"].append(dict(image, question_id=f"{scene_id}-q{number}", text=question["text"],
                                question_type=question["question_type"], answer_ids=[answers[question["answer"]]],
                                answer_scores=[1.0]))
    for number, label in enumerate(SNLI_VE_LABELS):
        rows["snli_ve"].append(dict(image, pair_id=f"{scene_id}-h{number}", premise=scene["captions"][2],
                                    text=snli_ve_hypothesis(scene, rng, label), label=number))
    width, height = scene["image_size"]
    for target, obj in enumerate(scene["objects"]):  # one expression per object
        box = obj["box"]
        ious = box_iou(regions["visual_pos"], box)
        rows["refcoco"].append(dict(image, ref_id=f"{scene_id}-r{target}", text=referring_expression(scene, target, rng),
                                    target_box=[box[0] / width, box[1] / height, box[2] / width, box[3] / height],
                                    region_ious=ious.astype(np.float32).tolist(), label=int(np.argmax(ious))))
    return rows


def _split_rows(scenes: list[tuple[str, dict, dict]], rng: np.random.Generator, answers: dict,
                questions_per_scene: int = DEFAULT_QUESTIONS_PER_SCENE) -> dict[str, list]:
    rows: dict[str, list] = {task: [] for task in TASKS}
    for scene_id, scene, regions in scenes:
        for task, task_rows in _scene_rows(scene_id, scene, regions, rng, answers, questions_per_scene).items():
            rows[task] += task_rows
    # Every scene is the left image of one pair (its right neighbour, cyclically), with a true and a false statement.
    for left, right in zip(scenes, scenes[1:] + scenes[:1]):
        for want_true in (True, False):
            text, truth = nlvr2_statement(left[1], right[1], rng, want_true=want_true)
            rows["nlvr2"].append({**_image_columns(left[0], left[1], left[2], "_0"),
                                  **_image_columns(right[0], right[1], right[2], "_1"),
                                  "identifier": f"{left[0]}-{right[0]}-{int(want_true)}", "text": text,
                                  "label": NLVR2_LABELS.index(str(truth))})
    return rows


FEATURES = {"pretrain": pretrain_features, "vqa": vqa_features, "nlvr2": nlvr2_features, "snli_ve": snli_ve_features,
            "refcoco": refcoco_features}


def build_synthetic_corpus(output, num_scenes: int = 2000, seed: int = 0, feature_dim: int = DEFAULT_FEATURE_DIM,
                           validation_fraction: float = 0.1, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                           progress: bool = False, questions_per_scene: int = DEFAULT_QUESTIONS_PER_SCENE,
                           processor=None, pretrain_scenes: int = 0, partial_caption_probability: float = 0.0) -> dict:
    """Generate `num_scenes` scenes and write the pre-training corpus and the four task datasets under `output`.

    `questions_per_scene` is the `num_questions` of `vqa_questions`: VQA questions per scene where the scene allows.
    `pretrain_scenes` more scenes of the same world give captions to the pre-training train split only (captions are
    cheap, labels are not: VLP's regime, where the caption corpus dwarfs every task's labels); they are drawn after
    the task scenes, so the tasks of a seed do not depend on it. No validation scene is in a train split.
    `partial_caption_probability` is `caption`'s for those scenes only: their listing captions name a random proper
    subset of the objects that often (the task scenes and their captions do not change with it).
    With a `CmalProcessor` as `processor`, the pre-training captions are also written as streamed corpora
    (`cmal_processing/shards.py`: each scene's regions once, its captions tokenised and anchored by that processor) in
    `pretrain_streamed/train` and `pretrain_streamed/validation`, for `open_streaming_corpus`.

    Deterministic for a seed. The corpus is written to a temporary folder beside `output` and moved into place
    whole, so an interrupted run leaves nothing half-written; running again replaces an earlier synthetic corpus
    (a non-empty folder without `synthetic_config.json` is refused, never overwritten). Returns the summary that is
    also saved there: rows per task and split, the answer vocabulary size and anchor statistics of the captions.
    """
    from modeling_cmal.anchoring import anchor_statistics

    num_scenes = _check_positive_int(num_scenes, "num_scenes")
    feature_dim = _check_positive_int(feature_dim, "feature_dim")
    questions_per_scene = _check_positive_int(questions_per_scene, "questions_per_scene")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    num_validation = max(2, int(round(num_scenes * validation_fraction)))
    if num_scenes - num_validation < 2:
        raise ValueError(f"num_scenes must be at least {num_validation + 2} for a train and a validation split, "
                         f"got {num_scenes}")
    root = Path(output)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / CONFIG_FILE).is_file())):
        raise ValueError(f"output {str(root)!r} exists and is not a synthetic corpus (no {CONFIG_FILE}): refusing to "
                         "replace it; pass a new folder")
    if isinstance(pretrain_scenes, bool) or not isinstance(pretrain_scenes, (int, np.integer)) or pretrain_scenes < 0:
        raise ValueError(f"pretrain_scenes must be an int >= 0, got {pretrain_scenes!r}")
    _check_probability(partial_caption_probability, "partial_caption_probability")
    rng = np.random.default_rng(seed)
    scenes = []
    for index in tqdm(range(num_scenes), desc="synthetic scenes", disable=not progress, unit="scene"):
        scene = generate_scene(rng, image_size)
        regions = scene_regions(scene, render_scene(scene), feature_dim, rng)
        scenes.append((f"synthetic-{seed}-{index:06d}", scene, regions))
    answers: dict[str, int] = {}
    splits = {"train": scenes[:num_scenes - num_validation], "validation": scenes[num_scenes - num_validation:]}
    rows = {split: _split_rows(split_scenes, rng, answers, questions_per_scene)
            for split, split_scenes in splits.items()}
    # Drawn from their own stream, after the task rows: the tasks of a seed are the same with or without them.
    caption_rng = np.random.default_rng([seed, 1])
    caption_scenes = []
    for index in tqdm(range(pretrain_scenes), desc="pre-training scenes", disable=not progress, unit="scene"):
        scene = generate_scene(caption_rng, image_size, partial_caption_probability=partial_caption_probability)
        regions = scene_regions(scene, render_scene(scene), feature_dim, caption_rng)
        caption_scenes.append((f"synthetic-{seed}-pretrain-{index:07d}", scene, regions))
        rows["train"]["pretrain"] += [dict(_image_columns(*caption_scenes[-1]), text=text)
                                      for text in scene["captions"][:2]]
    answer_vocab = sorted(answers, key=answers.get)
    # The vocabulary holds every answer of both splits (the world has about 22), in order of first appearance.
    summary = {"seed": int(seed), "num_scenes": num_scenes, "pretrain_scenes": int(pretrain_scenes),
               "partial_caption_probability": float(partial_caption_probability),
               "validation_fraction": float(validation_fraction), "feature_dim": feature_dim,
               "image_size": list(image_size), "shapes": list(SHAPES), "colours": list(COLOURS),
               "questions_per_scene": questions_per_scene, "answer_vocabulary": len(answer_vocab), "rows": {}}
    # The corpus is written beside `output` and moved into place whole: an interrupted run leaves nothing half-written.
    root.parent.mkdir(parents=True, exist_ok=True)
    final_root, root = root, root.parent / f".{root.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_tasks(root, rows, splits, feature_dim, answer_vocab, summary)
        if processor is not None:
            from .shards import write_image_shards

            for split, split_scenes in splits.items():
                split_scenes = split_scenes + caption_scenes if split == "train" else split_scenes
                info = write_image_shards(
                    ((RegionsDict(regions, image_id=scene_id), scene["captions"][:2])
                     for scene_id, scene, regions in split_scenes),
                    root / "pretrain_streamed" / split, processor, progress=False)
                summary["rows"].setdefault("pretrain_streamed", {})[split] = info["captions"]
        pretrain_rows = rows["train"]["pretrain"]
        statistics = anchor_statistics((row["text"] for row in pretrain_rows), (row["tags"] for row in pretrain_rows),
                                       top_k=5)
        summary["anchor_statistics"] = {"share_with_anchor": round(statistics.share_with_anchor, 4),
                                        "anchors_per_caption": round(statistics.anchors_per_caption, 3),
                                        "top_unmatched_tags": statistics.top_unmatched_tags,
                                        "top_unmatched_words": statistics.top_unmatched_words}
        _write_text_atomically(root / CONFIG_FILE, json.dumps(summary, indent=2))
        _install_folder(root, final_root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return summary


def _write_tasks(root: Path, rows: dict, splits: dict, feature_dim: int, answer_vocab: list[str], summary: dict):
    with _own_progress_bar_only():
        for task in TASKS:
            features = FEATURES[task](feature_dim)
            extra_files = {ANSWER_VOCAB_FILE: json.dumps(answer_vocab)} if task == "vqa" else {}
            task_features, image_features = split_features(features)
            for split, joined_rows in ((split, rows[split][task]) for split in splits):
                _prepare_root(root / task, split, features, extra_files)
                task_rows, image_rows = separate_images(joined_rows, image_suffixes(features))
                _save_atomically(root / task, split, lambda _, t=task_rows, i=image_rows: (
                    Dataset.from_list(t, features=task_features), Dataset.from_list(i, features=image_features)),
                    extra_files)
                summary["rows"].setdefault(task, {})[split] = len(task_rows)


def corpus_texts(root: Path) -> Iterator[str]:
    """Every text of a synthetic corpus: captions, questions, statements, hypotheses and premises, expressions."""
    from .corpus import load_corpus

    for task in TASKS:
        for split in load_corpus(root / task).values():
            table = split.with_format(None)
            for column in ("text", "premise"):
                if column in table.column_names:
                    yield from table[column]


def _summary_lines(summary: dict, output: Path) -> Iterator[str]:
    yield f"synthetic corpus written to {output} (seed {summary['seed']}, {summary['num_scenes']} scenes, " \
          f"{summary['feature_dim']}-d region features)"
    for task, splits in summary["rows"].items():
        yield f"  {task:<9} " + ", ".join(f"{split} {count:,}" for split, count in splits.items())
    yield f"  answer vocabulary: {summary['answer_vocabulary']} answers"
    statistics = summary["anchor_statistics"]
    yield (f"  anchors (pre-training captions): {statistics['share_with_anchor']:.1%} of captions have one, "
           f"{statistics['anchors_per_caption']:.2f} per caption; unmatched tags {statistics['top_unmatched_tags']}, "
           f"unmatched words {statistics['top_unmatched_words']}")


@dataclass
class SyntheticArguments:
    """The flags of `python -m cmal_processing.synthetic` (`HfArgumentParser`: `--num-scenes` or `--num_scenes`)."""

    output: str = field(metadata={"help": "folder to write the corpus to"})
    num_scenes: int = field(default=2000, metadata={"help": "number of scenes (default 2000)"})
    seed: int = field(default=0, metadata={"help": "random seed (default 0)"})
    feature_dim: int = field(default=DEFAULT_FEATURE_DIM, metadata={
        "help": f"region feature size Dv (default {DEFAULT_FEATURE_DIM})"})
    validation_fraction: float = field(default=0.1, metadata={"help": "share of scenes held out (0.1)"})
    questions_per_scene: int = field(default=DEFAULT_QUESTIONS_PER_SCENE, metadata={
        "help": f"VQA questions per scene where the scene allows (default {DEFAULT_QUESTIONS_PER_SCENE})"})
    pretrain_scenes: int = field(default=0, metadata={
        "help": "more scenes whose captions only pre-training uses (default 0)"})
    partial_caption_probability: float = field(default=0.0, metadata={
        "help": "how often a listing caption of those scenes names only some of the objects (default 0)"})
    tokenizer_output: str | None = field(default=None, metadata={
        "help": "also save the world's own word-piece vocabulary (cmal_processing.vocabulary) there"})
    processor: str | None = field(default=None, metadata={
        "help": "CmalProcessor folder: also write pretrain_streamed/ (pre-tokenised streamed corpora)"})


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from .arguments import parse_dataclasses

    parser = HfArgumentParser(SyntheticArguments, prog="python -m cmal_processing.synthetic",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    (args,) = parse_dataclasses(parser, argv)
    processor = None
    if args.processor is not None:
        from modeling_cmal.processing_cmal import CmalProcessor

        processor = CmalProcessor.from_pretrained(args.processor)
    try:
        summary = build_synthetic_corpus(args.output, num_scenes=args.num_scenes, seed=args.seed,
                                         feature_dim=args.feature_dim, validation_fraction=args.validation_fraction,
                                         progress=True, questions_per_scene=args.questions_per_scene,
                                         processor=processor, pretrain_scenes=args.pretrain_scenes,
                                         partial_caption_probability=args.partial_caption_probability)
    except ValueError as error:
        parser.error(str(error).replace("num_scenes", "--num-scenes").replace("feature_dim", "--feature-dim")
                     .replace("validation_fraction", "--validation-fraction")
                     .replace("questions_per_scene", "--questions-per-scene")
                     .replace("pretrain_scenes", "--pretrain-scenes")
                     .replace("partial_caption_probability", "--partial-caption-probability"))
    for line in _summary_lines(summary, Path(args.output)):
        print(line)
    if args.tokenizer_output is not None:
        from .vocabulary import subset_tokenizer

        tokenizer = subset_tokenizer(corpus_texts(Path(args.output)))
        tokenizer.save_pretrained(args.tokenizer_output)
        print(f"  tokenizer: the world's {len(tokenizer)} word pieces, saved to {args.tokenizer_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
