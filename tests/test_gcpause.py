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


def test_the_server_raises_the_young_threshold_while_it_runs_and_restores_it():
    from twistmail.tap import _ServerGC

    before = gc.get_threshold()
    gc.set_threshold(700, before[1], before[2])
    try:
        gcService = _ServerGC()
        gcService.startService()
        assert gc.get_threshold() == (_gcpause.SERVER_YOUNG, before[1], before[2])
        gcService.stopService()
        assert gc.get_threshold() == (700, before[1], before[2])
        gc.set_threshold(50000, before[1], before[2])  # set higher by the operator: kept
        gcService.startService()
        assert gc.get_threshold()[0] == 50000
        gcService.stopService()
    finally:
        gc.set_threshold(*before)
