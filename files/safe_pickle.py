"""A pickle loader that builds numpy arrays and plain containers, and refuses every other global.

The CIFAR-10 batch files are pickles; loaded with this, a tampered file cannot run code: it is
refused with the name of what it asked for (tests/test_data.py).
"""
from __future__ import annotations

import codecs
import pickle
from typing import BinaryIO

import numpy as np
from numpy._core import multiarray, numeric


class Refused(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing in it was run."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes in protocol 2 as _codecs.encode(text, "latin1"); admit nothing else.
    if encoding not in ("latin1", "latin-1"):
        raise Refused(f"it asks for codec {encoding!r}, which a CIFAR-10 file never uses")
    return codecs.encode(text, encoding)


# Everything a pickle of numpy arrays may name: numpy's array rebuilders, under the pre-2.0 module
# path of the official files and under numpy 2's, and the codec of Python 3's protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise Refused(f"it asks for {module}.{name}, which a CIFAR-10 file never holds") from None


def load(f: BinaryIO) -> object:
    """Unpickle `f` (Python 2's byte strings read as latin1), admitting only numpy's array rebuilders."""
    return _ArrayUnpickler(f, encoding="latin1").load()
