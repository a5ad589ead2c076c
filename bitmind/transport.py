"""The one module that touches bittensor's Axon and Dendrite, so a move to bittensor 11's btauth/1 changes only it.

Miner side, `MinerServer` serves `ImageSynapse` on a `bt.Axon`. Every request passes, in order:
1. our guard, before anything reads the body: a missing Content-Length answers 411, one above the limit 413, and a
   caller hotkey that `blacklist` refuses 403 (quietly: bittensor's own blacklist path logs every refusal as an ERROR);
2. bittensor's default signature and nonce check (401) and its body-hash check;
3. `forward`; one that raises or returns garbage answers 500 with one log line, and the server keeps serving.
The Axon's uvicorn runs on uvloop with the httptools parser when they are installed (bittensor picks asyncio and the
pure-Python h11), on a thread of ours: bittensor's runner thread polls a flag every millisecond, which costs every
request some GIL. No `priority_fn` is attached: bittensor 10.5 only sends each request's priority through a thread
pool and back without ordering anything; the miner orders its own queue by caller stake instead.

Validator side, `ValidatorClient` queries many miners in parallel over one `bt.Dendrite` and returns one `Response`
per miner; a hostile or dead miner yields a status, never an exception.

No `from __future__ import annotations` here: bittensor's `attach` compares real annotation objects.
"""

import asyncio
import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from unittest import mock

import aiohttp
import bittensor as bt
import bittensor.utils.networking as networking
from bittensor.core.synapse import TerminalInfo
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bitmind.protocol import ImageSynapse

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MinerServer",
    "Response",
    "ValidatorClient",
    "lookup_external_ip",
]

logger = logging.getLogger(__name__)

# A 10 MiB image (the decoder's default limit) grows to ~13.4 MiB in base64; the rest is JSON and headers.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# The header bittensor's Dendrite puts the caller hotkey in (`Synapse.to_headers`).
_HOTKEY_HEADER = "bt_header_dendrite_hotkey"

Forward = Callable[[ImageSynapse], Awaitable[ImageSynapse]]
Blacklist = Callable[[str | None], tuple[bool, str]]


def lookup_external_ip(fallback: str = "127.0.0.1") -> str:
    """This machine's public IP from bittensor's internet lookup, or `fallback` when that fails (offline)."""
    try:
        return networking.get_external_ip()
    except Exception as exc:  # bittensor raises ExternalIPNotFound, requests may raise anything
        logger.warning("public IP lookup failed (%s); using %s", type(exc).__name__, fallback)
        return fallback


def _connect_host(bind_ip: str) -> str:
    """Where to connect to reach a server bound to `bind_ip` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind_ip, bind_ip)


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ensure_port_free(ip: str, port: int) -> None:
    """Bind the port as uvicorn would (SO_REUSEADDR) and let go; raise if another process holds it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            raise RuntimeError(f"cannot serve on {ip}:{port}: {exc.strerror or exc}") from exc


def _reject(status: int, message: str) -> JSONResponse:
    # The Dendrite reads `message` from a non-200 JSON body.
    return JSONResponse(status_code=status, content={"message": message})


def uvicorn_stack() -> dict[str, str]:
    """uvicorn's `http` and `loop` settings: the compiled ones when installed, else the pure-Python defaults."""
    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }


class _RequestGuard:
    """Plain ASGI middleware (starlette's BaseHTTPMiddleware copies every request through extra tasks and streams):
    answers `refuse(headers)`'s response, when it gives one, before anything reads the body."""

    def __init__(self, app: ASGIApp, refuse: Callable[[Headers], JSONResponse | None]) -> None:
        self.app = app
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refuse(Headers(scope=scope)) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)


class MinerServer:
    """Serves `ImageSynapse` on a `bt.Axon` bound to `ip:port` (see the module docstring for the request path).

    `forward` is `async (ImageSynapse) -> ImageSynapse`; run CPU/GPU work off the event loop inside it. It sees the
    verified caller hotkey in `synapse.dendrite.hotkey`.
    `blacklist(hotkey) -> (refuse, reason)` decides by the caller hotkey alone (None when the caller sent none).
    `external_ip` is what `info()` advertises (looked up when None).
    One instance serves once: `start()`, then `stop()`.
    """

    def __init__(
        self,
        wallet: bt.Wallet,
        port: int,
        forward: Forward,
        blacklist: Blacklist | None = None,
        *,
        ip: str = "127.0.0.1",
        external_ip: str | None = None,
        external_port: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        start_timeout: float = 10.0,
    ):
        if max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self.ip = ip.strip("[]")  # bittensor's --axon.ip default is "[::]"
        self.port = port
        self.max_request_bytes = max_request_bytes
        self._forward = forward
        self._blacklist = blacklist
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self.axon = bt.Axon(
            wallet=wallet,
            port=port,
            ip=self.ip,
            external_ip=external_ip or lookup_external_ip(),
            external_port=external_port,
        )
        # bt.Axon tells uvicorn to bind 0.0.0.0 whatever its ip says; honour ours.
        self.axon.fast_config.host = self.ip
        for setting, value in uvicorn_stack().items():
            setattr(self.axon.fast_config, setting, value)
        # Added last, so it runs first: nothing below it has read the body yet.
        self.axon.app.add_middleware(_RequestGuard, refuse=self._refusal)

        # attach() demands this signature: first parameter `synapse: ImageSynapse`. FastAPI fills in `request`.
        async def forward_fn(synapse: ImageSynapse, request: Request) -> ImageSynapse:
            # The body's copy of the caller is not covered by the signature; the header's hotkey was verified.
            synapse.dendrite = synapse.dendrite or TerminalInfo()
            synapse.dendrite.hotkey = request.headers.get(_HOTKEY_HEADER)
            return await self._answer(synapse)

        self.axon.attach(forward_fn=forward_fn)

    @property
    def hotkey(self) -> str:
        return self.axon.wallet.hotkey.ss58_address

    def info(self) -> bt.AxonInfo:
        """The endpoint a caller needs (advertised ip, port, hotkey, coldkey)."""
        return self.axon.info()

    def start(self) -> "MinerServer":
        """Start serving; raise RuntimeError when the port is taken or the server does not answer in time."""
        _ensure_port_free(self.ip, self.port)
        server = self.axon.fast_server
        self._thread = threading.Thread(target=server.run, name=f"axon-{self.port}", daemon=True)
        self._thread.start()
        self.axon.started = True
        deadline = time.monotonic() + self._start_timeout
        while not (server.started and _port_answers(_connect_host(self.ip), self.port)):
            if not self._thread.is_alive() or time.monotonic() > deadline:  # uvicorn exits its thread on a bind error
                self.stop(timeout=1.0)
                raise RuntimeError(f"axon did not answer on {self.ip}:{self.port} within {self._start_timeout:.0f} s")
            time.sleep(0.01)
        logger.info(
            "serving ImageSynapse on %s:%d hotkey=%s max_request=%d B http=%s loop=%s",
            self.ip,
            self.port,
            self.hotkey,
            self.max_request_bytes,
            self.axon.fast_config.http,
            self.axon.fast_config.loop,
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait (at most `timeout` s) until the server thread ends and the port no longer answers."""
        self.axon.fast_server.should_exit = True
        self.axon.started = False
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        while _port_answers(_connect_host(self.ip), self.port) and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.info("stopped serving on %s:%d", self.ip, self.port)

    def __enter__(self) -> "MinerServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _refusal(self, headers: Headers) -> JSONResponse | None:
        """Size limit and blacklist, decided from headers before the body is read; None lets the request on."""
        length = headers.get("content-length", "")
        if not (length.isascii() and length.isdigit()):
            return _reject(411, "Content-Length required")
        hotkey = headers.get(_HOTKEY_HEADER)
        if int(length) > self.max_request_bytes:
            logger.warning("refused %s B request from %s: limit %d B", length, hotkey, self.max_request_bytes)
            return _reject(413, f"request body of {length} B exceeds the limit of {self.max_request_bytes} B")
        if self._blacklist is None:
            return None
        try:
            refused, reason = self._blacklist(hotkey)
        except Exception as exc:
            logger.error("blacklist failed for %s: %s: %s", hotkey, type(exc).__name__, exc)
            return _reject(500, "Internal Server Error")
        if refused:
            logger.debug("blacklisted %s: %s", hotkey, reason)
            return _reject(403, f"Forbidden: {reason}")
        return None

    async def _answer(self, synapse: ImageSynapse) -> ImageSynapse:
        """Run `forward`; a failure becomes a 500 answer and one log line instead of a stack trace."""
        try:
            answer = await self._forward(synapse)
            if not isinstance(answer, ImageSynapse):
                raise TypeError(f"forward returned {type(answer).__name__}, not ImageSynapse")
        except Exception as exc:
            logger.error("forward failed for %s: %s: %s", synapse.dendrite.hotkey, type(exc).__name__, exc)
            answer = synapse
            answer.axon = answer.axon or TerminalInfo()
            answer.axon.status_code = 500
            answer.axon.status_message = f"Internal Server Error ({type(exc).__name__})"
        answer.image = ""  # the caller has the image; echoing it back only costs bandwidth
        return answer


@dataclass(frozen=True)
class Response:
    """One miner's answer to one query.

    `status` is the Dendrite's code (200 ok, 401 bad signature/nonce, 403 blacklisted, 404 unknown synapse,
    408 timeout, 411/413 refused size, 422 unparseable answer, 500 miner error, 503 unreachable).
    `prediction` is the miner's value as it came (validate it before use), None unless status is 200.
    `latency` is seconds from send to answer, or the timeout when no answer came.
    """

    status: int
    prediction: object
    latency: float
    message: str

    @property
    def ok(self) -> bool:
        return self.status == 200


def _to_response(result: ImageSynapse | BaseException, timeout: float) -> Response:
    if isinstance(result, BaseException):
        # Dendrite.call lets some failures escape, e.g. a 200 answer whose JSON nulls the `dendrite` field.
        return Response(422, None, timeout, f"unusable answer: {type(result).__name__}: {result}")
    dendrite = result.dendrite
    try:
        latency = float(dendrite.process_time)
    except (TypeError, ValueError):  # set only when an HTTP answer came back
        latency = timeout
    if dendrite.status_code is None:  # a 200 whose answer does not carry the Axon's status fields
        return Response(422, None, latency, "answer carried no status code")
    status = int(dendrite.status_code)  # the Dendrite stores its own failures as strings ("503")
    prediction = result.prediction if status == 200 else None
    return Response(status, prediction, latency, str(dendrite.status_message or ""))


class ValidatorClient:
    """Queries miners over one `bt.Dendrite` signed by `wallet`'s hotkey.

    Use it either from async code (`await query(...)`, then `await aclose()`) or from sync code (`query_sync(...)`,
    then `close()`), not both: the HTTP session belongs to the event loop it was opened on.
    `external_ip` skips bittensor's internet lookup (which falls back to 127.0.0.1 offline).
    """

    def __init__(self, wallet: bt.Wallet, *, external_ip: str | None = None):
        ip = external_ip or lookup_external_ip()
        with mock.patch.object(networking, "get_external_ip", return_value=ip):
            self._dendrite = bt.Dendrite(wallet=wallet)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0

    @property
    def hotkey(self) -> str:
        return self._dendrite.keypair.ss58_address

    async def query(self, axons: list[bt.AxonInfo], images: list[str] | str, timeout: float) -> list[Response]:
        """Send `images[i]` (or one image to all) to `axons[i]` in parallel; one Response per axon, in order."""
        if isinstance(images, str):
            images = [images] * len(axons)
        if len(images) != len(axons):
            raise ValueError(f"{len(images)} images for {len(axons)} axons")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        # A fresh synapse per call: the Dendrite signs it with a new, increasing nonce.
        calls = (
            self._dendrite.call(axon, ImageSynapse(image=image), timeout=timeout, deserialize=False)
            for axon, image in zip(axons, images)
        )
        # A fresh HTTP session per burst of queries: miners drop idle keep-alive connections, and a reused stale one
        # fails with ServerDisconnected; aiohttp's default pool of 100 connections would also cap a 256-miner
        # fan-out. Concurrent `query` calls share the session; the last one to finish closes it.
        if self._in_flight == 0:
            await self._dendrite.aclose_session()
            self._dendrite._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._in_flight += 1
        try:
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                await self._dendrite.aclose_session()
                self._dendrite.synapse_history.clear()  # the Dendrite keeps every call otherwise: unbounded memory
        return [_to_response(result, timeout) for result in results]

    def query_sync(self, axons: list[bt.AxonInfo], images: list[str] | str, timeout: float) -> list[Response]:
        """`query` for synchronous callers, run on this client's private event loop."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self.query(axons, images, timeout))

    async def aclose(self) -> None:
        await self._dendrite.aclose_session()

    def close(self) -> None:
        """Close the HTTP session opened by `query_sync` and the private event loop."""
        if self._loop is not None:
            self._loop.run_until_complete(self.aclose())
            self._loop.close()
            self._loop = None
