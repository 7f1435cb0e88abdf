"""
The reading side of picochat's data: every stage gets its text, conversations and test problems from here.

    import data
    files = data.pretrain_files("train")            # a user's --data_path, else the downloaded corpus, else tinyworld
    for text in data.iter_texts(files[0]): ...
    convs = data.load_conversations("train")         # list of message lists
    problems = data.load_math("gsm8k", "test")      # [{"question", "answer": "...\\n#### N", "level"}]
    probes = data.load_chat_probes("test")          # [{"prompt", "kind", "expect"}], graded by chat_reply_ok
    items = data.load_mc("arc_easy", "test")        # [{"question", "choices", "answer": index}]

Everything lives under $PICOCHAT_DIR/data/ (see DEVELOPERS.md). The built-in set (tinyworld) is generated on
first use; the real datasets are downloaded by `python data/<name>.py`.
"""
import json
import os
import random
import re
import shutil
import tempfile

import common

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
LETTERS = "ABCDEFGHIJ"  # choice letters of multiple-choice items
TINYWORLD_MB_ENV = "PICOCHAT_TINYWORLD_MB"  # size of a tinyworld generated on demand (e.g. 1 for smoke runs)
SCRIPT_OF = {"arc_easy": "arc", "arc_challenge": "arc", "math": "hendrycks_math"}  # else data/<name>.py, data/<name>/


def data_dir(name):
    return os.path.join(common.get_base_dir(), "data", name)


# -----------------------------------------------------------------------------
# jsonl


def lines(path):
    """(line number, text) of a UTF-8 text file's lines; a line that is not UTF-8 (a binary file) is a ValueError
    naming the file and the line."""
    with open(path, "rb") as f:  # bytes, decoded line by line: a decoding error then knows its line
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}, line {i}: not UTF-8 text (a binary file?)") from None


def iter_jsonl(path):
    """(line number, row) of every non-blank line of a jsonl file; ValueError names a line that is not JSON."""
    for i, line in lines(path):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not JSON ({e})") from None


def read_jsonl(path):
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path, rows):
    common.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# tinyworld: generated into a temp dir and renamed into place, so a half-written set is never read


def made_with(path, settings):
    """Whether a complete tinyworld set is at `path`, made by this generator with (at least) these settings."""
    from data import tinyworld
    meta_path = os.path.join(path, "meta.json")  # written last: a set without it is incomplete
    if not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        meta = json.load(f)
    return all(meta.get(k) == v for k, v in {**settings, "version": tinyworld.VERSION}.items())


def ensure_tinyworld(**settings):
    """Path of the tinyworld set, generating it when missing.

    With no arguments any complete set on disk made by this generator's VERSION is used as it is (whatever size
    it was made with); a missing or outdated set is generated with the defaults of data/tinyworld.py, except
    pretrain_mb, taken from $PICOCHAT_TINYWORLD_MB when set. With arguments (tinyworld.py's settings) a set made
    with other settings is replaced.
    """
    from data import tinyworld
    path = data_dir("tinyworld")
    if made_with(path, settings):
        return path
    unknown = set(settings) - set(common.config_keys(vars(tinyworld)))
    if unknown:
        raise ValueError(f"unknown tinyworld settings: {sorted(unknown)}")
    if "pretrain_mb" not in settings and os.environ.get(TINYWORLD_MB_ENV):
        try:
            settings["pretrain_mb"] = float(os.environ[TINYWORLD_MB_ENV])
        except ValueError:
            raise ValueError(f"${TINYWORLD_MB_ENV} must be a number of megabytes, "
                             f"got {os.environ[TINYWORLD_MB_ENV]!r}") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tinyworld.")
    try:
        common.print0(f"generating tinyworld into {path} ...")
        tinyworld.generate(os.path.join(tmp, "set"), **settings)
        # several processes (e.g. DDP ranks) may generate at once: the first set in place wins, a later one with
        # the same settings is dropped, so a set another process is reading never moves
        if not made_with(path, settings):
            if os.path.exists(path):
                os.rename(path, os.path.join(tmp, "old"))  # made with other settings, or incomplete
            try:
                os.rename(os.path.join(tmp, "set"), path)
            except OSError:
                if not made_with(path, settings):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# -----------------------------------------------------------------------------
# Pretraining text


def corpus_marker():
    """The file data/corpus.py writes once a corpus is downloaded: {"corpus": name, "val": its validation shard}."""
    return os.path.join(common.get_base_dir(), "data", "corpus.json")


def corpus_files():
    """(train, val) shards of the downloaded corpus (data/corpus.py), or None when none is downloaded."""
    if not os.path.exists(corpus_marker()):
        return None
    with open(corpus_marker(), encoding="utf-8") as f:
        marker = json.load(f)
    folder = data_dir(marker["corpus"])
    shards = sorted(f for f in os.listdir(folder) if re.fullmatch(r"shard_\d+\.parquet", f))
    if marker["val"] not in shards:
        raise FileNotFoundError(f"{folder}: the validation shard {marker['val']} is missing; "
                                f"run `python data/corpus.py --corpus={marker['corpus']}` again")
    train = [os.path.join(folder, f) for f in shards if f != marker["val"]]
    return train, [os.path.join(folder, marker["val"])]


def pretrain_files(split, data_path=""):
    """The files of a pretraining split.

    data_path: a file or directory of .txt/.jsonl/.parquet given by the user: the last file (sorted) is "val", the
    others "train"; a single file serves both splits (val then equals train). Without it: the downloaded corpus
    (python data/corpus.py), whose validation shard is fixed, else the built-in tinyworld (its last shard is val).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data_path:
        if os.path.isfile(data_path):
            files = [data_path]
        elif os.path.isdir(data_path):
            files = sorted(os.path.join(data_path, f) for f in os.listdir(data_path) if f.endswith(TEXT_EXTENSIONS))
        else:
            raise FileNotFoundError(f"data path {data_path!r} does not exist")
        if not files:
            raise FileNotFoundError(f"no .txt/.jsonl/.parquet files in {data_path}")
    else:
        corpus = corpus_files()
        if corpus:
            return corpus[0] if split == "train" else corpus[1]
        tw = os.path.join(ensure_tinyworld(), "pretrain")
        files = sorted(os.path.join(tw, f) for f in os.listdir(tw) if f.endswith(".jsonl"))
    if len(files) == 1:
        return files
    return files[:-1] if split == "train" else files[-1:]


def iter_texts(path):
    """Yield the documents of a file: .txt split on blank lines, .jsonl "text" fields, .parquet "text" column.
    A line that is not UTF-8 or not JSON, or a row without a "text" string, is a ValueError naming the line."""
    if path.endswith(".txt"):
        paragraph = []  # line by line: a user's .txt may be large
        for _, line in lines(path):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).strip()
                paragraph = []
        if paragraph:
            yield "".join(paragraph).strip()
    elif path.endswith(".jsonl"):
        for i, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}, line {i}: expected an object with a "text" string, like {{"text": "..."}}')
            yield row["text"]
    elif path.endswith(".parquet"):
        from data.download import iter_parquet
        for i, row in enumerate(iter_parquet(path, ["text"])):
            if not isinstance(row["text"], str):
                raise ValueError(f"{path}, row {i}: the text is {row['text']!r}, not a string")
            yield row["text"]
    else:
        raise ValueError(f"{path}: expected a .txt, .jsonl or .parquet file")


# -----------------------------------------------------------------------------
# Chat, math and multiple choice


def downloaded(name, split):
    """Path of a downloaded dataset's split, or one clear error naming the command that fetches it."""
    path = os.path.join(data_dir(name), f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} ({split}) is not downloaded: run `python data/{SCRIPT_OF.get(name, name)}.py` "
                                f"first")
    return path


CALC_MARK = re.compile(r"<<([^<>=]+)=([^<>]*)>>")  # GSM8K's calculator marks: <<48/2=24>>


def math_conversation(problem):
    """question -> answer; GSM8K's <<expr=value>> marks become calculator calls (python, python_output parts)."""
    answer, parts, pos = problem["answer"], [], 0
    for m in CALC_MARK.finditer(answer):
        parts += [{"type": "text", "text": answer[pos:m.start()]}, {"type": "python", "text": m[1]},
                  {"type": "python_output", "text": m[2]}]
        pos = m.end()
    parts.append({"type": "text", "text": answer[pos:]})
    content = [p for p in parts if p["text"]] if len(parts) > 1 else answer
    return [{"role": "user", "content": problem["question"]}, {"role": "assistant", "content": content}]


# A plain-text request for a solution ending in \boxed{}: how reasoning-from-scratch puts MATH problems to
# Qwen3-0.6B-Base (a base model, no chat template), worded here in picochat's own words
BOXED_PROMPT = ("Solve the following math problem. Reason step by step, then write the final answer on a line of "
                "its own as \\boxed{{ANSWER}}.\n\nProblem:\n{question}\n\nSolution:")


def math_prompt(tokenizer, question, style="chat"):
    """A word problem as prompt ids for a model to continue: "chat", a user turn up to the assistant's reply; "boxed",
    BOXED_PROMPT as a document (after <|bos|>, as pretraining documents begin), answered in plain text."""
    if style == "chat":
        return tokenizer.render_for_completion([{"role": "user", "content": question}])
    if style == "boxed":
        return tokenizer.encode(BOXED_PROMPT.format(question=question), prepend=tokenizer.bos_id)
    raise ValueError(f"a math prompt's style is chat or boxed, got {style!r}")


def mc_conversation(item):
    """A multiple-choice item as a chat: the question and its choices, each followed by its letter ("- Oakvale=B"),
    -> the right letter, e.g. "B". The letter comes after its choice and right after "=" (nanochat's format):
    a small model binds a letter to the choice before it far better than to the one after it (a 4-layer model
    trained on "B. Oakvale" lines stayed at chance even on its training items), and "=B" is split into "=", "B",
    the very token the answer is."""
    lines = [item["question"]] + [f"- {c}={LETTERS[i]}" for i, c in enumerate(item["choices"])]
    return [{"role": "user", "content": "\n".join(lines) + "\nAnswer with the letter of the right choice."},
            {"role": "assistant", "content": LETTERS[item["answer"]]}]


def load_conversations(split):
    """The SFT mixture of a split ("train" or "val"), shuffled with a fixed seed, as a list of message lists:
        tinyworld chat_{split}   greetings, identity, facts, arithmetic, calculator use, word problems
      + tinyworld mc_train       as mc_conversation()
      + smoltalk {split}         when downloaded (python data/smoltalk.py)
      + gsm8k train              as math_conversation(), when downloaded
      + mmlu, arc_easy, arc_challenge train   as mc_conversation(), when downloaded
    Of the sets that have no val split of their own (all but chat and smoltalk), every 20th row is "val" and the
    others "train". No test split is ever part of it.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def held_out(rows):
        return [r for i, r in enumerate(rows) if (i % 20 == 0) == (split == "val")]
    tinyworld = ensure_tinyworld()
    convs = [r["messages"] for r in read_jsonl(os.path.join(tinyworld, f"chat_{split}.jsonl"))]
    convs += [mc_conversation(r) for r in held_out(read_jsonl(os.path.join(tinyworld, "mc_train.jsonl")))]
    if os.path.exists(os.path.join(data_dir("smoltalk"), f"{split}.jsonl")):
        convs += [r["messages"] for r in read_jsonl(downloaded("smoltalk", split))]
    if os.path.exists(os.path.join(data_dir("gsm8k"), "train.jsonl")):
        convs += [math_conversation(p) for p in held_out(read_jsonl(downloaded("gsm8k", "train")))]
    for name in ("mmlu", "arc_easy", "arc_challenge"):
        if os.path.exists(os.path.join(data_dir(name), "train.jsonl")):
            convs += [mc_conversation(r) for r in held_out(read_jsonl(downloaded(name, "train")))]
    random.Random(0).shuffle(convs)
    return convs


MATH_SPLITS = {"tinyworld": ("train", "test"), "gsm8k": ("train", "test"), "math500": ("test",),
               "math": ("train", "test")}  # math: MATH without MATH-500, and MATH-500 as its test
MC_SPLITS = {name: ("train", "test") for name in ("tinyworld", "arc_easy", "arc_challenge", "mmlu", "hellaswag")}


def check_split(kind, splits, name, split):
    if name not in splits:
        raise ValueError(f"unknown {kind} dataset {name!r}: expected one of {', '.join(splits)}")
    if split not in splits[name]:
        raise ValueError(f"{name} has the splits {', '.join(splits[name])}, not {split!r}")


def load_math(name="tinyworld", split="test"):
    """Word problems [{"question", "answer": "...\\n#### N", "level"}] of tinyworld, gsm8k, math500 (test only) or
    math (MATH: train without MATH-500, test = MATH-500). tinyworld's test rows also carry "slice": id, phrasing,
    composition, length, meaning or arith (data/tinyworld.py)."""
    check_split("math", MATH_SPLITS, name, split)
    if name == "tinyworld":
        return read_jsonl(os.path.join(ensure_tinyworld(), f"math_{split}.jsonl"))
    return read_jsonl(downloaded(name, split))


def load_chat_probes(split="test"):
    """tinyworld's non-math chat prompts [{"prompt", "kind": "identity"|"smalltalk"|"fact", "expect": [words] or
    None}]: "test" in phrasings no training file has (chat retention), "train" in training phrasings (e.g. for an
    RL batch). Graded by chat_reply_ok."""
    if split not in ("train", "test"):
        raise ValueError(f"chat probes have the splits train, test, not {split!r}")
    return read_jsonl(os.path.join(ensure_tinyworld(), f"chat_probe_{split}.jsonl"))


def chat_reply_ok(reply, probe):
    """Whether a reply handles a non-math prompt: no "#### N" answer line, no calculator call (as tokens or as the
    <<expr=value>> marks people are shown) and, when the probe expects a fact, one of its words (whole words,
    any case)."""
    if "####" in reply or "<|python_start|>" in reply or "<<" in reply:
        return False
    return not probe["expect"] or any(re.search(rf"\b{re.escape(w)}\b", reply, re.IGNORECASE)
                                      for w in probe["expect"])


def load_mc(name="tinyworld", split="test"):
    """Multiple-choice items [{"question", "choices", "answer": index}] of tinyworld, arc_easy, arc_challenge, mmlu
    or hellaswag; data.mc_conversation() renders one as a chat."""
    check_split("mc", MC_SPLITS, name, split)
    if name == "tinyworld":
        return read_jsonl(os.path.join(ensure_tinyworld(), f"mc_{split}.jsonl"))
    return read_jsonl(downloaded(name, split))
