"""
Train, save and load picochat's byte-level BPE tokenizer, and render chats into tokens for training.

    python tokenizer.py                          # train on the built-in data (tinyworld), vocab 32768
    python tokenizer.py --vocab_size=4096 --data=path/to/texts   # .txt / .jsonl ("text") / .parquet, or a folder
    python tokenizer.py --eval=1                 # bytes per token of the saved tokenizer on held-out text

The trainer is plain Python + numpy and fast: documents are split into chunks with a GPT-4-style regex (in
parallel processes), identical chunks are counted once, and merges update only the chunks that contain the
merged pair, with a lazy max-heap of pair counts. The result is saved in tiktoken's own rank format, so
encoding and decoding run in tiktoken's Rust core:

    tokenizer/tokenizer.tiktoken   base64(token bytes) rank, one per line (special tokens excluded)
    tokenizer/tokenizer.json       {"pattern", "special_tokens", "vocab_size", "hash"}
    tokenizer/token_bytes.npy      int32 byte length of every token id, 0 for specials (for bits per byte)

In Python: tok = load_tokenizer(); tok.encode("hi"); tok.render_conversation(messages) -> (ids, mask).
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

import numpy as np
import regex
import tiktoken

import common

# GPT-4's split pattern, but numbers in groups of at most two digits (nanochat measured this best for small
# vocabularies: fewer tokens are spent on memorising numbers).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
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
eval = 0  # 1: instead of training, report bytes per token of the saved tokenizer on held-out text

# -----------------------------------------------------------------------------
# Chunk counting: regex-split documents and count identical chunks. The merge loop then works on unique
# chunks weighted by their counts, which is what makes a Python trainer fast.
#
# The split regex is the slow part, so it runs on unique *pieces* of text rather than on all of it. A space
# that follows a non-space character always starts a new chunk under SPLIT_PATTERN (no alternative can run
# from a non-space character into a following space, and the pattern never looks behind), so cutting the text
# before every such space and chunking the pieces separately gives exactly the chunks of the whole text.
# Cutting is a cheap stdlib `re` split (its \s is a superset of `regex`'s, so it never cuts where it must not).
# Pieces between two cuts start with a space and end with a non-space character, so any of them can also be
# concatenated without changing their chunks: all pieces seen n times are chunked in one regex call.

_CUT = re.compile(r" (?<=\S )")  # the space is consumed; every piece but a document's first starts with it


def _count_batch(texts):
    """Counter of SPLIT_PATTERN's chunks (str) over a list of documents, by way of their unique pieces."""
    inner, edges = collections.Counter(), collections.Counter()  # pieces between cuts; first/last pieces
    for text in texts:
        parts = _CUT.split(text)
        edges[parts[0]] += 1
        if len(parts) > 1:
            edges[" " + parts[-1]] += 1
            inner.update(parts[1:-1])
    findall = regex.compile(SPLIT_PATTERN).findall
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


def count_chunks(texts, num_proc=0, batch_chars=1 << 22):
    """{chunk bytes: count} of SPLIT_PATTERN's chunks over an iterable of documents. Worker processes count
    batches of ~batch_chars characters while the main process reads on; at most 2 batches per worker are in
    flight, so memory stays bounded however long the stream."""
    num_proc = num_proc or os.cpu_count()
    batches = _batches(texts, batch_chars)
    first = next(batches, [])
    second = next(batches, None)
    if second is None:  # one batch: not worth starting processes
        counts = _count_batch(first)
    else:
        counts = collections.Counter()
        pending = collections.deque()
        # fork where there is one: a spawned worker would re-import this module, torch and all
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(num_proc) as pool:
            for batch in itertools.chain([first, second], batches):
                pending.append(pool.apply_async(_count_batch, (batch,)))
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


def train_bpe(texts, vocab_size, num_proc=0):
    """Train on an iterable of documents. Returns the mergeable ranks {token bytes: id} (specials excluded)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and the "
                         f"{len(SPECIAL_TOKENS)} special tokens (at least {256 + len(SPECIAL_TOKENS)})")
    chunk_counts = count_chunks(texts, num_proc)
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


def save_tokenizer(mergeable_ranks, directory=None):
    """Write tokenizer.tiktoken, token_bytes.npy and tokenizer.json (last: it makes the tokenizer complete), each
    atomically. Returns the directory."""
    directory = directory or default_dir()
    ranks = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
    rank_text = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks)
    n = len(ranks)
    meta = {
        "pattern": SPLIT_PATTERN,
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
    directory = directory or default_dir()
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
# The tokenizer used by every stage: tiktoken for the heavy lifting, plus chat rendering


class Tokenizer:
    def __init__(self, enc, token_bytes, hash):
        self.enc = enc  # the tiktoken.Encoding
        self.token_bytes = token_bytes  # (vocab_size,) int32 bytes per token, 0 for specials
        self.hash = hash
        self.vocab_size = enc.n_vocab
        self.special_tokens = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_id = self.special("<|bos|>")

    def special(self, name):
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token; they are: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def _id(self, token):
        return self.special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids, or list of str -> list of lists. Plain text never yields special tokens.
        prepend/append: a token id or a special token's name, added to each text."""
        head = [] if prepend is None else [self._id(prepend)]
        tail = [] if append is None else [self._id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        return [head + ids + tail for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))  # also numpy / torch

    def _render(self, messages):
        """All of a conversation's tokens and the training mask (1 where the assistant writes), untruncated."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("a conversation needs a list of at least one message")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                    and "content" in message):
                raise ValueError(f"message {i} must be an object with a role (system, user or assistant) and a "
                                 f"content, got {message!r:.80}")
            if message["role"] != "assistant" and not isinstance(message["content"], str):
                raise ValueError(f"message {i}: a {message['role']}'s content must be a string")
        messages = list(messages)
        if messages[0]["role"] == "system":
            # no system role in the token stream: the system prompt leads the first user turn
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": merged}] + messages[2:]
        ids, mask = [self.bos_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        s = self.special
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} has role {role!r} but roles must alternate user/assistant, "
                                 f"starting with user (after an optional system message)")
            if role == "user":
                add([s("<|user_start|>")] + self.encode(content) + [s("<|user_end|>")], 0)
                continue
            add([s("<|assistant_start|>")], 0)
            if not isinstance(content, (str, list)):
                raise ValueError(f"message {i}: an assistant's content must be a string or a list of parts")
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: a part must be an object with a type and a text string, got "
                                     f"{part!r:.80}")
                kind, text = part.get("type"), part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the assistant writes the call: trained on
                    add([s("<|python_start|>")] + self.encode(text) + [s("<|python_end|>")], 1)
                elif kind == "python_output":  # the calculator writes the result: not trained on
                    add([s("<|output_start|>")] + self.encode(text) + [s("<|output_end|>")], 0)
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r} (text, python, python_output)")
            add([s("<|assistant_end|>")], 1)
        return ids, mask

    def render_conversation(self, messages, max_len=2048):
        """-> (ids, mask), at most max_len tokens, mask 1 on exactly what the assistant writes. Raises ValueError
        when nothing trainable is left (no assistant turn, or truncation cut all of it): callers skip those."""
        ids, mask = self._render(messages)
        if not any(mask):
            raise ValueError("no assistant token to train on: the conversation has no assistant message")
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            raise ValueError(f"no assistant token to train on within max_len={max_len} "
                             f"(conversation of {len(ids)}+ tokens)")
        return ids, mask

    def render_for_completion(self, messages):
        """-> ids of the conversation up to and including <|assistant_start|>, for the model to continue. A
        trailing assistant turn (the reference answer in eval data) is dropped."""
        messages = list(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion needs messages ending with a user turn")
        ids, _ = self._render(messages)
        return ids + [self.special("<|assistant_start|>")]

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
    files = pretrain_files("train", data)
    common.print0(f"training a {vocab_size}-token BPE on: {', '.join(files)}")
    ranks = train_bpe(iter_documents(files, max_chars, doc_cap), vocab_size, num_proc)
    train_s = time.time() - t0
    got = len(ranks) + len(SPECIAL_TOKENS)
    if got < vocab_size:
        common.print0(f"the text ran out of pairs to merge: vocab_size is {got}, not {vocab_size}")
    common.print0(f"trained in {train_s:.1f}s")
    # ---- save
    directory = save_tokenizer(ranks)
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
