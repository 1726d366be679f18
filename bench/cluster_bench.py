"""Nodes on PostgreSQL beside one node on Maildir, in one run.

Three set-ups, each started fresh, in alternating order for every repetition:

* ``maildir``: one ``twistd -n twistmail`` on Maildir (the baseline);
* ``pg1``: one node on the postgresql backend;
* ``pg2``: two nodes on the postgresql backend, sharing their ports with
  ``[server] reuse_port = true`` (the kernel spreads the connections).

For each: **SMTP acceptance** (bench/loadgen.py, ``--messages`` of 4 KiB over
``--concurrency`` connections, connection i sending to account i of
``--accounts``: 20 by default, so each connection has its INBOX, as mail for
many users; ``--accounts 1`` puts every message into one INBOX, the worst case
for the postgresql backend, whose writes to one folder take turns), then the
**IMAP mixed workload** on the first account's INBOX: ``--clients`` connections for ``--seconds``, each
repeating a random mix of ``UID FETCH`` of a whole message (50 %), ``UID
STORE`` of ``\\Seen`` (20 %), ``NOOP`` (15 %), ``APPEND`` of 4 KiB (10 %) and
``UID SEARCH UNSEEN`` (5 %); on ``pg2`` the sessions on one node are told of the
other's changes by LISTEN/NOTIFY.

Reported: msg/s and IMAP op/s, their ratios to ``maildir`` paired per repetition
(median and range), and CPU per message / per operation, for the twistmail
processes and for PostgreSQL (postmaster and backends, from /proc).  PostgreSQL
is a private durable cluster (fsync and synchronous_commit on, as a production
one) on the same disk as the Maildir.  ``--profile`` adds, for the last
repetition, the reactor thread's top functions (twistd's cProfile) and the
statements PostgreSQL spent its time in (pg_stat_statements).

    python bench/cluster_bench.py [--repeat 3] [--messages 2000] [--concurrency 20]
                                  [--accounts 20] [--clients 8] [--seconds 10] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from servers import (
    DOMAIN,
    HOST,
    PASSWORD,
    TWISTD,
    USER,
    Server,
    count_delivered,
    cpu_seconds,
    free_port,
    listen_section,
    smtp_load,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgproc import PostgresProcess  # noqa: E402
from support import addUser  # noqa: E402

ADDRESS = f"{USER}@{DOMAIN}"
SETUPS = ("maildir", "pg1", "pg2")
#: The IMAP mix: (operation, weight).
MIX = (("fetch", 50), ("store", 20), ("noop", 15), ("append", 10), ("search", 5))


class DurablePostgres(PostgresProcess):
    """The tests' throwaway cluster, but durable, and in the bench's work directory."""

    settings = "-c max_connections=200 -c shared_buffers=128MB"

    def __init__(self, work: Path, statements: bool) -> None:
        super().__init__()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = str(work / "postgresql")
        os.mkdir(self.root)
        self.dataDir = os.path.join(self.root, "data")
        if statements:
            self.settings += " -c shared_preload_libraries=pg_stat_statements"

    def cpu(self) -> float:
        """CPU seconds of the postmaster, its live children and its reaped ones."""
        pid = int(Path(self.dataDir, "postmaster.pid").read_text().split()[0])
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                total += sum(cpu_seconds(int(child)))
            except OSError:
                pass  # gone meanwhile: counted in cutime next time
        return total

    def sql(self, query: str) -> list:
        import psycopg

        with psycopg.connect(self.adminDsn(), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []


class Setup:
    """One set-up's nodes (one or two twistd processes), on fresh data directories."""

    def __init__(self, work: Path, name: str, pg: DurablePostgres, profile: bool,
                 accounts: list[str]) -> None:
        self.name = name
        self.work = work
        self.accounts = accounts
        self.ports = {"smtp": free_port(), "imap": free_port()}
        count = 2 if name == "pg2" else 1
        storage = '[storage]\nbackend = "maildir"\n'
        self.dsn = ""
        if name != "maildir":
            from twistmail.storage.postgresql import schema

            dsn = self.dsn = pg.dsn(str(work))
            schema.upgrade(dsn)
            storage = ('[storage]\nbackend = "postgresql"\n[storage.postgresql]\n'
                       f"dsn = {json.dumps(dsn)}\npool_max = 10\n")
        self.nodes: list[Server] = []
        self.profiles: list[Path] = []
        for n in range(count):
            data = work / f"node{n}"
            data.mkdir(parents=True)
            for account in accounts:  # cheap argon2 parameters: logins cost no CPU here
                addUser(str(data), account, PASSWORD)
            config = work / f"node{n}.toml"
            config.write_text(f'[server]\ndata_dir = "{data}"\nhostname = "node{n}.test"\n'
                              f"reuse_port = {'true' if count > 1 else 'false'}\n"
                              + listen_section(**self.ports) + storage)
            argv = [*TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(config)]
            if profile:
                self.profiles.append(work / f"node{n}.prof")
                argv[len(TWISTD):len(TWISTD)] = [f"--profile={self.profiles[-1]}",
                                                "--profiler=cprofile", "--savestats"]
            self.nodes.append(Server(f"{name} node{n}", argv, self.ports["smtp"],
                                     work / f"node{n}.log"))

    def start(self) -> None:
        for node in self.nodes:
            node.start()
            # With reuse_port the first node answers for the second: wait for its own log.
            deadline = time.monotonic() + 60
            while "twistmail imap listening" not in node.tail(200):
                if time.monotonic() > deadline or node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} did not start:\n{node.tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cpu(self) -> float:
        return sum(sum(node.cpu()) for node in self.nodes)

    def cpuSplit(self) -> list[float]:
        return [sum(node.cpu()) for node in self.nodes]

    def reactorCpu(self) -> float:
        """CPU seconds of the nodes' main threads (the reactor); the rest of cpu() is
        their worker threads' (disk, SQL through psycopg, password hashing)."""
        return sum(sum(cpu_seconds(f"{node.proc.pid}/task/{node.proc.pid}"))
                   for node in self.nodes)

    def stored(self) -> int:
        """Messages stored now, in every account (Maildir files, or rows)."""
        if self.name == "maildir":
            mail = self.work / "node0" / "mail" / DOMAIN
            return sum(count_delivered(mail / a.split("@")[0]) for a in self.accounts)
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]


# -- the IMAP mixed workload --------------------------------------------------------------


def _message(n: int) -> bytes:
    body = "".join(f"line {i} of an appended message number {n}, some text\r\n"
                   for i in range(70))
    return (f"From: a@example.net\r\nTo: {ADDRESS}\r\nSubject: appended {n}\r\n"
            f"Message-ID: <a{n}.{random.random()}@bench>\r\n\r\n{body}").encode()[:4096]


class _Session:
    def __init__(self, reader, writer) -> None:
        self.reader, self.writer, self.tag = reader, writer, 0

    async def command(self, text: bytes) -> list[bytes]:
        """Send one command; read to its tagged reply (literals skipped); return the
        untagged lines."""
        self.tag += 1
        tag = b"c%d" % self.tag
        self.writer.write(tag + b" " + text + b"\r\n")
        await self.writer.drain()
        untagged = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("IMAP connection closed")
            while line.endswith(b"}\r\n") and b"{" in line:  # a literal, then more of the line
                size = int(line[line.rindex(b"{") + 1:-3])
                await self.reader.readexactly(size)
                line = await self.reader.readline()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"{text[:60]!r}: {line!r}")
                return untagged
            untagged.append(line)


async def _client(port: int, until: float, rng: random.Random, counts: dict) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    await reader.readline()
    session = _Session(reader, writer)
    await session.command(f'LOGIN "{ADDRESS}" "{PASSWORD}"'.encode())
    uids = next(int(line.split()[1]) for line in await session.command(b"SELECT INBOX")
                if line.endswith(b" EXISTS\r\n"))  # 1..uids: nothing was expunged yet
    ops, weights = zip(*MIX, strict=True)
    n = 0
    while time.monotonic() < until:
        op = rng.choices(ops, weights)[0]
        uid = rng.randint(1, uids)
        if op == "fetch":
            await session.command(b"UID FETCH %d (FLAGS BODY.PEEK[])" % uid)
        elif op == "store":
            sign = b"+" if rng.random() < 0.5 else b"-"
            await session.command(b"UID STORE %d %sFLAGS (\\Seen)" % (uid, sign))
        elif op == "noop":
            await session.command(b"NOOP")
        elif op == "append":
            n += 1
            data = _message(n)
            await session.command(b"APPEND INBOX {%d+}\r\n" % len(data) + data)
        else:
            await session.command(b"UID SEARCH UNSEEN")
        counts[op] = counts.get(op, 0) + 1
    await session.command(b"LOGOUT")
    writer.close()


def imapLoad(port: int, clients: int, seconds: float, seed: int) -> dict:
    counts: dict = {}

    async def run():
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, until, random.Random(seed * 100 + c), counts)
                               for c in range(clients)))

    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    return {"ops": total, "ops_per_sec": total / elapsed, "mix": counts}


# -- one measurement ----------------------------------------------------------------------


def measure(top: Path, name: str, run: int, pg: DurablePostgres, args) -> dict:
    profiling = args.profile and run == args.repeat - 1
    accounts = [ADDRESS] + [f"user{i}@{DOMAIN}" for i in range(1, args.accounts)]
    setup = Setup(top / f"{name}-{run}", name, pg, profiling, accounts)
    row: dict = {"setup": name, "run": run}
    try:
        setup.start()
        if name != "maildir" and profiling:
            pg.sql("SELECT pg_stat_statements_reset()")
        cpu0, pg0, reactor0 = setup.cpu(), pg.cpu(), setup.reactorCpu()
        smtp = smtp_load(setup.ports["smtp"], args.messages, 4096, args.concurrency,
                         *(f"--rcpt={a}" for a in accounts))
        cpu1, pg1, reactor1 = setup.cpu(), pg.cpu(), setup.reactorCpu()
        imap = imapLoad(setup.ports["imap"], args.clients, args.seconds, run)
        cpu2, pg2, reactor2 = setup.cpu(), pg.cpu(), setup.reactorCpu()
        row.update(msgs_per_sec=smtp["msgs_per_sec"], ops_per_sec=imap["ops_per_sec"],
                   smtp_cpu_ms=1000 * (cpu1 - cpu0) / args.messages,
                   imap_cpu_ms=1000 * (cpu2 - cpu1) / imap["ops"],
                   smtp_reactor_ms=1000 * (reactor1 - reactor0) / args.messages,
                   imap_reactor_ms=1000 * (reactor2 - reactor1) / imap["ops"],
                   node_cpu_split=setup.cpuSplit())
        if name != "maildir":
            row.update(smtp_pg_ms=1000 * (pg1 - pg0) / args.messages,
                       imap_pg_ms=1000 * (pg2 - pg1) / imap["ops"])
            if profiling:
                row["statements"] = pg.sql(
                    "SELECT round(total_exec_time)::int, calls, left(regexp_replace(query, "
                    "'\\s+', ' ', 'g'), 90) FROM pg_stat_statements "
                    "ORDER BY total_exec_time DESC LIMIT 8")
    finally:
        setup.stop()
    stored = setup.stored()
    if stored < args.messages:  # plus the APPENDs
        raise RuntimeError(f"{name}: {stored} messages stored, {args.messages} accepted")
    if setup.profiles:
        row["profiles"] = [str(p) for p in setup.profiles]
    return row


def median(rows: list[dict], key: str, setup: str) -> float:
    return statistics.median(r[key] for r in rows if r["setup"] == setup)


def paired(rows: list[dict], key: str, setup: str) -> list[float]:
    base = {r["run"]: r[key] for r in rows if r["setup"] == "maildir"}
    return [r[key] / base[r["run"]] for r in rows if r["setup"] == setup]


def report(rows: list[dict], args) -> None:
    setups = [s for s in SETUPS if any(r["setup"] == s for r in rows)]
    print(f"\nmedians of {args.repeat}; ratio = paired with maildir in the same repetition: "
          "median [min-max]")
    for key, what in (("msgs_per_sec", f"SMTP msg/s ({args.concurrency} conn)"),
                      ("ops_per_sec", f"IMAP op/s ({args.clients} clients)")):
        print(f"  {what}")
        for setup in setups:
            line = f"    {setup:7} {median(rows, key, setup):8.1f}"
            if setup != "maildir" and "maildir" in setups:
                ratios = paired(rows, key, setup)
                line += (f"   ratio {statistics.median(ratios):.2f} "
                         f"[{min(ratios):.2f}-{max(ratios):.2f}]")
            print(line)
    print("  CPU ms per SMTP message | per IMAP op: twistmail nodes (of which their reactor "
          "threads) + PostgreSQL")
    for setup in setups:
        parts = []
        for phase in ("smtp", "imap"):
            pgMs = median(rows, f"{phase}_pg_ms", setup) if setup != "maildir" else 0.0
            parts.append(f"{median(rows, f'{phase}_cpu_ms', setup):5.2f} "
                         f"({median(rows, f'{phase}_reactor_ms', setup):4.2f}) + {pgMs:4.2f}")
        print(f"    {setup:7} {parts[0]}  |  {parts[1]}")
    for row in rows:
        if row.get("profiles"):
            for path in row["profiles"][:1]:
                print(f"\n  {row['setup']}: the reactor thread's top functions (tottime)")
                pstats.Stats(path).sort_stats("tottime").print_stats(12)
        if row.get("statements"):
            print(f"\n  {row['setup']}: PostgreSQL's statements (total ms, calls)")
            for total, calls, query in row["statements"]:
                print(f"    {total:7} {calls:7}  {query}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    setups = args.setups.split(",")
    top = Path(tempfile.mkdtemp(prefix="cluster-bench-", dir=args.workdir))
    if os.geteuid() == 0:
        os.chmod(top, 0o755)  # PostgreSQL runs as the postgres user
    pg = DurablePostgres(top, args.profile)
    rows: list[dict] = []
    try:
        pg.start()
        if args.profile:
            pg.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for run in range(args.repeat):
            order = setups if run % 2 == 0 else setups[::-1]
            for name in order:
                row = measure(top, name, run, pg, args)
                rows.append(row)
                print(f"  run {run} {name:7} {row['msgs_per_sec']:7.1f} msg/s  "
                      f"{row['ops_per_sec']:7.1f} op/s  cpu ms/msg {row['smtp_cpu_ms']:.2f}"
                      f" (pg {row.get('smtp_pg_ms', 0):.2f})  per node "
                      f"{[round(c, 1) for c in row['node_cpu_split']]}", flush=True)
        report(rows, args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str))
    finally:
        pg.stop()
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
