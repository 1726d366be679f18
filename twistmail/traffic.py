# -*- test-case-name: tests.test_traffic -*-
"""The last day of traffic, for the web admin's charts, from the same counters as ``/metrics``.

Prometheus keeps history for whoever runs one; a sysadmin without one still
wants to see "how much mail today, and is the queue growing".  So every five
minutes the counters of L{twistmail.metrics.Metrics} are read and what moved
since the last sample is kept: messages accepted and refused by SMTP, relay
recipients delivered and bounced, and the queue size at that moment.  288
samples make a day (about 30 KiB); they are written to
``<data_dir>/state/traffic.json`` off the reactor thread at each sample and at
stop, and read back at start, so a restart leaves no hole but its own downtime.
Counters start from zero in a new process, which is where sampling restarts.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistmail._fsutil import atomicWrite
from twistmail.metrics import Metrics

log = Logger()

#: Seconds between samples, and how many are kept: one day.
INTERVAL = 300
KEEP = 24 * 3600 // INTERVAL

#: Series name -> (sample name in the registry, labels it must have): summed.
_COUNTERS = {
    "accepted": ("twistmail_smtp_messages_accepted_total", {}),
    "rejected": ("twistmail_smtp_rejections_total", {}),
    "delivered": ("twistmail_relay_recipients_total", {"result": "delivered"}),
    "bounced": ("twistmail_relay_recipients_total", {"result": "bounced"}),
}
_GAUGES = {"queue": "twistmail_queue_messages"}
SERIES = (*_COUNTERS, *_GAUGES)


def statePath(dataDir: str) -> str:
    return os.path.join(dataDir, "state", "traffic.json")


def _totals(metrics: Metrics) -> dict[str, float]:
    """Every series' current value: counters summed over their other labels."""
    wanted = {name for name, _ in _COUNTERS.values()} | set(_GAUGES.values())
    samples = [s for family in metrics.registry.collect() for s in family.samples
               if s.name in wanted]
    totals = {}
    for series, (name, labels) in _COUNTERS.items():
        totals[series] = sum(s.value for s in samples if s.name == name
                             and all(s.labels.get(k) == v for k, v in labels.items()))
    for series, name in _GAUGES.items():
        totals[series] = next((s.value for s in samples if s.name == name), 0)
    return totals


def _valid(point) -> bool:
    return isinstance(point, dict) and all(
        isinstance(point.get(k), int | float) and not isinstance(point.get(k), bool)
        for k in ("time", *SERIES))


def _read(path: str) -> list[dict]:
    with open(path, "rb") as f:
        data = json.load(f)
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list):
        raise ValueError("no list of points")
    return [{k: p[k] for k in ("time", *SERIES)} for p in points if _valid(p)]


def _write(path: str, points: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    atomicWrite(path, json.dumps({"points": points}, separators=(",", ":")).encode())


class TrafficHistory(service.Service):
    """Samples the counters every L{INTERVAL} seconds; L{points} is what the charts draw."""

    def __init__(self, metrics: Metrics, dataDir: str, clock: IReactorTime,
                 inThread: Callable[..., Deferred]) -> None:
        """@param inThread: C{deferToThread}-like: runs C{f(*args)} off the reactor thread."""
        self._metrics = metrics
        self._clock = clock
        self._inThread = inThread
        self.path = statePath(dataDir)
        self._points: deque[dict] = deque(maxlen=KEEP)
        self._last = dict.fromkeys(_COUNTERS, 0.0)  # this process's counters start at zero
        self._loop = task.LoopingCall(self._sample)
        self._loop.clock = clock
        self._writing: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        try:
            since = self._clock.seconds() - KEEP * INTERVAL
            self._points.extend(p for p in _read(self.path) if p["time"] > since)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warn("traffic history {path} not read, starting empty: {error}",
                     path=self.path, error=str(e))
        self._loop.start(INTERVAL, now=False)

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._save()

    def _current(self) -> tuple[dict, dict]:
        """What moved since the last sample, and the gauges now."""
        totals = _totals(self._metrics)
        point: dict = {"time": self._clock.seconds()}
        for series in _COUNTERS:
            point[series] = max(0, round(totals[series] - self._last[series]))
        for series in _GAUGES:
            point[series] = round(totals[series])
        return point, totals

    def _sample(self) -> Deferred | None:
        point, totals = self._current()
        self._last = {series: totals[series] for series in _COUNTERS}
        self._points.append(point)
        return self._save()

    def _save(self) -> Deferred | None:
        if self._writing is not None:
            return None  # the next sample writes it
        d = self._writing = self._inThread(_write, self.path, list(self._points))

        def done(result) -> None:
            self._writing = None

        d.addErrback(lambda f: log.failure("traffic history {path} not written", f,
                                           path=self.path))
        return d.addBoth(done)

    def now(self) -> float:
        return self._clock.seconds()

    def points(self, live: bool = True) -> list[dict]:
        """The samples of the last day, oldest first; with C{live}, a last point for the
        interval under way (so the chart shows the message just sent)."""
        points = list(self._points)
        if live:
            points.append(self._current()[0])
        return points
