"""The synthetic scene world: deterministic, the real builders' schema, and ground truth correct by construction.

Answers are checked against an independent reading of the scene graph (and, for colours and boxes, of the rendered
pixels), never against the generator's own bookkeeping. Tasks are read through `cmal_processing.corpus.load_corpus`
(each row joined with its scene's regions); every split stores each of its scenes once, in its image table.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from datasets import Dataset, load_from_disk

from cmal_processing import schema
from cmal_processing.corpus import IMAGE_TABLE, corpus_features, image_table, load_corpus
from cmal_processing.synthetic import (
    COLOURS,
    QUESTION_TYPES,
    SHAPE_WORDS,
    SHAPES,
    box_iou,
    build_synthetic_corpus,
    generate_scene,
    region_features_from_pixels,
    render_scene,
    scene_regions,
    vqa_questions,
)

TASKS = ("pretrain", "vqa", "nlvr2", "snli_ve", "refcoco")
NUM_VALIDATION_SCENES = 6  # validation_fraction 0.1 of the 60 scenes
NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
COLOUR_SYNONYMS = {"crimson": "red", "violet": "purple", "golden": "yellow", **{name: name for name in COLOURS}}
SHAPE_SYNONYMS = {word: shape for shape in SHAPES for word in SHAPE_WORDS.get(shape, (shape,))}
SHAPE_SYNONYMS.update({word + ("es" if word.endswith(("s", "x")) else "s"): shape for word, shape in
                       list(SHAPE_SYNONYMS.items())})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_world") / "corpus"
    build_synthetic_corpus(root, num_scenes=60, seed=3, feature_dim=32)
    return root


@pytest.fixture(scope="module")
def scenes():
    """The scenes behind `corpus`, regenerated independently from the same seed (the build draws a scene and then
    its regions, in that order, from one generator)."""
    rng = np.random.default_rng(3)
    result = {}
    for index in range(60):
        scene = generate_scene(rng)
        image = render_scene(scene)
        result[f"synthetic-3-{index:06d}"] = (scene, image, scene_regions(scene, image, 32, rng))
    return result


def _shape(word):
    return SHAPE_SYNONYMS[word]


def _count(scene, shape=None, colour=None):
    return sum((shape is None or o["shape"] == shape) and (colour is None or o["colour"] == colour)
               for o in scene["objects"])


def _pixel_colour(image, obj):
    """The colour name nearest to the most frequent pixel value inside the object's box."""
    x1, y1, x2, y2 = obj["box"]
    crop = image[y1:y2, x1:x2].reshape(-1, 3)
    values, counts = np.unique(crop, axis=0, return_counts=True)
    top = values[counts.argmax()].astype(float)
    return min(COLOURS, key=lambda name: np.sum((np.asarray(COLOURS[name]) - top) ** 2))


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path, corpus):
    build_synthetic_corpus(tmp_path / "again", num_scenes=60, seed=3, feature_dim=32)
    build_synthetic_corpus(tmp_path / "other", num_scenes=60, seed=4, feature_dim=32)
    for task in TASKS:
        first, again = load_corpus(corpus / task), load_corpus(tmp_path / "again" / task)
        for split in ("train", "validation"):
            assert first[split].with_format(None).to_dict() == again[split].with_format(None).to_dict(), (task, split)
            assert image_table(first[split]).to_dict() == image_table(again[split]).to_dict(), (task, split)
    assert (list(load_corpus(corpus / "pretrain")["train"]["text"])
            != list(load_corpus(tmp_path / "other" / "pretrain")["train"]["text"]))
    assert (image_table(load_corpus(corpus / "pretrain")["train"])["visual_feats"]
            != image_table(load_corpus(tmp_path / "other" / "pretrain")["train"])["visual_feats"])
    assert (corpus / "vqa" / schema.ANSWER_VOCAB_FILE).read_text() == \
        (tmp_path / "again" / "vqa" / schema.ANSWER_VOCAB_FILE).read_text()


def test_columns_are_the_real_builders_schema(corpus):
    expected = {"pretrain": schema.pretrain_features, "vqa": schema.vqa_features, "nlvr2": schema.nlvr2_features,
                "snli_ve": schema.snli_ve_features, "refcoco": schema.refcoco_features}
    config = json.loads((corpus / "synthetic_config.json").read_text())
    assert config["feature_dim"] == 32 and config["num_scenes"] == 60 and config["questions_per_scene"] == 8
    assert config["validation_fraction"] == 0.1  # the builder's default, as NUM_VALIDATION_SCENES says
    for task, features in expected.items():
        dataset = load_corpus(corpus / task)
        assert set(dataset) == {"train", "validation"}
        for name, split in dataset.items():
            assert corpus_features(split) == features(32), task
            assert split.num_rows == config["rows"][task][name] > 0


def test_rows_are_the_regenerated_scenes(corpus, scenes):
    rows = load_corpus(corpus / "pretrain")["train"]
    for row in rows:
        scene, _, regions = scenes[str(row["image_id"])]
        np.testing.assert_allclose(row["visual_feats"], regions["visual_feats"].astype(np.float16))
        width, height = scene["image_size"]
        np.testing.assert_allclose(row["visual_pos"] * [width, height, width, height], regions["visual_pos"], atol=1e-4)
        assert list(row["tags"]) == regions["tags"]
        assert str(row["text"]) in scene["captions"]


def test_boxes_are_exact_and_tags_are_shape_names(scenes):
    for scene, image, regions in scenes.values():
        background = np.all(np.abs(image.astype(int) - 128) <= 40, axis=-1)
        for obj in scene["objects"]:
            x1, y1, x2, y2 = obj["box"]
            inside = ~background[y1:y2, x1:x2]
            # the drawn pixels touch all four sides of the box: the box is tight
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert _pixel_colour(image, obj) == obj["colour"]
        assert set(regions["tags"]) <= set(SHAPES)
        assert sorted(set(regions["tags"])) == sorted({o["shape"] for o in scene["objects"]})
        # every object has a region at IoU >= 0.5 (what a good detector gives)
        for obj in scene["objects"]:
            assert box_iou(regions["visual_pos"], obj["box"]).max() >= 0.5


def test_region_features_come_from_the_pixels():
    rng = np.random.default_rng(0)
    scene = generate_scene(rng, min_objects=2, max_objects=2)
    image = render_scene(scene)
    boxes = np.asarray([o["box"] for o in scene["objects"]], dtype=np.float32)
    features = region_features_from_pixels(image, boxes, feature_dim=48)
    assert features.shape == (2, 48) and features.dtype == np.float32 and np.isfinite(features).all()
    np.testing.assert_array_equal(features, region_features_from_pixels(image.copy(), boxes, feature_dim=48))
    recoloured = dict(scene, objects=[dict(scene["objects"][0], colour=next(
        c for c in COLOURS if c != scene["objects"][0]["colour"])), scene["objects"][1]])
    changed = region_features_from_pixels(render_scene(recoloured), boxes, feature_dim=48)
    assert not np.allclose(changed[0], features[0])  # a new colour, new features: colour is in the features
    np.testing.assert_allclose(changed[1], features[1], atol=1e-5)  # the untouched object keeps its features
    with pytest.raises(ValueError, match="pixels"):
        region_features_from_pixels(image[..., 0], boxes)
    with pytest.raises(ValueError, match="feature_dim"):
        region_features_from_pixels(image, boxes, feature_dim=0)


def _vqa_truth(text, scene, image):
    """(question type, answer) of a question, read from its words and the scene alone: the type the words ask for,
    and the answer of the scene graph (colours from the rendered pixels). Raises when the question has no answer
    of its type in the scene (a colour question about a shape that does not occur exactly once, ...)."""
    if match := re.fullmatch(r"what color is the (\w+)\?", text):
        (obj,) = [o for o in scene["objects"] if o["shape"] == _shape(match[1])]
        return "what color is the", _pixel_colour(image, obj)
    if match := re.fullmatch(r"what shape is the (\w+) (?:object|thing|shape)\?", text):
        (obj,) = [o for o in scene["objects"] if o["colour"] == COLOUR_SYNONYMS[match[1]]]
        return "what shape is the", obj["shape"]
    if match := re.fullmatch(r"how many (\w+) are there\?", text):
        return "how many", str(_count(scene, _shape(match[1])))
    if match := re.fullmatch(r"is there a (\w+) (\w+)\?", text):
        return "is there a", "yes" if _count(scene, _shape(match[2]), match[1]) else "no"
    raise AssertionError(f"unexpected question {text!r}")


def _vqa_rows(corpus, split):
    answers = json.loads((corpus / "vqa" / schema.ANSWER_VOCAB_FILE).read_text())
    return [dict(row, answer=answers[row["answer_ids"][0]]) for row in load_corpus(corpus / "vqa")[split]]


def test_vqa_answers_are_correct_and_of_the_type_asked(corpus, scenes):
    """No fall-through: every question's words, its `question_type` and its answer agree, checked against an
    independent reading of the scene (the colour of an object from its pixels)."""
    kinds = set()
    for split in ("train", "validation"):
        for row in _vqa_rows(corpus, split):
            scene, image, _ = scenes[row["image_id"]]
            assert list(row["answer_scores"]) == [1.0]
            kind, answer = _vqa_truth(row["text"], scene, image)
            assert row["question_type"] == kind, row["text"]
            assert row["answer"] == answer, row["text"]
            if kind == "how many":
                assert answer in {"0", "1", "2", "3", "4"}
            kinds.add(kind)
    assert kinds == set(QUESTION_TYPES)


def test_vqa_yes_no_is_exactly_balanced_in_every_split(corpus):
    for split in ("train", "validation"):
        rows = [row for row in _vqa_rows(corpus, split) if row["question_type"] == "is there a"]
        answers = [row["answer"] for row in rows]
        assert rows and answers.count("yes") == answers.count("no") == len(rows) // 2, split
        per_scene = {}
        for row in rows:  # in pairs: as many yes as no in every scene
            per_scene.setdefault(row["image_id"], []).append(row["answer"])
        assert all(pair.count("yes") == pair.count("no") > 0 for pair in per_scene.values()), split
        # the order is seeded, not fixed: which comes first does not give the answer away
        assert {pair[0] for pair in per_scene.values()} == {"yes", "no"}, split


def test_vqa_questions_per_scene(corpus, scenes):
    """Eight distinct questions per scene, two of each type where the scene supports it; a type the scene cannot
    support is not asked and its share goes to the other types. Question ids are `{scene_id}-q{number}`."""
    by_scene = {}
    for split in ("train", "validation"):
        for row in _vqa_rows(corpus, split):
            by_scene.setdefault(row["image_id"], []).append(row)
    assert set(by_scene) == set(scenes)
    for scene_id, rows in by_scene.items():
        scene = scenes[scene_id][0]
        assert len(rows) == 8, scene_id
        assert [row["question_id"] for row in rows] == [f"{scene_id}-q{number}" for number in range(8)]
        assert len({row["text"] for row in rows}) == 8, [row["text"] for row in rows]  # distinct questions
        types = [row["question_type"] for row in rows]
        once_shapes = sum(_count(scene, shape=o["shape"]) == 1 for o in scene["objects"])
        once_colours = sum(_count(scene, colour=o["colour"]) == 1 for o in scene["objects"])
        assert types.count("what color is the") <= once_shapes and types.count("what shape is the") <= once_colours
        assert types.count("is there a") % 2 == 0 and types.count("is there a") >= 2
        if once_shapes >= 2 and once_colours >= 2:
            assert sorted(types) == sorted(QUESTION_TYPES * 2), (scene_id, types)
        else:  # fewer of a type the scene cannot support, its share given to the others: never fewer questions
            assert types.count("what color is the") >= min(2, once_shapes)
            assert types.count("what shape is the") >= min(2, once_colours)
            assert types.count("how many") >= 2


def test_vqa_questions_never_fall_through():
    """A type the scene cannot support is not asked; asking for more questions than a scene holds gives the
    distinct ones it has, and `num_questions` sets how many a scene gets."""
    rng = np.random.default_rng(11)
    seen_impossible = {"what color is the": 0, "what shape is the": 0}
    for _ in range(300):
        scene = generate_scene(rng)
        image = render_scene(scene)
        once_shapes = sum(_count(scene, shape=o["shape"]) == 1 for o in scene["objects"])
        once_colours = sum(_count(scene, colour=o["colour"]) == 1 for o in scene["objects"])
        seen_impossible["what color is the"] += once_shapes == 0
        seen_impossible["what shape is the"] += once_colours == 0
        supported = once_shapes + once_colours + len(SHAPES) + 2 * len(scene["objects"])
        for num_questions in (1, 3, 8, 13):
            questions = vqa_questions(scene, rng, num_questions)
            if num_questions <= 8:  # every scene supports at least 10 (8 counts and an existence pair)
                assert len(questions) == num_questions
            else:  # all it supports, or one short where only half an existence pair would be left
                assert min(num_questions, supported) - 1 <= len(questions) <= min(num_questions, supported)
            for question in questions:
                assert _vqa_truth(question["text"], scene, image) == (question["question_type"], question["answer"])
            types = [question["question_type"] for question in questions]
            if once_shapes == 0:
                assert "what color is the" not in types
            if once_colours == 0:
                assert "what shape is the" not in types
            existence = [question["answer"] for question in questions if question["question_type"] == "is there a"]
            assert existence.count("yes") == existence.count("no")
        everything = vqa_questions(scene, rng, 100)  # all the distinct questions the scene supports
        assert len({question["text"] for question in everything}) == len(everything)
        assert len(everything) == supported
    assert all(seen_impossible.values()), seen_impossible  # the impossible cases did occur
    with pytest.raises(ValueError, match="num_questions"):
        vqa_questions(scene, rng, 0)


def test_vqa_questions_are_deterministic_for_a_seed():
    scene = generate_scene(np.random.default_rng(7), min_objects=3, max_objects=4)
    first = vqa_questions(scene, np.random.default_rng(1))
    assert first == vqa_questions(scene, np.random.default_rng(1))
    assert len(first) == 8
    assert any(vqa_questions(scene, np.random.default_rng(seed)) != first for seed in range(2, 6))


def _nlvr2_truth(text, left, right):
    scenes = {"left": left, "right": right}
    if match := re.fullmatch(r"there are more (\w+) in the (left|right) image than in the (left|right) image", text):
        return _count(scenes[match[2]], _shape(match[1])) > _count(scenes[match[3]], _shape(match[1]))
    if match := re.fullmatch(r"the (left|right) image contains at least one (\w+)", text):
        return _count(scenes[match[1]], _shape(match[2])) > 0
    if match := re.fullmatch(r"both images contain a (\w+)", text):
        return all(_count(scene, _shape(match[1])) for scene in scenes.values())
    if match := re.fullmatch(r"exactly one image contains a (\w+)", text):
        return sum(bool(_count(scene, _shape(match[1]))) for scene in scenes.values()) == 1
    if match := re.fullmatch(r"the (left|right) image shows (\w+) (\w+)", text):
        return _count(scenes[match[1]], _shape(match[3])) == NUMBERS[match[2]]
    raise AssertionError(f"unexpected statement {text!r}")


def test_nlvr2_labels_are_correct_and_exactly_balanced(corpus, scenes):
    """Every scene is the left image of one pair with one true and one false statement: each split is exactly
    balanced."""
    for split in ("train", "validation"):
        labels, pairs = [], {}
        for row in load_corpus(corpus / "nlvr2")[split]:
            truth = _nlvr2_truth(row["text"], scenes[row["image_id_0"]][0], scenes[row["image_id_1"]][0])
            assert row["label"] == int(truth), row["text"]
            assert row["identifier"].endswith(f"-{int(truth)}")  # the statement has the truth it was drawn for
            labels.append(row["label"])
            pairs.setdefault((row["image_id_0"], row["image_id_1"]), []).append(row["label"])
        assert labels.count(0) == labels.count(1) == len(labels) // 2 > 0, split
        assert all(sorted(pair) == [0, 1] for pair in pairs.values()), split


def test_snli_ve_has_one_hypothesis_of_each_label_per_scene(corpus, scenes):
    """Exactly balanced in every split: each scene has one entailed, one neutral and one contradicted hypothesis."""
    covered = set()
    for split in ("train", "validation"):
        per_scene = {}
        for row in load_corpus(corpus / "snli_ve")[split]:
            per_scene.setdefault(row["image_id"], []).append(row["label"])
        assert per_scene and all(sorted(labels) == list(range(len(schema.SNLI_VE_LABELS)))
                                 for labels in per_scene.values()), split
        covered |= set(per_scene)
    assert covered == set(scenes)


def test_snli_ve_hypotheses_match_their_labels(corpus, scenes):
    families = {}
    for row in load_corpus(corpus / "snli_ve")["train"]:
        scene = scenes[row["image_id"]][0]
        assert row["premise"] in scene["captions"]
        text, label = row["text"], schema.SNLI_VE_LABELS[row["label"]]
        if match := re.fullmatch(r"the picture contains (\w+) shapes?", text):
            assert (NUMBERS[match[1]] == len(scene["objects"])) == (label == "entailment")
            family = "fact"
        elif match := re.fullmatch(r"there is an? (?:(?:small|little|tiny|large|big) )?(\w+) (\w+)", text):
            present = _count(scene, _shape(match[2]), COLOUR_SYNONYMS[match[1]]) > 0
            assert present == (label == "entailment"), text
            family = "fact"
        elif match := re.fullmatch(r"an? (\w+) (\w+) is (on the left|on the right|at the top|at the bottom)", text):
            (obj,) = [o for o in scene["objects"]
                      if o["shape"] == _shape(match[2]) and o["colour"] == COLOUR_SYNONYMS[match[1]]]
            assert (obj["position"] == match[3]) == (label == "entailment"), text
            family = "fact"
        elif match := re.fullmatch(r"(?:the|someone is about to pick up the) (\w+) (\w+)(?: is made of \w+"
                                   r"| was drawn by .+)?", text):
            # undecidable about an object that is there, false about one that is not
            present = _count(scene, _shape(match[2]), COLOUR_SYNONYMS[match[1]]) > 0
            assert label == ("neutral" if present else "contradiction"), text
            family = "claim"
        else:
            raise AssertionError(f"unexpected hypothesis {text!r}")
        families.setdefault(family, set()).add(label)
    # each family of sentences carries two labels: the words alone do not decide
    assert families == {"fact": {"entailment", "contradiction"}, "claim": {"neutral", "contradiction"}}


def test_referring_expressions_pick_one_object_and_its_best_region(corpus, scenes):
    for row in load_corpus(corpus / "refcoco")["train"]:
        scene, _, regions = scenes[str(row["image_id"])]
        width, height = scene["image_size"]
        target = np.asarray(row["target_box"]) * [width, height, width, height]
        words = str(row["text"]).split()[1:]
        candidates = [o for o in scene["objects"]
                      if all(w in ("one", "on", "the", "at", "left", "right", "top", "bottom")
                             or COLOUR_SYNONYMS.get(w) == o["colour"] or SHAPE_SYNONYMS.get(w) == o["shape"]
                             for w in words)
                      and (" ".join(words[-2:]) not in ("the left", "the right", "the top", "the bottom")
                           or o["position"].endswith(" ".join(words[-2:])))]
        assert len(candidates) == 1, (row["text"], scene["objects"])
        np.testing.assert_allclose(target, candidates[0]["box"], atol=1e-4)
        np.testing.assert_allclose(row["region_ious"], box_iou(regions["visual_pos"], target), atol=1e-5)
        assert row["label"] == int(np.argmax(row["region_ious"])) and row["region_ious"][row["label"]] >= 0.5


def test_captions_anchor_to_regions(corpus, tokenizer):
    from modeling_cmal.processing_cmal import CmalProcessor

    rows = load_corpus(corpus / "pretrain")["validation"][:]  # one joined batch of every row
    processor = CmalProcessor(tokenizer=tokenizer)
    batch = processor(text=[str(t) for t in rows["text"]],
                      regions=[{"visual_feats": f.astype(np.float32), "visual_pos": p, "tags": [str(t) for t in tags]}
                               for f, p, tags in zip(rows["visual_feats"], rows["visual_pos"], rows["tags"])],
                      return_tensors="pt")
    anchored = (batch["anchor_pairs"][..., 0] >= 0).any(-1)
    assert anchored.all(), "every synthetic caption names at least one of its shapes"


def test_invalid_arguments_and_a_foreign_folder(tmp_path):
    for kwargs, name in (({"num_scenes": 0}, "num_scenes"), ({"num_scenes": 3}, "num_scenes"),
                         ({"feature_dim": -1}, "feature_dim"), ({"seed": -2}, "seed"),
                         ({"validation_fraction": 1.5}, "validation_fraction"),
                         ({"questions_per_scene": 0}, "questions_per_scene")):
        with pytest.raises(ValueError, match=name):
            build_synthetic_corpus(tmp_path / "x", **{"num_scenes": 20, **kwargs})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a synthetic corpus"):
        build_synthetic_corpus(foreign, num_scenes=20)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="rng"):
        generate_scene(0)


def test_command_line_writes_the_corpus_and_a_summary(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cmal_processing.synthetic", "--output", str(tmp_path / "c"),
                             "--num-scenes", "30", "--seed", "1", "--feature-dim", "16"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "vqa" in result.stdout and "anchors" in result.stdout
    assert json.loads((tmp_path / "c" / "synthetic_config.json").read_text())["feature_dim"] == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    bad = subprocess.run([sys.executable, "-m", "cmal_processing.synthetic", "--output", str(tmp_path / "d"),
                          "--num-scenes", "0"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "--num-scenes" in bad.stderr


def test_scene_regions_go_straight_into_the_processor(tokenizer):
    from modeling_cmal.processing_cmal import CmalProcessor

    scene = generate_scene(np.random.default_rng(5))
    regions = scene_regions(scene, render_scene(scene), feature_dim=16)
    batch = CmalProcessor(tokenizer=tokenizer)(text=scene["captions"][0], regions=regions, return_tensors="pt")
    assert batch["visual_feats"].shape == (1, len(regions["tags"]), 16)
    assert (batch["anchor_pairs"][..., 0] >= 0).any()


def test_streamed_pretraining_corpus_stores_each_scene_once(tmp_path, bert_dir):
    from transformers import BertTokenizer

    from modeling_cmal.processing_cmal import CmalProcessor
    from cmal_processing.shards import open_streaming_corpus, read_corpus_info

    processor = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=40))
    summary = build_synthetic_corpus(tmp_path / "world", num_scenes=24, seed=2, feature_dim=32, processor=processor)
    train = load_corpus(tmp_path / "world" / "pretrain")["train"]
    info = read_corpus_info(tmp_path / "world" / "pretrain_streamed" / "train")
    assert info["captions"] == summary["rows"]["pretrain_streamed"]["train"] == len(train)
    assert info["images"] == len(set(train["image_id"])) == image_table(train).num_rows
    rows = list(open_streaming_corpus(tmp_path / "world" / "pretrain_streamed" / "train", processor=processor))
    assert sorted(row["text"] for row in rows) == sorted(train["text"])


def _image_ids(task_table):
    """Every image id the rows of a task table refer to (both slots for NLVR2)."""
    return [image_id for name in task_table.column_names if name.startswith("image_id")
            for image_id in task_table[name]]


def test_every_task_stores_each_scene_of_a_split_once(corpus, scenes):
    """Each task's split folder holds an image table with one row per scene of the split (NLVR2 too, where every
    scene is in two pairs), the task table holds no region columns, and every row joins to its scenes' regions."""
    split_scenes = {split: {str(image_id) for image_id in load_corpus(corpus / "pretrain")[split]["image_id"]}
                    for split in ("train", "validation")}
    assert split_scenes["train"] | split_scenes["validation"] == set(scenes)
    assert not split_scenes["train"] & split_scenes["validation"]
    assert len(split_scenes["validation"]) == NUM_VALIDATION_SCENES
    for task in TASKS:
        for split, expected in split_scenes.items():
            folder = corpus / task / split
            images = load_from_disk(str(folder / IMAGE_TABLE))
            assert images.column_names == list(schema.STORED_REGION_COLUMNS), (task, split)
            assert images.features == schema.image_table_features(), (task, split)
            assert images.num_rows == len(set(images["image_id"])) == len(expected), (task, split)
            assert set(images["image_id"]) == expected, (task, split)
            stored = load_from_disk(str(folder))
            assert not {"visual_feats", "visual_feats_0", "visual_pos", "tags", "tags_1"} & set(stored.column_names)
            assert set(_image_ids(stored)) == expected, (task, split)
            rows = load_corpus(corpus / task)[split]
            assert image_table(rows).num_rows == len(expected)
            batch = rows[:]
            suffixes = ("_0", "_1") if task == "nlvr2" else ("",)
            for suffix in suffixes:
                assert len(batch[f"image_id{suffix}"]) == stored.num_rows > 0
                for image_id, feats, pos, tags, width in zip(*(batch[f"{name}{suffix}"] for name in (
                        "image_id", "visual_feats", "visual_pos", "tags", "image_width")), strict=True):
                    scene, _, regions = scenes[str(image_id)]
                    np.testing.assert_array_equal(feats, regions["visual_feats"].astype(np.float16), err_msg=task)
                    scale = scene["image_size"][0], scene["image_size"][1]
                    np.testing.assert_allclose(pos * [*scale, *scale], regions["visual_pos"], atol=1e-4)
                    assert list(tags) == regions["tags"] and width == scene["image_size"][0]
    nlvr2 = load_corpus(corpus / "nlvr2")["train"].with_format(None)
    assert set(nlvr2["image_id_0"]) == set(nlvr2["image_id_1"]) == split_scenes["train"]  # each scene in two pairs


def _folder_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_regions_stored_once_take_a_fraction_of_a_single_table(corpus, tmp_path):
    """Eight questions per scene: storing the scene's regions once takes well under half of the bytes that one
    table with the regions in every row takes."""
    rows = load_corpus(corpus / "vqa")["train"]
    batch = rows[:]
    python_rows = [{name: (values[i].tolist() if isinstance(values[i], (np.ndarray, np.generic)) else values[i])
                    for name, values in batch.items()} for i in range(rows.num_rows)]
    single = tmp_path / "single"
    Dataset.from_list(python_rows, features=schema.vqa_features(32)).save_to_disk(str(single))
    assert load_from_disk(str(single)).num_rows == rows.num_rows
    assert _folder_bytes(corpus / "vqa" / "train") / _folder_bytes(single) < 0.5


def test_pre_training_scenes_add_captions_only_and_leave_the_tasks_alone(tmp_path):
    from cmal_processing.corpus import load_corpus

    plain = build_synthetic_corpus(tmp_path / "plain", num_scenes=20, seed=3)
    more = build_synthetic_corpus(tmp_path / "more", num_scenes=20, seed=3, pretrain_scenes=15)
    assert more["rows"]["pretrain"]["train"] == plain["rows"]["pretrain"]["train"] + 30
    assert more["rows"]["pretrain"]["validation"] == plain["rows"]["pretrain"]["validation"]
    for task in ("vqa", "nlvr2", "snli_ve", "refcoco"):
        assert more["rows"][task] == plain["rows"][task], task
        for split in ("train", "validation"):
            assert load_corpus(tmp_path / "more" / task)[split].with_format(None)["text"] == \
                load_corpus(tmp_path / "plain" / task)[split].with_format(None)["text"], (task, split)
    pretrain = load_corpus(tmp_path / "more" / "pretrain")
    validation_images = set(pretrain["validation"].with_format(None)["image_id"])
    train_images = set(pretrain["train"].with_format(None)["image_id"])
    assert not validation_images & train_images
    assert sum(image.startswith("synthetic-3-pretrain-") for image in train_images) == 15
    with pytest.raises(ValueError, match=r"pretrain_scenes must be an int >= 0, got -1"):
        build_synthetic_corpus(tmp_path / "bad", num_scenes=20, seed=3, pretrain_scenes=-1)


def _named_objects(text):
    """The (shape, colour) pairs a listing caption names, read from its words (sizes and positions skipped)."""
    words = re.sub(r" (on a grey background|in a picture)$", "", text).replace(",", " ").split()
    return {(_shape(word), COLOUR_SYNONYMS[previous]) for previous, word in zip(words, words[1:])
            if word in SHAPE_SYNONYMS and previous in COLOUR_SYNONYMS}


def test_partial_captions_name_a_true_proper_subset_and_cost_nothing_when_off(monkeypatch):
    from cmal_processing import synthetic
    from cmal_processing.synthetic import CAPTION_TEMPLATES, PARTIAL_CAPTION_TEMPLATES, caption

    # Off (the default): not a single random number more, so every seed's world is the one it always was: the
    # scenes (captions included) and the generator's state afterwards equal those of the captioner without the
    # option, which drew nothing but the template's own words.
    off = np.random.default_rng(11)
    scenes_off = [generate_scene(off, partial_caption_probability=0.0) for _ in range(20)]
    monkeypatch.setattr(synthetic, "caption", lambda scene, rng, template, *_: CAPTION_TEMPLATES[template](scene, rng))
    before = np.random.default_rng(11)
    assert [generate_scene(before) for _ in range(20)] == scenes_off
    assert before.integers(2**62) == off.integers(2**62)
    monkeypatch.undo()
    on = np.random.default_rng(11)
    assert [generate_scene(on, partial_caption_probability=1.0) for _ in range(20)] != scenes_off  # the check bites
    rng = np.random.default_rng(5)
    scene = generate_scene(rng, min_objects=4, max_objects=4)
    everything = {(o["shape"], o["colour"]) for o in scene["objects"]}
    for template in PARTIAL_CAPTION_TEMPLATES:
        index = CAPTION_TEMPLATES.index(template)
        assert _named_objects(caption(scene, rng, index)) == everything
        named = [_named_objects(caption(scene, rng, index, partial_caption_probability=1.0)) for _ in range(30)]
        assert all(names and names < everything for names in named), named  # true of the scene, never all of it
        assert len({frozenset(names) for names in named}) > 3  # random subsets, not one fixed choice
    count_template = next(index for index, template in enumerate(CAPTION_TEMPLATES)
                          if template not in PARTIAL_CAPTION_TEMPLATES and "shapes :" in template(scene, rng))
    assert _named_objects(caption(scene, rng, count_template, partial_caption_probability=1.0)) == everything
    single = generate_scene(rng, min_objects=1, max_objects=1)  # one object: nothing to leave out
    assert len(_named_objects(caption(single, rng, 0, partial_caption_probability=1.0))) == 1
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match=rf"partial_caption_probability must be a probability in \[0, 1\], "
                                             rf"got {re.escape(repr(bad))}"):
            caption(scene, rng, 0, partial_caption_probability=bad)


def test_partial_captions_change_only_the_pre_training_scenes(tmp_path):
    plain = build_synthetic_corpus(tmp_path / "plain", num_scenes=20, seed=3, pretrain_scenes=40)
    partial = build_synthetic_corpus(tmp_path / "partial", num_scenes=20, seed=3, pretrain_scenes=40,
                                     partial_caption_probability=1.0)
    assert partial["partial_caption_probability"] == 1.0 and plain["partial_caption_probability"] == 0.0
    assert partial["rows"] == plain["rows"]
    for task in ("vqa", "nlvr2", "snli_ve", "refcoco"):
        for split in ("train", "validation"):
            assert load_corpus(tmp_path / "partial" / task)[split].with_format(None)["text"] == \
                load_corpus(tmp_path / "plain" / task)[split].with_format(None)["text"], (task, split)
    texts = {}
    for name in ("plain", "partial"):
        rows = load_corpus(tmp_path / name / "pretrain")
        assert rows["validation"].with_format(None)["text"] == \
            load_corpus(tmp_path / "plain" / "pretrain")["validation"].with_format(None)["text"]
        train = rows["train"].with_format(None)
        texts[name] = {(image, text) for image, text in zip(train["image_id"], train["text"])}
    # The task scenes' captions are the same; the caption-only scenes' differ.
    assert {row for row in texts["plain"] if "pretrain" not in row[0]} == \
        {row for row in texts["partial"] if "pretrain" not in row[0]}
    assert {row for row in texts["plain"] if "pretrain" in row[0]} != \
        {row for row in texts["partial"] if "pretrain" in row[0]}
    with pytest.raises(ValueError, match=r"partial_caption_probability must be a probability in \[0, 1\], got 2"):
        build_synthetic_corpus(tmp_path / "bad", num_scenes=20, seed=3, partial_caption_probability=2)
    assert not (tmp_path / "bad").exists()


def test_the_worlds_own_vocabulary_tokenizes_every_text_as_bert_base_does(tmp_path):
    from cmal_processing.synthetic import corpus_texts
    from cmal_processing.vocabulary import subset_tokenizer
    from transformers import AutoTokenizer

    from modeling_cmal.processing_cmal import default_tokenizer

    build_synthetic_corpus(tmp_path / "world", num_scenes=30, seed=1)
    texts = list(corpus_texts(tmp_path / "world"))
    base = default_tokenizer()
    subset_tokenizer(texts, base).save_pretrained(tmp_path / "tokenizer")
    small = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # as pretrain.py --tokenizer_name reads it
    assert len(small) < 200 < len(base)
    assert all(small.tokenize(text) == base.tokenize(text) for text in texts)
    assert small("a crimson disc")["input_ids"][0] == small.cls_token_id
    assert small.tokenize("zebra") == ["[UNK]"]  # outside the world's texts
    with pytest.raises(ValueError, match="texts is empty"):
        subset_tokenizer([])


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-scenes", "30"], "the following arguments are required: --output"),
    (["--output", "c", "--num-scenes", "many"], "argument --num_scenes/--num-scenes: invalid int value: 'many'"),
    (["--output", "c", "--validation-fraction", "half"],
     "argument --validation_fraction/--validation-fraction: invalid float value: 'half'"),
    (["--output", "c", "--scenes", "30"], "unrecognized arguments: --scenes 30"),
    (["--output", "c", "--partial-caption-probability", "2"],
     "--partial-caption-probability must be a probability in [0, 1], got 2.0"),
])
def test_command_line_refuses_a_bad_flag_naming_it(argv, message, tmp_path, capsys, monkeypatch):
    """The flags are a dataclass read by `HfArgumentParser`: a bad one stops with exit status 2 and its name, before
    anything is written."""
    from cmal_processing.synthetic import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
