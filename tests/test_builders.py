"""Corpus builders: tiny files in each public schema → DatasetDict folders, read back field by field.

Covers COCO / jsonl captions, VQA v2 (official answer normalisation, soft scores, answer vocabulary across splits),
NLVR2, SNLI-VE, RefCOCO+ (IoU by hand), skip reasons, atomic writes (an interrupted build leaves nothing, a rerun
cleans up), sharding + merge, and the command line. Corpora are read back through `cmal_processing.corpus.load_corpus`
(rows joined with their image's regions); the stored layout (a task table without region columns, an image table
with each image once) and the join itself (equal to a single table, old single-table folders still read) are
checked directly.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from hypothesis import given, settings
from hypothesis import strategies as st
from test_readers import VG_VOCAB, Evil, butd_fields, make_regions, write_butd_tsv, write_npz

import cmal_processing.builders
from cmal_processing import build_captions, build_nlvr2, build_refcoco, build_snli_ve, build_vqa, merge_shards
from cmal_processing.__main__ import main
from cmal_processing.builders import ItemGroup, shard_bounds, write_split
from cmal_processing.corpus import (
    IMAGE_TABLE,
    corpus_features,
    image_table,
    load_corpus,
    load_split,
    save_split,
    separate_images,
    split_features,
)
from cmal_processing.refcoco import box_iou, load_refs
from cmal_processing.safe_pickle import UnsafePickleError
from cmal_processing.schema import (
    ANSWER_VOCAB_FILE,
    REGION_COLUMNS,
    STORED_REGION_COLUMNS,
    image_table_features,
    nlvr2_features,
    pretrain_features,
    refcoco_features,
    snli_ve_features,
    vqa_features,
)
from cmal_processing.skips import SkipCounter
from cmal_processing.vqa import answer_soft_scores, build_answer_vocab, normalize_answer

REPO_ROOT = Path(__file__).resolve().parents[1]
HANG_TIMEOUT_S = 1800  # catches a hung subprocess, not a slow machine
DIM = 2048


def coco_id(number: int) -> str:
    return f"COCO_train2014_{number:012d}"


def feature_images() -> dict[str, dict]:
    """Every image of the shared features file (COCO 1, 2, 7, 8; NLVR2 pairs; Flickr30k)."""
    images = {image_id: make_regions(image_id, 3, DIM, seed=seed) for seed, image_id in enumerate(
        [coco_id(1), coco_id(2), "dev-1-0-img0", "dev-1-0-img1", "dev-2-0-img0", "1234", "5678"])}
    images[coco_id(1)]["boxes"][0] = [-5.0, 10.0, 700.0, 500.0]  # beyond the 640 x 480 image: clipped
    for image_id, tags in ((coco_id(1), ("man", "horse", "sky")), ("dev-1-0-img0", ("tree", "sky", "building")),
                           ("dev-1-0-img1", ("dog", "tree", "sky"))):  # known tags for the anchor statistics
        images[image_id]["object_ids"] = np.array([VG_VOCAB.index(tag) for tag in tags])
        images[image_id]["tags"] = list(tags)
    for number in (7, 8):  # RefCOCO+ images: 40 x 20 with three known boxes
        regions = make_regions(coco_id(number), 3, DIM, width=40, height=20, seed=number)
        regions["boxes"] = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 10, 30, 20]], np.float32)
        images[coco_id(number)] = regions
    return images


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """`(tsv path, images)`: the shared BUTD tsv, with one corrupt row (COCO image 3)."""
    images = feature_images()
    corrupt = butd_fields(make_regions(coco_id(3), 3, DIM))
    corrupt[9] = "not base64!"
    path = tmp_path_factory.mktemp("features") / "train2014_obj36.tsv"
    write_butd_tsv(path, [butd_fields(regions) for regions in images.values()] + [corrupt])
    return path, images


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(record if isinstance(record, str) else json.dumps(record) for record in records) + "\n")
    return path


def assert_region_columns(row: dict, regions: dict, suffix: str = "") -> None:
    width, height = regions["image_size"]
    assert row[f"image_id{suffix}"] == regions["image_id"]
    assert (row[f"image_width{suffix}"], row[f"image_height{suffix}"]) == (width, height)
    np.testing.assert_array_equal(np.asarray(row[f"visual_feats{suffix}"], np.float16),
                                  regions["features"].astype(np.float16))
    expected_pos = np.clip(regions["boxes"] / np.array([width, height, width, height], np.float32), 0, 1)
    np.testing.assert_allclose(row[f"visual_pos{suffix}"], expected_pos, rtol=1e-6)
    assert list(row[f"tags{suffix}"]) == regions["tags"]
    np.testing.assert_array_equal(np.asarray(row[f"scores{suffix}"], np.float32), regions["scores"])


def assert_stored_layout(split_folder: Path, features, image_ids: list[str], summary=None) -> None:
    """The split folder as stored: a task table with the task columns and image ids only, and an image table with
    the region columns (no suffix) and exactly `image_ids` (each once, in order of first use by a written row)."""
    task_features, image_features = split_features(features)
    task = load_from_disk(str(split_folder))
    assert task.features == task_features
    region_values = {f"{name}{suffix}" for name in REGION_COLUMNS if name != "image_id" for suffix in ("", "_0", "_1")}
    assert not region_values & set(task.column_names), task.column_names  # no region columns in the task table
    images = load_from_disk(str(split_folder / IMAGE_TABLE))
    assert images.features == image_features
    assert images.column_names == list(STORED_REGION_COLUMNS)  # the one stored encoding of schema.REGION_FIELDS
    assert images["image_id"] == image_ids
    assert len(set(images["image_id"])) == images.num_rows  # each image once
    used = {image_id for name in task.column_names if name.startswith("image_id") for image_id in task[name]}
    assert used == set(image_ids)  # every image a row uses, and no other (none of an item that was skipped)
    if summary is not None:
        assert summary.images_written == images.num_rows
        assert f"images written: {images.num_rows}" in summary.format()


def python_value(value):
    """A numpy value read from a joined split as plain python (lists, str, int, float)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def assert_rows_equal(read, expected) -> None:
    """Every column of two rows (or batches) equal, value by value; arrays also of the same dtype (scalar ints may
    differ in width: np.int64 from a joined split, np.int32 from a single table)."""
    assert list(read) == list(expected)
    for name in expected:
        a, b = read[name], expected[name]
        if isinstance(b, np.ndarray) and b.dtype == object:  # ragged batches: one array per row
            assert isinstance(a, np.ndarray) and len(a) == len(b), name
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y, err_msg=name)
                assert np.asarray(x).dtype == np.asarray(y).dtype, name
            continue
        np.testing.assert_array_equal(a, b, err_msg=name)
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, name
        if a.dtype.kind == b.dtype.kind == "i":
            continue
        assert a.dtype == b.dtype or a.dtype.kind == b.dtype.kind == "U", (name, a.dtype, b.dtype)


COCO_CAPTIONS = {
    "images": [{"id": n, "file_name": f"{coco_id(n)}.jpg", "width": 640, "height": 480} for n in (1, 2, 3, 4)],
    "annotations": [
        {"image_id": 1, "id": 10, "caption": " A man riding a horse. \n"},
        {"image_id": 2, "id": 11, "caption": "Two dogs on a bench."},
        {"image_id": 1, "id": 12, "caption": "A person on a horse."},
        {"image_id": 3, "id": 13, "caption": "Features of this image are corrupt."},
        {"image_id": 4, "id": 14, "caption": "This image has no features."},
        {"image_id": 99, "id": 15, "caption": "An image missing from 'images'."},
        {"image_id": 2, "id": 16, "caption": "   "},
        {"image_id": 2, "id": 17},
    ],
}


def test_coco_captions_field_by_field(tmp_path, features):
    tsv, images = features
    summary = build_captions(write_json(tmp_path / "captions_train2014.json", COCO_CAPTIONS), tsv, tmp_path / "out",
                             split="train", progress=False)

    assert (summary.items, summary.rows_written) == (8, 3)
    assert summary.skipped.counts == {"corrupt_features": 1, "empty_text": 1, "malformed_record": 1,
                                      "missing_features": 1, "unknown_image": 1}
    assert "annotation 14: no region features for image 'COCO_train2014_000000000004'" in \
        summary.skipped.examples["missing_features"][0]
    assert summary.region_errors.counts == {"bad_base64": 1}
    # image 1 has regions "man", "horse", "sky": "A man riding a horse." finds two anchors, "A person on a horse." two
    # (the lexicon maps person to man)
    assert (summary.anchor_statistics.num_captions, summary.anchor_statistics.num_anchors) == (3, 4)
    assert "anchor statistics:\n  captions: 3, with at least one anchor: 2" in summary.format()
    # box 0 of image 1 reaches past the 640 x 480 image: clipped, and counted once although two rows use the image
    assert summary.clipped_boxes.counts == {"box_past_edge": 1}
    assert "boxes clipped to the image edge: 1\n  box_past_edge: 1  e.g. image 'COCO_train2014_000000000001' box 0 " \
        "[-5.0, 10.0, 700.0, 500.0] clipped to the 640x480 image" in summary.format()

    dataset = load_corpus(tmp_path / "out")
    assert list(dataset) == ["train"]
    train = dataset["train"]
    assert corpus_features(train) == pretrain_features(DIM)
    assert corpus_features(train)["visual_feats"].dtype == "float16"
    assert list(train["text"]) == ["A man riding a horse.", "A person on a horse.", "Two dogs on a bench."]
    for row, image_id in zip(train, [coco_id(1), coco_id(1), coco_id(2)]):
        assert_region_columns(row, images[image_id])
    assert train[0]["visual_pos"][0] == pytest.approx([0.0, 10 / 480, 1.0, 1.0])
    # two captions of image 1, one of image 2: each image stored once; images 3 (corrupt) and 4 (no features) not
    assert_stored_layout(tmp_path / "out" / "train", pretrain_features(DIM), [coco_id(1), coco_id(2)], summary)


def test_clipping_past_the_edge_is_counted_and_logged_never_silent(tmp_path, caplog):
    inside, past = make_regions("000001", 2, 8, seed=1), make_regions("000002", 3, 8, seed=2)
    past["boxes"][1] = [600, 400, 641, 470]   # right edge
    past["boxes"][2] = [10, -1, 20, 481]      # top and bottom
    folder = tmp_path / "npz"
    folder.mkdir()
    for regions in (inside, past):
        write_npz(folder, regions)
    captions = write_jsonl(tmp_path / "captions.jsonl", [{"image_id": 1, "caption": "a cat"},
                                                         {"image_id": 2, "caption": "a dog"}])
    with caplog.at_level("WARNING"):
        summary = build_captions(captions, folder, tmp_path / "out", split="train", image_id_format="{image_id:06d}",
                                 progress=False)
    assert summary.rows_written == 2 and summary.clipped_boxes.counts == {"box_past_edge": 2}
    assert [example.split(" clipped")[0] for example in summary.clipped_boxes.examples["box_past_edge"]] == [
        "image '000002' box 1 [600.0, 400.0, 641.0, 470.0]", "image '000002' box 2 [10.0, -1.0, 20.0, 481.0]"]
    assert "box_past_edge (image '000002' box 1" in caplog.text
    rows = load_corpus(tmp_path / "out")["train"]
    assert rows[1]["visual_pos"][1] == pytest.approx([600 / 640, 400 / 480, 1.0, 470 / 480])
    assert_stored_layout(tmp_path / "out" / "train", pretrain_features(8), ["000001", "000002"], summary)


def test_jsonl_captions_with_npz_features(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    images = {image_id: make_regions(image_id, 2 + n, 64, seed=n) for n, image_id in enumerate(["000009", "000010"])}
    for regions in images.values():
        write_npz(folder, regions)
    captions = write_jsonl(tmp_path / "captions.jsonl", [
        {"image_id": 9, "caption": "a cat"}, "{not json", {"image_id": 10}, {"image_id": 10, "caption": "a dog"},
        {"image_id": 11, "caption": "no features"}, {"image_id": "abc", "caption": "not a number"},
    ])
    summary = build_captions(captions, folder, tmp_path / "out", split="validation",
                             image_id_format="{image_id:06d}", progress=False)
    assert summary.skipped.counts == {"malformed_record": 2, "bad_image_id": 1, "missing_features": 1}
    assert "captions.jsonl line 2: not JSON" in summary.skipped.examples["malformed_record"][0]
    assert "line 6: image_id_format '{image_id:06d}' cannot format {'image_id': 'abc'}" in \
        summary.skipped.examples["bad_image_id"][0]
    rows = load_corpus(tmp_path / "out")["validation"]
    assert list(rows["text"]) == ["a cat", "a dog"]
    for row, image_id in zip(rows, ["000009", "000010"]):
        assert_region_columns(row, images[image_id])
    with pytest.raises(ValueError, match="image_id_format '{file_stem}' must use only the fields {image_id}"):
        build_captions(captions, folder, tmp_path / "out", split="train", image_id_format="{file_stem}")


# --------------------------------------------------------------------------------------------------------------
# VQA v2
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Two", "2"), ("a dog.", "dog"), ("don't", "don't"), ("dont", "don't"), ("Yes!", "yes"), ("1,000", "1000"),
        ("hot-dog", "hot dog"), ("red, white", "red white"), ("2.5", "2.5"), ("The  ten\tbirds", "10 birds"),
        ("isnt", "isn't"), ("(none)", "0"), ("mr. smith's", "mr smith's"),
    ],
)
def test_official_answer_normalization(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_soft_scores_and_answer_vocabulary():
    index = {"2": 0, "dog": 1, "yes": 2}
    answers = ["Two", "2", "two.", "2", "3", "3", "a dog.", "blue", "blue", "Dog"]
    assert answer_soft_scores(answers, index) == ([0, 1], [1.0, pytest.approx(2 / 3)])
    assert answer_soft_scores(["yes"] * 1, index) == ([2], [pytest.approx(1 / 3)])
    annotations = [{"multiple_choice_answer": answer} for answer in ["yes", "Two", "2", "dog", "no", "no", "."]]
    assert build_answer_vocab(annotations, top_k=3) == ["2", "no", "dog"]
    with pytest.raises(ValueError, match="top_k"):
        build_answer_vocab(annotations, top_k=0)


def vqa_files(tmp_path, split: str = "train2014"):
    def question(question_id, image_id, text="How many horses are there?"):
        return {"image_id": image_id, "question": text, "question_id": question_id}

    def annotation(question_id, image_id, answers, multiple_choice_answer):
        return {"question_id": question_id, "image_id": image_id, "question_type": "how many",
                "answer_type": "number", "multiple_choice_answer": multiple_choice_answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": number}
                            for number, answer in enumerate(answers, start=1)]}

    questions = write_json(tmp_path / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": [
        question(1, 1), question(2, 1, "Is it sunny?"), question(3, 2, "What animal is this?"),
        question(4, 1, "Unannotated?"), question(5, 4), question(6, 2, "Wrong image?"),
    ]})
    annotations = write_json(tmp_path / f"v2_mscoco_{split}_annotations.json", {"annotations": [
        annotation(1, 1, ["Two", "2", "two.", "2", "3", "3", "a dog.", "blue", "blue", "red"], "2"),
        annotation(2, 1, ["dont"] * 3 + ["yes"] * 7, "yes"),
        annotation(3, 2, ["dog"] * 6 + ["a dog"] * 4, "dog"),
        annotation(5, 4, ["2"] * 10, "Two"),
        annotation(6, 1, ["1"] * 10, "1"),
    ]})
    return questions, annotations


def test_vqa_rows_answers_and_vocabulary(tmp_path, features):
    tsv, images = features
    questions, annotations = vqa_files(tmp_path)
    output = tmp_path / "vqa"
    summary = build_vqa(questions, tsv, output, split="train", annotations=annotations, top_k=4,
                        image_id_format="COCO_train2014_{image_id:012d}", progress=False)

    assert summary.skipped.counts == {"inconsistent_annotation": 1, "missing_annotation": 1, "missing_features": 1}
    assert summary.statistics == {"answer vocabulary": 4, "rows without an answer in the vocabulary": 0}
    vocabulary = json.loads((output / ANSWER_VOCAB_FILE).read_text())
    assert vocabulary == ["2", "1", "dog", "yes"]  # "Two" normalises to "2", counted twice
    train = load_corpus(output)["train"]
    assert corpus_features(train) == vqa_features(DIM)
    assert list(train["question_id"]) == ["1", "2", "3"]
    assert list(train["question_type"]) == ["how many"] * 3
    assert [list(ids) for ids in train["answer_ids"]] == [[0, 2], [3], [2]]
    np.testing.assert_allclose(train[0]["answer_scores"], [1.0, 1 / 3], rtol=1e-6)  # "2" x4, "dog" x1
    np.testing.assert_allclose(train[1]["answer_scores"], [1.0])  # "don't" is not in the vocabulary
    for row, image_id in zip(train, [coco_id(1), coco_id(1), coco_id(2)]):
        assert_region_columns(row, images[image_id])
    # two questions of image 1, one of image 2 (the other refused), none of image 4 (no features)
    assert_stored_layout(output / "train", vqa_features(DIM), [coco_id(1), coco_id(2)], summary)

    # validation reuses the training vocabulary; a different one is refused; a test split needs one
    build_vqa(questions, tsv, output, split="validation", annotations=annotations,
              answer_vocab=output / ANSWER_VOCAB_FILE, image_id_format="COCO_train2014_{image_id:012d}", progress=False)
    assert list(load_corpus(output)) == ["train", "validation"]
    with pytest.raises(ValueError, match="answer_vocab.json.* differs"):
        build_vqa(questions, tsv, output, split="validation", annotations=annotations, answer_vocab=["yes", "no"],
                  image_id_format="COCO_train2014_{image_id:012d}", progress=False)
    with pytest.raises(ValueError, match="answer_vocab is required"):
        build_vqa(questions, tsv, output, split="test", progress=False)
    summary = build_vqa(questions, tsv, output, split="test", answer_vocab=vocabulary,
                        image_id_format="COCO_train2014_{image_id:012d}", progress=False)
    test = load_corpus(output)["test"]
    assert summary.rows_written == 5 and [list(ids) for ids in test["answer_ids"]] == [[]] * 5
    assert list(test["question_type"]) == [""] * 5
    # five questions of images 1 and 2: two images stored
    assert_stored_layout(output / "test", vqa_features(DIM), [coco_id(1), coco_id(2)], summary)
    for row, image_id in zip(test, [coco_id(1)] * 3 + [coco_id(2)] * 2):
        assert_region_columns(row, images[image_id])


# --------------------------------------------------------------------------------------------------------------
# NLVR2, SNLI-VE, RefCOCO+
# --------------------------------------------------------------------------------------------------------------


def test_nlvr2_two_images_per_row(tmp_path, features):
    tsv, images = features
    annotations = write_jsonl(tmp_path / "dev.json", [
        {"identifier": "dev-1-0-0", "sentence": "There are two dogs.", "label": "True"},
        {"identifier": "dev-2-0-0", "sentence": "Its right image is missing.", "label": "True"},
        {"identifier": "dev-1-0-1", "sentence": "One image shows a cat.", "label": "False"},
        {"identifier": "dev-1-0-2", "sentence": "Bad label.", "label": "maybe"},
        {"identifier": "oops", "sentence": "Bad identifier.", "label": "True"},
        {"identifier": "dev-1-0-3", "sentence": "Hidden label."},
    ])
    summary = build_nlvr2(annotations, tsv, tmp_path / "nlvr2", split="validation", progress=False)
    assert summary.skipped.counts == {"bad_label": 1, "malformed_identifier": 1, "missing_features": 1}
    assert "image 'dev-2-0-img1'" in summary.skipped.examples["missing_features"][0]
    assert summary.anchor_statistics.num_anchors == 1  # "dogs" matches the "dog" region of the right image
    rows = load_corpus(tmp_path / "nlvr2")["validation"]
    assert corpus_features(rows) == nlvr2_features(DIM)
    assert list(rows["identifier"]) == ["dev-1-0-0", "dev-1-0-1", "dev-1-0-3"]
    assert list(rows["label"]) == [1, 0, -1]
    for row in rows:
        assert_region_columns(row, images["dev-1-0-img0"], "_0")
        assert_region_columns(row, images["dev-1-0-img1"], "_1")
    # the left image of dev-2-0 has features, but its pair's only item was skipped: not stored
    assert_stored_layout(tmp_path / "nlvr2" / "validation", nlvr2_features(DIM), ["dev-1-0-img0", "dev-1-0-img1"],
                         summary)


def test_snli_ve_rows(tmp_path, features):
    tsv, images = features
    annotations = write_jsonl(tmp_path / "snli_ve_dev.jsonl", [
        {"Flikr30kID": "1234.jpg", "pairID": "1234.jpg#0r1e", "sentence1": "Two dogs run.",
         "sentence2": "Animals are outside.", "gold_label": "entailment"},
        {"Flikr30kID": "5678.jpg", "pairID": "5678.jpg#1r1n", "sentence1": "A man sits.",
         "sentence2": "A man waits for a bus.", "gold_label": "neutral"},
        {"Flikr30kID": "1234.jpg", "pairID": "1234.jpg#0r1c", "sentence1": "Two dogs run.",
         "sentence2": "The dogs sleep.", "gold_label": "contradiction"},
        {"Flikr30kID": "5678.jpg", "pairID": "5678.jpg#2r1x", "sentence1": "A man sits.", "sentence2": "?",
         "gold_label": "-"},
    ])
    summary = build_snli_ve(annotations, tsv, tmp_path / "snli_ve", split="validation", progress=False)
    assert summary.skipped.counts == {"bad_label": 1}
    rows = load_corpus(tmp_path / "snli_ve")["validation"]
    assert corpus_features(rows) == snli_ve_features(DIM)
    assert list(rows["pair_id"]) == ["1234.jpg#0r1e", "1234.jpg#0r1c", "5678.jpg#1r1n"]  # grouped by image
    assert list(rows["premise"]) == ["Two dogs run.", "Two dogs run.", "A man sits."]
    assert list(rows["text"]) == ["Animals are outside.", "The dogs sleep.", "A man waits for a bus."]
    assert list(rows["label"]) == [0, 2, 1]
    for row, image_id in zip(rows, ["1234", "1234", "5678"]):
        assert_region_columns(row, images[image_id])
    assert_stored_layout(tmp_path / "snli_ve" / "validation", snli_ve_features(DIM), ["1234", "5678"], summary)


REFS = [
    {"ref_id": 1, "ann_id": 101, "image_id": 7, "split": "val",
     "sentences": [{"sent": "left box"}, {"sent": "top left"}]},
    {"ref_id": 2, "ann_id": 102, "image_id": 7, "split": "val", "sentences": [{"sent": "middle one"}]},
    {"ref_id": 3, "ann_id": 103, "image_id": 8, "split": "val", "sentences": [{"sent": "size mismatch"}]},
    {"ref_id": 4, "ann_id": 999, "image_id": 7, "split": "val", "sentences": [{"sent": "no annotation"}]},
    {"ref_id": 5, "ann_id": 101, "image_id": 7, "split": "train", "sentences": [{"sent": "training ref"}]},
]
INSTANCES = {
    "images": [{"id": 7, "width": 40, "height": 20}, {"id": 8, "width": 50, "height": 20}],
    "annotations": [{"id": 101, "image_id": 7, "bbox": [0, 0, 10, 10]},
                    {"id": 102, "image_id": 7, "bbox": [4, 4, 10, 10]},
                    {"id": 103, "image_id": 8, "bbox": [0, 0, 5, 5]}],
}


def test_refcoco_ious_by_hand(tmp_path, features):
    tsv, images = features
    refs, instances = write_json(tmp_path / "refs.json", REFS), write_json(tmp_path / "instances.json", INSTANCES)
    summary = build_refcoco(refs, instances, tsv, tmp_path / "refcoco", split="validation",
                            image_id_format="COCO_train2014_{image_id:012d}", progress=False)
    assert summary.skipped.counts == {"image_size_mismatch": 1, "missing_annotation": 1}
    assert summary.statistics == {"rows whose best region has IoU >= 0.5": 3}
    rows = load_corpus(tmp_path / "refcoco")["validation"]
    assert corpus_features(rows) == refcoco_features(DIM)
    assert list(rows["ref_id"]) == ["1", "1", "2"] and list(rows["text"]) == ["left box", "top left", "middle one"]
    # regions [0,0,10,10], [5,5,15,15], [20,10,30,20]; ref 1 is [0,0,10,10]: IoU 1, 25 / 175, 0
    np.testing.assert_allclose(rows[0]["region_ious"], [1.0, 25 / 175, 0.0], rtol=1e-6)
    # ref 2 is [4,4,14,14]: 36 / 164 with the first region, 81 / 119 with the second
    np.testing.assert_allclose(rows[2]["region_ious"], [36 / 164, 81 / 119, 0.0], rtol=1e-6)
    assert list(rows["label"]) == [0, 0, 1]
    np.testing.assert_allclose(rows[0]["target_box"], [0, 0, 0.25, 0.5])
    np.testing.assert_allclose(rows[2]["target_box"], [0.1, 0.2, 0.35, 0.7])
    for row in rows:
        assert_region_columns(row, images[coco_id(7)])
    # image 8 was decoded, but its only expression was refused (size mismatch) after that: not stored
    assert_stored_layout(tmp_path / "refcoco" / "validation", refcoco_features(DIM), [coco_id(7)], summary)


def test_refs_pickle_is_read_with_the_restricted_unpickler(tmp_path):
    for protocol in (0, 2, 4):
        (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(REFS, protocol=protocol))
        assert load_refs(tmp_path / "refs(unc).p") == REFS
    marker = tmp_path / "pwned"
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": Evil(f"touch {marker}")}]))
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_refs(tmp_path / "refs(unc).p")
    assert not marker.exists()


def test_box_iou_properties():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [3, 3, 3, 8]], np.float32)
    ious = box_iou(boxes, boxes[0])
    np.testing.assert_allclose(ious, [1.0, 25 / 175, 0.0, 0.0], rtol=1e-6)
    for box in boxes[:3]:
        np.testing.assert_allclose(box_iou(boxes[:3], box), [box_iou(other[None], box)[0] for other in boxes[:3]])
        np.testing.assert_allclose(box_iou(boxes[:3], box), [box_iou(box[None], other)[0] for other in boxes[:3]])


# --------------------------------------------------------------------------------------------------------------
# Atomic writes, splits, shards, command line
# --------------------------------------------------------------------------------------------------------------


def failing_image_columns(monkeypatch, after: int):
    """Make the build raise while its generator runs, after `after` images."""
    original = cmal_processing.builders.image_columns
    calls = []

    def image_columns(regions, suffix="", clipped=None):
        calls.append(regions["image_id"])
        if len(calls) > after:
            raise RuntimeError("simulated crash in the middle of a build")
        return original(regions, suffix, clipped)

    monkeypatch.setattr(cmal_processing.builders, "image_columns", image_columns)


def test_interrupted_build_leaves_nothing_and_rerun_succeeds(tmp_path, features, monkeypatch):
    tsv, _ = features
    captions = write_json(tmp_path / "captions.json", COCO_CAPTIONS)
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        failing_image_columns(patch, after=1)
        with pytest.raises(Exception, match="generating the dataset|simulated crash"):
            build_captions(captions, tsv, output, split="train", progress=False)
    assert sorted(path.name for path in output.iterdir()) == []

    (output / ".train.tmp-0123abcd").mkdir()  # left by a killed run
    (output / ".train.tmp-0123abcd" / "data.arrow").write_bytes(b"partial")
    first = build_captions(captions, tsv, output, split="train", progress=False)
    assert sorted(path.name for path in output.iterdir()) == ["dataset_dict.json", "train"]

    # a failing rebuild keeps the complete split that was there
    with monkeypatch.context() as patch:
        failing_image_columns(patch, after=1)
        with pytest.raises(Exception, match="generating the dataset|simulated crash"):
            build_captions(captions, tsv, output, split="train", progress=False)
    assert sorted(path.name for path in output.iterdir()) == ["dataset_dict.json", "train"]
    assert load_corpus(output)["train"].num_rows == first.rows_written == 3
    assert_stored_layout(output / "train", pretrain_features(DIM), [coco_id(1), coco_id(2)], first)
    assert not [path.name for path in (output / "train").iterdir() if path.name.startswith(".")]


def test_splits_must_share_features(tmp_path, features):
    tsv, _ = features
    captions = write_json(tmp_path / "captions.json", COCO_CAPTIONS)
    small = tmp_path / "small.tsv"
    write_butd_tsv(small, [butd_fields(make_regions(coco_id(1), 2, 16))])
    build_captions(captions, tsv, tmp_path / "out", split="train", progress=False)
    with pytest.raises(ValueError, match="split 'train' .* are 2048-d, these 16-d"):
        build_captions(captions, small, tmp_path / "out", split="validation", progress=False)
    with pytest.raises(ValueError, match="split must be a name"):
        build_captions(captions, tsv, tmp_path / "out", split="train/1", progress=False)


def test_shards_merge_into_the_unsharded_dataset(tmp_path, features):
    tsv, _ = features
    questions, annotations = vqa_files(tmp_path)
    options = dict(split="train", annotations=annotations, top_k=4, image_id_format="COCO_train2014_{image_id:012d}",
                   progress=False)
    whole = build_vqa(questions, tsv, tmp_path / "whole", **options)
    shards = [build_vqa(questions, tsv, tmp_path / "sharded", num_shards=2, shard_index=i, **options) for i in (0, 1)]
    assert [s.dataset_path.parent.name for s in shards] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert sum(s.items for s in shards) == whole.items
    assert sum(s.rows_written for s in shards) == whole.rows_written
    assert sum(s.skipped.total for s in shards) == whole.skipped.total
    state = tmp_path / "sharded" / "shard-00001-of-00002" / "train" / "state.json"
    state.rename(tmp_path / "state.json")  # shard 1 not finished yet
    with pytest.raises(ValueError, match="shards \\[1\\] of 2 have no 'train' split"):
        merge_shards(tmp_path / "sharded", "train")
    (tmp_path / "state.json").rename(state)

    merged_folder = merge_shards(tmp_path / "sharded", "train")
    assert merged_folder == tmp_path / "sharded" / "train"
    merged, unsharded = load_split(merged_folder), load_corpus(tmp_path / "whole")["train"]
    assert corpus_features(merged) == corpus_features(unsharded) == vqa_features(DIM)
    assert merged.with_format(None).to_dict() == unsharded.with_format(None).to_dict()  # the task tables
    assert image_table(merged).to_dict() == image_table(unsharded).to_dict()
    assert merged.num_rows == unsharded.num_rows == 3
    for i in range(merged.num_rows):
        assert_rows_equal(merged[i], unsharded[i])
    assert_stored_layout(merged_folder, vqa_features(DIM), [coco_id(1), coco_id(2)])
    assert sum(s.images_written for s in shards) == whole.images_written == 2
    assert list(load_corpus(tmp_path / "sharded")) == ["train"]
    vocabularies = [(tmp_path / folder / ANSWER_VOCAB_FILE).read_text() for folder in ("sharded", "whole")]
    assert vocabularies[0] == vocabularies[1]
    with pytest.raises(ValueError, match="shard_index must be an int in \\[0, 2\\), got 2"):
        shard_bounds(10, 2, 2)


# --------------------------------------------------------------------------------------------------------------
# Each image stored once: NLVR2 images shared between pairs and between shards
# --------------------------------------------------------------------------------------------------------------


def nlvr2_groups() -> list[ItemGroup]:
    """Pairs that share images (as the synthetic world's do), one image in both slots, and two pairs skipped."""
    def items(pair, labels):
        return [{"identifier": f"{pair}-{n}", "text": f"statement {n} about pair {pair}.", "label": label,
                 "where": f"pair {pair} item {n}"} for n, label in enumerate(labels)]

    return [
        ItemGroup(("dev-1-0-img0", "dev-1-0-img1"), items("a", [1, 0])),
        ItemGroup(("dev-1-0-img1", "dev-2-0-img0"), items("b", [0])),   # img1 again, now the left image
        ItemGroup(("dev-2-0-img0", "dev-1-0-img0"), items("c", [1])),
        ItemGroup(("dev-1-0-img0", "dev-1-0-img0"), items("d", [-1])),  # one image in both slots
        ItemGroup(("dev-9-0-img0", "dev-1-0-img1"), items("e", [1])),   # left image without features: skipped
        ItemGroup(("1234", "dev-9-0-img1"), items("f", [0])),           # 1234 decoded, its pair skipped: not stored
    ]


NLVR2_ROWS = [("a-0", "dev-1-0-img0", "dev-1-0-img1"), ("a-1", "dev-1-0-img0", "dev-1-0-img1"),
              ("b-0", "dev-1-0-img1", "dev-2-0-img0"), ("c-0", "dev-2-0-img0", "dev-1-0-img0"),
              ("d-0", "dev-1-0-img0", "dev-1-0-img0")]
NLVR2_IMAGES = ["dev-1-0-img0", "dev-1-0-img1", "dev-2-0-img0"]


def write_nlvr2(tsv, output, **shards):
    return write_split(task="nlvr2", groups=nlvr2_groups(), features=nlvr2_features,
                       refused=SkipCounter("skipped items"), region_features=tsv, output=output, split="validation",
                       image_suffixes=("_0", "_1"), progress=False, **shards)


def assert_nlvr2_rows(rows, images) -> None:
    assert corpus_features(rows) == nlvr2_features(DIM)
    assert list(rows["identifier"]) == [identifier for identifier, _, _ in NLVR2_ROWS]
    assert list(rows["label"]) == [1, 0, 0, 1, -1]
    for row, (_, left, right) in zip(rows, NLVR2_ROWS, strict=True):
        assert_region_columns(row, images[left], "_0")
        assert_region_columns(row, images[right], "_1")
    batch = rows[:]  # a batch joins too
    for suffix, slot in (("_0", 1), ("_1", 2)):
        np.testing.assert_array_equal(batch[f"visual_feats{suffix}"], np.stack(
            [images[row[slot]]["features"].astype(np.float16).astype(np.float32) for row in NLVR2_ROWS]))
        assert list(batch[f"image_id{suffix}"]) == [row[slot] for row in NLVR2_ROWS]


def test_nlvr2_image_used_by_two_pairs_is_stored_once(tmp_path, features):
    tsv, images = features
    summary = write_nlvr2(tsv, tmp_path / "nlvr2")
    assert (summary.rows_written, summary.items) == (5, 7)
    assert summary.skipped.counts == {"missing_features": 2}
    assert_stored_layout(tmp_path / "nlvr2" / "validation", nlvr2_features(DIM), NLVR2_IMAGES, summary)
    assert_nlvr2_rows(load_corpus(tmp_path / "nlvr2")["validation"], images)


def test_sharded_nlvr2_image_in_two_shards_is_stored_once_after_merge(tmp_path, features):
    tsv, images = features
    whole = write_nlvr2(tsv, tmp_path / "whole")
    shards = [write_nlvr2(tsv, tmp_path / "sharded", num_shards=3, shard_index=i) for i in range(3)]
    # shard 0 has pairs a, b; shard 1 pairs c, d; shard 2 only the skipped pairs: dev-2-0-img0 and dev-1-0-img0 are
    # in the image tables of shards 0 and 1
    shard_images = [list(load_from_disk(str(s.dataset_path / IMAGE_TABLE))["image_id"]) for s in shards]
    assert shard_images == [NLVR2_IMAGES, ["dev-2-0-img0", "dev-1-0-img0"], []]
    assert [s.images_written for s in shards] == [3, 2, 0] and [s.rows_written for s in shards] == [3, 2, 0]
    assert sum(s.skipped.total for s in shards) == whole.skipped.total == 2

    merged_folder = merge_shards(tmp_path / "sharded", "validation")
    assert_stored_layout(merged_folder, nlvr2_features(DIM), NLVR2_IMAGES)  # dev-1-0-img0 once
    merged = load_corpus(tmp_path / "sharded")["validation"]
    assert_nlvr2_rows(merged, images)
    unsharded = load_corpus(tmp_path / "whole")["validation"]
    assert merged.with_format(None).to_dict() == unsharded.with_format(None).to_dict()
    assert image_table(merged).to_dict() == image_table(unsharded).to_dict()
    for i in range(merged.num_rows):
        assert_rows_equal(merged[i], unsharded[i])


def test_merge_refuses_shards_of_mixed_layouts(tmp_path, features):
    tsv, _ = features
    shards = [write_nlvr2(tsv, tmp_path / "sharded", num_shards=2, shard_index=i) for i in range(2)]
    old = [{name: python_value(value) for name, value in row.items()} for row in load_split(shards[1].dataset_path)]
    shutil.rmtree(shards[1].dataset_path)  # shard 1 as a single table, written before the image table existed
    Dataset.from_list(old, features=nlvr2_features(DIM)).save_to_disk(str(shards[1].dataset_path))
    with pytest.raises(ValueError, match="mix layouts"):
        merge_shards(tmp_path / "sharded", "validation")
    assert not (tmp_path / "sharded" / "validation").exists()


# --------------------------------------------------------------------------------------------------------------
# The join: equal to a single table; old single-table folders; a missing image
# --------------------------------------------------------------------------------------------------------------


JOIN_DIM = 8
JOIN_IMAGES = {"img-a": 3, "img-b": 5, "img-c": 1}  # image id -> number of regions


def region_values(image_id: str, suffix: str = "") -> dict:
    """An image's region columns as python values (exactly representable in their stored dtypes)."""
    seed = sorted(JOIN_IMAGES).index(image_id)
    rng = np.random.default_rng(seed)
    num_boxes = JOIN_IMAGES[image_id]
    return {f"image_id{suffix}": image_id, f"image_width{suffix}": 100 + seed, f"image_height{suffix}": 50 + seed,
            f"visual_feats{suffix}": rng.standard_normal((num_boxes, JOIN_DIM)).astype(np.float16).tolist(),
            f"visual_pos{suffix}": rng.random((num_boxes, 4), dtype=np.float32).tolist(),
            f"tags{suffix}": [f"tag{seed}-{box}" for box in range(num_boxes)],
            f"scores{suffix}": rng.random(num_boxes, dtype=np.float32).tolist()}


def joined_rows(task: str) -> tuple[list[dict], object]:
    """`(rows, features)`: rows with their images' region columns, several per image, in a task's schema."""
    if task == "vqa":
        images = ["img-a", "img-a", "img-b", "img-c", "img-b", "img-a"]
        rows = [{**region_values(image_id), "question_id": str(n), "text": f"question {n}?",
                 "question_type": "what" if n % 2 else "how many", "answer_ids": list(range(n % 3)),
                 "answer_scores": [1.0 / (k + 1) for k in range(n % 3)]} for n, image_id in enumerate(images)]
        return rows, vqa_features(JOIN_DIM)
    pairs = [("img-a", "img-b"), ("img-a", "img-b"), ("img-b", "img-c"), ("img-c", "img-a"), ("img-a", "img-a")]
    rows = [{**region_values(left, "_0"), **region_values(right, "_1"), "identifier": f"pair-{n}",
             "text": f"statement {n}.", "label": n % 2} for n, (left, right) in enumerate(pairs)]
    return rows, nlvr2_features(JOIN_DIM)


def save_single_table(rows, features, corpus) -> Path:
    """A corpus folder as written before the image table existed: one table, region columns in every row."""
    Dataset.from_list(rows, features=features).save_to_disk(str(corpus / "train"))
    (corpus / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    return corpus / "train"


def save_joined(rows, features, corpus, drop_image: str | None = None) -> Path:
    """The same rows as a task table and an image table (`drop_image` left out of it)."""
    suffixes = ["_0", "_1"] if "image_id_0" in features else [""]
    task_rows, image_rows = separate_images(rows, suffixes)
    task_features, image_features = split_features(features)
    Dataset.from_list(task_rows, features=task_features).save_to_disk(str(corpus / "train"))
    Dataset.from_list([row for row in image_rows if row["image_id"] != drop_image], features=image_features
                      ).save_to_disk(str(corpus / "train" / IMAGE_TABLE))
    (corpus / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    return corpus / "train"


def assert_python_rows(read, rows) -> None:
    assert read.num_rows == len(rows)
    for i, expected in enumerate(rows):
        row = read[i]
        assert list(row) == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(row[name], np.asarray(value, dtype=object if name.startswith("tags")
                                                                else None), err_msg=f"row {i} {name}")


def test_old_single_table_folder_is_read_as_it_is(tmp_path):
    rows, features = joined_rows("vqa")
    folder = save_single_table(rows, features, tmp_path / "old")
    corpus = load_corpus(tmp_path / "old")
    assert list(corpus) == ["train"]
    train = corpus["train"]
    assert image_table(train) is None
    assert corpus_features(train) == train.features == vqa_features(JOIN_DIM)
    assert_python_rows(train, rows)
    numpy_rows = load_from_disk(str(folder)).with_format("numpy")
    for i in range(len(rows)):
        assert_rows_equal(train[i], numpy_rows[i])
        assert train[i]["image_width"].dtype == numpy_rows[i]["image_width"].dtype  # as it is, int32
    assert_rows_equal(load_split(folder)[:], numpy_rows[:])


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_joined_rows_equal_the_single_table(tmp_path, task):
    rows, features = joined_rows(task)
    single = load_corpus(save_single_table(rows, features, tmp_path / "single").parent)["train"]
    folder = save_joined(rows, features, tmp_path / "joined")
    joined = load_corpus(tmp_path / "joined")["train"]
    assert image_table(joined).num_rows == len(JOIN_IMAGES)  # each image once
    assert load_from_disk(str(folder)).num_rows == len(rows)
    assert corpus_features(joined) == corpus_features(single) == features
    assert_python_rows(joined, rows)
    for i in range(len(rows)):
        assert_rows_equal(joined[i], single[i])
    for key in (slice(None), [4, 0, 2], slice(1, 3)):  # batches, ragged (several region counts) or not
        assert_rows_equal(joined[key], single[key])
    for derive in (lambda d: d.select([3, 1]), lambda d: d.shuffle(seed=0),
                   lambda d: d.filter(lambda row: str(row["text"]).endswith(("0?", "2?", "1.", "3.")))):
        a, b = derive(joined), derive(single)
        assert a.num_rows == b.num_rows > 0
        for i in range(a.num_rows):
            assert_rows_equal(a[i], b[i])
    # saving a selection keeps only the images its rows use
    selection = joined.select([2, 4] if task == "vqa" else [2])
    save_split(selection, tmp_path / "saved" / "train")
    saved = load_split(tmp_path / "saved" / "train")
    used = ["img-b"] if task == "vqa" else ["img-b", "img-c"]
    assert sorted(image_table(saved)["image_id"]) == used
    for i in range(saved.num_rows):
        assert_rows_equal(saved[i], selection[i])


def test_map_adding_a_column_keeps_the_join(tmp_path):
    rows, features = joined_rows("vqa")
    single = load_corpus(save_single_table(rows, features, tmp_path / "single").parent)["train"]
    save_joined(rows, features, tmp_path / "joined")
    joined = load_corpus(tmp_path / "joined")["train"]

    def add(row):
        return {"length": len(str(row["text"]))}

    a, b = joined.map(add), single.map(add)
    for i in range(len(rows)):
        assert_rows_equal(a[i], b[i])
    assert "length" in corpus_features(a) and "visual_feats" in corpus_features(a)
    renamed = joined.rename_column("text", "question")  # the join follows the task table's current columns
    assert str(renamed[0]["question"]) == str(rows[0]["text"]) and "visual_feats" in renamed[0]
    fewer = joined.remove_columns(["question_type"])
    assert "question_type" not in corpus_features(fewer) and "question_type" not in fewer[0]


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_a_row_whose_image_is_missing_raises_key_error_naming_it(tmp_path, task):
    rows, features = joined_rows(task)
    folder = save_joined(rows, features, tmp_path / "joined", drop_image="img-c")
    split = load_split(folder)
    uses_c = [i for i, row in enumerate(rows) if "img-c" in (row.get("image_id"), row.get("image_id_0"),
                                                             row.get("image_id_1"))]
    assert uses_c and len(uses_c) < len(rows)
    for i in range(len(rows)):
        if i in uses_c:
            with pytest.raises(KeyError, match="'img-c' is referred to by a row but missing from the image table"):
                split[i]
        else:
            assert_rows_equal(split[i], {name: value for name, value in split[i].items()})  # reads
            np.testing.assert_array_equal(split[i]["text"], rows[i]["text"])
    with pytest.raises(KeyError, match="img-c"):
        split[:]
    with pytest.raises(KeyError, match="img-c"):
        load_corpus(tmp_path / "joined")["train"][uses_c[0]]



@settings(deadline=None)
@given(num_items=st.integers(0, 500), num_shards=st.integers(1, 64))
def test_shard_bounds_cut_items_into_contiguous_blocks(num_items, num_shards):
    bounds = [shard_bounds(num_items, num_shards, index) for index in range(num_shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_items
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    assert max(end - start for start, end in bounds) - min(end - start for start, end in bounds) <= 1


def test_command_line(tmp_path, features):
    tsv, _ = features
    questions, annotations = vqa_files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cmal_processing", "build", "vqa", "--questions", str(questions), "--annotations",
         str(annotations), "--features", str(tsv), "--image_id_format", "COCO_train2014_{image_id:012d}",
         "--top_k", "4", "--split", "train", "--output", str(tmp_path / "vqa")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert "rows written: 3" in result.stdout and "missing_annotation: 1" in result.stdout
    assert "anchor statistics" in result.stdout
    assert "images written: 2" in result.stdout
    assert load_corpus(tmp_path / "vqa")["train"].num_rows == 3

    nothing = write_jsonl(tmp_path / "test1.json", [{"identifier": "test1-9-0-0", "sentence": "No images."}])
    assert main(["build", "nlvr2", "--annotations", str(nothing), "--features", str(tsv), "--split", "test",
                 "--output", str(tmp_path / "nlvr2")]) == 1
    empty = load_corpus(tmp_path / "nlvr2")["test"]
    assert empty.num_rows == 0 and image_table(empty).num_rows == 0
    # No image row tells an empty split's feature width: its region arrays are described as stored, the rest as built.
    assert corpus_features(empty).keys() == nlvr2_features(DIM).keys()
    assert split_features(corpus_features(empty))[0] == split_features(nlvr2_features(DIM))[0]
    assert corpus_features(empty)["visual_feats_0"] == image_table_features()["visual_feats"]
    with pytest.raises(SystemExit) as exited:
        main(["build", "snli_ve", "--annotations", str(tmp_path / "absent.jsonl"), "--features", str(tsv),
              "--split", "test", "--output", str(tmp_path / "snli_ve")])
    assert exited.value.code == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["bogus"], "argument command: invalid choice: 'bogus'"),
    (["build"], "the following arguments are required: task"),
    (["build", "vqa", "--questions", "q.json", "--features", "a.tsv", "--output", "out", "--split", "train",
      "--top_k", "many"], "argument --top_k/--top-k: invalid int value: 'many'"),
    (["build", "nlvr2", "--annotations", "a.json", "--output", "out", "--split", "train"],
     "the following arguments are required: --features"),
    (["merge", "--output", "out", "--split", "train", "--shards", "2"], "unrecognized arguments: --shards 2"),
    (["extract", "--images", "photos", "--detector", "detr", "--output", "table", "--score_threshold", "high"],
     "argument --score_threshold/--score-threshold: invalid float value: 'high'"),
    (["shards", "--processor", "p", "--output", "out"], "one of the arguments --captions --dataset is required"),
    (["shards", "--processor", "p", "--output", "out", "--captions", "c.jsonl", "--dataset", "d"],
     "argument --dataset: not allowed with argument --captions"),
    (["shards", "--processor", "p", "--output", "out", "--captions", "c.jsonl"], "--captions needs --features"),
])
def test_command_line_refuses_a_bad_command_naming_the_flag(argv, message, capsys):
    """Each command's dataclasses (`HfArgumentParser`) refuse a bad command line as argparse does: exit status 2
    and a message naming the flag and the value, before anything is read."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_help_lists_the_commands(capsys):
    for argv, names in ((["--help"], ("build", "merge", "extract", "shards")),
                        (["build", "--help"], ("captions", "vqa", "nlvr2", "snli_ve", "refcoco")),
                        (["build", "refcoco", "--help"], ("--refs", "--instances", "--refs_split", "--num_shards"))):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert all(name in out for name in names), (argv, out)
