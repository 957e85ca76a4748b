"""`python -m cmal_processing extract`: photos → the image table, through a tiny random DETR-family detector saved to
a folder, in shards that a rerun keeps; the table feeds the builders and the streamed corpus."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_detector

from cmal_processing.__main__ import main as cli
from cmal_processing.extract import decode_region_row, extract_regions, list_images, read_region_table
from cmal_processing.readers import RegionFeatureIndex

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_DIM = 16


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A randomly initialised YOLOS detector and its image processor, saved to a folder."""
    return save_tiny_detector(tmp_path_factory.mktemp("detector"), FEATURE_DIM, ["cup", "cat", "man"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image's photos as JPEG/PNG files, plus an unreadable file and a tiny image."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
    Image.fromarray(data.camera()).save(folder / "nested_camera.png")
    (folder / "broken.jpg").write_bytes(b"not a JPEG at all")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "tiny.png")
    return folder


def test_photos_become_the_image_table_and_reruns_keep_finished_shards(tmp_path, photos, detector):
    output = tmp_path / "table"
    summary = extract_regions(photos, detector, output, batch_size=2, images_per_shard=3, progress=False)
    assert (summary.images, summary.rows_written, summary.shards_written) == (7, 5, 3)
    assert summary.skipped.counts == {"unreadable": 1, "too_small": 1}
    assert "unreadable: 1" in summary.format() or "unreadable" in summary.format()
    located = read_region_table(output)
    assert sorted(located) == ["astronaut", "chelsea", "coffee", "nested_camera", "rocket"]
    path, row = located["coffee"]
    regions = decode_region_row(pq.read_table(path).to_pylist()[row])
    assert regions["visual_feats"].shape[1] == FEATURE_DIM and regions["image_size"] == (600, 400)
    assert len(regions["tags"]) == regions["visual_feats"].shape[0] == regions["visual_pos"].shape[0] > 0
    info = json.loads((output / "region_table.json").read_text())
    assert info["feature_dim"] == FEATURE_DIM and len(info["shards"]) == 3

    (output / "regions-00001.parquet").unlink()  # a crash before shard 1 finished
    again = extract_regions(photos, detector, output, batch_size=2, images_per_shard=3, progress=False)
    assert (again.shards_kept, again.shards_written) == (2, 1)
    assert sorted(read_region_table(output)) == sorted(located)

    index = RegionFeatureIndex(output)  # every builder's --features reads the table
    assert len(index) == 5 and index.feature_dim() == FEATURE_DIM
    np.testing.assert_allclose(index.get("coffee")["visual_feats"], regions["visual_feats"])


def test_no_detection_above_the_threshold_is_empty(tmp_path, photos, detector):
    summary = extract_regions([photos / "coffee.jpg", photos / "rocket.jpg"], detector, tmp_path / "t",
                              score_threshold=0.999, progress=False)
    assert summary.rows_written == 0 and summary.skipped.counts == {"empty": 2}


def test_the_command_line_and_a_list_file(tmp_path, photos, detector, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{photos / 'coffee.jpg'}\n{photos / 'chelsea.jpg'}\n")
    assert [image_id for image_id, _ in list_images(listing)] == ["coffee", "chelsea"]
    assert cli(["extract", "--images", str(listing), "--detector", str(detector), "--output",
                str(tmp_path / "out")]) == 0
    assert "rows written: 2" in capsys.readouterr().out
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": image_id, "caption": f"a cat near a cup in {image_id}"}) + "\n"
                                for image_id in ("coffee", "chelsea")))
    assert cli(["build", "captions", "--captions", str(captions), "--features", str(tmp_path / "out"),
                "--output", str(tmp_path / "corpus"), "--split", "train"]) == 0


def test_bad_arguments_name_themselves(tmp_path, photos, detector):
    with pytest.raises(FileNotFoundError, match="images"):
        extract_regions(tmp_path / "nowhere", detector, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        extract_regions(photos, detector, tmp_path / "o", batch_size=0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image file"):
        extract_regions(empty, detector, tmp_path / "o", progress=False)


WORKER = """
import sys
from cmal_processing.extract import extract_regions
summary = extract_regions(sys.argv[1], sys.argv[2], sys.argv[3], images_per_shard=2, progress=False)
# One write per line: the two processes share the pipe, and print() writes its arguments piece by piece.
sys.stdout.write(f"shards {summary.shards_written} images {summary.images}\\n")
sys.stdout.flush()
"""


def test_two_processes_share_the_shards(tmp_path, photos, detector):
    """What `accelerate launch --num_processes 2 -m cmal_processing extract` does: two ranks (gloo), disjoint shards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
                           "--main_process_port", str(port), str(script), str(photos), str(detector),
                           str(tmp_path / "o")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = sorted(line for line in done.stdout.splitlines() if line.startswith("shards"))
    assert outputs == ["shards 2 images 3", "shards 2 images 4"], done.stdout
    assert len(read_region_table(tmp_path / "o")) == 5


def test_photos_to_a_streamed_corpus(tmp_path, photos, detector, bert_dir):
    """The path of docs/data.md: photos → image table → streamed corpus → a pre-training batch."""
    from transformers import BertTokenizer

    from modeling_cmal.collator_cmal import CmalPretrainingCollator
    from modeling_cmal.processing_cmal import CmalProcessor
    from cmal_processing.shards import open_streaming_corpus

    extract_regions(photos, detector, tmp_path / "table", progress=False)
    processor = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32))
    processor.save_pretrained(tmp_path / "processor")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": image_id, "caption": f"a cat and a man {number}"}) + "\n"
                                for image_id in ("coffee", "chelsea", "astronaut", "missing") for number in range(2)))
    assert cli(["shards", "--captions", str(captions), "--features", str(tmp_path / "table"), "--processor",
                str(tmp_path / "processor"), "--output", str(tmp_path / "corpus")]) == 0
    rows = list(open_streaming_corpus(tmp_path / "corpus", processor=processor))
    assert len(rows) == 6
    batch = CmalPretrainingCollator(processor, seed=0)(rows)
    assert batch["visual_feats"].shape[::2] == (6, FEATURE_DIM) and "mlm_positions" in batch
