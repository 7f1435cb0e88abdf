"""
Talk to a trained picochat model: a terminal chat, a one-shot answer, or a web server with a chat page and an
OpenAI-compatible API. The model can use a calculator: when it writes <|python_start|>expr<|python_end|>, the
expression is evaluated in a sandbox and the result is forced in as <|output_start|>result<|output_end|>.

    python chat.py                                  # chat in the terminal (the rl model if there is one, else sft)
    python chat.py --source=sft --prompt="What is 12*7?"   # answer once and exit
    python chat.py --serve=1 --port=8000            # chat page at http://127.0.0.1:8000/, API at /v1

In the terminal, /clear starts a new conversation and /quit (or Ctrl-D) exits; Ctrl-C stops an answer. The server
answers POST /v1/chat/completions (streaming or not), GET /v1/models and GET /health, and works with the official
clients:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="picochat", messages=[{"role": "user", "content": "Hi!"}])

In replies, a calculator call is shown inline as <<expr=result>> (GSM8K's notation), or <<expr>> when the
sandbox refused the expression. Assistant messages sent back to the server are read the same way, so a
multi-turn conversation reaches the model exactly as it was generated.

The same Engine generates for rl.py and evaluate.py:

    engine = Engine(model, tokenizer)
    engine.generate_batch([tokenizer.render_for_completion(messages)], num_samples=8, max_new_tokens=256)
    # -> per prompt, per sample: (tokens, mask), mask 0 on the forced calculator outputs; a reply that ended
    #    its turn ends with <|assistant_end|> (or <|bos|>)
"""

import ast
import glob
import json
import math
import os
import re
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


import common
from model import generate

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = ""  # base|sft|rl; "" = rl when an rl checkpoint exists, else sft
model_tag = ""  # "" = the most recently saved model of that stage
step = -1  # -1 = its latest step
device = ""  # cuda|mps|cpu; "" = the best available
dtype = ""  # bfloat16|float32; "" = bfloat16 on CUDA and AMX CPUs, float32 elsewhere
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

# -----------------------------------------------------------------------------
# The calculator. Arithmetic only: the expression is parsed with `ast` and evaluated by walking the tree, never
# by eval(), so names, attributes, calls, subscripts, strings, lambdas and comprehensions cannot run at all.
# Every intermediate value must stay within ±10**100 and an exponent within ±100 (checked before computing the
# power), so an expression of at most 200 characters is at most ~100 cheap operations on small numbers: its
# time is bounded by construction. Anything refused or failing (syntax, division by zero, too large) returns
# None, and then nothing is forced: the model goes on writing by itself.

CALC_MAX_CHARS = 200
CALC_MAX_DIGITS = 100
CALC_MAX_VALUE = 10**CALC_MAX_DIGITS
CALC_MAX_EXPONENT = 100


def _power(base, exponent):
    # compute the size of the result from logarithms first: 9**9**9 must be refused, not attempted
    if abs(exponent) > CALC_MAX_EXPONENT:
        raise ValueError("exponent too large")
    if base != 0 and abs(exponent * math.log10(abs(base))) > CALC_MAX_DIGITS:
        raise ValueError("power too large")
    return base ** exponent


_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}
_UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and complex are not numbers here
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        value = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise ValueError(f"{type(node).__name__} is not allowed")
    # `not <=` also catches nan and inf; a complex number (a negative base to a fractional power) fails the type
    if type(value) not in (int, float) or not abs(value) <= CALC_MAX_VALUE:
        raise ValueError("result out of range")
    return value


def format_number(x):
    """Integers as integers; floats with 6 significant digits (all the digits of the integer part are kept) and
    no trailing zeros; scientific notation only for very small or very large floats."""
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if not 1e-4 <= abs(x) < 1e15:
        return f"{x:.6g}"
    decimals = max(0, 5 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}".rstrip("0").rstrip(".")


def calculator(expr):
    """Evaluate an arithmetic expression in the sandbox: the result as text, or None if refused or failing."""
    if not isinstance(expr, str) or len(expr) > CALC_MAX_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for `1if`: a refusal, not news
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
        return format_number(_evaluate(tree.body))
    except Exception:  # nothing is executed, so every failure (SyntaxError, ZeroDivisionError, ...) means "no result"
        return None

# -----------------------------------------------------------------------------
# The generation engine: model.generate with the calculator forced in, shared by chat, rl.py and evaluate.py.


class Engine:
    """Generates assistant replies with the calculator tool.

    generate() streams: it yields once per decoding step a list with one entry per row (prompt-major: the
    num_samples rows of prompt 0, then of prompt 1, ...), each `(token, forced)` or None once the row has
    finished. A row finishes after <|assistant_end|> or <|bos|>, which are yielded (and kept by generate_batch):
    RL learns to end its answers only if the end token is among the tokens it trains on."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.python_start, self.python_end, self.output_start, self.output_end, self.assistant_end = (
            tokenizer.special(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                 "<|output_end|>", "<|assistant_end|>"))
        self.stop_tokens = (self.assistant_end, tokenizer.bos_id)

    def prompt_ids(self, prompt):
        """A prompt is token ids (from render_for_completion) or a conversation: a list of messages or
        {"messages": [...]}, rendered up to the assistant's turn."""
        if isinstance(prompt, dict):
            prompt = prompt["messages"]
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.render_for_completion(prompt)
        return list(prompt)

    def tool_output(self, row, generated):
        """model.generate's `force` hook: after a sampled <|python_end|>, the calculator's answer to the
        expression since the last <|python_start|>, as tokens to force in (None: nothing to force)."""
        if not generated or generated[-1] != self.python_end or self.python_start not in generated:
            return None
        start = len(generated) - 1 - generated[::-1].index(self.python_start)
        result = calculator(self.tokenizer.decode(generated[start + 1:-1]))
        if result is None:
            return None
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]

    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, tools=True):
        # the samples of a prompt are identical rows, and model.generate prefills identical rows once
        rows = [ids for ids in map(self.prompt_ids, prompts) for _ in range(num_samples)]
        yield from generate(self.model, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=self.stop_tokens, seed=seed, force=self.tool_output if tools else None)

    def generate_batch(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                       seed=None, tools=True):
        """Per prompt, per sample: (tokens, mask) of the generated reply, ending with the stop token when one
        was generated within max_new_tokens; mask is 0 on forced calculator outputs, 1 on sampled tokens."""
        rows = [([], []) for _ in range(len(prompts) * num_samples)]
        for step_tokens in self.generate(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed,
                                         tools):
            for (tokens, mask), entry in zip(rows, step_tokens):
                if entry is not None:
                    tokens.append(entry[0])
                    mask.append(0 if entry[1] else 1)
        return [rows[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

# -----------------------------------------------------------------------------
# One reply as text, for the terminal and the server. Tool calls are shown inline as <<expr=result>>.

def generation_context(device_type):
    # autocast is per thread, so each server thread enters its own
    return common.autocast(device_type, dtype)


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
    max_new_tokens ran out) describe it."""

    def __init__(self, engine, prompt_ids, max_new_tokens, temperature, top_k, top_p=1.0, seed=None, stop=()):
        self.engine, self.prompt_ids, self.stop = engine, prompt_ids, [s for s in stop if s]
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        self.text, self.parts, self.num_tokens, self.finish_reason = "", [], 0, "length"
        self._kind, self._tokens, self._shown = "text", [], ""  # the part being written and its text so far
        self._in_call = False  # after <|python_end|>, until the output starts (or turns out to be absent)

    def _close_part(self):
        """End the part being written; returns the text of it that was held back."""
        rest = ""
        if self._tokens:
            full = self.engine.tokenizer.decode(self._tokens)
            rest = full[len(self._shown):]
            self.parts.append({"type": self._kind, "text": full})
        self._kind, self._tokens, self._shown = "text", [], ""
        return rest

    def _feed(self, token):
        """Add one generated token; returns the text it adds to the display."""
        e = self.engine
        out = ""
        if self._in_call and token != e.output_start:  # the sandbox gave nothing: the call shows as <<expr>>
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
        else:
            self._tokens.append(token)
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
            for entries in steps:
                if entries[0] is None:
                    break
                token = entries[0][0]
                self.num_tokens += 1
                if token in self.engine.stop_tokens:
                    self.finish_reason = "stop"
                    break
                self.text += self._feed(token)
                hits = [i for i in (self.text.find(s, max(0, sent - len(s))) for s in self.stop) if i >= 0]
                if hits:
                    self.text, self.finish_reason, cut = self.text[:min(hits)], "stop", True
                    break
                if len(self.text) - hold > sent:
                    yield self.text[sent:len(self.text) - hold]
                    sent = len(self.text) - hold
        finally:
            steps.close()  # a client that went away stops the generation
        rest = self._close_part() + (">>" if self._in_call else "")
        if not cut:
            self.text += rest
        if len(self.text) > sent:
            yield self.text[sent:]

# -----------------------------------------------------------------------------
# The web server: the chat page, the OpenAI-compatible API (/v1/chat/completions, /v1/models) and /health.

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>picochat</title><link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 0 auto; padding: 1rem; height: 100vh;
       box-sizing: border-box; display: flex; flex-direction: column; }
#log { flex: 1; overflow-y: auto; }
.msg { white-space: pre-wrap; padding: .5rem .75rem; margin: .5rem 0; border-radius: .5rem; }
.user { background: #e3ecfd; margin-left: 4rem; }
.assistant { background: #f1f1f1; margin-right: 4rem; }
.error { color: #b00020; }
form { display: flex; gap: .5rem; }
textarea { flex: 1; font: inherit; padding: .5rem; resize: none; }
</style></head>
<body>
<h3>picochat</h3>
<div id="log"></div>
<form id="form">
  <textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter for a new line)" autofocus></textarea>
  <button id="send">Send</button><button type="button" id="clear">New chat</button>
</form>
<script>
const log = document.getElementById("log"), input = document.getElementById("input"),
      send = document.getElementById("send");
let messages = [];

function show(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

// read the server-sent events of a streaming completion, calling onText with each piece of the reply
async function stream(response, onText) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\\n\\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onText(chunk.choices[0].delta.content || "");
    }
  }
}

async function submit(event) {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || send.disabled) return;
  send.disabled = true;
  input.value = "";
  messages.push({role: "user", content: text});
  show("user", text);
  const div = show("assistant", "");
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({messages, stream: true})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    await stream(response, piece => { reply += piece; div.textContent = reply; log.scrollTop = log.scrollHeight; });
    messages.push({role: "assistant", content: reply});
  } catch (err) {
    messages.pop();  // the question stays on screen but leaves the history: the next one is asked afresh
    div.textContent = reply + " [error: " + err.message + "]";
    div.classList.add("error");
  }
  send.disabled = false;
  input.focus();
}

document.getElementById("form").addEventListener("submit", submit);
input.addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) submit(e); });
document.getElementById("clear").addEventListener("click", () => {
  messages = [];
  log.replaceChildren();
  input.focus();
});
// a link can ask the first question: /?q=What%20is%206*7%3F
const question = new URLSearchParams(location.search).get("q");
if (question) { input.value = question; submit(new Event("submit")); }
</script>
</body></html>
"""


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


class ChatServer(ThreadingHTTPServer):
    """The HTTP server around one Engine. Every request has its own thread, but generation is serialised by a
    lock: one model serves all requests, one at a time (on a CPU, parallel requests would only share the same
    cores; a GPU server wanting throughput would run a pool of model replicas instead). Waiting requests queue
    on the lock, and the listen backlog is deep enough for a burst of clients."""

    request_queue_size = 128

    def __init__(self, engine, host="127.0.0.1", port=8000, model_name="picochat", device="cpu"):
        super().__init__((host, port), ChatHandler)
        self.engine, self.model_name, self.device = engine, model_name, device
        self.lock = threading.Lock()


class ChatHandler(BaseHTTPRequestHandler):
    """One HTTP request. Every failure becomes a JSON error in OpenAI's shape and never reaches the server."""

    server_version = "picochat"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it

    def do_GET(self):
        self._handle({"/": self._page, "/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._handle({"/v1/chat/completions": self._chat_completions})

    def do_other(self):
        self._handle({})  # a JSON 405 on the known paths, 404 elsewhere (http.server would answer 501 in HTML)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_other

    def _handle(self, routes):
        self.streaming = False
        try:
            path = self.path.split("?", 1)[0]
            if path in routes:
                routes[path]()
            elif path in ("/", "/health", "/v1/models", "/v1/chat/completions"):
                raise ApiError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
            else:
                raise ApiError(404, f"unknown path {path}", code="not_found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled: nobody to answer
        except Exception as error:
            if not isinstance(error, ApiError):
                self.log_error("%s", f"{type(error).__name__}: {error}")
                error = ApiError(500, f"internal error: {type(error).__name__}", code="internal_error")
            body = {"error": {"message": error.message, "param": error.param, "code": error.code,
                              "type": "invalid_request_error" if error.status < 500 else "server_error"}}
            try:
                if self.streaming:  # the 200 is already sent: the error travels as an event
                    self._event(body)
                else:
                    self._json(body, error.status)
            except OSError:
                self.close_connection = True

    def _send(self, status, content_type, data):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, obj, status=200):
        self._send(status, "application/json", json.dumps(obj).encode())

    def _event(self, obj):
        self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def _page(self):
        self._send(200, "text/html; charset=utf-8", PAGE.encode())

    def _health(self):
        self._json({"status": "ok"})

    def _models(self):
        self._json({"object": "list", "data": [{"id": self.server.model_name, "object": "model", "created": 0,
                                                "owned_by": "picochat"}]})

    def _read_body(self):
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
        reply = Reply(engine, prompt_ids, top_k=top_k, **options)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.model_name}
        if not stream:
            with self.server.lock, generation_context(self.server.device):
                for _ in reply:
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
        with self.server.lock, generation_context(self.server.device):
            for piece in reply:
                chunk({"content": piece})
        chunk({}, reply.finish_reason)
        self._event("[DONE]")

# -----------------------------------------------------------------------------
# The terminal chat


def respond(engine, conversation, device_type):
    """Print the assistant's answer to the conversation as it streams; returns the Reply (None: no room left)."""
    prompt_ids = engine.prompt_ids(conversation)
    room = engine.model.config.sequence_len - len(prompt_ids)
    if room <= 0:
        print("(the conversation no longer fits the model's context: /clear starts a new one)")
        return None
    reply = Reply(engine, prompt_ids, min(max_new_tokens, room), temperature, top_k)
    with generation_context(device_type):
        for piece in reply:
            print(piece, end="", flush=True)
    print()
    return reply


def terminal_chat(engine, device_type):
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
            reply = respond(engine, conversation, device_type)
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
    if source not in ("", "base", "sft", "rl"):
        raise SystemExit(f"error: --source must be base, sft or rl, got {source!r}")
    if not source:
        source = "rl" if glob.glob(os.path.join(common.get_base_dir(), "checkpoints", "rl", "*", "meta_*.json")) \
            else "sft"
    _, _, _, _, torch_device = common.setup_device(device)
    model, tokenizer, meta = common.load_model(source, torch_device, model_tag, step)
    engine = Engine(model, tokenizer)
    if serve:
        try:
            server = ChatServer(engine, host, port, model_name=f"picochat-{source}", device=torch_device.type)
        except OSError as e:  # the port is taken, or the host is not this machine's
            raise SystemExit(f"error: cannot serve on {host}:{port}: {e.strerror}") from None
        common.print0(f"serving the {source} model on http://{host}:{server.server_address[1]}/ "
                      f"(API: /v1/chat/completions, /v1/models, /health)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.server_close()
    elif prompt:
        respond(engine, [{"role": "user", "content": prompt}], torch_device.type)
    else:
        terminal_chat(engine, torch_device.type)
