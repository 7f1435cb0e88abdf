"""model.py's tool-using generation: the calculator sandbox and the Engine (tool forcing, masks, stop tokens).

The Engine tests drive it with a scripted stand-in for model.generate (a byte-level fake tokenizer, and a "model"
that writes a fixed script), so what they check is exactly the Engine's part. test_chat.py uses the same fakes."""
import random
import time

import pytest

import model

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, PY_START, PY_END, OUT_START, OUT_END = range(9)
OFFSET = len(SPECIALS)  # byte b is token OFFSET + b

# -----------------------------------------------------------------------------
# Fakes: a byte-level tokenizer and a model that writes a script


class FakeTokenizer:
    bos_id = BOS
    vocab_size = OFFSET + 256

    def special(self, name):
        return SPECIALS.index(name)

    def encode(self, text):
        return [OFFSET + b for b in text.encode()]

    def decode(self, ids):
        out = bytearray()
        for t in ids:
            out += SPECIALS[t].encode() if t < OFFSET else bytes([t - OFFSET])
        return out.decode("utf-8", errors="replace")

    def tool_call(self, text):  # picochat's convention: the call is the expression
        return text

    def tool_output(self, result):
        return [OUT_START, *self.encode(result), OUT_END]

    def render_for_completion(self, messages):
        ids = [BOS]
        for m in messages:
            content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
            start, end = (USER_START, USER_END) if m["role"] != "assistant" else (ASSISTANT_START, ASSISTANT_END)
            ids += [start, *self.encode(content), end]
        return ids + [ASSISTANT_START]


def script(*pieces):
    """Tokens from text pieces and special token names."""
    tok = FakeTokenizer()
    return [t for p in pieces for t in ([SPECIALS.index(p)] if p in SPECIALS else tok.encode(p))]


class FakeModel:
    """Writes `reply` (tokens) whatever the prompt; sequence_len is what the server and terminal check."""

    class config:
        sequence_len = 4096

    def __init__(self, reply):
        self.reply = reply


def fake_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(), seed=None,
                  force=None, vocab_size=0, compile=False):
    """model.generate's protocol: per step one (token, forced) or None per row; a sampled stop token is yielded
    and ends its row; force(row, generated) after each token returns tokens to feed in next, yielded as forced."""
    rows = len(prompts)
    generated = [[] for _ in range(rows)]
    pending = [[] for _ in range(rows)]
    cursor = [0] * rows
    done = [False] * rows
    for _ in range(max_new_tokens):
        if all(done):
            return
        out = []
        for r in range(rows):
            if done[r]:
                out.append(None)
                continue
            if pending[r]:
                token, forced = pending[r].pop(0), True
            else:
                token, forced = model.reply[cursor[r] % len(model.reply)], False
                cursor[r] += 1
            generated[r].append(token)
            out.append((token, forced))
            if token in stop_tokens and not forced:
                done[r] = True
            elif force is not None:
                pending[r] += force(r, list(generated[r])) or []
        yield out


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(model, "generate", fake_generate)

    def make(*pieces):
        return model.Engine(FakeModel(script(*pieces)), FakeTokenizer())
    return make

# -----------------------------------------------------------------------------
# The calculator


@pytest.mark.parametrize("expr, result", [
    ("1+2", "3"), ("2**10", "1024"), ("10/4", "2.5"), ("10/2", "5"), ("1/3", "0.333333"), ("2/3", "0.666667"),
    ("7//2", "3"), ("-7 % 3", "2"), ("-2**2", "-4"), ("+3 - -4", "7"), ("(1 + 2) * (3 + 4)", "21"),
    ("0.1 + 0.2", "0.3"), ("2**-2", "0.25"), ("2**0.5", "1.41421"), ("1234.5 * 3", "3703.5"),
    ("12345678.9 * 1", "12345679"), ("1e-10", "1e-10"), ("10**100", str(10**100)), ("-0.0", "0"),
    (" 3 * 4 ", "12"), ("1_000 * 2", "2000"),
])
def test_calculator_values(expr, result):
    assert model.calculator(expr) == result


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('echo hi')", "().__class__", "().__class__.__bases__[0]",
    "x", "x + 1", "abs(-1)", "[1, 2]", "(1, 2)", "'a' * 3", "b'a'", "{1: 2}", "[1][0]", "lambda: 1",
    "(lambda: 1)()", "[x for x in range(10**9)]", "sum(range(10**12))", "1 if 1 else 2", "1 < 2", "1 and 2",
    "not 1", "~1", "1 << 2", "1 | 2", "True + 1", "1j", "9**9**9", "2**1000", "10**101", "(10**50)**3",
    "1e300", "1e200 * 1e200", "0**-1", "1/0", "5 % 0", "5 // 0", "(-8) ** (1/3)", "f'{1}'", "a := 1", "1;2",
    "import os", "", "   ", "1 +", "9" * 201, "1+" * 100 + "1", "(" * 300 + "1" + ")" * 300, "\x00", "1 = 1",
])
def test_calculator_refuses(expr):
    assert model.calculator(expr) is None


def test_calculator_fuzz():
    """Random soups of arithmetic, Python and junk tokens: never raises, never hangs, returns str or None."""
    rng = random.Random(1234)
    atoms = ["1", "0", "9", "2.5", "1e5", "-", "+", "*", "/", "//", "%", "**", "(", ")", " ", "x", "__import__",
             "'os'", ".", "__class__", "[", "]", ",", "lambda", ":", "for", "in", "range", "9**9", "**9", "(9",
             "\\", "\n", "{", "}", "=", "ééé", "\x00", "1_0", "e", "j", "True", "None", "...", "@", "|", "~"]
    start = time.time()
    for _ in range(500):
        expr = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 60)))
        result = model.calculator(expr)
        assert result is None or isinstance(result, str)
    assert time.time() - start < 5


def test_calculator_bounded_time():
    start = time.time()
    for expr in ["9**99**99", "99**100", "(10**100)*(10**100)", "2**100*2**100*2**100", "10**100//3**60"]:
        model.calculator(expr)
    assert time.time() - start < 1

# -----------------------------------------------------------------------------
# The Engine


def test_engine_forces_calculator_output(fake):
    engine = fake("It is ", "<|python_start|>", "6*7", "<|python_end|>", " so 42.", "<|assistant_end|>")
    [[(tokens, mask)]] = engine.generate_batch([[BOS, USER_START, USER_END, ASSISTANT_START]], max_new_tokens=100)
    tok = FakeTokenizer()
    expected = script("It is ", "<|python_start|>", "6*7", "<|python_end|>", "<|output_start|>", "42",
                      "<|output_end|>", " so 42.", "<|assistant_end|>")
    assert tokens == expected  # the stop token is kept: RL trains on ending the turn
    forced = [t for t, m in zip(tokens, mask) if m == 0]
    assert forced == [OUT_START, *tok.encode("42"), OUT_END]
    assert len(mask) == len(tokens) and set(mask) == {0, 1}


def test_engine_no_output_for_refused_expression(fake):
    engine = fake("<|python_start|>", "__import__('os')", "<|python_end|>", "no", "<|assistant_end|>")
    [[(tokens, mask)]] = engine.generate_batch([[BOS]], max_new_tokens=100)
    assert OUT_START not in tokens and all(mask)


def test_engine_tools_off_and_samples(fake):
    engine = fake("<|python_start|>", "1+1", "<|python_end|>", "<|assistant_end|>")
    results = engine.generate_batch([[BOS], [BOS, USER_START]], num_samples=3, max_new_tokens=50, tools=False)
    assert len(results) == 2 and all(len(samples) == 3 for samples in results)
    for samples in results:
        for tokens, mask in samples:
            assert OUT_START not in tokens and tokens[-1] == ASSISTANT_END and all(mask)


def test_engine_conversation_prompts_and_length(fake):
    engine = fake("abc")  # never ends its turn
    [[(tokens, mask)]] = engine.generate_batch([[{"role": "user", "content": "hi"}]], max_new_tokens=7)
    assert FakeTokenizer().decode(tokens) == "abcabca" and mask == [1] * 7
    assert engine.prompt_ids({"messages": [{"role": "user", "content": "hi"}]})[-1] == ASSISTANT_START


def test_engine_stops_at_bos(fake):
    # a model that goes on into the next document (a base model's way to end): <|bos|> ends the reply, kept as
    # <|assistant_end|> is
    engine = fake("42", "<|bos|>", "Question: more", "<|assistant_end|>")
    [[(tokens, mask)]] = engine.generate_batch([[BOS]], max_new_tokens=100)
    assert tokens == script("42", "<|bos|>") and mask == [1] * 3


def test_engine_streams_per_step(fake):
    engine = fake("ab", "<|assistant_end|>")
    steps = list(engine.generate([[BOS], [BOS]], max_new_tokens=10))
    assert [len(s) for s in steps] == [2, 2, 2]
    assert steps[-1] == [(ASSISTANT_END, False)] * 2
