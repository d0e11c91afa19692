"""One flood client process: many short-lived TLS echo conversations.

``python tests/adversarial/flood.py PORT CA_FILE COUNT CONCURRENCY`` prints
one JSON object: how many conversations were served in full, refused cleanly
(connection refused or reset, or the handshake failed with a TLS error,
before any application byte), or broken (anything else: a wrong or partial
echo, a hang, an error after the handshake), with a few example errors.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import ssl
import sys

TIMEOUT = 15.0  # generous: waiting in the listen backlog behind max_connections is fine
PAYLOAD_SIZE = 1024


async def conversation(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    payload = os.urandom(PAYLOAD_SIZE)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
            TIMEOUT,
        )
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
        return "refused", type(e).__name__
    except asyncio.TimeoutError:
        return "broken", "handshake timeout"
    except OSError as e:
        return "broken", repr(e)
    try:
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
        outcome = ("served", "") if got == payload else ("broken", "wrong echo")
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        outcome = ("broken", f"after handshake: {e!r}")
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        pass
    return outcome


async def main(port: int, ca_file: str, count: int, concurrency: int) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    outcomes: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            outcome, detail = await conversation(port, context)
            outcomes[outcome] += 1
            if detail and len(examples[outcome]) < 5:
                examples[outcome].append(detail)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps({"outcomes": dict(outcomes), "examples": examples}), flush=True)


if __name__ == "__main__":
    port, ca_file, count, concurrency = sys.argv[1:5]
    asyncio.run(main(int(port), ca_file, int(count), int(concurrency)))
