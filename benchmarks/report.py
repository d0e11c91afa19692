"""Medians over rounds, the text table and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.workloads.base import Measurement, Workload


@dataclass
class Row:
    """All rounds of one (workload, server) pair."""

    workload: Workload
    server: str
    baseline: bool
    rounds: list[Measurement | str] = field(default_factory=list)  # str: failure

    @property
    def ok(self) -> list[Measurement]:
        """The rounds that produced a measurement."""
        return [m for m in self.rounds if isinstance(m, Measurement)]

    @property
    def failures(self) -> list[str]:
        """The failure reasons of the other rounds."""
        return [m for m in self.rounds if isinstance(m, str)]

    def median(self, attr: str) -> float | None:
        """Median of a Measurement attribute over the successful rounds."""
        values = [getattr(m, attr) for m in self.ok if getattr(m, attr) is not None]
        return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(rows: list[Row]) -> str:
    """The report table: one line per (workload, server)."""
    header = (
        "workload",
        "server",
        "result",
        "per server-CPU-s",
        "vs base",
        "vs base/CPU",
        "srv CPU",
        "gen CPU",
        "rounds",
    )
    lines: list[tuple[str, ...]] = [header]
    bases = {row.workload.name: row for row in rows if row.baseline and row.ok}
    for row in rows:
        ok = len(row.ok)
        if not ok:
            reason = row.failures[0] if row.failures else "not run"
            lines.append((row.workload.name, row.server, f"FAILED: {reason[:150]}"))
            continue
        base = bases.get(row.workload.name)
        value, per_cpu = row.median("value"), row.median("per_cpu")
        cpu_unit = row.workload.cpu_unit
        lines.append(
            (
                row.workload.name,
                row.server,
                f"{_fmt(value)} {row.workload.unit}",
                f"{_fmt(per_cpu)} {cpu_unit}" if cpu_unit else "-",
                _ratio(value, base.median("value")) if base else "-",
                _ratio(per_cpu, base.median("per_cpu")) if base and cpu_unit else "-",
                _pct(row.median("server_cpu")),
                _pct(row.median("client_cpu")) if row.workload.cpu_unit else "-",
                f"{ok}/{len(row.rounds)}"
                + (
                    f" ({sum(m.errors for m in row.ok)} err)"
                    if any(m.errors for m in row.ok)
                    else ""
                ),
            )
        )
    widths = [
        max(len(line[i]) for line in lines if len(line) > i and len(line) == len(header))
        for i in range(len(header))
    ]
    out = []
    for line in lines:
        if len(line) < len(header):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]}")
            continue
        cells = [
            f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if line is header:
            out.append("-" * len(out[-1]))
    return "\n".join(out)


def header(meta: dict[str, object], params: dict[str, object]) -> str:
    """The lines above the table: when, on what, with which settings."""
    packages = meta["packages"]
    assert isinstance(packages, dict)
    return "\n".join(
        [
            f"date      {meta['date']}",
            f"machine   {meta['nproc']} CPUs, {meta['cpu_model']}, Linux {meta['kernel']}",
            f"python    {meta['python']}, {meta['openssl']}",
            "packages  " + ", ".join(f"{k} {v}" for k, v in packages.items()),
            f"commit    {meta.get('commit', 'unknown')}, load average at start "
            f"{meta.get('loadavg_start', 'unknown')}",
            "settings  " + ", ".join(f"{k}={v}" for k, v in params.items()),
        ]
    )


NOTES = """\
medians over rounds; "vs base" = ratio to tornado (tornado x1 for scaling); memory is
PSS growth per idle connection (lower is better); srv CPU / gen CPU = server / load
generator CPU time over wall time (100% = one core busy)."""


PROXY_NOTES = """\
medians over rounds; "vs base" = ratio to HAProxy (mode tcp, nbthread 1) in the same mode;
"tls->tls" rows re-originate TLS to the upstream; per server-CPU-s = per second of the
proxy's CPU time (the upstream echo's is not counted); memory is the proxy's PSS growth per
idle connection (with its upstream connection)."""


def to_json(
    path: Path, meta: dict[str, object], params: dict[str, object], rows: list[Row]
) -> None:
    """Write every round and the medians to ``path``."""
    data = {
        "meta": meta,
        "params": params,
        "rows": [
            {
                "workload": row.workload.name,
                "server": row.server,
                "unit": row.workload.unit,
                "cpu_unit": row.workload.cpu_unit,
                "median": {
                    attr: row.median(attr)
                    for attr in ("value", "per_cpu", "server_cpu", "client_cpu")
                },
                "rounds": [
                    asdict(m) if isinstance(m, Measurement) else {"failed": m} for m in row.rounds
                ],
            }
            for row in rows
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
