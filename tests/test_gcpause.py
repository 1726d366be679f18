"""twistmail._gcpause: the collector is paused for bulk work only, and always comes back."""

from __future__ import annotations

import gc
import threading

from twistmail import _gcpause


def test_pausesForBulkAndRestores():
    assert gc.isenabled()
    with _gcpause.paused(_gcpause.BULK):
        assert not gc.isenabled()
    assert gc.isenabled()


def test_smallBatchesDoNotPause():
    with _gcpause.paused(_gcpause.BULK - 1):
        assert gc.isenabled()


def test_nestedAndConcurrentUsesEndTogether():
    inner, release = threading.Event(), threading.Event()

    def other():
        with _gcpause.paused():
            inner.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with _gcpause.paused():
        thread.start()
        assert inner.wait(10)
        with _gcpause.paused():
            assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_collectorLeftOffStaysOff():
    gc.disable()
    try:
        with _gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_restoredAfterAnError():
    try:
        with _gcpause.paused():
            raise ValueError
    except ValueError:
        pass
    assert gc.isenabled()
