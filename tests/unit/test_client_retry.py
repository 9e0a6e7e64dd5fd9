"""Which failures `m2y send` tries again, and how long it waits: the rule, case by case."""

from __future__ import annotations

import pytest

from engine.client import HOLD_GRACE, retry_wait, retryable, still_held
from engine.defaults import MAX_RETRY_WAIT
from engine.errors import (
    CannotConnect,
    ConfigError,
    ConnectionLost,
    M2YError,
    RefuseCode,
    Refused,
    RemoteProtocolError,
)


@pytest.mark.parametrize("code", list(RefuseCode))
def test_only_busy_and_timeout_refusals_are_tried_again(code: RefuseCode) -> None:
    expected = code in (RefuseCode.BUSY, RefuseCode.TIMEOUT)
    assert retryable(Refused("server refused: x", code), 0) is expected
    assert retryable(Refused("server refused: x", code), 5) is expected


def test_a_broken_connection_is_tried_again_at_every_attempt() -> None:
    for attempt in (0, 1, 7):
        assert retryable(ConnectionLost("connection lost: reset"), attempt)


def test_no_server_at_the_first_try_is_final_later_not() -> None:
    """A typo or a stopped server is said at once; a server gone while we retry may come back."""
    assert not retryable(CannotConnect("cannot connect"), 0)
    assert retryable(CannotConnect("cannot connect"), 1)
    assert retryable(CannotConnect("cannot connect"), 3)


@pytest.mark.parametrize("exc", [
    ConfigError("data file not found"),
    RemoteProtocolError("ACK names another size or CRC than what was sent"),
    Refused("server sent Ack unexpectedly", 0),
    M2YError("anything else"),
])
def test_local_and_protocol_errors_are_final(exc: M2YError) -> None:
    assert not retryable(exc, 0) and not retryable(exc, 2)


def test_the_wait_doubles_up_to_its_cap() -> None:
    assert [retry_wait(1.0, a) for a in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_RETRY_WAIT, MAX_RETRY_WAIT]
    assert [retry_wait(0.25, a) for a in range(3)] == [0.25, 0.5, 1.0]
    assert retry_wait(0.0, 10) == 0.0
    assert retry_wait(1.0, 10**6) == MAX_RETRY_WAIT  # no overflow for absurd attempt numbers


def test_a_busy_soon_after_a_broken_connection_is_a_hold_not_a_retry() -> None:
    busy = Refused("server refused: x is being received right now", RefuseCode.BUSY)
    assert still_held(busy, lost_at=100.0, now=100.5)
    assert still_held(busy, lost_at=100.0, now=100.0 + HOLD_GRACE - 0.1)
    assert not still_held(busy, lost_at=100.0, now=100.0 + HOLD_GRACE)  # the server had its idle timeout
    assert not still_held(busy, lost_at=None, now=100.0)  # no broken connection before: a plain BUSY
    for other in (Refused("x", RefuseCode.TIMEOUT), Refused("x", RefuseCode.EXISTS), ConnectionLost("reset")):
        assert not still_held(other, lost_at=100.0, now=100.5)
