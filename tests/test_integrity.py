"""Hostile inputs, round 3 (issue 24): the unpickler's one running total of allocations, archives' entry and name
budgets, locks on outputs, OS errors on writes, bounded remote reads. Property tests where input is untrusted."""

from __future__ import annotations

import contextlib
import pickle
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnpipe.data.safe_pickle import ALLOCATION_FACTOR, ALLOCATION_SLACK, safe_load
from cnnpipe.errors import CnnpipeError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- the restricted unpickler: one running total --------------------------------------------------------

def memoized_calls(callee: bytes, arg: bytes, calls: int) -> bytes:
    """A protocol-2 pickle of a list holding `calls` results of callee(arg), callee and arg each written once."""
    unit = b"h\x00h\x01\x85R"  # GET callee, GET arg, TUPLE1, REDUCE: 6 bytes per call
    return b"\x80\x02" + callee + b"q\x00" + arg + b"q\x01(" + unit * calls + b"l."


def binint(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little")


def a_list_of(n: int) -> bytes:
    return b"]" + b"(" + b"K\x01" * n + b"e"


@pytest.mark.parametrize("callee, arg, what", [
    (b"cbuiltins\nbytearray\n", binint(900_000), "a bytearray"),
    (b"cbuiltins\nbytes\n", binint(900_000), "a bytes"),
    (b"cbuiltins\nlist\n", a_list_of(20_000), "a list"),
    (b"cbuiltins\nfrozenset\n", a_list_of(20_000), "a frozenset"),
], ids=["bytearray", "bytes", "list-copies", "frozenset-copies"])
def test_many_objects_from_one_memoized_size_share_one_budget(callee, arg, what):
    """Each call alone fits the file's budget; together they would allocate gigabytes (2.7 GB before)."""
    data = memoized_calls(callee, arg, 1_000_000 // 6)
    assert len(data) < 1.1e6
    tracemalloc.start()
    try:
        with pytest.raises(CnnpipeError, match=f"{what} asks for .* bytes left of the file's allocation budget"):
            safe_load(data, "x.p")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_FACTOR * len(data) + 8 * 2**20


def test_bytes_new_with_a_huge_size_is_charged():
    """NEWOBJ on bytes: bytes.__new__(bytes, n) allocates n bytes."""
    data = b"\x80\x02cbuiltins\nbytes\n" + binint(2**31 - 1) + b"\x85\x81."
    with pytest.raises(CnnpipeError, match="a bytes asks for 2,147,483,647 bytes"):
        safe_load(data, "x.p")


@FAST
@given(program=st.lists(st.tuples(st.sampled_from([b"bytearray", b"bytes", b"list", b"tuple", b"set"]),
                                  st.integers(0, 5000), st.integers(1, 300)), min_size=1, max_size=6))
def test_no_pickle_allocates_more_than_its_budget(program):
    """Any mix of calls on memoized arguments: refused, or within the one running total (measured)."""
    body = b""
    for name, size, calls in program:
        arg = binint(size) if name in (b"bytearray", b"bytes") else a_list_of(min(size, 500))
        body += b"cbuiltins\n" + name + b"\nq\x00" + arg + b"q\x01(" + b"h\x00h\x01\x85R" * calls + b"l"
    data = b"\x80\x02(" + body + b"l."
    tracemalloc.start()
    try:
        with contextlib.suppress(CnnpipeError):
            safe_load(data, "x.p")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= ALLOCATION_FACTOR * len(data) + ALLOCATION_SLACK + 2 * 2**20  # + the unpickler's own stack


def test_a_real_dataset_pickle_fits_its_budget():
    import numpy as np

    for protocol in (2, 4, 5):
        images = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
        data = pickle.dumps({"features": images, "labels": list(range(50)), "sizes": [(32, 32)] * 50}, protocol)
        assert np.array_equal(safe_load(data, "x.p")["features"], images)
