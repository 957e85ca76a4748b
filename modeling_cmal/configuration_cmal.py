"""CMAL model configuration."""

# No `from __future__ import annotations` here: `@strict` reads the fields' annotations as types, and as strings it
# would skip every field's type check without a word.

import json
import math
import os

# huggingface_hub comes with transformers, which decorates its own configs with this same `strict`.
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import CONFIG_NAME

ANCHOR_ACTIONS = ("keep", "fill_text", "fill_region", "mask_both", "mask_text", "mask_region")

# What the VQA, SNLI-VE and NLVR2 heads read besides the pooled [CLS] state (`CmalTaskPooler`).
TASK_POOLINGS = ("text_and_anchored_words", "anchored_words", "cls_attention")

# The config field holding the pre-training rate of each anchor action but keep, in ANCHOR_ACTIONS order.
ANCHOR_RATE_FIELDS = tuple(f"anchor_{action}_rate" for action in ANCHOR_ACTIONS[1:])

# Named sizes used by the training scripts (`--model_config tiny|small|base`).
CMAL_SIZES = {
    "tiny": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_text_layers=1, num_visual_layers=1,
                 num_unified_layers=2),
    "small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_text_layers=2,
                  num_visual_layers=2, num_unified_layers=2),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_text_layers=6,
                 num_visual_layers=3, num_unified_layers=6),
}


@strict
class CmalConfig(PreTrainedConfig):
    r"""
    Configuration of a CMAL model (Cross-Modal Associative Learning, ACM MM 2022).

    CMAL encodes word pieces and detected image regions in two uni-modal encoders (UMSE) whose outputs live on
    two unit hyperspheres, swaps content between the modalities at *anchor* pairs (CMAP), fuses the hybrid
    sequence ``[CLS] text [SEP] regions`` in a unified encoder (USE) and learns the association with an anchor
    concept classifier (AMC) beside MLM and ITM.

    Args:
        vocab_size (`int`, defaults to 30522): word-piece vocabulary size (bert-base-uncased).
        hidden_size (`int`, defaults to 768): width of every encoder.
        num_attention_heads (`int`, defaults to 12): heads per attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): feed-forward width.
        num_text_layers (`int`, defaults to 6): layers of the text encoder (0 disables it: single stream).
        num_visual_layers (`int`, defaults to 3): layers of the region encoder (0 disables it).
        num_unified_layers (`int`, defaults to 6): layers of the unified encoder (at least 1).
        hidden_act (`str`, defaults to `"gelu"`), hidden_dropout_prob, attention_probs_dropout_prob,
        max_position_embeddings, type_vocab_size, initializer_range, layer_norm_eps, pad_token_id: as in BERT.
        visual_feat_dim (`int`, defaults to 2048): dimension `Dv` of the region features.
        num_anchor_concepts (`int`, defaults to 1363): size of the concept lexicon, the AMC label space. It must
            equal `len(processor.lexicon)`; the processor's default lexicon (COCO-80 + Visual Genome 1600) has
            this size.
        anchor_pairing_temperature (`float`, defaults to 0.07): initial temperature of AMC's mapping term (cosine
            similarity of an anchor word with every region, on the two hyperspheres); learned from there.
        anchor_pairing_min_temperature (`float`, defaults to 0.01): the temperature is clamped from below at this.
        itc_temperature (`float`, defaults to 0.07): initial temperature of the contrastive objective (ITC), as in
            CLIP; learned from there.
        itc_min_temperature (`float`, defaults to 0.01): ITC's temperature is clamped from below at this (CLIP's
            clamp of the inverse temperature at 100).
        anchor_fill_text_rate, anchor_fill_region_rate, anchor_mask_both_rate, anchor_mask_text_rate,
        anchor_mask_region_rate (`float`): probabilities with which the pre-training collator gives an anchor the
            action *fill text*, *fill region*, *mask both*, *mask text* or *mask region*; the rest of the anchors
            are kept. Defaults 0.4 / 0.1 / 0.0 / 0.2 / 0.2 (keep 0.1). AMC's concept targets are the mask-text and
            mask-region anchors; fill text is trained this often because it is the fine-tuning policy.
        default_anchor_action (`str`, defaults to `"fill_text"`): the one anchor policy of fine-tuning and inference:
            the action applied to every anchor when `forward` gets `anchor_pairs` but no `anchor_actions` (the task
            collators and the pipelines leave them out). One of `"keep"`, `"fill_text"`, `"fill_region"`,
            `"mask_both"`, `"mask_text"`, `"mask_region"`. Measured on the synthetic tasks, `fill_text` (each
            anchored word carries its region's state) against `keep`: VQA 0.38 → 0.53, NLVR2 0.60 → 0.67, SNLI-VE
            0.68 → 0.78, RefCOCO+ 0.57 → 0.78 from scratch.
        amc_loss_weight, mlm_loss_weight, itm_loss_weight, itc_loss_weight, mrfr_loss_weight (`float`): weights of
            the pre-training objectives in the total loss; 0 skips an objective. ITC (contrastive) is off by
            default, as in the paper; beside AMC it keeps what AMC's class targets compress away (a region's colour),
            and the repository's main job turns it on (docs/research.md). MRFR (masked region feature regression,
            as in UNITER and LXMERT) regresses every real region's input features, normalised per region, from the
            unified encoder's region slot: from context where the region was masked, and through the region
            encoder elsewhere, so that what AMC does not name (a region's colour, say) survives pre-training; off
            by default (docs/research.md measures it).
        classifier_dropout (`float`, *optional*): dropout of the task heads (defaults to `hidden_dropout_prob`).
        task_pooling (`str`, defaults to `"text_and_anchored_words"`): what the VQA, SNLI-VE and NLVR2 heads read
            beside the pooled `[CLS]` state (`CmalTaskPooler`):
            - `"text_and_anchored_words"`: the mean of the text slots, then the mean of the anchored word slots
              (which carry their regions' states under the fill-text policy). A question that names an object by
              an attribute only ("what shape is the red object?") has no anchor: after pre-training, the colour
              word's own slot holds the region it was routed to, and the text mean carries it to the head.
            - `"anchored_words"`: the mean of the anchored word slots only (folders saved on 2026-12-07).
            - `"cls_attention"`: a summary of all slots weighted by their match with `[CLS]` (folders saved before
              2026-12-07, which load with it).
            Measured on the synthetic VQA (main job's world, 750 fine-tuning steps, seed 0), pre-trained / scratch:
            "what shape is the ⟨colour⟩ object" 0.586 / 0.117 with `text_and_anchored_words`, 0.123 / 0.123 with
            `anchored_words`; "what color is the ⟨shape⟩" 1.000 / 1.000 with both. In 280 steps from scratch
            `cls_attention` answers every colour question with one colour (0.12; `anchored_words` 0.91).
        classifier_activation (`str`, defaults to `"gelu"`): activation of the task heads' hidden layer (a name of
            transformers' `ACT2FN`), as in the answer heads of LXMERT and UNITER.

    Example:

    ```python
    >>> from modeling_cmal import CmalConfig, CmalModel
    >>> config = CmalConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_text_layers=1,
    ...                     num_visual_layers=1, num_unified_layers=2, visual_feat_dim=16)
    >>> model = CmalModel(config)
    ```
    """

    model_type = "cmal"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_text_layers: int = 6
    num_visual_layers: int = 3
    num_unified_layers: int = 6
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float | int = 0.02
    layer_norm_eps: float | int = 1e-12
    pad_token_id: int | None = 0
    visual_feat_dim: int = 2048
    num_anchor_concepts: int = 1363
    anchor_fill_text_rate: float | int = 0.4
    anchor_fill_region_rate: float | int = 0.1
    anchor_mask_both_rate: float | int = 0.0
    anchor_mask_text_rate: float | int = 0.2
    anchor_mask_region_rate: float | int = 0.2
    default_anchor_action: str = "fill_text"
    anchor_pairing_temperature: float | int = 0.07
    anchor_pairing_min_temperature: float | int = 0.01
    itc_temperature: float | int = 0.07
    itc_min_temperature: float | int = 0.01
    amc_loss_weight: float | int = 1.0
    mlm_loss_weight: float | int = 1.0
    itm_loss_weight: float | int = 1.0
    itc_loss_weight: float | int = 0.0
    mrfr_loss_weight: float | int = 0.0
    classifier_dropout: float | int | None = None
    classifier_activation: str = "gelu"
    task_pooling: str = "text_and_anchored_words"
    tie_word_embeddings: bool = True

    @property
    def num_hidden_layers(self) -> int:
        """Total depth: text + visual + unified layers (read-only)."""
        return self.num_text_layers + self.num_visual_layers + self.num_unified_layers

    @property
    def anchor_keep_rate(self) -> float:
        return 1.0 - sum(getattr(self, name) for name in ANCHOR_RATE_FIELDS)

    # Validation as transformers' configs do it: `@strict` checks every field's type on assignment (an int field
    # refuses a str, a float or a bool, naming the field and the value); the `validate_*` methods below check
    # ranges and relations once the config is built (`strict` runs them and raises
    # `huggingface_hub.errors.StrictDataclassClassValidationError` carrying their message).

    def validate_sizes(self):
        """Sizes are positive (layer counts of the uni-modal encoders may be 0) and the heads divide the width."""
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "num_unified_layers",
                     "max_position_embeddings", "type_vocab_size", "visual_feat_dim", "num_anchor_concepts"):
            if getattr(self, name) < 1:
                raise ValueError(f"CmalConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("num_text_layers", "num_visual_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"CmalConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"CmalConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"CmalConfig.num_attention_heads ({self.num_attention_heads})"
            )

    def validate_probabilities(self):
        """Dropouts and anchor-action rates are probabilities; the rates leave a keep share >= 0."""
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                     *ANCHOR_RATE_FIELDS):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"CmalConfig.{name} must be a float in [0, 1], got {value!r}")
        if self.anchor_keep_rate < -1e-9:
            rates = " + ".join(f"{name}={getattr(self, name)}" for name in ANCHOR_RATE_FIELDS)
            raise ValueError(f"CmalConfig anchor rates must sum to at most 1, got {rates}")

    def validate_objectives(self):
        """Loss weights are finite and >= 0; scales and temperatures finite and > 0, each floor below its start."""
        for name in ("amc_loss_weight", "mlm_loss_weight", "itm_loss_weight", "itc_loss_weight", "mrfr_loss_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CmalConfig.{name} must be a finite float >= 0, got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"CmalConfig.{name} must be a finite float > 0, got {value!r}")
        for prefix in ("anchor_pairing", "itc"):
            for name in (f"{prefix}_temperature", f"{prefix}_min_temperature"):
                value = getattr(self, name)
                if not 0 < value < float("inf"):
                    raise ValueError(f"CmalConfig.{name} must be a positive finite float, got {value!r}")
            if getattr(self, f"{prefix}_min_temperature") > getattr(self, f"{prefix}_temperature"):
                raise ValueError(
                    f"CmalConfig.{prefix}_min_temperature ({getattr(self, f'{prefix}_min_temperature')}) must not "
                    f"exceed {prefix}_temperature ({getattr(self, f'{prefix}_temperature')})"
                )

    def validate_choices(self):
        """Named choices: the anchor policy, the task pooling and the activations (names of transformers'
        `ACT2FN`)."""
        from transformers.activations import ACT2FN

        if self.default_anchor_action not in ANCHOR_ACTIONS:
            raise ValueError(
                f"CmalConfig.default_anchor_action must be one of {ANCHOR_ACTIONS}, got {self.default_anchor_action!r}"
            )
        if self.task_pooling not in TASK_POOLINGS:
            raise ValueError(f"CmalConfig.task_pooling must be one of {TASK_POOLINGS}, got {self.task_pooling!r}")
        for name in ("hidden_act", "classifier_activation"):
            if getattr(self, name) not in ACT2FN:
                raise ValueError(f"CmalConfig.{name} must be the name of an activation of transformers' ACT2FN, one "
                                 f"of {sorted(ACT2FN)}, got {getattr(self, name)!r}")

    def validate_pad_token_id(self):
        """`pad_token_id` is None or a word-piece id (transformers only warns; an id past the vocabulary would
        fail inside the embedding)."""
        pad = self.pad_token_id
        if pad is not None and not 0 <= pad < self.vocab_size:
            raise ValueError(f"CmalConfig.pad_token_id must be None or an int in [0, vocab_size = {self.vocab_size}), "
                             f"got {pad!r}")

    def validate_removed_fields(self):
        """Fields that are gone and would silently mean something else if kept."""
        # The switch is gone (measured inert: the encoders end in LayerNorm, so their states already lie on a
        # sphere of radius ~sqrt(H), and switching the normalisation off changed the losses in the fourth digit).
        if getattr(self, "use_hypersphere_normalization", True) is not True:
            raise ValueError(
                "CmalConfig.use_hypersphere_normalization=False is no longer supported: the uni-modal outputs are "
                "always L2-normalised (AMC's mapping term is a cosine similarity between the two hyperspheres); "
                "remove the field from the config"
            )

    def __setattr__(self, key, value):
        # Checked on assignment: transformers' own __post_init__ reads `id2label.items()` before the validators run.
        if key in ("id2label", "label2id") and value is not None:
            self._check_label_map(key, value)
        super().__setattr__(key, value)

    @staticmethod
    def _check_label_map(name: str, value) -> None:
        from collections.abc import Mapping

        if not isinstance(value, Mapping):
            expected = "label id -> name" if name == "id2label" else "name -> label id"
            raise ValueError(f"CmalConfig.{name} must be a dict ({expected}) or None, got {type(value).__name__} "
                             f"{value!r}")
        ids = value.keys() if name == "id2label" else value.values()
        for label_id in ids:
            if isinstance(label_id, bool) or not isinstance(label_id, (int, str)) or (
                    isinstance(label_id, str) and not label_id.strip().lstrip("-").isdigit()):
                raise ValueError(f"CmalConfig.{name} label ids must be integers (or strings of integers, as JSON "
                                 f"keys are), got {label_id!r} in {value!r}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.get_config_dict`; a local `config.json` that holds anything but a JSON object is a
        `ValueError` naming the file (transformers fails on it with a `TypeError` from inside)."""
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        source = os.path.join(folder, CONFIG_NAME) if os.path.isdir(folder) else folder.rstrip(os.sep)
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as file:
                try:
                    content = json.load(file)
                except ValueError:
                    content = {}  # not JSON at all: transformers' own error names the file
            if not isinstance(content, dict):
                kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
                         type(None): "null"}
                raise ValueError(f"{source} must hold a JSON object of CmalConfig fields ({{\"model_type\": "
                                 f"\"cmal\", ...}}), got a JSON {kinds.get(type(content), type(content).__name__)}: "
                                 f"{json.dumps(content)[:80]}")
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`; a saved config without `task_pooling` (written before 2026-12-07) gets the
        pooling its task heads were trained with, `"cls_attention"`."""
        if isinstance(config_dict, dict) and "task_pooling" not in config_dict and "task_pooling" not in kwargs:
            config_dict = {**config_dict, "task_pooling": "cls_attention"}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_size(cls, size: str, **kwargs) -> "CmalConfig":
        """A config of a named size (`"tiny"`, `"small"` or `"base"`); keyword arguments override its fields."""
        if size not in CMAL_SIZES:
            raise ValueError(f"size must be one of {sorted(CMAL_SIZES)}, got {size!r}")
        return cls(**{**CMAL_SIZES[size], **kwargs})


__all__ = ["ANCHOR_ACTIONS", "ANCHOR_RATE_FIELDS", "CMAL_SIZES", "TASK_POOLINGS", "CmalConfig"]
