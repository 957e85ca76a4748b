"""CmalRegionProcessor: the detected regions of images → the visual inputs of CMAL (the image processor of CMAL).

Where a ViLT or CLIP image processor resizes and normalises pixels, CMAL's inputs are regions a detector found:
this processor validates them, normalises their boxes to `[0, 1]`, keeps the `max_regions` of highest score and
pads them into `visual_feats`, `visual_pos` and `visual_attention_mask`, saying which input regions it kept.
`CmalProcessor` holds it as its `image_processor`, beside the tokenizer, and saves it in `processor_config.json`.

A region dict (one image) uses the model's names: `visual_feats` `[M, Dv]`, `visual_pos` `[M, 4]` (x1, y1, x2,
y2; pixels with `image_size`, or normalised to `[0, 1]` without it), optional `image_size` `(width, height)`, `tags`
`[M]`, `scores` `[M]`, `image_id`. The earlier names `features` and `boxes` still work, with a deprecation warning.

Remote code: this module imports only the standard library, numpy, torch and transformers.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .anchoring import _shorten

VISUAL_INPUT_NAMES = ("visual_feats", "visual_pos", "visual_attention_mask")
REGION_KEYS = ("visual_feats", "visual_pos", "image_size", "tags", "scores", "image_id")
# The region keys before the processor and the corpus shared one vocabulary: still read, with a warning.
DEPRECATED_REGION_KEYS = {"features": "visual_feats", "boxes": "visual_pos"}
RETURN_TENSORS = (None, "np", "pt")
DEFAULT_MAX_REGIONS = 36
# Normalised boxes may stray this far outside [0, 1] (rounding of pixel boxes) before they count as an error.
NORMALIZED_BOX_TOLERANCE = 1e-3
# Pixel boxes may reach this far past the image edge (rounding) before clipping them is worth a warning.
PIXEL_BOX_TOLERANCE = 0.5
# A box reaching past the edge by more than this share of the side, while every box fits the swapped size, means
# that image_size was given as (height, width).
SWAPPED_SIZE_OVERSHOOT = 0.05

logger = logging.getLogger(__name__)


def _number_array(value, name: str) -> np.ndarray:
    """`value` (numpy, torch, nested lists) as a numeric numpy array, in its own dtype where it is numeric."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array of numbers, got {_shorten(value)} ({error})") from error
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be an array of numbers, got {_shorten(value)} (dtype {array.dtype})")
    return array


def select_top_regions(scores, max_regions: int, num_regions: int | None = None) -> np.ndarray:
    """Indices of the regions an image keeps, in input order: all of them when there are at most `max_regions`,
    else the `max_regions` of highest score (stable: ties keep the earlier region), or without `scores` the first
    `max_regions`. The one selection of the package: the processor, its anchor statistics and the RefCOCO+
    labels and metric (which must index the same regions) all call it.

    Args:
        scores: `[M]` detector confidences, or `None`.
        max_regions: regions kept at most (>= 1).
        num_regions: `M`; needed when `scores` is `None`.

    Returns:
        int64 `[min(M, max_regions)]`, increasing.
    """
    if isinstance(max_regions, bool) or not isinstance(max_regions, (int, np.integer)) or max_regions < 1:
        raise ValueError(f"max_regions must be an int >= 1, got {_shorten(max_regions)}")
    if scores is None:
        if isinstance(num_regions, bool) or not isinstance(num_regions, (int, np.integer)) or num_regions < 0:
            raise ValueError(f"num_regions must be an int >= 0 when scores is None, got {_shorten(num_regions)}")
        return np.arange(min(num_regions, max_regions), dtype=np.int64)
    scores = _number_array(scores, "scores").astype(np.float64)
    if scores.ndim != 1 or (num_regions is not None and scores.shape[0] != num_regions):
        expected = num_regions if num_regions is not None else "M"
        raise ValueError(f"scores has shape {scores.shape}; expected [{expected}], one score per region")
    if scores.shape[0] <= max_regions:
        return np.arange(scores.shape[0], dtype=np.int64)
    return np.sort(np.argsort(-scores, kind="stable")[:max_regions]).astype(np.int64)


@dataclass
class RegionSelection:
    """One image's regions after validation and selection.

    `visual_feats` `[K, Dv]` (still in the caller's dtype; cast while padding), `visual_pos` `[K, 4]` normalised
    float32, `tags` (K names, or None), `scores` (K floats, or None), `kept` int64 `[K]` (the input index of each kept
    region), `clipped_boxes` (pixel boxes of the input that reached past the image edge and were clipped to it)."""

    visual_feats: np.ndarray
    visual_pos: np.ndarray
    tags: list[str] | None
    scores: list[float] | None
    kept: np.ndarray
    clipped_boxes: int = 0

    @property
    def num_regions(self) -> int:
        return self.visual_feats.shape[0]


class CmalRegionProcessorKwargs(TypedDict, total=False):
    max_regions: int
    tag_vocabulary: list[str] | None


class CmalRegionProcessor(BaseImageProcessor):
    r"""
    Turns the detected regions of a batch of images into CMAL's visual inputs.

    Args:
        max_regions (`int`, defaults to 36): regions kept per image (`select_top_regions`: the `max_regions` of
            highest score, stable on ties, kept in their input order; without scores the first ones).
        tag_vocabulary (list of str or the path of a file of one name per line, *optional*): the detector's class
            names, so that `tags` may be given as ids (id = position in the list).

    A `BaseImageProcessor` (whose `resize` / `normalize` machinery regions do not use), so that `AutoImageProcessor`
    takes it: `save_pretrained` / `from_pretrained` are the library's; inside a `CmalProcessor` folder the settings
    are the `image_processor` entry of `processor_config.json`.
    """

    model_input_names = list(VISUAL_INPUT_NAMES)
    valid_kwargs = CmalRegionProcessorKwargs

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS, tag_vocabulary=None, **kwargs):
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be an int >= 1, got {_shorten(max_regions)}")
        super().__init__(**kwargs)
        self.max_regions = max_regions
        self.tag_vocabulary = self._checked_tag_vocabulary(tag_vocabulary)

    @staticmethod
    def _checked_tag_vocabulary(tag_vocabulary) -> list[str] | None:
        if tag_vocabulary is None:
            return None
        if isinstance(tag_vocabulary, (str, os.PathLike)):
            path = Path(tag_vocabulary)
            if not path.is_file():
                raise ValueError(f"tag_vocabulary {str(path)!r} is not a file; expected a list of class names or a "
                                 "file of one name per line")
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not isinstance(tag_vocabulary, Sequence) or not all(
            isinstance(name, str) and name.strip() for name in tag_vocabulary
        ):
            raise ValueError(f"tag_vocabulary must be a list of non-empty class names, got {_shorten(tag_vocabulary)}")
        return [str(name) for name in tag_vocabulary]

    # ----------------------------------------------------------------------------------------------------------
    # Call
    # ----------------------------------------------------------------------------------------------------------

    def __call__(self, regions, *, padding=True, return_tensors=None) -> BatchFeature:
        r"""
        Args:
            regions (`dict` or list of `dict`): per image `visual_feats` `[M, Dv]` (numpy, torch or lists; `[0, Dv]`
                for an image without regions), `visual_pos` `[M, 4]` as `x1, y1, x2, y2` in pixels with
                `image_size` `(width, height)` (as PIL's `Image.size`), or normalised to `[0, 1]` without it,
                optional `tags` (`M` class names, or ids of `tag_vocabulary`), `scores` (`M` confidences) and
                `image_id` (ignored). Pixel boxes past the image edge are clipped to it, with a warning giving the
                count; a box wholly outside the image, or a size whose boxes fit only `(height, width)`, is an
                error. `features` / `boxes` are read as `visual_feats` / `visual_pos`, with a deprecation warning.
            padding (`True` or `"max_length"`): pad to the image with the most kept regions, or to `max_regions`.
            return_tensors (`None`, `"np"` or `"pt"`): numpy arrays for `None` and `"np"`, torch tensors for `"pt"`.

        Returns:
            `BatchFeature` with `visual_feats` `[B, M, Dv]` float32, `visual_pos` `[B, M, 4]` float32 (normalised),
            `visual_attention_mask` `[B, M]` (1 real region, 0 padding) and `region_indices` `[B, M]` int64 (the
            input index of each kept region, -1 on padding). M >= 1: a batch without any region gets one masked
            zero row, so that the model always has a region axis to attend over.

        Raises:
            ValueError: naming the argument, the image index, the value and what was expected.
        """
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {_shorten(return_tensors)}")
        selections = self.select(regions)
        data = self.pad(selections, padding=padding)
        if return_tensors == "pt":
            data = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in data.items()}
        return BatchFeature(data)

    def preprocess(self, regions, **kwargs) -> BatchFeature:
        """The same as calling the processor (`BaseImageProcessor`'s name for it)."""
        return self(regions, **kwargs)

    def select(self, regions) -> list[RegionSelection]:
        """Validates the regions of each image (the `regions` of `__call__`), normalises their boxes and keeps the
        top `max_regions`; warns once per call about boxes clipped at the image edge."""
        region_list = [regions] if isinstance(regions, Mapping) else regions
        if isinstance(region_list, (str, bytes)) or not isinstance(region_list, Sequence):
            raise ValueError(f"regions must be a dict (one image) or a list of dicts, got {_shorten(regions)}")
        if not region_list:
            raise ValueError("regions is an empty list; expected at least one image")
        selections = [self._select_one(image_regions, index) for index, image_regions in enumerate(region_list)]
        self._warn_about_clipped_boxes(selections)
        return selections

    def kept_regions(self, scores, num_regions: int | None = None) -> np.ndarray:
        """Input indices of the regions this processor keeps for an image with these `scores` (see
        `select_top_regions`)."""
        return select_top_regions(scores, self.max_regions, num_regions)

    def pad(self, selections: Sequence[RegionSelection], *, padding=True) -> dict[str, np.ndarray]:
        """Stacks the selections of `select` into `[B, M, ...]` numpy arrays (the outputs of `__call__`)."""
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be True, 'longest' or 'max_length' (regions are always padded), got "
                             f"{_shorten(padding)}")
        feature_dim = selections[0].visual_feats.shape[1]
        for index, selection in enumerate(selections):
            if selection.visual_feats.shape[1] != feature_dim:
                raise ValueError(f"regions[{index}]['visual_feats'] has {selection.visual_feats.shape[1]} dimensions "
                                 f"but regions[0] has {feature_dim}; expected the same Dv for every image")
        counts = [selection.num_regions for selection in selections]
        num_slots = max(self.max_regions if padding == "max_length" else max(counts), 1)
        batch_size = len(selections)
        visual_feats = np.zeros((batch_size, num_slots, feature_dim), dtype=np.float32)
        visual_pos = np.zeros((batch_size, num_slots, 4), dtype=np.float32)
        visual_attention_mask = np.zeros((batch_size, num_slots), dtype=np.int64)
        region_indices = np.full((batch_size, num_slots), -1, dtype=np.int64)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is caught just below
            for index, (selection, count) in enumerate(zip(selections, counts)):
                visual_feats[index, :count] = selection.visual_feats
                visual_pos[index, :count] = selection.visual_pos
                visual_attention_mask[index, :count] = 1
                region_indices[index, :count] = selection.kept
        if not np.isfinite(visual_feats).all():
            for index, count in enumerate(counts):
                bad = ~np.isfinite(visual_feats[index, :count])
                if bad.any():
                    row, column = (int(value) for value in np.argwhere(bad)[0])
                    raise ValueError(f"regions[{index}]['visual_feats'][{row}, {column}] = "
                                     f"{float(selections[index].visual_feats[row, column])} (as float32: "
                                     f"{visual_feats[index, row, column]}); expected finite float32 numbers")
        return {"visual_feats": visual_feats, "visual_pos": visual_pos,
                "visual_attention_mask": visual_attention_mask, "region_indices": region_indices}

    # ----------------------------------------------------------------------------------------------------------
    # One image
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _current_names(regions: Mapping, where: str) -> Mapping:
        """`regions` with the deprecated keys `features` / `boxes` renamed (with a warning)."""
        old = [key for key in DEPRECATED_REGION_KEYS if key in regions]
        if not old:
            return regions
        for key in old:
            if DEPRECATED_REGION_KEYS[key] in regions:
                raise ValueError(f"{where} has both {key!r} and {DEPRECATED_REGION_KEYS[key]!r}; expected "
                                 f"{DEPRECATED_REGION_KEYS[key]!r} only ({key!r} is its deprecated name)")
        warnings.warn(
            f"the region keys {', '.join(map(repr, old))} are deprecated; use "
            f"{', '.join(repr(DEPRECATED_REGION_KEYS[key]) for key in old)} (the model's and the corpus' names)",
            FutureWarning, stacklevel=5,
        )
        return {DEPRECATED_REGION_KEYS.get(key, key): value for key, value in regions.items()}

    def _select_one(self, regions, index: int) -> RegionSelection:
        where = f"regions[{index}]"
        if not isinstance(regions, Mapping):
            raise ValueError(f"{where} must be a dict with visual_feats, visual_pos and tags, got {_shorten(regions)}")
        unknown = sorted(str(key) for key in regions if key not in REGION_KEYS and key not in DEPRECATED_REGION_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; expected some of {list(REGION_KEYS)}")
        regions = self._current_names(regions, where)
        for key in ("visual_feats", "visual_pos"):
            if regions.get(key) is None:
                raise ValueError(f"{where} has no {key!r}; expected visual_feats [M, Dv] and visual_pos [M, 4]")
        features = _number_array(regions["visual_feats"], f"{where}['visual_feats']")
        if features.ndim != 2:
            raise ValueError(f"{where}['visual_feats'] must be 2-D [M, Dv] (an image without regions: shape [0, Dv]), "
                             f"got shape {features.shape}")
        if features.shape[1] == 0:
            raise ValueError(f"{where}['visual_feats'] has shape {features.shape}; expected Dv >= 1")
        num_regions = features.shape[0]
        boxes, clipped_boxes = self._normalized_boxes(regions, num_regions, where)
        tags = self.tag_names(regions.get("tags"), num_regions, where)
        scores = self.checked_scores(regions.get("scores"), num_regions, where)
        kept = self.kept_regions(scores, num_regions)
        if len(kept) < num_regions:
            features, boxes = features[kept], boxes[kept]
            tags = None if tags is None else [tags[i] for i in kept]
            scores = None if scores is None else [scores[i] for i in kept]
        return RegionSelection(features, boxes, tags, scores, kept, clipped_boxes)

    @staticmethod
    def _normalized_boxes(regions: Mapping, num_regions: int, where: str) -> tuple[np.ndarray, int]:
        """Boxes `[M, 4]` checked (finite, x1 <= x2, y1 <= y2, on the image) and normalised to `[0, 1]`, and how
        many pixel boxes reached past the image edge and were clipped to it."""
        name = f"{where}['visual_pos']"
        boxes = _number_array(regions["visual_pos"], name).astype(np.float64)
        if boxes.size == 0 and num_regions == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name} must have shape [M, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
        if boxes.shape[0] != num_regions:
            raise ValueError(f"{name} has {boxes.shape[0]} rows but visual_feats has {num_regions}; expected one box "
                             "per region")
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{row}] = {boxes[row].tolist()}; expected finite x1, y1, x2, y2 with x1 <= x2 and "
                             "y1 <= y2")
        image_size = regions.get("image_size")
        if image_size is None:
            outside = ((boxes < -NORMALIZED_BOX_TOLERANCE) | (boxes > 1 + NORMALIZED_BOX_TOLERANCE)).any(axis=1)
            if outside.any():
                row = int(np.flatnonzero(outside)[0])
                raise ValueError(f"{name}[{row}] = {boxes[row].tolist()} is outside [0, 1]; boxes without image_size "
                                 "must be normalised (pixel boxes need image_size=(width, height))")
            return np.clip(boxes, 0.0, 1.0).astype(np.float32), 0
        size = _number_array(image_size, f"{where}['image_size']").astype(np.float64)
        if size.shape != (2,) or not np.isfinite(size).all() or (size <= 0).any():
            raise ValueError(f"{where}['image_size'] must be (width, height), two positive numbers, "
                             f"got {_shorten(image_size)}")
        width, height = size
        past_edge = (boxes[:, :2] < -PIXEL_BOX_TOLERANCE).any(axis=1) | (boxes[:, 2] > width + PIXEL_BOX_TOLERANCE) | \
            (boxes[:, 3] > height + PIXEL_BOX_TOLERANCE)
        if past_edge.any() and width != height:
            # Far past the edge of (width, height) yet inside (height, width): the size was given the other way round.
            overshoot = max((boxes[:, 2].max() - width) / width, (boxes[:, 3].max() - height) / height)
            fits_swapped = (boxes >= -PIXEL_BOX_TOLERANCE).all() and \
                (boxes[:, [0, 2]] <= height + PIXEL_BOX_TOLERANCE).all() and \
                (boxes[:, [1, 3]] <= width + PIXEL_BOX_TOLERANCE).all()
            if fits_swapped and overshoot > SWAPPED_SIZE_OVERSHOOT:
                row = int(np.argmax(np.maximum(boxes[:, 2] / width, boxes[:, 3] / height)))
                raise ValueError(
                    f"{where}['image_size'] = ({width:g}, {height:g}) looks like (height, width): {name}[{row}] = "
                    f"{boxes[row].tolist()} reaches {overshoot:.0%} past the edge of a {width:g} x {height:g} image, "
                    f"while every box fits a {height:g} x {width:g} one. image_size is (width, height), as PIL's "
                    f"Image.size; give image_size=({height:g}, {width:g}) if that is the image"
                )
        # A box is kept (clipped) if it touches the image; one wholly outside is almost surely a size mix-up.
        outside = (boxes[:, 0] > width) | (boxes[:, 2] < 0) | (boxes[:, 1] > height) | (boxes[:, 3] < 0)
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{name}[{row}] = {boxes[row].tolist()} lies outside the image of size (width, height) = "
                             f"({width:g}, {height:g}); expected a box that overlaps the image")
        scale = np.array([width, height, width, height])
        return (np.clip(boxes, 0.0, scale) / scale).astype(np.float32), int(past_edge.sum())

    @staticmethod
    def _warn_about_clipped_boxes(selections: list[RegionSelection]) -> None:
        """Boxes past the image edge are clipped to it (as the corpus builders do); says how many, in which images."""
        clipped = [(index, selection.clipped_boxes) for index, selection in enumerate(selections)
                   if selection.clipped_boxes]
        if clipped:
            examples = ", ".join(f"regions[{index}]: {count}" for index, count in clipped[:5])
            logger.warning(
                f"CmalRegionProcessor: {sum(count for _, count in clipped)} boxes in {len(clipped)} of "
                f"{len(selections)} images reach past the image edge (image_size) and were clipped to it ({examples}"
                f"{', ...' if len(clipped) > 5 else ''}); check image_size = (width, height) if that is unexpected"
            )

    def tag_names(self, tags, num_regions: int | None, where: str) -> list[str] | None:
        """Tag names (ids looked up in `tag_vocabulary`), one per region when `num_regions` is given."""
        if tags is None:
            return None
        if isinstance(tags, torch.Tensor):
            tags = tags.tolist()
        if isinstance(tags, (str, bytes)) or not isinstance(tags, (Sequence, np.ndarray)):
            raise ValueError(f"{where}['tags'] must be a list of class names or ids, got {_shorten(tags)}")
        if num_regions is not None and len(tags) != num_regions:
            raise ValueError(f"{where}['tags'] has {len(tags)} entries but visual_feats has {num_regions} rows; "
                             "expected one tag per region")
        names = []
        for row, tag in enumerate(tags):
            if isinstance(tag, str):
                names.append(tag)
            elif isinstance(tag, (int, np.integer)) and not isinstance(tag, (bool, np.bool_)):
                names.append(self._tag_name(int(tag), f"{where}['tags'][{row}]"))
            else:
                raise ValueError(f"{where}['tags'][{row}] = {_shorten(tag)}; expected a class name (str) or an id "
                                 "(int) of tag_vocabulary")
        return names

    def _tag_name(self, tag_id: int, where: str) -> str:
        if self.tag_vocabulary is None:
            raise ValueError(f"{where} is the id {tag_id}, but the processor has no tag_vocabulary; give class "
                             "names, or build the processor with tag_vocabulary=[...]")
        if not 0 <= tag_id < len(self.tag_vocabulary):
            raise ValueError(f"{where} is the id {tag_id}; expected an id in [0, {len(self.tag_vocabulary)}) of "
                             "tag_vocabulary")
        return self.tag_vocabulary[tag_id]

    @staticmethod
    def checked_scores(scores, num_regions: int, where: str) -> list[float] | None:
        """`scores` as `num_regions` finite floats (None stays None)."""
        if scores is None:
            return None
        array = _number_array(scores, f"{where}['scores']").astype(np.float64)
        if array.ndim != 1 or array.shape[0] != num_regions:
            raise ValueError(f"{where}['scores'] has shape {array.shape}; expected [{num_regions}], one score per "
                             "region")
        if not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array))[0])
            raise ValueError(f"{where}['scores'][{row}] = {array[row]}; expected a finite number")
        return array.tolist()


__all__ = ["CmalRegionProcessor", "RegionSelection", "select_top_regions"]
