"""A restricted unpickler for dataset pickles (CIFAR-10 batches, the traffic-sign tutorials' *.p files).

Plain `pickle.load` runs whatever callables a file names. This one admits only what those files
need: the builtin containers and numpy's array reconstructors. Anything else is refused before it
is looked up, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from cnnpipe.errors import CnnpipeError

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell a bytes object
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def safe_load(data: bytes, what: str) -> Any:
    """Unpickle `data` (named `what` in errors), admitting only containers and numpy arrays."""
    try:
        # encoding="bytes": CIFAR-10's batches were pickled by Python 2 (their keys come back as bytes)
        return _Restricted(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise CnnpipeError(f"{what}: not a plain data pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CnnpipeError(f"{what}: not a readable pickle ({type(e).__name__}: {e})") from None
