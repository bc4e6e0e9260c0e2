"""The one retry policy of storage calls (storage.Retrying), with a sleep that only records its waits."""

from __future__ import annotations

import pytest

from pipeline import storage


class Flaky:
    """A storage call that fails with `error` its first `failures` times."""

    def __init__(self, failures: int, error: OSError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return b"data"


def test_transient_failures_are_retried_with_exponential_waits():
    waits = []
    policy = storage.Retrying(sleep=waits.append)
    call = Flaky(3, OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7"))
    assert policy(call) == b"data" and call.calls == 4
    assert waits == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("no"),
                                   OSError("AWS Error ACCESS_DENIED during GetObject operation")])
def test_permanent_failures_are_raised_at_once(error):
    waits = []
    call = Flaky(1, error)
    with pytest.raises(type(error)):
        storage.Retrying(sleep=waits.append)(call)
    assert call.calls == 1 and waits == []


def test_after_three_calls_in_a_row_fail_each_gets_one_try_until_one_succeeds():
    waits = []
    policy = storage.Retrying(sleep=waits.append)
    down = OSError("connection refused")
    for _ in range(storage.FAIL_FAST_AFTER):
        with pytest.raises(OSError):
            policy(Flaky(99, down))
    assert len(waits) == 3 * (storage.READ_TRIES - 1)
    waits.clear()
    dead = Flaky(99, down)
    with pytest.raises(OSError):
        policy(dead)
    assert dead.calls == 1 and waits == []  # a wrong endpoint: no backoff per key
    assert policy(Flaky(0, down)) == b"data"  # the storage is back...
    again = Flaky(1, down)
    assert policy(again) == b"data" and again.calls == 2  # ...and calls are retried again
