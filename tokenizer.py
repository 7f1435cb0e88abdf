"""
Train, save and load picochat's byte-level BPE tokenizer, and render chats into tokens for training.

    python tokenizer.py                          # train on the built-in data (tinyworld), vocab 32768
    python tokenizer.py --vocab_size=4096 --data=path/to/texts   # .txt / .jsonl ("text") / .parquet, or a folder
    python tokenizer.py --max_digits=1           # every digit its own token (default: numbers in pairs)
    python tokenizer.py --eval=1                 # bytes per token of the saved tokenizer on held-out text

The trainer is plain Python + numpy and fast: documents are split into chunks with a GPT-4-style regex (in
parallel processes), identical chunks are counted once, and merges update only the chunks that contain the
merged pair, with a lazy max-heap of pair counts. The result is saved in tiktoken's own rank format, so
encoding and decoding run in tiktoken's Rust core:

    tokenizer/tokenizer.tiktoken   base64(token bytes) rank, one per line (special tokens excluded)
    tokenizer/tokenizer.json       {"pattern", "special_tokens", "vocab_size", "hash"}
    tokenizer/token_bytes.npy      int32 byte length of every token id, 0 for specials (for bits per byte)

In Python: tok = load_tokenizer(); tok.encode("hi"); tok.render_conversation(messages) -> (ids, mask).

An open model's tokenizer loads from its Hugging Face folder (tokenizer.json + config.json), with its family's
own chat format behind the same methods: load_tokenizer("path/to/Qwen3-0.6B-Base").
"""

import base64
import collections
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import time
import unicodedata

import numpy as np
import regex
import tiktoken

import common

def split_pattern(max_digits):
    """GPT-4's split pattern, but numbers in chunks of at most max_digits digits: no token holds more. nanochat
    measured 2 best for small vocabularies (fewer tokens are spent on memorising numbers); at 1 every digit is a
    token (as LLaMA splits them), so a number said in words is written one digit per word ("five hundred and two"
    -> 5 0 2), where pairs would fuse the hundreds with the tens ("50" "2")."""
    return (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,%d}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"""
            r"""|\s+(?!\S)|\s+""" % max_digits)


SPLIT_PATTERN = split_pattern(2)
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the calculator
    "<|output_start|>", "<|output_end|>",  # the calculator's answer, forced into the stream
]

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
vocab_size = 32768  # including the 256 bytes and the special tokens
data = ""  # a .txt/.jsonl/.parquet file or a folder of them; "" = the built-in data's pretraining shards
max_chars = 2_000_000_000  # train on at most this many characters in total
doc_cap = 10_000  # keep at most this many characters of each document
num_proc = 0  # processes for splitting text into chunks; 0 = all CPU cores
max_digits = 2  # numbers are split into chunks of at most this many digits before BPE (split_pattern)
eval = 0  # 1: instead of training, report bytes per token of the saved tokenizer on held-out text

# -----------------------------------------------------------------------------
# Chunk counting: regex-split documents and count identical chunks. The merge loop then works on unique
# chunks weighted by their counts, which is what makes a Python trainer fast.
#
# The split regex is the slow part, so it runs on unique *pieces* of text rather than on all of it. A space
# that follows a non-space character always starts a new chunk under the split pattern (no alternative can run
# from a non-space character into a following space, and the pattern never looks behind), so cutting the text
# before every such space and chunking the pieces separately gives exactly the chunks of the whole text.
# Cutting is a cheap stdlib `re` split (its \s is a superset of `regex`'s, so it never cuts where it must not).
# Pieces between two cuts start with a space and end with a non-space character, so any of them can also be
# concatenated without changing their chunks: all pieces seen n times are chunked in one regex call.

_CUT = re.compile(r" (?<=\S )")  # the space is consumed; every piece but a document's first starts with it


def _count_batch(texts, pattern):
    """Counter of the split pattern's chunks (str) over a list of documents, by way of their unique pieces."""
    inner, edges = collections.Counter(), collections.Counter()  # pieces between cuts; first/last pieces
    for text in texts:
        parts = _CUT.split(text)
        edges[parts[0]] += 1
        if len(parts) > 1:
            edges[" " + parts[-1]] += 1
            inner.update(parts[1:-1])
    findall = regex.compile(pattern).findall
    by_count = collections.defaultdict(list)
    for piece, n in inner.items():
        by_count[n].append(piece)
    counts = collections.Counter()
    for n, pieces in by_count.items():
        for chunk, k in collections.Counter(findall(" " + " ".join(pieces))).items():
            counts[chunk] += k * n
    for piece, n in edges.items():
        for chunk in findall(piece):
            counts[chunk] += n
    return counts


def _batches(texts, batch_chars):
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(texts, num_proc=0, batch_chars=1 << 22, pattern=SPLIT_PATTERN):
    """{chunk bytes: count} of the split pattern's chunks over an iterable of documents. Worker processes count
    batches of ~batch_chars characters while the main process reads on; at most 2 batches per worker are in
    flight, so memory stays bounded however long the stream."""
    num_proc = num_proc or os.cpu_count()
    batches = _batches(texts, batch_chars)
    first = next(batches, [])
    second = next(batches, None)
    if second is None:  # one batch: not worth starting processes
        counts = _count_batch(first, pattern)
    else:
        counts = collections.Counter()
        pending = collections.deque()
        # fork where there is one: a spawned worker would re-import this module, torch and all
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(num_proc) as pool:
            for batch in itertools.chain([first, second], batches):
                pending.append(pool.apply_async(_count_batch, (batch, pattern)))
                if len(pending) >= 2 * num_proc:
                    counts.update(pending.popleft().get())
            while pending:
                counts.update(pending.popleft().get())
    return {chunk.encode("utf-8", "surrogatepass"): n for chunk, n in counts.items()}

# -----------------------------------------------------------------------------
# The merge loop. Every chunk is a list of token ids; `stats` holds the weighted count of every adjacent pair
# and `where` the chunks each pair occurs in. A merge rewrites only the chunks in where[pair]. A pair's count
# only ever goes down, except for pairs with the brand-new token, so the max-heap is lazy: a popped entry whose
# count went down since it was pushed is pushed again with its current count (rustbpe's scheme).


def merge_chunks(chunk_counts, num_merges):
    """Learn up to `num_merges` merges from {chunk bytes: count}. Returns [(left_id, right_id), ...]; merge i
    makes token 256 + i. Ties go to the smallest pair (left id, then right id), so training is deterministic.
    Stops early when no pair occurs any more."""
    shift = (256 + num_merges).bit_length()  # a pair (a, b) is the int a << shift | b: cheap to hash and compare
    mask = (1 << shift) - 1
    words = [list(chunk) for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    stats = collections.defaultdict(int)
    where = collections.defaultdict(set)
    for i, (w, c) in enumerate(zip(words, weights)):
        for a, b in zip(w, w[1:]):
            key = a << shift | b
            stats[key] += c
            where[key].add(i)
    # heap entries are single ints: -count << 2*shift | pair, so the smallest is the highest count, then the
    # smallest pair
    cshift = 2 * shift
    heap = [key - (c << cshift) for key, c in stats.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    seen = set(token_bytes)
    merges = []
    while heap and len(merges) < num_merges:
        top = heapq.heappop(heap)
        key = top & ((1 << cshift) - 1)
        count = -(top >> cshift)
        current = stats.get(key, 0)
        if current != count:
            if current > 0:
                heapq.heappush(heap, key - (current << cshift))
            continue
        a, b = key >> shift, key & mask
        new_bytes = token_bytes[a] + token_bytes[b]
        if new_bytes in seen:
            # should two different pairs ever spell the same bytes, tiktoken's ranks (one per byte string) could
            # not hold both tokens: the later pair is never merged
            stats[key] = -1
            continue
        x = 256 + len(merges)
        merges.append((a, b))
        token_bytes.append(new_bytes)
        seen.add(new_bytes)
        born = collections.defaultdict(set)  # the new pairs (all contain x) -> the chunks they occur in
        for i in where.pop(key):
            w = words[i]
            n = len(w)
            c = weights[i]
            out = []
            j = 0
            while j < n:
                if w[j] == a and j + 1 < n and w[j + 1] == b:
                    if out:  # (left, a) becomes (left, x)
                        left = out[-1]
                        stats[left << shift | a] -= c
                        k = left << shift | x
                        stats[k] += c
                        born[k].add(i)
                    if j + 2 < n:  # (b, right) becomes (x, right)
                        right = w[j + 2]
                        stats[b << shift | right] -= c
                        k = x << shift | right
                        stats[k] += c
                        born[k].add(i)
                    out.append(x)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
        del stats[key]  # no (a, b) is left anywhere
        for k, chunks in born.items():
            where[k] = chunks
            if stats[k] > 0:
                heapq.heappush(heap, k - (stats[k] << cshift))
    return merges


def train_bpe(texts, vocab_size, num_proc=0, pattern=SPLIT_PATTERN):
    """Train on an iterable of documents. Returns the mergeable ranks {token bytes: id} (specials excluded)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and the "
                         f"{len(SPECIAL_TOKENS)} special tokens (at least {256 + len(SPECIAL_TOKENS)})")
    chunk_counts = count_chunks(texts, num_proc, pattern=pattern)
    if not chunk_counts:
        raise ValueError("no text to train the tokenizer on (the corpus is empty)")
    merges = merge_chunks(chunk_counts, vocab_size - 256 - len(SPECIAL_TOKENS))
    ranks = {bytes([i]): i for i in range(256)}
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
        ranks[token_bytes[-1]] = len(ranks)
    return ranks

# -----------------------------------------------------------------------------
# Saving and loading: tiktoken's rank format + a small JSON, all under get_base_dir()/tokenizer/


def default_dir():
    return os.path.join(common.get_base_dir(), "tokenizer")


def _file_hash(rank_text, meta):
    # the hash covers both files' content (the JSON without its own hash), so any change to either shows
    return hashlib.sha256((rank_text + json.dumps(meta, sort_keys=True)).encode("utf-8")).hexdigest()


def save_tokenizer(mergeable_ranks, directory=None, pattern=SPLIT_PATTERN):
    """Write tokenizer.tiktoken, token_bytes.npy and tokenizer.json (last: it makes the tokenizer complete), each
    atomically; the split pattern it was trained with is saved with it, and loading uses that one. Returns the
    directory."""
    directory = directory or default_dir()
    ranks = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
    rank_text = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks)
    n = len(ranks)
    meta = {
        "pattern": pattern,
        "special_tokens": {name: n + i for i, name in enumerate(SPECIAL_TOKENS)},
        "vocab_size": n + len(SPECIAL_TOKENS),
    }
    meta["hash"] = _file_hash(rank_text, meta)
    token_bytes = np.zeros(meta["vocab_size"], dtype=np.int32)
    token_bytes[:n] = [len(token) for token, _ in ranks]
    common.atomic_write_text(os.path.join(directory, "tokenizer.tiktoken"), rank_text)
    with common.atomic_path(os.path.join(directory, "token_bytes.npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, token_bytes)
    common.atomic_write_text(os.path.join(directory, "tokenizer.json"), json.dumps(meta, indent=2) + "\n")
    return directory


def load_tokenizer(directory=None):
    """picochat's tokenizer (default: the trained one), or an open model's from its Hugging Face folder."""
    directory = directory or default_dir()
    if not os.path.exists(os.path.join(directory, "tokenizer.tiktoken")) and \
            os.path.exists(os.path.join(directory, "config.json")):
        return load_hf_tokenizer(directory)
    names = ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy")
    paths = {name: os.path.join(directory, name) for name in names}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no tokenizer in {directory} (missing {', '.join(map(os.path.basename, missing))}); "
                                f"train one with: python tokenizer.py")
    redo = "; train one again with: python tokenizer.py"
    try:
        with open(paths["tokenizer.tiktoken"], encoding="ascii") as f:
            rank_text = f.read()
        with open(paths["tokenizer.json"], encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not text, not JSON
        raise ValueError(f"{directory}: cannot read the tokenizer ({type(e).__name__}: {e}){redo}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("pattern"), str) and isinstance(meta.get("vocab_size"), int)
            and isinstance(meta.get("special_tokens"), dict)):
        raise ValueError(f"{paths['tokenizer.json']} is not a picochat tokenizer.json (an object with pattern, "
                         f"special_tokens, vocab_size and hash){redo}")
    saved_hash = meta.pop("hash", None)
    if saved_hash != _file_hash(rank_text, meta):
        raise ValueError(f"{directory}: tokenizer.tiktoken and tokenizer.json do not match their hash (a partial "
                         f"or edited copy?){redo}")
    mergeable_ranks = {}
    for line in rank_text.splitlines():
        token, rank = line.split()
        mergeable_ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding(name=f"picochat-{saved_hash[:8]}", pat_str=meta["pattern"],
                            mergeable_ranks=mergeable_ranks, special_tokens=meta["special_tokens"],
                            explicit_n_vocab=meta["vocab_size"])
    try:
        token_bytes = np.load(paths["token_bytes.npy"], allow_pickle=False)  # never a pickle: it could run code
    except (OSError, ValueError) as e:
        raise ValueError(f"{paths['token_bytes.npy']} is unreadable ({e}){redo}") from None
    if token_bytes.shape != (meta["vocab_size"],) or token_bytes.dtype.kind not in "iu":
        raise ValueError(f"{paths['token_bytes.npy']} holds {token_bytes.shape} {token_bytes.dtype}, not the "
                         f"{meta['vocab_size']} integer byte lengths of the vocabulary{redo}")
    return Tokenizer(enc, token_bytes, saved_hash)

# -----------------------------------------------------------------------------
# The tokenizer used by every stage: tiktoken for the heavy lifting, plus chat rendering through a chat format


class Tokenizer:
    """What the stages use. Which model family it serves shows nowhere in its interface: `chat` (a chat format,
    below) decides how conversations become tokens and what picochat's special token names stand for."""

    def __init__(self, enc, token_bytes, hash, chat=None, nfc=False):
        self.enc = enc  # the tiktoken.Encoding
        self.token_bytes = token_bytes  # (vocab_size,) int32 bytes per token, 0 for specials
        self.hash = hash
        self.chat = chat or PicochatChat()
        self.nfc = nfc  # normalise text to NFC before encoding (as the Hugging Face tokenizer does)
        self.vocab_size = enc.n_vocab
        self.special_tokens = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_id = self.special("<|bos|>")

    def special(self, name):
        """The id of a special token: picochat's names (<|bos|>, <|assistant_end|>, <|python_start|>, ...) stand for
        the family's counterpart, or None where it has none (then that feature is off: e.g. GPT-2's calculator).
        The family's own names (<|im_end|>) work too."""
        token = self.chat.aliases.get(name, name)
        if token is None:
            return None
        if token not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token; they are: "
                           f"{', '.join(sorted(self.special_tokens, key=self.special_tokens.get))}")
        return self.special_tokens[token]

    def _id(self, token):
        return self.special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids, or list of str -> list of lists. Plain text never yields special tokens.
        prepend/append: a token id or a special token's name, added to each text."""
        head = [] if prepend is None else [self._id(prepend)]
        tail = [] if append is None else [self._id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text) + tail
        texts = [unicodedata.normalize("NFC", t) for t in text] if self.nfc else list(text)
        return [head + ids + tail for ids in self.enc.encode_ordinary_batch(texts, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))  # also numpy / torch

    def tool_call(self, text):
        """The calculator expression in the decoded tokens between <|python_start|> and <|python_end|> (in this
        family's convention), or None when they are not a calculator call."""
        return self.chat.tool_call(text)

    def tool_output(self, result):
        """The tokens forced after a calculator call: its result, in this family's convention."""
        return self.chat.tool_output(self, result)

    def _pieces_to_ids(self, pieces):
        """[(str | token id, mask)] -> (ids, mask). Adjacent strings of one mask are encoded as one text, so they
        get the tokens of the whole (Hugging Face's tokenizer, too, sees a rendered chat as runs of text between
        special tokens); the text of one mask never shares a token with the next."""
        ids, mask, run = [], [], []  # run: the strings being joined, all of mask run_mask
        run_mask = 0
        for piece, m in pieces + [(None, 0)]:
            if run and (not isinstance(piece, str) or m != run_mask):
                tokens = self.encode("".join(run))
                ids.extend(tokens)
                mask.extend([run_mask] * len(tokens))
                run = []
            if isinstance(piece, str):
                run.append(piece)
                run_mask = m
            elif piece is not None:
                ids.append(piece)
                mask.append(m)
        return ids, mask

    def render_conversation(self, messages, max_len=2048):
        """-> (ids, mask), at most max_len tokens, mask 1 on exactly what the assistant writes. Raises ValueError
        when nothing trainable is left (no assistant turn, or truncation cut all of it): callers skip those."""
        ids, mask = self._pieces_to_ids(self.chat.render(self, check_roles(messages)))
        if not any(mask):
            raise ValueError("no assistant token to train on: the conversation has no assistant message")
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            raise ValueError(f"no assistant token to train on within max_len={max_len} "
                             f"(conversation of {len(ids)}+ tokens)")
        return ids, mask

    def render_for_completion(self, messages):
        """-> ids of the conversation up to the assistant's turn, for the model to continue (picochat: up to and
        including <|assistant_start|>). A trailing assistant turn (the reference answer in eval data) is dropped."""
        messages = list(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion needs messages ending with a user turn")
        pieces = self.chat.render(self, check_roles(messages)) + self.chat.generation_prompt(self)
        return self._pieces_to_ids(pieces)[0]


def check_roles(messages):
    """An optional system message, then user and assistant turns alternating from a user's; user and system
    contents are strings. Returns the messages as a list."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation needs a list of at least one message")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                and "content" in message):
            raise ValueError(f"message {i} must be an object with a role (system, user or assistant) and a content, "
                             f"got {message!r:.80}")
    messages = list(messages)
    start = 1 if messages[0]["role"] == "system" else 0
    if start and (len(messages) < 2 or messages[1]["role"] != "user"):
        raise ValueError("a system message must be followed by a user message")
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r} but roles must alternate user/assistant, "
                             f"starting with user (after an optional system message)")
        if expected == "user" and not isinstance(message["content"], str):
            raise ValueError(f"message {i}: a user's content must be a string")
    if start and not isinstance(messages[0]["content"], str):
        raise ValueError("message 0: a system prompt must be a string")
    return messages


def assistant_parts(i, content):
    """An assistant's content as a list of parts {"type": "text"|"python"|"python_output", "text"}."""
    if not isinstance(content, (str, list)):
        raise ValueError(f"message {i}: an assistant's content must be a string or a list of parts")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    for part in parts:
        if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
            raise ValueError(f"message {i}: a part must be an object with a type and a text string, got {part!r:.80}")
        if part.get("type") not in ("text", "python", "python_output"):
            raise ValueError(f"message {i}: unknown part type {part.get('type')!r} (text, python, python_output)")
    return parts

# -----------------------------------------------------------------------------
# Chat formats: how one model family lays a conversation out in tokens. render(tok, messages) returns pieces
# [(text or token id, mask)], mask 1 on what the assistant writes; generation_prompt(tok) the pieces that open the
# assistant's turn; aliases maps picochat's special token names onto the family's (None: it has none).


class PicochatChat:
    """picochat's own format (nanochat's): <|bos|>, then <|user_start|>…<|user_end|> and <|assistant_start|>…
    <|assistant_end|> turns. There is no system role in the token stream: a system prompt leads the first user turn.
    The calculator: <|python_start|>expr<|python_end|> (written by the assistant), then the result
    <|output_start|>value<|output_end|> (forced in by the engine, so not trained on)."""
    aliases = {}

    def render(self, tok, messages):
        s = tok.special
        if messages[0]["role"] == "system":
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": merged}] + messages[2:]
        pieces = [(tok.bos_id, 0)]
        for i, message in enumerate(messages):
            if message["role"] == "user":
                pieces += [(s("<|user_start|>"), 0), (message["content"], 0), (s("<|user_end|>"), 0)]
                continue
            pieces.append((s("<|assistant_start|>"), 0))
            for part in assistant_parts(i, message["content"]):
                if part["type"] == "text":
                    pieces.append((part["text"], 1))
                elif part["type"] == "python":  # the assistant writes the call: trained on
                    pieces += [(s("<|python_start|>"), 1), (part["text"], 1), (s("<|python_end|>"), 1)]
                else:  # the calculator writes the result: not trained on
                    pieces += [(s("<|output_start|>"), 0), (part["text"], 0), (s("<|output_end|>"), 0)]
            pieces.append((s("<|assistant_end|>"), 1))
        return pieces

    def generation_prompt(self, tok):
        return [(tok.special("<|assistant_start|>"), 0)]

    def tool_call(self, text):
        return text

    def tool_output(self, tok, result):
        return [tok.special("<|output_start|>"), *tok.encode(result), tok.special("<|output_end|>")]


class Qwen3Chat:
    """Qwen3's chat template (ChatML), token for token: "<|im_start|>role\n…<|im_end|>\n" per message, no BOS.
    Thinking as the template does it: an assistant message's "<think>…</think>" (in its text) is its reasoning;
    the assistant messages after the last user message open with "<think>\nreasoning\n</think>\n\n" (empty
    for the final one without reasoning: Qwen3 learned to write it), earlier ones lose their reasoning.
    The calculator is a Qwen3 tool: the call `<tool_call>\n{"name": "calculator", "arguments": {"expression":
    "…"}}\n</tool_call>` ends the assistant's message, the result comes back as a user turn
    "<tool_response>\n…\n</tool_response>" and a new assistant message goes on (all forced by the engine)."""
    aliases = {"<|bos|>": "<|endoftext|>", "<|assistant_end|>": "<|im_end|>",
               "<|python_start|>": "<tool_call>", "<|python_end|>": "</tool_call>",
               "<|output_start|>": "<tool_response>", "<|output_end|>": "</tool_response>",
               "<|user_start|>": None, "<|user_end|>": None, "<|assistant_start|>": None}

    def render(self, tok, messages):
        s = tok.special
        # the template's messages: our assistant message splits at each calculator result into assistant
        # messages (text and calls) and tool messages (results)
        flat = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                flat.append(dict(message))
                continue
            flat.append({"role": "assistant", "content": "", "calls": []})
            for part in assistant_parts(i, message["content"]):
                if part["type"] == "python_output":
                    flat += [{"role": "tool", "content": part["text"]},
                             {"role": "assistant", "content": "", "calls": []}]
                elif part["type"] == "python":
                    flat[-1]["calls"].append([part["text"], ""])  # the expression, text written after it
                elif flat[-1]["calls"]:  # text after a call that got no result: it goes on in the same message
                    flat[-1]["calls"][-1][1] += part["text"]
                else:
                    flat[-1]["content"] += part["text"]
        last_query = max(i for i, m in enumerate(flat) if m["role"] == "user")
        pieces = []
        for i, m in enumerate(flat):
            role, content = m["role"], m["content"]
            last = i == len(flat) - 1
            if role in ("user", "system"):
                pieces += [(s("<|im_start|>"), 0), (f"{role}\n{content}", 0), (s("<|im_end|>"), 0), ("\n", 0)]
            elif role == "tool":
                if flat[i - 1]["role"] != "tool":
                    pieces += [(s("<|im_start|>"), 0), ("user", 0)]
                pieces += [("\n", 0), (s("<tool_response>"), 0), (f"\n{content}\n", 0), (s("</tool_response>"), 0)]
                if flat[i + 1]["role"] != "tool":
                    pieces += [(s("<|im_end|>"), 0), ("\n", 0)]
            else:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                pieces += [(s("<|im_start|>"), 0), ("assistant\n", 0)]
                if i > last_query and (last or reasoning):
                    pieces += [(s("<think>"), 1), ("\n" + reasoning.strip("\n") + "\n", 1), (s("</think>"), 1),
                               ("\n\n" + content.lstrip("\n"), 1)]
                else:
                    pieces.append((content, 1))
                for j, (call, after) in enumerate(m["calls"]):
                    if j or content:
                        pieces.append(("\n", 1))
                    arguments = json.dumps({"expression": call}, ensure_ascii=False)
                    pieces += [(s("<tool_call>"), 1), (f'\n{{"name": "calculator", "arguments": {arguments}}}\n', 1),
                               (s("</tool_call>"), 1), (after, 1)]
                # a call's <|im_end|> is the engine's (forced with the result), not the model's
                ends_in_call = not last and flat[i + 1]["role"] == "tool"
                pieces += [(s("<|im_end|>"), 0 if ends_in_call else 1), ("\n", 0)]
        return pieces

    def generation_prompt(self, tok):
        return [(tok.special("<|im_start|>"), 0), ("assistant\n", 0)]

    def tool_call(self, text):
        try:
            call = json.loads(text)
            expression = call["arguments"]["expression"] if call["name"] == "calculator" else None
        except (ValueError, TypeError, KeyError):
            return None
        return expression if isinstance(expression, str) else None

    def tool_output(self, tok, result):
        s = tok.special
        pieces = [(s("<|im_end|>"), 0), ("\n", 0), (s("<|im_start|>"), 0), ("user\n", 0), (s("<tool_response>"), 0),
                  (f"\n{result}\n", 0), (s("</tool_response>"), 0), (s("<|im_end|>"), 0), ("\n", 0)]
        return tok._pieces_to_ids(pieces + self.generation_prompt(tok))[0]


class GPT2Chat:
    """GPT-2 has no chat format: this one is plain text that a base GPT-2 continues sensibly, with its only
    special token, <|endoftext|>, as the document start and the end of each assistant turn (DialoGPT, GPT-2
    fine-tuned for chat, also ends turns with it):
        <|endoftext|>System: …\nUser: …\nAssistant: …<|endoftext|>\nUser: …\nAssistant:
    No calculator: a call and its result are written out as text, "<<expr=result>>" (GSM8K's own notation), so
    the model learns to compute them itself."""
    aliases = {"<|bos|>": "<|endoftext|>", "<|assistant_end|>": "<|endoftext|>", "<|user_start|>": None,
               "<|user_end|>": None, "<|assistant_start|>": None, "<|python_start|>": None, "<|python_end|>": None,
               "<|output_start|>": None, "<|output_end|>": None}

    def render(self, tok, messages):
        pieces = [(tok.bos_id, 0)]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                pieces.append((f"{message['role'].capitalize()}: {message['content']}\n", 0))
                continue
            text = "".join(part["text"] if part["type"] == "text" else
                           f"<<{part['text']}=" if part["type"] == "python" else f"{part['text']}>>"
                           for part in assistant_parts(i, message["content"]))
            # the space after "Assistant:" is the answer's: GPT-2's words carry their leading space
            pieces += [("Assistant:", 0), (" " + text, 1), (tok.bos_id, 1), ("\n", 0)]
        return pieces

    def generation_prompt(self, tok):
        return [("Assistant:", 0)]

    def tool_call(self, text):
        return None

    def tool_output(self, tok, result):
        return []

# -----------------------------------------------------------------------------
# An open model's tokenizer: its Hugging Face tokenizer.json (byte-level BPE) as a tiktoken Encoding

CHAT_FORMATS = {"qwen3": Qwen3Chat, "gpt2": GPT2Chat}  # config.json's model_type -> chat format
# the split regex of a ByteLevel pre-tokenizer with use_regex (GPT-2's)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_alphabet():
    """{char: byte} of byte-level BPE (GPT-2's bytes_to_unicode): printable bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _split_pattern(pre):
    """The split regex of a byte-level pre-tokenizer: ByteLevel(use_regex) alone, or Split(regex) + ByteLevel."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    levels = [p for p in steps if p and p.get("type") == "ByteLevel"]
    splits = [p for p in steps if p and p.get("type") == "Split"]
    if len(levels) != 1 or len(steps) != len(levels) + len(splits) or levels[0].get("add_prefix_space"):
        raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre)[:200]} (byte-level BPE without a prefix space)")
    if not splits and levels[0].get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    if len(splits) == 1 and not levels[0].get("use_regex", True) and "Regex" in splits[0]["pattern"] \
            and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert"):
        return splits[0]["pattern"]["Regex"]
    raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre)[:200]}")


def load_hf_tokenizer(directory):
    """The tokenizer of a Hugging Face model folder: tokenizer.json (a byte-level BPE: vocabulary, merges,
    pre-tokenizer regex, added tokens) run by tiktoken, and the chat format of config.json's model_type.
    tiktoken merges the pair whose result has the lowest id, so the ids must follow the merge order (true of
    GPT-2's and Qwen's vocabularies, which tiktoken itself was first built from). Unlike the Hugging Face
    tokenizer, plain text never yields added tokens (<|im_end|>, <think>): only the chat format writes them."""
    paths = {name: os.path.join(directory, name) for name in ("tokenizer.json", "config.json")}
    missing = [name for name, p in paths.items() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no Hugging Face tokenizer in {directory} (missing {', '.join(missing)})")
    with open(paths["tokenizer.json"], "rb") as f:
        raw = f.read()
    spec = json.loads(raw)
    with open(paths["config.json"], encoding="utf-8") as f:
        kind = json.load(f).get("model_type")
    if kind not in CHAT_FORMATS:
        raise ValueError(f"{directory}: no chat format for model_type {kind!r} ({', '.join(CHAT_FORMATS)})")
    bpe = spec["model"]
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("dropout") \
            or bpe.get("continuing_subword_prefix") or bpe.get("end_of_word_suffix"):
        raise ValueError(f"{directory}/tokenizer.json: not a plain byte-level BPE model")
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer["type"] == "Sequence" else [normalizer]
    if any(step["type"] != "NFC" for step in steps):
        raise ValueError(f"{directory}/tokenizer.json: unsupported normalizer {json.dumps(normalizer)[:200]}")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    alphabet = byte_level_alphabet()
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in bpe["vocab"].items() if token not in added}
    except KeyError as e:
        raise ValueError(f"{directory}/tokenizer.json: token with a character {e} outside the byte-level "
                         f"alphabet") from None
    if len(ranks) < len(bpe["vocab"]) - len(added) or not all(bytes([b]) in ranks for b in range(256)):
        raise ValueError(f"{directory}/tokenizer.json: the vocabulary lacks some of the 256 bytes or repeats a token")
    made, last = set(), -1
    for merge in bpe["merges"]:
        token = "".join(merge.split(" ") if isinstance(merge, str) else merge)
        if token in made:  # a second pair spelling the same token: its rank is the first one's
            continue
        made.add(token)
        if bpe["vocab"].get(token, -1) <= last:
            raise ValueError(f"{directory}/tokenizer.json: token ids do not follow the merge order (at {merge!r}), "
                             f"which tiktoken's rank-based BPE needs")
        last = bpe["vocab"][token]
    specials = {name: t["id"] for name, t in added.items()}
    enc = tiktoken.Encoding(name=f"hf-{kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    token_bytes = np.zeros(enc.n_vocab, dtype=np.int32)
    for token, i in ranks.items():
        token_bytes[i] = len(token)
    return Tokenizer(enc, token_bytes, hashlib.sha256(raw + kind.encode()).hexdigest(), CHAT_FORMATS[kind](),
                     nfc=bool(steps))

# -----------------------------------------------------------------------------
# Reading documents for training and evaluation


def iter_documents(paths, max_chars, doc_cap):
    """The documents of `paths`, each cut to doc_cap characters, max_chars characters in total."""
    from data import iter_texts  # lazy: tokenizer.py imports without the data package
    total = 0
    for path in paths:
        try:
            for text in iter_texts(path):
                text = text[:min(doc_cap, max_chars - total)]
                total += len(text)
                yield text
                if total >= max_chars:
                    return
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def main(config):
    from data import pretrain_files
    t0 = time.time()
    if eval:
        # ---- bytes per token on held-out text
        tok = load_tokenizer()
        files = pretrain_files("val", data)
        common.print0(f"tokenizer: {default_dir()} (vocab {tok.vocab_size}); held-out text: {', '.join(files)}")
        texts = list(iter_documents(files, max_chars, doc_cap))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(map(len, tok.encode(texts, num_threads=os.cpu_count())))
        if n_tokens == 0:
            raise SystemExit(f"no held-out text in {', '.join(files)}")
        common.print0(f"{len(texts):,} documents, {n_bytes:,} bytes, {n_tokens:,} tokens: "
                      f"{n_bytes / n_tokens:.3f} bytes per token ({time.time() - t0:.1f}s)")
        # GPT-2/GPT-4 comparisons would need their files from the network (tiktoken.get_encoding): not offered
        section = {"config": config, "bytes_per_token": n_bytes / n_tokens, "eval_files": files}
        common.print0(f"report: {common.write_report_section('tokenizer_eval', section)}")
        return
    # ---- train
    if max_digits < 1:
        raise ValueError(f"max_digits={max_digits}: a token must be able to hold one digit (1 or more)")
    pattern = split_pattern(max_digits)
    files = pretrain_files("train", data)
    common.print0(f"training a {vocab_size}-token BPE on: {', '.join(files)}")
    ranks = train_bpe(iter_documents(files, max_chars, doc_cap), vocab_size, num_proc, pattern)
    train_s = time.time() - t0
    got = len(ranks) + len(SPECIAL_TOKENS)
    if got < vocab_size:
        common.print0(f"the text ran out of pairs to merge: vocab_size is {got}, not {vocab_size}")
    common.print0(f"trained in {train_s:.1f}s")
    # ---- save
    directory = save_tokenizer(ranks, pattern=pattern)
    tok = load_tokenizer(directory)  # what every later stage will load
    sample = "Hello world! 12345 <|bos|> 日本語"
    assert tok.decode(tok.encode(sample)) == sample
    common.print0(f"saved to {directory}/ (tokenizer.tiktoken, tokenizer.json, token_bytes.npy); hash {tok.hash[:12]}")
    section = {"config": config, "vocab_size": tok.vocab_size, "train_seconds": train_s, "train_files": files,
               "hash": tok.hash}
    common.print0(f"report: {common.write_report_section('tokenizer', section)}")


if __name__ == "__main__":
    config = common.configure(globals())
    try:
        main(config)
    except (FileNotFoundError, ValueError) as e:  # no or unreadable data, a damaged tokenizer: each names its file
        raise SystemExit(f"error: {e}") from None
