"""CmalPretrainingCollator: dataset rows → a pre-training batch (anchors with sampled actions, MLM, ITM).

Like transformers' `DataCollatorForLanguageModeling`, every random choice of pre-training is made here, so that
`CmalForPreTraining.forward` is deterministic: which anchors are kept, filled or masked (CMAP), which word pieces
are masked (MLM), which images get another row's caption (ITM negatives) and which pairs are left clean
(`itm_clean_rate`).

Remote code: this module imports only the standard library, numpy, torch and its siblings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .anchoring import find_anchors, normalize_phrase, split_words
from .configuration_cmal import ANCHOR_ACTIONS, ANCHOR_RATE_FIELDS, CmalConfig
from .processing_cmal import CmalProcessor, anchor_rows_of_words, processor_identity, words_of_encoding

IGNORE_INDEX = -100
ACTION_MASK_TEXT, ACTION_MASK_REGION = ANCHOR_ACTIONS.index("mask_text"), ANCHOR_ACTIONS.index("mask_region")
DEFAULT_MLM_PROBABILITY = 0.15
DEFAULT_ITM_NEGATIVE_RATE = 0.5
DEFAULT_ITM_CLEAN_RATE = 0.2
# Of the pieces chosen for MLM: 80 % become [MASK], 10 % a random piece, 10 % stay as they are.
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def _rows_digest(rows: list[Mapping]) -> int:
    """A 64-bit digest of the rows of a batch, in order: their texts, image ids and tags (features are too slow to
    hash, and a caption with its image id already names a row)."""
    digest = hashlib.blake2b(digest_size=8)
    for row in rows:
        tags = row.get("tags")
        digest.update("\x1f".join((str(row["text"]), str(row.get("image_id")),
                                   "\x1e".join(map(str, [] if tags is None else tags)))).encode())
        digest.update(b"\x1d")
    return int.from_bytes(digest.digest(), "little")


PRETOKENISED_COLUMNS = ("input_ids", "word_ids", "words", "anchor_rows", "processor_identity")


def _region_array(value, num_regions: int, width: int, dtype: str, where: str) -> np.ndarray:
    """`[num_regions, width]` float32 from a stored binary buffer (`dtype` little-endian) or an array."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        array = np.frombuffer(value, dtype=dtype)
        if array.size != num_regions * width:
            raise ValueError(f"{where} holds {array.size} values; expected num_regions {num_regions} x {width}")
        return array.reshape(num_regions, width)
    array = np.asarray(value)
    if array.shape != (num_regions, width):
        raise ValueError(f"{where} has shape {array.shape}; expected ({num_regions}, {width})")
    return array


@dataclass
class CmalPretrainingCollator:
    """Turns rows of a pre-training dataset (columns of `cmal_processing/schema.py`: `text`, `visual_feats` `[M, Dv]`,
    `visual_pos` `[M, 4]` normalised, `tags`, `scores`, `image_id`) into a batch of torch tensors for
    `CmalForPreTraining`: the processor's outputs plus

    - `anchor_actions` sampled per anchor (every piece of an anchor gets its action): fill text, fill region, mask
      both, mask text and mask region at the config's rates, keep otherwise (AMC targets: the mask-text and
      mask-region anchors, see `CmalForPreTraining`);
    - ITM: with probability `itm_negative_rate` a row's image is paired with the caption of another row of the
      batch whose `image_id` differs (when there is one; rows without `image_id` count as different images).
      The anchors of such a pair are found anew for the new caption and image, so that filling does not give
      the label away. `itm_labels` is 0 for these pairs, 1 for the others;
    - MLM `labels`: `mlm_probability` of the word pieces that are neither special tokens nor anchor pieces
      (80 % replaced by [MASK], 10 % by a random piece, 10 % unchanged); -100 elsewhere. Negatives are masked
      alike (so that masking says nothing about the ITM label) but their labels are -100: a caption is only
      predicted from its own image;
    - clean pairs: with probability `itm_clean_rate` a pair is left as fine-tuning and retrieval see it (every
      anchor keeps, no piece masked). Without them, every training pair the ITM head saw would carry fills and
      masks, and it would learn to call any uncorrupted input a mismatch. Positives and negatives alike; their MLM
      labels are -100 and no anchor is filled, so the effective action and MLM rates are (1 - itm_clean_rate) x the
      configured ones.
    - hard ITM negatives: with probability `itm_hard_negative_rate` an ITM negative keeps its own caption with one
      edit that makes it false, instead of taking another image's caption. Of the caption's anchored words (those
      that name a concept one of its regions carries) either one is *replaced* by an anchored word of another image
      of the batch whose concept the image has no region of, related concepts excluded ("a red circle" → "a red
      star"), or two of different concepts *swap* places ("a red circle and a blue star" → "a red star and a blue
      circle"), one or the other with equal chance when both can be made. Ordinary negatives differ from the image
      in most of their words; these differ in one object or one binding, which is what "is there a red star?" and
      "the picture shows a blue circle" ask. A caption without an anchored word to edit gets an ordinary negative.
      The edit is made in the caption's text (its case and spacing kept), which is then tokenised and anchored anew.
    - `mlm_positions` `[B, P]`: the labelled positions of each row, padded with -1 (`mlm_prediction_positions`);
      the model decodes only there.

    Every batch has the same keys, also one without any anchor: `anchor_pairs` `[B, 0, 2]`, `anchor_concept_ids` and
    `anchor_actions` `[B, 0]` (DDP steps must agree on their inputs).

    Args:
        processor: the `CmalProcessor` (tokenizer, lexicon, `max_regions`).
        config: a `CmalConfig` giving the anchor action rates (and checked against the processor's vocabulary and
            lexicon sizes). Without it, rates default to `CmalConfig`'s defaults.
        anchor_fill_text_rate, anchor_fill_region_rate, anchor_mask_both_rate, anchor_mask_text_rate,
            anchor_mask_region_rate: explicit rates; they override the config's. Keep is 1 minus their sum.
        mlm_probability: defaults to 0.15 (0 when `config.mlm_loss_weight` is 0).
        itm_negative_rate: defaults to 0.5 (0 when `config.itm_loss_weight` is 0).
        itm_clean_rate: defaults to 0.2 (0 when `config.itm_loss_weight` is 0).
        itm_hard_negative_rate: the share of ITM negatives made by editing the row's own caption (default 0: every
            negative is another image's caption, and the batch's random draws are those of a collator without it).
        seed: the seed of the batch sequence.
        max_length: text length (default: the tokenizer's `model_max_length`).
        visual_feats_dtype: dtype of `visual_feats` in the batch, `"float32"` (default), `"float16"` or
            `"bfloat16"`: half the bytes from DataLoader workers to the training process and to the GPU; the model
            casts them to its own dtype at its input.

    Reproducibility: the random draws of a batch are made by the collator's `torch.Generator`, seeded from
    `seed` and a digest of the batch's rows (texts, image ids, tags). So a batch's draws depend on
    nothing that came before: the same seed and the same rows give the same batch in any process, in DataLoader
    workers, on any rank of a distributed run, after any number of earlier batches, and after a resume (also when
    the data loader collated a batch ahead, as Accelerate's does). `state_dict()` / `load_state_dict()` carry the
    seed (`examples/pretrain.py` keeps it as JSON in the checkpoint's `trainer_state.json`; `register_for_checkpointing`
    would pickle it as `custom_checkpoint_*.pkl`, which resuming refuses). The one cost: an unshuffled loader gives a batch
    the same draws in every epoch (pre-training shuffles, and evaluation wants exactly that).
    """

    processor: CmalProcessor = field(repr=False)
    config: CmalConfig | None = field(default=None, repr=False)
    anchor_fill_text_rate: float | None = None
    anchor_fill_region_rate: float | None = None
    anchor_mask_both_rate: float | None = None
    anchor_mask_text_rate: float | None = None
    anchor_mask_region_rate: float | None = None
    mlm_probability: float | None = None
    itm_negative_rate: float | None = None
    itm_clean_rate: float | None = None
    itm_hard_negative_rate: float = 0.0
    seed: int = 0
    max_length: int | None = None
    visual_feats_dtype: str = "float32"

    def __post_init__(self):
        # Duck-typed: a processor loaded as remote code (`AutoProcessor`, `trust_remote_code=True`) is a CmalProcessor
        # of another module.
        if not callable(self.processor) or not all(hasattr(self.processor, name) for name in ("tokenizer", "lexicon")):
            raise ValueError(f"processor must be a CmalProcessor, got {type(self.processor).__name__}")
        defaults = self.config if self.config is not None else CmalConfig
        for name in ANCHOR_RATE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))
        if self.mlm_probability is None:
            off = self.config is not None and self.config.mlm_loss_weight == 0
            self.mlm_probability = 0.0 if off else DEFAULT_MLM_PROBABILITY
        if self.itm_negative_rate is None:
            off = self.config is not None and self.config.itm_loss_weight == 0
            self.itm_negative_rate = 0.0 if off else DEFAULT_ITM_NEGATIVE_RATE
        if self.itm_clean_rate is None:
            off = self.config is not None and self.config.itm_loss_weight == 0
            self.itm_clean_rate = 0.0 if off else DEFAULT_ITM_CLEAN_RATE
        for name in (*ANCHOR_RATE_FIELDS, "mlm_probability", "itm_negative_rate", "itm_clean_rate",
                     "itm_hard_negative_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in ANCHOR_RATE_FIELDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"{' + '.join(ANCHOR_RATE_FIELDS)} must be at most 1, got {total}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.visual_feats_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"visual_feats_dtype must be 'float32', 'float16' or 'bfloat16', got "
                             f"{self.visual_feats_dtype!r}")
        tokenizer = self.processor.tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError("the processor's tokenizer has no mask token; MLM needs one")
        if self.config is not None:
            if len(self.processor.lexicon) != self.config.num_anchor_concepts:
                raise ValueError(f"the processor's lexicon has {len(self.processor.lexicon)} concepts but "
                                 f"config.num_anchor_concepts is {self.config.num_anchor_concepts}")
            if len(tokenizer) > self.config.vocab_size:
                raise ValueError(f"the processor's tokenizer has {len(tokenizer)} pieces but config.vocab_size is "
                                 f"{self.config.vocab_size}")
        self._special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        # Upper bounds of the uniform draw for actions 1, 2, ... in ANCHOR_ACTIONS order; keep (0) above the last.
        self._action_bounds = torch.tensor(np.cumsum([getattr(self, name) for name in ANCHOR_RATE_FIELDS]),
                                           dtype=torch.float64)
        self._generator = torch.Generator()
        self._identity = None

    # ----------------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if not isinstance(state, Mapping) or "seed" not in state:
            raise ValueError(f"state must be a dict with seed (from state_dict()), got {state!r}")
        self.seed = int(state["seed"])

    def reset(self) -> None:
        """Restart the batch sequence of `seed`: nothing to do, since draws depend only on the seed and the rows
        (kept so that an evaluation loop may call it whatever the collator)."""

    def _start_batch(self, rows: list[Mapping]) -> torch.Generator:
        self._generator.manual_seed(_mix(self.seed, _rows_digest(rows)))
        return self._generator

    # ----------------------------------------------------------------------------------------------------------
    # Batch

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        rows = list(rows)
        if not rows:
            raise ValueError("rows is empty; expected at least one dataset row")
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"rows[{index}] must be a dict (a dataset row), got {type(row).__name__}")
            missing = [key for key in ("text", "visual_feats", "visual_pos") if key not in row]
            if missing:
                raise ValueError(f"rows[{index}] has no {missing}; expected the columns text, visual_feats, "
                                 "visual_pos, tags, scores (cmal_processing/schema.py)")
            if not isinstance(row["text"], str):
                raise ValueError(f"rows[{index}]['text'] must be a str, got {row['text']!r}")
        generator = self._start_batch(rows)
        caption_rows, itm_labels, edited = self._pair_captions(rows, generator)
        if all(name in rows[0] for name in PRETOKENISED_COLUMNS):
            batch = self._pretokenised_batch(rows, caption_rows, edited)
        else:
            batch = self._processed_batch(rows, caption_rows, edited)
        batch = self._draw(batch, itm_labels, generator)
        batch["visual_feats"] = batch["visual_feats"].to(getattr(torch, self.visual_feats_dtype))
        return batch

    def _processed_batch(self, rows: list[Mapping], caption_rows: list[int], edited: dict[int, str]) -> dict:
        """Rows with raw text: the processor tokenises and anchors every pair."""
        batch = self.processor(
            text=[edited.get(index, str(rows[source]["text"])) for index, source in enumerate(caption_rows)],
            regions=[
                {"visual_feats": row["visual_feats"], "visual_pos": row["visual_pos"], "tags": row.get("tags"),
                 "scores": row.get("scores")}
                for row in rows
            ],
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(batch)

    def _pretokenised_batch(self, rows: list[Mapping], caption_rows: list[int], edited: dict[int, str]) -> dict:
        """Rows of a streamed corpus (`cmal_processing/shards.py`): pieces and anchors stored at build time are padded;
        only an ITM negative gets its anchors found anew: from the stored words of another row's caption, or from an
        edited caption, tokenised here."""
        identity = self._processor_identity()
        for index, row in enumerate(rows):
            missing = [name for name in (*PRETOKENISED_COLUMNS, "num_regions", "feature_dim") if name not in row]
            if missing:
                raise ValueError(f"rows[{index}] lacks {missing}; expected every row pre-tokenised or none")
            if row["processor_identity"] != identity:
                raise ValueError(f"rows[{index}] (image {row.get('image_id')!r}) was tokenised and anchored by "
                                 f"processor {row['processor_identity']!r}, not by this collator's processor "
                                 f"({identity}: another tokenizer vocabulary or lexicon); rebuild the corpus with it")
        batch_size = len(rows)
        counts = [int(row["num_regions"]) for row in rows]
        feature_dim = int(rows[0]["feature_dim"])
        num_slots = max(max(counts), 1)
        # Copied as stored (float16), converted once by torch (vectorised), or not at all with visual_feats_dtype.
        visual_feats = np.zeros((batch_size, num_slots, feature_dim), dtype=np.float16)
        visual_pos = np.zeros((batch_size, num_slots, 4), dtype=np.float32)
        visual_attention_mask = np.zeros((batch_size, num_slots), dtype=np.int64)
        for index, (row, count) in enumerate(zip(rows, counts)):
            if int(row["feature_dim"]) != feature_dim:
                raise ValueError(f"rows[{index}] has {row['feature_dim']}-d features but rows[0] {feature_dim}-d")
            visual_feats[index, :count] = _region_array(row["visual_feats"], count, feature_dim, "<f2",
                                                        f"rows[{index}]['visual_feats']")
            visual_pos[index, :count] = _region_array(row["visual_pos"], count, 4, "<f4", f"rows[{index}]['visual_pos']")
            visual_attention_mask[index, :count] = 1
        pieces = [rows[source]["input_ids"] for source in caption_rows]
        limit = self.max_length or self.processor.tokenizer.model_max_length
        lengths = [len(ids) for ids in pieces]
        if max(lengths) > limit:
            raise ValueError(f"a stored caption has {max(lengths)} pieces, more than max_length {limit}; rebuild the "
                             "corpus with this max_length or raise it")
        edited_anchors = {}
        for index, text in edited.items():
            encoding = self.processor.tokenizer(text, truncation=True, max_length=limit).encodings[0]
            words, word_ids = words_of_encoding(encoding, text)
            pieces[index] = list(encoding.ids)
            edited_anchors[index] = anchor_rows_of_words(words, word_ids, rows[index]["tags"], rows[index]["scores"],
                                                         self.processor.lexicon)
        lengths = [len(ids) for ids in pieces]
        input_ids = np.full((batch_size, max(lengths)), self.processor.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for index, ids in enumerate(pieces):
            input_ids[index, :len(ids)] = ids
            attention_mask[index, :len(ids)] = 1
        anchors = []
        for index, source in enumerate(caption_rows):
            if index in edited_anchors:
                flat = edited_anchors[index]
            elif source == index:
                flat = rows[index]["anchor_rows"]
            else:
                flat = anchor_rows_of_words(rows[source]["words"], rows[source]["word_ids"], rows[index]["tags"],
                                            rows[index]["scores"], self.processor.lexicon)
            anchors.append(np.asarray(flat, dtype=np.int64).reshape(-1, 3))
        num_anchor_rows = max(len(table) for table in anchors)
        anchor_table = np.full((batch_size, num_anchor_rows, 3), -1, dtype=np.int64)
        for index, table in enumerate(anchors):
            anchor_table[index, :len(table)] = table
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.zeros_like(torch.from_numpy(input_ids)),
            "attention_mask": torch.from_numpy(attention_mask),
            "visual_feats": torch.from_numpy(visual_feats).to(getattr(torch, self.visual_feats_dtype)),
            "visual_pos": torch.from_numpy(visual_pos),
            "visual_attention_mask": torch.from_numpy(visual_attention_mask),
            "anchor_pairs": torch.from_numpy(np.ascontiguousarray(anchor_table[..., :2])),
            "anchor_concept_ids": torch.from_numpy(np.ascontiguousarray(anchor_table[..., 2])),
        }

    def _processor_identity(self) -> str:
        if self._identity is None:
            self._identity = processor_identity(self.processor)
        return self._identity

    def _draw(self, batch: dict, itm_labels: torch.Tensor, generator: torch.Generator) -> dict:
        """The per-batch random draws, vectorised: anchor actions, MLM masks, clean pairs."""
        rows_in_batch = batch["input_ids"].shape[0]
        batch["anchor_actions"] = self._sample_actions(batch["anchor_pairs"], batch["visual_attention_mask"].shape[1],
                                                       generator)
        original_ids = batch["input_ids"]
        batch["input_ids"], batch["labels"] = self._mask_pieces(batch, itm_labels, generator)
        clean = torch.rand(rows_in_batch, generator=generator) < self.itm_clean_rate
        batch["anchor_actions"][clean] = 0
        batch["input_ids"][clean] = original_ids[clean]
        batch["labels"][clean] = IGNORE_INDEX
        self._hide_masked_anchors(batch)
        batch["itm_labels"] = itm_labels
        # The model runs its vocabulary decoder only at these positions (CmalForPreTraining.forward).
        batch["mlm_positions"] = mlm_prediction_positions(batch["labels"])
        return batch

    def _hide_masked_anchors(self, batch: dict) -> None:
        """Hides what a *mask text* or *mask region* anchor must not see, at the encoders' input: the word's pieces
        become [MASK], the region's features zeros (its box stays). CMAP masks the slots after the uni-modal
        encoders; without this, the word would still be read off its neighbours' text states (and the region off the
        other regions'), and AMC would be solvable inside one modality."""
        pieces, regions = batch["anchor_pairs"][..., 0], batch["anchor_pairs"][..., 1]
        actions = batch["anchor_actions"]
        sample = torch.arange(pieces.shape[0]).unsqueeze(1).expand_as(pieces)
        hide_text = (actions == ACTION_MASK_TEXT) & (pieces >= 0)
        batch["input_ids"][sample[hide_text], pieces[hide_text]] = self.processor.tokenizer.mask_token_id
        hide_region = (actions == ACTION_MASK_REGION) & (regions >= 0)
        batch["visual_feats"][sample[hide_region], regions[hide_region]] = 0.0

    def _pair_captions(self, rows: list[Mapping],
                       generator: torch.Generator) -> tuple[list[int], torch.Tensor, dict[int, str]]:
        """The row whose caption goes with each row's image, the ITM labels (0 where that is another image's
        caption or an edited one) and the edited captions of the hard negatives, by row."""
        image_ids = [str(row["image_id"]) if row.get("image_id") is not None else f"\0row {index}"
                     for index, row in enumerate(rows)]
        negative = torch.rand(len(rows), generator=generator) < self.itm_negative_rate
        choice = torch.rand(len(rows), generator=generator)
        caption_rows = list(range(len(rows)))
        labels = [1] * len(rows)
        edited: dict[int, str] = {}
        if self.itm_hard_negative_rate > 0:  # no draw at all without it: the batches of a collator without the option
            hard = torch.rand(len(rows), generator=generator) < self.itm_hard_negative_rate
            edit_draws = torch.rand(len(rows), 2, generator=generator, dtype=torch.float64).tolist()
            wanted = torch.nonzero(negative & hard).flatten().tolist()
            if wanted:
                edited = self._hard_negatives(rows, image_ids, wanted, edit_draws)
        for index in torch.nonzero(negative).flatten().tolist():
            if index in edited:
                labels[index] = 0
                continue
            others = [other for other in range(len(rows)) if image_ids[other] != image_ids[index]]
            if others:
                caption_rows[index] = others[min(int(choice[index] * len(others)), len(others) - 1)]
                labels[index] = 0
        return caption_rows, torch.tensor(labels), edited

    def _hard_negatives(self, rows: list[Mapping], image_ids: list[str], wanted: list[int],
                        draws: list[list[float]]) -> dict[int, str]:
        """The edited captions (see the class docstring) of rows `wanted` that have an edit; `draws[row]`: two
        uniform numbers, one for the kind of edit, one for which."""
        tokenizer, lexicon = self.processor.tokenizer, self.processor.lexicon
        limit = self.max_length or tokenizer.model_max_length
        texts = [str(row["text"]) for row in rows]
        spans, present = [], []
        for text, encoding, row in zip(texts, tokenizer(texts, truncation=True, max_length=limit).encodings, rows):
            tags, scores = self._tags_and_scores(row)
            words, word_ids = words_of_encoding(encoding, text)
            bounds = _word_bounds(encoding.offsets, word_ids, len(words))
            spans.append([(bounds[match.word_start][0], bounds[match.word_end - 1][1], match.concept_id)
                          for match in find_anchors(words, tags, lexicon, scores)])
            concepts = {lexicon.tag_concept_id(tag) for tag in tags} - {None}
            present.append(concepts.union(*(lexicon.broader_concept_ids(concept) for concept in concepts)))
        edited = {}
        for index in wanted:
            text = texts[index]
            # Replacements: another image's anchored words, of a concept this image has no region of (nor of one it
            # is a kind of, nor of a kind of it), in the same number as the words they replace.
            words_of_others = dict.fromkeys(
                (texts[other][start:end], concept)
                for other in range(len(rows)) if image_ids[other] != image_ids[index]
                for start, end, concept in spans[other]
                if concept not in present[index] and present[index].isdisjoint(lexicon.broader_concept_ids(concept))
            )
            replacements = [(span, words) for span in spans[index] for words, _ in words_of_others
                            if _is_plural(words) == _is_plural(text[span[0]:span[1]])]
            swaps = [(first, second) for position, first in enumerate(spans[index])
                     for second in spans[index][position + 1:] if first[2] != second[2]]
            kind_draw, which_draw = draws[index]
            if replacements and (not swaps or kind_draw < 0.5):
                (start, end, _), words = replacements[min(int(which_draw * len(replacements)), len(replacements) - 1)]
                edited[index] = text[:start] + words + text[end:]
            elif swaps:
                first, second = swaps[min(int(which_draw * len(swaps)), len(swaps) - 1)]
                edited[index] = (text[:first[0]] + text[second[0]:second[1]] + text[first[1]:second[0]]
                                 + text[first[0]:first[1]] + text[second[1]:])
        return edited

    def _tags_and_scores(self, row: Mapping) -> tuple[list[str], list[float] | None]:
        """The row's region tags as names (ids through the processor's tag vocabulary) and scores."""
        tags = row.get("tags")
        if tags is None:
            return [], None
        vocabulary = self.processor.tag_vocabulary
        names = [vocabulary[int(tag)] if vocabulary is not None and not isinstance(tag, str) else str(tag)
                 for tag in tags]
        scores = row.get("scores")
        return names, None if scores is None else [float(score) for score in scores]

    def _sample_actions(self, anchor_pairs: torch.Tensor, num_regions: int,
                        generator: torch.Generator) -> torch.Tensor:
        """One action per anchor, i.e. per (sample, region): all pieces of an anchor share its region."""
        draws = torch.rand(anchor_pairs.shape[0], num_regions, generator=generator, dtype=torch.float64)
        region_actions = torch.bucketize(draws, self._action_bounds, right=True) + 1
        region_actions[region_actions > len(self._action_bounds)] = 0
        regions = anchor_pairs[..., 1]
        actions = torch.gather(region_actions, 1, regions.clamp(min=0))
        return torch.where(regions >= 0, actions, torch.zeros_like(actions))

    def _mask_pieces(self, batch: dict, itm_labels: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch["input_ids"]
        candidates = (batch["attention_mask"] == 1) & ~torch.isin(input_ids, self._special_ids)
        pieces = batch["anchor_pairs"][..., 0]
        batch_index = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(pieces)
        valid = pieces >= 0
        candidates[batch_index[valid], pieces[valid]] = False
        chosen = candidates & (torch.rand(input_ids.shape, generator=generator) < self.mlm_probability)
        # Negatives are masked like positives but predict nothing: their caption belongs to another image.
        labels = torch.where(chosen & (itm_labels == 1).unsqueeze(1), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        split = torch.rand(input_ids.shape, generator=generator)
        random_pieces = torch.randint(len(self.processor.tokenizer), input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (split < MASK_TOKEN_SHARE)] = self.processor.tokenizer.mask_token_id
        replaced = chosen & (split >= MASK_TOKEN_SHARE) & (split < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
        masked[replaced] = random_pieces[replaced]
        return masked, labels


def _word_bounds(offsets, word_ids: list[int], num_words: int) -> list[tuple[int, int]]:
    """`(start, end)` character offsets of each word of `words_of_encoding` in its text."""
    bounds = [[None, None] for _ in range(num_words)]
    for position, word in enumerate(word_ids):
        if word >= 0:
            if bounds[word][0] is None:
                bounds[word][0] = offsets[position][0]
            bounds[word][1] = offsets[position][1]
    return [tuple(bound) for bound in bounds]


def _is_plural(words: str) -> bool:
    return normalize_phrase(words) != " ".join(split_words(words))


def mlm_prediction_positions(labels: torch.Tensor, multiple_of: int = 8) -> torch.Tensor:
    """The `mlm_positions` of `labels` `[B, N]` (-100 = not predicted): every labelled position of each row, in
    order, padded with -1 to the batch's largest count rounded up to `multiple_of` (few distinct shapes, so a
    compiled model recompiles rarely). Data preparation: the collator calls it; the model reads the result."""
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
    labelled = labels != -100
    counts = labelled.sum(1)
    width = int(counts.max()) if labels.shape[0] > 0 and labels.shape[1] > 0 else 0
    width = min(labels.shape[1], -(-max(width, 1) // multiple_of) * multiple_of)
    # Labelled positions first, in their order (a stable sort of "not labelled"), then -1.
    order = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :width]
    keep = torch.arange(width, device=labels.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(keep, order, torch.full_like(order, -1))


__all__ = ["IGNORE_INDEX", "CmalPretrainingCollator", "anchor_rows_of_words", "mlm_prediction_positions",
           "processor_identity"]
