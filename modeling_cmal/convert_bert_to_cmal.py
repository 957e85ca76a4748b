"""Initialising CMAL from a BERT checkpoint: BERT's embeddings, its first `num_text_layers` layers (the text encoder),
the next `num_unified_layers` (the unified encoder) and its pooler map onto CMAL's names; the region encoder, the
hyperspheres, CMAP and the heads keep their initialisation (docs/model.md, "From a BERT checkpoint")."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file

from .configuration_cmal import CmalConfig


def bert_to_cmal_key_mapping(config: CmalConfig, num_bert_layers: int, prefix: str = "cmal.") -> dict[str, str]:
    """Explicit mapping from BERT parameter-name prefixes to CMAL ones: embeddings → text embeddings, BERT layers
    `0 .. num_text_layers-1` → text encoder, the next `num_unified_layers` → unified encoder, pooler → pooler.

    Raises `ValueError` when the BERT checkpoint has fewer layers than the two encoders need.
    """
    needed = config.num_text_layers + config.num_unified_layers
    if num_bert_layers < needed:
        raise ValueError(
            f"The BERT checkpoint has {num_bert_layers} layers but num_text_layers + num_unified_layers = {needed}"
        )
    mapping = {"embeddings.": f"{prefix}text_embeddings.", "pooler.": f"{prefix}pooler."}
    for layer in range(config.num_text_layers):
        mapping[f"encoder.layer.{layer}."] = f"{prefix}text_encoder.layer.{layer}."
    for layer in range(config.num_unified_layers):
        mapping[f"encoder.layer.{config.num_text_layers + layer}."] = f"{prefix}unified_encoder.layer.{layer}."
    return mapping


def convert_bert_state_dict(
    bert_state_dict: Mapping[str, torch.Tensor], config: CmalConfig, prefix: str = "cmal."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Renames a BERT state dict (keys with or without the `bert.` prefix) to CMAL names.

    Returns (converted state dict, BERT keys that have no CMAL counterpart, e.g. the MLM head or unmapped layers).
    """
    state = {key.removeprefix("bert."): value for key, value in bert_state_dict.items()}
    layer_ids = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")}
    mapping = bert_to_cmal_key_mapping(config, max(layer_ids, default=-1) + 1, prefix)
    converted, skipped = {}, []
    for key, value in state.items():
        source = next((src for src in mapping if key.startswith(src)), None)
        if source is None or key.endswith("position_ids"):
            skipped.append(key)
            continue
        converted[mapping[source] + key[len(source):]] = value
    return converted, skipped


def load_bert_weights(model: torch.nn.Module, bert_path) -> dict[str, list[str]]:
    """Initialises `model`'s text and unified encoders (and embeddings, pooler) from a BERT checkpoint folder or
    `.safetensors` file, in place. Returns `{"loaded": [...], "skipped_bert_keys": [...], "not_initialised": [...]}`.

    Shapes must agree (same `hidden_size`, `intermediate_size`, `vocab_size`); otherwise `ValueError`.
    """
    path = os.fspath(bert_path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"bert_path must be a folder with model.safetensors or a .safetensors file, got {bert_path!r}")
    prefix = "cmal." if hasattr(model, "cmal") else ""
    converted, skipped = convert_bert_state_dict(load_file(path), model.config, prefix)
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise ValueError(f"BERT weight maps to {key!r}, which {type(model).__name__} does not have")
        if own[key].shape != value.shape:
            raise ValueError(
                f"BERT weight for {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                "(hidden_size, intermediate_size and vocab_size must match the checkpoint)"
            )
    model.load_state_dict(converted, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return {
        "loaded": sorted(converted),
        "skipped_bert_keys": sorted(skipped),
        "not_initialised": sorted(set(own) - set(converted)),
    }


__all__ = ["bert_to_cmal_key_mapping", "convert_bert_state_dict", "load_bert_weights"]
