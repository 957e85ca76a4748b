"""Streamed corpora (cmal_processing/shards.py): each image stored once, tokenised and anchored at build time, Parquet
shards read per process with exact resume, and the collator's pre-tokenised path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_cmal.collator_cmal import CmalPretrainingCollator
from modeling_cmal.configuration_cmal import ANCHOR_RATE_FIELDS
from modeling_cmal.processing_cmal import processor_identity
from modeling_cmal.processing_cmal import CmalProcessor
from cmal_processing.shards import (convert_caption_dataset, open_streaming_corpus, read_corpus_info,
                               write_image_shards)

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_DIM = 16
OBJECTS = ["cup", "dog", "cat", "car", "bus", "man", "woman", "tree", "horse", "bicycle", "umbrella", "bench"]


def make_images(count: int, captions_per_image: int = 3, seed: int = 0) -> list[tuple[dict, list[str]]]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        tags = [str(tag) for tag in rng.choice(OBJECTS, size=int(rng.integers(2, 6)), replace=False)]
        x1, y1 = rng.uniform(0, 0.5, (2, len(tags)))
        regions = {"image_id": f"image-{index:04d}",
                   "visual_feats": rng.standard_normal((len(tags), FEATURE_DIM)).astype(np.float32),
                   "visual_pos": np.stack([x1, y1, x1 + 0.3, y1 + 0.4], 1).astype(np.float32),
                   "tags": tags, "scores": rng.uniform(0.2, 1.0, len(tags)).astype(np.float32)}
        captions = [f"picture {index}.{number}: a {tags[0]} near the {tags[-1]} and a {rng.choice(OBJECTS)}"
                    for number in range(captions_per_image)]
        images.append((regions, captions))
    return images


@pytest.fixture(scope="module")
def processor(bert_dir):
    from transformers import BertTokenizer

    return CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    output = tmp_path_factory.mktemp("streamed") / "corpus"
    info = write_image_shards(make_images(24), output, processor, images_per_shard=6, progress=False)
    return output, info


def test_each_image_is_stored_once_with_its_captions(corpus, processor):
    output, info = corpus
    assert (info["images"], info["captions"], len(info["shards"])) == (24, 72, 4)
    assert info["feature_dim"] == FEATURE_DIM and info["processor_identity"] == processor_identity(processor)
    assert read_corpus_info(output) == info
    rows = list(open_streaming_corpus(output, processor=processor))
    assert len(rows) == 72 and len({row["image_id"] for row in rows}) == 24
    assert all(len(row["visual_feats"]) == row["num_regions"] * FEATURE_DIM * 2 for row in rows)


def test_stored_tokens_and_anchors_are_the_processors(corpus, processor):
    output, _ = corpus
    images = {regions["image_id"]: regions for regions, _ in make_images(24)}
    for row in list(open_streaming_corpus(output))[:30]:
        expected = processor(text=row["text"], regions=images[row["image_id"]], return_tensors="np")
        assert row["input_ids"] == expected["input_ids"][0].tolist()
        table = np.asarray(row["anchor_rows"], dtype=np.int64).reshape(-1, 3)
        np.testing.assert_array_equal(table[:, :2], expected["anchor_pairs"][0])
        np.testing.assert_array_equal(table[:, 2], expected["anchor_concept_ids"][0])
        feats = np.frombuffer(row["visual_feats"], "<f2").reshape(row["num_regions"], FEATURE_DIM)
        count = int(expected["visual_attention_mask"][0].sum())
        np.testing.assert_allclose(feats, expected["visual_feats"][0, :count].astype(np.float16))


@pytest.mark.parametrize("hard_negative_rate", [0.0, 1.0])
def test_pretokenised_batch_equals_the_processed_one(corpus, processor, hard_negative_rate):
    """Same seed, same rows: the stored path and the processor path give the same batch, negatives included (edited
    captions too: the stored path tokenises and anchors them as the processor does)."""
    output, _ = corpus
    rows = list(open_streaming_corpus(output))[:16]
    raw = [{"image_id": row["image_id"], "text": row["text"], "tags": row["tags"], "scores": np.asarray(row["scores"]),
            "visual_feats": np.frombuffer(row["visual_feats"], "<f2").reshape(-1, FEATURE_DIM),
            "visual_pos": np.frombuffer(row["visual_pos"], "<f4").reshape(-1, 4)} for row in rows]
    collator = CmalPretrainingCollator(processor, seed=5, itm_negative_rate=0.5,
                                       itm_hard_negative_rate=hard_negative_rate)
    stored, processed = collator(rows), collator(raw)
    if hard_negative_rate:  # the same draws without masks or fills: some negatives carry an edited caption
        plain = CmalPretrainingCollator(processor, seed=5, itm_negative_rate=0.5, itm_hard_negative_rate=1.0,
                                        mlm_probability=0.0, itm_clean_rate=0.0,
                                        **{name: 0.0 for name in ANCHOR_RATE_FIELDS})(rows)
        stored_captions = [list(row["input_ids"]) for row in rows]
        pad = processor.tokenizer.pad_token_id
        shown = [[piece for piece in ids if piece != pad] for ids in plain["input_ids"].tolist()]
        assert any(ids not in stored_captions for ids in shown)
    assert stored["itm_labels"].min() == 0  # some negatives: their anchors were found anew
    assert set(stored) == set(processed)
    for name in stored:
        assert torch.equal(stored[name], processed[name]), name


def test_another_processor_is_refused(corpus, processor, bert_dir):
    from transformers import BertTokenizer

    from modeling_cmal.anchoring import ConceptLexicon

    output, _ = corpus
    other = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32),
                          lexicon=ConceptLexicon.from_dict({**processor.lexicon.to_dict(), "concepts":
                                                            processor.lexicon.to_dict()["concepts"][:-1]}))
    with pytest.raises(ValueError, match="another tokenizer vocabulary or lexicon"):
        open_streaming_corpus(output, processor=other)
    rows = list(open_streaming_corpus(output).take(4))
    with pytest.raises(ValueError, match="another tokenizer vocabulary or lexicon"):
        CmalPretrainingCollator(other)(rows)


def test_single_table_corpus_is_refused_then_converted(tmp_path, processor):
    from datasets import Dataset

    rows = [{"image_id": regions["image_id"], "text": caption, "visual_feats": regions["visual_feats"],
             "visual_pos": regions["visual_pos"], "tags": regions["tags"], "scores": regions["scores"]}
            for regions, captions in make_images(5) for caption in captions]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="map-style corpus.*rebuild"):
        open_streaming_corpus(tmp_path / "old")
    info = convert_caption_dataset(tmp_path / "old", tmp_path / "new", processor, progress=False)
    assert (info["images"], info["captions"]) == (5, 15)


def test_bad_arguments_name_themselves(corpus, tmp_path):
    output, _ = corpus
    with pytest.raises(ValueError, match="rank must be in"):
        open_streaming_corpus(output, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="corpus_info.json"):
        open_streaming_corpus(tmp_path / "nothing")


@pytest.mark.parametrize("shuffle_seed, stop", [(None, 29), (3, 7), (3, 50)])
def test_resumed_reader_continues_at_the_same_row(corpus, shuffle_seed, stop):
    output, _ = corpus
    options = dict(shuffle_seed=shuffle_seed, shuffle_buffer=4)
    full = [row["text"] for row in open_streaming_corpus(output, **options)]
    if shuffle_seed is not None:
        assert full != [row["text"] for row in open_streaming_corpus(output)] and sorted(full) == sorted(
            row["text"] for row in open_streaming_corpus(output))
    reader = open_streaming_corpus(output, **options)
    seen, state = [], None
    for row in reader:
        seen.append(row["text"])
        if len(seen) == stop:
            state = reader.state_dict()
            break
    resumed = open_streaming_corpus(output, **options)
    resumed.load_state_dict(state)
    assert seen + [row["text"] for row in resumed] == full


WORKER = """
import json, os, sys
from cmal_processing.shards import open_streaming_corpus
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
reader = open_streaming_corpus(sys.argv[1], rank=rank, world_size=world)
rows = [row["text"] for row in reader]
json.dump({"rows": rows}, open(sys.argv[2], "w"))
"""


def test_two_processes_read_disjoint_shares(corpus, tmp_path):
    output, _ = corpus
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(output), str(tmp_path / f"{rank}.json")],
                                      cwd=REPO_ROOT, env=env))
    assert [proc.wait(timeout=600) for proc in procs] == [0, 0]
    shares = [json.loads((tmp_path / f"{rank}.json").read_text())["rows"] for rank in range(2)]
    everything = [row["text"] for row in open_streaming_corpus(output)]
    assert len(shares[0]) == len(shares[1]) == 36  # 4 shards: two each
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(everything)


def test_half_precision_features_for_the_loader(corpus, processor):
    output, _ = corpus
    rows = list(open_streaming_corpus(output))[:8]
    full = CmalPretrainingCollator(processor, seed=1)(rows)
    half = CmalPretrainingCollator(processor, seed=1, visual_feats_dtype="float16")(rows)
    assert half["visual_feats"].dtype == torch.float16 and torch.equal(half["visual_feats"].float(), full["visual_feats"])
    with pytest.raises(ValueError, match="visual_feats_dtype must be"):
        CmalPretrainingCollator(processor, visual_feats_dtype="int8")


def test_resumed_build_keeps_finished_shards(tmp_path, processor):
    images = make_images(10)
    first = write_image_shards(images, tmp_path / "c", processor, images_per_shard=4, progress=False)
    with pytest.raises(ValueError, match="already holds a corpus"):
        write_image_shards(images, tmp_path / "c", processor, images_per_shard=4, progress=False)
    (tmp_path / "c" / "images-00001.parquet").unlink()
    kept = (tmp_path / "c" / "images-00000.parquet").stat().st_mtime_ns
    again = write_image_shards(images, tmp_path / "c", processor, images_per_shard=4, resume=True, progress=False)
    assert again == first and (tmp_path / "c" / "images-00000.parquet").stat().st_mtime_ns == kept
    assert (tmp_path / "c" / "images-00001.parquet").is_file()


def test_build_arguments_name_themselves(tmp_path, processor):
    with pytest.raises(ValueError, match="processor must be a CmalProcessor"):
        write_image_shards(make_images(2), tmp_path / "a", object(), progress=False)
    with pytest.raises(ValueError, match=r"max_length must be None or an int >= 2 \(the special tokens\), got 0"):
        write_image_shards(make_images(2), tmp_path / "b", processor, max_length=0, progress=False)
    with pytest.raises(ValueError, match="images_per_shard must be an int >= 1, got 0"):
        write_image_shards(make_images(2), tmp_path / "c", processor, images_per_shard=0, progress=False)
    with pytest.raises(ValueError, match="captions of image 'image-0000' must be a list of str"):
        write_image_shards([(make_images(1)[0][0], "one caption")], tmp_path / "d", processor, progress=False)
