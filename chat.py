"""
Talk to a trained picochat model: a terminal chat, a one-shot answer, or a web server with a chat page and an
OpenAI-compatible API. The model can use a calculator: when it writes <|python_start|>expr<|python_end|>, the
expression is evaluated in a sandbox and the result is forced in as <|output_start|>result<|output_end|>.

    python chat.py                                  # chat in the terminal (the rl model if there is one, else sft)
    python chat.py --source=sft --prompt="What is 12*7?"   # answer once and exit
    python chat.py --serve=1 --port=8000            # chat page at http://127.0.0.1:8000/, API at /v1
    python chat.py --serve=1 --host=0.0.0.0 --api_key=KEY --allow_origin=https://app.example   # for others
    python chat.py --quantize=int8                  # weights stored int8 (int4: smaller still), de-quantized on the fly

In the terminal, /clear starts a new conversation and /quit (or Ctrl-D) exits; Ctrl-C stops an answer. The server
answers POST /v1/chat/completions (streaming or not), GET /v1/models and GET /health, and works with the official
clients:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="picochat", messages=[{"role": "user", "content": "Hi!"}])

The server is this machine's by default: pages of other sites, other host names (DNS rebinding) and POSTs that are
not JSON are refused (see ChatHandler).

In replies, a calculator call is shown inline as <<expr=result>> (GSM8K's notation), or <<expr>> when the
sandbox refused the expression. Assistant messages sent back to the server are read the same way, so a
multi-turn conversation reaches the model exactly as it was generated.

Generation, the calculator included, is model.py's Engine; this file only turns its tokens into text for people.
The chat page is chat.html, next to this file.
"""

import glob
import hmac
import http
import ipaddress
import json
import os
import queue
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import common
from model import QUANT_FORMATS, Engine, quantize_model

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = ""  # base|sft|rl, or an open model: hf:<org>/<name> or a folder; "" = rl when an rl checkpoint
             # exists, else sft
model_tag = ""  # "" = the most recently saved model of that stage
step = -1  # -1 = its latest step
device = ""  # cuda|mps|cpu; "" = the best available
compile_generate = False  # decode through a torch.compile'd step (model.generate's compile): the first reply
                          # waits tens of seconds on a CPU while it compiles; later ones are faster
dtype = ""  # the weights: bfloat16|float32; "" = bfloat16 on CUDA and AMX CPUs, float32 elsewhere
quantize = ""  # int8|int4: the weights stored quantized at load time, a quarter or an eighth of fp32's memory
temperature = 0.6
top_k = 50
max_new_tokens = 512
prompt = ""  # answer this one message and exit
serve = False  # run the web server instead of the terminal chat
host = "127.0.0.1"  # 0.0.0.0 to serve other machines
port = 8000
# what one API request may ask for; anything more is answered with HTTP 400 (413 for the body)
max_body_bytes = 1_000_000
max_messages = 100
max_message_chars = 16_000  # all messages of a request together
max_tokens_limit = 2048
max_temperature = 2.0
max_connections = 64  # requests answered at once, streams included; one more gets HTTP 503 (a client still sending
                      # its request does not count: slow senders cannot lock the others out)
allow_origin = ""  # origins whose pages may use the server, comma-separated (https://app.example), or *; their
                   # host names are then accepted in the Host header too. "": only this server's own page
api_key = ""  # when set, /v1/ requests must send "Authorization: Bearer <api_key>" (the OpenAI clients' api_key)

# -----------------------------------------------------------------------------
# One reply as text, for the terminal and the server. Tool calls are shown inline as <<expr=result>>.

TOOL_CALL = re.compile(r"<<([^<>=]*)(?:=([^<>]*))?>>")


def message_parts(text):
    """An assistant message's text, with <<expr=result>> read back into the calculator parts it shows."""
    parts, pos = [], 0
    for m in TOOL_CALL.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        if m.group(2) is not None:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts if any(p["type"] != "text" for p in parts) else text


class Reply:
    """One assistant reply being generated. Iterating yields its text piece by piece; afterwards `.text`,
    `.parts` (the message for the conversation history, from the tokens: stop strings cut only the text),
    `.num_tokens` and `.finish_reason` ("stop": the model ended its turn or a stop string appeared; "length":
    max_new_tokens ran out) describe it. abandoned() is asked before the first step and between steps: once it
    says True (the client has gone) generation stops there."""

    def __init__(self, engine, prompt_ids, max_new_tokens, temperature, top_k, top_p=1.0, seed=None, stop=(),
                 abandoned=lambda: False):
        self.engine, self.prompt_ids, self.stop = engine, prompt_ids, [s for s in stop if s]
        self.abandoned = abandoned
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        self.text, self.parts, self.num_tokens, self.finish_reason = "", [], 0, "length"
        self._kind, self._tokens, self._shown = "text", [], ""  # the part being written and its text so far
        self._in_call = False  # after <|python_end|>, until the output starts (or turns out to be absent)

    def _close_part(self):
        """End the part being written; returns the text of it that was held back. A call and its result show
        whole: the expression as the tokenizer's family writes it (Qwen3: inside a JSON tool call), the result
        without the line breaks around it."""
        rest = ""
        if self._tokens:
            full = self.engine.tokenizer.decode(self._tokens)
            if self._kind == "python":
                full = self.engine.tokenizer.tool_call(full) or full
            elif self._kind == "python_output":
                full = full.strip()
            rest = full[len(self._shown):]
            self.parts.append({"type": self._kind, "text": full})
        self._kind, self._tokens, self._shown = "text", [], ""
        return rest

    def _feed(self, token, forced):
        """Add one generated token (forced: put in by the engine); returns the text it adds to the display."""
        e = self.engine
        out = ""
        if self._in_call and not forced and token != e.output_start:  # no result: the call shows as <<expr>>
            out, self._in_call = ">>", False
        if token == e.python_start:
            out += self._close_part() + "<<"
            self._kind = "python"
        elif token == e.python_end:
            out += self._close_part()
            self._in_call = True
        elif token == e.output_start:
            out += self._close_part() + "="
            self._kind, self._in_call = "python_output", False
        elif token == e.output_end:
            out += self._close_part() + ">>"
        elif forced and self._kind != "python_output":
            pass  # the frame of a forced result (Qwen3's end of turn and tool turn): not the reply's text
        else:
            self._tokens.append(token)
            if self._kind != "text":
                return out  # a call or a result shows whole, when it closes
            # a character split across tokens decodes as U+FFFD until its last byte arrives: hold it back
            shown = e.tokenizer.decode(self._tokens).rstrip("\ufffd")
            if shown.startswith(self._shown):
                out += shown[len(self._shown):]
                self._shown = shown
        return out

    def __iter__(self):
        steps = self.engine.generate([self.prompt_ids], **self.sampling)
        sent = 0  # how much of self.text was yielded
        hold = max((len(s) - 1 for s in self.stop), default=0)  # text that could be the start of a stop string
        cut = False
        try:
            for entries in steps if not self.abandoned() else ():
                if entries[0] is None:
                    break
                token, forced = entries[0]
                self.num_tokens += 1
                if token in self.engine.stop_tokens and not forced:
                    self.finish_reason = "stop"
                    break
                self.text += self._feed(token, forced)
                hits = [i for i in (self.text.find(s, max(0, sent - len(s))) for s in self.stop) if i >= 0]
                if hits:
                    self.text, self.finish_reason, cut = self.text[:min(hits)], "stop", True
                    break
                if len(self.text) - hold > sent:
                    yield self.text[sent:len(self.text) - hold]
                    sent = len(self.text) - hold
                if self.abandoned():
                    break
        finally:
            steps.close()
        rest = self._close_part() + (">>" if self._in_call else "")
        if not cut:
            self.text += rest
        if len(self.text) > sent:
            yield self.text[sent:]

# -----------------------------------------------------------------------------
# The web server: the chat page (chat.html), the OpenAI-compatible API (/v1/chat/completions, /v1/models) and
# /health.

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number(request, name, default, low, high, integer=False):
    value = request.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if type(value) is bool or not isinstance(value, kind) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'} from {low} to {high}",
                       name)
    return value


def read_chat_request(body):
    """Check the JSON body of a chat completion. Returns (conversation, options) or raises ApiError."""
    try:
        request = json.loads(body)
    except ValueError:  # also bytes that are not UTF-8
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"at most {max_messages} messages are allowed, got {len(messages)}", "messages")
    conversation, chars = [], 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI's content parts; only text ones exist here
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' (system, user or assistant) and "
                                "a text 'content'", f"messages[{i}]")
        # the chat format: an optional system message, then user and assistant taking turns
        expected = ("user", "assistant")[(i - (messages[0].get("role") == "system")) % 2]
        if role != expected and not (i == 0 and role == "system"):
            raise ApiError(400, f"messages[{i}] is from the {role}, but after an optional system message the user "
                                "and the assistant must take turns, starting with the user", f"messages[{i}]")
        chars += len(content)
        conversation.append({"role": role, "content": message_parts(content) if role == "assistant" else content})
    if chars > max_message_chars:
        raise ApiError(400, f"the messages hold {chars} characters; at most {max_message_chars} are allowed",
                       "messages")
    if conversation[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    if request.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    top_p = _number(request, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    max_tokens_name = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
    seed = _number(request, "seed", None, -2**63, 2**63 - 1, integer=True)
    options = dict(
        max_new_tokens=_number(request, max_tokens_name, min(max_new_tokens, max_tokens_limit), 1, max_tokens_limit,
                               integer=True),
        temperature=_number(request, "temperature", temperature, 0.0, max_temperature),
        top_p=top_p, seed=seed, stop=stop, stream=stream)
    return conversation, options


def error_body(status, message, param=None, code=None):
    """OpenAI's error object, the body of every error the server sends."""
    return {"error": {"message": message, "param": param, "code": code,
                      "type": "invalid_request_error" if status < 500 else "server_error"}}


def allowed_origins():
    """The --allow_origin setting as a set of origins ("scheme://host[:port]"), or {"*"}."""
    origins = {o.strip().rstrip("/") for o in allow_origin.split(",") if o.strip()}
    for origin in origins - {"*"}:
        if not re.fullmatch(r"https?://[^/\s?#]+", origin):
            raise SystemExit(f"error: --allow_origin takes origins like https://app.example or http://localhost:3000 "
                             f"(comma-separated), or *; got {origin!r}")
    return origins


class ChatServer(ThreadingHTTPServer):
    """The HTTP server around one Engine. Every request has its own thread, and one more thread runs the model:
    it generates the replies one at a time, in order of arrival (on a CPU, parallel requests would only share the
    same cores; a GPU server wanting throughput would run a pool of model replicas instead). A request's thread
    waits for the pieces of its reply and writes them to its own client, so no socket write ever holds up the
    model: a slow reader slows only itself. The model thread drops a reply whose client has gone, before it starts
    and between two steps. The listen backlog is deep enough for a burst of clients."""

    request_queue_size = 128

    def __init__(self, engine, host="127.0.0.1", port=8000, model_name="picochat"):
        super().__init__((host, port), ChatHandler)
        self.engine, self.model_name, self.host = engine, model_name, host
        self.jobs = queue.Queue()  # (Reply, the queue its pieces go to), in order of arrival; None ends the thread
        self.answering, self.answering_lock = 0, threading.Lock()  # requests being answered, for max_connections
        with open(PAGE_PATH, encoding="utf-8") as f:
            self.page = f.read().encode()
        threading.Thread(target=self.generate_forever, daemon=True).start()

    def generate_forever(self):
        """The model's thread: each reply's pieces go to its queue, then None; an error goes there instead."""
        while (job := self.jobs.get()) is not None:
            reply, pieces = job
            try:
                for piece in reply:  # in the weights' dtype, no autocast (see the end of this file)
                    pieces.put(piece)
                pieces.put(None)
            except Exception as error:  # the request's thread answers with it
                pieces.put(error)

    def server_close(self):
        super().server_close()
        self.jobs.put(None)

    def host_allowed(self, host):
        """Whether a Host header names this server: localhost, an IP address, --host, or the host of an allowed
        origin. Any other name is how DNS rebinding reaches a local server (a page's own name, pointed at
        127.0.0.1), so it is refused."""
        name = urllib.parse.urlsplit("//" + host).hostname or ""
        origins = allowed_origins()
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return "*" in origins or name in ("localhost", self.host.lower()) or \
                name in {urllib.parse.urlsplit(o).hostname for o in origins}


PATHS = ("/", "/health", "/v1/models", "/v1/chat/completions")


class ChatHandler(BaseHTTPRequestHandler):
    """One HTTP request. Every failure becomes a JSON error in OpenAI's shape and never reaches the server.

    Who may ask: a browser page from elsewhere may not drive the local model (its Origin must be this server's or
    an --allow_origin one), a request must name this server as its Host (DNS rebinding), a POST must be
    application/json (which a page cannot send elsewhere without asking first, CORS's preflight), and with
    --api_key the API wants it as a Bearer token."""

    server_version = "picochat"
    timeout = 60  # seconds a client may stall mid-request, or leave a reply unread, before its thread gives up

    def do_GET(self):
        self._handle({"/": self._page, "/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._handle({"/v1/chat/completions": self._chat_completions})

    def do_OPTIONS(self):
        self._handle({path: self._preflight for path in PATHS})

    def do_other(self):
        self._handle({})  # a JSON 405 on the known paths, 404 elsewhere (http.server would answer 501 in HTML)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_TRACE = do_CONNECT = do_other

    def _handle(self, routes):
        self.streaming, self.gone, counted = False, False, False
        try:
            with self.server.answering_lock:
                counted = self.server.answering < max_connections
                self.server.answering += counted
            if not counted:
                raise ApiError(503, f"the server is answering {max_connections} requests already; try again later",
                               code="server_busy")
            path = self.path.split("?", 1)[0]
            self._check_access(path)
            if path in routes:
                routes[path]()
            elif path in PATHS:
                raise ApiError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
            else:
                raise ApiError(404, f"unknown path {path}", code="not_found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = self.gone = True  # the client went away or stalled: nobody to answer
        except Exception as error:
            if not isinstance(error, ApiError):
                self.log_error("%s", f"{type(error).__name__}: {error}")
                error = ApiError(500, f"internal error: {type(error).__name__}", code="internal_error")
            body = error_body(error.status, error.message, error.param, error.code)
            try:
                if self.streaming:  # the 200 is already sent: the error travels as an event
                    self._event(body)
                else:
                    self._json(body, error.status)
            except OSError:
                self.close_connection = self.gone = True
        finally:
            with self.server.answering_lock:
                self.server.answering -= counted

    def _check_access(self, path):
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if host is not None and not self.server.host_allowed(host):
            raise ApiError(403, f"Host {host!r} is not this server's name; to serve under it, start the server with "
                                f"--allow_origin=http://{host}", code="forbidden")
        if origin is not None and not self._origin_allowed(origin):
            raise ApiError(403, f"pages from {origin} may not use this server; to allow them, start it with "
                                f"--allow_origin={origin}", code="forbidden")
        key = f"Bearer {api_key}"
        if api_key and path.startswith("/v1/") and self.command != "OPTIONS" and \
                not hmac.compare_digest(self.headers.get("Authorization", "").encode(), key.encode()):
            raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _origin_allowed(self, origin):
        origins = allowed_origins()
        return origin == f"http://{self.headers.get('Host')}" or "*" in origins or origin in origins

    def _cross_origin(self):
        """The request's Origin when it is another site that --allow_origin lets in (it gets the CORS headers)."""
        origin = getattr(self, "headers", None) and self.headers.get("Origin")
        if origin and origin != f"http://{self.headers.get('Host')}" and self._origin_allowed(origin):
            return origin
        return None

    def end_headers(self):
        if self._cross_origin():  # every answer to an allowed page carries them, errors included
            self.send_header("Access-Control-Allow-Origin", self._cross_origin())
            self.send_header("Vary", "Origin")
        super().end_headers()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, a URI or headers too long, an unknown method, an
        HTTP version it does not speak) in the API's JSON shape, not the standard library's HTML page."""
        status = http.HTTPStatus(code)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the request line was not understood: answer in HTTP/1.0 anyway
            self.request_version = "HTTP/1.0"
        data = json.dumps(error_body(code, message or status.phrase, code=status.name.lower())).encode()
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send(self, status, content_type, data):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the body, never the body
            self.wfile.write(data)

    def _json(self, obj, status=200):
        self._send(status, "application/json", json.dumps(obj).encode())

    def _event(self, obj):
        self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def _page(self):
        self._send(200, "text/html; charset=utf-8", self.server.page)

    def _health(self):
        self._json({"status": "ok"})

    def _models(self):
        self._json({"object": "list", "data": [{"id": self.server.model_name, "object": "model", "created": 0,
                                                "owned_by": "picochat"}]})

    def _preflight(self):
        """CORS's preflight: an allowed page asks before it POSTs JSON (other origins were refused already)."""
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self._cross_origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.end_headers()

    def _read_body(self):
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                           code="unsupported_media_type")
        # the size is checked before reading: an oversize body is refused without being received
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, "Content-Length must be a number of bytes")
        if int(length) > max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; at most {max_body_bytes} are allowed",
                           code="request_too_large")
        return self.rfile.read(int(length))

    def _client_gone(self):
        """Whether this request's client has gone: a write to it failed, or it hung up (its socket reads as end
        of file; its request was read in full, so nothing more is expected from it). The model thread asks between
        two steps: a select and a peek, no waiting."""
        if self.gone:
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _reply_pieces(self, reply):
        """The reply's text pieces as the model thread makes them; an error there is raised here."""
        pieces = queue.Queue()
        self.server.jobs.put((reply, pieces))
        while (piece := pieces.get()) is not None:
            if isinstance(piece, Exception):
                raise piece
            yield piece

    def _chat_completions(self):
        conversation, options = read_chat_request(self._read_body())
        engine = self.server.engine
        prompt_ids = engine.prompt_ids(conversation)
        room = engine.model.config.sequence_len - len(prompt_ids)
        if room <= 0:
            raise ApiError(400, f"the conversation is {len(prompt_ids)} tokens long, longer than the model's "
                                f"context of {engine.model.config.sequence_len}", "messages", "context_length_exceeded")
        stream = options.pop("stream")
        options["max_new_tokens"] = min(options["max_new_tokens"], room)
        reply = Reply(engine, prompt_ids, top_k=top_k, abandoned=self._client_gone, **options)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.model_name}
        if not stream:
            for _ in self._reply_pieces(reply):
                pass
            self._json({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply.text},
                 "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": reply.num_tokens,
                          "total_tokens": len(prompt_ids) + reply.num_tokens}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream's end is the connection's end
        self.streaming = True

        def chunk(delta, finish_reason=None):
            self._event({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
        chunk({"role": "assistant", "content": ""})
        for piece in self._reply_pieces(reply):
            chunk({"content": piece})
        chunk({}, reply.finish_reason)
        self._event("[DONE]")

# -----------------------------------------------------------------------------
# The terminal chat


def respond(engine, conversation):
    """Print the assistant's answer to the conversation as it streams; returns the Reply (None: no room left)."""
    prompt_ids = engine.prompt_ids(conversation)
    room = engine.model.config.sequence_len - len(prompt_ids)
    if room <= 0:
        print("(the conversation no longer fits the model's context: /clear starts a new one)")
        return None
    reply = Reply(engine, prompt_ids, min(max_new_tokens, room), temperature, top_k)
    for piece in reply:
        print(piece, end="", flush=True)
    print()
    return reply


def terminal_chat(engine):
    print("picochat: type a message; /clear starts a new conversation, /quit or Ctrl-D exits")
    conversation = []
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "/quit":
            return
        if line == "/clear":
            conversation = []
            print("(new conversation)")
            continue
        if not line:
            continue
        conversation.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        try:
            reply = respond(engine, conversation)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat
            print("\n(interrupted)")
            reply = None
        if reply is None:
            conversation.pop()
            continue
        tool_used = any(p["type"] != "text" for p in reply.parts)
        conversation.append({"role": "assistant",
                             "content": reply.parts if tool_used else "".join(p["text"] for p in reply.parts)})


if __name__ == "__main__":
    common.configure(globals())
    folder = common.open_model_dir(source)
    if source not in ("", "base", "sft", "rl") and folder is None:
        raise SystemExit(f"error: --source must be base, sft, rl, hf:<org>/<name> or a model folder, got {source!r}")
    if not 0 <= port <= 65535:
        raise SystemExit(f"error: --port must be from 0 to 65535 (0: any free port), got {port}")
    allowed_origins()  # a malformed --allow_origin is refused before the model loads
    if not source:
        source = "rl" if glob.glob(os.path.join(common.get_base_dir(), "checkpoints", "rl", "*", "meta_*.json")) \
            else "sft"
    if quantize not in ("", *QUANT_FORMATS):
        raise SystemExit(f"error: --quantize must be {' or '.join(QUANT_FORMATS)}, got {quantize!r}")
    _, _, _, _, torch_device = common.setup_device(device)
    # generation runs in the weights' own dtype: bf16 autocast would cast every weight at every decoded token
    # (measured 2.1x slower per token than fp32 weights at Qwen3-0.6B's shape on a CPU, README.md)
    weights = torch.bfloat16 if common.resolve_dtype(torch_device, dtype) == "bfloat16" else torch.float32
    model, tokenizer, meta = common.load_model(source, torch_device, model_tag, step, weights)
    if quantize:
        try:
            quantize_model(model, quantize)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    engine = Engine(model, tokenizer, compile_generate)
    name = os.path.basename(folder) if folder else f"picochat-{source}"
    if serve:
        try:
            server = ChatServer(engine, host, port, model_name=name)
        except OSError as e:  # the port is taken, or the host is not this machine's
            raise SystemExit(f"error: cannot serve on {host}:{port}: {e.strerror}") from None
        common.print0(f"serving {name} on http://{host}:{server.server_address[1]}/ "
                      f"(API: /v1/chat/completions, /v1/models, /health)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.server_close()
    elif prompt:
        respond(engine, [{"role": "user", "content": prompt}])
    else:
        terminal_chat(engine)
