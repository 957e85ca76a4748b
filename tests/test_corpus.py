"""The joined view of a map-style corpus (`cmal_processing/corpus.py`): what a user does with the splits `load_corpus`
returns keeps each row's regions, and saving keeps only the images the rows use."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from datasets import Dataset
from torch.utils.data import DataLoader

from cmal_processing.corpus import (IMAGE_TABLE, corpus_features, image_table, join_regions, load_corpus, load_split,
                               save_corpus, separate_images, split_features)
from cmal_processing.schema import nlvr2_features, vqa_features

DIM = 6


def image(number: int, regions: int) -> dict:
    rng = np.random.default_rng(number)
    return {"image_id": f"img{number}", "image_width": 100 + number, "image_height": 50,
            "visual_feats": rng.normal(size=(regions, DIM)).astype(np.float16),
            "visual_pos": rng.uniform(size=(regions, 4)).astype(np.float32), "tags": [f"tag{number}"] * regions,
            "scores": rng.uniform(size=regions).astype(np.float32)}


def vqa_rows(count: int = 12, images: int = 4) -> list[dict]:
    return [{**image(index % images, 2 + index % images), "question_id": f"q{index}", "text": f"question {index}",
             "question_type": "what", "answer_ids": [index % 3], "answer_scores": [1.0]} for index in range(count)]


def joined(rows: list[dict], features) -> Dataset:
    task_rows, image_rows = separate_images(rows, [""] if "image_id" in features else ["_0", "_1"])
    task_features, image_features = split_features(features)
    return join_regions(Dataset.from_list(task_rows, features=task_features),
                        Dataset.from_list(image_rows, features=image_features))


def assert_rows_hold_their_images(rows, suffixes=("",)):
    for row in rows:
        for suffix in suffixes:
            number = int(str(row[f"image_id{suffix}"])[3:])
            expected = image(number, 2 + number % 4 if suffix == "" else 3)
            np.testing.assert_array_equal(row[f"visual_feats{suffix}"], expected["visual_feats"])
            assert row[f"image_width{suffix}"] == expected["image_width"]


def test_select_shuffle_filter_and_map_keep_the_join():
    rows = joined(vqa_rows(), vqa_features(DIM))
    assert corpus_features(rows) == vqa_features(DIM)
    assert_rows_hold_their_images([rows[index] for index in range(len(rows))])
    assert_rows_hold_their_images(rows.select([5, 0, 7]))
    assert_rows_hold_their_images(rows.shuffle(seed=3))
    kept = rows.filter(lambda row: row["image_width"] == 101)  # the filter sees the joined row
    assert len(kept) == 3 and {str(value) for value in kept["image_id"]} == {"img1"}
    assert_rows_hold_their_images(kept)
    longer = rows.map(lambda row: {"text": str(row["text"]) + "?"}, keep_in_memory=True)
    assert str(longer[0]["text"]) == "question 0?"
    assert_rows_hold_their_images(longer)
    # without the transform: the task table alone, as stored
    assert "visual_feats" not in rows.with_format(None)[0] and rows.with_format(None)[0]["answer_ids"] == [0]


def test_a_batch_is_joined_like_its_rows():
    rows = joined(vqa_rows(), vqa_features(DIM))
    batch = rows[2:6]
    for offset in range(4):
        np.testing.assert_array_equal(batch["visual_feats"][offset], rows[2 + offset]["visual_feats"])
        assert str(batch["image_id"][offset]) == str(rows[2 + offset]["image_id"])


def test_loader_workers_read_joined_rows(tmp_path):
    """The transform travels to DataLoader workers (fork or spawn: it pickles without its lookup index)."""
    save_corpus({"train": joined(vqa_rows(), vqa_features(DIM))}, tmp_path / "vqa")
    rows = load_corpus(tmp_path / "vqa")["train"]
    state = pickle.loads(pickle.dumps(rows))
    assert_rows_hold_their_images([state[index] for index in range(len(state))])
    loader = DataLoader(rows, batch_size=5, num_workers=2, collate_fn=list)
    seen = [row for batch in loader for row in batch]
    assert len(seen) == 12
    assert_rows_hold_their_images(seen)


def test_save_corpus_keeps_only_the_images_its_rows_use(tmp_path):
    rows = joined(vqa_rows(), vqa_features(DIM))
    save_corpus({"train": rows.select([1, 5]), "validation": rows}, tmp_path / "out")  # img1 only, then all four
    saved = load_corpus(tmp_path / "out")
    assert len(image_table(saved["train"])) == 1 and len(image_table(saved["validation"])) == 4
    assert (tmp_path / "out" / "train" / IMAGE_TABLE / "state.json").is_file()
    assert_rows_hold_their_images(saved["train"])
    assert [str(value) for value in saved["validation"]["question_id"]] == [f"q{index}" for index in range(12)]


def test_two_image_rows_join_each_slot():
    pairs = [{**{f"{name}_0": value for name, value in image(index, 3).items()},
              **{f"{name}_1": value for name, value in image(index + 1, 3).items()},
              "identifier": f"pair{index}", "text": "left and right", "label": index % 2} for index in range(3)]
    rows = joined(pairs, nlvr2_features(DIM))
    assert len(image_table(rows)) == 4  # img1 and img2 are in two pairs each, stored once
    assert corpus_features(rows) == nlvr2_features(DIM)
    assert_rows_hold_their_images(rows, suffixes=("_0", "_1"))


def test_a_folder_that_is_not_a_corpus_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a corpus folder.*dataset_dict.json"):
        load_corpus(tmp_path)
    Dataset.from_list([{"image_id": "a", "text": "no regions"}]).save_to_disk(str(tmp_path / "split"))
    with pytest.raises(FileNotFoundError, match="it is one split: use load_split"):
        load_corpus(tmp_path / "split")
    with pytest.raises(ValueError, match="no region columns and no image table"):
        load_split(tmp_path / "split")
