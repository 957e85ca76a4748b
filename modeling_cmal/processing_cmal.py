"""CmalProcessor: captions and detected regions → CMAL model inputs, anchors included.

Shaped like transformers' multimodal processors (ViltProcessor, CLIPProcessor): a tokenizer and an image processor,
here `CmalRegionProcessor` (`region_processing_cmal.py`), which validates, normalises, selects and pads the regions
of each image. On top of the two, the processor runs the anchor operator ⊕ (`anchoring.find_anchors`) on the
tokenizer's own words, so that every piece of a word that names the concept of a kept region is paired with that
region. The concept lexicon travels with the processor as one extra file, `concept_lexicon.json`.

Remote code: this module imports only the standard library, numpy, torch, transformers and its siblings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, BertTokenizer
# From its module: in some 5.x releases (5.4 and 5.10 measured) `transformers.AutoImageProcessor` is a placeholder that
# demands torchvision; the class itself needs only Pillow.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

from .anchoring import ConceptLexicon, _shorten, anchor_statistics, find_anchors
from .configuration_cmal import ANCHOR_ACTIONS, CmalConfig
from .region_extraction import CmalRegionExtractor
from .region_processing_cmal import (
    RETURN_TENSORS,
    VISUAL_INPUT_NAMES,
    CmalRegionProcessor,
    RegionSelection,
)

LEXICON_FILE = "concept_lexicon.json"
# The bert-base-uncased WordPiece vocabulary (Apache-2.0; md5 64800d5d8528ce344256daf115d4965e), the default tokenizer.
DEFAULT_VOCAB_FILE = Path(__file__).resolve().parent / "data" / "bert_base_uncased_vocab.txt"
DEFAULT_MODEL_MAX_LENGTH = 512
# A folder holds a tokenizer when it has one of these (fast serialisation, WordPiece/BPE vocabularies, sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
TEXT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
ANCHOR_INPUT_NAMES = ("anchor_pairs", "anchor_concept_ids", "anchor_actions")
# Settings of the region processor that `CmalProcessor(...)` and `from_pretrained(..., name=value)` also take.
REGION_SETTINGS = ("max_regions", "tag_vocabulary")
# `__init__` arguments that are settings, not sub-processors: kept away from the tokenizer's `from_pretrained`.
PROCESSOR_SETTINGS = ("lexicon", *REGION_SETTINGS, "region_extractor")
# Keyword arguments of `from_pretrained` that the Hub file lookup takes.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")

logger = logging.getLogger(__name__)


def default_tokenizer(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> BertTokenizer:
    """The fast bert-base-uncased tokenizer (lower-casing WordPiece, 30,522 pieces) from the vocabulary bundled
    with the package (`modeling_cmal/data/bert_base_uncased_vocab.txt`), the tokenizer of CMAL's BERT-initialised
    models. `model_max_length` is the longest caption in pieces, special tokens included (truncation cuts there)."""
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 3:
        raise ValueError(f"model_max_length must be an int >= 3 ([CLS], a piece, [SEP]), got "
                         f"{_shorten(model_max_length)}")
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
        state = "is a file" if path.exists() else "does not exist"
        raise ValueError(f"{argument} {str(folder)!r} is not a folder (it {state}); expected a folder written by "
                         "CmalProcessor.save_pretrained or a tokenizer's save_pretrained (tokenizer.json, vocab.txt, "
                         "...)")
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


# What a pre-tokenised (streamed) corpus row depends on and how its anchors are found: shared by the corpus writer
# (`cmal_processing.shards`) and the pre-training collator that reads it.


def processor_identity(processor) -> str:
    """What pre-tokenised corpus rows depend on: a 16-hex digest of the tokenizer's vocabulary (piece -> id), its
    special tokens and the lexicon (`to_dict()`). A corpus built with another tokenizer or lexicon has another one."""
    digest = hashlib.sha256()
    tokenizer = processor.tokenizer
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    digest.update(json.dumps(processor.lexicon.to_dict(), sort_keys=True, ensure_ascii=False, default=str).encode())
    max_regions = getattr(processor.image_processor, "max_regions", None)
    digest.update(f"max_regions={max_regions}".encode())
    return digest.hexdigest()[:16]


def words_of_encoding(encoding, text: str) -> tuple[list[str], list[int]]:
    """The words of one tokenised caption (a `tokenizers.Encoding` of `text`) and the word of each piece.

    Returns `(words, word_ids)`: `words` the tokenizer's words, their text cut from `text` by the pieces' offsets;
    `word_ids[p]` the index in `words` of piece `p`, -1 for special tokens and for the pieces of a word that
    truncation cut in part (such a word is left out, so an anchor always covers all pieces of its word)."""
    cut = {word for part in encoding.overflowing for word in part.word_ids if word is not None}
    dense: dict[int, int] = {}
    pieces_of_word: list[list[int]] = []
    word_ids = []
    for position, word in enumerate(encoding.word_ids):
        if word is None or word in cut:
            word_ids.append(-1)
            continue
        if word not in dense:
            dense[word] = len(dense)
            pieces_of_word.append([])
        word_ids.append(dense[word])
        pieces_of_word[dense[word]].append(position)
    offsets = encoding.offsets
    return [text[offsets[pieces[0]][0]: offsets[pieces[-1]][1]] for pieces in pieces_of_word], word_ids


def anchor_rows_of_words(words, word_ids, tags, scores, lexicon) -> list[int]:
    """Flattened `(piece position, region index, concept id)` of every piece of every anchored word, for a caption
    already split into `words` (`word_ids[p]`: the word of piece `p`, -1 for special tokens and cut words) and the
    selected regions' `tags` / `scores`: the anchors `CmalProcessor` finds for the pair."""
    if tags is None or len(tags) == 0 or len(words) == 0:
        return []
    word_ids = np.asarray(word_ids)
    rows = []
    for match in find_anchors([str(word) for word in words], [str(tag) for tag in tags], lexicon,
                              None if scores is None else [float(score) for score in scores]):
        for position in np.flatnonzero((word_ids >= match.word_start) & (word_ids < match.word_end)).tolist():
            rows += [position, match.region_index, match.concept_id]
    return rows


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
        image_processor (`CmalRegionProcessor`, *optional*): validates, normalises, selects (`max_regions`) and
            pads the regions; by default `CmalRegionProcessor(max_regions=..., tag_vocabulary=...)` of the two
            arguments below. `processor.image_processor` is it, as in transformers' multimodal processors.
        lexicon (`ConceptLexicon` or its `to_dict()` form, *optional*): the anchor concepts; defaults to
            `ConceptLexicon.default()`. Its size is `config.num_anchor_concepts` of the model.
        tag_vocabulary (list of str or a path to a file of one name per line, *optional*): class names of the
            detector, so that `tags` may be given as ids (id = position in the list). A setting of the region
            processor; given with `image_processor=`, it replaces that one's.
        max_regions (`int`, *optional*, defaults to 36): regions kept per image; more are cut to the
            `max_regions` of highest score (`select_top_regions`). A setting of the region processor, like
            `tag_vocabulary`.
        region_extractor (`CmalRegionExtractor` or any callable images → regions dicts, *optional*): lets
            `processor(text=..., images=...)` detect regions itself. It is **not saved** with the processor (it is a
            whole detection model): give it again after `from_pretrained`, or set `processor.region_extractor`.

    `save_pretrained` and `from_pretrained` are `ProcessorMixin`'s: the tokenizer files, `processor_config.json` (the
    region processor's settings under `image_processor`, and the `auto_map` that `trust_remote_code` loading needs
    when the class is registered for `AutoProcessor`), plus the lexicon as `concept_lexicon.json`.
    `from_pretrained(folder, max_regions=..., lexicon=..., tag_vocabulary=..., region_extractor=...)` overrides what
    the folder holds. A folder saved before the region processor existed (`max_regions` and `tag_vocabulary` at the
    top of `processor_config.json`) and a folder with only a tokenizer (default lexicon and regions) load too.
    `batch_decode` and `decode` are the tokenizer's.
    """

    # `ProcessorMixin` finds the sub-processors by these `__init__` parameter names: `tokenizer` and
    # `image_processor`; the other parameters are settings (the lexicon has its own file).
    def __init__(self, tokenizer=None, image_processor=None, lexicon=None, tag_vocabulary=None, max_regions=None,
                 region_extractor=None, **kwargs):
        tokenizer = self._checked_tokenizer(tokenizer)
        image_processor = self._checked_region_processor(image_processor, max_regions=max_regions,
                                                         tag_vocabulary=tag_vocabulary)
        self.lexicon = lexicon
        self.region_extractor = region_extractor
        super().__init__(tokenizer, image_processor, **kwargs)

    @staticmethod
    def _checked_tokenizer(tokenizer):
        if tokenizer is None:
            return default_tokenizer()
        if isinstance(tokenizer, (str, os.PathLike)):
            folder = _check_tokenizer_folder(tokenizer, "tokenizer")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as error:
                raise ValueError(f"tokenizer {str(tokenizer)!r}: the tokenizer files of this folder cannot be loaded "
                                 f"({type(error).__name__}: {str(error).strip()[:200]}); expected a folder written by "
                                 "a fast tokenizer's save_pretrained") from error
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer must be a fast tokenizer (anchors need its word ids), a tokenizer folder or "
                             f"None, got {type(tokenizer).__name__} with is_fast=False")
        return tokenizer

    @staticmethod
    def _checked_region_processor(image_processor, **settings):
        """The region processor: `image_processor` (with any of `settings` that are given replacing its own), or a
        `CmalRegionProcessor` of the settings."""
        given = {name: value for name, value in settings.items() if value is not None}
        if image_processor is None:
            return CmalRegionProcessor(**given)
        # Duck-typed: a CmalRegionProcessor of another copy of the module (remote code next to a local package).
        if not all(callable(getattr(image_processor, name, None)) for name in ("select", "pad", "kept_regions")):
            raise ValueError(f"image_processor must be a CmalRegionProcessor, got {type(image_processor).__name__}")
        if not given:
            return image_processor
        own = {name: getattr(image_processor, name) for name in REGION_SETTINGS}
        return type(image_processor)(**{**own, **given})

    @property
    def lexicon(self) -> ConceptLexicon:
        return self._lexicon

    @lexicon.setter
    def lexicon(self, lexicon) -> None:
        if lexicon is None:
            lexicon = ConceptLexicon.default()
        elif isinstance(lexicon, Mapping):
            lexicon = ConceptLexicon.from_dict(lexicon)
        elif not isinstance(lexicon, ConceptLexicon) and callable(getattr(lexicon, "to_dict", None)):
            # A ConceptLexicon of another copy of the module (remote code next to a local package).
            lexicon = ConceptLexicon.from_dict(lexicon.to_dict())
        elif not isinstance(lexicon, ConceptLexicon):
            raise ValueError(f"lexicon must be a ConceptLexicon, its to_dict() form or None, got {_shorten(lexicon)}")
        self._lexicon = lexicon

    @property
    def max_regions(self) -> int:
        """Regions kept per image (the region processor's; setting it gives the processor a region processor with
        the new value)."""
        return self.image_processor.max_regions

    @max_regions.setter
    def max_regions(self, max_regions: int) -> None:
        self.image_processor = type(self.image_processor)(max_regions=max_regions,
                                                          tag_vocabulary=self.image_processor.tag_vocabulary)

    @property
    def tag_vocabulary(self) -> list[str] | None:
        """The detector's class names for tag ids (the region processor's; settable like `max_regions`)."""
        return self.image_processor.tag_vocabulary

    @tag_vocabulary.setter
    def tag_vocabulary(self, tag_vocabulary) -> None:
        self.image_processor = type(self.image_processor)(max_regions=self.image_processor.max_regions,
                                                          tag_vocabulary=tag_vocabulary)

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
                 return_tensors=None, anchor_action=None, return_region_indices=False) -> BatchFeature:
        r"""
        Args:
            text (`str` or list of `str`): one caption per image; `""` gives `[CLS] [SEP]`.
            regions (`dict` or list of `dict`): per image `visual_feats` `[M, Dv]` (numpy, torch or lists; `[0, Dv]`
                for an image without regions), `visual_pos` `[M, 4]` as `x1, y1, x2, y2` in pixels with
                `image_size` `(width, height)`, or normalised to `[0, 1]` without it, optional `tags` (`M` class
                names, or ids of `tag_vocabulary`; without tags there are no anchors), optional `scores` (`M`
                confidences), optional `image_id` (ignored): the columns of the corpus and the names of the model.
                `features` / `boxes` (the earlier names) still work, with a deprecation warning. `image_size` is
                `(width, height)`, as PIL's `Image.size`; sizes whose boxes fit only the swapped `(height, width)`
                are refused. Pixel boxes that reach past the image edge are clipped to it, with a warning giving the
                count; a box that does not touch the image at all is an error (`CmalRegionProcessor`).
            images: a PIL image, an `[H, W(, C)]` uint8 array or a list of them, instead of `regions`; needs a
                `region_extractor`.
            padding, truncation, max_length: the tokenizer's, for the text (`max_length` defaults to the
                tokenizer's `model_max_length`). A caption cut by truncation logs a warning naming how many word
                pieces and anchors were lost. Regions are always padded to the longest image of the batch
                (`padding="max_length"`: to `max_regions`); anchors to the most anchor rows of the batch.
            return_tensors (`None`, `"np"` or `"pt"`): `"pt"` torch tensors, `"np"` numpy arrays; `None` python
                lists as the tokenizer gives them, except `visual_feats` and `visual_pos`, numpy float32 arrays.
            anchor_action (`str` or `int`, *optional*): give every anchor this action (`keep`, `fill_text`,
                `fill_region`, `mask_both`, `mask_text`, `mask_region`, or 0-5) in `anchor_actions`. By default
                there is no `anchor_actions` output, and the model applies `config.default_anchor_action`: the
                one policy of fine-tuning and inference (the pre-training collator draws actions itself).
            return_region_indices (`bool`, defaults to `False`): also return `region_indices` `[B, M]`, the input
                index of each kept region (-1 on padding); not a model input.

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
        selections = None
        if regions is not None:
            if texts is not None and isinstance(regions, Sequence) and not isinstance(regions, (str, bytes)) and \
                    len(regions) != len(texts):
                raise ValueError(f"text has {len(texts)} captions but regions has {len(regions)} images; "
                                 "expected one image per caption")
            selections = self.image_processor.select(regions)
            if texts is not None and len(selections) != len(texts):
                raise ValueError(f"text has {len(texts)} captions but regions has {len(selections)} images; "
                                 "expected one image per caption")

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
        if selections is not None:
            visual = self.image_processor.pad(selections, padding="max_length" if padding == "max_length" else True)
            region_indices = visual.pop("region_indices")
            data.update(visual)
            if return_region_indices:
                data["region_indices"] = region_indices
        rows = None
        if encoding is not None and selections is not None:
            rows = [self._anchor_rows(encoding.encodings[index], texts[index], selection)
                    for index, selection in enumerate(selections)]
            data.update(self._stack_anchors(rows, action))
        if encoding is not None and truncation not in (False, "do_not_truncate"):
            self._warn_about_truncation(encoding, texts, selections, rows, max_length)
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
    # Anchors
    # ----------------------------------------------------------------------------------------------------------

    def _anchor_rows(self, encoding, text: str, selection: RegionSelection) -> list[tuple[int, int, int]]:
        """`(piece position, region index, concept id)` of every piece of every anchored word (`words_of_encoding`,
        `anchor_rows_of_words`)."""
        if not selection.tags:
            return []
        words, word_ids = words_of_encoding(encoding, text)
        flat = anchor_rows_of_words(words, word_ids, selection.tags, selection.scores, self.lexicon)
        return [tuple(flat[start: start + 3]) for start in range(0, len(flat), 3)]

    def _uncut_anchor_count(self, encoding, text: str, selection: RegionSelection) -> int:
        """How many anchors the whole caption has (truncation undone: the overflowing pieces put back)."""
        if not selection.tags:
            return 0
        spans: dict[int, list[int]] = {}
        for part in (encoding, *encoding.overflowing):
            for word, (start, end) in zip(part.word_ids, part.offsets):
                if word is not None:
                    span = spans.setdefault(word, [start, end])
                    span[0], span[1] = min(span[0], start), max(span[1], end)
        words = [text[start:end] for _, (start, end) in sorted(spans.items())]
        return len(find_anchors(words, selection.tags, self.lexicon, selection.scores))

    def _warn_about_truncation(self, encoding, texts: list[str], selections, rows, max_length: int | None) -> None:
        """A caption longer than `max_length` is cut: says how many pieces, and how many anchors, were lost."""
        cut = []
        for index, sample in enumerate(encoding.encodings):
            if not sample.overflowing:
                continue
            lost_pieces = sum(word is not None for part in sample.overflowing for word in part.word_ids)
            lost_anchors = 0
            if selections is not None:
                kept_anchors = len({region for _, region, _ in rows[index]})
                lost_anchors = max(self._uncut_anchor_count(sample, texts[index], selections[index]) - kept_anchors, 0)
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
            names = self.image_processor.tag_names(regions["tags"], None, where)
            scores = self.image_processor.checked_scores(regions.get("scores"), len(names), where)
            tags.append([names[i] for i in self.image_processor.kept_regions(scores, len(names))])
        return anchor_statistics(texts, tags, self.lexicon, top_k=top_k)

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading: ProcessorMixin's, plus the lexicon file
    # ----------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """`ProcessorMixin.save_pretrained` (tokenizer files, `processor_config.json`), then the lexicon as
        `concept_lexicon.json`; pushed to the Hub after both are written."""
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
        """`ProcessorMixin.get_processor_dict`, with the lexicon read from `concept_lexicon.json` (when the folder
        has one; otherwise `__init__` takes the default lexicon)."""
        processor_dict, unused_kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        # Folders saved before 2026-12 name the file; it has always been LEXICON_FILE.
        lexicon_file = processor_dict.pop("lexicon_file", LEXICON_FILE)
        try:
            path = cached_file(pretrained_model_name_or_path, lexicon_file,
                               **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
        except OSError:  # the folder has no lexicon file (a tokenizer-only folder): the default lexicon
            path = None
        if path is not None:
            processor_dict["lexicon"] = ConceptLexicon.load(path)
        return processor_dict, unused_kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`: the tokenizer through `AutoTokenizer`, the region processor through
        `AutoImageProcessor` (registered for `CmalConfig` when this module is imported; named by the `auto_map` of
        the saved `image_processor` entry for remote code), the lexicon from `concept_lexicon.json`.

        `max_regions=`, `tag_vocabulary=`, `lexicon=` and `region_extractor=` override what the folder holds. A
        folder saved before the region processor existed (`max_regions` and `tag_vocabulary` at the top of
        `processor_config.json`) and a folder that holds only a tokenizer load too: their region processor is made
        from the top-level settings (or the defaults). A name that is not a folder, or a folder without a tokenizer,
        is a `ValueError` naming `pretrained_model_name_or_path`."""
        settings = {name: kwargs.pop(name) for name in PROCESSOR_SETTINGS if name in kwargs}
        _check_pretrained_source(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        try:
            processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
            saved = processor_dict.get("image_processor")
            if saved is None:
                processor = cls._from_folder_without_region_processor(pretrained_model_name_or_path, processor_dict,
                                                                      **kwargs)
            elif not isinstance(saved, Mapping):
                raise ValueError(f"pretrained_model_name_or_path {str(pretrained_model_name_or_path)!r}: the "
                                 f"image_processor entry of processor_config.json is {_shorten(saved)}; expected the "
                                 "settings of a CmalRegionProcessor (max_regions, tag_vocabulary)")
            else:
                processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:  # huggingface_hub's errors (not found, offline, bad id) are OSErrors
            raise _hub_error(pretrained_model_name_or_path, error) from error
        for name, value in settings.items():  # the setters validate, as __init__ does
            setattr(processor, name, value)
        return processor

    @classmethod
    def _from_folder_without_region_processor(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """A folder of an earlier layout: its tokenizer, and a region processor of the top-level settings."""
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        settings = {name: processor_dict[name] for name in REGION_SETTINGS if name in processor_dict}
        return cls(tokenizer=tokenizer, image_processor=CmalRegionProcessor(**settings),
                   lexicon=processor_dict.get("lexicon"))


def _check_pretrained_source(pretrained_model_name_or_path, subfolder: str = "") -> None:
    """A `ValueError` naming `pretrained_model_name_or_path` when it is not a str / path, or is meant as a local
    folder that does not exist or holds no tokenizer files."""
    argument = "pretrained_model_name_or_path"
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        raise ValueError(f"{argument} must be a folder path or a Hub repository id (str), got "
                         f"{_shorten(pretrained_model_name_or_path)}")
    folder = Path(pretrained_model_name_or_path).expanduser() / subfolder
    if folder.is_dir() or _looks_like_a_path(pretrained_model_name_or_path):
        _check_tokenizer_folder(folder, argument)


def _hub_error(pretrained_model_name_or_path, error: OSError) -> ValueError:
    return ValueError(
        f"pretrained_model_name_or_path {str(pretrained_model_name_or_path)!r} is not a local folder, and as a Hub "
        f"repository id it cannot be loaded ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}); "
        "expected a folder written by CmalProcessor.save_pretrained, or the id of a Hub repository holding one"
    )


__all__ = ["LEXICON_FILE", "CmalProcessor", "CmalRegionExtractor", "CmalRegionProcessor", "default_tokenizer"]


# The region processor is found the way transformers finds its image processors: through `AutoImageProcessor`, by
# the class registered for `CmalConfig` in-process, or by the `auto_map` that saving writes into the processor's
# `image_processor` entry (remote code). Registered here rather than in the package's `__init__`, because remote
# code imports this file and not `__init__`; the registration by name also loads entries saved without that
# `auto_map` (before 2026-12-07). Both backends name the one class: regions need neither PIL nor torchvision.
AutoImageProcessor.register(CmalConfig, image_processor_classes={"pil": CmalRegionProcessor,
                                                                 "torchvision": CmalRegionProcessor}, exist_ok=True)
CmalRegionProcessor.register_for_auto_class("AutoImageProcessor")
