"""Region-feature readers (BUTD .tsv, bottom-up-attention.pytorch .npz), the restricted unpickler and SkipCounter.

Fixtures are written here in the exact public layouts: LXMERT's tsv columns with base64 little-endian buffers, and
`np.savez_compressed(x=, bbox=, num_bbox=, image_h=, image_w=, info={...})` as bottom-up-attention.pytorch does.
`write_butd_tsv`, `butd_fields` and `write_npz` are imported by test_builders.py.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmal_processing import (
    CorruptRegionsError,
    RegionFeatureIndex,
    SkipCounter,
    load_tag_vocab,
    read_npz_regions,
    read_region_features,
)
from cmal_processing.readers import parse_tsv_fields
from cmal_processing.safe_pickle import UnsafePickleError, safe_loads

VG_VOCAB = load_tag_vocab()


def make_regions(image_id: str, num_boxes: int, feature_dim: int, *, width=640, height=480, seed=0) -> dict:
    """A `regions` dict with distinct values (ids index the Visual Genome vocabulary)."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width / 2, num_boxes)
    y1 = rng.uniform(0, height / 2, num_boxes)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, width / 2, num_boxes), y1 + rng.uniform(1, height / 2, num_boxes)], 1)
    object_ids = rng.integers(0, len(VG_VOCAB), num_boxes)
    return {
        "image_id": image_id,
        "features": rng.uniform(0, 5, (num_boxes, feature_dim)).astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "image_size": (width, height),
        "object_ids": object_ids.astype(np.int64),
        "tags": [VG_VOCAB[i] for i in object_ids],
        "scores": rng.uniform(0, 1, num_boxes).astype(np.float32),
    }


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def butd_fields(regions: dict, id_offset: int = 0) -> list[str]:
    """The 10 LXMERT tsv columns of one image, in order."""
    num_boxes = len(regions["scores"])
    width, height = regions["image_size"]
    return [
        regions["image_id"], str(height), str(width),
        _b64(regions["object_ids"] + id_offset, "<i8"), _b64(regions["scores"], "<f4"),
        _b64(np.zeros(num_boxes), "<i8"), _b64(np.zeros(num_boxes), "<f4"),
        str(num_boxes), _b64(regions["boxes"], "<f4"), _b64(regions["features"], "<f4"),
    ]


def write_butd_tsv(path, rows: list[list[str]]) -> None:
    """Lines as csv.DictWriter(delimiter="\\t") wrote them (CRLF line ends)."""
    with open(path, "w", newline="") as file:
        for fields in rows:
            file.write("\t".join(fields) + "\r\n")


def write_npz(folder, regions: dict, *, info_extra: dict | None = None, **overrides) -> None:
    """One bottom-up-attention.pytorch file: `<folder>/<image_id>.npz`."""
    width, height = regions["image_size"]
    info = {"objects_id": regions["object_ids"], "objects_conf": regions["scores"],
            "attrs_id": np.zeros(len(regions["scores"]), np.int64), **(info_extra or {})}
    arrays = dict(x=regions["features"], bbox=regions["boxes"], num_bbox=len(regions["scores"]), image_h=height,
                  image_w=width, info=info)
    arrays.update(overrides)
    np.savez_compressed(os.path.join(folder, regions["image_id"]), **arrays)


def assert_regions_equal(read: dict, expected: dict) -> None:
    assert read["image_id"] == expected["image_id"]
    assert read["visual_feats"].dtype == np.float32 and read["visual_feats"].shape == expected["features"].shape
    np.testing.assert_array_equal(read["visual_feats"], expected["features"])
    assert read["visual_pos"].dtype == np.float32
    np.testing.assert_array_equal(read["visual_pos"], expected["boxes"])
    assert read["image_size"] == expected["image_size"]
    assert read["tags"] == expected["tags"]
    assert read["scores"].dtype == np.float32
    np.testing.assert_array_equal(read["scores"], expected["scores"])


class Evil:
    """Unpickling calls os.system(command): what a tampered file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# --------------------------------------------------------------------------------------------------------------
# BUTD tsv
# --------------------------------------------------------------------------------------------------------------


def test_tsv_reads_images_and_counts_corrupt_rows(tmp_path):
    images = [make_regions(f"COCO_val2014_{i:012d}", num_boxes=3 + i, feature_dim=2048, seed=i) for i in range(3)]
    bad_base64 = butd_fields(make_regions("bad_b64", 2, 2048, seed=7))
    bad_base64[9] = bad_base64[9][:-5] + "!!!!="
    wrong_size = butd_fields(make_regions("wrong_size", 2, 2048, seed=8))
    wrong_size[8] = _b64(np.zeros(7), "<f4")  # 7 floats where 2 boxes need 8
    path = tmp_path / "val2014_obj36.tsv"
    write_butd_tsv(path, [butd_fields(images[0]), bad_base64, butd_fields(images[1]), wrong_size,
                          butd_fields(images[2])])

    errors = SkipCounter()
    read = list(read_region_features(path, errors=errors))

    assert [r["image_id"] for r in read] == [image["image_id"] for image in images]
    for got, expected in zip(read, images):
        assert_regions_equal(got, expected)
    assert read[0]["visual_feats"].shape == (3, 2048) and read[0]["image_size"] == (640, 480)
    assert errors.counts == {"bad_base64": 1, "wrong_buffer_size": 1}
    assert "line 2 (image 'bad_b64')" in errors.examples["bad_base64"][0]
    assert "'boxes'" in errors.examples["wrong_buffer_size"][0]


@pytest.mark.parametrize(
    "column, value, reason",
    [
        (1, "tall", "malformed_row"),                      # img_h not an integer
        (7, "0", "no_regions"),                            # num_boxes 0
        (2, "-5", "bad_image_size"),                       # img_w negative
        (3, _b64(np.zeros(3), "<i8"), "wrong_buffer_size"),  # 3 object ids for 2 boxes
        (9, _b64(np.zeros(2 * 2048 + 1), "<f4"), "wrong_buffer_size"),  # feature size not a multiple of num_boxes
        (9, _b64(np.full(2 * 2048, np.nan), "<f4"), "non_finite"),
        (3, _b64(np.array([0, 1600]), "<i8"), "tag_id_out_of_range"),
    ],
)
def test_tsv_corrupt_row_reasons(tmp_path, column, value, reason):
    fields = butd_fields(make_regions("img", 2, 2048))
    fields[column] = value
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [fields, fields[:8]])  # the second line lacks two columns
    errors = SkipCounter()
    assert list(read_region_features(path, errors=errors)) == []
    expected = {"malformed_row": 2} if reason == "malformed_row" else {reason: 1, "malformed_row": 1}
    assert errors.counts == expected


def _box_fields(boxes) -> list[str]:
    regions = make_regions("img", 2, 8)
    regions["boxes"] = np.asarray(boxes, np.float32)
    return butd_fields(regions)


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[10, 10, 5, 20], [0, 0, 10, 10]], "box 0 .* is inverted"),             # x2 < x1
        ([[0, 0, 10, 10], [10, 30, 20, 20]], "box 1 .* is inverted"),            # y2 < y1
        ([[0, 0, 10, 10], [700, 10, 800, 20]], "box 1 .* wholly outside the 640x480 image"),  # right of the image
        ([[-30, -30, -10, -10], [0, 0, 10, 10]], "box 0 .* wholly outside"),     # above and left
        ([[0, 480, 10, 500], [0, 0, 10, 10]], "box 0 .* wholly outside"),        # starts at the bottom edge
    ],
)
def test_tsv_rows_with_inverted_or_outside_boxes_are_counted_skips(tmp_path, boxes, message):
    good = make_regions("good", 2, 8, seed=1)
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [_box_fields(boxes), butd_fields(good)])
    errors = SkipCounter()
    read = list(read_region_features(path, errors=errors))
    assert [regions["image_id"] for regions in read] == ["good"]
    assert errors.counts == {"bad_box": 1}
    assert re.search(message, errors.examples["bad_box"][0]) and "line 1 (image 'img')" in errors.examples["bad_box"][0]


def test_boxes_partly_past_the_edge_are_kept_for_the_builders_to_clip(tmp_path):
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [_box_fields([[-5, 10, 700, 500], [0, 0, 10, 10]])])
    (read,) = read_region_features(path)
    np.testing.assert_array_equal(read["visual_pos"][0], [-5, 10, 700, 500])


def test_id_offset_out_of_range_is_an_argument_error(tmp_path):
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [butd_fields(make_regions("img", 2, 4))])
    for call in (lambda: read_region_features(path, id_offset=2**70),
                 lambda: RegionFeatureIndex(path, id_offset=-(2**70)),
                 lambda: parse_tsv_fields(_box_fields([[0, 0, 1, 1], [0, 0, 1, 1]]), VG_VOCAB, id_offset=2**70)):
        with pytest.raises(ValueError, match=r"id_offset must be an int between .* got 1180591620717411303424|"
                                             r"id_offset must be an int between .* got -1180591620717411303424"):
            call()
    folder = tmp_path / "npz"
    folder.mkdir()
    write_npz(folder, make_regions("img", 2, 4))
    with pytest.raises(ValueError, match="id_offset"):
        read_npz_regions(folder / "img.npz", id_offset=2**70)


def test_id_offset_and_custom_vocabulary(tmp_path):
    vocab_file = tmp_path / "objects_vocab.txt"
    vocab_file.write_text("background\nstop sign,stopsign\ndog\n")
    regions = make_regions("img", 2, 4)
    regions["object_ids"] = np.array([0, 1])
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [butd_fields(regions, id_offset=1)])
    (read,) = read_region_features(path, vocab_file, id_offset=1)
    assert read["tags"] == ["background", "stop sign"]
    errors = SkipCounter()
    assert list(read_region_features(path, ["only one"], id_offset=1, errors=errors)) == []
    assert errors["tag_id_out_of_range"] == 1
    with pytest.raises(TypeError, match="id_offset"):
        read_region_features(path, id_offset=1.5)
    with pytest.raises(FileNotFoundError, match="path .*missing.tsv"):
        read_region_features(tmp_path / "missing.tsv")


@settings(max_examples=25, deadline=None)
@given(num_boxes=st.integers(1, 6), feature_dim=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_tsv_round_trip(num_boxes, feature_dim, seed):
    regions = make_regions(f"image-{seed}", num_boxes, feature_dim, seed=seed)
    fields = [field.encode() for field in butd_fields(regions)]
    assert_regions_equal(parse_tsv_fields(fields, VG_VOCAB), regions)


def test_skips_are_logged_without_a_counter(tmp_path, caplog):
    fields = butd_fields(make_regions("img", 2, 4))
    fields[4] = "%%%"
    path = tmp_path / "features.tsv"
    write_butd_tsv(path, [fields])
    with caplog.at_level(logging.WARNING):
        assert list(read_region_features(path)) == []
    assert "bad_base64" in caplog.text and "region rows skipped in features.tsv: 1" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# bottom-up-attention.pytorch npz and the restricted unpickler
# --------------------------------------------------------------------------------------------------------------


def test_npz_folder_reads_images_and_refuses_malicious_pickle(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    images = [make_regions(f"{i:06d}", num_boxes=2 + i, feature_dim=2048, width=500, height=375, seed=i)
              for i in range(2)]
    for regions in images:
        write_npz(folder, regions)
    marker = tmp_path / "pwned"
    write_npz(folder, make_regions("000009", 2, 2048), info_extra={"payload": Evil(f"touch {marker}")})
    (folder / "notes.txt").write_text("not a feature file")

    # The fixture is really malicious: numpy's own pickle loading runs the payload.
    with np.load(folder / "000009.npz", allow_pickle=True) as npz:
        npz["info"]
    assert marker.exists()
    marker.unlink()

    errors = SkipCounter()
    read = list(read_region_features(folder, errors=errors))
    assert [r["image_id"] for r in read] == ["000000", "000001"]
    for got, expected in zip(read, images):
        assert_regions_equal(got, expected)
    assert errors.counts == {"unsafe_pickle": 1}
    assert "forbidden global 'posix.system'" in errors.examples["unsafe_pickle"][0]
    with pytest.raises(CorruptRegionsError, match="forbidden global 'posix.system'") as raised:
        read_npz_regions(folder / "000009.npz")
    assert raised.value.reason == "unsafe_pickle"
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"info": {"objects_id": np.zeros(2, np.int64)}}, "missing_key"),
        ({"num_bbox": 5}, "bad_shape"),
        ({"bbox": np.zeros((2, 3), np.float32)}, "bad_shape"),
        ({"image_w": 0}, "bad_image_size"),
        ({"x": np.full((2, 8), np.inf, np.float32)}, "non_finite"),
        ({"info": "not a dict"}, "missing_key"),
    ],
)
def test_npz_corrupt_file_reasons(tmp_path, overrides, reason):
    write_npz(tmp_path, make_regions("img", 2, 8), **overrides)
    with pytest.raises(CorruptRegionsError) as raised:
        read_npz_regions(tmp_path / "img.npz")
    assert raised.value.reason == reason


@pytest.mark.parametrize(
    "overrides, reason, message",
    [
        ({"num_bbox": np.inf}, "bad_shape", "'num_bbox' must be one finite integer, got inf"),
        ({"num_bbox": np.complex128(2)}, "bad_shape", "'num_bbox' must be one integer, got complex128"),
        ({"num_bbox": np.nan}, "bad_shape", "'num_bbox' must be one finite integer"),
        ({"image_w": np.inf}, "bad_image_size", "'image_w' must be one finite integer, got inf"),
        ({"image_h": -np.inf}, "bad_image_size", "'image_h' must be one finite integer, got -inf"),
        ({"image_w": np.complex64(640 + 1j)}, "bad_image_size", "'image_w' must be one integer, got complex64"),
        ({"image_h": 2.5}, "bad_image_size", "'image_h' must be one finite integer, got 2.5"),
        ({"x": np.full((2, 8), 1e300)}, "non_finite", "features hold NaN or inf \\(or values beyond float32\\)"),
        ({"bbox": np.full((2, 4), -1e300)}, "non_finite", "boxes hold NaN or inf"),
        ({"x": np.ones((2, 8), np.complex128)}, "bad_shape", "features hold complex numbers"),
        ({"x": np.zeros((2, 0), np.float32)}, "bad_shape",
         "features of shape \\(2, 0\\); expected \\[N, D\\] with D >= 1"),
        ({"bbox": np.array([[0, 0, 10, 10], [50, 50, 40, 60]], np.float32)}, "bad_box", "box 1 .* is inverted"),
        ({"bbox": np.array([[0, 0, 10, 10], [900, 0, 950, 60]], np.float32)}, "bad_box", "wholly outside the 640x480"),
    ],
)
def test_npz_non_finite_complex_or_empty_members_are_counted_skips(tmp_path, overrides, reason, message):
    """Each used to raise OverflowError / TypeError (ending the whole folder read) or to give unusable regions."""
    write_npz(tmp_path, make_regions("bad", 2, 8), **overrides)
    write_npz(tmp_path, make_regions("good", 2, 8, seed=1))
    with pytest.raises(CorruptRegionsError, match=message) as raised:
        read_npz_regions(tmp_path / "bad.npz")
    assert raised.value.reason == reason
    errors = SkipCounter()
    read = list(read_region_features(tmp_path, errors=errors))
    assert [regions["image_id"] for regions in read] == ["good"]
    assert errors.counts == {reason: 1} and errors.examples[reason][0].startswith("bad.npz: ")


def test_npz_zero_width_features_of_three_regions_are_a_counted_skip(tmp_path):
    regions = make_regions("img", 3, 8)
    write_npz(tmp_path, regions, x=np.zeros((3, 0), np.float32))
    errors = SkipCounter()
    assert list(read_region_features(tmp_path, errors=errors)) == []
    assert errors.counts == {"bad_shape": 1} and "(3, 0)" in errors.examples["bad_shape"][0]


def test_npz_unreadable_or_incomplete_files(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "partial.npz", x=np.zeros((2, 4), np.float32))
    errors = SkipCounter()
    assert list(read_region_features(tmp_path, errors=errors)) == []
    assert errors.counts == {"missing_key": 1, "unreadable_file": 1}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_pickle_admits_numpy_and_plain_containers(protocol):
    value = {"objects_id": np.arange(3, dtype=np.int64), "objects_conf": np.float32(0.5), "dtype": np.dtype("f4"),
             "nested": [1, 2.5, "x", None, True, (np.int64(3), np.float32)], "matrix": np.ones((2, 3)).T}
    loaded = safe_loads(pickle.dumps(value, protocol=protocol))
    assert loaded.keys() == value.keys()
    np.testing.assert_array_equal(loaded["objects_id"], value["objects_id"])
    np.testing.assert_array_equal(loaded["matrix"], value["matrix"])
    assert loaded["objects_conf"] == np.float32(0.5) and loaded["dtype"] == np.dtype("f4")
    assert loaded["nested"] == value["nested"]


@pytest.mark.parametrize(
    "payload, forbidden",
    [
        (Evil("true"), "posix.system"),
        (type("EvalReduce", (), {"__reduce__": lambda self: (eval, ("1 + 1",))})(), "builtins.eval"),
        (SkipCounter(), "cmal_processing.skips.SkipCounter"),
        (b"raw bytes", "_codecs.encode"),  # protocol 2 pickles bytes as _codecs.encode(str, 'latin1') ...
    ],
)
def test_safe_pickle_refuses_other_globals(payload, forbidden):
    data = pickle.dumps(payload, protocol=3)
    if forbidden == "_codecs.encode":  # ... which is allowed, but not with another codec (same length here)
        data = pickle.dumps(payload, protocol=2).replace(b"latin1", b"rot_13")
        forbidden = "encoding 'rot_13'"
    with pytest.raises(UnsafePickleError, match=forbidden) as raised:
        safe_loads(data)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, pickle.UnpicklingError)


# --------------------------------------------------------------------------------------------------------------
# RegionFeatureIndex
# --------------------------------------------------------------------------------------------------------------


def test_index_random_access_over_tsv_and_npz(tmp_path):
    tsv_images = [make_regions(f"t{i}", 2, 16, seed=i) for i in range(3)]
    corrupt = butd_fields(make_regions("t_corrupt", 2, 16))
    corrupt[9] = "@@@@"
    tsv = tmp_path / "features.tsv"
    write_butd_tsv(tsv, [butd_fields(tsv_images[0]), corrupt, ["no tab here"], butd_fields(tsv_images[1]),
                         butd_fields(tsv_images[2]), butd_fields(tsv_images[0])])
    folder = tmp_path / "npz"
    folder.mkdir()
    npz_image = make_regions("n0", 3, 16, seed=5)
    write_npz(folder, npz_image)
    write_npz(folder, tsv_images[1])  # also in the tsv, which comes first

    index = RegionFeatureIndex([tsv, folder])
    assert len(index) == 5 and "n0" in index and "t_missing" not in index
    assert index.errors.counts == {"duplicate_image": 2, "malformed_row": 1}
    assert index.feature_dim() == 16
    assert_regions_equal(index.get("t2"), tsv_images[2])
    assert_regions_equal(index.get("t0"), tsv_images[0])
    assert_regions_equal(index.get("n0"), npz_image)
    assert index.get("t_missing") is None
    assert index.get("t_corrupt") is None and index.errors["bad_base64"] == 1
    with pytest.raises(ValueError, match="at least one"):
        RegionFeatureIndex([])


def test_skip_counter_keeps_counts_and_first_examples():
    counter = SkipCounter("rows", max_examples=2)
    for number in range(4):
        counter.add("bad_base64", f"line {number}")
    counter.add("no_regions", "line 9")
    other = SkipCounter()
    other.add("no_regions", "line 10")
    counter.update(other)
    assert counter.counts == {"bad_base64": 4, "no_regions": 2} and counter.total == 6
    assert counter.examples == {"bad_base64": ["line 0", "line 1"], "no_regions": ["line 9", "line 10"]}
    assert counter.format().splitlines()[0] == "rows: 6"
    with pytest.raises(ValueError, match="max_examples"):
        SkipCounter(max_examples=-1)


def test_regions_use_the_model_names_and_the_old_ones_warn(tmp_path):
    from cmal_processing.readers import RegionsDict

    regions = RegionsDict(visual_feats=np.ones((2, 3), np.float32), visual_pos=np.zeros((2, 4), np.float32))
    assert "features" not in regions and "boxes" not in regions
    with pytest.warns(FutureWarning, match="visual_feats"):
        assert regions["features"] is regions["visual_feats"]
    with pytest.warns(FutureWarning, match="visual_pos"):
        assert regions["boxes"] is regions["visual_pos"]
    with pytest.raises(KeyError):
        regions["nothing"]
