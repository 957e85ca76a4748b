"""Input validation of the CMAL models: a `ValueError` that names the argument, the value and what was expected,
instead of a shape error deep in the network or a device-side assert.

Types and shapes are checked always (they are static under `torch.compile`); values (id ranges, finiteness, anchor
indices, label ranges) in eager mode only, all of one call in one device→host transfer (`raise_for_bad_values`).
The models call one function of this file at the top of their `forward` (inputs) and one where they compute a loss
(labels); the processor, the collators and the pipelines check the values where the data is made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .configuration_cmal import ANCHOR_ACTIONS, CmalConfig

# Normalised box coordinates may stray this far outside [0, 1] (rounding of pixel boxes) before they are an error.
BOX_TOLERANCE = 1e-3

def check_shape(name: str, tensor: torch.Tensor | None, expected: tuple, description: str) -> None:
    """`expected` holds ints or None (any size)."""
    if tensor is None:
        return
    if tensor.dim() != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        raise ValueError(f"{name} must have shape {description}, got {tuple(tensor.shape)}")


def check_tensor(name: str, value, kind: str) -> None:
    """`value` is None or a `torch.Tensor` of `kind`: "integer" (ids, indices, labels), "float" (features, boxes,
    embeddings) or "mask" (integers, bools or floats)."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor, got {type(value).__module__}.{type(value).__name__}: call the processor "
            "with return_tensors='pt', or convert with torch.as_tensor"
        )
    if value.is_complex() or (kind == "integer" and (value.is_floating_point() or value.dtype == torch.bool)):
        expected = "integers (torch.long)" if kind == "integer" else "real numbers"
        raise ValueError(f"{name} must hold {expected}, got a tensor of dtype {value.dtype}")
    if kind == "float" and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(bad.nonzero()[0].tolist())


def raise_for_bad_values(checks: list[tuple[torch.Tensor, Callable[[torch.Tensor], str]]]) -> None:
    """Raises `ValueError` with the message of the first check whose boolean tensor has a True element.

    `checks` are (bad-element mask, message built from that mask). All checks cost one device→host transfer;
    they run in eager mode only: a compiled forward is a pure tensor program (the processor, the collators and the
    pipelines check the values where the data is made)."""
    if not checks or torch.compiler.is_compiling():
        return
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()
    for (bad, message), flag in zip(checks, flags):
        if flag:
            raise ValueError(message(bad))


def out_of_range(name: str, tensor: torch.Tensor, low: int, high: int, expected: str, ignore: int | None = None):
    """A check of `raise_for_bad_values`: `tensor` values outside `[low, high)` (and not `ignore`)."""
    bad = (tensor < low) | (tensor >= high)
    if ignore is not None:
        bad = bad & (tensor != ignore)

    def message(bad: torch.Tensor) -> str:
        index = first_bad(bad)
        return f"{name}[{', '.join(map(str, index))}] = {tensor[index].item()}; expected {expected}"

    return bad, message


def not_finite(name: str, tensor: torch.Tensor, what: str):
    """A check of `raise_for_bad_values`: NaN or infinite values of a float tensor."""
    bad = ~torch.isfinite(tensor)

    def message(bad: torch.Tensor) -> str:
        index = first_bad(bad)
        return (f"{name}[{', '.join(map(str, index))}] = {tensor[index].item()}: {what} must be finite "
                "(a NaN or inf here turns every output into NaN)")

    return bad, message


def not_normalised(name: str, boxes: torch.Tensor):
    """A check of `raise_for_bad_values`: box coordinates that are not finite or lie outside `[0, 1]` (beyond
    rounding), which the box embedding would turn into huge or non-finite states."""
    bad = ~torch.isfinite(boxes) | (boxes < -BOX_TOLERANCE) | (boxes > 1 + BOX_TOLERANCE)

    def message(bad: torch.Tensor) -> str:
        index = first_bad(bad)
        return (f"{name}[{', '.join(map(str, index))}] = {boxes[index].item()}; expected box coordinates x1, y1, x2, "
                "y2 normalised to [0, 1] (CmalProcessor normalises pixel boxes given with image_size)")

    return bad, message


def text_shape(input_ids, inputs_embeds) -> tuple[int, int]:
    """`(batch_size, text_length)` of the one text input given; a `ValueError` naming it when its shape is not
    `[B, N]` (ids) or `[B, N, H]` (embeddings)."""
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must have shape [batch_size, text_length], got {shape}")
        return tuple(input_ids.shape)
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise ValueError(f"inputs_embeds must have shape [batch_size, text_length, hidden_size], got {shape}")
    return tuple(inputs_embeds.shape[:2])


def validate_cmal_inputs(
    config: CmalConfig,
    input_ids,
    inputs_embeds,
    attention_mask,
    token_type_ids,
    visual_feats,
    visual_pos,
    visual_attention_mask,
    anchor_pairs,
    anchor_concept_ids,
    anchor_actions,
) -> None:
    """Raises `ValueError` naming the argument, the value and what was expected.

    Types and shapes are checked always (they are static under `torch.compile`); values (id ranges, finiteness,
    anchor indices) in eager mode only, in one device→host transfer (`raise_for_bad_values`)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Give exactly one of input_ids [B, N] or inputs_embeds [B, N, H]")
    if visual_feats is None or visual_pos is None:
        raise ValueError("CMAL needs visual_feats [B, M, visual_feat_dim] and visual_pos [B, M, 4]")
    for name, value, kind in (
        ("input_ids", input_ids, "integer"), ("inputs_embeds", inputs_embeds, "float"),
        ("attention_mask", attention_mask, "mask"), ("token_type_ids", token_type_ids, "integer"),
        ("visual_feats", visual_feats, "float"), ("visual_pos", visual_pos, "float"),
        ("visual_attention_mask", visual_attention_mask, "mask"), ("anchor_pairs", anchor_pairs, "integer"),
        ("anchor_concept_ids", anchor_concept_ids, "integer"), ("anchor_actions", anchor_actions, "integer"),
    ):
        check_tensor(name, value, kind)
    batch_size, text_length = text_shape(input_ids, inputs_embeds)
    if inputs_embeds is not None and inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must have shape [batch_size, text_length, {config.hidden_size}] "
                         f"(config.hidden_size), got {tuple(inputs_embeds.shape)}")
    if batch_size == 0:
        raise ValueError(f"input_ids has batch size 0 (shape {tuple((input_ids if input_ids is not None else inputs_embeds).shape)}): "
                         "give at least one sample")
    if text_length == 0:
        raise ValueError("input_ids has 0 pieces: every sample needs at least [CLS], whose state the heads pool")
    if text_length > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {text_length} pieces but config.max_position_embeddings is "
            f"{config.max_position_embeddings}"
        )
    if visual_feats.dim() != 3 or visual_feats.shape[-1] != config.visual_feat_dim:
        raise ValueError(
            f"visual_feats must have shape [batch_size, num_regions, {config.visual_feat_dim}] "
            f"(config.visual_feat_dim), got {tuple(visual_feats.shape)}"
        )
    if visual_feats.shape[0] != batch_size:
        raise ValueError(
            f"visual_feats has batch size {visual_feats.shape[0]} but input_ids has batch size {batch_size}"
        )
    num_regions = visual_feats.shape[1]
    check_shape("attention_mask", attention_mask, (batch_size, text_length), f"[{batch_size}, {text_length}]")
    check_shape("token_type_ids", token_type_ids, (batch_size, text_length), f"[{batch_size}, {text_length}]")
    check_shape("visual_pos", visual_pos, (batch_size, num_regions, 4), f"[{batch_size}, {num_regions}, 4]")
    check_shape(
        "visual_attention_mask", visual_attention_mask, (batch_size, num_regions), f"[{batch_size}, {num_regions}]"
    )
    if anchor_pairs is None and (anchor_actions is not None or anchor_concept_ids is not None):
        raise ValueError("anchor_actions and anchor_concept_ids need anchor_pairs [B, K, 2]")
    if anchor_pairs is not None:
        check_shape("anchor_pairs", anchor_pairs, (batch_size, None, 2), f"[{batch_size}, K, 2]")
        num_anchors = anchor_pairs.shape[1]
        check_shape("anchor_actions", anchor_actions, (batch_size, num_anchors), f"[{batch_size}, {num_anchors}]")
        check_shape(
            "anchor_concept_ids", anchor_concept_ids, (batch_size, num_anchors), f"[{batch_size}, {num_anchors}]"
        )

    checks = [not_finite("visual_feats", visual_feats, "region features"), not_normalised("visual_pos", visual_pos)]
    if input_ids is not None:
        checks.append(out_of_range("input_ids", input_ids, 0, config.vocab_size,
                                    f"a word-piece id in [0, {config.vocab_size}) (config.vocab_size)"))
    if inputs_embeds is not None:
        checks.append(not_finite("inputs_embeds", inputs_embeds, "input embeddings"))
    if token_type_ids is not None:
        checks.append(out_of_range("token_type_ids", token_type_ids, 0, config.type_vocab_size,
                                    f"a token type in [0, {config.type_vocab_size}) (config.type_vocab_size)"))
    if anchor_pairs is not None:
        pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
        padding = (pieces == -1) & (regions == -1)
        bad_pairs = ~padding & ((pieces < 0) | (pieces >= text_length) | (regions < 0) | (regions >= num_regions))
        checks.append((bad_pairs, lambda bad: (
            f"anchor_pairs[{first_bad(bad)[0]}, {first_bad(bad)[1]}] = {anchor_pairs[first_bad(bad)].tolist()} is "
            f"out of range: expected a text piece position in [0, {text_length}) and a region index in "
            f"[0, {num_regions}), or [-1, -1] for padding")))
        if anchor_actions is not None:
            checks.append(out_of_range(
                "anchor_actions", anchor_actions, 0, len(ANCHOR_ACTIONS),
                "0 (keep), 1 (fill text), 2 (fill region), 3 (mask both), 4 (mask text) or 5 (mask region)"))
        if anchor_concept_ids is not None:
            bad_concepts, concept_message = out_of_range(
                "anchor_concept_ids", anchor_concept_ids, 0, config.num_anchor_concepts,
                f"a concept id in [0, {config.num_anchor_concepts}) (config.num_anchor_concepts must equal the "
                "lexicon size)")
            checks.append((bad_concepts & ~padding, concept_message))
    raise_for_bad_values(checks)



def validate_pretraining_targets(config: CmalConfig, labels, itm_labels, mlm_positions,
                                 input_shape: tuple[int, int]) -> None:
    """The pre-training targets: `labels` `[B, N]` (word-piece ids or -100), `itm_labels` `[B]` (0 / 1),
    `mlm_positions` `[B, P]` (piece positions or -1); `input_shape` is `(B, N)`."""
    batch_size, text_length = input_shape
    for name, value in (("labels", labels), ("itm_labels", itm_labels), ("mlm_positions", mlm_positions)):
        check_tensor(name, value, "integer")
    check_shape("labels", labels, (batch_size, text_length), f"[{batch_size}, {text_length}] (as input_ids)")
    check_shape("itm_labels", itm_labels, (batch_size,), f"[{batch_size}]")
    check_shape("mlm_positions", mlm_positions, (batch_size, None), f"[{batch_size}, P]")
    checks = []
    if labels is not None:
        checks.append(out_of_range("labels", labels, 0, config.vocab_size,
                                   f"a word-piece id in [0, {config.vocab_size}) or -100 (ignored)", -100))
    if itm_labels is not None:
        checks.append(out_of_range("itm_labels", itm_labels, 0, 2, "1 (the caption matches) or 0 (it does not)"))
    if mlm_positions is not None:
        checks.append(out_of_range("mlm_positions", mlm_positions, 0, text_length,
                                   f"a piece position in [0, {text_length}) or -1 (padding)", -1))
    raise_for_bad_values(checks)


def validate_soft_scores(labels, logits: torch.Tensor) -> torch.Tensor:
    """VQA `labels`: soft scores in [0, 1] of `logits`' shape `[B, num_labels]`; returned as float32."""
    check_tensor("labels", labels, "mask")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must be soft scores of shape {tuple(logits.shape)} (batch, num_labels), "
                         f"got {tuple(labels.shape)}")
    labels = labels.float()
    raise_for_bad_values([not_finite("labels", labels, "VQA soft scores"),
                          out_of_range("labels", labels, 0, 1 + 1e-6, "a soft score in [0, 1]")])
    return labels


def validate_class_labels(problem_type: str, labels, logits: torch.Tensor) -> torch.Tensor:
    """`labels` of a sequence-classification head for `problem_type` (transformers' three): class ids `[B]`
    (-100 ignored), multi-label targets `[B, num_labels]` in [0, 1], or regression values `[B]` / `[B, num_labels]`.
    Returned as the loss takes them (float32 targets, `[B, 1]` for a one-label regression)."""
    check_tensor("labels", labels, "mask")
    batch_size, num_labels = logits.shape[0], logits.shape[-1]
    if problem_type == "single_label_classification":
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be class ids (torch.long) for problem_type 'single_label_classification', "
                             f"got dtype {labels.dtype}")
        check_shape("labels", labels, (batch_size,), f"[{batch_size}] (one class id per sample)")
        raise_for_bad_values([out_of_range("labels", labels, 0, num_labels,
                                           f"a class id in [0, {num_labels}) or -100 (ignored)", -100)])
        return labels
    labels = labels.to(torch.float32)
    if problem_type == "multi_label_classification":
        check_shape("labels", labels, (batch_size, num_labels), f"[{batch_size}, {num_labels}] (targets in [0, 1])")
        raise_for_bad_values([not_finite("labels", labels, "multi-label targets"),
                              out_of_range("labels", labels, 0, 1 + 1e-6, "a target in [0, 1]")])
        return labels
    if num_labels == 1 and labels.dim() == 1:
        labels = labels.unsqueeze(-1)
    check_shape("labels", labels, (batch_size, num_labels), f"[{batch_size}] or [{batch_size}, {num_labels}]")
    raise_for_bad_values([not_finite("labels", labels, "regression targets")])
    return labels


def validate_region_labels(labels, real_regions: torch.Tensor) -> None:
    """RefCOCO+ `labels` `[B]`: the index of a real region (`real_regions` `[B, M]` bool), or -100 (ignored)."""
    check_tensor("labels", labels, "integer")
    batch_size, num_regions = real_regions.shape
    check_shape("labels", labels, (batch_size,), f"[{batch_size}] (one region index per sample)")
    checks = [out_of_range("labels", labels, 0, num_regions,
                           f"a region index in [0, {num_regions}) or -100 (ignored)", -100)]
    if num_regions > 0:
        at_padding = (labels >= 0) & (labels < num_regions) & ~real_regions.gather(
            1, labels.clamp(0, num_regions - 1).unsqueeze(1)).squeeze(1)
        checks.append((at_padding, lambda bad: (
            f"labels[{first_bad(bad)[0]}] = {labels[first_bad(bad)].item()} points at a padding region "
            "(visual_attention_mask == 0): labels must point at real regions")))
    raise_for_bad_values(checks)


def validate_match_labels(labels, batch_size: int) -> None:
    """Image-text matching `labels` `[B]`: 1 match, 0 mismatch, -100 ignored."""
    check_tensor("labels", labels, "integer")
    check_shape("labels", labels, (batch_size,), f"[{batch_size}]")
    raise_for_bad_values([out_of_range("labels", labels, 0, 2, "1 (match), 0 (mismatch) or -100", -100)])


def validate_image_pair_inputs(visual_feats, visual_pos, visual_attention_mask, anchor_pairs, anchor_concept_ids,
                               anchor_actions) -> None:
    """NLVR2's visual inputs carry an image axis of size 2 after the batch axis: `visual_feats` `[B, 2, M, Dv]`,
    `visual_pos` `[B, 2, M, 4]`, `visual_attention_mask` `[B, 2, M]`, `anchor_pairs` `[B, 2, K, 2]`,
    `anchor_concept_ids` / `anchor_actions` `[B, 2, K]`. The rest is checked per image by the trunk."""
    check_tensor("visual_feats", visual_feats, "float")
    if visual_feats is None or visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
        shape = None if visual_feats is None else tuple(visual_feats.shape)
        raise ValueError(f"visual_feats must have shape [batch_size, 2, num_regions, visual_feat_dim], got {shape}")
    for name, value, dims in (("visual_pos", visual_pos, 4), ("visual_attention_mask", visual_attention_mask, 3),
                              ("anchor_pairs", anchor_pairs, 4), ("anchor_concept_ids", anchor_concept_ids, 3),
                              ("anchor_actions", anchor_actions, 3)):
        check_tensor(name, value, "mask")
        if value is not None and (value.dim() != dims or value.shape[1] != 2):
            raise ValueError(f"{name} must have an image axis of size 2 after the batch axis ({dims} dimensions, "
                             f"see CmalForVisualReasoning), got shape {tuple(value.shape)}")
