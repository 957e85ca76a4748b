"""Restricted unpickling for the pickles inside public region-feature and annotation files.

bottom-up-attention.pytorch stores each image's detections as a pickled dict inside its `.npz` (key `info`), and
RefCOCO+ ships its referring expressions as a Python 2 pickle (`refs(unc).p`). `pickle.load` on such a file calls
whatever the file names, so a tampered file runs code on the machine that reads it. The functions here admit only
what those files legitimately hold:

- plain containers and scalars: dict, list, tuple, str, int, float, bool, None (pickle builds them with opcodes;
  they need no global);
- numpy arrays, dtypes and scalars: `numpy.ndarray`, `numpy.dtype`, the numpy scalar types and numpy's own
  reconstruction helpers, under both the numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) module names;
- `_codecs.encode(text, "latin1")`, which pickles of protocol < 3 use for byte buffers (no other codec).

Any other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) raises `UnsafePickleError` naming it,
before anything is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "safe_load", "safe_loads", "safe_load_npy"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle names a global outside the allow-list (or is otherwise not loadable safely)."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` restricted to the latin-1 codec that numpy's protocol-2 pickles use for raw buffers."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in {"latin1", "iso88591"}:
        raise UnsafePickleError(
            f"pickle calls _codecs.encode with encoding {encoding!r}; only 'latin1' (numpy byte buffers) is allowed"
        )
    return codecs.encode(text, "latin1")


def _numpy_helpers() -> dict[tuple[str, str], object]:
    """numpy's pickle helpers, taken from numpy's own reductions so that no module is imported by name."""
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.arange(1).__reduce_ex__(5)[0]
    helpers = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        helpers[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        helpers[(f"{package}.multiarray", "scalar")] = scalar
        helpers[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return helpers


_ALLOWED_GLOBALS = _numpy_helpers()


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the numpy globals listed in the module docstring."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "numpy":
            scalar_type = getattr(np, name, None)
            if isinstance(scalar_type, type) and issubclass(scalar_type, np.generic):
                return scalar_type
        raise UnsafePickleError(
            f"refusing to unpickle forbidden global '{module}.{name}': only plain containers and numpy arrays, dtypes "
            "and scalars are allowed (the file may have been tampered with)"
        )


def safe_load(file: BinaryIO, *, encoding: str = "ASCII", errors: str = "strict") -> object:
    """Unpickle one object from a binary file with `RestrictedUnpickler`.

    `encoding` and `errors` decode Python 2 `str` objects, as for `pickle.load` ("latin1" for Python 2 numpy
    pickles, "utf-8" for Python 2 text). Raises `UnsafePickleError` on a forbidden global; a broken stream raises
    what `pickle.load` raises (`pickle.UnpicklingError`, `EOFError`, ...).
    """
    return RestrictedUnpickler(file, encoding=encoding, errors=errors).load()


def safe_loads(data: bytes, *, encoding: str = "ASCII", errors: str = "strict") -> object:
    """`safe_load` from bytes."""
    return safe_load(io.BytesIO(data), encoding=encoding, errors=errors)


def safe_load_npy(file: BinaryIO) -> np.ndarray:
    """Read one `.npy` stream (e.g. a member of an `.npz`) whose array may be of object dtype.

    `numpy.load(..., allow_pickle=True)` would unpickle object arrays with `pickle.load`; here the pickled payload
    goes through `RestrictedUnpickler`. Arrays of other dtypes are read as numpy reads them.
    """
    version = npy_format.read_magic(file)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(file)
    else:
        raise UnsafePickleError(f".npy format version {version} is not supported; expected (1, 0) or (2, 0)")
    if not dtype.hasobject:
        array = np.frombuffer(file.read(), dtype=dtype, count=int(np.prod(shape, dtype=np.int64)))
        return array.reshape(shape, order="F" if fortran_order else "C").copy()  # writable, like numpy.load
    array = safe_load(file, encoding="latin1")
    if not isinstance(array, np.ndarray):
        raise UnsafePickleError(f"an object .npy must hold a pickled ndarray, got {type(array).__name__}")
    return array
