"""CmalProcessor: captions and detected regions → CMAL model inputs, anchors included.

The processor tokenises the text with a fast BERT tokenizer, validates, selects and pads the regions of each
image, and runs the anchor operator ⊕ (`anchoring.find_anchors`) on the tokenizer's own words, so that every
piece of a word that names the concept of a region is paired with that region.

Remote code: this module imports only the standard library, numpy, torch, transformers and its siblings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, BertTokenizer
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

from .anchoring import ConceptLexicon, anchor_statistics, find_anchors
from .configuration_cmal import ANCHOR_ACTIONS
from .region_extraction import CmalRegionExtractor

LEXICON_FILE = "concept_lexicon.json"
# The bert-base-uncased WordPiece vocabulary (Apache-2.0; md5 64800d5d8528ce344256daf115d4965e), the default tokenizer.
DEFAULT_VOCAB_FILE = Path(__file__).resolve().parent / "data" / "bert_base_uncased_vocab.txt"
DEFAULT_MODEL_MAX_LENGTH = 512
# A folder holds a tokenizer when it has one of these (fast serialisation, WordPiece/BPE vocabularies, sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
PROCESSOR_FILES = ("processor_config.json", LEXICON_FILE)
TEXT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
VISUAL_INPUT_NAMES = ("visual_feats", "visual_pos", "visual_attention_mask")
ANCHOR_INPUT_NAMES = ("anchor_pairs", "anchor_concept_ids", "anchor_actions")
REGION_KEYS = ("features", "boxes", "image_size", "tags", "scores", "image_id")
RETURN_TENSORS = (None, "np", "pt")
# Normalised boxes may stray this far outside [0, 1] (rounding of pixel boxes) before they count as an error.
NORMALIZED_BOX_TOLERANCE = 1e-3
# Pixel boxes may reach this far past the image edge (rounding) before clipping them is worth a warning.
PIXEL_BOX_TOLERANCE = 0.5
# A box reaching past the edge by more than this share of the side, while every box fits the swapped size, means
# that image_size was given as (height, width).
SWAPPED_SIZE_OVERSHOOT = 0.05
# Keyword arguments of `from_pretrained` that the Hub file lookup takes.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")

logger = logging.getLogger(__name__)


@dataclass
class _ImageRegions:
    """One image's regions after validation and selection: `features` still in the caller's dtype (cast while
    stacking), `boxes` normalised float32, `tags` names (or None), `scores` (or None)."""

    features: np.ndarray
    boxes: np.ndarray
    tags: list[str] | None
    scores: list[float] | None
    # Pixel boxes of the input that reached past the image edge and were clipped to it (before selection).
    clipped_boxes: int = 0

    @property
    def num_regions(self) -> int:
        return self.features.shape[0]


def _shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def default_tokenizer(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> BertTokenizer:
    """The fast bert-base-uncased tokenizer (lower-casing WordPiece, 30,522 pieces) from the vocabulary bundled
    with the package (`modeling_cmal/data/bert_base_uncased_vocab.txt`), the tokenizer of CMAL's BERT-initialised
    models. `model_max_length` is the longest caption in pieces, special tokens included (truncation cuts there)."""
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 3:
        raise ValueError(f"model_max_length must be an int >= 3 ([CLS], a piece, [SEP]), got {_shorten(model_max_length)}")
    if not DEFAULT_VOCAB_FILE.is_file():
        raise ValueError(f"the bundled vocabulary {str(DEFAULT_VOCAB_FILE)!r} is missing (this copy of modeling_cmal "
                         "has no data/ folder, e.g. remote code); pass tokenizer= a tokenizer or a tokenizer folder")
    # `BertTokenizer(vocab_file=...)` is ignored in transformers 5 (every word becomes [UNK]): give the vocabulary.
    lines = DEFAULT_VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    return BertTokenizer(vocab={piece: index for index, piece in enumerate(lines)}, do_lower_case=True,
                         model_max_length=model_max_length)


def _check_tokenizer_folder(folder, argument: str) -> Path:
    """`folder` as a Path when it is a folder holding tokenizer files; otherwise a `ValueError` naming `argument`."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"{argument} {str(folder)!r} is not a folder (it {'is a file' if path.exists() else 'does not exist'}"
                         f"); expected a folder written by CmalProcessor.save_pretrained or a tokenizer's "
                         "save_pretrained (tokenizer.json, vocab.txt, ...)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        present = sorted(entry.name for entry in path.iterdir())[:8]
        raise ValueError(f"{argument} {str(folder)!r} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}; "
                         f"it has {present or 'nothing'}); expected a folder written by CmalProcessor.save_pretrained "
                         "or a tokenizer's save_pretrained. For the bundled bert-base-uncased vocabulary use "
                         "CmalProcessor() (tokenizer=None), or save a processor into the folder first")
    return path


def _looks_like_a_path(name) -> bool:
    """True when `name` can only be meant as a local path (a Hub id is `name` or `namespace/name`)."""
    text = os.fspath(name)
    return (isinstance(name, os.PathLike) or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
            or os.path.exists(text))


class CmalProcessor(ProcessorMixin):
    r"""
    Builds CMAL inputs from captions and the detected regions of their images (or the images themselves, through
    a region extractor).

    Args:
        tokenizer (`BertTokenizer`, a folder path, or `None`): a fast tokenizer (word ids are needed to find
            anchors), or the path of a folder holding one (`AutoTokenizer.from_pretrained(folder)`); its settings
            (`model_max_length`, `padding_side`, ...) are saved with the processor. `None` (the default) is the
            bert-base-uncased tokenizer from the vocabulary bundled with the package, `model_max_length` 512
            (`default_tokenizer()`; the vocabulary of the BERT checkpoints that `load_bert_weights` reads). A
            tokenizer of another length: `CmalProcessor(tokenizer=default_tokenizer(model_max_length=64))`.
        lexicon (`ConceptLexicon` or its `to_dict()` form, *optional*): the anchor concepts; defaults to
            `ConceptLexicon.default()`. Its size is `config.num_anchor_concepts` of the model.
        tag_vocabulary (list of str or a path to a file of one name per line, *optional*): class names of the
            detector, so that `tags` may be given as ids (id = position in the list).
        max_regions (`int`, defaults to 36): regions kept per image; more are cut to the `max_regions` of highest
            score (stable: ties keep the earlier region; without scores the first ones), kept in their input order.
        region_extractor (`CmalRegionExtractor` or any callable images → regions dicts, *optional*): lets
            `processor(text=..., images=...)` detect regions itself. It is **not saved** with the processor (it is a
            whole detection model): give it again after `from_pretrained`, or set `processor.region_extractor`.

    `save_pretrained` writes the tokenizer files, `processor_config.json` (settings, tag vocabulary and, when the
    class is registered for `AutoProcessor`, the `auto_map` that `trust_remote_code` loading needs) and the lexicon
    as `concept_lexicon.json`; `from_pretrained` reads them back (a folder without processor files gives the
    default lexicon). `batch_decode` and `decode` are the tokenizer's.
    """

    # `save_pretrained` and `from_pretrained` find sub-processors by these `__init__` parameter names: only
    # `tokenizer` is one; the other parameters are settings, written to `processor_config.json` by `to_dict`.
    def __init__(self, tokenizer=None, lexicon=None, tag_vocabulary=None, max_regions=36, region_extractor=None,
                 **kwargs):
        if tokenizer is None:
            tokenizer = default_tokenizer()
        elif isinstance(tokenizer, (str, os.PathLike)):
            folder = _check_tokenizer_folder(tokenizer, "tokenizer")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as error:
                raise ValueError(f"tokenizer {str(tokenizer)!r}: the tokenizer files of this folder cannot be loaded "
                                 f"({type(error).__name__}: {str(error).strip()[:200]}); expected a folder written by "
                                 "a fast tokenizer's save_pretrained") from error
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer must be a fast tokenizer (anchors need its word ids), got "
                             f"{type(tokenizer).__name__} with is_fast=False")
        if lexicon is None:
            lexicon = ConceptLexicon.default()
        elif isinstance(lexicon, Mapping):
            lexicon = ConceptLexicon.from_dict(lexicon)
        elif not isinstance(lexicon, ConceptLexicon) and callable(getattr(lexicon, "to_dict", None)):
            # A ConceptLexicon of another copy of the module (remote code next to a local package).
            lexicon = ConceptLexicon.from_dict(lexicon.to_dict())
        elif not isinstance(lexicon, ConceptLexicon):
            raise ValueError(f"lexicon must be a ConceptLexicon, its to_dict() form or None, got {_shorten(lexicon)}")
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be an int >= 1, got {_shorten(max_regions)}")
        self.lexicon = lexicon
        self.tag_vocabulary = self._checked_tag_vocabulary(tag_vocabulary)
        self.max_regions = max_regions
        self.region_extractor = region_extractor
        super().__init__(tokenizer, **kwargs)

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

    @property
    def region_extractor(self):
        return self._region_extractor

    @region_extractor.setter
    def region_extractor(self, extractor) -> None:
        if extractor is not None and not callable(extractor):
            raise ValueError(f"region_extractor must be a CmalRegionExtractor or a callable images → regions dicts, "
                             f"got {_shorten(extractor)}")
        self._region_extractor = extractor

    @property
    def model_input_names(self) -> list[str]:
        return [*TEXT_INPUT_NAMES, *VISUAL_INPUT_NAMES, *ANCHOR_INPUT_NAMES]

    # ----------------------------------------------------------------------------------------------------------
    # Call
    # ----------------------------------------------------------------------------------------------------------

    def __call__(self, text=None, regions=None, images=None, *, padding=True, truncation=True, max_length=None,
                 return_tensors=None, anchor_action=None) -> BatchFeature:
        r"""
        Args:
            text (`str` or list of `str`): one caption per image; `""` gives `[CLS] [SEP]`.
            regions (`dict` or list of `dict`): per image `features` `[M, Dv]` (numpy, torch or lists; `[0, Dv]`
                for an image without regions), `boxes` `[M, 4]` as `x1, y1, x2, y2` in pixels with `image_size`
                `(width, height)`, or normalised to `[0, 1]` without it, optional `tags` (`M` class names, or ids
                of `tag_vocabulary`; without tags there are no anchors), optional `scores` (`M` confidences),
                optional `image_id` (ignored). `image_size` is `(width, height)`, as PIL's `Image.size`; sizes
                whose boxes fit only the swapped `(height, width)` are refused. Pixel boxes that reach past the
                image edge are clipped to it, with a warning giving the count; a box that does not touch the
                image at all is an error.
            images: a PIL image, an `[H, W(, C)]` uint8 array or a list of them, instead of `regions`; needs a
                `region_extractor`.
            padding, truncation, max_length: the tokenizer's, for the text (`max_length` defaults to the
                tokenizer's `model_max_length`). A caption cut by truncation logs a warning naming how many word
                pieces and anchors were lost. Regions are always padded to the
                longest image of the batch (`padding="max_length"`: to `max_regions`); anchors to the most
                anchor rows of the batch.
            return_tensors (`None`, `"np"` or `"pt"`): `"pt"` torch tensors, `"np"` numpy arrays; `None` python
                lists as the tokenizer gives them, except `visual_feats` and `visual_pos`, numpy float32 arrays.
            anchor_action (`str` or `int`, *optional*): give every anchor this action (`keep`, `fill_text`,
                `fill_region`, `mask_both`, `mask_text`, `mask_region`, or 0-5) in `anchor_actions`. By default
                there is no `anchor_actions` output, and the model applies `config.default_anchor_action`: the
                one policy of fine-tuning and inference (the pre-training collator draws actions itself).

        Returns:
            `BatchFeature` with `input_ids`, `token_type_ids`, `attention_mask` `[B, N]` (when text is given);
            `visual_feats` `[B, M, Dv]` float32, `visual_pos` `[B, M, 4]` float32 normalised boxes,
            `visual_attention_mask` `[B, M]` (1 real region, 0 padding; when regions are given); and with both,
            `anchor_pairs` `[B, K, 2]` (piece position in `input_ids`, region index; one row per piece of an
            anchored word; `-1` padding), `anchor_concept_ids` `[B, K]` (lexicon id, `-1` padding) and
            `anchor_actions` `[B, K]` (0 on padding). K may be 0. When no image of the batch has a region, M is 1:
            a zero row with `visual_attention_mask` 0, so that every tensor keeps a region axis to attend over.
            Anchors are found on the words that survive truncation whole.

        Raises:
            ValueError: naming the argument, the sample index, the value and what was expected.
        """
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {_shorten(return_tensors)}")
        action = None if anchor_action is None else self._action_code(anchor_action)
        if text is None and regions is None and images is None:
            raise ValueError("give text=, regions= (or images=), or both")
        texts = self._checked_texts(text) if text is not None else None
        if images is not None:
            if regions is not None:
                raise ValueError("give either regions= or images=, not both")
            if self.region_extractor is None:
                raise ValueError("images= needs a region extractor: CmalProcessor(..., region_extractor="
                                 "CmalRegionExtractor(...)) or processor.region_extractor = ...; or pass regions=")
            regions = self.region_extractor(images)
        special_pieces = self.tokenizer.num_special_tokens_to_add()
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < special_pieces):
            raise ValueError(f"max_length must be None or an int >= {special_pieces} (the special tokens), "
                             f"got {_shorten(max_length)}")
        region_list = None
        if regions is not None:
            region_list = [regions] if isinstance(regions, Mapping) else regions
            if isinstance(region_list, (str, bytes)) or not isinstance(region_list, Sequence):
                raise ValueError(f"regions must be a dict (one image) or a list of dicts, got {_shorten(regions)}")
            if texts is not None and len(region_list) != len(texts):
                raise ValueError(f"text has {len(texts)} captions but regions has {len(region_list)} images; "
                                 "expected one image per caption")
            if not region_list:
                raise ValueError("regions is an empty list; expected at least one image")
            region_list = [self._parse_regions(image_regions, index) for index, image_regions in
                           enumerate(region_list)]

        data: dict = {}
        encoding = None
        if texts is not None:
            encoding = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                                      return_token_type_ids=True, return_attention_mask=True,
                                      return_tensors="np" if return_tensors else None)
            if return_tensors and encoding["input_ids"].dtype == object:
                raise ValueError(f"padding={padding!r} leaves captions of different lengths, which make no tensor; "
                                 "use padding=True (or return_tensors=None)")
            data.update({name: encoding[name] for name in TEXT_INPUT_NAMES})
        if region_list is not None:
            data.update(self._stack_regions(region_list, pad_to_max=padding == "max_length"))
        rows = None
        if encoding is not None and region_list is not None:
            rows = [self._anchor_rows(encoding.encodings[index], texts[index], image_regions)
                    for index, image_regions in enumerate(region_list)]
            data.update(self._stack_anchors(rows, action))
        if encoding is not None and truncation not in (False, "do_not_truncate"):
            self._warn_about_truncation(encoding, texts, region_list, rows, max_length)
        if region_list is not None:
            self._warn_about_clipped_boxes(region_list)
        return BatchFeature(self._convert(data, return_tensors))

    @staticmethod
    def _action_code(anchor_action) -> int:
        if isinstance(anchor_action, str) and anchor_action in ANCHOR_ACTIONS:
            return ANCHOR_ACTIONS.index(anchor_action)
        if isinstance(anchor_action, (int, np.integer)) and not isinstance(anchor_action, bool) and \
                0 <= anchor_action < len(ANCHOR_ACTIONS):
            return int(anchor_action)
        raise ValueError(f"anchor_action must be one of {ANCHOR_ACTIONS} or 0-{len(ANCHOR_ACTIONS) - 1}, "
                         f"got {_shorten(anchor_action)}")

    @staticmethod
    def _checked_texts(text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if not isinstance(text, Sequence) and not isinstance(text, np.ndarray):
            raise ValueError(f"text must be a str or a list of str, got {_shorten(text)}")
        texts = list(text)
        if not texts:
            raise ValueError("text is an empty list; expected at least one caption")
        for index, caption in enumerate(texts):
            if not isinstance(caption, str):
                raise ValueError(f"text[{index}] must be a str, got {_shorten(caption)} ({type(caption).__name__})")
        return [str(caption) for caption in texts]

    # ----------------------------------------------------------------------------------------------------------
    # Regions
    # ----------------------------------------------------------------------------------------------------------

    def _parse_regions(self, regions, index: int) -> _ImageRegions:
        """Validates one image's regions dict and keeps its top `max_regions`."""
        where = f"regions[{index}]"
        if not isinstance(regions, Mapping):
            raise ValueError(f"{where} must be a dict with features, boxes and tags, got {_shorten(regions)}")
        unknown = sorted(str(key) for key in regions if key not in REGION_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; expected some of {list(REGION_KEYS)}")
        for key in ("features", "boxes"):
            if regions.get(key) is None:
                raise ValueError(f"{where} has no {key!r}; expected features [M, Dv] and boxes [M, 4]")
        features = _number_array(regions["features"], f"{where}['features']")
        if features.ndim != 2:
            raise ValueError(f"{where}['features'] must be 2-D [M, Dv] (an image without regions: shape [0, Dv]), "
                             f"got shape {features.shape}")
        if features.shape[1] == 0:
            raise ValueError(f"{where}['features'] has shape {features.shape}; expected Dv >= 1")
        num_regions = features.shape[0]
        boxes, clipped_boxes = self._normalized_boxes(regions, num_regions, where)
        tags = self._tag_names(regions.get("tags"), num_regions, where)
        scores = self._checked_scores(regions.get("scores"), num_regions, where)
        if num_regions > self.max_regions:
            if scores is None:
                keep = np.arange(self.max_regions)
            else:
                keep = np.sort(np.argsort(-np.asarray(scores), kind="stable")[: self.max_regions])
            features, boxes = features[keep], boxes[keep]
            tags = None if tags is None else [tags[i] for i in keep]
            scores = None if scores is None else [scores[i] for i in keep]
        return _ImageRegions(features, boxes, tags, scores, clipped_boxes)

    @staticmethod
    def _normalized_boxes(regions: Mapping, num_regions: int, where: str) -> tuple[np.ndarray, int]:
        """Boxes `[M, 4]` checked (finite, x1 <= x2, y1 <= y2, on the image) and normalised to `[0, 1]`, and how
        many pixel boxes reached past the image edge and were clipped to it."""
        boxes = _number_array(regions["boxes"], f"{where}['boxes']").astype(np.float64)
        if boxes.size == 0 and num_regions == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{where}['boxes'] must have shape [M, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
        if boxes.shape[0] != num_regions:
            raise ValueError(f"{where}['boxes'] has {boxes.shape[0]} rows but features has {num_regions}; "
                             "expected one box per region")
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}['boxes'][{row}] = {boxes[row].tolist()}; expected finite x1, y1, x2, y2 with "
                             "x1 <= x2 and y1 <= y2")
        image_size = regions.get("image_size")
        if image_size is None:
            outside = ((boxes < -NORMALIZED_BOX_TOLERANCE) | (boxes > 1 + NORMALIZED_BOX_TOLERANCE)).any(axis=1)
            if outside.any():
                row = int(np.flatnonzero(outside)[0])
                raise ValueError(f"{where}['boxes'][{row}] = {boxes[row].tolist()} is outside [0, 1]; boxes without "
                                 "image_size must be normalised (pixel boxes need image_size=(width, height))")
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
                    f"{where}['image_size'] = ({width:g}, {height:g}) looks like (height, width): {where}['boxes'][{row}]"
                    f" = {boxes[row].tolist()} reaches {overshoot:.0%} past the edge of a {width:g} x {height:g} image, "
                    f"while every box fits a {height:g} x {width:g} one. image_size is (width, height), as PIL's "
                    f"Image.size; give image_size=({height:g}, {width:g}) if that is the image"
                )
        # A box is kept (clipped) if it touches the image; one wholly outside is almost surely a size mix-up.
        outside = (boxes[:, 0] > width) | (boxes[:, 2] < 0) | (boxes[:, 1] > height) | (boxes[:, 3] < 0)
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{where}['boxes'][{row}] = {boxes[row].tolist()} lies outside the image of size "
                             f"(width, height) = ({width:g}, {height:g}); expected a box that overlaps the image")
        scale = np.array([width, height, width, height])
        return (np.clip(boxes, 0.0, scale) / scale).astype(np.float32), int(past_edge.sum())

    @staticmethod
    def _warn_about_clipped_boxes(region_list: list[_ImageRegions]) -> None:
        """Boxes past the image edge are clipped to it (as the corpus builders do); says how many, in which images."""
        clipped = [(index, image_regions.clipped_boxes) for index, image_regions in enumerate(region_list)
                   if image_regions.clipped_boxes]
        if clipped:
            examples = ", ".join(f"regions[{index}]: {count}" for index, count in clipped[:5])
            logger.warning(
                f"CmalProcessor: {sum(count for _, count in clipped)} boxes in {len(clipped)} of {len(region_list)} "
                f"images reach past the image edge (image_size) and were clipped to it ({examples}"
                f"{', ...' if len(clipped) > 5 else ''}); check image_size = (width, height) if that is unexpected"
            )

    def _tag_names(self, tags, num_regions: int | None, where: str) -> list[str] | None:
        """Tag names (ids looked up in `tag_vocabulary`), one per region when `num_regions` is given."""
        if tags is None:
            return None
        if isinstance(tags, torch.Tensor):
            tags = tags.tolist()
        if isinstance(tags, (str, bytes)) or not isinstance(tags, (Sequence, np.ndarray)):
            raise ValueError(f"{where}['tags'] must be a list of class names or ids, got {_shorten(tags)}")
        if num_regions is not None and len(tags) != num_regions:
            raise ValueError(f"{where}['tags'] has {len(tags)} entries but features has {num_regions} rows; "
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
    def _checked_scores(scores, num_regions: int, where: str) -> list[float] | None:
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

    def _stack_regions(self, region_list: list[_ImageRegions], pad_to_max: bool) -> dict[str, np.ndarray]:
        feature_dim = region_list[0].features.shape[1]
        for index, image_regions in enumerate(region_list):
            if image_regions.features.shape[1] != feature_dim:
                raise ValueError(f"regions[{index}]['features'] has {image_regions.features.shape[1]} dimensions "
                                 f"but regions[0] has {feature_dim}; expected the same Dv for every image")
        counts = [image_regions.num_regions for image_regions in region_list]
        # M >= 1 even when no image has a region: the model always gets a region axis (that one row is masked).
        num_slots = max(self.max_regions if pad_to_max else max(counts), 1)
        batch_size = len(region_list)
        visual_feats = np.zeros((batch_size, num_slots, feature_dim), dtype=np.float32)
        visual_pos = np.zeros((batch_size, num_slots, 4), dtype=np.float32)
        visual_attention_mask = np.zeros((batch_size, num_slots), dtype=np.int64)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is caught just below
            for index, (image_regions, count) in enumerate(zip(region_list, counts)):
                visual_feats[index, :count] = image_regions.features
                visual_pos[index, :count] = image_regions.boxes
                visual_attention_mask[index, :count] = 1
        if not np.isfinite(visual_feats).all():
            for index, count in enumerate(counts):
                bad = ~np.isfinite(visual_feats[index, :count])
                if bad.any():
                    row, column = (int(value) for value in np.argwhere(bad)[0])
                    raise ValueError(f"regions[{index}]['features'][{row}, {column}] = "
                                     f"{float(region_list[index].features[row, column])} (as float32: "
                                     f"{visual_feats[index, row, column]}); expected finite float32 numbers")
        return {"visual_feats": visual_feats, "visual_pos": visual_pos, "visual_attention_mask": visual_attention_mask}

    # ----------------------------------------------------------------------------------------------------------
    # Anchors
    # ----------------------------------------------------------------------------------------------------------

    def _anchor_rows(self, encoding, text: str, image_regions: _ImageRegions) -> list[tuple[int, int, int]]:
        """`(piece position, region index, concept id)` of every piece of every anchored word.

        The words are the tokenizer's (its word ids), their text cut from the caption by the pieces' offsets. A
        word that truncation cut in part is left out, so an anchor always covers all pieces of its word.
        """
        if not image_regions.tags:
            return []
        cut_words = {word for part in encoding.overflowing for word in part.word_ids if word is not None}
        pieces_of_word: dict[int, list[int]] = {}
        for position, word in enumerate(encoding.word_ids):
            if word is not None and word not in cut_words:
                pieces_of_word.setdefault(word, []).append(position)
        if not pieces_of_word:
            return []
        offsets = encoding.offsets
        word_pieces = list(pieces_of_word.values())
        words = [text[offsets[pieces[0]][0]: offsets[pieces[-1]][1]] for pieces in word_pieces]
        rows = []
        for match in find_anchors(words, image_regions.tags, self.lexicon, image_regions.scores):
            for pieces in word_pieces[match.word_start: match.word_end]:
                rows.extend((position, match.region_index, match.concept_id) for position in pieces)
        return rows

    def _uncut_anchor_count(self, encoding, text: str, image_regions: _ImageRegions) -> int:
        """How many anchors the whole caption has (truncation undone: the overflowing pieces put back)."""
        if not image_regions.tags:
            return 0
        spans: dict[int, list[int]] = {}
        for part in (encoding, *encoding.overflowing):
            for word, (start, end) in zip(part.word_ids, part.offsets):
                if word is not None:
                    span = spans.setdefault(word, [start, end])
                    span[0], span[1] = min(span[0], start), max(span[1], end)
        words = [text[start:end] for _, (start, end) in sorted(spans.items())]
        return len(find_anchors(words, image_regions.tags, self.lexicon, image_regions.scores))

    def _warn_about_truncation(self, encoding, texts: list[str], region_list, rows, max_length: int | None) -> None:
        """A caption longer than `max_length` is cut: says how many pieces, and how many anchors, were lost."""
        cut = []
        for index, sample in enumerate(encoding.encodings):
            if not sample.overflowing:
                continue
            lost_pieces = sum(word is not None for part in sample.overflowing for word in part.word_ids)
            lost_anchors = 0
            if region_list is not None:
                kept_anchors = len({region for _, region, _ in rows[index]})
                lost_anchors = max(self._uncut_anchor_count(sample, texts[index], region_list[index]) - kept_anchors, 0)
            cut.append((index, lost_pieces, lost_anchors))
        if not cut:
            return
        limit = max_length if max_length is not None else self.tokenizer.model_max_length
        examples = "; ".join(f"text[{index}]: {pieces} pieces, {anchors} anchors" for index, pieces, anchors in cut[:3])
        logger.warning(
            f"CmalProcessor: {len(cut)} of {len(texts)} captions are longer than {limit} pieces (max_length, special "
            f"tokens included) and were cut: {sum(pieces for _, pieces, _ in cut)} word pieces and "
            f"{sum(anchors for _, _, anchors in cut)} anchors (words past the cut, or cut in part) are lost "
            f"({examples}{'; ...' if len(cut) > 3 else ''}). Give shorter captions or a larger max_length (at most "
            "the model's config.max_position_embeddings)"
        )

    @staticmethod
    def _stack_anchors(rows: list[list[tuple[int, int, int]]], action: int | None) -> dict[str, np.ndarray]:
        """Anchor rows padded to the batch's most; `anchor_actions` only when an action was asked for."""
        num_rows = max(len(sample_rows) for sample_rows in rows)
        anchor_pairs = np.full((len(rows), num_rows, 2), -1, dtype=np.int64)
        anchor_concept_ids = np.full((len(rows), num_rows), -1, dtype=np.int64)
        anchor_actions = np.zeros((len(rows), num_rows), dtype=np.int64)
        for index, sample_rows in enumerate(rows):
            if sample_rows:
                table = np.asarray(sample_rows, dtype=np.int64)
                anchor_pairs[index, : len(table)] = table[:, :2]
                anchor_concept_ids[index, : len(table)] = table[:, 2]
                anchor_actions[index, : len(table)] = action or 0
        stacked = {"anchor_pairs": anchor_pairs, "anchor_concept_ids": anchor_concept_ids}
        if action is not None:
            stacked["anchor_actions"] = anchor_actions
        return stacked

    @staticmethod
    def _convert(data: dict, return_tensors: str | None) -> dict:
        if return_tensors == "pt":
            return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in data.items()}
        if return_tensors == "np":
            return data
        return {name: value if name in ("visual_feats", "visual_pos") or not isinstance(value, np.ndarray)
                else value.tolist() for name, value in data.items()}

    def anchor_statistics(self, texts, regions_list, *, top_k: int = 20):
        """How well captions anchor to the tags of their images, with this processor's lexicon and region
        selection (`anchoring.anchor_statistics`; words from `anchoring.split_words`, so text truncation is not
        applied). `regions_list` is one regions dict per caption; only its `tags` (and `scores`) are read.
        Returns an `AnchorStatistics` (`.format()` prints it)."""
        texts = self._checked_texts(texts)
        if isinstance(regions_list, Mapping) or not isinstance(regions_list, Sequence) or \
                len(regions_list) != len(texts):
            raise ValueError(f"regions_list must be a list of one regions dict per caption ({len(texts)}), "
                             f"got {_shorten(regions_list)}")
        tags = []
        for index, regions in enumerate(regions_list):
            where = f"regions_list[{index}]"
            if not isinstance(regions, Mapping) or regions.get("tags") is None:
                raise ValueError(f"{where} must be a dict with tags, got {_shorten(regions)}")
            names = self._tag_names(regions["tags"], None, where)
            scores = self._checked_scores(regions.get("scores"), len(names), where)
            if len(names) > self.max_regions:
                keep = range(self.max_regions) if scores is None else \
                    sorted(np.argsort(-np.asarray(scores), kind="stable")[: self.max_regions].tolist())
                names = [names[i] for i in keep]
            tags.append(names)
        return anchor_statistics(texts, tags, self.lexicon, top_k=top_k)

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The settings written to `processor_config.json` (the tokenizer and the lexicon have files of their own;
        the region extractor is not saved)."""
        output = {
            "processor_class": type(self).__name__,
            "max_regions": self.max_regions,
            "tag_vocabulary": self.tag_vocabulary,
            "lexicon_file": LEXICON_FILE,
        }
        if getattr(self, "auto_map", None):
            output["auto_map"] = self.auto_map
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Writes the tokenizer, `processor_config.json` and `concept_lexicon.json` into `save_directory`."""
        repo_id = kwargs.pop("repo_id", None)
        hub_kwargs = {key: kwargs.pop(key) for key in ("commit_message", "token", "private") if key in kwargs}
        files = super().save_pretrained(save_directory, push_to_hub=False)
        lexicon_path = os.path.join(save_directory, LEXICON_FILE)
        self.lexicon.save(lexicon_path)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(save_directory).name, **hub_kwargs)
        return [*files, lexicon_path]

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        processor_dict, unused_kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        lexicon_file = processor_dict.pop("lexicon_file", None)
        if lexicon_file is not None:
            path = cached_file(pretrained_model_name_or_path, lexicon_file,
                               **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
            processor_dict["lexicon"] = ConceptLexicon.load(path)
        return processor_dict, unused_kwargs

    @classmethod
    def _from_pretrained_naming_the_source(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`, with a `ValueError` naming `pretrained_model_name_or_path` for a folder
        that does not exist or holds no tokenizer, and for a Hub id that cannot be found."""
        argument = "pretrained_model_name_or_path"
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise ValueError(f"{argument} must be a folder path or a Hub repository id (str), got "
                             f"{_shorten(pretrained_model_name_or_path)}")
        folder = Path(pretrained_model_name_or_path).expanduser() / kwargs.get("subfolder", "")
        if folder.is_dir() or _looks_like_a_path(pretrained_model_name_or_path):
            _check_tokenizer_folder(folder, argument)
            return super().from_pretrained(os.fspath(Path(pretrained_model_name_or_path).expanduser()), **kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:  # huggingface_hub's errors (not found, offline, bad id) are OSErrors
            raise ValueError(
                f"{argument} {str(pretrained_model_name_or_path)!r} is not a local folder, and as a Hub repository "
                f"id it cannot be loaded ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}); expected "
                "a folder written by CmalProcessor.save_pretrained, or the id of a Hub repository holding one"
            ) from error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a processor saved by `save_pretrained`. `lexicon=`, `tag_vocabulary=`, `max_regions=` and
        `region_extractor=` override what the folder holds."""
        # Kept away from the tokenizer's `from_pretrained`, which would store them in its own config.
        overrides = {name: kwargs.pop(name) for name in ("lexicon", "tag_vocabulary", "max_regions",
                                                          "region_extractor") if name in kwargs}
        processor = cls._from_pretrained_naming_the_source(pretrained_model_name_or_path, **kwargs)
        if not overrides:
            return processor
        settings = {"lexicon": processor.lexicon, "tag_vocabulary": processor.tag_vocabulary,
                    "max_regions": processor.max_regions, "region_extractor": processor.region_extractor}
        return cls(processor.tokenizer, **{**settings, **overrides})


__all__ = ["LEXICON_FILE", "CmalProcessor", "CmalRegionExtractor"]
