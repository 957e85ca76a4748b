"""What transformers' common model tests check, applied to every CMAL class: loading across heads and missing keys,
weight initialisation, output structure (tuples, hidden states, attentions), training every head, mismatched
sizes, dtypes. CMAP semantics and the pre-training objectives are in test_model_core.py."""

import pytest
import torch
from test_model_core import B, M, N, make_config, make_inputs

from modeling_cmal import (
    CmalForImageTextMatching,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalForVisualReasoning,
    CmalModel,
)

SINGLE_IMAGE_HEADS = (CmalForQuestionAnswering, CmalForVisualEntailment, CmalForReferringExpression,
                      CmalForImageTextMatching)
ALL_CLASSES = (CmalModel, CmalForPreTraining, *SINGLE_IMAGE_HEADS, CmalForVisualReasoning)


def head_inputs(model_class, seed=0):
    """Inputs (with labels) for any CMAL class."""
    inputs = make_inputs(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if model_class is CmalForVisualReasoning:  # two images per sentence: [B, 2, M, ...]
        other = make_inputs(seed + 7)
        for key in ("visual_feats", "visual_pos", "visual_attention_mask"):
            inputs[key] = torch.stack([inputs[key], other[key]], dim=1)
        for key in ("anchor_pairs", "anchor_concept_ids", "anchor_actions"):
            inputs[key] = torch.stack([inputs[key], other[key]], dim=1)
        inputs["labels"] = torch.tensor([0, 1, 1])
    elif model_class is CmalForQuestionAnswering:
        inputs["labels"] = torch.rand(B, 4, generator=generator).round()
    elif model_class is CmalForReferringExpression:
        inputs["labels"] = torch.tensor([0, 4, 2])
    elif model_class in (CmalForVisualEntailment, CmalForImageTextMatching):
        inputs["labels"] = torch.tensor([0, 1, 1])
    elif model_class is CmalForPreTraining:
        inputs["labels"] = torch.where(torch.rand(B, N, generator=generator) < 0.3, inputs["input_ids"], -100)
        inputs["itm_labels"] = torch.tensor([1, 0, 1])
    return inputs


def head_config(model_class, **overrides):
    num_labels = {CmalForQuestionAnswering: 4, CmalForVisualEntailment: 3}.get(model_class, 2)
    return make_config(num_labels=num_labels, **overrides)


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_tuple_and_dict_outputs_are_the_same(model_class):
    torch.manual_seed(0)
    model = model_class(head_config(model_class)).eval()
    inputs = head_inputs(model_class)
    if model_class is CmalModel:
        inputs.pop("labels", None)
    with torch.no_grad():
        as_dict = model(**inputs, return_dict=True)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = [value for value in as_dict.to_tuple()]
    assert len(as_tuple) == len(expected)
    for first, second in zip(as_tuple, expected):
        if isinstance(first, torch.Tensor):
            torch.testing.assert_close(first, second)


@pytest.mark.parametrize("model_class", [c for c in ALL_CLASSES if c is not CmalModel], ids=lambda c: c.__name__)
def test_every_head_trains_from_its_labels(model_class):
    torch.manual_seed(0)
    model = model_class(head_config(model_class)).train()
    outputs = model(**head_inputs(model_class))
    assert outputs.loss is not None and outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    head_parameters = [name for name, _ in model.named_parameters() if not name.startswith("cmal.")]
    assert head_parameters, "a head has parameters of its own"
    for name, parameter in model.named_parameters():
        if name.startswith("cmal.") or name.startswith("itc_head"):
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = outputs.loss.item()
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(**head_inputs(model_class)).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < before, "a few Adam steps on one batch lower its loss"


@pytest.mark.parametrize("model_class", [c for c in ALL_CLASSES if c is not CmalModel], ids=lambda c: c.__name__)
def test_head_loads_from_a_trunk_folder_and_the_trunk_from_a_head_folder(model_class, tmp_path):
    torch.manual_seed(0)
    trunk = CmalModel(head_config(model_class))
    trunk.save_pretrained(tmp_path / "trunk")
    head, info = model_class.from_pretrained(tmp_path / "trunk", output_loading_info=True)
    # The referring-expression head reads the region slots, not the pooled [CLS]: its trunk has no pooler.
    unused = {"pooler.dense.weight", "pooler.dense.bias"} if model_class is CmalForReferringExpression else set()
    assert set(info["unexpected_keys"]) == unused and not info["mismatched_keys"]
    assert info["missing_keys"] and all(not key.startswith("cmal.") for key in info["missing_keys"])
    for name, value in trunk.state_dict().items():
        if name not in unused:
            torch.testing.assert_close(head.cmal.state_dict()[name], value, msg=name)

    head.save_pretrained(tmp_path / "head")
    reloaded, info = CmalModel.from_pretrained(tmp_path / "head", output_loading_info=True)
    assert set(info["missing_keys"]) == unused and not info["mismatched_keys"]
    for name, value in head.cmal.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)
    _, info = model_class.from_pretrained(tmp_path / "head", output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_initialisation_follows_the_config(model_class):
    """As transformers' `test_initialization`: with `initializer_range` ~ 0 every matrix is ~ 0 and every norm is
    1 / 0; the few deliberate exceptions are named."""
    config = head_config(model_class, initializer_range=1e-10)
    model = model_class(config)
    deliberate = ("hypersphere.scale", "logit_scale")  # sqrt(hidden) and log(1 / 0.07) by design
    for name, parameter in model.named_parameters():
        if any(part in name for part in deliberate):
            continue
        mean = parameter.data.float().mean().item()
        assert round(mean * 1e9) / 1e9 in (0.0, 1.0), f"{name} mean {mean}"
    torch.manual_seed(3)
    first = model_class(head_config(model_class))
    torch.manual_seed(3)
    second = model_class(head_config(model_class))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_hidden_states_and_attentions_of_every_stage():
    config = make_config(num_text_layers=2, num_visual_layers=1, num_unified_layers=3)
    model = CmalModel(config).eval()
    inputs = make_inputs()
    outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
    for name, count, length in (("text", 2, N), ("vision", 1, M), ("", 3, N + M)):
        prefix = f"{name}_" if name else ""
        hidden = getattr(outputs, f"{prefix}hidden_states")
        attentions = getattr(outputs, f"{prefix}attentions")
        assert len(hidden) == count + 1 and len(attentions) == count, name
        assert all(h.shape == (B, length, config.hidden_size) for h in hidden), name
        assert all(a.shape == (B, config.num_attention_heads, length, length) for a in attentions), name
        # rows are probability distributions that give padding nothing
        torch.testing.assert_close(attentions[-1].sum(-1), torch.ones(B, config.num_attention_heads, length))
    torch.testing.assert_close(outputs.hidden_states[-1], outputs.last_hidden_state)
    assert outputs.attentions[0][2, :, :, 5:N].abs().max() == 0  # padded text pieces of sample 2
    plain = model(**inputs)
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(plain.last_hidden_state, outputs.last_hidden_state)


def test_hidden_states_and_attentions_retain_gradients():
    model = CmalModel(make_config()).train()
    outputs = model(**make_inputs(), output_hidden_states=True, output_attentions=True)
    hidden, attention = outputs.hidden_states[0], outputs.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    outputs.last_hidden_state.sum().backward()
    assert hidden.grad is not None and attention.grad is not None


def test_mismatched_head_sizes_load_with_ignore_mismatched_sizes(tmp_path):
    CmalForVisualEntailment(make_config(num_labels=3)).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        CmalForVisualEntailment.from_pretrained(tmp_path, num_labels=5)
    model, info = CmalForVisualEntailment.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True,
                                                          output_loading_info=True)
    assert model.config.num_labels == 5 and info["mismatched_keys"]
    assert model(**make_inputs()).logits.shape == (B, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_forward_and_load(dtype, tmp_path):
    CmalForPreTraining(make_config()).save_pretrained(tmp_path)
    model = CmalForPreTraining.from_pretrained(tmp_path, dtype=dtype).eval()
    assert all(parameter.dtype == dtype for parameter in model.parameters())
    inputs = head_inputs(CmalForPreTraining)
    inputs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.text_embeds.dtype == dtype and outputs.amc_logits.dtype == dtype
    assert torch.isfinite(outputs.loss), "losses are computed in float32 from half-precision logits"


def test_model_is_small_and_embeddings_are_settable():
    model = CmalModel(make_config())
    assert model.num_parameters() < 1_000_000
    new = torch.nn.Embedding(120, 32)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new


def test_bf16_autocast_forward_and_backward_with_filled_anchors():
    """Under autocast the two encoders may return different dtypes; filling moves content between them."""
    model = CmalForPreTraining(make_config()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**head_inputs(CmalForPreTraining))
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.cmal.associative_prompt.text_mask_embedding.grad is not None
