"""The one module that touches bittensor's Axon and Dendrite, so a move to bittensor 11's btauth/1 changes only it.

Miner side, `MinerServer` serves `ImageSynapse` (and `VideoSynapse` when given a video forward) on a `bt.Axon`,
on a listening socket of ours (see `bind_listener`:
uvicorn's own bind of `::` would serve IPv6 only, and validators call miners at the IPv4 published on chain).
Every request passes, in order:
1. our guard, before anything reads the body: a missing Content-Length answers 411, one above the limit 413, and a
   caller hotkey that `blacklist` refuses 403 (quietly: bittensor's own blacklist path logs every refusal as an ERROR);
2. bittensor's default signature and nonce check (401) and its body-hash check;
3. `forward`; one that raises or returns garbage answers 500 with one log line, and the server keeps serving.
The Axon's uvicorn runs on uvloop with the httptools parser when they are installed (bittensor picks asyncio and the
pure-Python h11), on a thread of ours: bittensor's runner thread polls a flag every millisecond, which costs every
request some GIL. No `priority_fn` is attached: bittensor 10.5 only sends each request's priority through a thread
pool and back without ordering anything; the miner orders its own queue by caller stake instead.

Validator side, `ValidatorClient` queries many miners in parallel over one `bt.Dendrite` and returns one `Response`
per miner; a hostile or dead miner yields a status, never an exception. IPv6 miners are dialled in brackets (the
Dendrite alone builds no valid URL for them).

No `from __future__ import annotations` here: bittensor's `attach` compares real annotation objects.
"""

import asyncio
import dataclasses
import functools
import importlib.util
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import bittensor as bt
import bittensor.utils.networking as networking
from bittensor.core.dendrite import DendriteMixin
from bittensor.core.synapse import TerminalInfo
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bitmind.protocol import ImageSynapse, VideoSynapse

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_ANSWER_BYTES",
    "Blacklist",
    "Forward",
    "Listener",
    "MinerServer",
    "Response",
    "ServeError",
    "ValidatorClient",
    "VideoForward",
    "bind_listener",
    "lookup_external_ip",
]

logger = logging.getLogger(__name__)

# A 10 MiB image (the decoder's default limit) grows to ~13.4 MiB in base64; the rest is JSON and headers.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# The largest answer a validator reads from one miner: an echo of the largest request a miner accepts (reference-style
# miners send the whole synapse back) plus the answer fields. Past it the answer is refused unread (status 400),
# so a hostile miner cannot make a validator hold gigabytes for the length of a timeout.
MAX_ANSWER_BYTES = DEFAULT_MAX_REQUEST_BYTES + 1024 * 1024
# The header bittensor's Dendrite puts the caller hotkey in (`Synapse.to_headers`).
_HOTKEY_HEADER = "bt_header_dendrite_hotkey"

Forward = Callable[[ImageSynapse], Awaitable[ImageSynapse]]
VideoForward = Callable[[VideoSynapse], Awaitable[VideoSynapse]]
# The request field each challenge synapse carries its payload in; the miner blanks it in the answer.
PAYLOAD_FIELDS: dict[type[bt.Synapse], str] = {ImageSynapse: "image", VideoSynapse: "video"}
Blacklist = Callable[[str | None], tuple[bool, str]]


class ServeError(RuntimeError):
    """The axon cannot serve: an address that is not an IP, a port out of range or taken, or no answer at start."""


def lookup_external_ip() -> str | None:
    """This machine's public IP from bittensor's internet lookup, or None when that fails (offline)."""
    try:
        return networking.get_external_ip().strip()  # the curl fallbacks keep the newline
    except Exception as exc:  # bittensor raises ExternalIPNotFound, requests may raise anything
        logger.warning("public IP lookup failed (%s)", type(exc).__name__)
        return None


@dataclass(frozen=True)
class Listener:
    """A bound TCP socket for uvicorn, the loopback hosts a local self-check must reach it on (one per family served),
    and the bound address for logs, e.g. `[::]:8091 (IPv4+IPv6)`."""

    sock: socket.socket
    check_hosts: tuple[str, ...]
    address: str


def _ipv6_usable() -> bool:
    """Whether this host serves IPv6 locally. Where IPv6 is disabled (sysctl `disable_ipv6`, common in containers)
    `::` still binds but `::1` does not exist; a kernel built without IPv6 refuses the socket itself."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def bind_listener(ip: str, port: int) -> Listener:
    """Bind `ip:port` the way validators need it.

    The wildcard `::` (bittensor's default `--axon.ip [::]`, brackets optional) or an empty string gives one
    dual-stack socket (IPV6_V6ONLY cleared) that answers IPv4 and IPv6, or IPv4 `0.0.0.0` where IPv6 is unusable.
    uvicorn binding `::` itself would serve IPv6 only: asyncio sets IPV6_V6ONLY whatever the sysctl says.
    An IPv4 address binds IPv4 only, another IPv6 address IPv6 only. Raises ServeError when the address is not an IP
    or the port is taken.
    """
    host = ip.strip().strip("[]")
    if host in ("", "::"):
        dual_stack = _ipv6_usable()
        family, host = (socket.AF_INET6, "::") if dual_stack else (socket.AF_INET, "0.0.0.0")
        check_hosts: tuple[str, ...] = ("127.0.0.1", "::1") if dual_stack else ("127.0.0.1",)
    else:
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            raise ServeError(f"--axon.ip must be an IP address such as [::] or 0.0.0.0, got {ip!r}") from None
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        check_hosts = ({"0.0.0.0": "127.0.0.1"}.get(host, host),)
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse TIME_WAIT ports
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(host != "::"))
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot serve on {shown}: {exc.strerror or exc}") from exc
    families = "+".join(f"IPv{ipaddress.ip_address(check).version}" for check in check_hosts)
    return Listener(sock, check_hosts, f"{shown} ({families})")


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


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
    `video_forward`, when given, serves `VideoSynapse` on the same axon, behind the same guard and blacklist.
    `ip` is bound as `bind_listener` says (`::` serves IPv4 and IPv6). `external_ip` and `external_port` (default:
    `port`) are what `info()` advertises, i.e. what goes on chain; behind a NAT they differ from what is bound.
    One instance serves once: `start()`, then `stop()`.
    """

    def __init__(
        self,
        wallet: bt.Wallet,
        port: int,
        forward: Forward,
        blacklist: Blacklist | None = None,
        *,
        external_ip: str,
        video_forward: VideoForward | None = None,
        ip: str = "127.0.0.1",
        external_port: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        start_timeout: float = 10.0,
    ):
        if max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        for name, value in (("--axon.port", port), ("--axon.external_port", external_port)):
            if value is not None and not 1024 < value < 65535:  # what bt.Axon asserts, as a clear error
                raise ServeError(f"{name} must be in 1025..65534, got {value}")
        self.ip = ip
        self.port = port
        self.max_request_bytes = max_request_bytes
        self._forwards: dict[type[bt.Synapse], Callable] = {ImageSynapse: forward}
        if video_forward is not None:
            self._forwards[VideoSynapse] = video_forward
        self._blacklist = blacklist
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        # bt.Axon only records `ip`; we bind it ourselves in start().
        self.axon = bt.Axon(wallet=wallet, port=port, ip=ip, external_ip=external_ip, external_port=external_port)
        for setting, value in uvicorn_stack().items():
            setattr(self.axon.fast_config, setting, value)
        # Added last, so it runs first: nothing below it has read the body yet.
        self.axon.app.add_middleware(_RequestGuard, refuse=self._refusal)

        # attach() demands this signature: first parameter `synapse: ImageSynapse`. FastAPI fills in `request`.
        async def forward_fn(synapse: ImageSynapse, request: Request) -> ImageSynapse:
            return await self._answer(synapse, request)

        self.axon.attach(forward_fn=forward_fn)
        if video_forward is not None:

            async def video_forward_fn(synapse: VideoSynapse, request: Request) -> VideoSynapse:
                return await self._answer(synapse, request)

            self.axon.attach(forward_fn=video_forward_fn)

    @property
    def hotkey(self) -> str:
        return self.axon.wallet.hotkey.ss58_address

    def info(self) -> bt.AxonInfo:
        """The endpoint a caller needs (advertised ip, port, hotkey, coldkey)."""
        return self.axon.info()

    def start(self) -> "MinerServer":
        """Start serving; ServeError when the address cannot be bound or the server does not answer in time on
        every family it serves (the families validators reach it over)."""
        self._listener = listener = bind_listener(self.ip, self.port)
        server = self.axon.fast_server
        self._thread = threading.Thread(
            target=functools.partial(server.run, sockets=[listener.sock]), name=f"axon-{self.port}", daemon=True
        )
        self._thread.start()
        self.axon.started = True
        deadline = time.monotonic() + self._start_timeout
        while not (server.started and all(_port_answers(host, self.port) for host in listener.check_hosts)):
            if not self._thread.is_alive() or time.monotonic() > deadline:  # uvicorn exits its thread on failure
                self.stop(timeout=1.0)  # closes the socket
                raise ServeError(
                    f"axon did not answer on {listener.address} within {self._start_timeout:.0f} s "
                    f"(checked {', '.join(listener.check_hosts)})"
                )
            time.sleep(0.01)
        logger.info(
            "serving %s on %s hotkey=%s max_request=%d B http=%s loop=%s",
            " and ".join(kind.__name__ for kind in self._forwards),
            listener.address,
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
        if self._thread is not None:
            self._thread.join(timeout)
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._thread is None or not self._thread.is_alive():
            listener.sock.close()  # uvicorn closes it on shutdown, but not when its start-up failed
        deadline = time.monotonic() + timeout
        while any(_port_answers(host, self.port) for host in listener.check_hosts) and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.info("stopped serving on %s", listener.address)

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

    async def _answer(self, synapse: bt.Synapse, request: Request) -> bt.Synapse:
        """Run the synapse's forward; a failure becomes a 500 answer and one log line instead of a stack trace."""
        # The body's copy of the caller is not covered by the signature; the header's hotkey was verified.
        synapse.dendrite = synapse.dendrite or TerminalInfo()
        synapse.dendrite.hotkey = request.headers.get(_HOTKEY_HEADER)
        kind = type(synapse)
        try:
            answer = await self._forwards[kind](synapse)
            if not isinstance(answer, kind):
                raise TypeError(f"forward returned {type(answer).__name__}, not {kind.__name__}")
        except Exception as exc:
            logger.error("forward failed for %s: %s: %s", synapse.dendrite.hotkey, type(exc).__name__, exc)
            answer = synapse
            answer.axon = answer.axon or TerminalInfo()
            answer.axon.status_code = 500
            answer.axon.status_message = f"Internal Server Error ({type(exc).__name__})"
        setattr(answer, PAYLOAD_FIELDS[kind], "")  # the caller has the payload; echoing it back only costs bandwidth
        return answer


@dataclass(frozen=True)
class Response:
    """One miner's answer to one query.

    `status` is the Dendrite's code (200 ok, 401 bad signature/nonce, 403 blacklisted, 404 unknown synapse,
    400 answer over MAX_ANSWER_BYTES, 408 timeout, 411/413 refused size, 422 unparseable answer, 500 miner error,
    503 unreachable).
    `prediction` is the miner's value as it came (validate it before use), None unless status is 200.
    `latency` is seconds from send to answer, or the timeout when no answer came.
    `mask` is the miner's optional mask payload as it came (decode it with `bitmind.mask_codec`), "" when none.
    """

    status: int
    prediction: object
    latency: float
    message: str
    mask: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def _to_response(result: bt.Synapse | BaseException, timeout: float) -> Response:
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
    mask = getattr(result, "mask", "") if status == 200 else ""
    return Response(status, prediction, latency, str(dendrite.status_message or ""), mask)


class _Dendrite(bt.Dendrite):
    """A `bt.Dendrite` announcing a given external IP. bittensor 10.5's `__init__` has no parameter for it and always
    looks the IP up over the internet (requests without a timeout: it can hang behind a firewall that drops
    packets), so this sets the same attributes itself; a test compares them with a real `bt.Dendrite`'s."""

    def __init__(self, wallet: bt.Wallet, external_ip: str) -> None:
        super(DendriteMixin, self).__init__()  # torch.nn.Module or object, as DendriteMixin.__init__ does
        self.uuid = str(uuid.uuid1())
        self.external_ip = external_ip
        self.keypair = wallet.hotkey
        self.synapse_history: list = []
        self._session: aiohttp.ClientSession | None = None


class _BoundedResponse(aiohttp.ClientResponse):
    """A miner's HTTP answer whose JSON is read only up to MAX_ANSWER_BYTES. bittensor's `Dendrite.call` reads the
    answer with `json()` and nothing else; an oversized one raises `ClientPayloadError`, which the Dendrite turns
    into status 400 for that miner alone."""

    async def json(self, *args: Any, **kwargs: Any) -> Any:
        declared = self.content_length
        if declared is not None and declared > MAX_ANSWER_BYTES:
            raise aiohttp.ClientPayloadError(f"answer of {declared} bytes is over the {MAX_ANSWER_BYTES}-byte limit")
        body = bytearray()
        async for chunk in self.content.iter_any():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise aiohttp.ClientPayloadError(f"answer is over the {MAX_ANSWER_BYTES}-byte limit")
        return json.loads(body) if body.strip() else None


def _dialable(axon: bt.AxonInfo) -> bt.AxonInfo:
    """`axon` with an IPv6 address in brackets: the Dendrite builds `http://{ip}:{port}/`, which is no URL for a bare
    IPv6 address, so IPv6 miners would be unreachable."""
    try:
        is_v6 = ipaddress.ip_address(axon.ip).version == 6
    except ValueError:  # already bracketed, or garbage the Dendrite reports as a failed call
        return axon
    return dataclasses.replace(axon, ip=f"[{axon.ip}]") if is_v6 else axon


class ValidatorClient:
    """Queries miners over one `bt.Dendrite` signed by `wallet`'s hotkey.

    Use it either from async code (`await query(...)`, then `await aclose()`) or from sync code (`query_sync(...)`,
    then `close()`), not both: the HTTP session belongs to the event loop it was opened on.
    `external_ip` is the IP the requests announce (informational for miners); None looks it up, 127.0.0.1 offline.
    """

    def __init__(self, wallet: bt.Wallet, *, external_ip: str | None = None):
        self._dendrite = _Dendrite(wallet, external_ip or lookup_external_ip() or "127.0.0.1")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0

    @property
    def hotkey(self) -> str:
        return self._dendrite.keypair.ss58_address

    async def query(
        self,
        axons: list[bt.AxonInfo],
        images: list[str] | str,
        timeout: float,
        synapse_type: type[bt.Synapse] = ImageSynapse,
    ) -> list[Response]:
        """Send `images[i]` (or one payload to all) to `axons[i]` in parallel; one Response per axon, in order.
        `synapse_type` VideoSynapse sends clip payloads (`bitmind.video_codec.encode_clip`) instead of images."""
        field = PAYLOAD_FIELDS[synapse_type]
        if isinstance(images, str):
            images = [images] * len(axons)
        if len(images) != len(axons):
            raise ValueError(f"{len(images)} images for {len(axons)} axons")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        # A fresh synapse per call: the Dendrite signs it with a new, increasing nonce.
        calls = (
            self._dendrite.call(_dialable(axon), synapse_type(**{field: image}), timeout=timeout, deserialize=False)
            for axon, image in zip(axons, images)
        )
        # A fresh HTTP session per burst of queries: miners drop idle keep-alive connections, and a reused stale one
        # fails with ServerDisconnected; aiohttp's default pool of 100 connections would also cap a 256-miner
        # fan-out. Concurrent `query` calls share the session; the last one to finish closes it.
        if self._in_flight == 0:
            await self._dendrite.aclose_session()
            self._dendrite._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), response_class=_BoundedResponse
            )
        self._in_flight += 1
        try:
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                await self._dendrite.aclose_session()
                self._dendrite.synapse_history.clear()  # the Dendrite keeps every call otherwise: unbounded memory
        return [_to_response(result, timeout) for result in results]

    def query_sync(
        self,
        axons: list[bt.AxonInfo],
        images: list[str] | str,
        timeout: float,
        synapse_type: type[bt.Synapse] = ImageSynapse,
    ) -> list[Response]:
        """`query` for synchronous callers, run on this client's private event loop."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self.query(axons, images, timeout, synapse_type))

    async def aclose(self) -> None:
        await self._dendrite.aclose_session()

    def close(self) -> None:
        """Close the HTTP session opened by `query_sync` and the private event loop."""
        if self._loop is not None:
            self._loop.run_until_complete(self.aclose())
            self._loop.close()
            self._loop = None
