"""The suite's own event reader: a line the server is still writing is not an event yet.

(CI once failed on Python 3.10 with a JSONDecodeError: `stats()` read the event
file while the server process was in the middle of writing a long stats line.)
"""

from __future__ import annotations

import json
from pathlib import Path

from .helpers import complete_json_lines


def test_a_line_still_being_written_is_left_out(tmp_path: Path) -> None:
    events = tmp_path / "events"
    whole = json.dumps({"event": "ready", "pid": 1, "port": 4433}) + "\n"
    partial = json.dumps({"event": "stats", "pid": 1, "active": 0})
    events.write_text(whole + partial[:11])
    assert complete_json_lines(events) == [{"event": "ready", "pid": 1, "port": 4433}]
    events.write_text(whole + partial + "\n")
    assert [e["event"] for e in complete_json_lines(events)] == ["ready", "stats"]


def test_lines_that_are_not_events_are_skipped(tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.write_text('a warning on stdout\n{"event": "exit", "pid": 1}\n')
    assert complete_json_lines(events) == [{"event": "exit", "pid": 1}]
