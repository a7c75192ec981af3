"""Hostile input: one client cannot fail the others.

A row whose sampling, prefill or generate() call fails ends alone while the rows beside it finish with
the text each gets alone (the nf4tune decoder on the tiny Llama; transformers' generate on olmo2,
which that decoder does not take); the server takes a burst of 128 connections, drops idle and
slowloris connections, caps its connections with a 503, refuses foreign Hosts and non-JSON POSTs
without an API key, and answers hostile JSON with a 400 that says why."""

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import pytest

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.serve import Engine, Request, Sampling
from nf4tune.serve.generate_runner import GenerateRunner
from nf4tune.serve.json_body import MAX_JSON_DEPTH
from nf4tune.serve.server import Server

LONG = 40  # tokens of the greedy replies the failing row sits beside
PROMPTS = ["Hello there, how", "Once upon a time"]  # the same length: generate() pads neither


@dataclass(frozen=True)
class Unchecked(Sampling):
    """Sampling as the engine took it before it refused degenerate settings: temperature 1e-45 is not
    greedy, and dividing the logits by it gives inf, then NaN, so no token can be drawn."""

    def check(self) -> "Sampling":
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _load(path):
    return nf4tune.load_model(path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama served by nf4tune's CPU decoder, replies running to their length."""
    model, tokenizer = _load(build_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "llama"))
    engine = Engine(model, tokenizer, max_batch=8, max_queue=256)
    if isinstance(engine.decoder, GenerateRunner):
        engine.close()
        pytest.skip(f"the CPU decoder cannot run here: {engine.decode_path.reason}")
    engine.eos_ids = set()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    """The tiny olmo2, served by transformers' generate (the CPU decoder does not take the family)."""
    model, tokenizer = _load(build_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "olmo2", "olmo2"))
    engine = Engine(model, tokenizer, max_batch=8)
    assert isinstance(engine.decoder, GenerateRunner), engine.decode_path
    engine.eos_ids = set()
    yield engine
    engine.close()


def _alone(engine: Engine, prompt: str, **sampling) -> Request:
    request = engine.submit(Request(prompt, sampling=Sampling(**sampling))).wait(120)
    assert request.error is None, request.error
    return request


def _together(engine: Engine, requests: list[Request]) -> list[Request]:
    """`requests` submitted while the worker waits at its gate, so that they start as one batch."""
    engine.gate.clear()
    _alone(engine, "warm", max_new_tokens=1)  # the worker is now at the gate
    for r in requests:
        engine.submit(r)
    engine.gate.set()
    return [r.wait(120) for r in requests]


def _traceback_records(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if request_id in r.getMessage() and r.exc_info]


# --- 1. one failing row, the others unchanged ----------------------------------------------------

@pytest.mark.parametrize("failure", ["draw", "prefill"])
def test_a_failing_row_ends_alone_and_the_decoders_other_rows_answer_as_alone(llama, caplog, monkeypatch, failure):
    caplog.set_level(logging.INFO, logger="nf4tune")
    alone = [_alone(llama, p, max_new_tokens=LONG).text for p in PROMPTS]
    if failure == "draw":
        bad = Request("Why", sampling=Unchecked(max_new_tokens=LONG, temperature=1e-45))
    else:  # a prompt whose prefill fails: prefilled beside the others, then alone
        bad = Request("@@@ poison", sampling=Sampling(max_new_tokens=LONG))
        real_prefill = llama.decoder._prefill_into
        poison = llama.tokenizer("@@@", add_special_tokens=False).input_ids

        def prefill(prompts, end):
            if any(ids.tolist()[:len(poison)] == poison for _, ids in prompts):
                raise RuntimeError("this prompt cannot be prefilled")
            return real_prefill(prompts, end)

        monkeypatch.setattr(llama.decoder, "_prefill_into", prefill)
    good = [Request(p, sampling=Sampling(max_new_tokens=LONG)) for p in PROMPTS]
    for r in good:
        llama.submit(r)
    while not all(r.completion_tokens >= 3 for r in good):  # midway through their replies
        time.sleep(0.005)
    late = Request("Why not", sampling=Sampling(max_new_tokens=LONG))
    with llama._lock:  # both join the running batch at the same step
        llama.submit(bad)
        llama.submit(late)
    good.append(late)
    alone.append(_alone(llama, "Why not", max_new_tokens=LONG).text)
    assert [r.wait(120).text for r in good] == alone  # bit for bit, as if it had never joined
    assert all(r.error is None and r.finish_reason == "length" and r.completion_tokens == LONG for r in good)
    assert bad.wait(60).error and ("not finite" if failure == "draw" else "cannot be prefilled") in bad.error
    assert len(_traceback_records(caplog, bad.id)) == 1  # logged once, with its traceback and its id
    assert not any(_traceback_records(caplog, r.id) for r in good)


def test_a_degenerate_temperature_decodes_greedily_beside_greedy_rows_on_the_server(llama):
    # the case: a temperature of a few 1e-38 made the sampler's scores inf/NaN and its batch 500
    expected = [_alone(llama, p, max_new_tokens=LONG).text for p in PROMPTS]
    with _serving(llama) as server:
        asks = [(p, 0.0) for p in PROMPTS] + [(PROMPTS[0], 3e-38), (PROMPTS[1], 1e-300)]
        answers = [None] * len(asks)

        def ask(i):
            prompt, temperature = asks[i]
            answers[i] = _call(server, "POST", "/v1/completions",
                               {"prompt": prompt, "max_tokens": LONG, "temperature": temperature})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [status for status, _, _ in answers] == [200] * len(asks), answers
    assert [body["choices"][0]["text"] for _, _, body in answers] == expected + expected  # greedy, as documented


def test_on_generate_a_degenerate_row_joins_greedy_rows_and_all_answer_as_alone(olmo2, monkeypatch):
    expected = [_alone(olmo2, p, max_new_tokens=12).text for p in PROMPTS]
    rows = [Request(p, sampling=Sampling(max_new_tokens=12)) for p in PROMPTS]
    degenerate = Request(PROMPTS[0], sampling=Sampling(max_new_tokens=12, temperature=1e-40, top_p=0.5, seed=3))
    calls = []
    real = olmo2.model.generate
    monkeypatch.setattr(olmo2.model, "generate", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or real(*a, **k))
    replies = _together(olmo2, rows + [degenerate])
    assert calls[-1] == 3  # checked and normalized before joining, it shared the greedy rows' call
    assert degenerate.sampling == rows[0].sampling
    assert [r.text for r in replies] == expected + expected[:1] and not any(r.error for r in replies)


def test_when_generate_fails_for_a_batch_each_row_goes_on_alone_and_only_the_culprit_fails(olmo2, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="nf4tune")
    poison = "@@@@" + "x" * (len(PROMPTS[0]) - 4)
    expected = [_alone(olmo2, p, max_new_tokens=12) for p in PROMPTS]
    real = olmo2.model.generate

    def flaky(*args, **kwargs):  # any call holding the poisoned prompt breaks after 3 tokens
        texts = [olmo2.tokenizer.decode(row) for row in kwargs["input_ids"].tolist()]
        if any("@@@@" in t for t in texts):
            streamer, puts = kwargs["streamer"], []
            real_put = streamer.put

            def put(value):
                puts.append(value)
                if len(puts) > 3:  # the start ids, then 3 tokens each
                    raise RuntimeError("the poisoned batch broke")
                return real_put(value)

            streamer.put = put
        return real(*args, **kwargs)

    monkeypatch.setattr(olmo2.model, "generate", flaky)
    good = [Request(p, sampling=Sampling(max_new_tokens=12)) for p in PROMPTS]
    bad = Request(poison, sampling=Sampling(max_new_tokens=12))
    pieces = []
    good[0].deltas = type("Spy", (), {"put": lambda self, piece: pieces.append(piece)})()
    _together(olmo2, good + [bad])
    # they resumed alone from their 3 tokens: the same text as alone, none of it sent twice
    assert [(r.text, r.completion_tokens, r.error) for r in good] == [(e.text, e.completion_tokens, None) for e in expected]
    assert "".join(p for p in pieces if p is not None) == expected[0].text
    assert bad.error and "poisoned batch broke" in bad.error
    assert len(_traceback_records(caplog, bad.id)) == 1 and not any(_traceback_records(caplog, r.id) for r in good)
    assert any("going on with" in r.getMessage() and good[0].id in r.getMessage() for r in caplog.records)


# --- 2. connections: a burst, the cap, idle and slow clients ----------------------------------------

@contextlib.contextmanager
def _serving(engine: Engine, **kw):
    """A server over `engine` on a free loopback port (stopped without closing the engine)."""
    server = Server(engine, base_name="tiny", port=0, **kw)
    server.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def _call(server: Server, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
          conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, dict]:
    """One request: its status, headers and JSON body."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*server.address, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        if own:
            conn.close()


def test_a_burst_of_128_connections_is_accepted_and_every_request_answered(llama):
    clients = 128
    with _serving(llama) as server:
        assert server.httpd.request_queue_size >= clients and server.httpd.max_connections > clients
        ready, statuses, failures = threading.Barrier(clients), [], []

        def client():
            ready.wait(30)
            try:
                conn = http.client.HTTPConnection(*server.address, timeout=30)  # no retries: one try each
                statuses.append(_call(server, "GET", "/v1/models", conn=conn)[0])
                conn.close()
            except OSError as e:
                failures.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert failures == [] and statuses == [200] * clients


def test_connections_beyond_the_cap_get_a_json_503_and_room_frees_as_they_close(llama):
    with _serving(llama, max_connections=3) as server:
        held = [http.client.HTTPConnection(*server.address, timeout=30) for _ in range(3)]
        for conn in held:  # answered, kept alive: each holds its place
            assert _call(server, "GET", "/v1/models", conn=conn)[0] == 200
        status, headers, body = _call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 503 and headers.get("Retry-After") == "1"
        assert body["error"]["code"] == 503 and "limit of 3 connections" in body["error"]["message"]
        held.pop().close()
        deadline = time.monotonic() + 10
        while server.httpd.connections >= 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _call(server, "GET", "/v1/models")[0] == 200
        for conn in held:
            conn.close()


def _closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed `sock` (None if it did not within `within`); what it sent is read."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_idle_and_slowloris_connections_are_dropped_after_their_timeouts(llama):
    with _serving(llama, idle_timeout=1.0, read_timeout=0.6) as server:
        idle = socket.create_connection(server.address)
        assert 0.5 < _closed_by_server(idle, 10) < 5

        # headers trickling in, each line well within the idle timeout, never finishing
        slow = socket.create_connection(server.address)
        start, dropped = time.monotonic(), False
        slow.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for i in range(40):
            time.sleep(0.15)
            try:
                slow.sendall(f"X-Slow-{i}: {i}\r\n".encode())
            except OSError:
                dropped = True
                break
        assert dropped or _closed_by_server(slow, 5) is not None
        assert time.monotonic() - start < 5

        # a body that stops coming: a 408, and the connection closes
        body = socket.create_connection(server.address)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"" % server.address[1])
        body.settimeout(10)
        assert body.recv(4096).startswith(b"HTTP/1.1 408")

        # a client that keeps to the timeouts is served, on one connection, request after request
        conn = http.client.HTTPConnection(*server.address, timeout=10)
        for _ in range(3):
            assert _call(server, "GET", "/v1/models", conn=conn)[0] == 200
            time.sleep(0.1)
        conn.close()


# --- 3. without an API key: this server's Host, JSON only ---------------------------------------

def _raw_status(server: Server, head: bytes) -> int:
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(head)
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_without_a_key_only_this_servers_host_and_json_posts_are_answered(llama):
    with _serving(llama, allowed_hosts=["nf4tune.internal"]) as server:
        port = server.address[1]
        for host, status in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"[::1]:{port}", 200),
                             (f"nf4tune.internal:{port}", 200), (f"LOCALHOST:{port}", 200),
                             (f"evil.example:{port}", 403), (f"127.0.0.1.evil.example:{port}", 403),
                             (f"localhost:{port + 1}", 403), ("localhost", 403), (f"[::1]x:{port}", 403)):
            got, _, body = _call(server, "GET", "/v1/models", headers={"Host": host})
            assert got == status, (host, body)
        assert _raw_status(server, b"GET /v1/models HTTP/1.1\r\n\r\n") == 403  # no Host at all
        got, _, body = _call(server, "GET", "/v1/models", headers={"Host": f"evil.example:{port}"})
        assert body["error"]["type"] == "permission_error" and "--api-key" in body["error"]["message"]

        ask = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
        for media, status in (("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                              ("multipart/form-data; boundary=x", 415), ("", 415),
                              ("application/json; charset=utf-8", 200), ("Application/JSON", 200)):
            got, _, body = _call(server, "POST", "/v1/completions", ask, {"Content-Type": media})
            assert got == status, (media, body)
            assert status == 200 or "Content-Type: application/json" in body["error"]["message"]

    with _serving(llama, api_key="secret") as server:  # with a key, the key is what guards it
        key = {"Authorization": "Bearer secret"}
        assert _call(server, "GET", "/v1/models", headers={"Host": "evil.example", **key})[0] == 200
        assert _call(server, "POST", "/v1/completions", ask, {"Content-Type": "text/plain", **key})[0] == 200
        assert _call(server, "POST", "/v1/completions", ask, {"Content-Type": "text/plain"})[0] == 401


# --- 4. hostile JSON: a 400 that says why ---------------------------------------------------------

BAD_JSON = {
    b'{"prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}": "integer of 401 digits, beyond the 64-bit range",
    b'{"prompt": "hi", "seed": -' + b"9" * 400 + b"}": "integer of 400 digits, beyond the 64-bit range",
    b'{"prompt": "hi", "seed": 9223372036854775808}': "beyond the 64-bit range",
    b'{"prompt": "\\ud800 lone"}': "lone UTF-16 surrogate",
    b'{"prompt": "hi", "stop": ["\\udfff"]}': "lone UTF-16 surrogate",
    b'{"prompt": "hi", "user": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}": "nests deeper",
    b'{"prompt": "hi", "user": ' + b"[" * 100000 + b"]" * 100000 + b"}": "nests deeper",
    b'{"prompt": "hi", "user": NaN}': "holds NaN",
    b'{"prompt": "hi", "temperature": Infinity}': "holds Infinity",
    b'{"prompt": "hi", "temperature": -Infinity}': "holds -Infinity",
    b'{"prompt": "hi", "temperature": 1e999}': "beyond the range of a 64-bit float",
    b'{"prompt": "hi", "temperature": 0.5': "not valid JSON",
}


def test_hostile_json_is_a_400_with_one_sentence_and_the_server_goes_on(llama):
    with _serving(llama) as server:
        for data, why in BAD_JSON.items():
            status, _, body = _call(server, "POST", "/v1/completions", data)
            message = body["error"]["message"]
            assert (status, body["error"]["type"]) == (400, "invalid_request_error"), (data[:60], body)
            assert why in message and message.endswith(".") and len(message) < 300, message
        nested = {"prompt": "hi", "max_tokens": 1, "stream_options": json.loads("[" * 30 + "]" * 30)}
        status, _, body = _call(server, "POST", "/v1/completions", nested)  # within the depth limit: parsed
        assert status == 400 and "'stream_options' takes" in body["error"]["message"]
        assert _call(server, "POST", "/v1/completions", {**nested, "stream_options": None})[0] == 200
