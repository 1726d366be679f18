"""Benchmark twistmail against a durable aiosmtpd baseline, side by side.

For every repetition and concurrency level: a fresh aiosmtpd baseline is
started, loaded and stopped, then a fresh twistmail (domain and user made
with its CLI) is loaded, its mailbox retrieved over POP3, and stopped.  The
order of the two alternates between repetitions so neither always runs on
a warmer machine.  Medians are reported; the SMTP figure that matters is
the twistmail/aiosmtpd ratio, since absolute numbers on a noisy 2-core box
mean little.

    python bench/run.py [--messages 2000] [--size 4096] [--concurrency 1,20]
                        [--repeat 3] [--loadgen asyncio|smtp-source] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import servers
from servers import BENCH_DIR, PYTHON, Server

POP3_TARGET_SECONDS = 1.0
SMTP_TARGET_RATIO = 2.0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _run_json(argv: list[str], timeout: float) -> Any:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(argv)} rc={proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def load(server: Server, maildir: Path, args: argparse.Namespace, concurrency: int) -> dict:
    """Drive one SMTP load at ``server`` and check nothing accepted was lost."""
    argv = [PYTHON, str(BENCH_DIR / "loadgen.py"), "--port", str(server.port)]
    argv += ["--messages", str(args.messages), "--size", str(args.size)]
    argv += ["--concurrency", str(concurrency), "--engine", args.loadgen]
    argv += ["--pipelining", args.pipelining]
    (user0, sys0), machine0 = server.cpu(), machine_jiffies()
    result = _run_json(argv, timeout=600)
    (user1, sys1), machine1 = server.cpu(), machine_jiffies()
    cpu0, cpu1 = user0 + sys0, user1 + sys1
    result["server_cpu_seconds"] = cpu1 - cpu0
    result["server_cpu_sys_seconds"] = sys1 - sys0
    result["server_cpu_ms_per_msg"] = 1000 * (cpu1 - cpu0) / max(result["accepted"], 1)
    busy, total = (machine1[0] - machine0[0]), (machine1[1] - machine0[1])
    result["machine_busy_pct"] = 100 * busy / total if total else 0.0
    result["delivered"] = servers.count_delivered(maildir)
    result["no_lost_mail"] = result["delivered"] == result["accepted"]
    return result


def bench_aiosmtpd(workdir: Path, args: argparse.Namespace, concurrency: int) -> dict:
    server, maildir = servers.aiosmtpd_server(workdir, args.baseline_fsync == "thread")
    server.start()
    try:
        return load(server, maildir, args, concurrency)
    finally:
        server.stop()


def bench_twistmail(workdir: Path, args: argparse.Namespace, concurrency: int) -> dict:
    server, maildir, ports = servers.twistmail_server(workdir)
    pop3_port = ports["pop3"]
    server.start()
    try:
        result = load(server, maildir, args, concurrency)
        argv = [PYTHON, str(BENCH_DIR / "pop3_retrieve.py"), "--port", str(pop3_port)]
        argv += ["--user", f"{servers.USER}@{servers.DOMAIN}", "--password", servers.PASSWORD]
        argv += ["--expected", str(result["accepted"]), "--size", str(args.size)]
        argv += ["--smtp-source"] if args.loadgen == "smtp-source" else []
        cpu0 = sum(server.cpu())
        result["pop3"] = _run_json(argv, timeout=600)
        result["pop3_server_cpu_seconds"] = sum(server.cpu()) - cpu0
        return result
    except Exception:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()


def median(runs: list[dict], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key] if isinstance(value, dict) else value[int(key)]
        values.append(value)
    return statistics.median(values) if values else None


def summarize(results: dict, args: argparse.Namespace) -> tuple[dict, bool]:
    """Medians per concurrency plus pass/fail of targets and integrity checks."""
    summary: dict[str, Any] = {}
    ok = True
    for conc, runs in results.items():
        base, tm = runs["aiosmtpd"], runs.get("twistmail", [])
        row: dict[str, Any] = {
            "aiosmtpd_msgs_per_sec": median(base, "msgs_per_sec"),
            "aiosmtpd_server_cpu_ms_per_msg": median(base, "server_cpu_ms_per_msg"),
        }
        for run in base + tm:
            ok = ok and run["no_lost_mail"] and run["failed"] == 0
        if tm:
            row["twistmail_msgs_per_sec"] = median(tm, "msgs_per_sec")
            row["twistmail_server_cpu_ms_per_msg"] = median(tm, "server_cpu_ms_per_msg")
            row["ratio"] = row["twistmail_msgs_per_sec"] / row["aiosmtpd_msgs_per_sec"]
            # Each repetition ran both servers back to back: ratios of pairs
            # cancel slow drifts in machine load that medians alone do not.
            row["paired_ratios"] = [
                t["msgs_per_sec"] / b["msgs_per_sec"] for t, b in zip(tm, base, strict=True)
            ]
            row["median_paired_ratio"] = statistics.median(row["paired_ratios"])
            row["pop3_poplib_seconds"] = median(tm, "pop3", "0", "seconds")
            row["pop3_pipelined_seconds"] = median(tm, "pop3", "1", "seconds")
            for run in tm:
                ok = ok and all(not p["errors"] for p in run["pop3"])
        summary[conc] = row
    return summary, ok


def print_table(summary: dict, args: argparse.Namespace, ok: bool) -> None:
    n = args.messages
    print(
        f"\nSMTP acceptance: {n} x {args.size} B, loadgen={args.loadgen}, "
        f"pipelining={args.pipelining}, baseline fsync={args.baseline_fsync}, "
        f"median of {args.repeat}"
    )
    print(
        f"{'conc':>4} {'twistmail msg/s':>16} {'aiosmtpd msg/s':>15} {'ratio':>6}"
        f" {'CPU ms/msg tm':>14} {'CPU ms/msg aio':>15}  paired ratios"
    )

    def fmt(value: float | None, spec: str) -> str:
        width = spec.split(".")[0]
        return format("-", f">{width}") if value is None else format(value, spec)

    for conc, row in summary.items():
        print(
            f"{conc:>4} {fmt(row.get('twistmail_msgs_per_sec'), '16.0f')}"
            f" {fmt(row['aiosmtpd_msgs_per_sec'], '15.0f')} {fmt(row.get('ratio'), '6.2f')}"
            f" {fmt(row.get('twistmail_server_cpu_ms_per_msg'), '14.2f')}"
            f" {fmt(row['aiosmtpd_server_cpu_ms_per_msg'], '15.2f')}"
            f"  {' '.join(f'{r:.2f}' for r in row.get('paired_ratios', []))}"
        )
    if any("pop3_poplib_seconds" in row for row in summary.values()):
        print(f"\nPOP3 retrieval of the {n} messages (twistmail, after the SMTP run at conc)")
        print(
            f"{'conc':>4} {'poplib s':>9} {'poplib msg/s':>13} {'pipelined s':>12}"
            f" {'pipelined msg/s':>16}"
        )
        for conc, row in summary.items():
            p, q = row["pop3_poplib_seconds"], row["pop3_pipelined_seconds"]
            print(f"{conc:>4} {p:9.3f} {n / p:13.0f} {q:12.3f} {n / q:16.0f}")
    top = str(max(int(c) for c in summary))
    ratio = summary[top].get("median_paired_ratio")
    pop = min(
        (r["pop3_poplib_seconds"] for r in summary.values() if "pop3_poplib_seconds" in r),
        default=None,
    )
    print()
    if ratio is not None:
        verdict = "met" if ratio >= SMTP_TARGET_RATIO else "NOT met"
        print(
            f"target ratio >= {SMTP_TARGET_RATIO} at conc {top} (median of paired ratios):"
            f" {ratio:.2f} ({verdict})"
        )
    if pop is not None:
        verdict = "met" if pop < POP3_TARGET_SECONDS else "NOT met"
        print(f"target POP3 {n} msgs < {POP3_TARGET_SECONDS} s (poplib): {pop:.3f} s ({verdict})")
    print("integrity (every 250 on disk, no failures, POP3 verified):", "ok" if ok else "FAILED")


def run_all(args, concurrencies, systems, benches, results, top: Path) -> None:
    """Every repetition, concurrency and system, alternating which system runs first."""
    for rep in range(args.repeat):
        for conc in concurrencies:
            for system in systems if rep % 2 == 0 else systems[::-1]:
                workdir = top / f"rep{rep + 1}-conc{conc}-{system}"
                workdir.mkdir()
                run = benches[system](workdir, args, conc)
                results[str(conc)][system].append(run)
                extra = ""
                if "pop3" in run:
                    extra = "  pop3 " + " ".join(
                        f"{p['client']}={p['seconds']:.3f}s (login {p['login_seconds']:.3f}s)"
                        for p in run["pop3"]
                    )
                print(
                    f"[rep {rep + 1} conc {conc:>2}] {system:9} {run['msgs_per_sec']:7.0f} msg/s"
                    f"  accepted {run['accepted']} delivered {run['delivered']}"
                    f"  server CPU {run['server_cpu_seconds']:.2f}s"
                    f" (sys {run['server_cpu_sys_seconds']:.2f}s)"
                    f"  client CPU {run['client_cpu_seconds']:.2f}s"
                    f"  machine {run['machine_busy_pct']:.0f}%{extra}",
                    flush=True,
                )
                for err in run["errors"] + [e for p in run.get("pop3", []) for e in p["errors"]]:
                    print(f"    error: {err}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", default="1,20", help="comma-separated list")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--loadgen", choices=("asyncio", "smtp-source"), default="asyncio")
    parser.add_argument(
        "--pipelining",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: only if the server advertises PIPELINING (aiosmtpd does not)",
    )
    parser.add_argument("--baseline-fsync", choices=("inline", "thread"), default="inline")
    parser.add_argument("--baseline-only", action="store_true", help="skip twistmail")
    parser.add_argument("--workdir", type=Path, default=None, help="where temp dirs go")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    if not args.baseline_only and (reason := servers.twistmail_available()):
        print(f"twistmail not runnable, measuring the baseline only: {reason}", file=sys.stderr)
        args.baseline_only = True
    systems = ["aiosmtpd"] + ([] if args.baseline_only else ["twistmail"])
    benches = {"aiosmtpd": bench_aiosmtpd, "twistmail": bench_twistmail}

    results: dict[str, dict[str, list[dict]]] = {
        str(c): {s: [] for s in systems} for c in concurrencies
    }
    # Every run's files are kept until the end: deleting thousands of files
    # makes ext4's inode allocator slow for the next ~30 s (its scan skips
    # "recently deleted" inodes, reading each one's table block; seen with
    # perf as find_inode_bit/recently_deleted), which would tax whichever
    # server happened to run next.
    top = Path(tempfile.mkdtemp(prefix="twistmail-bench-", dir=args.workdir))
    try:
        run_all(args, concurrencies, systems, benches, results, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)

    summary, ok = summarize(results, args)
    print_table(summary, args, ok)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summary": summary,
                    "runs": results,
                    "integrity_ok": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
