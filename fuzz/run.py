"""Run one fuzz target under atheris (libFuzzer): ``python fuzz/run.py TARGET [libFuzzer args]``.

Examples::

    python fuzz/run.py handshake fuzz/corpus/clienthello -max_total_time=60
    python fuzz/run.py framing -runs=20000

securetcp's modules are instrumented for coverage; a target's FuzzFinding (or
any other exception) is a crash, saved by libFuzzer as ``crash-<sha1>``
(``-artifact_prefix=DIR/`` puts it elsewhere). scripts/fuzz runs every target
with a work corpus; tests/test_fuzz_short.py runs each for a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris

with atheris.instrument_imports(include=["securetcp"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer args]")
    target = targets.TARGETS[sys.argv[1]]
    if sys.argv[1] in ("proxyproto", "all"):
        with atheris.instrument_imports(include=["securetcp"]):
            try:
                import securetcp.proxyproto  # noqa: F401
            except ImportError:
                pass  # the target then fails at once, saying so
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
