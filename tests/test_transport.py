"""bitmind.transport against real axons and dendrites on 127.0.0.1, with hostile callers and hostile miners."""

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time

import aiohttp
import bittensor as bt
import pytest
from aiohttp import web

from bitmind import transport
from bitmind.protocol import ImageSynapse
from bitmind.transport import MinerServer, Response, ServeError, ValidatorClient
from tests import _reference_protocol as reference_protocol
from tests._wallets import LOOPBACK, free_port, offline_ip, wallet_factory  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

IMAGE = "aW1hZ2U="  # the transport never decodes images
PREDICTION = 0.75
SLOW_SECONDS = 1.0


class RecordingForward:
    """A miner forward that records the images it saw; "boom" raises, "slow" sleeps; `delay` staggers answers
    (0, 1 or 2 times `delay`, in turn)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.images: list[str] = []
        self.callers: list[str | None] = []

    async def __call__(self, synapse: ImageSynapse) -> ImageSynapse:
        await asyncio.sleep(self.delay * (len(self.images) % 3))
        self.images.append(synapse.image)
        self.callers.append(synapse.dendrite.hotkey)
        if synapse.image == "boom":
            raise ValueError("detector exploded")
        if synapse.image == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        synapse.prediction = PREDICTION
        return synapse


class Records(logging.Handler):
    """Collects log records of one logger at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors():
    """ERROR records of bittensor's logger and of ours, as two lists."""
    handlers = {name: Records() for name in ("bittensor", "bitmind.transport")}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    yield {name: handler.records for name, handler in handlers.items()}
    for name, handler in handlers.items():
        logging.getLogger(name).removeHandler(handler)


@pytest.fixture
def wallets(wallet_factory, offline_ip):  # noqa: F811 (pytest fixtures)
    return {name: wallet_factory(name) for name in ("miner", "validator", "stranger")}


@pytest.fixture
def serve(wallets):
    """`serve(forward, **kwargs)` starts a MinerServer on a free port that only admits the validator hotkey."""
    servers: list[MinerServer] = []
    allowed = wallets["validator"].hotkey.ss58_address

    def start(forward, **kwargs) -> MinerServer:
        kwargs.setdefault("blacklist", lambda hotkey: (hotkey != allowed, "not registered"))
        server = MinerServer(wallets["miner"], free_port(), forward, external_ip=LOOPBACK, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def client(wallets):
    validator = ValidatorClient(wallets["validator"], external_ip=LOOPBACK)
    yield validator
    validator.close()


def signed(wallet: bt.Wallet, axon: bt.AxonInfo, image: str) -> ImageSynapse:
    """A synapse signed the way the Dendrite signs it, for crafting requests by hand."""
    dendrite = bt.Dendrite(wallet=wallet)
    return dendrite.preprocess_synapse_for_request(axon, ImageSynapse(image=image), timeout=5.0)


def post(port: int, headers: dict, body) -> int:
    """POST to the miner outside the Dendrite; `body` is a dict (JSON) or bytes chunks (chunked upload)."""

    async def send() -> int:
        async with aiohttp.ClientSession() as session:
            kwargs = {"json": body} if isinstance(body, dict) else {"data": _chunks(body)}
            async with session.post(f"http://{LOOPBACK}:{port}/ImageSynapse", headers=headers, **kwargs) as answer:
                return answer.status

    return asyncio.run(send())


async def _chunks(parts: list[bytes]):
    for part in parts:
        yield part


def test_registered_caller_gets_prediction(serve, client):
    forward = RecordingForward()
    server = serve(forward)
    [answer] = client.query_sync([server.info()], IMAGE, timeout=5.0)
    assert answer.status == 200 and answer.ok
    assert answer.prediction == PREDICTION
    assert 0 < answer.latency < 5.0
    assert forward.images == [IMAGE]
    assert forward.callers == [client.hotkey]


def test_forward_sees_the_verified_caller_not_the_body_claim(serve, wallets):
    forward = RecordingForward()
    server = serve(forward)
    request = signed(wallets["validator"], server.info(), IMAGE)
    body = request.model_dump()
    body["dendrite"]["hotkey"] = wallets["stranger"].hotkey.ss58_address  # not covered by the signature
    assert post(server.port, request.to_headers(), body) == 200
    assert forward.callers == [wallets["validator"].hotkey.ss58_address]


def test_unregistered_caller_refused_quietly(serve, wallets, errors):
    forward = RecordingForward()
    server = serve(forward)
    stranger = ValidatorClient(wallets["stranger"], external_ip=LOOPBACK)
    try:
        [answer] = stranger.query_sync([server.info()], IMAGE, timeout=5.0)
    finally:
        stranger.close()
    assert (answer.status, answer.prediction) == (403, None)
    assert "not registered" in answer.message
    assert forward.images == []
    assert errors == {"bittensor": [], "bitmind.transport": []}


def test_failing_blacklist_answers_500_and_server_keeps_serving(serve, client, wallets, errors):
    def blacklist(hotkey):
        if hotkey == wallets["stranger"].hotkey.ss58_address:
            raise KeyError(hotkey)
        return False, ""

    server = serve(RecordingForward(), blacklist=blacklist)
    stranger = ValidatorClient(wallets["stranger"], external_ip=LOOPBACK)
    try:
        assert stranger.query_sync([server.info()], IMAGE, timeout=5.0)[0].status == 500
    finally:
        stranger.close()
    assert client.query_sync([server.info()], IMAGE, timeout=5.0)[0].status == 200
    assert len(errors["bitmind.transport"]) == 1


def test_signature_of_another_hotkey_refused(serve, wallets):
    forward = RecordingForward()
    server = serve(forward)
    # Signed by the stranger, claiming the registered validator's hotkey.
    forged = signed(wallets["stranger"], server.info(), IMAGE)
    forged.dendrite.hotkey = wallets["validator"].hotkey.ss58_address
    assert post(server.port, forged.to_headers(), forged.model_dump()) == 401
    assert forward.images == []


def test_replayed_request_refused(serve, wallets):
    forward = RecordingForward()
    server = serve(forward)
    request = signed(wallets["validator"], server.info(), IMAGE)
    headers, body = request.to_headers(), request.model_dump()
    assert post(server.port, headers, body) == 200
    assert post(server.port, headers, body) == 401
    assert forward.images == [IMAGE]


@pytest.mark.parametrize("reference", [reference_protocol.ImageSynapse, reference_protocol.ImageSynapseV1])
def test_the_subnets_validators_are_answered(serve, wallets, reference):
    """A validator running the subnet's own code (1.x or 2.x class) gets the miner's prediction, not a 500."""
    forward = RecordingForward()
    server = serve(forward)

    async def ask() -> bt.Synapse:
        dendrite = transport._Dendrite(wallets["validator"], LOOPBACK)
        try:
            return await dendrite.call(server.info(), reference(image=IMAGE), timeout=5.0, deserialize=False)
        finally:
            await dendrite.aclose_session()

    answer = asyncio.run(ask())
    assert (answer.dendrite.status_code, answer.prediction) == (200, PREDICTION)
    assert forward.images == [IMAGE]


def test_a_three_class_answer_is_read_as_the_generated_share(wallets):
    """A miner running the subnet's 2.x code answers [real, synthetic, semi-synthetic]."""

    async def answer(request: web.Request) -> web.Response:
        three = {"prediction": [0.25, 0.5, 0.25] if (await request.json())["image"] == "a" else [-1.0, -1.0, -1.0]}
        return web.json_response({**three, "axon": {"status_code": 200}})

    scored, silent = _ask_stub_miner(wallets, answer, ["a", "b"])
    assert (scored.status, scored.prediction) == (200, 0.75)
    assert (silent.status, silent.prediction) == (200, -1.0)


def test_forward_error_answers_500_and_server_keeps_serving(serve, client, errors):
    forward = RecordingForward()
    server = serve(forward)
    [failed] = client.query_sync([server.info()], "boom", timeout=5.0)
    assert (failed.status, failed.prediction) == (500, None)
    assert "ValueError" in failed.message and "exploded" not in failed.message  # no internals to the caller
    [answer] = client.query_sync([server.info()], IMAGE, timeout=5.0)
    assert (answer.status, answer.prediction) == (200, PREDICTION)
    [line] = errors["bitmind.transport"]
    assert "detector exploded" in line.getMessage()
    assert errors["bittensor"] == []


def test_forward_returning_garbage_answers_500(serve, client):
    async def forward(synapse: ImageSynapse):
        return {"prediction": 0.5}

    server = serve(forward)
    [answer] = client.query_sync([server.info()], IMAGE, timeout=5.0)
    assert (answer.status, answer.prediction) == (500, None)


def test_oversized_body_refused_before_reading(serve, client):
    forward = RecordingForward()
    server = serve(forward, max_request_bytes=20_000)
    [refused] = client.query_sync([server.info()], "A" * 50_000, timeout=5.0)
    assert (refused.status, refused.prediction) == (413, None)
    [answer] = client.query_sync([server.info()], IMAGE, timeout=5.0)
    assert answer.status == 200
    assert forward.images == [IMAGE]


def test_body_without_content_length_refused(serve, wallets):
    forward = RecordingForward()
    server = serve(forward, max_request_bytes=20_000)
    request = signed(wallets["validator"], server.info(), IMAGE)
    chunks = [b'{"image": "', b"A" * 30_000, b'"}']  # chunked upload: no Content-Length to check
    assert post(server.port, request.to_headers(), chunks) == 411
    assert forward.images == []


def test_slow_forward_times_out(serve, client):
    server = serve(RecordingForward())
    [answer] = client.query_sync([server.info()], "slow", timeout=0.3)
    assert (answer.status, answer.prediction, answer.latency) == (408, None, 0.3)


def test_nobody_listening_gives_503(client, wallets):
    nobody = bt.AxonInfo(
        version=1,
        ip=LOOPBACK,
        port=free_port(),
        ip_type=4,
        hotkey=wallets["miner"].hotkey.ss58_address,
        coldkey=wallets["miner"].coldkeypub.ss58_address,
    )
    [answer] = client.query_sync([nobody], IMAGE, timeout=5.0)
    assert (answer.status, answer.prediction) == (503, None)


def test_fan_out_keeps_axon_order(serve, client, wallets):
    first, second = serve(RecordingForward()), serve(RecordingForward())
    dead = bt.AxonInfo(version=1, ip=LOOPBACK, port=free_port(), ip_type=4, hotkey="x", coldkey="x")
    answers = client.query_sync([first.info(), dead, second.info()], [IMAGE, IMAGE, "boom"], timeout=5.0)
    assert [answer.status for answer in answers] == [200, 503, 500]
    with pytest.raises(ValueError, match="2 images for 3 axons"):
        client.query_sync([first.info(), dead, second.info()], [IMAGE, IMAGE], timeout=5.0)


def test_concurrent_queries_all_answered(serve, client):
    forward = RecordingForward()
    server = serve(forward)
    answers = client.query_sync([server.info()] * 20, [f"{IMAGE}{i}" for i in range(20)], timeout=10.0)
    # On failure, say whether the miner's forward saw the queries at all (a stalled server) or answered them late.
    seen = f"the forward saw {len(forward.images)} of 20; answers: {[(a.status, a.message[:80]) for a in answers]}"
    assert [answer.status for answer in answers] == [200] * 20, seen
    assert sorted(forward.images) == sorted(f"{IMAGE}{i}" for i in range(20))
    assert client._dendrite.synapse_history == []  # bittensor would keep every call forever


def test_overlapping_query_calls_on_one_client_share_the_session_safely(serve, client):
    """Several `query` coroutines in flight at once on one client (a miner benchmark, a busy validator): the
    first to finish must not close the HTTP session under the others."""
    server = serve(RecordingForward(delay=0.05))
    axon = server.info()

    async def burst():
        return await asyncio.gather(*(client.query([axon], f"{IMAGE}{i}", timeout=10.0) for i in range(12)))

    loop = asyncio.new_event_loop()
    try:
        results = loop.run_until_complete(burst())
        assert [answer.status for [answer] in results] == [200] * 12
        assert client._in_flight == 0 and client._dendrite._session is None
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()


def test_start_on_taken_port_raises(wallets):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MinerServer(wallets["miner"], port, RecordingForward(), external_ip=LOOPBACK)
        with pytest.raises(ServeError, match=f"cannot serve on 127.0.0.1:{port}: Address already in use"):
            server.start()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's sys.exit
def test_server_that_fails_to_start_raises_and_frees_its_thread_and_port(wallets):
    # The app's start-up fails: uvicorn exits its thread without serving; start() must notice and let the port go.
    @contextlib.asynccontextmanager
    async def failing_startup(app):
        raise RuntimeError("app cannot start")
        yield

    port = free_port()
    server = MinerServer(wallets["miner"], port, RecordingForward(), external_ip=LOOPBACK, start_timeout=5.0)
    server.axon.app.router.lifespan_context = failing_startup
    threads_before = threading.active_count()
    with pytest.raises(ServeError, match=f"axon did not answer on {LOOPBACK}:{port}"):
        server.start()
    deadline = time.monotonic() + 5.0
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before
    with socket.socket() as again:  # without SO_REUSEADDR: refused while any socket still holds the port
        again.bind((LOOPBACK, port))


def test_client_with_an_external_ip_never_looks_it_up(wallets, monkeypatch):
    def no_internet():
        raise AssertionError("looked up the external IP")

    monkeypatch.setattr(transport.networking, "get_external_ip", no_internet)
    client = ValidatorClient(wallets["validator"], external_ip="198.51.100.7")
    assert client._dendrite.external_ip == "198.51.100.7"


def test_our_dendrite_has_what_bittensors_has(wallets):
    """`_Dendrite` sets bittensor's attributes itself (to skip the lookup): the same ones as a real `bt.Dendrite`."""
    real = bt.Dendrite(wallet=wallets["validator"])  # the `offline_ip` fixture answers its lookup
    ours = transport._Dendrite(wallets["validator"], "198.51.100.7")
    assert set(vars(ours)) == set(vars(real))
    assert isinstance(ours, bt.Dendrite) and ours.keypair.ss58_address == real.keypair.ss58_address


def test_server_runs_on_the_compiled_http_stack(serve, client):
    server = serve(RecordingForward())
    assert (server.axon.fast_config.http, server.axon.fast_config.loop) == ("httptools", "uvloop")
    assert client.query_sync([server.info()], IMAGE, timeout=5.0)[0].prediction == PREDICTION


def test_server_falls_back_to_pure_python_http_stack(serve, client, monkeypatch):
    # A platform without the httptools / uvloop wheels still serves, on h11 and asyncio.
    monkeypatch.setattr(transport.importlib.util, "find_spec", lambda name: None)
    server = serve(RecordingForward())
    assert (server.axon.fast_config.http, server.axon.fast_config.loop) == ("h11", "asyncio")
    assert client.query_sync([server.info()], IMAGE, timeout=5.0)[0].prediction == PREDICTION


def test_stop_releases_port(serve, client):
    server = serve(RecordingForward())
    server.stop()
    assert client.query_sync([server.info()], IMAGE, timeout=5.0)[0].status == 503


# A miner that answers whatever it likes, chosen by the image it is sent.
OK = '"axon": {"status_code": 200}'
HOSTILE_ANSWERS = {
    "nan": (200, "application/json", '{"prediction": NaN, %s}' % OK),
    "huge": (200, "application/json", '{"prediction": 1e308, %s}' % OK),
    "text-number": (200, "application/json", '{"prediction": "0.9", %s}' % OK),
    "no-status": (200, "application/json", '{"prediction": 0.5}'),
    "list": (200, "application/json", '{"prediction": [1, 2], %s}' % OK),
    "null-dendrite": (200, "application/json", '{"prediction": 0.5, "dendrite": null, %s}' % OK),
    "not-json": (200, "text/plain", "hello"),
    "error": (500, "application/json", '{"message": "nope"}'),
}


def _ask_stub_miner(wallets, answer, images: list[str]) -> list[Response]:
    """Query an aiohttp stub miner (`answer` handles each request) through the real ValidatorClient."""

    async def scenario() -> list[Response]:
        app = web.Application()
        app.router.add_post("/ImageSynapse", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, LOOPBACK, port).start()
        miner = wallets["miner"]
        axon = bt.AxonInfo(
            version=1,
            ip=LOOPBACK,
            port=port,
            ip_type=4,
            hotkey=miner.hotkey.ss58_address,
            coldkey=miner.coldkeypub.ss58_address,
        )
        client = ValidatorClient(wallets["validator"], external_ip=LOOPBACK)
        try:
            return await client.query([axon] * len(images), images, timeout=5.0)
        finally:
            await client.aclose()
            await runner.cleanup()

    return asyncio.run(scenario())


def test_hostile_miner_answers_become_statuses(wallets):
    async def answer(request: web.Request) -> web.Response:
        status, content_type, text = HOSTILE_ANSWERS[(await request.json())["image"]]
        return web.Response(status=status, content_type=content_type, text=text)

    answers = dict(zip(HOSTILE_ANSWERS, _ask_stub_miner(wallets, answer, list(HOSTILE_ANSWERS))))
    assert answers["nan"].status == 200 and math.isnan(answers["nan"].prediction)
    assert (answers["huge"].status, answers["huge"].prediction) == (200, 1e308)
    assert (answers["text-number"].status, answers["text-number"].prediction) == (200, 0.9)
    for name in ("no-status", "list", "null-dendrite", "not-json"):
        assert (answers[name].status, answers[name].prediction) == (422, None), name
    assert (answers["error"].status, answers["error"].prediction) == (500, None)


def test_oversized_miner_answers_are_refused_unread(wallets, monkeypatch):
    """An answer past MAX_ANSWER_BYTES is status 400 for that miner alone, whether its length is declared or it is
    sent in chunks with none; an echo of the request within the limit still counts."""
    monkeypatch.setattr(transport, "MAX_ANSWER_BYTES", 64 * 1024)
    echo = lambda size: '{"prediction": 0.7, "image": "%s", %s}' % ("A" * size, OK)  # noqa: E731

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = (await request.json())["image"]
        if kind != "chunked":
            return web.Response(content_type="application/json", text=echo(30_000 if kind == "fits" else 200_000))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        body = echo(10_000_000).encode()
        for begin in range(0, len(body), 65536):
            await response.write(body[begin : begin + 65536])
        await response.write_eof()
        return response

    fits, declared, chunked = _ask_stub_miner(wallets, answer, ["fits", "declared", "chunked"])
    assert (fits.status, fits.prediction) == (200, 0.7)
    for refused in (declared, chunked):
        assert (refused.status, refused.prediction, refused.ok) == (400, None, False)
        assert "limit" in refused.message
