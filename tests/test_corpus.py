"""The joined view of a map-style corpus (`cmal_processing/corpus.py`): what a user does with the splits `load_corpus`
returns keeps each row's regions, and saving keeps only the images the rows use."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from datasets import Dataset, Features, Value
from torch.utils.data import DataLoader

from cmal_processing.corpus import (IMAGE_TABLE, binary_image_table, corpus_features, image_feature_dim, image_table,
                                    join_regions, load_corpus, load_split, save_corpus, separate_images,
                                    split_features)
from cmal_processing.schema import (REGION_COLUMNS, STORED_REGION_COLUMNS, decode_regions, encode_regions,
                                    image_table_features, nlvr2_features, region_features, vqa_features)

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


def test_the_image_table_stores_each_images_arrays_as_binary_buffers():
    """The one on-disk encoding (schema.REGION_FIELDS): width and count beside little-endian buffers, which decode
    to what was written (float16 features, float32 boxes)."""
    rows = joined(vqa_rows(), vqa_features(DIM))
    images = image_table(rows)
    assert images.column_names == list(STORED_REGION_COLUMNS) and images.features == image_table_features()
    stored = images.with_format(None)[1]
    assert (stored["num_regions"], stored["feature_dim"]) == (3, DIM)
    feats, pos = decode_regions(stored["num_regions"], stored["feature_dim"], stored["visual_feats"],
                                stored["visual_pos"])
    np.testing.assert_array_equal(feats, image(1, 3)["visual_feats"])
    np.testing.assert_array_equal(pos, image(1, 3)["visual_pos"])
    assert feats.dtype == pos.dtype == np.float32 and feats.flags.writeable
    assert image_feature_dim(images) == DIM
    with pytest.raises(ValueError, match="num_regions 4 x feature_dim 6"):
        decode_regions(4, DIM, stored["visual_feats"], stored["visual_pos"])
    with pytest.raises(ValueError, match="'big'.*beyond float16"):
        encode_regions({**image(0, 2), "image_id": "big", "visual_feats": np.full((2, DIM), 1e6, np.float32)})
    with pytest.raises(ValueError, match="'odd'.*visual_pos \\[M, 4\\]"):
        encode_regions({**image(0, 2), "image_id": "odd", "visual_pos": np.zeros((3, 4))})


def test_a_corpus_folder_of_the_earlier_array_layout_still_reads(tmp_path):
    """Image tables written before the binary encoding (Array2D region columns) read as they did, equal row for
    row, and `binary_image_table` re-encodes them to the one layout."""
    rows = joined(vqa_rows(), vqa_features(DIM))
    save_corpus({"train": rows}, tmp_path / "now")
    numbers = sorted({int(str(value)[3:]) for value in rows["image_id"]})
    earlier = Dataset.from_list([{name: image(number, 2 + number % 4)[name] for name in REGION_COLUMNS}
                                 for number in numbers],
                                features=Features({"image_id": Value("string"), **region_features(DIM)}))
    save_corpus({"train": join_regions(rows.with_format(None), earlier)}, tmp_path / "earlier")
    old, new = load_corpus(tmp_path / "earlier")["train"], load_corpus(tmp_path / "now")["train"]
    assert image_table(old).features["visual_feats"] == region_features(DIM)["visual_feats"]  # as it was written
    assert corpus_features(old) == corpus_features(new) == vqa_features(DIM)
    assert_rows_hold_their_images(old)
    for index in range(len(new)):
        for name in ("visual_feats", "visual_pos", "scores", "tags", "image_width"):
            np.testing.assert_array_equal(old[index][name], new[index][name])
    for name in ("visual_feats", "visual_pos"):  # batches of mixed and of equal region counts
        for selection in (slice(0, 4), [0, 4, 8]):
            for left, right in zip(old[selection][name], new[selection][name], strict=True):
                np.testing.assert_array_equal(left, right)
            assert type(old[selection][name]) is type(new[selection][name])
            assert old[selection][name].dtype == new[selection][name].dtype
    assert binary_image_table(image_table(old)).to_dict() == image_table(new).to_dict()
