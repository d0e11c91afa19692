"""BadSSLServer: every scenario served from one PKI, one port each, optionally one SNI port.

Each scenario is a `TCPServer` with its own ``ssl.SSLContext`` (used as
given). After the handshake a connection gets a short HTTP answer when it
sends an HTTP/1.x request or the HTTP/2 preface (so curl and browsers show
the scenario), and an echo otherwise. The optional SNI port reads the TLS
ClientHello, picks the scenario from the server name ``SCENARIO.badssl.test``
and passes the connection, untouched, to that scenario's port: so protocol
versions, cipher suites and client authentication behave exactly as on the
scenario's own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import ssl
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from securetcp.iostream import IOStream, StreamClosedError
from securetcp.services.badssl.pki import BadSSLPKI
from securetcp.services.badssl.scenarios import SCENARIOS, Scenario, credential, slow_keys
from securetcp.tcpserver import TCPServer

__all__ = ["BadSSLServer", "parse_client_hello_sni"]

log = logging.getLogger("securetcp.badssl")

_TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_HTTP_REQUEST = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r?\n")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_MAX_REQUEST_HEAD = 16384


# -- per-scenario servers --------------------------------------------------------------------


def _server_context(
    scenario: Scenario, certfile: Path, keyfile: Path, ca_pem: str
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # TLS 1.0/1.1 are deprecated in the ssl module: serving them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        if scenario.security_level_0:
            # Before loading the certificate: level 2 refuses a 1024-bit key or SHA-1.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if scenario.ciphers is not None:
            context.set_ciphers(
                scenario.ciphers + (":@SECLEVEL=0" if scenario.security_level_0 else "")
            )
        if scenario.tls_versions is not None:
            low, high = scenario.tls_versions
            context.minimum_version = _TLS_VERSIONS[low]
            context.maximum_version = _TLS_VERSIONS[high]
    context.load_cert_chain(str(certfile), str(keyfile))
    if scenario.client_auth != "none":
        context.verify_mode = (
            ssl.CERT_REQUIRED if scenario.client_auth == "required" else ssl.CERT_OPTIONAL
        )
        context.load_verify_locations(cadata=ca_pem)
    if scenario.alpn:
        context.set_alpn_protocols(list(scenario.alpn))
    return context


def _probe_handshake(
    server_context: ssl.SSLContext, scenario: Scenario, client_pair: tuple[Path, Path]
) -> str | None:
    """Handshake in memory with a client that accepts anything; None or why it failed.

    Tells whether the local OpenSSL can serve the scenario at all (old
    protocol versions may be compiled out or forbidden by the system policy).
    """
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            client.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        if scenario.tls_versions is not None:
            low, high = scenario.tls_versions
            client.minimum_version = _TLS_VERSIONS[low]
            client.maximum_version = _TLS_VERSIONS[high]
    client.load_cert_chain(str(client_pair[0]), str(client_pair[1]))
    if scenario.alpn:
        client.set_alpn_protocols(list(scenario.alpn))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="probe.badssl.test")
    tls_server = server_context.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    try:
        for _ in range(20):
            for side, tls in (("client", tls_client), ("server", tls_server)):
                if not done[side]:
                    try:
                        tls.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done.values()):
                return None
        return "the probe handshake did not finish"
    except ssl.SSLError as e:
        return f"{e.reason or e}"


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _first_h2_headers(frames: bytes) -> bool:
    """Whether `frames` (after the preface) hold a complete HEADERS frame."""
    pos = 0
    while pos + 9 <= len(frames):
        end = pos + 9 + int.from_bytes(frames[pos : pos + 3], "big")
        if end > len(frames):
            return False
        if frames[pos + 3] == 1:
            return True
        pos = end
    return False


class _ScenarioServer(TCPServer):
    """One scenario: an HTTP/1.x or HTTP/2 answer for an HTTP request, an echo otherwise."""

    def __init__(self, scenario: Scenario, context: ssl.SSLContext, **keywords: Any) -> None:
        super().__init__(ssl_options=context, **keywords)
        self.scenario = scenario

    def _body(self, stream: IOStream) -> bytes:
        version = getattr(stream, "tls_version", None) or "TLS"
        return (
            f"badssl {self.scenario.name}: handshake completed ({version}); "
            f"a verifying client expects {self.scenario.expect}\n"
        ).encode()

    async def _answer_h2(self, stream: IOStream, data: bytes) -> None:
        """The smallest HTTP/2 answer: 200 and the body on the client's first stream."""
        while len(data) < _MAX_REQUEST_HEAD:
            if len(data) >= len(_H2_PREFACE) and _first_h2_headers(data[len(_H2_PREFACE) :]):
                break
            data += await stream.read_bytes(65536, partial=True)
        else:
            return
        if not data.startswith(_H2_PREFACE):
            return
        body = self._body(stream)
        await stream.write(
            _h2_frame(4, 0, 0, b"")  # our SETTINGS (all defaults)
            + _h2_frame(4, 1, 0, b"")  # ACK of the client's SETTINGS
            + _h2_frame(1, 4, 1, b"\x88")  # HEADERS, END_HEADERS: ":status: 200" (HPACK 8)
            + _h2_frame(0, 1, 1, body)  # DATA, END_STREAM
            + _h2_frame(7, 0, 0, (1).to_bytes(4, "big") + bytes(4))  # GOAWAY, NO_ERROR
        )

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        """Answer one connection whose handshake completed."""
        try:
            data = await stream.read_bytes(65536, partial=True)
            if _HTTP_REQUEST.match(data):
                # "\n\n": someone typing the request into s_client without -crlf.
                while not _END_OF_HEAD.search(data) and len(data) < _MAX_REQUEST_HEAD:
                    data += await stream.read_bytes(65536, partial=True)
                body = self._body(stream)
                await stream.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
                return
            if data.startswith(_H2_PREFACE[: len(data)]):
                await self._answer_h2(stream, data)
                return
            while True:
                await stream.write(data)
                data = await stream.read_bytes(65536, partial=True)
        except StreamClosedError:
            pass
        finally:
            stream.close()


# -- the SNI port ----------------------------------------------------------------------------


def parse_client_hello_sni(record: bytes) -> str | None:
    """The server name in a TLS record holding a ClientHello, or None when it has none.

    `record` is one whole TLS record (5-byte header included). Raises
    ValueError when it is not a ClientHello or is truncated.
    """
    if len(record) < 9 or record[0] != 0x16 or record[5] != 0x01:
        raise ValueError("not a TLS ClientHello")
    body = record[9 : 9 + int.from_bytes(record[6:9], "big")]
    pos = 2 + 32  # legacy_version, random
    try:
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos >= len(body):
            return None  # no extensions
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos : pos + 2], "big")
            size = int.from_bytes(body[pos + 2 : pos + 4], "big")
            pos += 4
            if kind == 0:  # server_name: list length, then (type 0, length, host name)
                if body[pos + 2] != 0:
                    return None
                length = int.from_bytes(body[pos + 3 : pos + 5], "big")
                name = body[pos + 5 : pos + 5 + length]
                if len(name) != length:
                    raise ValueError("truncated server_name extension")
                return name.decode("ascii").lower()
            pos += size
    except IndexError as e:
        raise ValueError("truncated ClientHello") from e
    return None


class _SNIRouter(TCPServer):
    """Reads the ClientHello's server name and pipes the connection to that scenario's port."""

    def __init__(self, routes: dict[str, tuple[str, int]], **keywords: Any) -> None:
        super().__init__(ssl_options=None, **keywords)
        self.routes = routes
        #: Connections closed unrouted, by reason: "not_tls" (no parsable ClientHello),
        #: "no_scenario" (no or unknown SNI name), "upstream" (scenario port unreachable).
        self.refusals: dict[str, int] = {}

    def route(self, server_name: str | None) -> tuple[str, int] | None:
        """The scenario address for ``[anything.]SCENARIO.badssl.test``."""
        if server_name is None or not server_name.endswith(".badssl.test"):
            return None
        labels = server_name[: -len(".badssl.test")].split(".")
        # Scenario names may hold dots (tls1.2-only): try the longest candidate first.
        for start in range(len(labels)):
            target = self.routes.get(".".join(labels[start:]))
            if target is not None:
                return target
        return None

    def _refuse(self, reason: str, address: Any, detail: object) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        log.debug("SNI port: refused %s (%s): %s", address, reason, detail)

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        """Route one connection by its SNI name."""
        writer: asyncio.StreamWriter | None = None
        try:
            header = await asyncio.wait_for(stream.read_bytes(5), 10.0)
            if header[0] != 0x16:
                self._refuse("not_tls", address, header)
                return
            record = header + await asyncio.wait_for(
                stream.read_bytes(int.from_bytes(header[3:5], "big")), 10.0
            )
            try:
                name = parse_client_hello_sni(record)
            except ValueError as e:
                self._refuse("not_tls", address, e)
                return
            target = self.route(name)
            if target is None:
                self._refuse("no_scenario", address, name)
                return
            try:
                reader, writer = await asyncio.open_connection(*target)
            except OSError as e:
                self._refuse("upstream", address, e)
                return
            writer.write(record)
            await asyncio.gather(_pump_up(stream, writer), _pump_down(reader, stream))
        except (StreamClosedError, OSError, asyncio.TimeoutError):
            pass
        finally:
            stream.close()
            if writer is not None:
                writer.close()


async def _pump_up(stream: IOStream, writer: asyncio.StreamWriter) -> None:
    # Client -> scenario. Ends quietly: the other direction still carries what the
    # scenario says last (a TLS alert) and closes the client when the scenario closes.
    try:
        while True:
            writer.write(await stream.read_bytes(65536, partial=True))
            await writer.drain()
    except StreamClosedError:
        with contextlib.suppress(OSError):
            writer.write_eof()
    except OSError:
        pass


async def _pump_down(reader: asyncio.StreamReader, stream: IOStream) -> None:
    try:
        while data := await reader.read(65536):
            await stream.write(data)
    except (StreamClosedError, OSError):
        pass
    stream.close()


# -- the harness -----------------------------------------------------------------------------


class BadSSLServer:
    """The scenarios of `SCENARIOS` (or those named in `only`), each on its own port.

    Construction generates the PKI and writes into `directory` (a temporary
    directory, removed by `close()`, when None): ``ca.pem`` (what clients
    trust), ``crl.pem`` (the root's CRL, for the `revoked` scenario),
    ``client.pem``/``client.key`` (a client certificate from the CA) and each
    scenario's chain and key. Scenario ``i`` of the catalogue listens on
    ``base_port + i`` (any free port when `base_port` is None or 0). With
    `sni_port`, all of them are also reachable on that one port, chosen by
    the SNI name `Scenario.sni_name()`. Scenarios the local OpenSSL cannot
    serve are left out and listed in `unavailable` with the reason.

    Start with ``await start()`` inside a loop (or `run()`), stop with
    ``await close()``.
    """

    def __init__(
        self,
        only: Iterable[str] | None = None,
        *,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        sni_port: int | None = None,
        directory: str | Path | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        names = list(SCENARIOS) if only is None else list(dict.fromkeys(only))
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            raise ValueError(
                f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
            )
        self.host = host
        self.base_port = base_port
        self.sni_port = sni_port
        self._owns_directory = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="badssl-") if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keywords: dict[str, Any] = {
            "handshake_timeout": handshake_timeout,
            "idle_timeout": 60.0,
        }

        try:
            self._generate(names)
        except BaseException:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._servers: dict[str, _ScenarioServer] = {}
        self._router: _SNIRouter | None = None
        self._started = False

    def _generate(self, names: list[str]) -> None:
        """Make the PKI, write every file, build and probe every scenario's context."""
        self.pki = BadSSLPKI(prefetch=slow_keys(names))
        try:
            self._build(names)
        finally:
            self.pki.close()

    def _build(self, names: list[str]) -> None:
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(self.pki.ca_pem())
        self.client_cert_file, self.client_key_file = self.pki.write_client(
            self.directory, "client"
        )
        ca_pem = self.pki.ca_pem().decode()

        self.unavailable: dict[str, str] = {}
        """Scenario name -> why this machine's OpenSSL (or the SNI port) cannot serve it."""
        self._contexts: dict[str, ssl.SSLContext] = {}
        for name in names:
            scenario = SCENARIOS[name]
            certfile, keyfile = credential(self.pki, scenario).write(self.directory, name)
            try:
                context = _server_context(scenario, certfile, keyfile, ca_pem)
            except (ssl.SSLError, ValueError) as e:
                self.unavailable[name] = f"OpenSSL refuses the server settings: {e}"
                continue
            problem = _probe_handshake(
                context, scenario, (self.client_cert_file, self.client_key_file)
            )
            if problem is not None:
                self.unavailable[name] = (
                    f"{ssl.OPENSSL_VERSION} cannot negotiate it here, even at security "
                    f"level 0: {problem}"
                )
                continue
            self._contexts[name] = context
        # After every recipe ran: the CRL lists the revoked leaves.
        self.crl_file = self.directory / "crl.pem"
        self.crl_file.write_bytes(self.pki.crl_pem())

    # ---------------------------------------------------------------- facts

    @property
    def scenarios(self) -> list[Scenario]:
        """The scenarios being served, in catalogue order."""
        return [SCENARIOS[n] for n in SCENARIOS if n in self._contexts]

    def port(self, name: str) -> int:
        """The port scenario `name` listens on (after `start()`)."""
        try:
            server = self._servers[name]
        except KeyError:
            if name in self.unavailable:
                raise KeyError(f"{name} is unavailable: {self.unavailable[name]}") from None
            raise KeyError(f"{name} is not served (started: {self._started})") from None
        port: int = server.sockets[0].getsockname()[1]
        return port

    def expect(self, name: str, client: str = "python") -> str:
        """The outcome `client` must see on scenario `name`."""
        return SCENARIOS[name].expect_for(client)

    def server_name(self, name: str, *, sni: bool = False) -> str:
        """The host name to verify for `name`: on its own port, or on the SNI port."""
        scenario = SCENARIOS[name]
        return scenario.sni_name() if sni else scenario.server_name

    def describe(self) -> dict[str, Any]:
        """Everything a client needs, as JSON-ready data (what `securetcp badssl --json` prints)."""
        entries = []
        for scenario in self.scenarios:
            entry: dict[str, Any] = {
                "name": scenario.name,
                "port": self.port(scenario.name) if self._started else None,
                "server_name": scenario.server_name,
                "expect": scenario.expect,
                "description": scenario.description,
                "clients": {
                    c: scenario.expect_for(c) for c in ("python", "openssl", "gnutls", "curl")
                },
                "verify_code": scenario.verify_code,
            }
            if scenario.expect_with_crl is not None:
                entry["expect_with_crl"] = scenario.expect_with_crl
            if self.sni_port is not None and scenario.name in self._router_names():
                entry["sni_name"] = scenario.sni_name()
            if scenario.note:
                entry["note"] = scenario.note
            entries.append(entry)
        return {
            "ca": str(self.ca_file),
            "crl": str(self.crl_file),
            "client_cert": str(self.client_cert_file),
            "client_key": str(self.client_key_file),
            "host": self.host,
            "sni_port": self.bound_sni_port,
            "scenarios": entries,
            "unavailable": [
                {"name": n, "description": SCENARIOS[n].description, "reason": r}
                for n, r in self.unavailable.items()
            ],
        }

    @property
    def sni_refusals(self) -> dict[str, int]:
        """Connections the SNI port closed unrouted, by reason (see `_SNIRouter.refusals`)."""
        return {} if self._router is None else dict(self._router.refusals)

    @property
    def bound_sni_port(self) -> int | None:
        """The SNI port actually listening (None without one)."""
        if self._router is None or not self._router.sockets:
            return None
        port: int = self._router.sockets[0].getsockname()[1]
        return port

    def _router_names(self) -> list[str]:
        # An IP address cannot be sent as SNI (RFC 6066), so ip-san has no SNI name.
        return [s.name for s in self.scenarios if not _is_ip(s.server_name)]

    # ------------------------------------------------------------ lifecycle

    def listen(self) -> None:
        """Bind every scenario's port (and the SNI port); accepting starts with the loop."""
        if self._started:
            return
        try:
            for index, name in enumerate(SCENARIOS):
                if name not in self._contexts:
                    continue
                server = _ScenarioServer(SCENARIOS[name], self._contexts[name], **self._keywords)
                self._servers[name] = server
                port = self.base_port + index if self.base_port else 0
                server.listen(port, self.host)
            if self.sni_port is not None:
                target = _connect_host(self.host)
                routes = {n: (target, self.port(n)) for n in self._router_names()}
                self._router = _SNIRouter(routes, **self._keywords)
                self._router.listen(self.sni_port, self.host)
        except BaseException:
            for server in self._servers.values():
                server.stop()
            if self._router is not None:
                self._router.stop()
            self._servers.clear()
            self._router = None
            raise
        self._started = True

    async def start(self) -> None:
        """Bind (if not yet done) and start accepting, inside the running loop."""
        self.listen()
        for server in self._all_servers():
            server.add_sockets([])  # attaches to the running loop; accepting starts now

    def _all_servers(self) -> list[TCPServer]:
        servers: list[TCPServer] = list(self._servers.values())
        if self._router is not None:
            servers.append(self._router)
        return servers

    async def close(self, timeout: float | None = 1.0) -> None:
        """Stop every server, close every connection and remove a temporary directory."""
        servers = self._all_servers()
        await asyncio.gather(*(s.close(timeout) for s in servers))
        self._servers.clear()
        self._router = None
        self._started = False
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def serve_forever(self) -> None:
        """Serve until `close()` is called."""
        await self.start()
        await asyncio.gather(*(s.serve_forever() for s in self._all_servers()))

    def run(self, ready: Callable[[], object] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then close gracefully.

        `ready` is called once every port accepts and the signals are handled
        (the place to tell the user where to connect).
        """

        async def main() -> None:
            await self.start()
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, stop.set)
            try:
                if ready is not None:
                    ready()
                await stop.wait()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                        loop.remove_signal_handler(sig)
                await self.close(timeout=5.0)

        asyncio.run(main())


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _connect_host(host: str) -> str:
    """Where the SNI port reaches the scenario ports: the bound host, loopback for wildcards."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
