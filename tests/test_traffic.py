"""Traffic history for the web admin's charts: samples of the /metrics counters every five
minutes, the last day kept, written to disk and read back after a restart."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, task

from twistmail.metrics import Metrics
from twistmail.traffic import INTERVAL, KEEP, TrafficHistory, statePath
from twistmail.web.chart import svgChart


class Queue:
    size = 0

    def stats(self):
        return self.size, 0.0


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def history(tmp_path, clock=None):
    metrics = Metrics()
    queue = Queue()
    metrics.watch(runner=queue)
    if clock is None:
        clock = task.Clock()
        clock.advance(1_000_000)
    h = TrafficHistory(metrics, str(tmp_path), clock, inline)
    return h, metrics, queue, clock


def test_each_sample_holds_what_happened_in_its_five_minutes(tmp_path):
    h, metrics, queue, clock = history(tmp_path)
    h.startService()
    metrics.smtpAccepted.labels("smtp").inc(3)
    metrics.smtpAccepted.labels("submission").inc(2)
    metrics.smtpRejected.labels("smtp", "550", "5.1.1").inc()
    metrics.relayRecipients.labels("delivered").inc(4)
    metrics.relayRecipients.labels("bounced").inc()
    queue.size = 7
    clock.advance(INTERVAL)
    metrics.smtpAccepted.labels("smtp").inc(1)
    queue.size = 2
    clock.advance(INTERVAL)
    points = h.points(live=False)
    assert [(p["accepted"], p["rejected"], p["delivered"], p["bounced"], p["queue"])
            for p in points] == [(5, 1, 4, 1, 7), (1, 0, 0, 0, 2)]
    assert points[1]["time"] - points[0]["time"] == INTERVAL


def test_the_live_point_shows_the_current_interval_before_it_is_sampled(tmp_path):
    h, metrics, queue, clock = history(tmp_path)
    h.startService()
    metrics.smtpAccepted.labels("smtp").inc(2)
    clock.advance(INTERVAL / 2)
    assert h.points(live=False) == []
    [live] = h.points()
    assert live["accepted"] == 2 and live["time"] == clock.seconds()


def test_only_the_last_day_is_kept(tmp_path):
    h, metrics, queue, clock = history(tmp_path)
    h.startService()
    for _ in range(KEEP + 10):
        metrics.smtpAccepted.labels("smtp").inc()
        clock.advance(INTERVAL)
    points = h.points(live=False)
    assert len(points) == KEEP
    assert points[-1]["time"] - points[0]["time"] == (KEEP - 1) * INTERVAL


def test_a_restart_keeps_the_day_and_counts_from_the_new_process_zero(tmp_path):
    h, metrics, queue, clock = history(tmp_path)
    h.startService()
    metrics.smtpAccepted.labels("smtp").inc(9)
    clock.advance(INTERVAL)
    h.stopService()
    saved = json.loads(open(statePath(str(tmp_path))).read())
    assert saved["points"][0]["accepted"] == 9
    assert os.stat(statePath(str(tmp_path))).st_mode & 0o777 == 0o600
    # A new process: its counters start at zero again.
    again, metrics2, _, clock2 = history(tmp_path, clock)
    again.startService()
    metrics2.smtpAccepted.labels("smtp").inc(1)
    clock.advance(INTERVAL)
    assert [p["accepted"] for p in again.points(live=False)] == [9, 1]


def test_points_older_than_a_day_or_a_bad_file_are_dropped_at_start(tmp_path):
    path = statePath(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    h, metrics, queue, clock = history(tmp_path)
    h.startService()  # logged, and counted from nothing
    assert h.points(live=False) == []
    h.stopService()
    old = {"points": [{"time": clock.seconds() - 2 * 86400, "accepted": 1, "rejected": 0,
                       "delivered": 0, "bounced": 0, "queue": 0},
                      {"time": clock.seconds() - 60, "accepted": 2, "rejected": 0,
                       "delivered": 0, "bounced": 0, "queue": 0},
                      {"time": "garbage"}]}
    with open(path, "w") as f:
        json.dump(old, f)
    h2, *_ = history(tmp_path, clock)
    h2.startService()
    assert [p["accepted"] for p in h2.points(live=False)] == [2]


def test_the_chart_is_an_svg_with_one_line_per_series_and_escaped_labels():
    points = [{"time": 1000 + i * INTERVAL, "accepted": i, "queue": 10 - i} for i in range(5)]
    svg = str(svgChart(points, [("accepted", "<b>messages</b>", "#1f77b4")], now=1000 + 4 * INTERVAL))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'id="chart-accepted"' in svg and 'data-total="10"' in svg
    assert svg.count("<circle") == 4  # every non-zero point is visible, even alone
    assert "<b>" not in svg and "&lt;b&gt;messages&lt;/b&gt;" in svg
    empty = str(svgChart([], [("accepted", "messages", "#1f77b4")], now=1000))
    assert 'data-total="0"' in empty
