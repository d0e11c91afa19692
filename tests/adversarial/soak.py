"""The soak behind scripts/soak: mixed traffic against a server process for N minutes.

The server is tests/adversarial/serve.py (securetcp's echo service, client
certificates optional, handshake_timeout 5 s, idle_timeout 20 s). Load
processes run a weighted mix of conversations: short handshakes, mutual TLS,
bulk echoes, idle connections, garbage (random bytes, HTTP, legacy
ClientHellos, truncated hellos), untrusted client certificates and resets.
Every 10 s a line: connections, RSS, descriptors, failures by reason.

Leak or fragmentation: the load runs in two equal phases, each followed by a
quiet point (all connections gone, a few seconds to settle, `gc.collect()`).
RSS at the first quiet point includes the allocator's high-water mark and
fragmentation; a leak keeps growing with work done, so the second phase
would add to it again. The soak reports the second phase's growth of RSS,
descriptors and live Python objects (the latter counts leaks precisely, with
no allocator in between).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trustme

from . import tlswire

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Run as `python -m adversarial.soak` from tests/ (scripts/soak does); so are
# the load processes.
PYTHONPATH = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"

HOST = "127.0.0.1"
MIB = 2**20


# ------------------------------------------------------------------ load


class Load:
    """One load process: `concurrency` tasks running conversations until told to stop."""

    def __init__(self, port: int, pki: Path) -> None:
        self.port = port
        self.good = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        self.mtls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        self.mtls.load_cert_chain(str(pki / "client.pem"))
        self.untrusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        self.untrusted.load_cert_chain(str(pki / "stranger.pem"))
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.stopping = False

    async def tls(self, context: ssl.SSLContext, payload: bytes) -> str:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port, ssl=context, server_hostname="localhost"),
            15,
        )
        try:
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            return "served" if got == payload else "wrong echo"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def handshake(self) -> str:
        return await self.tls(self.good, b"hello\n")

    async def mutual(self) -> str:
        return await self.tls(self.mtls, b"hello mtls\n")

    async def bulk(self) -> str:
        return await self.tls(self.good, os.urandom(MIB))

    async def idle(self) -> str:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port, ssl=self.good, server_hostname="localhost"),
            15,
        )
        try:
            for _ in range(3):
                await asyncio.sleep(random.uniform(1, 5))
                writer.write(b"still here\n")
                await asyncio.wait_for(reader.readexactly(11), 30)
            return "served"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def raw(self, payload: bytes, *, reset: bool = False) -> str:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST, self.port))
            await loop.sock_sendall(sock, payload)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return "refused as expected"
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(loop.sock_recv(sock, 65536), 15):
                    pass
            return "refused as expected"
        finally:
            sock.close()

    async def garbage(self) -> str:
        choice = random.randrange(5)
        if choice == 0:
            return await self.raw(os.urandom(random.randint(1, 4096)))
        if choice == 1:
            return await self.raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if choice == 2:
            version = random.choice(["SSLv3", "TLSv1.0", "TLSv1.1"])
            return await self.raw(tlswire.legacy_client_hello(tlswire.VERSIONS[version]))
        if choice == 3:
            hello = tlswire.python_client_hello()
            return await self.raw(hello[: random.randint(1, len(hello) - 1)])
        return await self.raw(tlswire.python_client_hello(), reset=True)

    async def stranger(self) -> str:
        try:
            result = await self.tls(self.untrusted, b"let me in\n")
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            return "refused as expected"
        return f"untrusted certificate {result}"

    MIX = (
        ("handshake", 40),
        ("mutual", 10),
        ("bulk", 8),
        ("idle", 7),
        ("garbage", 25),
        ("stranger", 10),
    )

    async def worker(self) -> None:
        names = [name for name, _ in self.MIX]
        weights = [weight for _, weight in self.MIX]
        while not self.stopping:
            name = random.choices(names, weights)[0]
            try:
                outcome = await getattr(self, name)()
            except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                outcome = f"error {type(e).__name__}"
            self.outcomes[f"{name}: {outcome}"] += 1

    async def run(self, concurrency: int) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        reporter = asyncio.ensure_future(self.report())
        await asyncio.gather(*(self.worker() for _ in range(concurrency)))
        reporter.cancel()
        print(json.dumps(dict(self.outcomes)), flush=True)

    def stop(self) -> None:
        self.stopping = True

    async def report(self) -> None:
        while True:
            await asyncio.sleep(10)
            print(json.dumps(dict(self.outcomes)), flush=True)


# ---------------------------------------------------------------- server


def make_pki(directory: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca.issue_cert("soak-client").private_key_and_cert_chain_pem.write_to_path(
        str(directory / "client.pem")
    )
    trustme.CA().issue_cert("stranger").private_key_and_cert_chain_pem.write_to_path(
        str(directory / "stranger.pem")
    )


def proc_value(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, pki: Path, directory: Path) -> None:
        self.out = directory / "server.out"
        self.err = directory / "server.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable,
            str(HERE / "serve.py"),
            "--cert",
            str(pki / "server.pem"),
            "--key",
            str(pki / "server.pem"),
            "--client-ca",
            str(pki / "ca.pem"),
            "--handshake-timeout",
            "5",
            "--idle-timeout",
            "20",
            "--max-connections",
            "1000",
            "--count-objects",
        ]
        with open(self.out, "wb") as stdout, open(self.err, "wb") as stderr:
            self.proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        ready = self.wait("ready", 1)
        self.port: int = ready["port"]
        self.pid: int = ready["pid"]

    def events(self, kind: str) -> list[dict[str, Any]]:
        text = self.out.read_text(errors="replace")
        # The server may be writing the last line as we read: only whole lines count.
        lines = text[: text.rfind("\n") + 1].splitlines()
        return [e for e in map(json.loads, filter(None, lines)) if e["event"] == kind]

    def wait(self, kind: str, count: int, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(events := self.events(kind)) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server: no {kind} event; stderr:\n{self.err.read_text()}")
            time.sleep(0.05)
        return events[count - 1]

    def stats(self) -> dict[str, Any]:
        count = len(self.events("stats"))
        os.kill(self.pid, signal.SIGUSR1)
        return self.wait("stats", count + 1)

    def sample(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            **stats,
            "rss": proc_value(self.pid, "VmRSS"),
            "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
        }


# ------------------------------------------------------------------ soak


def start_load(
    port: int, pki: Path, processes: int, concurrency: int
) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adversarial.soak",
                "--load",
                str(port),
                str(pki),
                str(concurrency),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]


class LoadOutcomes:
    """The latest cumulative outcome counts each load process printed."""

    def __init__(self, procs: list[subprocess.Popen[str]]) -> None:
        self.latest: list[dict[str, int]] = [{} for _ in procs]
        self.threads = [
            threading.Thread(target=self._read, args=(i, p), daemon=True)
            for i, p in enumerate(procs)
        ]
        for thread in self.threads:
            thread.start()

    def _read(self, i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                self.latest[i] = json.loads(line)

    def total(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for counts in self.latest:
            total.update(counts)
        return total


def line(elapsed: float, s: dict[str, Any], phase: str) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())) or "none"
    return (
        f"{elapsed:6.0f} s {phase:8} accepted {s['accepted']:7d} active {s['active']:4d} "
        f"handshakes {s['handshakes']:7d} rejected {s['rejected']:4d} "
        f"RSS {s['rss'] / MIB:6.1f} MiB fds {s['fds']:4d} failures: {failures}"
    )


def quiet_point(server: Server, start: float, name: str) -> dict[str, Any]:
    """Wait for every connection to end, let the allocator settle, sample."""
    deadline = time.monotonic() + 60
    while (sample := server.sample())["active"] > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    # Then until the allocator has settled: two readings 0.5 s apart agree.
    settle_deadline = time.monotonic() + 10
    previous = None
    while sample["rss"] != previous and time.monotonic() < settle_deadline:
        previous = sample["rss"]
        time.sleep(0.5)
        sample = server.sample()
    print(line(time.monotonic() - start, sample, name) + f" objects {sample['python_objects']}")
    return sample


def phase(
    server: Server, args: argparse.Namespace, pki: Path, start: float, name: str, seconds: float
) -> collections.Counter[str]:
    procs = start_load(server.port, pki, args.processes, args.concurrency)
    outcomes = LoadOutcomes(procs)
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        time.sleep(min(10.0, end - now))
        print(line(time.monotonic() - start, server.sample(), name), flush=True)
        if server.proc.poll() is not None:
            raise SystemExit(f"the server died: {server.err.read_text()[-3000:]}")
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(120)
    for thread in outcomes.threads:
        thread.join(10)
    return outcomes.total()


def soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="securetcp-soak-") as tmp:
        directory = Path(tmp)
        make_pki(directory)
        server = Server(directory, directory)
        start = time.monotonic()
        try:
            baseline = server.sample()
            print(line(0, baseline, "baseline") + f" objects {baseline['python_objects']}")
            half = args.minutes * 60 / 2
            first = phase(server, args, directory, start, "phase 1", half)
            q1 = quiet_point(server, start, "quiet 1")
            second = phase(server, args, directory, start, "phase 2", half)
            q2 = quiet_point(server, start, "quiet 2")
        finally:
            server.proc.send_signal(signal.SIGTERM)
            status = server.proc.wait(60)
        outcomes = first + second
        unexpected = {
            k: v for k, v in outcomes.items() if not k.endswith(("served", "refused as expected"))
        }
        report = {
            "minutes": args.minutes,
            "connections": q2["accepted"],
            "handshakes": q2["handshakes"],
            "failures": q2["failures"],
            "handler_errors": q2["handler_errors"],
            "client_outcomes": dict(sorted(outcomes.items())),
            "unexpected_client_outcomes": unexpected,
            "rss_mib": {
                "baseline": round(baseline["rss"] / MIB, 1),
                "quiet_1": round(q1["rss"] / MIB, 1),
                "quiet_2": round(q2["rss"] / MIB, 1),
                "growth_phase_2": round((q2["rss"] - q1["rss"]) / MIB, 1),
            },
            "fds": {"baseline": baseline["fds"], "quiet_1": q1["fds"], "quiet_2": q2["fds"]},
            "python_objects": {
                "baseline": baseline["python_objects"],
                "quiet_1": q1["python_objects"],
                "quiet_2": q2["python_objects"],
            },
            "server_exit_status": status,
        }
        print("== soak summary")
        print(json.dumps(report, indent=2))
        ok = (
            status == 0
            and q2["fds"] <= baseline["fds"]
            and q2["rss"] - q1["rss"] < 0.1 * q1["rss"] + 4 * MIB
            and q2["python_objects"] - q1["python_objects"] < 2000
            and not unexpected
            and q2["handler_errors"] == 0
        )
        print("soak: OK" if ok else "soak: PROBLEM (see the summary)")
        return 0 if ok else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, pki, concurrency = sys.argv[2:5]
        asyncio.run(Load(int(port), Path(pki)).run(int(concurrency)))
        return 0
    parser = argparse.ArgumentParser(description="Mixed traffic against a server process.")
    parser.add_argument("--minutes", type=float, default=10.0, help="load time (default 10)")
    parser.add_argument("--processes", type=int, default=2, help="load processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=24, help="tasks per load process")
    return soak(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
