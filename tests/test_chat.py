"""chat.py: the streamed reply text, the HTTP server (plain HTTP, the official openai client, concurrency) and the
terminal chat. (The calculator and the Engine: test_engine.py.)

Most tests drive chat.py with test_engine.py's scripted stand-in for model.generate (a byte-level fake tokenizer,
and a "model" that writes a fixed script), so what they check is exactly chat.py's part. The tests at the end use
the real tokenizer and a tiny random GPT, saved as a checkpoint and driven through `python chat.py`."""
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import chat
import model
from model import Engine
from conftest import run_main
from test_engine import BOS, FakeTokenizer, fake, fake_generate, script  # noqa: F401  (fake: a fixture)

# -----------------------------------------------------------------------------
# Replies as text


def test_reply_shows_tool_calls_inline(fake):
    engine = fake("It is ", "<|python_start|>", "6*7", "<|python_end|>", " so.", "<|python_start|>", "x",
                  "<|python_end|>", "!", "<|assistant_end|>")
    reply = chat.Reply(engine, [BOS], max_new_tokens=100, temperature=1.0, top_k=0)
    pieces = list(reply)
    assert "".join(pieces) == reply.text == "It is <<6*7=42>> so.<<x>>!"
    assert reply.finish_reason == "stop" and reply.num_tokens == 24
    assert reply.parts == [{"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"},
                           {"type": "python_output", "text": "42"}, {"type": "text", "text": " so."},
                           {"type": "python", "text": "x"}, {"type": "text", "text": "!"}]
    # the text reads back into the same parts, so a conversation sent back to the server is rendered as generated
    assert chat.message_parts(reply.text) == reply.parts
    assert chat.message_parts("plain <b> text") == "plain <b> text"


def test_reply_length_and_split_characters(fake):
    engine = fake("héllo ☃ ")  # multi-byte characters arrive one byte-token at a time
    reply = chat.Reply(engine, [BOS], max_new_tokens=12, temperature=1.0, top_k=0)
    pieces = list(reply)
    assert all("\ufffd" not in p for p in pieces)
    assert reply.text == "".join(pieces) == "héllo ☃ h" and reply.finish_reason == "length"


def test_reply_stop_strings(fake):
    engine = fake("one two three", "<|assistant_end|>")
    reply = chat.Reply(engine, [BOS], max_new_tokens=100, temperature=1.0, top_k=0, stop=["two", "zzz"])
    pieces = list(reply)
    assert "".join(pieces) == reply.text == "one " and reply.finish_reason == "stop"
    assert reply.num_tokens < len(script("one two three"))  # generation stopped there

# -----------------------------------------------------------------------------
# Request checks


def request(**fields):
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_read_chat_request_good():
    conversation, options = chat.read_chat_request(request(
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                  {"role": "assistant", "content": "<<2+2=4>>4"}, {"role": "user", "content": "and 3+3?"}],
        temperature=0, top_p=0.5, max_tokens=10, stop="\n", n=1, stream=True, seed=3, model="anything"))
    assert conversation[1] == {"role": "user", "content": "2+2?"}
    assert conversation[2]["content"] == [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
                                          {"type": "text", "text": "4"}]
    assert options == dict(max_new_tokens=10, temperature=0, top_p=0.5, seed=3, stop=["\n"], stream=True)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None), (b"\xff\xfe", None), (b"[]", None), (b'"hi"', None),
    (json.dumps({}).encode(), "messages"), (request(messages=[]), "messages"), (request(messages="hi"), "messages"),
    (request(messages=[{"role": "user"}]), "messages[0]"),
    (request(messages=[{"role": "bot", "content": "x"}]), "messages[0]"),
    (request(messages=[{"role": "user", "content": 5}]), "messages[0]"), (request(messages=["hi"]), "messages[0]"),
    (request(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0]"),
    (request(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), "messages[1]"),
    (request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages"),
    (request(messages=[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]), "messages[0]"),
    (request(messages=[{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages[1]"),
    (request(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "messages[1]"),
    (request(messages=[{"role": "user", "content": "x"}] * 101), "messages"),
    (request(messages=[{"role": "user", "content": "x" * 16001}]), "messages"),
    (request(temperature=2.5), "temperature"), (request(temperature="hot"), "temperature"),
    (request(temperature=True), "temperature"), (request(top_p=0), "top_p"), (request(top_p=1.5), "top_p"),
    (request(max_tokens=0), "max_tokens"), (request(max_tokens=10**6), "max_tokens"),
    (request(max_tokens=1.5), "max_tokens"), (request(max_completion_tokens=-1), "max_completion_tokens"),
    (request(n=2), "n"), (request(stream="yes"), "stream"), (request(stop=5), "stop"),
    (request(stop=["a"] * 5), "stop"), (request(stop=[1]), "stop"), (request(seed="x"), "seed"),
])
def test_read_chat_request_bad(body, param):
    with pytest.raises(chat.ApiError) as info:
        chat.read_chat_request(body)
    assert info.value.status == 400 and info.value.param == param and info.value.message

# -----------------------------------------------------------------------------
# The terminal chat, with the scripted model


def test_terminal_chat(fake, monkeypatch, capsys):
    engine = fake(*REPLY)
    seen = []
    render = engine.tokenizer.render_for_completion
    monkeypatch.setattr(engine.tokenizer, "render_for_completion", lambda m: seen.append(list(m)) or render(m),
                        raising=False)
    lines = iter(["What is 6*7?", "", "thanks", "/clear", "again", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.terminal_chat(engine)
    out = capsys.readouterr().out
    assert out.count("Assistant: " + REPLY_TEXT + "\n") == 3 and "(new conversation)" in out
    assert next(lines) == "never read"
    assert [len(m) for m in seen] == [1, 3, 1]  # multi-turn history, then a fresh one after /clear
    assert seen[1][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
        {"type": "text", "text": " so."}]}


def test_terminal_chat_eof_and_full_context(fake, monkeypatch, capsys):
    engine = fake(*REPLY)
    engine.model.config = type("config", (), {"sequence_len": 12})
    lines = iter(["hi", "a much longer question"])

    def read(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", read)
    chat.terminal_chat(engine)  # returns at end of input
    out = capsys.readouterr().out
    assert "Assistant: It is \n" in out and "no longer fits" in out  # the reply stopped where the context ends

# -----------------------------------------------------------------------------
# The server, with the scripted model

REPLY = ("It is ", "<|python_start|>", "6*7", "<|python_end|>", " so.", "<|assistant_end|>")
REPLY_TEXT = "It is <<6*7=42>> so."


@pytest.fixture
def server(fake, monkeypatch):
    """A ChatServer on a free port of 127.0.0.1; generate() checks that no two generations ever overlap."""
    active, overlaps = [0], []

    def exclusive_generate(*args, **kwargs):
        active[0] += 1
        overlaps.append(active[0] > 1)
        try:
            for step in fake_generate(*args, **kwargs):
                time.sleep(0.001)  # give other threads the chance to barge in
                yield step
        finally:
            active[0] -= 1
    monkeypatch.setattr(model, "generate", exclusive_generate)
    srv = chat.ChatServer(fake(*REPLY), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.port = srv.server_address[1]
    srv.overlaps = overlaps
    yield srv
    srv.shutdown()
    srv.server_close()
    assert not any(overlaps)


def call(srv, method, path, body=None, headers=None):
    """One request, as a JSON API client sends it (a POST says its body is JSON); returns (status, type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request(method, path, body=body, headers={**({"Content-Type": "application/json"} if method == "POST"
                                                       else {}), **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type"), data


def assert_api_error(status, content_type, data, want_status, param=None):
    assert status == want_status and content_type == "application/json"
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert error["type"] == ("invalid_request_error" if want_status < 500 else "server_error")


def test_server_get_routes(server):
    status, content_type, data = call(server, "GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok"}
    status, _, data = call(server, "GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "picochat"
    status, content_type, data = call(server, "GET", "/?x=1")
    page = data.decode()
    assert status == 200 and content_type.startswith("text/html") and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert_api_error(*call(server, "GET", "/nope"), 404)
    assert_api_error(*call(server, "POST", "/v1/nope", body=b"{}"), 404)
    assert_api_error(*call(server, "GET", "/v1/chat/completions"), 405)
    assert_api_error(*call(server, "POST", "/health", body=b"{}"), 405)
    assert_api_error(*call(server, "DELETE", "/v1/chat/completions"), 405)
    assert_api_error(*call(server, "PUT", "/elsewhere", body=b"{}"), 404)


def test_server_bad_requests(server, monkeypatch):
    post = lambda body, **kw: call(server, "POST", "/v1/chat/completions", body=body, **kw)
    assert_api_error(*post(b"{oops"), 400)
    assert_api_error(*post(b""), 400)
    assert_api_error(*post(b"null"), 400)
    assert_api_error(*post(request(temperature=[1])), 400, "temperature")
    assert_api_error(*post(request(messages=[{"role": "user", "content": None}])), 400, "messages[0]")
    monkeypatch.setattr(chat, "max_body_bytes", 1000)
    assert_api_error(*post(b"x" * 5000), 413)
    # the size is refused from the header alone: the body is never sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 999999999999\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 413")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 411")
    assert_api_error(*post(b"{}", headers={"Content-Length": "-5"}), 400)
    assert_api_error(*post(b"{}", headers={"Content-Length": "²"}), 400)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"garbage\r\n\r\n")  # not even HTTP: http.server answers 400 itself
        assert b"400" in s.makefile("rb").read()
    assert call(server, "GET", "/health")[0] == 200


def test_server_context_length(server):
    server.engine.model.config = type("config", (), {"sequence_len": 8})  # the prompt is 6 tokens
    completion = json.loads(call(server, "POST", "/v1/chat/completions", body=request())[2])
    assert completion["usage"]["completion_tokens"] == 2 and completion["choices"][0]["finish_reason"] == "length"
    server.engine.model.config.sequence_len = 6
    status, content_type, data = call(server, "POST", "/v1/chat/completions", body=request())
    assert_api_error(status, content_type, data, 400, "messages")
    assert json.loads(data)["error"]["code"] == "context_length_exceeded"


def test_server_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["picochat"]
    messages = [{"role": "user", "content": "What is 6*7?"}]
    completion = client.chat.completions.create(model="picochat", messages=messages)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == REPLY_TEXT
    assert choice.finish_reason == "stop"
    # the forced <|output_start|>42<|output_end|> count too
    assert completion.usage.completion_tokens == len(script(*REPLY)) + 4
    assert completion.usage.prompt_tokens == len(FakeTokenizer().render_for_completion(messages))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="picochat", messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY_TEXT
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    short = client.chat.completions.create(model="picochat", messages=messages, max_tokens=3)
    assert short.choices[0].message.content == "It " and short.choices[0].finish_reason == "length"
    cut = client.chat.completions.create(model="picochat", messages=messages, stop=[" so", "zz"], stream=True)
    cut = list(cut)
    assert "".join(c.choices[0].delta.content or "" for c in cut) == "It is <<6*7=42>>"
    assert cut[-1].choices[0].finish_reason == "stop"
    multi = messages + [{"role": "assistant", "content": REPLY_TEXT}, {"role": "user", "content": "thanks"}]
    assert client.chat.completions.create(model="m", messages=multi).choices[0].message.content == REPLY_TEXT
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="picochat", messages=messages, n=2)
    assert info.value.body["param"] == "n"  # openai exposes the "error" object as .body


def test_server_stream_format(server):
    status, content_type, data = call(server, "POST", "/v1/chat/completions", body=request(stream=True))
    assert status == 200 and content_type == "text/event-stream"
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-2])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)


def test_server_concurrent_requests(server):
    def one(i):
        status, _, data = call(server, "POST", "/v1/chat/completions", body=request(stream=i % 2 == 1, seed=i))
        if i % 2:
            return status, "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                                   for e in data.decode().split("\n\n")[:-2])
        return status, json.loads(data)["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [(200, REPLY_TEXT)] * 24
    assert len(server.overlaps) == 24 and not any(server.overlaps)


def test_server_survives_failures(server, monkeypatch):
    # a client that leaves mid-stream stops its generation and frees the model for the next one
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        body = request(stream=True)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(20).startswith(b"HTTP/1.0 200")
    assert call(server, "POST", "/v1/chat/completions", body=request())[0] == 200

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
        yield
    monkeypatch.setattr(model, "generate", broken)
    assert_api_error(*call(server, "POST", "/v1/chat/completions", body=request()), 500)
    status, _, data = call(server, "POST", "/v1/chat/completions", body=request(stream=True))
    error = json.loads(data.decode().split("\n\n")[1][len("data: "):])["error"]
    assert status == 200 and error["type"] == "server_error"
    assert call(server, "GET", "/health")[0] == 200

# -----------------------------------------------------------------------------
# Abandoned work, slow readers, the connection cap


@pytest.fixture
def endless_server(fake, monkeypatch):
    """A ChatServer whose model writes "word " until max_tokens runs out, 2 ms a step; .steps counts the steps."""
    steps = []

    def slow_generate(*args, **kwargs):
        for step in fake_generate(*args, **kwargs):
            time.sleep(0.002)
            steps.append(1)
            yield step
    monkeypatch.setattr(model, "generate", slow_generate)
    srv = chat.ChatServer(fake("word "), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    srv.port, srv.steps = srv.server_address[1], steps
    yield srv
    srv.shutdown()
    srv.server_close()


def raw_post(port, body, receive_buffer=None):
    """A POST sent on a socket of our own (left open): the caller decides whether to read the answer."""
    s = socket.socket()
    if receive_buffer:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def timed_answer(srv):
    t0 = time.time()
    status, _, data = call(srv, "POST", "/v1/chat/completions", body=request(max_tokens=5))
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == "word "
    return time.time() - t0


def test_abandoned_requests_are_dropped(endless_server):
    # 20 clients ask for 2048 tokens each and hang up at once, streaming or not: 80 s of generation if the server
    # went through with them (it once did: 300 of them made the next request wait 49 s)
    for i in range(20):
        raw_post(endless_server.port, request(max_tokens=2048, stream=i % 2 == 1)).close()
    assert timed_answer(endless_server) < 10
    assert len(endless_server.steps) < 2048  # all of them together, less than one reply went through


def test_a_slow_reader_holds_up_nobody(endless_server, monkeypatch):
    # a streaming client that reads nothing: with small socket buffers the server's writes to it block at once
    setup = chat.ChatHandler.setup

    def small_send_buffer(handler):
        setup(handler)
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    monkeypatch.setattr(chat.ChatHandler, "setup", small_send_buffer)
    slow = raw_post(endless_server.port, request(max_tokens=600, stream=True), receive_buffer=4096)
    try:
        time.sleep(0.5)  # its reply (~100 KB of events) is under way and stuck in its socket
        assert timed_answer(endless_server) < 10  # the model went on without waiting for the slow reader's writes
    finally:
        slow.close()


def test_requests_beyond_the_cap_get_503(endless_server, monkeypatch):
    monkeypatch.setattr(chat, "max_connections", 2)
    streams = [raw_post(endless_server.port, request(max_tokens=2048, stream=True)) for _ in range(2)]
    for s in streams:
        assert s.recv(20).startswith(b"HTTP/1.0 200")
    assert_api_error(*call(endless_server, "GET", "/health"), 503)
    for s in streams:  # they hang up: their generation stops and their places free up
        s.close()
    deadline = time.time() + 10
    while call(endless_server, "GET", "/health")[0] != 200:
        assert time.time() < deadline
        time.sleep(0.05)
    timed_answer(endless_server)

# -----------------------------------------------------------------------------
# A local server, safe by default: who may ask, and what every error looks like


def answer(srv, method, path, headers, body=None):
    """(status, response headers as a dict) of one request with exactly these headers."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, dict(response.getheaders())


def test_pages_and_names_of_other_sites_are_refused(server, monkeypatch):
    json_post = lambda **headers: call(server, "POST", "/v1/chat/completions", body=request(), headers=headers)
    own, port = f"http://127.0.0.1:{server.port}", server.port
    # another site's page: a text/plain POST needs no preflight, so it is the Origin that refuses it
    assert_api_error(*json_post(Origin="http://evil.example", **{"Content-Type": "text/plain"}), 403)
    assert_api_error(*json_post(**{"Content-Type": "text/plain"}), 415)
    assert_api_error(*json_post(**{"Content-Type": "application/x-www-form-urlencoded"}), 415)
    # DNS rebinding: a page's own name pointed at 127.0.0.1 is same-origin to the browser, but not this server's
    assert_api_error(*call(server, "GET", "/v1/models", headers={"Host": f"evil.example:{port}"}), 403)
    assert_api_error(*json_post(Host=f"evil.example:{port}", Origin=f"http://evil.example:{port}"), 403)
    assert answer(server, "OPTIONS", "/v1/chat/completions", {"Origin": "http://evil.example",
                                                              "Access-Control-Request-Method": "POST"})[0] == 403
    # this server's own page, and its names
    assert json_post(Origin=own)[0] == 200
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert call(server, "GET", "/health", headers={"Host": host})[0] == 200
    # --allow_origin lets a site's pages in, with CORS: the preflight, then the POST with its headers
    monkeypatch.setattr(chat, "allow_origin", "https://app.example, http://localhost:3000")
    status, headers = answer(server, "OPTIONS", "/v1/chat/completions", {
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert set(headers["Access-Control-Allow-Headers"].lower().split(", ")) == {"authorization", "content-type"}
    status, headers = answer(server, "POST", "/v1/chat/completions", {
        "Origin": "http://localhost:3000", "Content-Type": "application/json"}, request())
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert headers["Vary"] == "Origin"
    assert call(server, "GET", "/health", headers={"Host": "app.example"})[0] == 200  # behind its proxy
    assert_api_error(*json_post(Origin="http://evil.example"), 403)
    assert "Access-Control-Allow-Origin" not in answer(server, "GET", "/health", {"Origin": own})[1]


def test_api_key(server, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setattr(chat, "api_key", "sesame")
    client = lambda key: openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0,
                                       timeout=30)
    messages = [{"role": "user", "content": "What is 6*7?"}]
    assert client("sesame").chat.completions.create(model="m", messages=messages).choices[0].message.content \
        == REPLY_TEXT
    with pytest.raises(openai.AuthenticationError):
        client("sesame!").chat.completions.create(model="m", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        client("sesame").with_options(default_headers={"Authorization": ""}).models.list()
    assert call(server, "GET", "/")[0] == call(server, "GET", "/health")[0] == 200  # the page asks for the key


@pytest.mark.parametrize("raw, status", [
    (b"HEAD /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    (b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    (b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"garbage\r\n\r\n", 400),
], ids=["HEAD", "TRACE", "unknown method", "URI too long", "too many headers", "header too long", "HTTP/2.0",
        "not HTTP"])
def test_every_error_is_json(server, raw, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(raw)
        head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.0 {status} ") and "Content-Type: application/json" in lines
    if raw.startswith(b"HEAD"):
        assert body == b""  # a HEAD answer never has a body
    else:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


# -----------------------------------------------------------------------------
# The real thing: the tokenizer trained on a few KB, a tiny random GPT saved as a checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The quick brown fox jumps over the lazy dog. What is 6*7? It is 42. Hello there, how are you today? "
        "I am fine, thank you. Numbers: 12 + 30 = 42, 100 / 4 = 25. ") * 20


@pytest.fixture
def tiny_chat_model(tmp_base_dir):
    """A tiny sft checkpoint in $PICOCHAT_DIR; returns the (model, tokenizer) saved."""
    import dataclasses

    import torch

    import common
    import tokenizer as tk
    from model import GPT, config_from_depth
    tok = tk.load_tokenizer(tk.save_tokenizer(tk.train_bpe([TEXT], 256 + 40 + len(tk.SPECIAL_TOKENS), num_proc=1)))
    torch.manual_seed(0)
    config = config_from_depth(2, tok.vocab_size, 64)
    model = GPT(config)
    model.init_weights()
    model.eval()
    meta = {"step": 1, "model_config": dataclasses.asdict(config), "tokenizer_hash": tok.hash}
    common.save_checkpoint(common.checkpoint_dir("sft", "tiny"), 1, model.state_dict(), None, meta)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model only loses time to threads on a busy machine
    yield model, tok
    torch.set_num_threads(threads)


def run_chat(args, stdin=""):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "chat.py", "--device=cpu", *args], input=stdin, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_real_engine(tiny_chat_model):
    model, tok = tiny_chat_model
    engine = Engine(model, tok)
    prompt = tok.render_for_completion([{"role": "user", "content": "What is 6*7?"}])
    out = engine.generate_batch([prompt, [{"role": "user", "content": "hi"}]], num_samples=3, max_new_tokens=6,
                                temperature=1.0, top_k=20, seed=1)
    assert [len(samples) for samples in out] == [3, 3]
    for samples in out:
        for tokens, mask in samples:
            assert 1 <= len(tokens) <= 6 and len(mask) == len(tokens) and set(mask) <= {0, 1}
            assert not set(tokens[:-1]) & set(engine.stop_tokens)
    again = engine.generate_batch([prompt, [{"role": "user", "content": "hi"}]], num_samples=3, max_new_tokens=6,
                                  temperature=1.0, top_k=20, seed=1)
    assert again == out  # a seed makes sampling repeatable
    # the force hook with the real tokenizer: the calculator's answer, framed by the output tokens
    call = [*tok.encode("so "), engine.python_start, *tok.encode("6 * 7"), engine.python_end]
    assert engine.tool_output(0, call) == [engine.output_start, *tok.encode("42"), engine.output_end]
    assert engine.tool_output(0, call[:-1]) is None  # not yet closed
    assert engine.tool_output(0, [*tok.encode("6 * 7"), engine.python_end]) is None  # never opened


class Steered:
    """The tiny GPT steered to write `script`: its own logits plus a large bonus on the scripted token of each
    step (the first call is the prefill; forced steps call the model too, and their bonus is ignored)."""

    def __init__(self, gpt, script):
        self.gpt, self.config, self.lm_head, self.script, self.calls = gpt, gpt.config, gpt.lm_head, script, 0

    def __call__(self, idx, kv_cache=None):
        logits = self.gpt(idx, kv_cache=kv_cache)  # (B, T, V)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] += 1e4
        self.calls += 1
        return logits


def test_real_generate_forces_calculator(tiny_chat_model):
    model, tok = tiny_chat_model
    s = tok.special
    forced = [s("<|output_start|>"), *tok.encode("42"), s("<|output_end|>")]
    written = [*tok.encode("So "), s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
    after = [*tok.encode(" done"), s("<|assistant_end|>")]
    engine = Engine(Steered(model, written + [0] * len(forced) + after), tok)
    [[(tokens, mask)]] = engine.generate_batch([[tok.bos_id]], max_new_tokens=40, temperature=1.0, seed=0)
    assert tokens == written + forced + after
    assert mask == [1] * len(written) + [0] * len(forced) + [1] * len(after)
    engine.model.calls = 0
    reply = chat.Reply(engine, [tok.bos_id], max_new_tokens=40, temperature=0.0, top_k=0)
    assert "".join(reply) == "So <<6*7=42>> done" and reply.finish_reason == "stop"


def test_real_generate_stops_at_bos(tiny_chat_model):
    model, tok = tiny_chat_model
    written = [*tok.encode("It is 42."), tok.bos_id]
    engine = Engine(Steered(model, written + tok.encode(" Then more.")), tok)
    [[(tokens, mask)]] = engine.generate_batch([[tok.bos_id]], max_new_tokens=30, temperature=1.0, seed=0)
    assert tokens == written and mask == [1] * len(written)
    engine.model.calls = 0
    reply = chat.Reply(engine, [tok.bos_id], max_new_tokens=30, temperature=0.0, top_k=0)
    assert "".join(reply) == "It is 42." and reply.finish_reason == "stop" and reply.num_tokens == len(written)


def test_real_server_openai_client(tiny_chat_model):
    openai = pytest.importorskip("openai")
    model, tok = tiny_chat_model
    # the tiny GPT steered to a known reply: what the client receives is checked against it, token for token
    s = tok.special
    before, after = [*tok.encode("It is "), s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")], [
        *tok.encode(" so."), s("<|assistant_end|>")]
    forced = [s("<|output_start|>"), *tok.encode("42"), s("<|output_end|>")]  # the calculator's, not steered
    steered = Steered(model, before + [0] * len(forced) + after)
    server = chat.ChatServer(Engine(steered, tok), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=30)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}]
        completion = client.chat.completions.create(model="picochat", messages=messages, max_tokens=40, seed=0)
        assert completion.choices[0].message.content == "It is <<6*7=42>> so."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage.completion_tokens == len(before + forced + after)  # forced tokens count too
        assert completion.usage.prompt_tokens == len(tok.render_for_completion(messages))
        # the smallest temperature and top_p the API accepts round to 0 in float32: greedy, not NaN and HTTP 500
        steered.calls = 0
        tiny = client.chat.completions.create(model="picochat", messages=messages, max_tokens=40, temperature=5e-324,
                                              top_p=1e-46)
        assert tiny.choices[0].message.content == "It is <<6*7=42>> so."
        steered.calls = 0
        chunks = list(client.chat.completions.create(model="picochat", messages=messages, max_tokens=40,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is <<6*7=42>> so."
        assert chunks[-1].choices[0].finish_reason == "stop"
        steered.calls = 0
        assert len(tok.encode("It is ")) >= 2
        short = client.chat.completions.create(model="picochat", messages=messages, max_tokens=2)
        assert short.choices[0].message.content == tok.decode(before[:2])
        assert short.choices[0].finish_reason == "length"
        # cut inside the calculator call: the call shows whole only when it closes, so what it had is held back
        # until the reply ends, and then sent
        steered.calls = 0
        n = len(tok.encode("It is ")) + 2  # the text, <|python_start|> and the call's first token
        cut = client.chat.completions.create(model="picochat", messages=messages, max_tokens=n)
        assert cut.choices[0].message.content == "It is <<" + tok.decode(before[n - 1:n])
        assert cut.choices[0].finish_reason == "length"
    finally:
        server.shutdown()
        server.server_close()


def test_real_terminal_chat_subprocess(tiny_chat_model, tmp_base_dir):
    r = run_chat(["--max_new_tokens=5"], stdin="What is 6*7?\n/clear\nhello\nand then?\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded sft model" in r.stdout and r.stdout.count("Assistant: ") == 3
    assert "(new conversation)" in r.stdout


def test_real_one_shot_prompt_and_source(tiny_chat_model, tmp_base_dir, one_thread, monkeypatch, capsys):
    # with an rl checkpoint present, the default source is rl; --prompt answers once and exits
    import shutil
    shutil.copytree(os.path.join(tmp_base_dir, "checkpoints", "sft"), os.path.join(tmp_base_dir, "checkpoints", "rl"))
    run_main(monkeypatch, "chat.py", "--device=cpu", "--prompt=What is 6*7?", "--max_new_tokens=5", "--temperature=0")
    assert "loaded rl model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --source must be base, sft, rl, hf:"):
        run_main(monkeypatch, "chat.py", "--source=gpt4")
    with pytest.raises(SystemExit, match="no base checkpoint"):
        run_main(monkeypatch, "chat.py", "--device=cpu", "--source=base")
