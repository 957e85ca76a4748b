"""The forward pass is a fixed-shape tensor program: `torch.compile(fullgraph=True)` traces every CMAL class without
a graph break (forward and backward), `torch.export` exports the trunk, and the compiled model computes what the
eager one does. Dynamo with the "eager" backend checks the tracing (what fullgraph is about) in seconds; one
Inductor run checks that the generated code gives the same numbers."""

import pytest
import torch
from test_common import ALL_CLASSES, head_config, head_inputs
from test_model_core import make_config, make_inputs

from modeling_cmal import CmalForPreTraining, CmalModel
from modeling_cmal.collator_cmal import mlm_prediction_positions



def _inputs(model_class):
    inputs = head_inputs(model_class)
    if model_class is CmalModel:
        inputs.pop("labels", None)
    if model_class is CmalForPreTraining:
        inputs["mlm_positions"] = mlm_prediction_positions(inputs["labels"])
    return inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_fullgraph_compiles_forward_and_backward(model_class):
    torch.manual_seed(0)
    model = model_class(head_config(model_class)).train()
    inputs = _inputs(model_class)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    outputs = compiled(**inputs)
    reference = model(**inputs)
    if model_class is CmalModel:
        (outputs.last_hidden_state.sum() + outputs.pooler_output.sum()).backward()
        torch.testing.assert_close(outputs.last_hidden_state, reference.last_hidden_state)
    else:
        outputs.loss.backward()
        torch.testing.assert_close(outputs.loss, reference.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("with_anchors", [True, False], ids=["anchors", "no_anchors"])
def test_fullgraph_pretraining_with_and_without_anchors_and_with_output_capture(with_anchors):
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config(itc_loss_weight=0.5)).train()
    inputs = make_inputs(with_anchors=with_anchors)
    labels = torch.full(inputs["input_ids"].shape, -100)
    labels[:, 2] = 5
    inputs.update(labels=labels, itm_labels=torch.tensor([1, 0, 1]), mlm_positions=mlm_prediction_positions(labels))
    if not with_anchors:  # the collator's layout of a batch without anchors: K = 0 rows
        inputs.update(anchor_pairs=torch.full((3, 0, 2), -1), anchor_concept_ids=torch.full((3, 0), -1))
    # transformers installs its output-capturing hooks at the first eager call that asks for outputs (it cannot
    # while tracing), as for its own models.
    reference = model(**inputs, output_hidden_states=True, output_attentions=True)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    outputs = compiled(**inputs, output_hidden_states=True, output_attentions=True)
    outputs.loss.backward()
    torch.testing.assert_close(outputs.loss, reference.loss)
    assert len(outputs.hidden_states) == model.config.num_unified_layers + 1
    assert len(outputs.attentions) == model.config.num_unified_layers


def test_inductor_matches_eager():
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config()).eval()
    inputs = _inputs(CmalForPreTraining)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).loss, model(**inputs).loss, rtol=1e-4, atol=1e-4)


def test_export_of_the_trunk():
    torch.manual_seed(0)
    model = CmalModel(make_config()).eval()
    inputs = make_inputs()
    exported = torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_value_checks_run_in_eager_mode_only():
    model = CmalModel(make_config()).eval()
    inputs = make_inputs()
    inputs["visual_feats"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"visual_feats\[0, 0, 0\] = nan"):
        model(**inputs)
    # Compiled, the forward is a pure tensor program: no host sync, no check (the data is checked where it is made).
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.isnan(compiled(**inputs).last_hidden_state).any()
