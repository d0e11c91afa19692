"""Where the servers and the load generator run: ``--server-cpus``, ``--client-cpus``.

By default (two or more CPUs) every server is pinned to the first CPU this
process may use and the load generator to the second; the multi-process
``--scaling`` rows then run unpinned, since on two cores the load generator
needs one of them anyway. Given ``--server-cpus`` explicitly (a larger
machine), single-process rows run on its first CPU and the scaling rows on
the whole set, with the load generator on ``--client-cpus`` (default: every
other CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse a CPU list such as ``0-7`` or ``0,2,4-6`` (as in taskset/cpuset).

    Raises ValueError with a one-line reason on a malformed or empty list.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-7 or 0,2,4-6)") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"empty CPU list: {text!r}")
    return tuple(sorted(cpus))


@dataclass(frozen=True)
class Placement:
    """CPU sets of one run; ``None`` means not pinned (the kernel decides)."""

    server: tuple[int, ...] | None  # single-process rows use server[0]
    client: tuple[int, ...] | None
    scaling: tuple[int, ...] | None  # the multi-process rows

    @property
    def server_core(self) -> set[int] | None:
        """The one CPU single-process servers are pinned to."""
        return {self.server[0]} if self.server else None

    def describe(self) -> dict[str, object]:
        """For the report header and the JSON file."""

        def show(cpus: tuple[int, ...] | None) -> object:
            return list(cpus) if cpus is not None else "any"

        return {
            "server_cpus": show(self.server[:1] if self.server else None),
            "client_cpus": show(self.client),
            "scaling_cpus": show(self.scaling),
        }


def placement(server: str | None, client: str | None) -> Placement:
    """The placement for these ``--server-cpus`` / ``--client-cpus`` values.

    Raises ValueError (one line) for CPUs this process may not run on or for
    overlapping sets.
    """
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    srv = parse_cpu_list(server) if server else None
    cli = parse_cpu_list(client) if client else None
    for name, cpus in (("--server-cpus", srv), ("--client-cpus", cli)):
        if cpus is not None and not set(cpus) <= set(allowed):
            missing = sorted(set(cpus) - set(allowed))
            raise ValueError(
                f"{name}: CPUs {missing} are not available (this process may use {list(allowed)})"
            )
    if srv is None and cli is None:
        if len(allowed) < 2:
            return Placement(None, None, None)
        return Placement((allowed[0],), (allowed[1],), None)
    if srv is None:
        assert cli is not None
        srv = tuple(c for c in allowed if c not in cli)[:1]
        if not srv:
            raise ValueError("--client-cpus leaves no CPU for the servers")
        return Placement(srv, cli, None)
    if cli is None:
        cli = tuple(c for c in allowed if c not in srv)
        if not cli:
            raise ValueError("--server-cpus leaves no CPU for the load generator")
    if set(srv) & set(cli):
        raise ValueError(
            f"--server-cpus {list(srv)} and --client-cpus {list(cli)} overlap: "
            "server CPU time would include the load generator's contention"
        )
    return Placement(srv, cli, srv)
