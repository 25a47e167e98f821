"""A restricted unpickler for dataset pickles (CIFAR-10 batches, the traffic-sign tutorials' *.p files).

Plain `pickle.load` runs whatever callables a file names. This one admits only what those files
need: the builtin containers and numpy's array reconstructors. Anything else is refused before it
is looked up, so a crafted file cannot run code. Every call and state the file asks for is checked
before it happens against ONE running total for the whole file: what arrays, bytes, bytearrays and
container copies allocate may add up to ALLOCATION_FACTOR times the file's size (a real array's data is
in the file; a protocol-2 array is decoded once as text, once as the array), whichever objects ask for
it - so a small file that makes many objects from one memoized size cannot add up to gigabytes. Object
arrays are refused (numpy rebuilds them from lists it does not check).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import math
import pickle
import struct
from typing import Any, ClassVar

import numpy as np

from cnnpipe.errors import CnnpipeError

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "bytes"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell a bytes object
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy.core or numpy._core, by version
ALLOCATION_FACTOR = 4  # allocations a file may ask for, in all, per byte it holds
ALLOCATION_SLACK = 64 * 1024  # ... plus this much (a tiny file's few small objects)
SLOT_BYTES = 64  # what one element of a copied list/tuple/set/dict costs, at most, in memory
CONTAINERS = (list, tuple, set, frozenset, dict)


def _length(arg: Any) -> int:
    """The elements a copy of `arg` holds (an iterable without a length: refused, it could be endless)."""
    try:
        return len(arg)
    except TypeError:
        raise pickle.UnpicklingError(f"a copy of a {type(arg).__name__} without a length") from None


def _array_bytes(shape: Any, dtype: Any) -> int:
    """What an array of `shape` and `dtype` allocates; UnpicklingError for anything not plainly numeric."""
    try:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError(f"an array of shape {shape!r} and dtype {dtype!r}") from None
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"an array of shape {shape!r}")
    if dt.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    return math.prod(dims) * dt.itemsize


class _Restricted(pickle._Unpickler):  # the Python implementation: its every opcode can be checked
    def __init__(self, data: bytes):
        # encoding="bytes": CIFAR-10's batches were pickled by Python 2 (their keys come back as bytes)
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.budget = ALLOCATION_FACTOR * len(data) + ALLOCATION_SLACK  # what is left of the file's allocations

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2's names (__builtin__.set), as pickle itself maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)

    def _within_budget(self, size: int, what: str) -> None:
        """Charge `size` bytes to the file's one running total, or refuse it."""
        if size > self.budget:
            raise pickle.UnpicklingError(f"{what} asks for {size:,} bytes, more than the {self.budget:,} bytes left of "
                                         f"the file's allocation budget ({ALLOCATION_FACTOR}x its size)")
        self.budget -= size

    def _charge(self, func: Any, args: tuple) -> None:
        """Charge what calling (or __new__ of) `func` with `args` allocates."""
        if func is np.ndarray and args:
            self._within_budget(_array_bytes(args[0], args[1] if len(args) > 1 else float), "an array")
        elif func is _RECONSTRUCT and len(args) == 3:
            self._within_budget(_array_bytes(args[1], args[2]), "an array")
        elif func in (bytes, bytearray) and args:
            self._within_budget(args[0] if isinstance(args[0], int) else 4 * _length(args[0]), f"a {func.__name__}")
        elif func in CONTAINERS and args:
            self._within_budget(SLOT_BYTES * _length(args[0]), f"a {func.__name__}")
        elif func is codecs.encode and args:
            self._within_budget(4 * _length(args[0]), "an encoded text")

    def _call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        self._charge(func, args)
        out = func(*args, **(kwargs or {}))
        if isinstance(out, np.dtype) and out.hasobject:
            raise pickle.UnpicklingError("a dtype of Python objects")
        return out

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args) if cls is np.ndarray else self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs, args, cls = self.stack.pop(), self.stack.pop(), self.stack.pop()
        self.append(self._call(cls, args, kwargs) if cls is np.ndarray else self._new(cls, args, kwargs))

    def _new(self, cls: Any, args: tuple, kwargs: dict | None = None) -> Any:
        self._charge(cls, args)  # bytes.__new__(bytes, n) allocates n bytes; tuple.__new__(tuple, x) copies x
        return cls.__new__(cls, *args, **(kwargs or {}))

    def _instantiate(self, klass: Any, args: tuple) -> None:
        self.append(self._call(klass, args))

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):  # (version, shape, dtype, is_fortran, data)
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], (bytes, bytearray))):
                raise pickle.UnpicklingError("an array state that is not (version, shape, dtype, order, bytes)")
            self._within_budget(_array_bytes(state[1], state[2]), "an array")
        super().load_build()
        if isinstance(inst, np.dtype) and inst.hasobject:
            raise pickle.UnpicklingError("a dtype of Python objects")

    dispatch: ClassVar[dict] = {**pickle._Unpickler.dispatch, pickle.REDUCE[0]: load_reduce, pickle.NEWOBJ[0]: load_newobj,
                pickle.NEWOBJ_EX[0]: load_newobj_ex, pickle.BUILD[0]: load_build}


def safe_load(data: bytes, what: str) -> Any:
    """Unpickle `data` (named `what` in errors), admitting only containers and numeric numpy arrays."""
    try:
        return _Restricted(data).load()
    except pickle.UnpicklingError as e:
        raise CnnpipeError(f"{what}: not a plain data pickle ({e})") from None
    except MemoryError:
        raise CnnpipeError(f"{what}: not a plain data pickle (it asks for more memory than there is)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
            RecursionError, struct.error) as e:
        raise CnnpipeError(f"{what}: not a readable pickle ({type(e).__name__}: {e})") from None
