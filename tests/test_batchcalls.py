"""BatchedCalls: blocking calls that arrive while batches run share the next thread call."""

from __future__ import annotations

from twisted.internet import defer

from twistmail._batchcalls import BatchedCalls


class HeldPool:
    """run(g, *args): held until the test releases it, so the batches can be seen."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, g, *args):
        d = defer.Deferred()
        self.calls.append((g, args, d))
        return d

    def release(self, index: int = 0) -> None:
        g, args, d = self.calls.pop(index)
        defer.maybeDeferred(g, *args).chainDeferred(d)


def fired(d) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_calls_run_at_once_until_the_limit_then_wait_and_share_a_batch():
    pool = HeldPool()
    calls = BatchedCalls(pool, lambda n: n * 10, parallel=2, size=3)
    results = [fired(calls(n)) for n in range(7)]
    assert [args[1] for _, args, _ in pool.calls] == [[0], [1]]  # alone, at once
    pool.release()
    assert results[0] == [0]
    assert [args[1] for _, args, _ in pool.calls] == [[1], [2, 3, 4]]  # the waiting ones, 3 at most
    pool.release(1)
    assert [r[0] for r in results[2:5]] == [20, 30, 40]
    assert [args[1] for _, args, _ in pool.calls] == [[1], [5, 6]]
    pool.release()
    pool.release()
    assert [r[0] for r in results] == [0, 10, 20, 30, 40, 50, 60]
    assert pool.calls == []


def test_one_failing_call_fails_only_its_own_deferred():
    pool = HeldPool()

    def f(n):
        if n == 2:
            raise ValueError("bad item")
        return n

    calls = BatchedCalls(pool, f, parallel=1, size=10)
    first = fired(calls(0))
    rest = [fired(calls(n)) for n in (1, 2, 3)]
    pool.release()
    pool.release()
    assert first == [0] and rest[0] == [1] and rest[2] == [3]
    assert rest[1][0].check(ValueError) and str(rest[1][0].value) == "bad item"


def test_a_failed_thread_call_fails_every_call_of_its_batch_and_the_next_batch_runs():
    pool = HeldPool()
    calls = BatchedCalls(pool, lambda n: n, parallel=1, size=10)
    first = fired(calls(0))
    waiting = [fired(calls(n)) for n in (1, 2)]
    g, args, d = pool.calls.pop(0)
    d.errback(RuntimeError("the pool is gone"))
    assert first[0].check(RuntimeError)
    assert [args[1] for _, args, _ in pool.calls] == [[1, 2]]
    pool.release()
    assert [w[0] for w in waiting] == [1, 2]
