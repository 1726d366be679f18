"""Start, wait for and stop the servers under test, and inspect their Maildirs.

Each server runs as its own process with fresh state in a temporary
directory, so runs do not warm each other's caches or mailboxes.  The
server's CPU time is read from /proc so the report can say where the two
cores went.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
# ``python -m twisted`` is ``twist``, not ``twistd``: run twistd's entry point.
TWISTD = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()"]
HOST = "127.0.0.1"
DOMAIN = "example.test"
USER = "alice"
PASSWORD = "secret"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int, thread: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by process ``pid`` (or by its ``thread``)."""
    where = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(where).read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the live children of process ``pid`` (and theirs)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                total += sum(cpu_seconds(child)) + children_cpu_seconds(child)
            except OSError:  # it ended meanwhile
                pass
    return total


def on_off_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that alternates a feature on and off (smtp_verify.py,
    submission_sign.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser


def on_off_modes(repeat: int):
    """(run, "on" or "off") pairs, which goes first alternating from run to run."""
    for rep in range(repeat):
        for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            yield rep, mode


def print_on_off(title: str, off_name: str, on_name: str, rates: dict) -> None:
    """The medians of C{rates} ({"on": [msg/s...], "off": [...]}), their ratio and the
    ratio of each run's pair."""
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    paired = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print(f"\n{title}, median of {len(paired)}")
    print(f"{off_name} {off:7.0f} msg/s   {on_name} {on:7.0f} msg/s   on/off {on / off:.2f}   "
          f"paired {statistics.median(paired):.2f} ({', '.join(f'{r:.2f}' for r in paired)})")


def count_delivered(maildir: Path) -> int:
    """Messages in new/ plus cur/ (tmp/ holds only unfinished deliveries)."""
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur") if (maildir / sub).is_dir())


class Server:
    """A server subprocess with its log file and a readiness check."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Spawn the server and return once its SMTP banner says 220."""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    banner = sock.makefile("rb").readline()
                    sock.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return
                raise RuntimeError(f"{self.name} banner {banner!r}")
            except OSError:
                time.sleep(0.05)  # poll interval, bounded by the deadline
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def cpu(self) -> tuple[float, float]:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it will not go within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def aiosmtpd_server(workdir: Path, in_thread: bool = False) -> tuple[Server, Path]:
    """The durable aiosmtpd baseline; returns the server and its Maildir."""
    maildir = workdir / "Maildir"
    port = free_port()
    argv = [PYTHON, str(BENCH_DIR / "baseline_aiosmtpd.py"), "--port", str(port)]
    argv += ["--maildir", str(maildir)] + (["--fsync-in-thread"] if in_thread else [])
    return Server("aiosmtpd", argv, port, workdir / "server.log"), maildir


def _twistmail_cli(data_dir: Path, *args: str, stdin: bytes | None = None) -> None:
    argv = [PYTHON, "-m", "twistmail", "--data-dir", str(data_dir), *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout!r}\n{proc.stderr!r}")


PROTOCOLS = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")


def listen_section(**ports: int) -> str:
    """A TOML [listen] table: the given protocols on loopback ports, every other one off
    (so a benchmark never binds the embedded defaults a developer's server may use)."""
    lines = ["[listen]"]
    for protocol in PROTOCOLS:
        port = ports.get(protocol)
        lines.append(f'{protocol} = ["tcp:{port}:interface={HOST}"]' if port else f"{protocol} = []")
    return "\n".join(lines) + "\n"


def twistmail_server(workdir: Path, **extra_ports: int) -> tuple[Server, Path, dict]:
    """A fresh twistmail with alice provisioned; returns server, Maildir and its ports
    (smtp, pop3 and imap, plus C{extra_ports} such as imaps=... )."""
    data_dir = workdir / "data"
    data_dir.mkdir()
    _twistmail_cli(data_dir, "domain", "add", DOMAIN)
    _twistmail_cli(data_dir, "user", "add", f"{USER}@{DOMAIN}", stdin=f"{PASSWORD}\n".encode())
    ports = {"smtp": free_port(), "pop3": free_port(), "imap": free_port(), **extra_ports}
    config = workdir / "twistmail.toml"
    config.write_text(f'[server]\ndata_dir = "{data_dir}"\n' + listen_section(**ports))
    argv = [*TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(config)]
    server = Server("twistmail", argv, ports["smtp"], workdir / "server.log")
    return server, data_dir / "mail" / DOMAIN / USER, ports


def twistmail_available() -> str | None:
    """None if twistmail's CLI and twistd plugin load, else the reason."""
    proc = subprocess.run([PYTHON, "-m", "twistmail", "--help"], capture_output=True, timeout=60)
    if proc.returncode != 0:
        return f"python -m twistmail --help failed: {proc.stderr.decode(errors='replace')[-300:]}"
    proc = subprocess.run([PYTHON, "-m", "twisted", "--help"], capture_output=True, timeout=60)
    if b"twistmail" not in proc.stdout:
        return "twistd has no twistmail plugin (pip install -e . ?)"
    return None


def smtp_load(port: int, messages: int, size: int, concurrency: int, *options: str) -> dict:
    """bench/loadgen.py's result against C{port}; C{options} are more loadgen arguments
    (``--starttls``, ``--prefix-file F``).  Raises if any message was not accepted."""
    argv = [PYTHON, str(BENCH_DIR / "loadgen.py"), "--port", str(port), "--messages", str(messages),
            "--size", str(size), "--concurrency", str(concurrency), *options]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    result = json.loads(proc.stdout)
    if result["failed"]:
        raise RuntimeError(f"loadgen: {result['errors'][:3]}")
    return result
