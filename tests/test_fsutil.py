"""twistmail._fsutil: the durable write every state file goes through."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from twistmail._fsutil import atomicWrite


def test_concurrent_atomic_writes_of_one_file_all_succeed(tmp_path):
    """Threads of one process replacing one file at once (two sessions subscribing):
    each write succeeds, the file is one of them whole, and no temp file is left."""
    path = str(tmp_path / "state")
    count = 16
    barrier = threading.Barrier(count)

    def write(i: int) -> None:
        barrier.wait(timeout=30)
        for _ in range(20):
            atomicWrite(path, b"%d\n" % i * 1000)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(write, range(count)))  # re-raises the first failure
    with open(path, "rb") as f:
        data = f.read()
    assert data in {b"%d\n" % i * 1000 for i in range(count)}
    assert os.listdir(tmp_path) == ["state"]
