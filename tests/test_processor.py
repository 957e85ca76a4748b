"""Tests of CmalProcessor (modeling_cmal/processing_cmal.py): anchors at the right pieces, region validation and
selection, output formats, saving and loading (also as remote code)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_cmal.anchoring import ConceptLexicon
from modeling_cmal.processing_cmal import LEXICON_FILE, CmalProcessor
from modeling_cmal.region_processing_cmal import CmalRegionProcessor, select_top_regions

FEATURE_DIM = 8
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CmalProcessor(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def seeds(test_data_dir):
    return json.loads((test_data_dir / "real_image_seeds.json").read_text())


def photo_regions(seeds, name: str) -> dict:
    """Regions of a real photo: the hand-drawn boxes, their tags, and as features the mean and spread of the
    box's pixels (per colour channel) plus the box's relative area and aspect."""
    from skimage import data

    image = getattr(data, name)()
    width, height = seeds["images"][name]["size"]
    assert image.shape[:2] == (height, width)
    features, boxes, tags = [], [], []
    for region in seeds["regions"][name]:
        x1, y1, x2, y2 = region["box"]
        crop = image[y1:y2, x1:x2].reshape(-1, 3).astype(np.float32) / 255
        area = (x2 - x1) * (y2 - y1) / (width * height)
        features.append([*crop.mean(0), *crop.std(0), area, (x2 - x1) / max(y2 - y1, 1)])
        boxes.append(region["box"])
        tags.append(region["tag"])
    return {"visual_feats": np.asarray(features, np.float32), "visual_pos": boxes, "image_size": (width, height), "tags": tags}


def regions_for(tags, scores=None, feature_dim=FEATURE_DIM, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    regions = {
        "visual_feats": rng.standard_normal((len(tags), feature_dim)).astype(np.float32),
        "visual_pos": np.tile(np.array([[0.1, 0.2, 0.6, 0.9]], np.float32), (len(tags), 1)).reshape(-1, 4),
        "tags": list(tags),
    }
    if scores is not None:
        regions["scores"] = list(scores)
    return regions


def anchored(processor, outputs, sample=0) -> list[tuple[str, int, int]]:
    """`(piece, region index, concept id)` of every anchor row of one sample."""
    pairs = torch.as_tensor(np.asarray(outputs["anchor_pairs"]))[sample]
    concepts = torch.as_tensor(np.asarray(outputs["anchor_concept_ids"]))[sample]
    input_ids = torch.as_tensor(np.asarray(outputs["input_ids"]))[sample]
    return [(processor.tokenizer.convert_ids_to_tokens(int(input_ids[piece])), int(region), int(concept))
            for (piece, region), concept in zip(pairs.tolist(), concepts.tolist()) if piece >= 0]


# --------------------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------------------


def test_real_photo_coffee_anchors_every_piece_of_cup_saucer_spoon(processor, seeds):
    regions = photo_regions(seeds, "coffee")
    caption = seeds["captions"]["coffee"][0]
    assert caption == "a cup of espresso on a red saucer with a spoon"
    outputs = processor(text=caption, regions=regions, return_tensors="pt")
    lexicon = processor.lexicon
    assert anchored(processor, outputs) == [
        ("cup", 0, lexicon.concept_id("cup")),
        ("sauce", 1, lexicon.concept_id("saucer")),
        ("##r", 1, lexicon.concept_id("saucer")),
        ("spoon", 2, lexicon.concept_id("spoon")),
    ]
    # No actions unless asked for: the model applies its config's one policy (default_anchor_action).
    assert "anchor_actions" not in outputs
    width, height = regions["image_size"]
    expected_pos = torch.tensor(regions["visual_pos"], dtype=torch.float32) / torch.tensor([width, height, width, height])
    torch.testing.assert_close(outputs["visual_pos"][0], expected_pos)
    torch.testing.assert_close(outputs["visual_feats"][0], torch.from_numpy(regions["visual_feats"]))
    assert outputs["visual_attention_mask"].tolist() == [[1, 1, 1]]


def test_real_photos_multi_word_alias_and_people(processor, seeds):
    coffee = photo_regions(seeds, "coffee")
    astronaut = photo_regions(seeds, "astronaut")
    outputs = processor(text=[seeds["captions"]["coffee"][1], seeds["captions"]["astronaut"][1]],
                        regions=[coffee, astronaut], return_tensors="pt")
    cup = processor.lexicon.concept_id("cup")
    # "coffee cup" is one alias of cup: both of its words are the anchor.
    assert anchored(processor, outputs, 0) == [("coffee", 0, cup), ("cup", 0, cup)]
    assert [(piece, astronaut["tags"][region]) for piece, region, _ in anchored(processor, outputs, 1)] == [
        ("woman", "woman"), ("helmet", "helmet")]
    assert outputs["visual_attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


def test_plurals_and_synonyms(processor):
    outputs = processor(text=["two dogs chase three cats", "a guy on a bicycle next to a lady"],
                        regions=[regions_for(["cat", "dog"]), regions_for(["bike", "woman", "man"])])
    assert [(piece, region) for piece, region, _ in anchored(processor, outputs, 0)] == [("dogs", 1), ("cats", 0)]
    assert [(piece, region) for piece, region, _ in anchored(processor, outputs, 1)] == [
        ("guy", 2), ("bicycle", 0), ("lady", 1)]


def test_multi_word_tags_take_every_piece_of_every_word(processor):
    outputs = processor(text="a player swings a tennis racket near a traffic light",
                        regions=regions_for(["traffic light", "person", "tennis racket"]))
    lexicon = processor.lexicon
    racket, light = lexicon.tag_concept_id("tennis racket"), lexicon.tag_concept_id("traffic light")
    person = lexicon.tag_concept_id("person")  # COCO's "person" anchors the words people use for one (issue 17)
    assert anchored(processor, outputs) == [("player", 1, person), ("tennis", 2, racket), ("rack", 2, racket),
                                            ("##et", 2, racket), ("traffic", 0, light), ("light", 0, light)]


def test_repeated_words_pair_one_to_one_by_score(processor):
    caption = "a cup next to a cup and a cup"
    outputs = processor(text=[caption, caption], regions=[regions_for(["cup", "cup"], scores=[0.2, 0.9]),
                                                          regions_for(["cup"])])
    rows = anchored(processor, outputs, 0)
    assert [region for _, region, _ in rows] == [1, 0]  # the better-scored region goes to the first word
    pieces = outputs["anchor_pairs"][0][:2]
    assert [piece for piece, _ in pieces] == [2, 6]
    assert [region for _, region, _ in anchored(processor, outputs, 1)] == [0]


def test_no_anchor_gives_k_zero(processor):
    outputs = processor(text="a photo of the blue sky", regions=regions_for(["dog", "car"]), return_tensors="pt")
    assert outputs["anchor_pairs"].shape == (1, 0, 2)
    assert outputs["anchor_concept_ids"].shape == (1, 0)
    assert outputs["anchor_pairs"].dtype == torch.long
    no_tags = processor(text="a dog", regions={"visual_feats": np.ones((1, 4)), "visual_pos": [[0, 0, 1, 1]]})
    assert no_tags["anchor_pairs"] == [[]]


def test_empty_caption_is_cls_sep(processor):
    outputs = processor(text=["", "a dog"], regions=[regions_for(["dog"]), regions_for(["dog"])], return_tensors="pt")
    tokenizer = processor.tokenizer
    assert outputs["input_ids"][0, :2].tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert outputs["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert outputs["anchor_pairs"][0].tolist() == [[-1, -1]]
    assert anchored(processor, outputs, 1) == [("dog", 0, processor.lexicon.concept_id("dog"))]


def test_truncated_words_get_no_anchor(bert_dir):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(bert_dir), model_max_length=64)
    processor = CmalProcessor(tokenizer=tokenizer)
    regions = regions_for(["cup", "saucer"])
    # [CLS] a cup on a red sauce ##r [SEP]: "saucer" keeps only "sauce" at max_length 8, all of itself at 9.
    cut = processor(text="a cup on a red saucer", regions=regions, max_length=8, return_tensors="pt")
    assert processor.tokenizer.convert_ids_to_tokens(cut["input_ids"][0, -2:].tolist()) == ["sauce", "[SEP]"]
    assert [(piece, region) for piece, region, _ in anchored(processor, cut)] == [("cup", 0)]
    whole = processor(text="a cup on a red saucer", regions=regions, max_length=9, return_tensors="pt")
    assert [(piece, region) for piece, region, _ in anchored(processor, whole)] == [
        ("cup", 0), ("sauce", 1), ("##r", 1)]
    tokenizer.truncation_side = "left"
    left = processor(text="a cup on a red saucer", regions=regions, max_length=7, return_tensors="pt")
    assert [(piece, region) for piece, region, _ in anchored(processor, left)] == [("sauce", 1), ("##r", 1)]


def test_anchor_action_is_given_to_every_anchor_row(processor):
    regions = regions_for(["cup", "saucer"])
    for action, code in (("keep", 0), ("fill_text", 1), ("fill_region", 2), ("mask_both", 3), ("mask_text", 4),
                         ("mask_region", 5), (2, 2)):
        outputs = processor(text=["a cup on a saucer", "a cup"], regions=[regions, regions], anchor_action=action,
                            return_tensors="pt")
        assert outputs["anchor_actions"].tolist() == [[code, code, code], [code, 0, 0]]
    for bad in ("fill", 6, -1, True):
        with pytest.raises(ValueError, match="anchor_action"):
            processor(text="a cup", regions=regions, anchor_action=bad)


# --------------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------------


def test_zero_regions_are_masked_and_an_all_empty_batch_keeps_one_masked_slot(processor):
    empty = {"visual_feats": np.zeros((0, FEATURE_DIM), np.float32), "visual_pos": np.zeros((0, 4)), "tags": []}
    mixed = processor(text=["a dog", "a dog"], regions=[regions_for(["dog", "cat"]), empty], return_tensors="pt")
    assert mixed["visual_attention_mask"].tolist() == [[1, 1], [0, 0]]
    assert mixed["visual_feats"][1].abs().sum() == 0
    assert mixed["anchor_pairs"][1].tolist() == [[-1, -1]]
    none = processor(text=["a dog", ""], regions=[empty, empty], return_tensors="pt")
    assert none["visual_feats"].shape == (2, 1, FEATURE_DIM)
    assert none["visual_pos"].shape == (2, 1, 4)
    assert none["visual_attention_mask"].tolist() == [[0], [0]]
    assert none["anchor_pairs"].shape == (2, 0, 2)


def test_processor_outputs_run_through_the_model(processor):
    from modeling_cmal import CmalConfig, CmalModel

    config = CmalConfig.from_size("tiny", visual_feat_dim=FEATURE_DIM, num_anchor_concepts=len(processor.lexicon),
                                  vocab_size=len(processor.tokenizer))
    model = CmalModel(config).eval()
    empty = {"visual_feats": np.zeros((0, FEATURE_DIM)), "visual_pos": np.zeros((0, 4))}
    for regions in ([regions_for(["dog", "cat"]), empty], [empty, empty]):
        inputs = processor(text=["a dog and a cat", ""], regions=regions, anchor_action="fill_text",
                           return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        assert torch.isfinite(outputs.last_hidden_state).all()


def test_too_many_regions_keeps_the_top_scores_in_input_order(bert_dir, tokenizer):
    processor = CmalProcessor(tokenizer=tokenizer, max_regions=3)
    scores = [0.1, 0.9, 0.5, 0.9, 0.3, 0.7]
    regions = regions_for(["dog", "cat", "car", "cup", "bus", "man"], scores=scores)
    regions["visual_feats"] = np.arange(6 * FEATURE_DIM, dtype=np.float32).reshape(6, FEATURE_DIM)
    outputs = processor(text="a man with a cup next to a dog", regions=regions, return_tensors="pt")
    kept = [1, 3, 5]  # 0.9, 0.9 (tie: both), 0.7
    torch.testing.assert_close(outputs["visual_feats"][0], torch.from_numpy(regions["visual_feats"][kept]))
    assert outputs["visual_attention_mask"].tolist() == [[1, 1, 1]]
    # Region indices are positions among the kept regions; the dropped dog region gets no anchor.
    assert [(piece, region) for piece, region, _ in anchored(processor, outputs)] == [("man", 2), ("cup", 1)]
    ties = processor(text="a dog", regions=regions_for(["dog"] * 5, scores=[0.5] * 5), return_tensors="pt")
    assert ties["anchor_pairs"][0].tolist() == [[2, 0]]
    unscored = regions_for(["dog", "cat", "car", "cup"])
    unscored["visual_feats"] = np.arange(4 * FEATURE_DIM, dtype=np.float32).reshape(4, FEATURE_DIM)
    first = processor(text="a cup", regions=unscored, return_tensors="pt")
    torch.testing.assert_close(first["visual_feats"][0], torch.from_numpy(unscored["visual_feats"][:3]))
    padded = processor(text="a cup", regions=regions_for(["cup"]), padding="max_length", max_length=12,
                       return_tensors="pt")
    assert padded["input_ids"].shape == (1, 12) and padded["visual_feats"].shape == (1, 3, FEATURE_DIM)


def test_tag_ids_need_and_use_the_tag_vocabulary(tokenizer, processor):
    vocabulary = ["__background__", "cup", "saucer", "spoon"]
    with_vocabulary = CmalProcessor(tokenizer=tokenizer, tag_vocabulary=vocabulary)
    by_id = regions_for(["x", "y", "z"])
    by_id["tags"] = np.array([3, 1, 2])
    by_name = regions_for(["spoon", "cup", "saucer"])
    caption = "a cup on a saucer with a spoon"
    expected = processor(text=caption, regions=by_name, return_tensors="pt")
    for tags in (np.array([3, 1, 2]), [3, 1, 2], torch.tensor([3, 1, 2]), ["spoon", 1, np.int64(2)]):
        by_id["tags"] = tags
        outputs = with_vocabulary(text=caption, regions=by_id, return_tensors="pt")
        assert torch.equal(outputs["anchor_pairs"], expected["anchor_pairs"])
        assert torch.equal(outputs["anchor_concept_ids"], expected["anchor_concept_ids"])
    by_id["tags"] = [3, 1, 4]
    with pytest.raises(ValueError, match=r"regions\[0\]\['tags'\]\[2\] is the id 4; expected an id in \[0, 4\)"):
        with_vocabulary(text=caption, regions=by_id)
    by_id["tags"] = [3, 1, 2]
    with pytest.raises(ValueError, match="no tag_vocabulary"):
        processor(text=caption, regions=by_id)
    by_id["tags"] = [3, 1.0, 2]
    with pytest.raises(ValueError, match=r"\['tags'\]\[1\] = 1.0"):
        with_vocabulary(text=caption, regions=by_id)


def test_tag_vocabulary_from_a_file(tokenizer, test_data_dir):
    processor = CmalProcessor(tokenizer=tokenizer, tag_vocabulary=test_data_dir / "vg_objects_vocab.txt")
    assert len(processor.tag_vocabulary) == 1600
    with pytest.raises(ValueError, match="tag_vocabulary"):
        CmalProcessor(tokenizer=tokenizer, tag_vocabulary=["cup", ""])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(visual_feats=np.ones(3)), r"regions\[1\]\['visual_feats'\] must be 2-D"),
        (lambda r: r.update(visual_feats=[[1.0, 2.0], [3.0]]), r"regions\[1\]\['visual_feats'\] must be an array of numbers"),
        (lambda r: r.update(visual_feats=[["a"] * FEATURE_DIM] * 3), r"array of numbers"),
        (lambda r: r["visual_feats"].__setitem__((2, 5), np.nan), r"regions\[1\]\['visual_feats'\]\[2, 5\] = nan"),
        (lambda r: r["visual_feats"].__setitem__((0, 0), np.inf), r"regions\[1\]\['visual_feats'\]\[0, 0\] = inf"),
        (lambda r: r.update(visual_feats=np.full((3, FEATURE_DIM), 1e39)), r"\(as float32: inf\)"),
        (lambda r: r.update(visual_feats=np.ones((3, FEATURE_DIM + 1))), r"regions\[1\]\['visual_feats'\] has 9 dimensions"),
        (lambda r: r.update(visual_pos=[[0, 0, 1, 1]] * 2), r"regions\[1\]\['visual_pos'\] has 2 rows but visual_feats has 3"),
        (lambda r: r.update(visual_pos=[[0, 0, 1]] * 3), r"shape \[M, 4\]"),
        (lambda r: r["visual_pos"].__setitem__((1, 2), np.nan), r"regions\[1\]\['visual_pos'\]\[1\] = \[0.1\d*, 0.2\d*, nan"),
        (lambda r: r.update(visual_pos=[[0.5, 0, 0.4, 1]] * 3), r"x1 <= x2"),
        (lambda r: r.update(visual_pos=[[0, 0, 1.5, 1]] * 3), r"outside \[0, 1\].*image_size"),
        (lambda r: r.update(tags=["cup"]), r"regions\[1\]\['tags'\] has 1 entries but visual_feats has 3"),
        (lambda r: r.update(tags="cup"), r"list of class names"),
        (lambda r: r.update(scores=[0.1, 0.2]), r"regions\[1\]\['scores'\] has shape \(2,\); expected \[3\]"),
        (lambda r: r.update(scores=[0.1, float("nan"), 0.2]), r"regions\[1\]\['scores'\]\[1\] = nan"),
        (lambda r: r.update(image_size=(0, 10)), r"image_size'\] must be \(width, height\)"),
        (lambda r: r.update(image_size=(10, 10), visual_pos=[[11, 0, 12, 5]] * 3), r"lies outside the image"),
        (lambda r: r.update(box=[]), r"unknown keys \['box'\]"),
        (lambda r: r.pop("visual_pos"), r"regions\[1\] has no 'visual_pos'"),
    ],
)
def test_invalid_regions_are_refused_naming_the_sample(processor, change, message):
    regions = [regions_for(["cup"]), regions_for(["cup", "dog", "cat"])]
    regions[1]["visual_feats"] = regions[1]["visual_feats"].astype(np.float64)
    regions[1]["visual_pos"] = regions[1]["visual_pos"].astype(np.float64)
    change(regions[1])
    with pytest.raises(ValueError, match=message):
        processor(text=["a cup", "a dog"], regions=regions)


def test_boxes_partly_outside_the_image_are_clipped_with_a_warning_giving_the_count(processor, caplog):
    regions = regions_for(["dog", "cat", "cup"])
    regions.update(visual_pos=[[-20, 10, 50, 120], [60, -5, 130, 40], [10, 10, 20, 20]], image_size=(100, 100))
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        outputs = processor(text=["a dog", "a cup"], regions=[regions, regions_for(["cup"])], return_tensors="np")
    np.testing.assert_allclose(outputs["visual_pos"][0, :2], [[0, 0.1, 0.5, 1.0], [0.6, 0, 1.0, 0.4]], rtol=1e-6)
    assert "2 boxes in 1 of 2 images reach past the image edge (image_size) and were clipped to it (regions[0]: 2)" \
        in caplog.text
    caplog.clear()
    regions.update(visual_pos=[[0, 0, 100.3, 100], [0, 0, 50, 50], [10, 10, 20, 20]])  # rounding: clipped silently
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        processor(text="a dog", regions=regions)
    regions.update(visual_pos=[[0, 0, 1.0004, 1], [0, 0, 0.5, 0.5], [0, 0, 1, 1]])
    del regions["image_size"]
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        outputs = processor(text="a dog", regions=regions, return_tensors="np")
    assert outputs["visual_pos"].max() == 1.0 and not caplog.text


def test_an_image_size_given_as_height_width_is_refused_when_only_the_swapped_size_fits(processor, caplog):
    """A 600 x 400 (width x height) photo whose size was given as (400, 600): boxes reach far past x = 400."""
    regions = regions_for(["cup", "dog"])
    regions.update(visual_pos=[[0, 0, 500, 300], [10, 10, 550, 380]], image_size=(400, 600))
    with pytest.raises(ValueError, match=r"regions\[0\]\['image_size'\] = \(400, 600\) looks like \(height, width\): "
                                         r"regions\[0\]\['visual_pos'\]\[1\] = \[10.0, 10.0, 550.0, 380.0\] reaches 38% past "
                                         r"the edge .* give image_size=\(600, 400\)"):
        processor(text="a cup", regions=regions)
    # the right size goes through; a box a little past the edge of a portrait image is clipped, not refused
    regions.update(image_size=(600, 400))
    processor(text="a cup", regions=regions)
    regions.update(visual_pos=[[0, 0, 300, 410], [10, 10, 200, 380]], image_size=(600, 400))
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        outputs = processor(text="a cup", regions=regions, return_tensors="np")
    assert outputs["visual_pos"][0, 0, 3] == 1.0 and "1 boxes in 1 of 1 images" in caplog.text


def test_a_caption_cut_by_truncation_warns_naming_the_pieces_and_anchors_lost(bert_dir, caplog):
    from transformers import BertTokenizer

    processor = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=12))
    long_caption = "one two three four five six seven eight nine ten a cup and a dog"
    regions = regions_for(["cup", "dog"])
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        outputs = processor(text=[long_caption, "a cup"], regions=[regions, regions], return_tensors="pt")
    assert outputs["input_ids"].shape[1] == 12 and anchored(processor, outputs, 0) == []
    assert ("1 of 2 captions are longer than 12 pieces (max_length, special tokens included) and were cut: 5 word "
            "pieces and 2 anchors") in caplog.text
    assert "text[0]: 5 pieces, 2 anchors" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        processor(text=long_caption, max_length=8)  # text only: the pieces are counted
        assert "were cut: 9 word pieces and 0 anchors" in caplog.text
        caplog.clear()
        processor(text=long_caption, max_length=64)
        processor(text=["a cup"] * 3, regions=[regions] * 3)
    assert not caplog.text


# --------------------------------------------------------------------------------------------------------------
# The default tokenizer, a tokenizer folder, folders that are not a processor (issue 17)
# --------------------------------------------------------------------------------------------------------------


def test_the_default_tokenizer_is_the_bundled_bert_base_uncased(tokenizer):
    import hashlib

    from modeling_cmal.processing_cmal import DEFAULT_VOCAB_FILE, default_tokenizer

    assert hashlib.md5(DEFAULT_VOCAB_FILE.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    processor = CmalProcessor()
    assert processor.tokenizer.is_fast and len(processor.tokenizer) == 30522
    assert processor.tokenizer.model_max_length == 512
    text = "A Man rides his BIKE past the coffee-shop, unaffable!"
    assert processor.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert "[UNK]" not in processor.tokenizer.tokenize(text)
    outputs = processor(text="a cup on a saucer", regions=regions_for(["cup", "saucer"]))
    assert [piece for piece, _, _ in anchored(processor, outputs)] == ["cup", "sauce", "##r"]  # every piece
    assert default_tokenizer(model_max_length=64).model_max_length == 64
    with pytest.raises(ValueError, match=r"model_max_length must be an int >= 3"):
        default_tokenizer(model_max_length=2)


def test_the_tokenizer_may_be_a_folder_path(bert_dir, tokenizer, tmp_path):
    for folder in (str(bert_dir), bert_dir):
        processor = CmalProcessor(tokenizer=folder)
        assert processor.tokenizer.is_fast and processor.tokenizer("a cup")["input_ids"] == \
            tokenizer("a cup")["input_ids"]
    with pytest.raises(ValueError, match=r"tokenizer '.*nowhere' is not a folder \(it does not exist\); expected a "
                                         r"folder written by CmalProcessor.save_pretrained"):
        CmalProcessor(tokenizer=str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer '.*' holds no tokenizer files \(none of tokenizer.json, vocab.txt"
                                         r".*it has \['config.json'\]\)"):
        CmalProcessor(tokenizer=tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer '.*config.json' is not a folder \(it is a file\)"):
        CmalProcessor(tokenizer=tmp_path / "config.json")


@pytest.mark.smoke
def test_from_pretrained_names_a_folder_that_is_missing_or_holds_no_tokenizer(tmp_path):
    from transformers import AutoProcessor

    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path '.*/no/such/folder' is not a folder \(it "
                                         r"does not exist\)"):
        CmalProcessor.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path '.*/no/such/folder' is not a folder"):
        CmalProcessor.from_pretrained(str(missing))
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path 'outputs/no-such-run' is not a local folder, "
                                         r"and as a Hub repository id it cannot be loaded"):
        CmalProcessor.from_pretrained("outputs/no-such-run")
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "config.json").write_text(json.dumps({"model_type": "cmal"}))
    (model_folder / "model.safetensors").write_bytes(b"")
    message = r"pretrained_model_name_or_path '.*model' holds no tokenizer files .*it has \['config.json', "
    with pytest.raises(ValueError, match=message):
        CmalProcessor.from_pretrained(model_folder)
    import modeling_cmal  # noqa: F401  (AutoProcessor knows cmal in-process)

    with pytest.raises(ValueError, match=message):
        AutoProcessor.from_pretrained(model_folder)


def test_mismatched_lists_and_bad_text_are_refused(processor):
    regions = regions_for(["cup"])
    with pytest.raises(ValueError, match="text has 2 captions but regions has 3 images"):
        processor(text=["a", "b"], regions=[regions] * 3)
    with pytest.raises(ValueError, match="text has 1 captions but regions has 2 images"):
        processor(text="a cup", regions=[regions] * 2)
    with pytest.raises(ValueError, match=r"text\[1\] must be a str, got None"):
        processor(text=["a", None], regions=[regions] * 2)
    with pytest.raises(ValueError, match=r"regions\[1\] must be a dict"):
        processor(text=["a", "b"], regions=[regions, None])
    with pytest.raises(ValueError, match="give text="):
        processor()
    with pytest.raises(ValueError, match="needs a region extractor"):
        processor(text="a cup", images=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="either regions= or images="):
        processor(text="a cup", regions=regions, images=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text="a cup", regions=regions, return_tensors="tf")
    with pytest.raises(ValueError, match="padding=False leaves captions of different lengths"):
        processor(text=["a cup", "a big cup"], regions=[regions] * 2, padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="max_length must be None or an int >= 2"):
        processor(text="a cup", regions=regions, max_length=1)
    unpadded = processor(text=["a cup", "a big cup"], regions=[regions] * 2, padding=False)
    assert [len(ids) for ids in unpadded["input_ids"]] == [4, 5]


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------


def test_return_tensors_variants_hold_the_same_values(processor):
    texts = ["a cup on a saucer", "a dog"]
    regions = [regions_for(["saucer", "cup"]), regions_for(["dog"])]
    as_torch = processor(text=texts, regions=regions, return_tensors="pt")
    as_numpy = processor(text=texts, regions=regions, return_tensors="np")
    as_lists = processor(text=texts, regions=regions)
    # Everything the model takes but anchor_actions, which the processor gives only when asked for (anchor_action=).
    expected = [name for name in processor.model_input_names if name != "anchor_actions"]
    assert list(as_torch) == list(as_numpy) == list(as_lists) == expected
    assert list(processor(text=texts, regions=regions, anchor_action="keep")) == processor.model_input_names
    for name, value in as_torch.items():
        assert isinstance(value, torch.Tensor)
        assert value.dtype == (torch.float32 if name in ("visual_feats", "visual_pos") else torch.long), name
        assert isinstance(as_numpy[name], np.ndarray)
        np.testing.assert_array_equal(as_numpy[name], value.numpy())
        if name in ("visual_feats", "visual_pos"):
            assert isinstance(as_lists[name], np.ndarray) and as_lists[name].dtype == np.float32
        else:
            assert isinstance(as_lists[name], list)
        np.testing.assert_array_equal(np.asarray(as_lists[name]), value.numpy())


def test_text_only_and_regions_only_calls(processor):
    text_only = processor(text=["a cup", "two dogs"], return_tensors="pt")
    assert list(text_only) == ["input_ids", "token_type_ids", "attention_mask"]
    regions_only = processor(regions=[regions_for(["cup"]), regions_for(["dog", "cat"])], return_tensors="pt")
    assert list(regions_only) == ["visual_feats", "visual_pos", "visual_attention_mask"]
    assert regions_only["visual_attention_mask"].tolist() == [[1, 0], [1, 1]]


def test_inputs_as_torch_and_lists(processor):
    regions = regions_for(["cup", "dog"])
    expected = processor(text="a dog", regions=regions, return_tensors="pt")
    as_torch = {"visual_feats": torch.from_numpy(regions["visual_feats"]).requires_grad_(),
                "visual_pos": torch.from_numpy(regions["visual_pos"]), "tags": regions["tags"]}
    as_lists = {"visual_feats": regions["visual_feats"].tolist(), "visual_pos": regions["visual_pos"].tolist(), "tags": regions["tags"]}
    for given_regions in (as_torch, as_lists):
        outputs = processor(text="a dog", regions=given_regions, return_tensors="pt")
        for name in expected:
            torch.testing.assert_close(outputs[name], expected[name])


def test_decode_passes_through_to_the_tokenizer(processor):
    outputs = processor(text=["a red saucer", "a dog"], return_tensors="pt")
    assert processor.batch_decode(outputs["input_ids"], skip_special_tokens=True) == ["a red saucer", "a dog"]
    assert processor.decode(outputs["input_ids"][0]).startswith("[CLS] a red saucer [SEP]")


def test_anchor_statistics_use_the_processors_lexicon(processor, seeds):
    coffee = photo_regions(seeds, "coffee")
    statistics = processor.anchor_statistics(seeds["captions"]["coffee"], [coffee, coffee])
    assert statistics.num_captions == 2 and statistics.num_anchors == 4
    assert ("saucer", 1) in statistics.top_unmatched_tags
    assert "anchors: 4" in statistics.format()
    small = CmalProcessor(tokenizer=processor.tokenizer, lexicon=ConceptLexicon(["spoon"]))
    assert small.anchor_statistics(seeds["captions"]["coffee"][:1], [coffee]).num_anchors == 1
    with pytest.raises(ValueError, match="regions_list"):
        processor.anchor_statistics(["a cup"], [coffee, coffee])


# --------------------------------------------------------------------------------------------------------------
# The region processor, one top-k selection, one vocabulary for region arrays (issue 18)
# --------------------------------------------------------------------------------------------------------------


def test_the_region_processor_selects_pads_and_says_which_regions_it_kept():
    region_processor = CmalRegionProcessor(max_regions=2)
    regions = [regions_for(["cup", "dog", "cat"], scores=[0.2, 0.9, 0.5]), regions_for(["cup"]),
               {"visual_feats": np.zeros((0, FEATURE_DIM)), "visual_pos": np.zeros((0, 4))}]
    outputs = region_processor(regions, return_tensors="pt")
    assert set(outputs) == {"visual_feats", "visual_pos", "visual_attention_mask", "region_indices"}
    assert outputs["visual_feats"].shape == (3, 2, FEATURE_DIM) and outputs["visual_feats"].dtype == torch.float32
    assert outputs["region_indices"].tolist() == [[1, 2], [0, -1], [-1, -1]]
    assert outputs["visual_attention_mask"].tolist() == [[1, 1], [1, 0], [0, 0]]
    torch.testing.assert_close(outputs["visual_feats"][0], torch.from_numpy(regions[0]["visual_feats"][[1, 2]]))
    assert region_processor(regions, padding="max_length")["visual_feats"].shape == (3, 2, FEATURE_DIM)
    assert isinstance(region_processor(regions[0])["visual_pos"], np.ndarray)
    with pytest.raises(ValueError, match=r"padding must be True, 'longest' or 'max_length'"):
        region_processor(regions, padding="do_not_pad")
    with pytest.raises(ValueError, match=r"max_regions must be an int >= 1, got 0"):
        CmalRegionProcessor(max_regions=0)
    with pytest.raises(ValueError, match=r"return_tensors must be one of"):
        region_processor(regions, return_tensors="tf")
    # the processor returns the same, and the kept indices on request
    processor = CmalProcessor(image_processor=region_processor)
    assert processor.max_regions == 2
    combined = processor(text=["a dog and a cat", "a cup", "nothing"], regions=regions, return_tensors="pt",
                         return_region_indices=True)
    for name in outputs:
        assert torch.equal(combined[name], outputs[name]), name
    assert "region_indices" not in processor(text="a cup", regions=regions[1])
    # the settings stay settable on the processor: it then holds a region processor with the new value
    processor.max_regions = 1
    assert processor.image_processor.max_regions == 1 and region_processor.max_regions == 2
    assert processor(text="a cat", regions=regions[0], return_region_indices=True)["region_indices"] == [[1]]
    processor.tag_vocabulary = ["cup", "dog", "cat"]
    assert processor.tag_vocabulary == ["cup", "dog", "cat"] and processor.max_regions == 1
    processor.tag_vocabulary = None
    assert processor.image_processor.tag_vocabulary is None
    with pytest.raises(ValueError, match=r"max_regions must be an int >= 1, got -1"):
        processor.max_regions = -1


def test_select_top_regions_is_the_one_selection():
    assert select_top_regions([0.1, 0.9, 0.5, 0.9], 2).tolist() == [1, 3]  # ties keep the earlier region
    assert select_top_regions([0.3, 0.9, 0.3, 0.1], 3).tolist() == [0, 1, 2]
    assert select_top_regions([0.1, 0.2], 5).tolist() == [0, 1]
    assert select_top_regions(None, 2, num_regions=4).tolist() == [0, 1]
    assert CmalRegionProcessor(max_regions=1).kept_regions([0.1, 0.7]).tolist() == [1]
    with pytest.raises(ValueError, match=r"num_regions must be an int >= 0 when scores is None"):
        select_top_regions(None, 2)
    with pytest.raises(ValueError, match=r"scores has shape \(2,\); expected \[3\]"):
        select_top_regions([0.1, 0.2], 2, num_regions=3)
    with pytest.raises(ValueError, match=r"max_regions must be an int >= 1, got True"):
        select_top_regions([0.1], True)
    # RefCOCO+ labels index the regions the processor kept: the fine-tuning script calls the same function
    sources = [path.read_text() for path in sorted((REPO_ROOT / "examples").rglob("*.py"))]
    refcoco = [source for source in sources if "class RefcocoTask(" in source]
    assert len(refcoco) == 1 and "select_top_regions(" in refcoco[0] and "argsort" not in refcoco[0]


def test_the_earlier_region_keys_still_work_with_a_deprecation_warning(processor):
    regions = regions_for(["cup", "dog"])
    old = {"features": regions["visual_feats"], "boxes": regions["visual_pos"], "tags": regions["tags"]}
    with pytest.warns(FutureWarning, match=r"the region keys 'features', 'boxes' are deprecated; use 'visual_feats', "
                                           r"'visual_pos'"):
        before = processor(text="a cup", regions=old, return_tensors="pt")
    after = processor(text="a cup", regions=regions, return_tensors="pt")
    for name in after:
        assert torch.equal(before[name], after[name]), name
    with pytest.raises(ValueError, match=r"regions\[0\] has both 'features' and 'visual_feats'; expected "
                                         r"'visual_feats' only"):
        processor(text="a cup", regions={**regions, "features": regions["visual_feats"]})
    with pytest.raises(ValueError, match=r"image_processor must be a CmalRegionProcessor, got str"):
        CmalProcessor(image_processor="regions")


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_save_and_load_round_trip(tokenizer, tmp_path):
    lexicon = ConceptLexicon({"cup": ["mug"], "saucer": [], "dog": ["puppy"]}, tag_aliases={"dog": ["hound"]})
    processor = CmalProcessor(tokenizer=tokenizer, lexicon=lexicon, tag_vocabulary=["cup", "saucer", "hound"],
                              max_regions=2, region_extractor=lambda images: [])
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", LEXICON_FILE, "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["image_processor_type"] == "CmalRegionProcessor"
    assert saved["image_processor"]["max_regions"] == 2
    assert saved["image_processor"]["tag_vocabulary"] == ["cup", "saucer", "hound"]
    assert not {"region_extractor", "lexicon", "_lexicon", "_region_extractor", "max_regions"} & set(saved)

    loaded = CmalProcessor.from_pretrained(tmp_path)
    assert loaded.lexicon == lexicon and loaded.max_regions == 2
    assert loaded.tag_vocabulary == ["cup", "saucer", "hound"] and loaded.region_extractor is None
    assert loaded.tokenizer.model_max_length == tokenizer.model_max_length
    texts = ["a mug next to a puppy", "a saucer"]
    regions = [regions_for([2, 0, 1], scores=[0.9, 0.8, 0.1]), regions_for(["saucer"])]
    before, after = processor(text=texts, regions=regions, return_tensors="pt"), \
        loaded(text=texts, regions=regions, return_tensors="pt")
    assert list(before) == list(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert anchored(loaded, after) == [("mug", 1, 0), ("puppy", 0, 2)]

    overridden = CmalProcessor.from_pretrained(tmp_path, max_regions=5)
    assert overridden.max_regions == 5 and overridden.lexicon == lexicon
    assert overridden.tag_vocabulary == ["cup", "saucer", "hound"]
    assert "max_regions" not in overridden.tokenizer.init_kwargs
    other = ConceptLexicon({"cup": []})
    assert CmalProcessor.from_pretrained(tmp_path, lexicon=other).lexicon == other
    # the region processor alone, as an image processor loads
    assert CmalRegionProcessor.from_pretrained(tmp_path).max_regions == 2


@pytest.mark.smoke
def test_a_folder_saved_before_the_region_processor_loads(tokenizer, tmp_path):
    """processor_config.json as CmalProcessor wrote it until 2026-12: settings at the top, lexicon_file named."""
    tokenizer.save_pretrained(tmp_path)
    lexicon = ConceptLexicon({"cup": ["mug"], "dog": []})
    lexicon.save(tmp_path / LEXICON_FILE)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "CmalProcessor", "max_regions": 3, "tag_vocabulary": ["cup", "dog"],
        "lexicon_file": LEXICON_FILE, "auto_map": {"AutoProcessor": "processing_cmal.CmalProcessor"}}))
    loaded = CmalProcessor.from_pretrained(tmp_path)
    assert loaded.max_regions == 3 and loaded.tag_vocabulary == ["cup", "dog"] and loaded.lexicon == lexicon
    assert anchored(loaded, loaded(text="a mug", regions=regions_for([0, 1]))) == [("mug", 0, 0)]
    assert CmalProcessor.from_pretrained(tmp_path, max_regions=7).max_regions == 7
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "CmalProcessor",
                                                                 "image_processor": "36"}))
    with pytest.raises(ValueError, match=r"the image_processor entry of processor_config.json is '36'; expected the "
                                         r"settings of a CmalRegionProcessor"):
        CmalProcessor.from_pretrained(tmp_path)


def test_folder_without_processor_files_gives_the_default_lexicon(bert_dir):
    processor = CmalProcessor.from_pretrained(bert_dir)
    assert processor.lexicon == ConceptLexicon.default() and processor.max_regions == 36


def test_auto_processor_finds_it_in_process_and_as_remote_code(tokenizer, tmp_path):
    from transformers import AutoProcessor

    from modeling_cmal import CmalConfig

    AutoProcessor.register(CmalConfig, CmalProcessor, exist_ok=True)
    previous = CmalProcessor._auto_class
    CmalProcessor.register_for_auto_class("AutoProcessor")
    try:
        processor = CmalProcessor(tokenizer=tokenizer, max_regions=4)
        folder = tmp_path / "saved"
        processor.save_pretrained(folder)
    finally:
        CmalProcessor._auto_class = previous
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_cmal.CmalProcessor"}
    assert {"processing_cmal.py", "anchoring.py", "region_extraction.py"} <= {p.name for p in folder.iterdir()}

    assert type(AutoProcessor.from_pretrained(folder)) is CmalProcessor
    regions = {"visual_feats": np.eye(3, 4).tolist(), "visual_pos": [[0, 0, 1, 1]] * 3, "tags": ["cup", "saucer", "dog"]}
    expected = processor(text="a cup on a saucer", regions=regions, return_tensors="np")
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoProcessor
        assert "modeling_cmal" not in sys.modules
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        outputs = processor(text="a cup on a saucer", regions={regions!r}, return_tensors="np")
        # The repository's collator takes the remote-code processor (as examples/quickstart.py does).
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from modeling_cmal.collator_cmal import CmalPretrainingCollator
        row = {{"text": "a cup on a saucer", "visual_feats": {regions["visual_feats"]!r},
               "visual_pos": {regions["visual_pos"]!r}, "tags": {regions["tags"]!r}}}
        batch = CmalPretrainingCollator(processor, seed=0)([row, row])
        print(json.dumps({{"module": type(processor).__module__, "max_regions": processor.max_regions,
                          "collated_anchor_rows": batch["anchor_pairs"].shape[1],
                          **{{name: value.tolist() for name, value in outputs.items()}}}}))
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
                   "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("module").startswith("transformers_modules")
    assert loaded.pop("max_regions") == 4
    assert loaded.pop("collated_anchor_rows") == 3  # cup, sauce, ##r
    assert loaded == {name: value.tolist() for name, value in expected.items()}


# --------------------------------------------------------------------------------------------------------------
# Property: anything → valid tensors or ValueError
# --------------------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-10, 10),
                    st.floats(-2, 2))
TAGS = st.one_of(st.sampled_from(["cup", "saucer", "dog", "tennis racket", "men", "", "  ", "traffic light"]),
                 st.text(max_size=12), st.integers(-2, 5), st.none(), st.floats(0, 3))


@st.composite
def image_regions(draw, feature_dim):
    count = draw(st.integers(0, 5))
    rows = draw(st.integers(0, 5)) if draw(st.booleans()) and draw(st.booleans()) else count
    dim = feature_dim if draw(st.integers(0, 9)) else draw(st.integers(0, 4))
    regions = {"visual_feats": draw(st.lists(st.lists(NUMBERS, min_size=dim, max_size=dim), min_size=count,
                                         max_size=count)) if count else np.zeros((0, dim))}
    if draw(st.booleans()):
        regions["image_size"] = draw(st.tuples(st.floats(-5, 700), st.floats(-5, 700)))
    regions["visual_pos"] = draw(st.lists(st.lists(st.one_of(NUMBERS, st.floats(0, 600)), min_size=4, max_size=4),
                                     min_size=rows, max_size=rows)) or np.zeros((0, 4))
    if draw(st.booleans()):
        regions["tags"] = draw(st.lists(TAGS, min_size=rows, max_size=rows))
    if draw(st.booleans()):
        regions["scores"] = draw(st.lists(NUMBERS, min_size=rows, max_size=rows))
    return regions


@st.composite
def processor_calls(draw):
    feature_dim = draw(st.integers(1, 4))
    size = draw(st.integers(1, 3))
    texts = draw(st.lists(st.text(max_size=40), min_size=size, max_size=size))
    regions = draw(st.lists(image_regions(feature_dim), min_size=1, max_size=3))
    return texts, regions, draw(st.sampled_from([None, "np", "pt"])), draw(st.integers(1, 70))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=processor_calls())
def test_any_input_gives_valid_tensors_or_value_error(tokenizer, call):
    texts, regions, return_tensors, max_length = call
    processor = CmalProcessor(tokenizer=tokenizer, tag_vocabulary=["cup", "dog", "men"], max_regions=3)
    try:
        outputs = processor(text=texts, regions=regions, return_tensors=return_tensors, max_length=max_length)
    except ValueError:
        return
    tensors = {name: torch.as_tensor(np.asarray(value, dtype=np.float32 if name in ("visual_feats", "visual_pos")
                                                  else np.int64)) for name, value in outputs.items()}
    batch_size, text_length = tensors["input_ids"].shape
    _, num_regions, _ = tensors["visual_feats"].shape
    assert batch_size == len(texts) == len(regions) and 1 <= num_regions <= 3 and text_length <= max_length
    assert torch.isfinite(tensors["visual_feats"]).all()
    assert ((tensors["visual_pos"] >= 0) & (tensors["visual_pos"] <= 1)).all()
    assert (tensors["visual_pos"][..., 2:] >= tensors["visual_pos"][..., :2]).all()
    assert set(tensors["visual_attention_mask"].unique().tolist()) <= {0, 1}
    pairs = tensors["anchor_pairs"].reshape(batch_size, -1, 2)  # lists of K = 0 rows lose their last axis
    assert pairs.shape[:2] == tensors["anchor_concept_ids"].shape and "anchor_actions" not in tensors
    real = pairs[..., 0] >= 0
    assert ((pairs[..., 0] < text_length) & (pairs[..., 1] >= 0) & (pairs[..., 1] < num_regions))[real].all()
    assert (tensors["anchor_concept_ids"][real] >= 0).all() and (tensors["anchor_concept_ids"][~real] == -1).all()
    batch_index = torch.arange(batch_size).unsqueeze(1).expand_as(real)
    assert (tensors["visual_attention_mask"][batch_index[real], pairs[..., 1][real]] == 1).all()
    assert (tensors["attention_mask"][batch_index[real], pairs[..., 0][real]] == 1).all()
