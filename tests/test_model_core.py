"""CmalModel / CmalForPreTraining: shapes, CMAP filling semantics, AMC targets, transformers behaviour."""

import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from torch.nn import functional as F

from modeling_cmal import CmalConfig, CmalForPreTraining, CmalModel
from modeling_cmal.modeling_cmal import (
    ACTION_FILL_REGION,
    ACTION_FILL_TEXT,
    ACTION_KEEP,
    ACTION_MASK_BOTH,
    ACTION_MASK_REGION,
    ACTION_MASK_TEXT,
)
from modeling_cmal.collator_cmal import mlm_prediction_positions

B, N, M, DV, C, V = 3, 7, 5, 11, 13, 99


def make_config(**overrides) -> CmalConfig:
    fields = dict(vocab_size=V, hidden_size=32, num_attention_heads=2, intermediate_size=37, num_text_layers=1,
                  num_visual_layers=1, num_unified_layers=2, visual_feat_dim=DV, num_anchor_concepts=C,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return CmalConfig(**{**fields, **overrides})


def make_inputs(seed: int = 0, with_anchors: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(1, V, (B, N), generator=generator),
        "attention_mask": torch.ones(B, N, dtype=torch.long),
        "token_type_ids": torch.zeros(B, N, dtype=torch.long),
        "visual_feats": torch.randn(B, M, DV, generator=generator),
        "visual_pos": torch.sort(torch.rand(B, M, 4, generator=generator), dim=-1).values[..., [0, 1, 2, 3]],
        "visual_attention_mask": torch.ones(B, M, dtype=torch.long),
    }
    inputs["attention_mask"][2, 5:] = 0
    inputs["visual_attention_mask"][2, 3:] = 0
    if with_anchors:
        # sample 0: a two-piece word (pieces 1, 2) filled into region 0, piece 4 fills text from region 3
        # sample 1: mask text on (3, 1), mask region on (5, 2); sample 2: one fill-region anchor and padding
        inputs["anchor_pairs"] = torch.tensor([
            [[1, 0], [2, 0], [4, 3]],
            [[3, 1], [5, 2], [-1, -1]],
            [[2, 1], [-1, -1], [-1, -1]],
        ])
        inputs["anchor_concept_ids"] = torch.tensor([[4, 4, 7], [2, 9, -1], [11, -1, -1]])
        inputs["anchor_actions"] = torch.tensor([
            [ACTION_FILL_REGION, ACTION_FILL_REGION, ACTION_FILL_TEXT],
            [ACTION_MASK_TEXT, ACTION_MASK_REGION, ACTION_KEEP],
            [ACTION_FILL_REGION, ACTION_KEEP, ACTION_KEEP],
        ])
    return inputs


def test_shapes_with_and_without_anchors():
    model = CmalModel(make_config()).eval()
    for with_anchors in (True, False):
        outputs = model(**make_inputs(with_anchors=with_anchors), output_hidden_states=True)
        assert outputs.last_hidden_state.shape == (B, N + M, 32)
        assert outputs.pooler_output.shape == (B, 32)
        assert outputs.text_embeds.shape == (B, N, 32) and outputs.image_embeds.shape == (B, M, 32)
        torch.testing.assert_close(outputs.text_embeds.norm(dim=-1), torch.ones(B, N))
        torch.testing.assert_close(outputs.image_embeds.norm(dim=-1), torch.ones(B, M))
        assert len(outputs.text_hidden_states) == 2 and len(outputs.vision_hidden_states) == 2
        assert len(outputs.hidden_states) == 3
    empty = make_inputs(with_anchors=False)
    empty.update(anchor_pairs=torch.zeros(B, 0, 2, dtype=torch.long))
    assert model(**empty).last_hidden_state.shape == (B, N + M, 32)


def test_associative_prompt_moves_content_and_masks_the_partner():
    model = CmalModel(make_config()).eval()
    prompt = model.associative_prompt
    inputs = make_inputs()
    text = torch.randn(B, N, 32)
    regions = torch.randn(B, M, 32)
    new_text, new_regions = prompt(text, regions, inputs["anchor_pairs"], inputs["anchor_actions"])
    text_mask, region_mask = prompt.text_mask_embedding, prompt.region_mask_embedding
    # fill region: region 0 of sample 0 holds the mean of pieces 1 and 2; those pieces hold the text mask
    torch.testing.assert_close(new_regions[0, 0], (text[0, 1] + text[0, 2]) / 2)
    torch.testing.assert_close(new_text[0, 1], text_mask)
    torch.testing.assert_close(new_text[0, 2], text_mask)
    # fill text: piece 4 holds region 3's content; region 3 holds the region mask
    torch.testing.assert_close(new_text[0, 4], regions[0, 3])
    torch.testing.assert_close(new_regions[0, 3], region_mask)
    # mask text / mask region: hidden at the encoders' input by the collator; CMAP leaves both slots as they are
    torch.testing.assert_close(new_text[1], text[1])
    torch.testing.assert_close(new_regions[1], regions[1])
    for b, slots in ((0, [0, 3, 5, 6]), (2, [0, 1, 3, 4, 5, 6])):
        torch.testing.assert_close(new_text[b, slots], text[b, slots])
    # mask both: both slots hold their modality's mask vector
    both = torch.full_like(inputs["anchor_actions"], ACTION_MASK_BOTH)
    both_text, both_regions = prompt(text, regions, inputs["anchor_pairs"], both)
    torch.testing.assert_close(both_text[1, 3], text_mask)
    torch.testing.assert_close(both_regions[1, 1], region_mask)
    torch.testing.assert_close(both_regions[1, 2], region_mask)


def test_filled_slot_keeps_its_own_position_and_type():
    model = CmalModel(make_config()).eval()
    inputs = make_inputs()
    outputs = model(**inputs, output_hidden_states=True)
    hybrid = outputs.hidden_states[0]
    content = outputs.image_embeds[0, 3] * model.visual_hypersphere.scale
    position = model.text_embeddings.position_embeddings.weight[4]
    text_type = model.hybrid_embeddings.modality_type_embeddings.weight[0]
    expected = model.hybrid_embeddings.LayerNorm(content + position + text_type)
    torch.testing.assert_close(hybrid[0, 4], expected)
    # the region slot 0 holds the word's mean content plus its own box embedding and the region type
    words = outputs.text_embeds[0, [1, 2]].mean(0) * model.text_hypersphere.scale
    box = model.box_embeddings(inputs["visual_pos"])[0, 0]
    region_type = model.hybrid_embeddings.modality_type_embeddings.weight[1]
    torch.testing.assert_close(hybrid[0, N + 0], model.hybrid_embeddings.LayerNorm(words + box + region_type))


def test_amc_targets_and_losses():
    model = CmalForPreTraining(make_config()).eval()
    inputs = make_inputs()
    outputs = model(**inputs)
    # Only the anchors whose own content is masked while the partner stays have targets: sample 1's mask-text
    # anchor (piece 3 → concept 2, a text slot) and mask-region anchor (region 2 → concept 9, a region slot). The
    # filled anchors of samples 0 and 2 have none: their slot holds the partner's own state.
    assert outputs.amc_logits.shape == (B, 3, C)
    assert outputs.amc_labels.tolist() == [[-100, -100, -100], [2, 9, -100], [-100, -100, -100]]
    assert outputs.amc_slot_is_text.tolist() == [[False] * 3, [True, False, False], [False] * 3]
    sequence = CmalModel.forward(model.cmal, **inputs).last_hidden_state
    torch.testing.assert_close(outputs.amc_logits[1, 0], model.amc_head(sequence[1, 3]))
    torch.testing.assert_close(outputs.amc_logits[1, 1], model.amc_head(sequence[1, N + 2]))
    text_loss = F.cross_entropy(outputs.amc_logits[1, 0:1], torch.tensor([2]))
    region_loss = F.cross_entropy(outputs.amc_logits[1, 1:2], torch.tensor([9]))
    # The mapping term: every anchor word but the mask-region ones → its own region, on the hyperspheres.
    assert outputs.amc_pairing_labels.tolist() == [[0, -100, 3], [1, -100, -100], [1, -100, -100]]
    similarity = torch.einsum("bkh,bmh->bkm", outputs.text_embeds.gather(
        1, inputs["anchor_pairs"][..., :1].clamp(min=0).expand(-1, -1, 32)), outputs.image_embeds)
    scale = model.amc_pairing_head.logit_scale.exp()
    torch.testing.assert_close(outputs.amc_pairing_logits[0, 0], scale * similarity[0, 0])
    assert (outputs.amc_pairing_logits[2, :, 3:] == torch.finfo(torch.float32).min).all()  # padding regions
    pairing = F.cross_entropy(outputs.amc_pairing_logits.flatten(0, 1), outputs.amc_pairing_labels.flatten(),
                              ignore_index=-100)
    torch.testing.assert_close(outputs.amc_pairing_loss, pairing)
    torch.testing.assert_close(outputs.amc_loss, 0.5 * (text_loss + region_loss) + pairing)
    changed = dict(inputs, anchor_concept_ids=inputs["anchor_concept_ids"].clone())
    changed["anchor_concept_ids"][1, 1] = 8
    assert model(**changed).amc_loss != outputs.amc_loss
    # A word of several pieces has one target, at its first piece; one modality alone is its own mean.
    text_only = dict(inputs, anchor_actions=torch.tensor([[ACTION_MASK_TEXT] * 3, [ACTION_KEEP] * 3,
                                                         [ACTION_KEEP] * 3]))
    result = model(**text_only)
    assert result.amc_labels[0].tolist() == [4, -100, 7] and result.amc_slot_is_text[0].tolist() == [True, False, True]
    expected = F.cross_entropy(result.amc_logits[0, [0, 2]], torch.tensor([4, 7]))
    torch.testing.assert_close(result.amc_loss - result.amc_pairing_loss, expected)
    # Kept anchors have no concept target, only the mapping term; without anchors there is no AMC loss.
    keep_only = model(**dict(inputs, anchor_actions=torch.zeros_like(inputs["anchor_actions"])))
    assert (keep_only.amc_labels == -100).all()
    torch.testing.assert_close(keep_only.amc_loss, keep_only.amc_pairing_loss)
    assert model(**make_inputs(with_anchors=False)).amc_loss is None


def test_loss_weights_and_mlm_logits_only_where_labelled():
    inputs = make_inputs()
    labels = torch.full((B, N), -100)
    labels[0, 3], labels[1, 1], labels[1, 4] = 5, 6, 9
    itm_labels = torch.tensor([1, 0, 1])
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config()).eval()
    positions = mlm_prediction_positions(labels, multiple_of=1)
    assert positions.tolist() == [[3, -1], [1, 4], [-1, -1]]
    outputs = model(**inputs, labels=labels, itm_labels=itm_labels, mlm_positions=positions)
    assert outputs.mlm_logits.shape == (B, 2, V)
    torch.testing.assert_close(outputs.loss, outputs.amc_loss + outputs.mlm_loss + outputs.itm_loss)
    # The sparse decoder (BERT's masked_lm_positions) gives the loss of the dense one over every position.
    dense = model(**inputs, labels=labels, itm_labels=itm_labels)
    assert dense.mlm_logits.shape == (B, N, V)
    torch.testing.assert_close(dense.mlm_loss, outputs.mlm_loss)
    assert model(**inputs).mlm_logits.shape == (B, N, V)
    for objective in ("amc", "mlm", "itm"):
        config = make_config(**{f"{objective}_loss_weight": 0.0})
        skipped = CmalForPreTraining(config)
        # A switched-off objective has no head at all (every parameter must get a gradient under DDP).
        head = {"amc": "amc_head", "mlm": "cls", "itm": "itm_head"}[objective]
        assert getattr(skipped, head) is None
        missing, _ = skipped.load_state_dict(model.state_dict(), strict=False)
        assert not missing
        result = skipped.eval()(**inputs, labels=labels, itm_labels=itm_labels, mlm_positions=positions)
        assert getattr(result, f"{objective}_loss") is None and getattr(result, f"{objective}_logits") is None
        others = [getattr(outputs, f"{name}_loss") for name in ("amc", "mlm", "itm") if name != objective]
        torch.testing.assert_close(result.loss, sum(others))


def test_mrfr_regresses_every_real_regions_normalised_features_from_its_slot():
    inputs = make_inputs()
    labels = torch.full((B, N), -100)
    labels[0, 3] = 5
    itm_labels = torch.tensor([1, 0, 1])
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config(mrfr_loss_weight=0.5)).eval()
    outputs = model(**inputs, labels=labels, itm_labels=itm_labels, output_hidden_states=True)
    # By hand: the head at the region slots of the unified encoder's output, against each real region's features
    # normalised over its feature axis; padding regions (sample 2 from region 3 on) do not count.
    slots = outputs.hidden_states[-1][:, -M:]
    predicted = model.mrfr_head(slots)
    target = (inputs["visual_feats"] - inputs["visual_feats"].mean(-1, keepdim=True)) / torch.sqrt(
        inputs["visual_feats"].var(-1, unbiased=False, keepdim=True) + 1e-5)
    real = inputs["visual_attention_mask"].bool()
    expected = (predicted - target).pow(2).mean(-1)[real].mean()
    torch.testing.assert_close(outputs.mrfr_loss, expected)
    torch.testing.assert_close(outputs.loss, outputs.amc_loss + outputs.mlm_loss + outputs.itm_loss
                               + 0.5 * outputs.mrfr_loss)
    # A padding region's features change nothing.
    changed = {**inputs, "visual_feats": inputs["visual_feats"].clone()}
    changed["visual_feats"][2, 4] += 100.0
    torch.testing.assert_close(model(**changed, labels=labels, itm_labels=itm_labels).mrfr_loss, outputs.mrfr_loss)
    # Only a training batch has the objective; off (the config's default), there is no head.
    assert model(**inputs).mrfr_loss is None
    off = CmalForPreTraining(make_config())
    assert off.mrfr_head is None and off(**inputs, labels=labels, itm_labels=itm_labels).mrfr_loss is None


def test_every_parameter_gets_a_gradient():
    model = CmalForPreTraining(make_config(itc_loss_weight=0.5, mrfr_loss_weight=1.0)).train()
    labels = torch.full((B, N), -100)
    labels[:, 3] = 7
    outputs = model(**make_inputs(), labels=labels, itm_labels=torch.tensor([1, 0, 1]))
    outputs.loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing


def test_a_masked_region_takes_the_mask_embedding_and_its_gradient_stays_bounded():
    """The collator hides a mask-region anchor's region by zeroing its features. The model embeds such a region with
    the learned `mask_embedding`: `LN(W 0 + b)` would normalise the bias alone (variance 0 at initialisation) and
    LayerNorm's backward would multiply the AMC gradient there by up to 1 / sqrt(eps) (1.7e5 at the projection bias
    on the first pre-training batch of a tiny model, before this)."""
    torch.manual_seed(0)
    model = CmalForPreTraining(make_config()).train()
    inputs = make_inputs()
    inputs["visual_feats"][1, 2] = 0.0  # sample 1's mask-region anchor, as the collator hides it
    embeddings = model.cmal.visual_embeddings
    box = model.cmal.box_embeddings(inputs["visual_pos"])
    embedded = embeddings(inputs["visual_feats"], box)
    torch.testing.assert_close(embedded[1, 2], embeddings.mask_embedding + box[1, 2])
    torch.testing.assert_close(embedded[1, 1], embeddings.feature_LayerNorm(
        embeddings.feature_projection(inputs["visual_feats"][1, 1])) + box[1, 1])
    outputs = model(**inputs)
    assert outputs.amc_loss is not None
    outputs.loss.backward()
    norms = {name: parameter.grad.norm().item() for name, parameter in model.named_parameters()
             if parameter.grad is not None}
    assert norms["cmal.visual_embeddings.mask_embedding"] > 0
    assert max(norms.values()) < 1e3, sorted(norms.items(), key=lambda item: -item[1])[:3]


@pytest.mark.smoke
def test_save_load_round_trip_and_tied_decoder(tmp_path):
    model = CmalForPreTraining(make_config()).eval()
    inputs = make_inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = CmalForPreTraining.from_pretrained(tmp_path).eval()
    assert reloaded.cls.decoder.weight.data_ptr() == reloaded.cmal.text_embeddings.word_embeddings.weight.data_ptr()
    before, after = model(**inputs), reloaded(**inputs)
    torch.testing.assert_close(after.mlm_logits, before.mlm_logits, rtol=0, atol=0)
    torch.testing.assert_close(after.amc_logits, before.amc_logits, rtol=0, atol=0)
    trunk = CmalModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(trunk(**inputs).pooler_output, model.cmal(**inputs).pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["text_and_anchored_words", "anchored_words", "cls_attention"])
def test_task_pooler_reads_what_its_mode_names_and_each_mode_round_trips(pooling, tmp_path):
    """The VQA head's pooled input, by hand: `[CLS]` pooled, then the mean of the real text slots (padding left out),
    then the mean of the anchored slots (each once); the NLVR2 head reads twice that width. A folder keeps its mode."""
    from modeling_cmal import CmalForQuestionAnswering, CmalForVisualReasoning

    model = CmalForQuestionAnswering(make_config(task_pooling=pooling, num_labels=4)).eval()
    inputs = {key: value for key, value in make_inputs().items() if key != "anchor_actions"}
    outputs = model(**inputs)
    width = {"text_and_anchored_words": 3, "anchored_words": 2, "cls_attention": 2}[pooling] * 32
    assert model.task_pooler.output_size == width and outputs.pooler_output.shape == (B, width)
    trunk = model.cmal(**inputs)
    states, pooled = trunk.last_hidden_state, trunk.pooler_output
    torch.testing.assert_close(outputs.pooler_output[:, :32], pooled)
    anchored = torch.stack([states[0, [1, 2, 4]].mean(0), states[1, [3, 5]].mean(0), states[2, 2]])
    if pooling == "text_and_anchored_words":
        text = torch.stack([states[0, :N].mean(0), states[1, :N].mean(0), states[2, :5].mean(0)])
        torch.testing.assert_close(outputs.pooler_output[:, 32:64], text)
        torch.testing.assert_close(outputs.pooler_output[:, 64:], anchored)
    elif pooling == "anchored_words":
        torch.testing.assert_close(outputs.pooler_output[:, 32:], anchored)
    model.save_pretrained(tmp_path)
    reloaded = CmalForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert reloaded.config.task_pooling == pooling
    torch.testing.assert_close(reloaded(**inputs).logits, outputs.logits, rtol=0, atol=0)
    reasoning = CmalForVisualReasoning(make_config(task_pooling=pooling, num_labels=2))
    assert reasoning.classifier.dense.in_features == 2 * width


def test_eager_and_sdpa_agree_also_without_regions():
    model = CmalForPreTraining(make_config()).eval()
    inputs = make_inputs()
    inputs["visual_attention_mask"][1] = 0
    model.config._attn_implementation = "eager"
    eager = model(**inputs)
    model.config._attn_implementation = "sdpa"
    sdpa = model(**inputs)
    assert torch.isfinite(sdpa.itm_logits).all()
    torch.testing.assert_close(sdpa.itm_logits, eager.itm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.amc_logits, eager.amc_logits, atol=1e-5, rtol=1e-5)


def test_attentions_and_batching_equivalence():
    model = CmalModel(make_config()).eval()
    inputs = make_inputs(with_anchors=False)
    outputs = model(**inputs, output_attentions=True)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (B, 2, N + M, N + M)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(B, 2, N + M))
    # sample 2 alone, without its padding, gives the same pooled output
    alone = {key: value[2:3] for key, value in inputs.items()}
    alone = {**alone, "input_ids": alone["input_ids"][:, :5], "attention_mask": alone["attention_mask"][:, :5],
             "token_type_ids": alone["token_type_ids"][:, :5], "visual_feats": alone["visual_feats"][:, :3],
             "visual_pos": alone["visual_pos"][:, :3], "visual_attention_mask": alone["visual_attention_mask"][:, :3]}
    torch.testing.assert_close(model(**alone).pooler_output[0], outputs.pooler_output[2], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = make_inputs()
    labels = torch.full((B, N), -100)
    labels[:, 2] = 3
    model = CmalForPreTraining(make_config()).train()
    loss = model(**inputs, labels=labels, itm_labels=torch.tensor([1, 0, 1])).loss
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    checkpointed = model(**inputs, labels=labels, itm_labels=torch.tensor([1, 0, 1])).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, loss)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resize_token_embeddings_keeps_the_decoder_tied():
    model = CmalForPreTraining(make_config())
    model.resize_token_embeddings(V + 5)
    assert model.config.vocab_size == V + 5
    assert model.cls.decoder.weight.shape == (V + 5, 32)
    assert model.cls.decoder.weight.data_ptr() == model.cmal.text_embeddings.word_embeddings.weight.data_ptr()
    inputs = make_inputs()
    inputs["input_ids"][0, 1] = V + 4
    assert model(**inputs).mlm_logits.shape == (B, N, V + 5)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", -1), ("num_attention_heads", 5), ("num_unified_layers", 0), ("visual_feat_dim", "x"),
    ("anchor_fill_text_rate", 0.8), ("default_anchor_action", "swap"), ("mlm_loss_weight", -1.0),
    ("hidden_dropout_prob", 1.5),
])
def test_invalid_config_values_name_the_field(field, value):
    expected = "anchor rates must sum" if field == "anchor_fill_text_rate" else field
    # `@strict`'s errors, as for transformers' own configs: a wrong type, or a value the validators refuse
    with pytest.raises((StrictDataclassFieldValidationError, StrictDataclassClassValidationError), match=expected):
        make_config(**{field: value})


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(visual_feats=i["visual_feats"][:2], visual_pos=i["visual_pos"][:2]), "batch size"),
    (lambda i: i["anchor_pairs"].__setitem__((0, 0, 0), N), "anchor_pairs\\[0, 0\\]"),
    (lambda i: i["anchor_pairs"].__setitem__((0, 0, 1), M), "region index"),
    (lambda i: i.update(visual_feats=torch.randn(B, M, DV + 1)), "visual_feat_dim"),
    (lambda i: i["anchor_actions"].__setitem__((0, 0), 6), "anchor_actions"),
    (lambda i: i["anchor_concept_ids"].__setitem__((0, 0), C), "num_anchor_concepts"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    model = CmalForPreTraining(make_config())
    inputs = make_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_bert_initialisation_reproduces_bert_hidden_states(bert_dir, tokenizer):
    from transformers import BertModel

    from modeling_cmal import load_bert_weights

    config = CmalConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_text_layers=2,
                        num_visual_layers=1, num_unified_layers=4, visual_feat_dim=DV, num_anchor_concepts=C)
    model = CmalModel(config).eval()
    report = load_bert_weights(model, bert_dir)
    assert "text_encoder.layer.1.output.dense.weight" in report["loaded"]
    bert = BertModel.from_pretrained(str(bert_dir)).eval()
    batch = tokenizer(["a cup of espresso on a red saucer", "a rocket on a launch pad"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        expected = bert(**batch, output_hidden_states=True).hidden_states[2]
        outputs = model(**batch, visual_feats=torch.randn(2, 3, DV), visual_pos=torch.rand(2, 3, 4),
                        output_hidden_states=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs.text_hidden_states[-1][real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.unified_encoder.layer[3].attention.self.query.weight,
                               bert.encoder.layer[5].attention.self.query.weight)
    with pytest.raises(ValueError, match="num_text_layers \\+ num_unified_layers"):
        load_bert_weights(CmalModel(CmalConfig(**{**config.to_dict(), "num_unified_layers": 5})), bert_dir)


@pytest.mark.smoke
def test_saved_folder_loads_with_remote_code_in_a_fresh_process(tmp_path):
    model = CmalForPreTraining(make_config()).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    inputs = make_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(model.cmal(**inputs).pooler_output, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        # The package is installed in editable mode in CI: hide it, as on a machine that only has transformers.
        sys.modules["modeling_cmal"] = None
        import torch
        try:
            import modeling_cmal
            raise SystemExit("modeling_cmal must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModel, AutoModelForVisualQuestionAnswering
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CmalModel", type(model)
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        torch.testing.assert_close(model(**inputs).pooler_output, torch.load({str(tmp_path / 'expected.pt')!r}),
                                   rtol=0, atol=0)
        head = AutoModelForVisualQuestionAnswering.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(head).__name__ == "CmalForQuestionAnswering"
        print("REMOTE-OK")
    """)
    import os

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_every_forward_is_documented_through_auto_docstring():
    """The forwards' docstrings come from transformers' `auto_docstring` (its standard arguments) and CMAL's own
    (`CMAL_INPUTS_DOCSTRING` and each head's): every argument has its entry with its shape, and importing the
    package logs no "is part of ... but not documented" error (checked in a fresh process, where the import runs)."""
    import inspect

    from modeling_cmal import modeling_cmal

    done = subprocess.run([sys.executable, "-c", "import modeling_cmal"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "not documented" not in done.stderr + done.stdout, done.stderr[-2000:]
    for name in ("CmalModel", "CmalForPreTraining", "CmalForQuestionAnswering", "CmalForVisualEntailment",
                 "CmalForVisualReasoning", "CmalForReferringExpression", "CmalForImageTextMatching"):
        forward = getattr(modeling_cmal, name).forward
        for argument in inspect.signature(forward).parameters:
            if argument not in ("self", "kwargs"):
                assert f"{argument} (`" in forward.__doc__, (name, argument)
        assert "visual_feats (`torch.FloatTensor` of shape" in forward.__doc__, name
