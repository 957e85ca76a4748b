"""Bad input to the models is a `ValueError` that names the argument, the value and what was expected (eager mode);
edge shapes that are valid (no regions, padding-only anchor rows) work; the classification heads take labels as
transformers' sequence-classification heads do (`problem_type`, -100); a broken weights file is refused naming it."""

import numpy as np
import pytest
import torch
from test_common import head_config, head_inputs
from test_model_core import B, DV, N, V, make_config, make_inputs

from modeling_cmal import (
    CmalForImageTextMatching,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalModel,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CmalModel(make_config()).eval()


def _with(**changes) -> dict:
    inputs = make_inputs()
    inputs.update(changes)
    return inputs


def _ids_with(row: int, column: int, value: int) -> torch.Tensor:
    ids = make_inputs()["input_ids"].clone()
    ids[row, column] = value
    return ids


@pytest.mark.parametrize("changes, message", [
    (dict(input_ids=_ids_with(1, 2, V)), rf"input_ids\[1, 2\] = {V}; expected a word-piece id in \[0, {V}\)"),
    (dict(input_ids=_ids_with(0, 0, -3)), r"input_ids\[0, 0\] = -3; expected a word-piece id"),
    (dict(input_ids=make_inputs()["input_ids"].float()), r"input_ids must hold integers \(torch.long\), got a tensor "
                                                         r"of dtype torch.float32"),
    (dict(input_ids=make_inputs()["input_ids"].numpy()), r"input_ids must be a torch.Tensor, got numpy.ndarray"),
    (dict(input_ids=make_inputs()["input_ids"].tolist()), r"input_ids must be a torch.Tensor, got builtins.list"),
    (dict(visual_feats=make_inputs()["visual_feats"].numpy()), r"visual_feats must be a torch.Tensor"),
    (dict(token_type_ids=torch.full((B, N), 2)), r"token_type_ids\[0, 0\] = 2; expected a token type in \[0, 2\)"),
    (dict(input_ids=torch.zeros(0, N, dtype=torch.long), attention_mask=None, token_type_ids=None,
          visual_feats=torch.zeros(0, 5, DV), visual_pos=torch.zeros(0, 5, 4), visual_attention_mask=None,
          anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None), r"batch size 0"),
    (dict(input_ids=torch.zeros(B, 0, dtype=torch.long), attention_mask=None, token_type_ids=None,
          anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None), r"input_ids has 0 pieces"),
    (dict(visual_feats=make_inputs()["visual_feats"].index_fill(1, torch.tensor([2]), float("nan"))),
     r"visual_feats\[0, 2, 0\] = nan: region features must be finite"),
    (dict(visual_pos=make_inputs()["visual_pos"].index_fill(2, torch.tensor([3]), float("inf"))),
     r"visual_pos\[0, 0, 3\] = inf; expected box coordinates x1, y1, x2, y2 normalised to \[0, 1\]"),
    # huge finite boxes used to be accepted and give non-finite outputs
    (dict(visual_pos=make_inputs()["visual_pos"].index_fill(1, torch.tensor([1]), 1e30)),
     r"visual_pos\[0, 1, 0\] = 1.0\d*e\+30; expected box coordinates x1, y1, x2, y2 normalised to \[0, 1\]"),
    (dict(visual_pos=make_inputs()["visual_pos"] * 640), r"visual_pos\[\d, \d, \d\] = .*normalised to \[0, 1\] "
                                                         r"\(CmalProcessor normalises pixel boxes"),
    (dict(input_ids=make_inputs()["input_ids"][0]), r"input_ids must have shape \[batch_size, text_length\], got "
                                                    rf"\({N},\)"),
    (dict(visual_feats=make_inputs()["visual_feats"].to(torch.int64)), r"visual_feats must be a floating-point"),
    (dict(anchor_actions=torch.full((B, 3), 6)), r"anchor_actions\[0, 0\] = 6; expected 0 \(keep\)"),
])
def test_bad_trunk_inputs_name_the_argument(model, changes, message):
    with pytest.raises(ValueError, match=message):
        model(**_with(**changes))


def test_inputs_embeds_of_the_wrong_width(model):
    inputs = make_inputs()
    ids = inputs.pop("input_ids")
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[batch_size, text_length, 32\]"):
        model(**inputs, inputs_embeds=torch.randn(*ids.shape, 31))


def test_images_without_regions_and_padding_only_anchor_rows_work(model):
    inputs = make_inputs()
    inputs.update(visual_feats=torch.zeros(B, 0, DV), visual_pos=torch.zeros(B, 0, 4),
                  visual_attention_mask=torch.zeros(B, 0, dtype=torch.long),
                  anchor_pairs=torch.full((B, 2, 2), -1), anchor_concept_ids=torch.full((B, 2), -1),
                  anchor_actions=torch.ones(B, 2, dtype=torch.long))
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.last_hidden_state.shape == (B, N, 32) and torch.isfinite(outputs.last_hidden_state).all()
    # Padding rows only (K > 0, all [-1, -1]) with regions present: CMAP changes nothing.
    inputs = make_inputs()
    inputs.update(anchor_pairs=torch.full((B, 2, 2), -1), anchor_concept_ids=torch.full((B, 2), -1),
                  anchor_actions=torch.ones(B, 2, dtype=torch.long))
    plain = make_inputs()
    for key in ("anchor_pairs", "anchor_concept_ids", "anchor_actions"):
        plain.pop(key)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, model(**plain).last_hidden_state)


@pytest.mark.parametrize("model_class, labels, message", [
    (CmalForQuestionAnswering, torch.full((B, 4), float("nan")), r"labels\[0, 0\] = nan: VQA soft scores must be"),
    (CmalForQuestionAnswering, torch.full((B, 4), 1.5), r"labels\[0, 0\] = 1.5; expected a soft score in \[0, 1\]"),
    (CmalForVisualEntailment, torch.tensor([0, 3, 1]), r"labels\[1\] = 3; expected a class id in \[0, 3\)"),
    (CmalForReferringExpression, torch.tensor([0, 5, 1]), r"labels\[1\] = 5; expected a region index in \[0, 5\)"),
    (CmalForReferringExpression, torch.tensor([0, 1, 4]), r"labels\[2\] = 4 points at a padding region"),
    (CmalForImageTextMatching, torch.tensor([0, 2, 1]), r"labels\[1\] = 2; expected 1 \(match\)"),
])
def test_bad_head_labels_name_the_value(model_class, labels, message):
    model = model_class(head_config(model_class)).eval()
    inputs = head_inputs(model_class)
    inputs["labels"] = labels
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize("key, value, message", [
    ("labels", lambda inputs: torch.full_like(inputs["input_ids"], V), rf"labels\[0, 0\] = {V}; expected a word-piece"),
    ("itm_labels", lambda inputs: torch.tensor([1, 2, 0]), r"itm_labels\[1\] = 2; expected 1 \(the caption matches\)"),
    ("mlm_positions", lambda inputs: torch.full((B, 2), N), rf"mlm_positions\[0, 0\] = {N}; expected a piece position"),
])
def test_bad_pretraining_targets_name_the_value(key, value, message):
    model = CmalForPreTraining(make_config()).eval()
    inputs = head_inputs(CmalForPreTraining)
    inputs[key] = value(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_sequence_classification_follows_problem_type_and_ignores_minus_100():
    inputs = head_inputs(CmalForVisualEntailment)
    torch.manual_seed(0)
    model = CmalForVisualEntailment(head_config(CmalForVisualEntailment)).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        # -100 rows are ignored, as in transformers' heads.
        ignored = model(**{**inputs, "labels": torch.tensor([0, -100, 2])}).loss
        torch.testing.assert_close(ignored, torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2])))
        model.config.problem_type = "multi_label_classification"
        targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        torch.testing.assert_close(model(**{**inputs, "labels": targets}).loss,
                                   torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
        model.config.problem_type = "regression"
        targets = torch.randn(B, 3)
        torch.testing.assert_close(model(**{**inputs, "labels": targets}).loss,
                                   torch.nn.functional.mse_loss(logits, targets))
    # Unset, the problem type is inferred from the labels, as transformers does.
    fresh = CmalForVisualEntailment(head_config(CmalForVisualEntailment)).eval()
    fresh(**{**inputs, "labels": torch.rand(B, 3).round()})
    assert fresh.config.problem_type == "multi_label_classification"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_broken_weights_file_is_refused_naming_it(tmp_path, damage):
    CmalModel(make_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": np.random.bytes(500)}[damage])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        CmalModel.from_pretrained(tmp_path)


def test_pretraining_head_names_one_dimensional_input_ids():
    # used to be "ValueError: not enough values to unpack (expected 2, got 1)", naming no argument
    model = CmalForPreTraining(make_config()).eval()
    inputs = make_inputs()
    with pytest.raises(ValueError, match=rf"input_ids must have shape \[batch_size, text_length\], got \({N},\)"):
        model(**{**inputs, "input_ids": inputs["input_ids"][0]}, itm_labels=torch.ones(B, dtype=torch.long))


def test_a_training_batch_without_anchor_inputs_still_reaches_every_parameter():
    # DDP with find_unused_parameters=False needs a gradient for every parameter in every step, also when a batch
    # carries no anchor_* keys at all (tests/distributed_worker.py runs it in two processes).
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config()).train()
    inputs = {name: value for name, value in make_inputs().items() if not name.startswith("anchor_")}
    labels = torch.full(inputs["input_ids"].shape, -100)
    labels[:, 1] = inputs["input_ids"][:, 1]
    outputs = model(**inputs, labels=labels, itm_labels=torch.ones(B, dtype=torch.long))
    outputs.loss.backward()
    assert outputs.amc_loss is not None and outputs.amc_loss.item() == 0.0
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
