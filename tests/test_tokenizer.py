"""Tests of tokenizer.py: the trainer against a naive BPE, tiktoken round trips, chat masks, bad input."""
import collections
import json
import os
import random

import numpy as np
import pytest
import regex

import tokenizer
from conftest import run_script
from data import iter_texts
from tokenizer import SPECIAL_TOKENS, count_chunks, load_tokenizer, merge_chunks, save_tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; the fox did.",
    "Natalia sold 48 clips in April and half as many in May: 48/2 = 24. In total 48 + 24 = 72.\n#### 72",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1234567, 89))  # 1234656\n",
    "日本語のテキストと中文文本。 Ünïcödé: café, naïve, e\u0301 (combining), emoji 🙂👍🏽 and tabs\there.",
    "We'll see; they're here, I'm sure—you've been told.   Spaces   and\r\nwindows lines\n\n\n"
    "   trailing   ",
] * 3


def reference_bpe(chunk_counts, num_merges):
    """Obviously correct BPE: recount every pair, merge the most frequent (ties: smallest (left, right) ids)
    left to right in every chunk. Pairs spelling an existing token are never merged (as in the trainer)."""
    words = collections.Counter({tuple(chunk): n for chunk, n in chunk_counts.items()})
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for _ in range(num_merges):
        stats = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] += n
        candidates = [p for p in stats if vocab[p[0]] + vocab[p[1]] not in vocab]
        if not candidates:
            break
        best = min(candidates, key=lambda p: (-stats[p], p))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
        merges.append(best)
    return merges


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    ranks = train_bpe(CORPUS, 256 + 200 + len(SPECIAL_TOKENS))
    return load_tokenizer(save_tokenizer(ranks, str(tmp_path_factory.mktemp("tok"))))

# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("max_digits", [1, 2])
def test_chunk_counts_equal_plain_regex_split(max_digits):
    # count_chunks cuts text into pieces before splitting; the chunks must be exactly those of the whole text
    pattern = tokenizer.split_pattern(max_digits)
    rng = random.Random(0)
    alphabet = list("ab Z9'.\n\r\t  ,!\u00a0\u3000é日🙂\x1c\x0b") + ["'s", "'LL", "  ", "\n\n", " \n", "12345"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)] + CORPUS
    want = collections.Counter()
    for t in texts:
        want.update(regex.findall(pattern, t))
    want = {k.encode("utf-8"): v for k, v in want.items()}
    assert count_chunks(texts, pattern=pattern) == want
    assert count_chunks(texts, num_proc=2, batch_chars=500, pattern=pattern) == want  # the multiprocess path


@pytest.mark.parametrize("max_digits, chunks", [(1, ["1", "2", "3", "4", "5"]), (2, ["12", "34", "5"]),
                                                (3, ["123", "45"])])
def test_numbers_split_in_chunks_of_max_digits(max_digits, chunks):
    assert regex.findall(tokenizer.split_pattern(max_digits), "x 12345") == ["x", " "] + chunks
    assert tokenizer.SPLIT_PATTERN == tokenizer.split_pattern(2)  # the default: pairs


@pytest.mark.parametrize("seed", range(4))
def test_merges_equal_reference_bpe(seed):
    rng = random.Random(seed)
    # tiny alphabets make many equal counts: ties, overlapping pairs ("aaaa") and repeated merges
    letters = [b"a", b"b", b"c", "é".encode(), b" "][: 2 + seed]
    chunks = {b"".join(rng.choice(letters) for _ in range(rng.randint(1, 12))): rng.randint(1, 4)
              for _ in range(40)}
    assert merge_chunks(chunks, 60) == reference_bpe(chunks, 60)


def test_ties_go_to_smallest_pair():
    # "ab" and "cd" are equally frequent: (97, 98) < (99, 100) wins; then "cd"; then the merged "abcd"
    assert merge_chunks({b"ab": 3, b"cd": 3, b"abcd": 1}, 3) == [(97, 98), (99, 100), (256, 257)]
    # "aaaaa" -> [aa, aa, a]: (aa, aa) and (aa, a) tie at 1, and (256, 97) < (256, 256)
    assert merge_chunks({b"aaaaa": 1}, 3) == reference_bpe({b"aaaaa": 1}, 3) == [(97, 97), (256, 97), (256, 257)]


def test_trained_ranks_equal_reference_on_text():
    chunks = count_chunks(CORPUS)
    merges = reference_bpe(chunks, 120)
    ranks = train_bpe(CORPUS, 256 + 120 + len(SPECIAL_TOKENS))
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    assert ranks == {token: i for i, token in enumerate(vocab)}


def test_bad_training_input():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(CORPUS, 256 + len(SPECIAL_TOKENS) - 1)
    with pytest.raises(ValueError, match="empty"):
        train_bpe([], 1000)
    with pytest.raises(ValueError, match="empty"):
        train_bpe(["", ""], 1000)


def test_unreadable_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\n\xff\xfe not utf-8 \x80")
    with pytest.raises(ValueError, match="cannot read .*bad.txt"):
        train_bpe(tokenizer.iter_documents([str(bad)], 10**9, 10**4), 300)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "hello"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="cannot read .*docs.jsonl"):
        list(tokenizer.iter_documents([str(docs)], 10**9, 10**4))


def test_caps_on_characters(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join('{"text": "%s"}\n' % (c * 10) for c in "abcde"))
    assert list(tokenizer.iter_documents([str(docs)], 10**9, 4)) == ["aaaa", "bbbb", "cccc", "dddd", "eeee"]
    assert list(tokenizer.iter_documents([str(docs)], 25, 10**4)) == ["a" * 10, "b" * 10, "c" * 5]

# -----------------------------------------------------------------------------
# encoding and decoding


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(0)
    samples = ["", "hello world", "🙂👍🏽👨‍👩‍👧", "漢字かなカナ한국어", "e\u0301a\u0308\u0323", "\x00\x01\t\r\n",
               "  leading and trailing  ", "12345678901234567890", "<|bos|><|user_start|>"]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 50))).decode("utf-8", "replace")
                for _ in range(50)]
    samples += ["".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd7ff),
                                        rng.randrange(0xe000, 0x10ffff)])) for _ in range(30)) for _ in range(50)]
    for s in samples:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode(np.array(ids, dtype=np.int64)) == s
        assert tok.enc.decode_bytes(ids) == s.encode("utf-8")
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode(samples) == [tok.encode(s) for s in samples]  # the batch path agrees


def test_lone_surrogates_do_not_crash(tok):
    s = b"ok \xed\xa0\x80 \xff".decode("utf-8", "surrogateescape") + "\ud800"
    ids = tok.encode(s)  # tiktoken replaces each lone surrogate with U+FFFD
    assert tok.decode(ids) == "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in s)


def test_plain_text_never_yields_special_tokens(tok):
    specials = {tok.special(name) for name in SPECIAL_TOKENS}
    assert specials == set(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    for name in SPECIAL_TOKENS:
        ids = tok.encode("say " + name + " now")
        assert not specials & set(ids)
        assert tok.decode(ids) == "say " + name + " now"


def test_prepend_append(tok):
    ids = tok.encode("hi", prepend="<|bos|>", append=tok.special("<|assistant_end|>"))
    assert ids == [tok.bos_id] + tok.encode("hi") + [tok.special("<|assistant_end|>")]
    bos = tok.bos_id
    assert tok.encode(["a", "b"], prepend=bos) == [[bos] + tok.encode("a"), [bos] + tok.encode("b")]
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode("hi", prepend="<|nope|>")


def test_token_bytes(tok):
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (tok.vocab_size,)
    for i in range(tok.vocab_size - len(SPECIAL_TOKENS)):
        assert tok.token_bytes[i] == len(tok.enc.decode_single_token_bytes(i))
    assert not tok.token_bytes[-len(SPECIAL_TOKENS):].any()

# -----------------------------------------------------------------------------
# chat rendering


def test_render_conversation_masks_exact_positions(tok):
    s, e = tok.special, tok.encode
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]
    segments = [  # (tokens, mask)
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")] + e("Be brief.\n\nWhat is 12*34?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Let me compute. "), 1),
        ([s("<|python_start|>")] + e("12*34") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("408") + [s("<|output_end|>")], 0),
        (e("It is 408.") + [s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (e("Welcome") + [s("<|assistant_end|>")], 1),
    ]
    want_ids = [t for tokens, _ in segments for t in tokens]
    want_mask = [m for tokens, m in segments for _ in tokens]
    ids, mask = tok.render_conversation(messages)
    assert ids == want_ids and mask == want_mask
    # truncation keeps a prefix, as long as an assistant token survives
    first_trainable = want_mask.index(1)
    ids, mask = tok.render_conversation(messages, max_len=first_trainable + 1)
    assert ids == want_ids[:first_trainable + 1] and mask == want_mask[:first_trainable + 1]
    with pytest.raises(ValueError, match="no assistant token"):
        tok.render_conversation(messages, max_len=first_trainable)
    with pytest.raises(ValueError, match="no assistant token"):
        tok.render_conversation(messages[:2])


def test_render_rejects_bad_conversations(tok):
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation([{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="unknown part type"):
        tok.render_conversation([{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": [{"type": "image", "text": "x"}]}])
    with pytest.raises(ValueError, match="at least one message"):
        tok.render_conversation([])


def test_render_for_completion(tok):
    s = tok.special
    convo = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    want = [tok.bos_id, s("<|user_start|>")] + tok.encode("2+2?")
    want += [s("<|user_end|>"), s("<|assistant_start|>")]
    assert tok.render_for_completion(convo) == want
    assert tok.render_for_completion(convo[:1]) == want
    with pytest.raises(ValueError, match="ending with a user turn"):
        tok.render_for_completion([])

# -----------------------------------------------------------------------------
# saving and loading


def test_save_load_round_trip(tmp_base_dir):
    ranks = train_bpe(CORPUS, 256 + 50 + len(SPECIAL_TOKENS))
    with pytest.raises(FileNotFoundError, match="python tokenizer.py"):
        load_tokenizer()
    directory = save_tokenizer(ranks)
    assert directory == os.path.join(tmp_base_dir, "tokenizer")
    assert sorted(os.listdir(directory)) == ["token_bytes.npy", "tokenizer.json", "tokenizer.tiktoken"]
    tok = load_tokenizer()
    assert tok.vocab_size == 256 + 50 + len(SPECIAL_TOKENS)
    assert tok.bos_id == 256 + 50
    assert {tok.enc.decode_single_token_bytes(i): i for i in range(len(ranks))} == ranks
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]
    assert load_tokenizer().hash == tok.hash and len(tok.hash) == 64
    with open(os.path.join(directory, "tokenizer.tiktoken"), "a") as f:
        f.write("YWJj 9999\n")  # an edited rank file no longer matches the hash
    with pytest.raises(ValueError, match="hash"):
        load_tokenizer()


def test_script_trains_and_evaluates(tmp_path, tmp_base_dir, monkeypatch, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(CORPUS))
    out = run_script(["python", "tokenizer.py", f"--data={text}", "--vocab_size=300"], tmp_base_dir, timeout=120)
    assert "saved to " + os.path.join(tmp_base_dir, "tokenizer") in out.stdout
    assert load_tokenizer().vocab_size == 300
    # the rest in-process (a subprocess pays for importing torch again): --eval=1, then a missing file
    monkeypatch.setattr(tokenizer, "data", str(text))
    monkeypatch.setattr(tokenizer, "eval", 1)
    tokenizer.main({})
    # the held-out text is the file's documents (each under doc_cap characters): its bytes over its tokens,
    # counted here one document at a time
    documents = list(iter_texts(str(text)))
    tok = load_tokenizer()
    expected = sum(len(d.encode()) for d in documents) / sum(len(tok.encode(d)) for d in documents)
    assert f"{expected:.3f} bytes per token" in capsys.readouterr().out
    with open(os.path.join(tmp_base_dir, "report", "tokenizer_eval.json")) as f:
        assert json.load(f)["bytes_per_token"] == pytest.approx(expected)
    assert expected > 1.25  # the 35 merges learned on this very text compress it (measured: 1.31)
    monkeypatch.setattr(tokenizer, "data", str(tmp_path / "missing.txt"))
    monkeypatch.setattr(tokenizer, "eval", 0)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenizer.main({})


def test_script_saves_its_digit_split_and_loading_uses_it(tmp_path, tmp_base_dir, monkeypatch):
    text = tmp_path / "numbers.txt"
    text.write_text("\n\n".join(f"Mia has {n} apples and {7 * n} pears." for n in range(400)))
    monkeypatch.setattr(tokenizer, "data", str(text))
    monkeypatch.setattr(tokenizer, "vocab_size", 500)
    digit_tokens = {}
    for max_digits in (2, 1):
        monkeypatch.setattr(tokenizer, "max_digits", max_digits)
        tokenizer.main({})
        tok = load_tokenizer()
        pieces = [tok.decode([i]) for i in range(tok.vocab_size - len(SPECIAL_TOKENS))]
        digit_tokens[max_digits] = {p for p in pieces if p.isdigit()}
        said = [tok.decode([i]) for i in tok.encode("Tom has 502 pears")]
        assert said[-4:] == (["5", "0", "2", " pears"] if max_digits == 1 else [" ", "50", "2", " pears"])
    assert max(map(len, digit_tokens[2])) == 2 and max(map(len, digit_tokens[1])) == 1
    monkeypatch.setattr(tokenizer, "max_digits", 0)
    with pytest.raises(ValueError, match="max_digits=0"):
        tokenizer.main({})
