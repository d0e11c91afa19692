"""The README's Performance table from one results file, with issue 13's targets checked.

    python -m benchmarks.summary benchmarks/results/<timestamp>.json

Prints a Markdown table of medians per server CPU-second (ratios to tornado
in the same run) and one line per target: met, not met, or not measured.
Only echo-server runs are summarised (not ``--proxy`` files).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "tornado"
# (workload, column title, per-CPU median or headline median)
COLUMNS = [
    ("handshake", "handshakes (ECDSA P-256)", "per_cpu"),
    ("handshake-rsa", "handshakes (RSA-2048)", "per_cpu"),
    ("bulk", "bulk echo MB", "per_cpu"),
    ("small", "100-byte msgs (64 conns)", "per_cpu"),
    ("memory", "memory per idle TLS conn", "value"),
]
LABELS = {
    "tornado": "tornado `TCPServer`",
    "asyncio": "asyncio streams",
    "uvloop": "asyncio + uvloop",
    "securetcp": "**securetcp**",
    "securetcp-uvloop": "**securetcp, uvloop**",
    "c-openssl": "C epoll + OpenSSL",
}
PYTHON_PEERS = ("tornado", "asyncio", "uvloop")
OURS = ("securetcp", "securetcp-uvloop")

Medians = dict[tuple[str, str], float]


def medians(data: dict[str, Any]) -> Medians:
    """(workload, server) -> the median the table shows for it."""
    attr = {w: a for w, _, a in COLUMNS}
    out: Medians = {}
    for row in data["rows"]:
        workload = row["workload"]
        if workload in attr and row["median"].get(attr[workload]) is not None:
            out[workload, row["server"]] = float(row["median"][attr[workload]])
    return out


def _cell(m: Medians, workload: str, server: str) -> str:
    value = m.get((workload, server))
    if value is None:
        return "-"
    if workload == "memory":
        return f"{value:.1f} KiB"
    base = m.get((workload, BASELINE))
    ratio = f" ({value / base:.2f}x)" if base else ""
    return f"{value:,.0f}{ratio}"


def table(m: Medians) -> str:
    """The Markdown table: one line per server, one column per workload."""
    servers = [s for s in LABELS if any((w, s) in m for w, _, _ in COLUMNS)]
    lines = [
        "| per server CPU-second | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for server in servers:
        cells = [_cell(m, w, server) for w, _, _ in COLUMNS]
        lines.append(f"| {LABELS[server]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One target of issue 13: a description and its check (None: not measured)."""

    text: str
    check: Callable[[Medians], bool | None]


def _above(workload: str, server: str, *others: str, factor: float = 1.0) -> Callable[..., Any]:
    def check(m: Medians) -> bool | None:
        mine = m.get((workload, server))
        theirs = [m.get((workload, o)) for o in others]
        if mine is None or any(t is None for t in theirs):
            return None
        return all(mine > factor * t for t in theirs if t is not None)

    return check


def _at_least(workload: str, server: str, factor: float) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        mine, base = m.get((workload, server)), m.get((workload, BASELINE))
        if mine is None or base is None:
            return None
        return mine >= factor * base

    return check


def _at_most(workload: str, server: str, limit: float) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        mine = m.get((workload, server))
        return None if mine is None else mine <= limit

    return check


def targets() -> list[Target]:
    """Issue 13's echo-server targets, per server CPU-second."""
    out = []
    for hs, name in (("handshake", "ECDSA"), ("handshake-rsa", "RSA-2048")):
        out.append(
            Target(
                f"{name} handshakes: securetcp (default loop) above every Python peer, uvloop "
                "included",
                _above(hs, "securetcp", *PYTHON_PEERS),
            )
        )
        out.append(
            Target(
                f"{name} handshakes: securetcp-uvloop above every Python peer",
                _above(hs, "securetcp-uvloop", *PYTHON_PEERS),
            )
        )
        for ours in OURS:
            out.append(
                Target(f"{name} handshakes: {ours} >= 1.3x tornado", _at_least(hs, ours, 1.3))
            )
    for workload, factor, what in (("small", 2.3, "100-byte messages"), ("bulk", 1.5, "bulk")):
        for ours in OURS:
            out.append(
                Target(f"{what}: {ours} >= {factor}x tornado", _at_least(workload, ours, factor))
            )
            out.append(Target(f"{what}: {ours} above uvloop", _above(workload, ours, "uvloop")))
    for ours in OURS:
        out.append(
            Target(
                f"memory per idle TLS connection: {ours} <= 14 KiB", _at_most("memory", ours, 14)
            )
        )
    return out


def verdicts(m: Medians) -> str:
    """One Markdown list item per target: met / NOT met / not measured."""
    words = {True: "met", False: "**not met**", None: "not measured"}
    return "\n".join(f"- {t.text}: {words[t.check(m)]}" for t in targets())


def header(data: dict[str, Any]) -> str:
    """Run, machine and versions, as one paragraph."""
    meta, params = data["meta"], data["params"]
    pk = meta["packages"]
    return (
        f"Run {meta['date']} (commit {meta.get('commit', 'unknown')}), {meta['nproc']} vCPU "
        f"{meta['cpu_model']}, Linux {meta['kernel']}, Python {meta['python']}, "
        f"{meta['openssl']}, tornado {pk.get('tornado')}, uvloop {pk.get('uvloop')}; "
        f"{params['rounds']} round(s) of {params['duration']:g} s, medians; load average "
        f"{meta.get('loadavg_start', 'unknown')} at start, {meta.get('loadavg_end', 'unknown')} "
        "at end."
    )


def main(argv: list[str] | None = None) -> int:
    """Print the summary of one results file."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    p.add_argument("results", type=Path, help="a JSON file written by scripts/bench")
    args = p.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {args.results}: {e}")
    if data.get("params", {}).get("mode") == "proxy":
        p.error(f"{args.results} is a --proxy run; this summarises echo-server runs")
    m = medians(data)
    print(header(data))
    print()
    print(table(m))
    print()
    print(verdicts(m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
