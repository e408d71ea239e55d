"""Pure helpers of the worker, at their edges."""

from __future__ import annotations

import pytest

from cloudops_execution_engine.actors.worker import _utf8_boundary

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("data", "limit", "cut"),
    [
        (b"abcd", 4, 4),  # exactly the limit: the whole buffer
        (b"abc", 4, 3),
        (b"abcdef", 4, 4),
        ("aé".encode() + b"zz", 2, 1),  # é is two bytes; never cut between them
        ("€".encode() * 3, 4, 3),  # three-byte sequences
        (b"\x80\x80\x80\x80\x80\x80", 4, 4),  # invalid input still makes progress
    ],
)
def test_utf8_boundary(data: bytes, limit: int, cut: int) -> None:
    assert _utf8_boundary(data, limit) == cut
    assert 0 < _utf8_boundary(data, limit) <= limit
