"""Readers of precomputed bottom-up-attention region features.

Two public layouts are read:

- **BUTD `.tsv`** as used by LXMERT (one image per line, no header, tab-separated): `img_id, img_h, img_w,
  objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features`. Array columns are base64 of raw
  little-endian buffers: int64 `objects_id` [N], float32 `objects_conf` [N], float32 `boxes` [N, 4] (x1, y1, x2, y2
  in pixels) and float32 `features` [N, D] (D = buffer size / (4 N), usually 2048). `csv.DictWriter` wrote these
  files, but base64 and numbers never need quoting, so lines are split on tabs as bytes: no csv field-size limit
  gets in the way of the huge `features` field, and byte offsets give random access (`RegionFeatureIndex`).
  The attribute columns are not used.
- **bottom-up-attention.pytorch `.npz`**, one file per image named `<image_id>.npz`: `x` [N, D] features, `bbox`
  [N, 4] pixels, `num_bbox`, `image_h`, `image_w`, and `info`, a pickled dict (0-d object array) with
  `objects_id` [N] and `objects_conf` [N]. `info` is read through `cmal_processing.safe_pickle`, never `allow_pickle`.

Both give the `regions` format of `CmalProcessor`, one dict per image:

    {"image_id": str, "visual_feats": float32 [M, D], "visual_pos": float32 [M, 4] pixels,
     "image_size": (width, height), "tags": list[str] (M names), "scores": float32 [M]}

(a `RegionsDict`: the earlier keys `features` / `boxes` still read, with a FutureWarning).

Object ids become tag names through a vocabulary file (one name per line, id = line index; default: the Visual
Genome 1600 classes shipped in `modeling_cmal/data/vg_objects_vocab.txt`); `id_offset` is subtracted first, for
extractors that count the background class as id 0.

A corrupt image row (unparsable field, bad base64, wrong buffer size, zero-width features, NaN/inf (also values
that overflow float32), an image size that is not a positive finite integer, an inverted box or one wholly outside
the image, missing key, tag id outside the vocabulary, forbidden pickle global, ...) is skipped and counted in a
`SkipCounter` under one of these reasons: `malformed_row`, `bad_base64`, `wrong_buffer_size`, `bad_shape`,
`non_finite`, `bad_image_size`, `bad_box`, `no_regions`, `tag_id_out_of_range`, `missing_key`, `unsafe_pickle`,
`unreadable_file`, `duplicate_image`. Boxes that overlap the image but reach past its edge are kept as they are
(the corpus builders clip them and count how many they clipped).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import logging
import warnings
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from modeling_cmal.region_processing_cmal import DEPRECATED_REGION_KEYS

from .safe_pickle import UnsafePickleError, safe_load_npy
from .schema import decode_regions
from .skips import SkipCounter

logger = logging.getLogger(__name__)

__all__ = [
    "RegionsDict",
    "TSV_FIELDS",
    "CorruptRegionsError",
    "RegionFeatureIndex",
    "default_tag_vocab_path",
    "load_tag_vocab",
    "parse_tsv_fields",
    "decode_region_row",
    "read_npz_regions",
    "read_region_features",
    "read_region_table",
]

TSV_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
    "features",
)
NPZ_KEYS = ("x", "bbox", "num_bbox", "image_h", "image_w", "info")
INFO_KEYS = ("objects_id", "objects_conf")

PathLike = Union[str, os.PathLike]
TagVocab = Union[PathLike, Sequence[str], None]


class RegionsDict(dict):
    """The `regions` dict of one image (keys `visual_feats`, `visual_pos`, `image_size`, `tags`, `scores`, ...).
    Reading an earlier key (`features`, `boxes`) gives the new one's value with a FutureWarning; those keys are not
    stored, so `CmalProcessor` never sees both spellings."""

    def __missing__(self, key):
        if key in DEPRECATED_REGION_KEYS:
            new = DEPRECATED_REGION_KEYS[key]
            warnings.warn(f"regions[{key!r}] is deprecated; read regions[{new!r}]", FutureWarning, stacklevel=2)
            return self[new]
        raise KeyError(key)


class CorruptRegionsError(ValueError):
    """The region features of one image cannot be used; `reason` is the `SkipCounter` key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def default_tag_vocab_path() -> Path:
    """The Visual Genome 1600-class list shipped with `modeling_cmal` (found without importing the package)."""
    spec = importlib.util.find_spec("modeling_cmal")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the modeling_cmal package (which ships the default tag vocabulary) is not importable")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "vg_objects_vocab.txt"


def load_tag_vocab(tag_vocab: TagVocab = None) -> list[str]:
    """Tag names indexed by object id: a file (one name per line), a sequence of names, or None for the default.

    BUTD's original `objects_vocab.txt` lists aliases after commas (`"stop sign,stopsign"`); the first is the name.
    """
    if tag_vocab is None:
        tag_vocab = default_tag_vocab_path()
    if isinstance(tag_vocab, (str, os.PathLike)):
        lines = Path(tag_vocab).read_text(encoding="utf-8").splitlines()
        names = [line.split(",")[0].strip() for line in lines if line.strip()]
    elif isinstance(tag_vocab, Sequence) and all(isinstance(name, str) for name in tag_vocab):
        names = list(tag_vocab)
    else:
        raise TypeError(f"tag_vocab must be a path, a sequence of str or None, got {type(tag_vocab).__name__}")
    if not names:
        raise ValueError(f"tag_vocab {tag_vocab!r} holds no names")
    return names


def _validated_regions(
    image_id: str,
    *,
    features: np.ndarray,
    boxes: np.ndarray,
    object_ids: np.ndarray,
    scores: np.ndarray,
    image_size: tuple[int, int],
    tag_vocab: list[str],
    id_offset: int,
) -> dict:
    """The `regions` dict of one image after the checks that both layouts share."""
    num_boxes = features.shape[0]
    if num_boxes == 0:
        raise CorruptRegionsError("no_regions", "the image has no regions")
    if features.ndim != 2 or features.shape[1] == 0:
        raise CorruptRegionsError("bad_shape", f"features of shape {features.shape}; expected [N, D] with D >= 1")
    if boxes.shape != (num_boxes, 4) or object_ids.shape != (num_boxes,) or scores.shape != (num_boxes,):
        raise CorruptRegionsError(
            "bad_shape",
            f"features {features.shape}, boxes {boxes.shape}, objects_id {object_ids.shape} and objects_conf "
            f"{scores.shape} disagree; expected [N, D], [N, 4], [N], [N]",
        )
    width, height = image_size
    if width <= 0 or height <= 0:
        raise CorruptRegionsError("bad_image_size", f"image size {width}x{height} is not positive")
    for name, values in (("features", features), ("boxes", boxes), ("objects_id", object_ids),
                         ("objects_conf", scores)):
        if np.iscomplexobj(values):
            raise CorruptRegionsError("bad_shape", f"{name} hold complex numbers ({values.dtype}); expected real")
    # Finiteness after the float32 cast: a value that overflows float32 (1e300) is as corrupt as inf.
    with np.errstate(over="ignore", invalid="ignore"):
        features, boxes, scores = (values.astype(np.float32, copy=False) for values in (features, boxes, scores))
    for name, values in (("features", features), ("boxes", boxes), ("scores", scores), ("objects_id", object_ids)):
        if not np.isfinite(values).all():
            raise CorruptRegionsError("non_finite", f"{name} hold NaN or inf (or values beyond float32)")
    _check_boxes(boxes, width, height)
    int64 = np.iinfo(np.int64)
    if object_ids.min() < int64.min or object_ids.max() > int64.max:
        raise CorruptRegionsError(
            "tag_id_out_of_range", f"object ids {object_ids.min()}..{object_ids.max()} leave the int64 range")
    tag_ids = object_ids.astype(np.int64) - id_offset
    if tag_ids.min() < 0 or tag_ids.max() >= len(tag_vocab):
        raise CorruptRegionsError(
            "tag_id_out_of_range",
            f"object ids {object_ids.min()}..{object_ids.max()} minus id_offset {id_offset} leave the tag vocabulary "
            f"of {len(tag_vocab)} names",
        )
    return RegionsDict(
        image_id=image_id,
        visual_feats=features,
        visual_pos=boxes,
        image_size=(int(width), int(height)),
        tags=[tag_vocab[tag_id] for tag_id in tag_ids.tolist()],
        scores=scores,
    )


def _check_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    """Refuse (`bad_box`) an inverted box (x2 < x1 or y2 < y1) or one with no overlap with the image."""
    x1, y1, x2, y2 = boxes.T
    inverted = np.flatnonzero((x2 < x1) | (y2 < y1))
    if inverted.size:
        index = int(inverted[0])
        raise CorruptRegionsError(
            "bad_box", f"box {index} {boxes[index].tolist()} is inverted; expected x1 <= x2 and y1 <= y2 "
                       f"({inverted.size} inverted)")
    outside = np.flatnonzero((x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0))
    if outside.size:
        index = int(outside[0])
        raise CorruptRegionsError(
            "bad_box", f"box {index} {boxes[index].tolist()} lies wholly outside the {width}x{height} image "
                       f"({outside.size} outside)")


# --------------------------------------------------------------------------------------------------------------
# BUTD .tsv
# --------------------------------------------------------------------------------------------------------------


def _split_tsv_line(line: bytes) -> list[bytes]:
    return line.rstrip(b"\r\n").split(b"\t")


def _decode_buffer(field: bytes, name: str, dtype: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CorruptRegionsError("bad_base64", f"column {name!r} is not valid base64 ({error})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise CorruptRegionsError(
            "wrong_buffer_size", f"column {name!r} holds {len(raw)} bytes, not a multiple of {itemsize} ({dtype})"
        )
    return np.frombuffer(raw, dtype=dtype).copy()


def _parse_int(field: bytes, name: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise CorruptRegionsError("malformed_row", f"column {name!r} = {field[:40]!r} is not an integer") from None


def parse_tsv_fields(fields: list[bytes], tag_vocab: list[str], *, id_offset: int = 0) -> dict:
    """The `regions` dict of one BUTD tsv line already split on tabs; raises `CorruptRegionsError`."""
    _check_id_offset(id_offset)
    if len(fields) != len(TSV_FIELDS):
        raise CorruptRegionsError("malformed_row", f"{len(fields)} tab-separated fields, expected {len(TSV_FIELDS)}")
    row = dict(zip(TSV_FIELDS, fields))
    image_id = row["img_id"].decode("utf-8", errors="replace")
    height, width, num_boxes = (_parse_int(row[name], name) for name in ("img_h", "img_w", "num_boxes"))
    if num_boxes <= 0:
        raise CorruptRegionsError("no_regions", f"num_boxes is {num_boxes}")
    object_ids = _decode_buffer(row["objects_id"], "objects_id", "<i8")
    scores = _decode_buffer(row["objects_conf"], "objects_conf", "<f4")
    boxes = _decode_buffer(row["boxes"], "boxes", "<f4")
    features = _decode_buffer(row["features"], "features", "<f4")
    for name, values, expected in (
        ("objects_id", object_ids, num_boxes), ("objects_conf", scores, num_boxes), ("boxes", boxes, 4 * num_boxes),
    ):
        if values.size != expected:
            raise CorruptRegionsError(
                "wrong_buffer_size",
                f"column {name!r} holds {values.size} values; num_boxes {num_boxes} needs {expected}",
            )
    if features.size == 0 or features.size % num_boxes:
        raise CorruptRegionsError(
            "wrong_buffer_size",
            f"column 'features' holds {features.size} values, not a positive multiple of num_boxes {num_boxes}",
        )
    return _validated_regions(
        image_id,
        features=features.reshape(num_boxes, -1),
        boxes=boxes.reshape(num_boxes, 4),
        object_ids=object_ids,
        scores=scores,
        image_size=(width, height),
        tag_vocab=tag_vocab,
        id_offset=id_offset,
    )


def _tsv_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """`(line number from 1, byte offset, line)` of every non-blank line."""
    offset = 0
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if line.strip():
                yield line_number, offset, line
            offset += len(line)


def _read_tsv(path: Path, tag_vocab: list[str], id_offset: int, errors: SkipCounter) -> Iterator[dict]:
    for line_number, _, line in _tsv_lines(path):
        fields = _split_tsv_line(line)
        try:
            yield parse_tsv_fields(fields, tag_vocab, id_offset=id_offset)
        except CorruptRegionsError as error:
            image_id = fields[0].decode("utf-8", errors="replace")
            errors.add(error.reason, f"{path.name} line {line_number} (image {image_id!r}): {error}")


# --------------------------------------------------------------------------------------------------------------
# bottom-up-attention.pytorch .npz
# --------------------------------------------------------------------------------------------------------------


def _read_npz_members(path: Path) -> dict[str, np.ndarray]:
    """Every key of `NPZ_KEYS` from one `.npz`, each member read by `safe_load_npy` (pickles restricted)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
            missing = [key for key in NPZ_KEYS if key not in names]
            if missing:
                raise CorruptRegionsError("missing_key", f"keys {missing} missing; expected {list(NPZ_KEYS)}")
            arrays = {}
            for key in NPZ_KEYS:
                with archive.open(f"{key}.npy") as member:
                    arrays[key] = safe_load_npy(member)
            return arrays
    except CorruptRegionsError:
        raise
    except UnsafePickleError as error:
        raise CorruptRegionsError("unsafe_pickle", str(error)) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CorruptRegionsError("unreadable_file", f"not a readable .npz ({error})") from None
    except Exception as error:  # a broken pickle stream raises whatever its opcodes run into
        raise CorruptRegionsError("unreadable_file", f"a member cannot be unpickled ({error!r})") from None


def _integer(array: np.ndarray, name: str, reason: str = "bad_shape") -> int:
    """One finite integer (int or integral float member); anything else (inf, NaN, complex, 2.5, arrays) is `reason`."""
    real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.size != 1 or not real:
        raise CorruptRegionsError(reason, f"key {name!r} must be one integer, got {array.dtype} {array.shape}")
    value = array.reshape(())
    if not np.isfinite(value) or value != np.round(value):
        raise CorruptRegionsError(reason, f"key {name!r} must be one finite integer, got {value.item()!r}")
    return int(value)


def read_npz_regions(path: PathLike, tag_vocab: TagVocab = None, *, id_offset: int = 0) -> dict:
    """The `regions` dict of one bottom-up-attention.pytorch `.npz` (image id = file stem).

    Raises `CorruptRegionsError` (with `.reason`) for an unusable file, including `reason == "unsafe_pickle"` when
    a member names a forbidden pickle global: nothing it names is ever called.
    """
    path = Path(path)
    vocab = load_tag_vocab(tag_vocab)
    id_offset = _check_id_offset(id_offset)
    arrays = _read_npz_members(path)
    info = arrays["info"].item() if arrays["info"].shape == () and arrays["info"].dtype.hasobject else None
    if not isinstance(info, dict):
        raise CorruptRegionsError("missing_key", "'info' must be a pickled dict with 'objects_id' and 'objects_conf'")
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise CorruptRegionsError("missing_key", f"'info' lacks {missing}; expected {list(INFO_KEYS)}")
    features, boxes = arrays["x"], arrays["bbox"]
    try:
        object_ids, scores = np.asarray(info["objects_id"]), np.asarray(info["objects_conf"])
    except (TypeError, ValueError) as error:  # ragged or mixed lists in the pickled dict
        raise CorruptRegionsError("bad_shape", f"'info' objects_id / objects_conf are not arrays: {error}") from None
    for name, values in (("x", features), ("bbox", boxes), ("objects_id", object_ids), ("objects_conf", scores)):
        if not np.issubdtype(values.dtype, np.number):
            raise CorruptRegionsError("bad_shape", f"{name!r} must be numeric, got dtype {values.dtype}")
    if features.ndim != 2:
        raise CorruptRegionsError("bad_shape", f"'x' must be [N, D], got shape {features.shape}")
    num_boxes = _integer(arrays["num_bbox"], "num_bbox")
    if num_boxes != features.shape[0]:
        raise CorruptRegionsError("bad_shape", f"num_bbox {num_boxes} but 'x' has {features.shape[0]} rows")
    if np.iscomplexobj(object_ids) or not np.array_equal(object_ids, np.round(object_ids)):
        raise CorruptRegionsError("bad_shape", "'objects_id' holds non-integer values")
    image_size = (_integer(arrays["image_w"], "image_w", "bad_image_size"),
                  _integer(arrays["image_h"], "image_h", "bad_image_size"))
    return _validated_regions(
        path.stem,
        features=features,
        boxes=boxes,
        object_ids=object_ids,
        scores=scores,
        image_size=image_size,
        tag_vocab=vocab,
        id_offset=id_offset,
    )


def _npz_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix == ".npz" and path.is_file())


def _read_npz_files(paths: list[Path], tag_vocab: list[str], id_offset: int, errors: SkipCounter) -> Iterator[dict]:
    for path in paths:
        try:
            yield read_npz_regions(path, tag_vocab, id_offset=id_offset)
        except CorruptRegionsError as error:
            errors.add(error.reason, f"{path.name}: {error}")


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def _check_source(path: PathLike, argument: str = "path") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{argument} {str(path)!r} does not exist; expected a BUTD .tsv file or a folder of .npz files"
        )
    return path


ID_OFFSET_LIMIT = 2**31


def _check_id_offset(id_offset: int) -> int:
    if not isinstance(id_offset, int) or isinstance(id_offset, bool):
        raise TypeError(f"id_offset must be an int, got {id_offset!r}")
    if not -ID_OFFSET_LIMIT < id_offset < ID_OFFSET_LIMIT:
        raise ValueError(
            f"id_offset must be an int between -{ID_OFFSET_LIMIT - 1} and {ID_OFFSET_LIMIT - 1} (usually 0, or 1 when "
            f"id 0 is the background class), got {id_offset!r}"
        )
    return id_offset


def read_region_features(
    path: PathLike, tag_vocab: TagVocab = None, *, id_offset: int = 0, errors: SkipCounter | None = None
) -> Iterator[dict]:
    """Yield the `regions` dict (see module docstring) of every image of a BUTD `.tsv` file or `.npz` folder.

    Args:
        path: a `.tsv` file, a folder of per-image `.npz` files, or one `.npz` file.
        tag_vocab: tag names by object id: a file, a list of names, or None for the Visual Genome 1600 classes.
        id_offset: subtracted from every object id before the vocabulary lookup (1 if id 0 is background).
        errors: receives every skipped image (reason → count and examples). Without one, skips are still logged
            as warnings, with a summary at the end.

    Images are read one at a time, in file (or sorted file-name) order; memory stays bounded by one image.
    Arguments are checked at the call, before the first image is read.
    """
    path = _check_source(path)
    vocab = load_tag_vocab(tag_vocab)
    id_offset = _check_id_offset(id_offset)
    counter = errors if errors is not None else SkipCounter(f"region rows skipped in {path.name}")

    def images() -> Iterator[dict]:
        if path.is_dir():
            yield from _read_npz_files(_npz_files(path), vocab, id_offset, counter)
        elif path.suffix == ".npz":
            yield from _read_npz_files([path], vocab, id_offset, counter)
        else:
            yield from _read_tsv(path, vocab, id_offset, counter)
        if errors is None and counter:
            logger.warning("%s", counter.format())

    return images()


class RegionFeatureIndex:
    """Random access by image id to the region features of several sources (BUTD `.tsv` files, `.npz` folders).

    Building the index reads every `.tsv` once without decoding anything, to record the byte offset of each line,
    and lists every `.npz` folder; `get` then decodes one image. Memory: one offset per image. An image id found
    in several sources keeps its first occurrence (the others are counted as `duplicate_image`); lines without
    an image id are counted as `malformed_row`. (Every shard of a sharded build indexes the whole files this way
    and decodes only its own images.)

    Args:
        paths: one source or a list of sources (`.tsv` file, `.npz` folder or file, or the image table folder of
            `python -m cmal_processing extract`), searched in order.
        tag_vocab, id_offset: as for `read_region_features`.
        errors: receives every image that cannot be indexed or decoded (default: a new `SkipCounter`, `.errors`).
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        tag_vocab: TagVocab = None,
        *,
        id_offset: int = 0,
        errors: SkipCounter | None = None,
    ):
        sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not sources:
            raise ValueError("paths must name at least one .tsv file or .npz folder, got an empty list")
        self.sources = [_check_source(source, "paths") for source in sources]
        self.tag_vocab = load_tag_vocab(tag_vocab)
        self.id_offset = _check_id_offset(id_offset)
        self.errors = errors if errors is not None else SkipCounter("region rows skipped")
        # image id -> (file, byte offset of its tsv line or None for an .npz, line number or 0)
        self._locations: dict[str, tuple[Path, int | None, int]] = {}
        self._table_cache: tuple[Path, list[dict]] | None = None
        for source in self.sources:
            if source.is_dir() and any(source.glob("regions-*.parquet")):  # an image table (cmal_processing.extract)
                for image_id, (path, row) in read_region_table(source).items():
                    self._add(image_id, (path, None, row))
            elif source.is_dir() or source.suffix == ".npz":
                for path in _npz_files(source) if source.is_dir() else [source]:
                    self._add(path.stem, (path, None, 0))
            else:
                self._index_tsv(source)

    def _add(self, image_id: str, location: tuple[Path, int | None, int]) -> None:
        if image_id in self._locations:
            kept = self._locations[image_id][0]
            self.errors.add("duplicate_image", f"image {image_id!r} in {location[0].name} (kept {kept.name})")
        else:
            self._locations[image_id] = location

    def _index_tsv(self, path: Path) -> None:
        for line_number, offset, line in _tsv_lines(path):
            image_id, tab, _ = line.partition(b"\t")
            if not tab or not image_id:
                self.errors.add("malformed_row", f"{path.name} line {line_number}: no tab-separated image id")
                continue
            self._add(image_id.decode("utf-8", errors="replace"), (path, offset, line_number))

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._locations

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def _decode(self, image_id: str) -> dict:
        path, offset, row = self._locations[image_id]
        if path.suffix == ".parquet":
            if self._table_cache is None or self._table_cache[0] != path:  # one shard in memory at a time
                import pyarrow.parquet as pq

                self._table_cache = (path, pq.read_table(path).to_pylist())
            return decode_region_row(self._table_cache[1][row])
        if offset is None:
            return read_npz_regions(path, self.tag_vocab, id_offset=self.id_offset)
        with open(path, "rb") as file:
            file.seek(offset)
            line = file.readline()
        return parse_tsv_fields(_split_tsv_line(line), self.tag_vocab, id_offset=self.id_offset)

    def _where(self, image_id: str) -> str:
        path, offset, line_number = self._locations[image_id]
        return path.name if offset is None else f"{path.name} line {line_number} (image {image_id!r})"

    def get(self, image_id: str) -> dict | None:
        """The `regions` dict of `image_id`, or None when it is not indexed or its row is corrupt (then counted)."""
        if image_id not in self._locations:
            return None
        try:
            return self._decode(image_id)
        except CorruptRegionsError as error:
            self.errors.add(error.reason, f"{self._where(image_id)}: {error}")
            return None

    def feature_dim(self) -> int:
        """D of the first decodable image (rows that fail here are counted when `get` asks for them)."""
        for image_id in self._locations:
            try:
                return int(self._decode(image_id)["visual_feats"].shape[1])
            except CorruptRegionsError:
                continue
        raise ValueError(f"no image of {[str(source) for source in self.sources]} has decodable region features")


# The image table of `python -m cmal_processing extract` (written by `extract.py`)


def read_region_table(folder) -> dict[str, tuple[Path, int]]:
    """`image_id -> (shard file, row)` of an image table written by `extract_regions`."""
    import pyarrow.parquet as pq

    root = Path(folder)
    shards = sorted(root.glob("regions-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"folder {str(root)!r} holds no regions-*.parquet shard; expected the output of "
                                "python -m cmal_processing extract")
    located = {}
    for shard in shards:
        for row, image_id in enumerate(pq.read_table(shard, columns=["image_id"]).column(0).to_pylist()):
            located.setdefault(image_id, (shard, row))
    return located


def decode_region_row(row: dict) -> dict:
    """One image-table row → the `regions` dict of `CmalProcessor` (pixel boxes with `image_size`)."""
    visual_feats, visual_pos = decode_regions(row["num_regions"], row["feature_dim"], row["visual_feats"],
                                              row["visual_pos"])
    return RegionsDict(
        image_id=row["image_id"],
        visual_feats=visual_feats,
        visual_pos=visual_pos,
        image_size=(int(row["image_width"]), int(row["image_height"])),
        tags=list(row["tags"]),
        scores=np.asarray(row["scores"], dtype=np.float32),
    )
