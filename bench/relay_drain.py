"""Relay queue benchmark: drain rate to a local sink, and memory with 100,000 queued.

Not part of the test suite.  See bench/README.rst ("Relay queue") for what it
measures and how.  Everything runs on loopback: a DNS server (twisted.names)
and an SMTP sink in this process, ``twistd -n twistmail`` as a subprocess
whose queue this script fills before starting it.

    python bench/relay_drain.py                         # 2000 x 4 KiB at 1 and 10 domains, 100,000 queued
    python bench/relay_drain.py --messages 5000 --queued 0 --domains 1,10,50
    python bench/relay_drain.py --queued 0 --postfix    # also Postfix draining the same queue (root)
    python bench/relay_drain.py --queued 0 --postfix --repeat 3 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.names import dns, server
from twisted.protocols import basic

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # postfixproc: the tests' private Postfix

from message import MessageFactory  # noqa: E402
from servers import cpu_seconds, free_port, listen_section  # noqa: E402

from twistmail._groupcommit import commitBatch  # noqa: E402
from twistmail.relay.queue import QueueEntry, Recipient, newQueueId, stageNew  # noqa: E402

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# -- the peers: DNS and an SMTP sink, on a reactor thread -------------------------------


def zoneResolver(records: dict):
    from twisted.names import common, error

    class Resolver(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):
            name = name.decode().lower()
            if name not in records:
                return defer.fail(error.AuthoritativeDomainError(name))
            answers = [dns.RRHeader(name.encode(), r.TYPE, dns.IN, 3600, r, auth=True)
                       for r in records[name] if r.TYPE == type]
            return defer.succeed((answers, [], []))

    return Resolver()


class Sink(basic.LineReceiver):
    """Accepts everything; counts acknowledged messages."""

    def connectionMade(self):
        self.factory.connections += 1
        self.buffer = b""
        self.sendLine(b"220 sink.bench ESMTP")

    def lineReceived(self, line):
        verb = line[:4].upper()
        if verb == b"DATA":
            self.sendLine(b"354 go ahead")
            self.setRawMode()
        elif verb == b"EHLO":
            self.sendLine(b"250-sink.bench\r\n250-PIPELINING\r\n250 8BITMIME")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")

    def rawDataReceived(self, data):
        self.buffer += data
        end = self.buffer.find(b"\r\n.\r\n")
        if end >= 0:
            rest = self.buffer[end + 5:]
            self.buffer = b""
            self.factory.count += 1
            if self.factory.first is None:
                self.factory.first = time.monotonic()
            self.factory.last = time.monotonic()
            self.sendLine(b"250 2.0.0 ok")
            self.setLineMode(rest)
        else:
            self.buffer = self.buffer[-4:]


class SinkFactory(protocol.ServerFactory):
    protocol = Sink
    noisy = False

    def reset(self):
        self.count, self.first, self.last, self.connections = 0, None, None, 0


def sinkAddress(index: int) -> str:
    """The sink's address for domain C{index}: 127.0.1.1, 127.0.1.2, ... one per domain, so
    each domain is its own MX host to twistmail and its own destination to Postfix."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def startPeers(domains: list[str]) -> tuple[int, int, SinkFactory]:
    records = {}
    for i, d in enumerate(domains):
        records[d] = [dns.Record_MX(10, f"mx.{d}".encode())]
        records[f"mx.{d}"] = [dns.Record_A(sinkAddress(i))]
    records["dead.bench.test"] = [dns.Record_MX(10, b"mx.dead.bench.test")]
    records["mx.dead.bench.test"] = [dns.Record_A("127.0.0.2")]  # nothing listens there
    sink = SinkFactory()
    sink.reset()
    smtpPort = free_port()
    ready = threading.Event()
    ports = {}

    def listen():
        factory = server.DNSServerFactory(authorities=[zoneResolver(records)])
        factory.noisy = False
        ports["dns"] = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        for i in range(len(domains)):  # one sink, one listening socket per domain's address
            reactor.listenTCP(smtpPort, sink, interface=sinkAddress(i), backlog=200)
        ready.set()

    reactor.callWhenRunning(listen)
    threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                     daemon=True).start()
    ready.wait(10)
    return ports["dns"].getHost().port, smtpPort, sink


# -- the server under test ----------------------------------------------------------------


def fillQueue(dataDir: Path, recipients, size: int, batch: int = 1000) -> float:
    """Write len(recipients) messages straight into the queue (as SMTP would); seconds taken."""
    factory = MessageFactory(size)
    queueDir = str(dataDir / "queue")
    started = time.monotonic()
    stages = []
    now = time.time()
    for seq, rcpt in enumerate(recipients):
        entry = QueueEntry(newQueueId(), "bench@client.test", [Recipient(rcpt)], now, "smtp")
        data = factory.render(seq)
        stages.append(lambda entry=entry, data=data: stageNew(queueDir, entry, lambda: [data]))
        if len(stages) == batch:
            _commit(stages)
            stages = []
    _commit(stages)
    return time.monotonic() - started


def _commit(stages) -> None:
    for result in commitBatch(stages):
        if isinstance(result, Exception):
            raise result


def writeConfig(workdir: Path, dataDir: Path, dnsPort: int, smtpPort: int, **relay) -> Path:
    settings = {"nameservers": [f"127.0.0.1:{dnsPort}"], "smtp_port": smtpPort,
                "connect_timeout": 5, "command_timeout": 30, **relay}
    lines = ["[server]", f'data_dir = "{dataDir}"', 'hostname = "relay.bench.test"',
             listen_section(smtp=free_port()), "[relay]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = workdir / "twistmail.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def startServer(workdir: Path, config: Path, profile: Path | None = None
                ) -> tuple[subprocess.Popen, Path]:
    """twistd with the config; with C{profile}, its reactor runs under cProfile, whose
    stats twistd writes there when it stops."""
    log = workdir / "server.log"
    profiling = ["--profiler=cprofile", f"--profile={profile}", "--savestats"] if profile else []
    # A session of its own, as Postfix's master makes itself: with the kernel's
    # autogroup scheduling (on by default) CPU is shared out per session first, and
    # twistmail would share one with this process (the sink) while Postfix does not.
    proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", *profiling, "twistmail", "--config",
                             str(config)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def waitFor(condition, timeout: float, what: str, proc: subprocess.Popen, interval=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise SystemExit(f"the server exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def queueFiles(dataDir: Path) -> int:
    try:
        return sum(1 for n in os.listdir(dataDir / "queue") if n.endswith(".json"))
    except FileNotFoundError:
        return 0


# -- the measurements ---------------------------------------------------------------------


def drain(workdir: Path, peers, domains: int, messages: int, size: int, run: int = 0,
          profile: bool = False) -> dict:
    dnsPort, smtpPort, sink = peers
    run = workdir / f"drain-{domains}-{run}"
    dataDir = run / "data"
    dataDir.mkdir(parents=True)
    rcpts = [f"user{i}@d{i % domains}.bench.test" for i in range(messages)]
    fill = fillQueue(dataDir, rcpts, size)
    config = writeConfig(run, dataDir, dnsPort, smtpPort)
    reactor.callFromThread(sink.reset)
    time.sleep(0.1)
    started = time.monotonic()
    stats = run / "server.pstats" if profile else None
    proc, log = startServer(run, config, stats)
    try:
        waitFor(lambda: sink.first is not None, 60, "the first delivery", proc)
        cpu0, main0 = sum(cpu_seconds(proc.pid)), mainThreadCpu(proc.pid)
        waitFor(lambda: sink.count >= messages, 600, f"{messages} deliveries", proc)
        cpu1, main1 = sum(cpu_seconds(proc.pid)), mainThreadCpu(proc.pid)
        waitFor(lambda: queueFiles(dataDir) == 0, 60, "the queue to empty", proc)
        rss = memory(proc.pid)
    finally:
        stop(proc)
    seconds = sink.last - sink.first
    if stats is not None:
        printProfile(stats, f"twistmail's reactor thread, {domains} domain(s) (cProfile, "
                     "start to stop, by own time)")
    return {"domains": domains, "messages": messages, "size": size, "fill_s": round(fill, 1),
            "start_to_first_s": round(sink.first - started, 2), "drain_s": round(seconds, 2),
            "msg_per_s": round((messages - 1) / seconds, 1) if seconds else None,
            "server_cpu_ms_per_msg": round((cpu1 - cpu0) * 1000 / messages, 2),
            "reactor_cpu_ms_per_msg": round((main1 - main0) * 1000 / messages, 2),
            "delivered": sink.count, "left_in_queue": queueFiles(dataDir), "rss_kib": rss,
            "connections": sink.connections}


def mainThreadCpu(pid: int) -> float:
    """CPU seconds of C{pid}'s main thread: the reactor's, which the GIL shares with the
    worker threads' Python code."""
    return sum(cpu_seconds(pid, thread=pid))


def treeCpu(pid: int) -> float:
    """CPU seconds of C{pid} and every process under it, with their reaped children's.

    Postfix works in many processes (qmgr, one smtp per connection, postlogd) under its
    master: their sum is what Postfix spent, as twistmail's is its process's."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = sum(int(f) for f in fields[11:15]) / tick
    total, todo = 0.0, [pid]
    while todo:
        one = todo.pop()
        total += times.get(one, 0.0)
        todo += children.get(one, [])
    return total


def postfixDrain(peers, domains: int, messages: int, size: int) -> dict:
    """The same messages through a private Postfix to the same sink: held, released, timed.

    Each domain's next hop is its own sink address (transport_maps, the address its MX
    has for twistmail), so Postfix sees as many destinations as twistmail sees MX hosts,
    each with Postfix's default limit of 20 connections
    (``default_destination_concurrency_limit``, twistmail's ``max_deliveries_per_domain``)
    and 100 in all (``default_process_limit``, twistmail's ``max_deliveries``).  Its slow
    start is skipped (``initial_destination_concurrency`` 20): twistmail has none.  Both
    cache connections (Postfix: ``smtp_connection_cache_on_demand``, on by default).
    """
    from postfixproc import Postfix

    dnsPort, smtpPort, sink = peers
    names = [f"d{i}.bench.test" for i in range(domains)]
    transport = ", ".join(f"{d}=smtp:[{sinkAddress(i)}]:{smtpPort}" for i, d in enumerate(names))
    extra = f"""\
smtpd_client_restrictions = check_client_access static:HOLD
transport_maps = inline:{{ {transport} }}
relay_domains = {" ".join(names)}
default_destination_concurrency_limit = 20
initial_destination_concurrency = 20
default_process_limit = 100
"""
    factory = MessageFactory(size)
    with Postfix(free_port(), extra=extra) as pf:
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=60) as client:
            for seq in range(messages):
                client.sendmail("bench@client.test", [f"user{seq}@{names[seq % domains]}"],
                                factory.render(seq))
        deadline = time.monotonic() + 120
        while pf.run("/usr/sbin/postqueue", "-c", pf.config, "-p").count("!") < messages:
            if time.monotonic() > deadline:
                raise SystemExit("Postfix did not hold every message")
            time.sleep(0.2)
        fill = time.monotonic() - started
        reactor.callFromThread(sink.reset)
        time.sleep(0.1)
        master = int(Path(pf.dir, "queue", "pid", "master.pid").read_text())
        pf.run("/usr/sbin/postsuper", "-c", pf.config, "-H", "ALL")  # to the deferred queue
        cpu0 = treeCpu(master)
        pf.run("/usr/sbin/postqueue", "-c", pf.config, "-f")  # ... and deliver it now
        deadline = time.monotonic() + 600
        while sink.count < messages:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postfix delivered {sink.count} of {messages}")
            time.sleep(0.05)
        cpu1 = treeCpu(master)
    seconds = sink.last - sink.first
    return {"domains": domains, "messages": messages, "size": size, "fill_s": round(fill, 1),
            "drain_s": round(seconds, 2),
            "msg_per_s": round((messages - 1) / seconds, 1) if seconds else None,
            "cpu_ms_per_msg": round((cpu1 - cpu0) * 1000 / messages, 2),
            "delivered": sink.count, "connections": sink.connections}


def queuedMemory(workdir: Path, peers, queued: int, size: int) -> dict:
    dnsPort, smtpPort, _ = peers
    run = workdir / "memory"
    dataDir = run / "data"
    dataDir.mkdir(parents=True)
    fill = fillQueue(dataDir, [f"user{i}@dead.bench.test" for i in range(queued)], size)
    config = writeConfig(run, dataDir, dnsPort, smtpPort, retry_min=3600, retry_max=3600)
    proc, log = startServer(run, config)
    samples = []
    try:
        def scanned():
            samples.append(memory(proc.pid)["VmRSS"])
            return "relay queue: " in log.read_text(errors="replace")

        started = time.monotonic()
        waitFor(scanned, 600, "the queue scan", proc, interval=0.5)
        afterScan = memory(proc.pid)
        scanSeconds = time.monotonic() - started

        deferred = [0]
        offset = [0]

        def attempted():
            with open(log, "rb") as f:
                f.seek(offset[0])
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offset[0] += cut
            deferred[0] += chunk[:cut].count(b"domain=dead.bench.test")
            samples.append(memory(proc.pid)["VmRSS"])
            return deferred[0] >= queued

        waitFor(attempted, 3600, f"a first attempt at all {queued} messages", proc, interval=0.5)
        cycleSeconds = time.monotonic() - started - scanSeconds
        time.sleep(2)
        end = memory(proc.pid)
    finally:
        stop(proc)
    return {"queued": queued, "size": size, "fill_s": round(fill, 1),
            "scan_s": round(scanSeconds, 1), "rss_after_scan_mib": round(afterScan["VmRSS"] / 1024, 1),
            "first_attempts_s": round(cycleSeconds, 1),
            "rss_after_first_attempts_mib": round(end["VmRSS"] / 1024, 1),
            "peak_rss_mib": round(end["VmHWM"] / 1024, 1),
            "max_sampled_rss_mib": round(max(samples) / 1024, 1)}


def idleMemory(workdir: Path, peers) -> dict:
    dnsPort, smtpPort, _ = peers
    run = workdir / "idle"
    dataDir = run / "data"
    dataDir.mkdir(parents=True)
    proc, log = startServer(run, writeConfig(run, dataDir, dnsPort, smtpPort))
    try:
        waitFor(lambda: "relay queue: 0 messages" in log.read_text(errors="replace"), 60,
                "the server to start", proc)
        time.sleep(1)
        return {"rss_empty_queue_mib": round(memory(proc.pid)["VmRSS"] / 1024, 1)}
    finally:
        stop(proc)


def printProfile(path: Path, title: str, top: int = 25) -> None:
    """The functions that took the most time of their own, and the total."""
    stats = pstats.Stats(str(path))
    print(f"  -- {title}: {stats.total_tt:.2f} s in all", flush=True)
    stats.sort_stats("tottime").print_stats(top)


def spread(values: list[float]) -> str:
    """Median and range, as the README reports repeated figures."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per drain run")
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    parser.add_argument("--domains", default="1,10", help="destination domain counts")
    parser.add_argument("--queued", type=int, default=100_000,
                        help="messages queued for an unreachable domain (0: skip)")
    parser.add_argument("--workdir", help="where data directories go (a real disk, not tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--postfix", action="store_true",
                        help="also drain the same messages with Postfix (needs root and postfix)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="drain runs per domain count; the median and range are reported")
    parser.add_argument("--profile", action="store_true",
                        help="run twistmail's reactor under cProfile; print where its time went")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="twistmail-relay-bench-", dir=args.workdir))
    counts = [int(n) for n in args.domains.split(",")]
    peers = startPeers([f"d{i}.bench.test" for i in range(max(counts))])
    results = {"drain": [], "memory": None}
    try:
        results["idle"] = idleMemory(workdir, peers)
        print(f"idle server: {results['idle']['rss_empty_queue_mib']} MiB RSS", flush=True)
        for domains in counts:
            ratios, rates = [], []
            for run in range(args.repeat):
                r = drain(workdir, peers, domains, args.messages, args.size, run, args.profile)
                results["drain"].append(r)
                rates.append(r["msg_per_s"])
                print(f"drain {r['messages']} x {r['size']} B to {domains} domain(s): "
                      f"{r['msg_per_s']} msg/s ({r['drain_s']} s, server "
                      f"{r['server_cpu_ms_per_msg']} ms CPU/msg, {r['reactor_cpu_ms_per_msg']} of it "
                      f"in the reactor thread, {r['connections']} connections, "
                      f"delivered {r['delivered']}, left {r['left_in_queue']})", flush=True)
                if r["delivered"] != args.messages or r["left_in_queue"]:
                    print("  INTEGRITY FAILURE", flush=True)
                    return 1
                if args.postfix:
                    p = postfixDrain(peers, domains, args.messages, args.size)
                    results.setdefault("postfix", []).append(p)
                    ratios.append(r["msg_per_s"] / p["msg_per_s"])
                    print(f"  Postfix, same queue and sink: {p['msg_per_s']} msg/s "
                          f"({p['drain_s']} s, {p['cpu_ms_per_msg']} ms CPU/msg, {p['connections']} "
                          f"connections, delivered "
                          f"{p['delivered']}); twistmail/Postfix = {ratios[-1]:.2f}", flush=True)
            if args.repeat > 1:
                summary = f"{domains} domain(s), {args.repeat} runs: twistmail {spread(rates)} msg/s"
                if ratios:
                    summary += f", twistmail/Postfix {spread(ratios)}"
                results.setdefault("summary", []).append(
                    {"domains": domains, "msg_per_s": rates, "ratios": ratios})
                print(summary + " (median (range))", flush=True)
        if args.queued:
            m = queuedMemory(workdir, peers, args.queued, args.size)
            results["memory"] = m
            print(f"{m['queued']} queued for an unreachable domain: RSS {m['rss_after_scan_mib']} "
                  f"MiB after the scan ({m['scan_s']} s), {m['rss_after_first_attempts_mib']} MiB "
                  f"after a first attempt at each ({m['first_attempts_s']} s), peak "
                  f"{m['peak_rss_mib']} MiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
