"""Tests of data/: the tinyworld generator, the reading API, the downloaders (against the loopback hub of
tests/loopback_hub.py) and the normalisers of the real datasets."""
import ast
import collections
import hashlib
import json
import operator
import os
import random
import re
import runpy
import shutil
import string
import sys
import threading

import pytest

import data
from data import arc, download, gsm8k, hellaswag, math500, mmlu, smoltalk, tinyworld
from data.grade import extract_answer, grade
from data.loader import TokenRows
from tests.conftest import REPO, shared_data

SMALL = dict(seed=3, pretrain_mb=0.3, shard_mb=0.1, num_chat=300, num_math_train=400, num_math_test=80,
             num_mc_train=200, num_mc_test=80, num_probe_train=60, num_probe_test=40)
CALL = re.compile(r"<<([^<>=]+)=(\d+)>>(\d+)")  # a worked step's calculator call, then its result
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b if a % b == 0 else None}
UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
DECADES = "twenty thirty forty fifty sixty seventy eighty ninety".split()
BELOW_100 = r"(?:%s)(?:-(?:%s))?|%s" % ("|".join(DECADES), "|".join(UNITS[1:10]), "|".join(UNITS))
NUMBER = re.compile(r"\b(\d+|(?:%s) hundred(?: and (?:%s))?|%s)\b" % ("|".join(UNITS[1:10]), BELOW_100, BELOW_100),
                    re.IGNORECASE)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def number_value(token):
    """An integer written in digits or in words below 1000 ("forty-two", "three hundred and five")."""
    if token.isdigit():
        return int(token)
    token = token.lower()
    if " hundred" in token:
        hundreds, _, rest = token.partition(" hundred")
        return 100 * UNITS.index(hundreds) + (number_value(rest[len(" and "):]) if rest else 0)
    tens, _, unit = token.partition("-")
    if tens in DECADES:
        return 10 * (DECADES.index(tens) + 2) + (UNITS.index(unit) if unit else 0)
    return UNITS.index(token)


def calculate(expr):
    """An independent evaluation of a calculator expression (digits, + - * /, brackets; whole division)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        assert isinstance(node, ast.BinOp) and type(node.op) in ops, expr
        return ops[type(node.op)](ev(node.left), ev(node.right))
    value = ev(ast.parse(expr, mode="eval").body)
    assert value == int(value), expr
    return int(value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tw") / "set")
    tinyworld.generate(out, **SMALL)
    return out


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def training_texts(root):
    """Every text a model is trained on: the pretraining train shards, chat_train, math_train and mc_train."""
    shards = sorted(os.listdir(os.path.join(root, "pretrain")))
    texts = [r["text"] for s in shards[:-1] for r in read(os.path.join(root, "pretrain", s))]
    for r in read(os.path.join(root, "chat_train.jsonl")):
        texts += [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
                  for m in r["messages"]]
    texts += [r["question"] + "\n" + r["answer"] for r in read(os.path.join(root, "math_train.jsonl"))]
    texts += [r["question"] + " " + " ".join(r["choices"]) for r in read(os.path.join(root, "mc_train.jsonl"))]
    return texts


# -----------------------------------------------------------------------------
# tinyworld


def test_generator_is_deterministic(world, tmp_path):
    again = str(tmp_path / "again")
    tinyworld.generate(again, **SMALL)
    files = all_files(world)
    assert files == all_files(again)
    assert "pretrain/shard_00001.jsonl" in files and "meta.json" in files and "chat_probe_test.jsonl" in files
    for f in files:
        with open(os.path.join(world, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f
    other = str(tmp_path / "other")
    tinyworld.generate(other, **{**SMALL, "seed": 4})
    with open(os.path.join(world, "chat_train.jsonl"), "rb") as a:
        with open(os.path.join(other, "chat_train.jsonl"), "rb") as b:
            assert a.read() != b.read()


def test_pretrain_shards(world):
    shards = sorted(os.listdir(os.path.join(world, "pretrain")))
    assert len(shards) == 3  # 0.3 MB in 0.1 MB shards
    texts = [r["text"] for s in shards for r in read(os.path.join(world, "pretrain", s))]
    size = sum(len(t) + 1 for t in texts)
    assert 0.3e6 <= size < 0.33e6
    assert all(isinstance(t, str) and t for t in texts)
    joined = "\n".join(texts)
    for needle in ("lives in", "Question:", "#### ", "<<", "years old", ": Hello"):
        assert needle in joined
    # the validation shard holds no document of the train shards
    train = {r["text"] for s in shards[:-1] for r in read(os.path.join(world, "pretrain", s))}
    val = [r["text"] for r in read(os.path.join(world, "pretrain", shards[-1]))]
    assert val and not train & set(val)


def test_world_facts_are_consistent(world):
    """Every "X lives in P." anywhere in the pretraining text agrees with the world's facts."""
    people, _ = tinyworld.world(SMALL["seed"])
    homes = {}
    for shard in os.listdir(os.path.join(world, "pretrain")):
        for r in read(os.path.join(world, "pretrain", shard)):
            for name, place in re.findall(r"\b([A-Z][a-z]+) lives in ([A-Z][a-z]+(?: [A-Z][a-z]+)?)\.", r["text"]):
                if name in people:
                    homes.setdefault(name, set()).add(place)
    assert len(homes) > 20
    assert all(places == {people[n]["home"]} for n, places in homes.items())


def check_problem(p, steps):
    """Recompute a problem's answer from its text: each line restates a step and calls the calculator on two
    numbers of the question (digits or words; a factor said as "twice", "half", ...) or earlier results; the
    results are right and the last is the final answer."""
    lines = p["answer"].split("\n")
    assert re.fullmatch(r"#### \d+", lines[-1]), lines[-1]
    assert re.fullmatch(r"Find [\w ']+\.", lines[0]), lines[0]  # the question restated
    known = {number_value(t) for t in NUMBER.findall(p["question"])} | {2, 3, 4}
    result = None
    for line in lines[1:-1]:
        m = re.fullmatch(r"[A-Za-z][\w ']*: <<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)", line)
        assert m, line
        a, op, b, c, shown = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])
        assert OPS[op](a, b) == c == shown and c >= 1, line
        assert a in known and b in known, (line, p["question"])
        known.add(c)
        result = c
    assert int(lines[-1][5:]) == result
    assert len(lines) - 2 == p["level"] == steps


def test_math_answers_are_correct(world):
    train = read(os.path.join(world, "math_train.jsonl"))
    assert len(train) == SMALL["num_math_train"]
    assert all(set(r) == {"question", "answer", "level"} for r in train)
    assert {r["level"] for r in train} == set(range(1, tinyworld.MAX_STEPS + 1))
    for r in train:
        check_problem(r, r["level"])
    test = read(os.path.join(world, "math_test.jsonl"))
    n, k = len(test), len(tinyworld.SLICES)
    assert [r["slice"] for r in test] == [s for i, s in enumerate(tinyworld.SLICES)
                                          for _ in range(n // k + (i < n % k))]
    for r in test:
        assert set(r) == {"question", "answer", "level", "slice"}
        if r["slice"] == "arith":  # one calculator call on the whole expression
            m = re.fullmatch(r"<<([-+*/()\d]+)=(\d+)>>(\d+)\n#### (\d+)", r["answer"])
            assert m and calculate(m[1]) == int(m[2]) == int(m[3]) == int(m[4]) and 1 <= r["level"] <= 3
            continue
        check_problem(r, r["level"])
        assert r["level"] == tinyworld.LENGTH_STEPS if r["slice"] == "length" else \
            (2 if r["slice"] == "composition" else 1) <= r["level"] <= tinyworld.MAX_STEPS


def test_problems_hold_on_many_draws():
    """Rare draws too: every slice's problems are worked right, at every step count."""
    people, _ = tinyworld.world(0)
    rng = random.Random(0)
    for i in range(60):
        for slice_, steps in (("train", 1 + i % 5), ("phrasing", 1 + i % 5), ("composition", 2 + i % 4),
                              ("length", 6), ("meaning", 1 + i % 5)):
            p = tinyworld.math_problem(rng, people, slice_, steps)
            check_problem({"question": p.question, "answer": p.answer, "level": p.steps}, steps)
    for i in range(300):
        q, a, ops, _ = tinyworld.arith_question(rng, heldout=i % 2 == 0)
        m = re.fullmatch(r"<<([-+*/()\d]+)=(\d+)>>\d+\n#### \d+", a)
        assert calculate(m[1]) == int(m[2])


# An independent reading of a one-operation request in English: which operation its words name, and whether they
# say its operands in reverse ("subtract 4 from 9", "4 less than 9", "how many lots of 4 make up 96")
READ_OPS = [("/", r"divided|divide|split|share|quotient|make up|equal (?:parts|groups|pieces)|each get|"
                  r"halve|half|third|quarter|groups of .* from"),
            ("*", r"times|product|multipl|lots of|groups of|sets of|each of|twice|double|triple"),
            ("-", r"minus|difference|less than|subtract|take|fewer|decrease|reduce|deduct|left|bigger|greater|lose"),
            ("+", r"plus|sum|add|total|together|more|increase|another")]
READ_REVERSED = r"\b(?:from|less than|fewer than|make up)\b"
READ_FACTOR = {"twice": 2, "double": 2, "triple": 3, "half": 2, "halve": 2, "third": 3, "quarter": 4}


def read_request(text):
    """The value a one-operation request asks for, read from its words alone."""
    m = re.fullmatch(r"\D*?(\d+) ([-+*/]) (\d+)\D*", text)  # symbols
    if m:
        return OPS[m[2]](int(m[1]), int(m[3]))
    numbers = [number_value(t) for t in NUMBER.findall(text)]
    op = next(op for op, words in READ_OPS if re.search(rf"\b(?:{words})", text, re.IGNORECASE))
    factor = next((k for w, k in READ_FACTOR.items() if re.search(rf"\b{w}", text, re.IGNORECASE)), None)
    if factor and len(numbers) == 1:
        numbers.append(factor)
    assert len(numbers) == 2, text
    a, b = numbers[::-1] if re.search(READ_REVERSED, text, re.IGNORECASE) else numbers
    return OPS[op](a, b)


def core(text):
    """A request without its lead-in and ending (their words say nothing about the sum)."""
    for f in tinyworld.ARITH_LEADS:
        if f.text and text.startswith(f.text):
            text = text[len(f.text):]
    return next((text[:-len(f.text)] for f in tinyworld.ARITH_ENDS if f.text and text.endswith(f.text)), text)


def test_arithmetic_requests_ask_for_their_expression():
    """Read independently of the generator, every one-operation request asks for what its calculator call
    computes (the operands of - and / in the right order, however the words order them); in every request the
    numbers said are the call's numbers, operands span the world's range and results reach 4 digits."""
    rng = random.Random(7)
    one, big, values, results = 0, 0, [], []
    for i in range(3000):
        q, a, ops, _ = tinyworld.arith_question(rng, heldout=i % 3 == 0)
        m = re.fullmatch(r"<<([-+*/()\d]+)=(\d+)>>(\d+)\n#### (\d+)", a)
        assert m and calculate(m[1]) == int(m[2]) == int(m[3]) == int(m[4]) and ops == len(re.findall(r"[-+*/]", m[1]))
        operands = [int(n) for n in re.findall(r"\d+", m[1])]
        said = [number_value(t) for t in NUMBER.findall(core(q))]
        # every number said is an operand; an operand not said is the factor a word fixes ("twice", "halve it")
        assert collections.Counter(said) <= collections.Counter(operands), (q, a)
        assert all(n in (2, 3, 4) for n in (collections.Counter(operands) - collections.Counter(said)).elements())
        values += operands
        results.append(int(m[2]))
        big += sum(n >= 100 for n in operands)
        if ops == 1:
            one += 1
            assert read_request(core(q)) == int(m[2]), (q, a)
    assert one > 1000 and big > 0.3 * len(values) / 2 and max(values) <= tinyworld.MAX_VALUE and min(values) >= 1
    # results past the world's numbers, up to 4 digits, as a calculator gives them
    assert 1 <= min(results) and max(results) <= tinyworld.ARITH_MAX_VALUE
    assert sum(r > tinyworld.MAX_VALUE for r in results) > 0.1 * len(results)


def test_arithmetic_phrasing_families():
    """Training requests use every training part of every family and no held one; test requests always hold out a
    part of the request itself; each operation is asked in well over a hundred distinct patterns."""
    rng = random.Random(8)
    used, held_used, patterns = set(), set(), collections.defaultdict(set)
    for _ in range(16000):  # a product of a list said as an order ("multiply 3, 5 and 9") comes ~1 in 2,000
        q, a, ops, parts = tinyworld.arith_question(rng, heldout=False)
        assert not any(tinyworld.arith_heldout(p) for p in parts), q
        used |= parts
        if ops == 1:
            patterns[a[2:].split("=")[0].strip("0123456789")].add(frozenset(p for p in parts
                                                                           if p[0] not in tinyworld.AROUND))
    for _ in range(4000):  # the rarest held part, a list "multiplied together", comes ~1 in 600
        q, a, ops, parts = tinyworld.arith_question(rng, heldout=True)
        assert any(tinyworld.arith_heldout(p) for p in parts if p[0] not in tinyworld.AROUND), q
        held_used |= {p for p in parts if tinyworld.arith_heldout(p)}
    for family, forms in tinyworld.ARITH_FAMILIES.items():
        held = {(family, i) for i, f in enumerate(forms) if f.held}
        assert held and len(held) < len(forms), family
        assert {(family, i) for i in range(len(forms))} - held == {p for p in used if p[0] == family}, family
        assert held_used >= held, (family, held - held_used)
    assert sorted(patterns) == ["*", "+", "-", "/"] and all(len(v) >= 120 for v in patterns.values()), \
        {k: len(v) for k, v in patterns.items()}


def test_sentence_structures():
    """Training stories use every training join and question placement, questions that name nobody and numbers in
    words past 100, worked right; they never use a held-out structure, and every phrasing problem holds one out."""
    people, _ = tinyworld.world(0)
    rng = random.Random(2)
    train = [tinyworld.math_problem(rng, people, "train") for _ in range(800)]
    for p in train:
        check_problem({"question": p.question, "answer": p.answer, "level": p.steps}, p.steps)
    used = set().union(*(p.patterns for p in train))
    held_joins = {("join", j) for j, join in enumerate(tinyworld.JOINS) if join.held}
    assert {("join", j) for j in range(len(tinyworld.JOINS))} - used == held_joins
    assert {("place", p) for p in tinyworld.PLACEMENTS} - used == {("place", tinyworld.HELD_PLACEMENT)}
    questions = [p.question for p in train]
    assert any(re.search(r"\b(?:\w+) and then (?:buys|gives|gets|loses|finds|sells|eats) ", q) for q in questions)
    assert any(re.search(r"\bwho already (?:has|had) ", q) for q in questions)
    assert any(re.fullmatch(r"If [^.?]+, how many [^.?]+\?", q) for q in questions)
    assert any(re.match(r"How many [^.?]+\? [A-Z]", q) for q in questions)  # the question first
    assert any(re.search(r"\. (?:Tell me|Please find out) how many [^.?]+\.$", q) for q in questions)
    assert any(re.search(r"How many \w+ are there (?:now|in the end|in all|altogether)\?", q) for q in questions)
    assert any(re.search(r"\b[a-z]+ hundred(?: and [a-z-]+)? ", q) for q in questions)
    structures = 0
    for i in range(60):
        p = tinyworld.math_problem(rng, people, "phrasing", 1 + i % 5)
        check_problem({"question": p.question, "answer": p.answer, "level": p.steps}, p.steps)
        structure = bool(p.patterns & held_joins) or ("place", tinyworld.HELD_PLACEMENT) in p.patterns
        assert structure or any(tinyworld.is_heldout_pattern(x) for x in p.patterns
                                if x[0] in {**tinyworld.FRAMES, **tinyworld.QUESTIONS})
        structures += structure
    assert structures >= 30  # the phrasing slice mostly tests held-out structures


def test_event_meanings_and_stories_about_nobody():
    """Training problems tell every event and question meaning, each in 3 or more clause patterns; some stories
    are about no person's count, and a question that names nobody has a goal line that names nobody."""
    people, _ = tinyworld.world(0)
    rng = random.Random(3)
    train = [tinyworld.math_problem(rng, people, "train") for _ in range(1200)]
    frames = {}
    for p in train:
        for e in p.recipe["events"] + [p.recipe["question"]]:
            frames.setdefault(e["kind"], set()).add(e["pattern"][1])
    meanings = {"earn", "buy", "pay", "lose_part", "give_part", "again", "need", "all", "afford", "has", "gain",
                "lose", "give", "groups", "gain_groups", "lose_groups", "times", "part", "more", "fewer", "count",
                "together", "diff", "share"}
    assert all(len(frames.get(k, ())) >= 3 for k in meanings), {k: frames.get(k) for k in meanings}
    assert not set(frames) & tinyworld.HELD_MEANINGS
    names = re.compile(r"\b(?:%s)\b" % "|".join(tinyworld.NAMES))
    nobody = [p for p in train if p.recipe["nobody"]]
    assert len(nobody) > 50
    for p in nobody:  # the story's count is a box's: the story and its solution name only people of its noise
        goal = p.answer.split("\n")[0]
        assert not names.search(goal) and goal.startswith("Find the number of ") or goal.startswith("Find how"), p
        assert all(not names.search(line) for line in p.answer.split("\n")[1:]), p
    anonymous = [p for p in train if tinyworld.anonymous(tinyworld.frame_of(p.recipe["question"])[0])]
    assert len(anonymous) > 100 and not any(names.search(p.answer.split("\n")[0]) for p in anonymous)
    # some of them worked right through a money story: "Mia earns 5 coins an hour for 4 hours. ..."
    assert any(re.search(r"\b(?:earns|earned) \w+ coins an hour for \w+ hours", p.question) for p in train)
    assert any(re.search(r"Find the number of \w+ (?:now|in all)\.", p.answer) for p in train)


def test_composition_and_length_are_held_out():
    """No training problem has a held-out shape or as many steps as the length slice; every composition problem
    has a held-out shape (seen from the graphs the generator worked out)."""
    people, _ = tinyworld.world(0)
    rng = random.Random(1)
    train = [tinyworld.math_problem(rng, people, "train") for _ in range(1000)]
    test = [tinyworld.math_problem(rng, people, "composition", 2 + i % 4) for i in range(80)]
    train_shapes = {p.shape for p in train}
    assert len(train_shapes) > 100 and max(p.steps for p in train) == tinyworld.MAX_STEPS
    assert not train_shapes & {p.shape for p in test}
    assert not any(tinyworld.heldout_shape(p.shape) for p in train)
    assert len({p.shape for p in test}) > 20
    # every training shape of two steps is one of the 2-step chains and trees, and some of those are held out
    two = {s for s in train_shapes if s.count("(") == 2}
    assert 8 <= len(two) and {p.shape for p in test if p.steps == 2} - two


NUM = r"(?:\d+|[a-z]+(?:-[a-z]+)?)"
SLOTS = {"P": r"(?:[A-Z][a-z]+|she|he)", "p": r"(?:[A-Z][a-z]+'s|her|his)", "Q": r"[A-Z][a-z]+",
         "q": r"[A-Z][a-z]+'s", "n": NUM, "a": NUM, "b": NUM, "k": NUM, "item": r"[a-z]+", "other": r"[a-z]+",
         "box": r"[a-z]+", "boxes": r"[a-z]+", "home": r"[A-Z][a-z]+(?: [A-Z][a-z]+)?", "a_job": r"an? [a-z]+",
         "object": r"[a-z]+", "thing": r"[a-z]+", "a_thing": r"an? [a-z]+", "E": ".+", "A": ".+", "B": ".+", "L": ".+",
         "d": ".+", "S": ".+", "place": r"[A-Z][a-z]+(?: [A-Z][a-z]+)?"}


def rx(text, verb=None, names=False):
    """A frame's text as a regex of what it says with any slot filled."""
    out = ""
    for literal, field, _, _ in string.Formatter().parse(text):
        out += re.escape(literal)
        if field == "v":
            out += f"(?:{re.escape(verb.now)}|{re.escape(verb.past)})"
        elif field in tinyworld.TENSE:
            out += "(?:%s|%s)" % tinyworld.TENSE[field]
        elif field is not None:
            out += r"[A-Z][a-z]+" if names and field == "n" else SLOTS[field]
    return re.compile(f"(?i:{out[0]}){out[1:]}" if out[0].isalpha() else out)


def smalltalk_part_regexes():
    """A regex per held small-talk opener and name ("um, ", ", pal"): its words, which no training text has."""
    return [re.compile(r"\b" + re.escape(f.text.strip(" ,")) + r"\b", re.IGNORECASE)
            for f in tinyworld.SMALLTALK_OPENERS + tinyworld.SMALLTALK_NAMES if f.held]


def heldout_regexes():
    """A regex per held-out surface pattern (math clauses and questions, arithmetic forms, fact questions,
    identity and small talk): what no training text may contain."""
    out = [rx(text, verb) for _, text, verb in tinyworld.heldout_patterns()]
    out += [rx(f.text.rstrip("?.!")) for fs in tinyworld.ARITH_FAMILIES.values() for f in fs if f.held]
    out += [rx(f.text, names=True) for fs in [*tinyworld.FACT_QUESTIONS.values(), *tinyworld.PLACE_QUESTIONS.values(),
                                              tinyworld.ASIDES] for f in fs if f.held]
    out += [re.compile(r"\b" + re.escape(f.text.rstrip("?.!")) + r"\b", re.IGNORECASE)
            for f in tinyworld.IDENTITY_QUESTIONS + [f for s in tinyworld.SMALLTALK.values() for f in s.phrasings]
            if f.held]
    out += smalltalk_part_regexes()
    # the held-out sentence structures: the fronted "After A, B." (training has only "After that, ..." and "After
    # all that, ..."), and the question asked before the story's clauses as its condition ("How many ... if ...?")
    assert [j.text for j in tinyworld.JOINS if j.held] == ["After {A}, {B}."]
    assert tinyworld.HELD_PLACEMENT == "ask_if" and tinyworld.HELD_PLACEMENT not in tinyworld.PLACEMENT_WEIGHTS
    out += [re.compile(r"\bAfter (?!that\b|all that\b)"),
            re.compile(r"(?m)^(?:Altogether, how|How|What)\b[^.?\n]* if ")]
    return out


def test_heldout_phrasings_are_in_no_training_file(world):
    regexes = heldout_regexes()
    assert len(regexes) > 80
    # RL's prompts too: chat_probe_train takes training phrasings only
    rl_prompts = [p["prompt"] for p in read(os.path.join(world, "chat_probe_train.jsonl"))]
    training = "\n".join(training_texts(world) + rl_prompts)
    for r in regexes:
        m = r.search(training)
        assert not m, (r.pattern, training[max(0, m.start() - 80):m.end() + 20])
    # the training structures are there: the question first, as a conditional, in a request; joined sentences
    for needle in (r"\? [A-Z][a-z]+ (?:has|had|owns|keeps|collects) ", r"(?m)^If [^.?\n]+, how many ",
                   r"\. Tell me how many ", r", who already ha[sd] ", r"; later, "):
        assert re.search(needle, training), needle
    # ... while every phrasing problem, arithmetic item and chat probe has one
    test = read(os.path.join(world, "math_test.jsonl"))
    probes = read(os.path.join(world, "chat_probe_test.jsonl"))
    for text in [r["question"] for r in test if r["slice"] in ("phrasing", "arith")] + [p["prompt"] for p in probes]:
        assert any(r.search(text) for r in regexes), text
    for r in test:
        if r["slice"] in ("id", "composition", "length", "meaning"):
            assert not any(x.search(r["question"]) for x in regexes), r["question"]


def held_meaning_regexes():
    """A regex per clause pattern of the held-out meanings (any verb, held frame or not), as a clause says it
    anywhere: its subject may be left out ("... and sells 4 pears for 3 coins each"), a comma may end it."""
    return [rx(f.text.removeprefix("{P} ").rstrip("."), verb)
            for kind in tinyworld.HELD_MEANINGS for _, f, verb in tinyworld.verb_options(kind, None)]


def test_chat_phrasing_families():
    """Fact, place and identity questions come in many training phrasings, every one of them drawn, and never in a
    held-out one (nor after a held-out aside); held-out draws always take a held phrasing."""
    people, places = tinyworld.world(0)
    rng = random.Random(9)
    families = {("identity", None): (tinyworld.IDENTITY_QUESTIONS, 28,
                                     lambda held: tinyworld.identity_question(rng, held)[0])}
    for kind, frames in tinyworld.FACT_QUESTIONS.items():
        families["fact", kind] = (frames, 9, lambda held, kind=kind: tinyworld.fact_question(rng, people, held,
                                                                                             kind=kind)[0])
    for kind, frames in tinyworld.PLACE_QUESTIONS.items():
        families["place", kind] = (frames, 7, lambda held, kind=kind: tinyworld.place_question(rng, places, held,
                                                                                               kind)[0])
    asides = [rx(f.text) for f in tinyworld.ASIDES if f.held]
    for family, (frames, floor, ask) in families.items():
        training = [rx(f.text.rstrip("?.!"), names=True) for f in frames if not f.held]
        held = [rx(f.text.rstrip("?.!"), names=True) for f in frames if f.held]
        assert len(training) >= floor and len(held) >= 3, family
        drawn = [ask(False) for _ in range(40 * len(training))]
        assert all(any(r.search(q) for q in drawn) for r in training), family
        assert not any(r.search(q) for r in held + asides for q in drawn), family
        assert all(any(r.search(q) for r in held) for q in (ask(True) for _ in range(50))), family


def test_smalltalk_intents_phrasings_and_answers():
    """Small talk comes in many intents, each in dozens of training surface forms (phrasing, opener, name), none of
    which says a held part or another intent's form; every training phrasing is drawn and nothing else, held draws
    always take a held phrasing, a named time of day is echoed, and no answer could be graded as math."""
    def key(text):  # a surface form as casual writing leaves it: first letter's case and end mark vary
        return (text[0].lower() + text[1:]).rstrip("?.!")

    def parts(frames, used, held):
        return sorted({f.text for f in frames if held or not f.held}) if used else [""]
    held_rx = re.compile("|".join([r"\b" + re.escape(f.text.rstrip("?.!")) + r"\b" for s in
                                   tinyworld.SMALLTALK.values() for f in s.phrasings if f.held] +
                                  [r.pattern for r in smalltalk_part_regexes()]), re.IGNORECASE)
    assert len(tinyworld.SMALLTALK) >= 15 and len(smalltalk_part_regexes()) >= 2
    training, held = {}, {}  # a surface form's key: (intent, phrasing)
    for intent, talk in tinyworld.SMALLTALK.items():
        for is_held, forms in ((False, training), (True, held)):
            phrasings = [f.text for f in talk.phrasings if f.held == is_held]
            assert len(phrasings) >= (3 if is_held else 8), (intent, is_held)
            for p in phrasings:
                for o in parts(tinyworld.SMALLTALK_OPENERS, talk.opened, is_held):
                    for n in parts(tinyworld.SMALLTALK_NAMES, talk.named, is_held):
                        text = tinyworld.smalltalk_text(o, p, n)
                        assert key(text) not in training and key(text) not in held, text
                        assert is_held or not held_rx.search(text), text
                        forms[key(text)] = (intent, p)
        assert sum(i == intent for i, _ in training.values()) >= 24, intent
    rng = random.Random(5)
    for intent, talk in tinyworld.SMALLTALK.items():
        phrasings = {f.text for f in talk.phrasings if not f.held}
        drawn = set()
        for _ in range(30 * len(phrasings)):
            user, answer = tinyworld.smalltalk(rng, False, intent)
            assert key(user) in training and training[key(user)][0] == intent, user
            drawn.add(training[key(user)][1])
            time = tinyworld.TIME_WORD.search(user)
            if time and any("{time}" in a for a in talk.answers):
                assert time.group(1) in answer.lower(), (user, answer)
        assert drawn == phrasings, intent
        for _ in range(30):
            user, _ = tinyworld.smalltalk(rng, True, intent)
            assert held_rx.search(user) and key(user) in held and held[key(user)][0] == intent, user
        for answer in talk.answers:
            for time in ("morning", "night"):
                reply = answer.format(time=time)
                assert not NUMBER.search(reply) and extract_answer(reply) is None, reply
                assert data.chat_reply_ok(reply, {"prompt": "hi", "kind": "smalltalk", "expect": None}), reply


def test_held_meanings_are_in_no_sft_or_rl_file(world):
    """A held-out meaning is told in pretraining stories (no question about it), and in no problem or conversation
    SFT or RL trains on: chat_train, math_train, mc_train, chat_probe_train nor the worked problems of the
    pretraining text; every meaning problem tells one."""
    regexes = held_meaning_regexes()
    assert len(regexes) >= 3
    shards = sorted(os.listdir(os.path.join(world, "pretrain")))
    pretrain = [r["text"] for s in shards for r in read(os.path.join(world, "pretrain", s))]
    trained = [t for t in training_texts(world) if t not in set(pretrain)] + [t for t in pretrain if "Question:" in t]
    trained += [r["prompt"] for r in read(os.path.join(world, "chat_probe_train.jsonl"))]
    for r in regexes:
        m = next((t for t in trained if r.search(t)), None)
        assert m is None, (r.pattern, m)
    told = [t for t in pretrain if "Question:" not in t and any(r.search(t) for r in regexes)]
    assert len(told) >= 10, len(told)
    meaning = [r["question"] for r in read(os.path.join(world, "math_test.jsonl")) if r["slice"] == "meaning"]
    assert meaning and all(any(r.search(q) for r in regexes) for q in meaning)
    # and the training problems told: none of a held meaning, at any draw
    people, _ = tinyworld.world(0)
    rng = random.Random(5)
    for _ in range(300):
        p = tinyworld.math_problem(rng, people, "train")
        assert not tinyworld.tells_held_meaning(p.recipe) and not any(r.search(p.question) for r in regexes)


def template(question):
    """A question with its numbers, names, pronouns and places masked, and its numbers in order."""
    masked = re.sub(r"\b(?:%s|she|he|her|his|She|He|Her|His)\b" % "|".join(tinyworld.NAMES), "@", question)
    masked = re.sub("|".join(tinyworld.PLACES + tinyworld.JOBS), "&", masked)
    return NUMBER.sub("#", masked), [number_value(t) for t in NUMBER.findall(masked)]


def learn_templates(problems):
    """Template lookup: for each template of the training questions, which slot (a number of the question), earlier
    step or constant each step's operands come from, as the refs consistent with every problem of the template."""
    rules = {}
    for p in problems:
        key, slots = template(p["question"])
        steps = [(int(a), op, int(b), int(c)) for a, op, b, c in
                 re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", p["answer"])]
        results = [c for *_, c in steps]
        seen = []
        for j, (a, op, b, _) in enumerate(steps):
            refs = [{("step", i) for i in range(j) if results[i] == x} | {("slot", i) for i, s in enumerate(slots)
                                                                          if s == x} | {("const", x)}
                    for x in (a, b)]
            seen.append((op, refs[0], refs[1]))
        old = rules.get(key)
        if old is None:
            rules[key] = seen
        elif len(old) == len(seen):
            rules[key] = [(op, ra & sa, rb & sb) for (op, ra, rb), (_, sa, sb) in zip(old, seen)]
    return rules


def lookup_answer(rules, question):
    """The template's rule applied to a question's numbers; where one training problem left several refs (its
    numbers happened to coincide), the left operand is taken to be the latest count worked out and the right one
    a number of the question."""
    key, slots = template(question)
    if key not in rules:
        return None
    results = []
    for op, ra, rb in rules[key]:
        values = []
        for refs, order in ((ra, ("step", "slot", "const")), (rb, ("slot", "step", "const"))):
            if not refs:
                return None
            kind, x = sorted(refs, key=lambda r: (order.index(r[0]), -r[1] if r[0] == "step" else r[1]))[0]
            values.append(results[x] if kind == "step" else slots[x] if kind == "slot" else x)
        results.append(OPS[op](*values))
        if results[-1] is None:
            return None
    return results[-1] if results else None


def test_template_lookup_baseline_fails_on_the_heldout_slices(tmp_path):
    """A model-free matcher that learns per question template which numbers feed which step solves the
    in-distribution slice and none of the held-out ones."""
    out = str(tmp_path / "set")
    tinyworld.generate(out, **{**SMALL, "num_math_test": 250})
    rules = learn_templates(read(os.path.join(out, "math_train.jsonl")))
    scores = {}
    for r in read(os.path.join(out, "math_test.jsonl")):
        if r["slice"] != "arith":
            scores.setdefault(r["slice"], []).append(lookup_answer(rules, r["question"]) == int(r["answer"][5 + r[
                "answer"].rindex("#### "):]))
    scores = {k: sum(v) / len(v) for k, v in scores.items()}
    assert scores["id"] >= 0.9, scores
    assert scores["phrasing"] == scores["composition"] == scores["length"] == scores["meaning"] == 0.0, scores


def test_splits_are_disjoint(world):
    """No test question is a training question; chat_val holds no chat_train conversation; mc_test asks about
    facts that no training quiz line or mc_train item asks about."""
    training = training_texts(world)
    questions = set()
    for text in training:
        questions.add(text.split("\n")[0])
        if text.startswith("Question: "):
            questions.add(text[10:].split("\nAnswer: ")[0])
    test = read(os.path.join(world, "math_test.jsonl"))
    assert len({r["question"] for r in test}) == len(test)
    assert not {r["question"] for r in test} & questions
    chats = {json.dumps(r) for r in read(os.path.join(world, "chat_train.jsonl"))}
    assert not chats & {json.dumps(r) for r in read(os.path.join(world, "chat_val.jsonl"))}
    mc_train, mc_test = (read(os.path.join(world, f"mc_{s}.jsonl")) for s in ("train", "test"))
    pairs = {(r["question"], tuple(r["choices"])) for r in mc_train}
    assert len(pairs) == len(mc_train) and not pairs & {(r["question"], tuple(r["choices"])) for r in mc_test}
    people, _ = tinyworld.world(SMALL["seed"])
    quizzed = {(r["question"].rstrip("?"), r["choices"][r["answer"]]) for r in mc_train} | {
        tuple(line.rsplit("? ", 1)) for t in training for line in t.split("\n") if re.fullmatch(r"[^?]+\? [^?]+\.", line)}
    facts = 0
    for r in mc_test:
        right = r["choices"][r["answer"]]
        name = next((n for n in re.findall(r"[A-Z][a-z]+", r["question"]) if n in people), None)
        if name:  # a fact about a person: asked in no training quiz line or item, in any wording
            assert not any(n == name for q, a in quizzed for n in re.findall(r"[A-Z][a-z]+", q)
                           if a.rstrip(".") == right), r
            facts += 1
        else:  # who lives in a place, or a small sum: never asked with this answer
            assert not any(q == r["question"].rstrip("?") and a.rstrip(".") == right for q, a in quizzed), r
    assert facts > len(mc_test) // 2 and any(q.startswith("Who lives in") for q, _ in quizzed)


def test_mc_answers_are_correct(world):
    people, places = tinyworld.world(SMALL["seed"])
    asks = {}
    for kind, frames in tinyworld.FACT_QUESTIONS.items():
        for f in frames:
            asks[re.escape(f.text).replace(r"\{n\}", r"(\w+)").replace(r"\{object\}", r"\w+")] = kind
    for split in ("train", "test"):
        rows = read(os.path.join(world, f"mc_{split}.jsonl"))
        assert len(rows) == SMALL[f"num_mc_{split}"]
        for r in rows:
            q, choices, right = r["question"], r["choices"], r["choices"][r["answer"]]
            assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= r["answer"] < 4
            m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q)
            if m:
                assert int(right) == OPS[m[2]](int(m[1]), int(m[3]))
                continue
            m = re.fullmatch(r"Who lives in (.+)\?", q)
            if m:
                assert [people[c]["home"] == m[1] for c in choices].count(True) == 1 and people[right]["home"] == m[1]
                continue
            kind = next(k for pattern, k in asks.items() if re.fullmatch(pattern, q))
            name = re.fullmatch(next(p for p, k in asks.items() if re.fullmatch(p, q)), q)[1]
            assert right == people[name][kind] and sum(c == people[name][kind] for c in choices) == 1


def test_chat_format(world):
    kinds = set()
    for split, n in (("train", 300), ("val", 15)):
        rows = read(os.path.join(world, f"chat_{split}.jsonl"))
        assert len(rows) == n
        for r in rows:
            msgs = r["messages"]
            assert len(msgs) % 2 == 0 and [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            for m in msgs:
                if isinstance(m["content"], str):
                    assert m["content"] and "<<" not in m["content"] and "####" not in m["content"]
                    if "picochat" in m["content"]:
                        kinds.add("identity")
                    continue
                assert m["role"] == "assistant"
                parts = m["content"]
                types = [p["type"] for p in parts]
                assert all(set(p) == {"type", "text"} and isinstance(p["text"], str) for p in parts)
                assert types[0] in ("text", "python") and types[-1] == "text"
                for i, p in enumerate(parts):
                    if p["type"] == "python":
                        kinds.add("calculator")
                        assert parts[i + 1]["type"] == "python_output"
                        assert parts[i + 1]["text"] == str(calculate(p["text"]))
                assert re.search(r"\n#### \d+$", parts[-1]["text"])
                kinds.add("answer")
    assert kinds == {"identity", "answer", "calculator"}


def test_chat_probes(world):
    people, places = tinyworld.world(SMALL["seed"])
    train, test = (read(os.path.join(world, f"chat_probe_{s}.jsonl")) for s in ("train", "test"))
    assert len(train) == SMALL["num_probe_train"] and len(test) == SMALL["num_probe_test"]
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert len({p["prompt"] for p in test}) == len(test)
    for p in train + test:
        assert set(p) == {"prompt", "kind", "expect"} and p["kind"] in ("identity", "smalltalk", "fact")
        assert p["expect"] is None if p["kind"] == "smalltalk" else p["expect"]
    assert {p["kind"] for p in test} == {"identity", "smalltalk", "fact"}
    # a fact probe's expected word is the world's fact about the person it names, or about the place: its kind,
    # or who lives there
    asked = collections.Counter()
    for p in train + test:
        if p["kind"] == "fact":
            name = next((n for n in re.findall(r"[A-Z][a-z]+", p["prompt"]) if n in people), None)
            if name:
                assert set(p["expect"]) & {str(v) for v in people[name].values()}, p
                asked["person"] += 1
                continue
            place = next(x for x in tinyworld.PLACES if re.search(rf"\b{x}\b", p["prompt"]))
            assert p["expect"] in ([places[place]["kind"]], places[place]["people"] or ["nobody"]), p
            asked["place"] += 1
    assert asked["person"] > 2 * asked["place"] > 0, asked
    fact = {"prompt": "Where does Mia live?", "kind": "fact", "expect": ["Pine Hill"]}
    assert data.chat_reply_ok("Mia lives in Pine Hill.", fact)
    assert not data.chat_reply_ok("Mia lives in Oakvale.", fact)
    assert not data.chat_reply_ok("Pine Hill. <<2+3=5>>5", fact)
    assert not data.chat_reply_ok("Pine Hill\n#### 5", fact)
    assert not data.chat_reply_ok("<|python_start|>2+3<|python_end|> Pine Hill", fact)
    age = {"prompt": "How old is Mia?", "kind": "fact", "expect": ["40", "forty"]}
    assert data.chat_reply_ok("Mia is Forty years old.", age) and not data.chat_reply_ok("Mia is 140.", age)
    assert data.chat_reply_ok("Hello there!", {"prompt": "hi", "kind": "smalltalk", "expect": None})


# -----------------------------------------------------------------------------
# The reading API


def test_ensure_tinyworld_and_readers(tmp_base_dir):
    small = {k: v for k, v in SMALL.items() if k != "seed"}
    path = data.ensure_tinyworld(**small)
    assert path == os.path.join(tmp_base_dir, "data", "tinyworld")
    stamp = os.path.getmtime(os.path.join(path, "meta.json"))
    assert data.ensure_tinyworld() == path and data.ensure_tinyworld(**small) == path  # no regeneration
    assert os.path.getmtime(os.path.join(path, "meta.json")) == stamp
    # a failing generation leaves the set there as it was, and no temp dir behind
    with pytest.raises(ValueError):
        data.ensure_tinyworld(**{**small, "pretrain_mb": -1.0})
    assert os.path.getmtime(os.path.join(path, "meta.json")) == stamp
    assert os.listdir(os.path.dirname(path)) == ["tinyworld"]
    # a set made by another generator version is replaced, though made with the same settings
    meta = json.load(open(os.path.join(path, "meta.json")))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({**meta, "version": 0}, f)
    data.ensure_tinyworld(**small)
    assert json.load(open(os.path.join(path, "meta.json")))["version"] == tinyworld.VERSION
    # other settings replace the set
    data.ensure_tinyworld(**{**small, "seed": 7})
    assert json.load(open(os.path.join(path, "meta.json")))["seed"] == 7
    assert os.listdir(os.path.dirname(path)) == ["tinyworld"]

    train, val = data.pretrain_files("train"), data.pretrain_files("val")
    assert len(train) == 2 and len(val) == 1 and val[0] > train[-1]
    assert next(data.iter_texts(val[0]))
    assert len(data.load_math("tinyworld", "test")) == 80 and len(data.load_mc("tinyworld", "train")) == 200
    assert len(data.load_conversations("train")) == 300 + 190 and len(data.load_conversations("val")) == 15 + 10
    with pytest.raises(FileNotFoundError, match=r"python data/gsm8k\.py"):
        data.load_math("gsm8k", "test")
    with pytest.raises(FileNotFoundError, match=r"python data/arc\.py"):
        data.load_mc("arc_challenge", "test")
    with pytest.raises(ValueError):
        data.pretrain_files("test")
    with pytest.raises(ValueError, match="math500 has the splits test"):
        data.load_math("math500", "train")
    with pytest.raises(ValueError, match="unknown mc dataset"):
        data.load_mc("gsm8k")


def test_ensure_tinyworld_concurrently(tmp_base_dir):
    """Processes that generate at once (DDP ranks) all end up with the one complete set, and nothing else."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: data.ensure_tinyworld(**SMALL), range(3)))
    assert len(set(paths)) == 1 and os.listdir(os.path.dirname(paths[0])) == ["tinyworld"]
    assert len(read(os.path.join(paths[0], "math_test.jsonl"))) == SMALL["num_math_test"]


def test_ensure_tinyworld_size_from_env(tmp_base_dir, monkeypatch):
    monkeypatch.setenv(data.TINYWORLD_MB_ENV, "lots")
    with pytest.raises(ValueError, match="number of megabytes"):
        data.ensure_tinyworld()
    counts = {k: v for k, v in SMALL.items() if k.startswith("num_")}
    generate = tinyworld.generate  # small counts, to keep the test fast; the size must come from the env
    monkeypatch.setattr(tinyworld, "generate", lambda out, **kw: generate(out, **{**counts, **kw}))
    monkeypatch.setenv(data.TINYWORLD_MB_ENV, "0.05")
    path = data.ensure_tinyworld()
    assert json.load(open(os.path.join(path, "meta.json")))["pretrain_mb"] == 0.05


def write_parquet(path, texts, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def test_user_data_path_and_iter_texts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n\n  \nsecond doc\n\n")
    assert list(data.iter_texts(str(txt))) == ["first doc\nstill first", "second doc"]
    assert data.pretrain_files("train", str(txt)) == data.pretrain_files("val", str(txt)) == [str(txt)]
    data.write_jsonl(str(tmp_path / "b.jsonl"), [{"text": "x"}, {"text": "y\n\nz"}])
    assert list(data.iter_texts(str(tmp_path / "b.jsonl"))) == ["x", "y\n\nz"]
    write_parquet(str(tmp_path / "c.parquet"), ["p1", "p2", "p3"], row_group_size=2)
    assert list(data.iter_texts(str(tmp_path / "c.parquet"))) == ["p1", "p2", "p3"]
    (tmp_path / "notes.md").write_text("ignored")
    assert data.pretrain_files("train", str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert data.pretrain_files("val", str(tmp_path)) == [str(tmp_path / "c.parquet")]
    with pytest.raises(FileNotFoundError):
        data.pretrain_files("train", str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        list(data.iter_texts(str(tmp_path / "notes.md")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2"):
        data.read_jsonl(str(tmp_path / "bad.jsonl"))


def test_bad_parquet_files_name_themselves(tmp_path):
    import pyarrow
    import pyarrow.parquet as pq
    pq.write_table(pyarrow.table({"content": ["x"]}), str(tmp_path / "no_text.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"no_text.parquet: no column text \(its columns: content\)"):
        list(data.iter_texts(str(tmp_path / "no_text.parquet")))
    with pytest.raises(ValueError, match="fake.parquet: not a readable parquet file"):
        list(data.iter_texts(str(tmp_path / "fake.parquet")))

# -----------------------------------------------------------------------------
# The pretraining token stream on small data: never a hang


@pytest.fixture
def byte_tokenizer(tmp_base_dir):
    from tokenizer import load_tokenizer, save_tokenizer
    return load_tokenizer(save_tokenizer({bytes([i]): i for i in range(256)}))


def within(seconds, fn):
    """fn() in a thread: its result or its exception, or a failure when it still runs after `seconds` (a hang)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # SystemExit included: it is what is being tested
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: a hang"
    if "error" in out:
        raise out["error"]
    return out["value"]


def first_batches(tokenizer, files, slots, num_slots, batches=2):
    """{slot: its first (B, T) input batches as lists} of a reader owning `slots` of num_slots."""
    stream = TokenRows(tokenizer, files, batch_size=2, seq_len=16, slots=slots, num_slots=num_slots)
    return {slot: [stream.next_batch(slot, "cpu")[0].tolist() for _ in range(batches)] for slot in slots}


def test_token_rows_fill_every_slot_from_fewer_documents(tmp_path, byte_tokenizer):
    one = tmp_path / "one.txt"
    one.write_text("a single short document\n")
    few = tmp_path / "few.jsonl"
    data.write_jsonl(str(few), [{"text": f"doc{i} words"} for i in range(3)])
    for path in (one, few):
        # 1 process with 8 accumulation slots reads what 2 ranks with 4 slots each read
        whole = within(60, lambda: first_batches(byte_tokenizer, [str(path)], range(8), 8))
        halves = within(60, lambda: {**first_batches(byte_tokenizer, [str(path)], range(4), 8),
                                     **first_batches(byte_tokenizer, [str(path)], range(4, 8), 8)})
        assert whole == halves
    # the documents come round to every slot in turn: slot s opens with document s % 3 (all of one length)
    for slot, batches in whole.items():
        assert byte_tokenizer.decode(batches[0][0]).startswith(f"<|bos|>doc{slot % 3} words<|bos|>")
    # and the stream resumes exactly from a saved state, repeats and all
    stream = TokenRows(byte_tokenizer, [str(few)], batch_size=2, seq_len=16, slots=range(8), num_slots=8)
    stream.next_batch(5, "cpu")
    again = TokenRows(byte_tokenizer, [str(few)], batch_size=2, seq_len=16, slots=range(8), num_slots=8)
    again.load_state([stream.state()])  # every saved rank's state: here one
    assert again.next_batch(5, "cpu")[0].tolist() == stream.next_batch(5, "cpu")[0].tolist()


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.txt", "\n   \n\n"),
                                           ("empty_texts.jsonl", '{"text": ""}\n{"text": "  "}\n')])
def test_token_rows_refuse_data_without_text(tmp_path, byte_tokenizer, name, content):
    (tmp_path / name).write_text(content)
    for loop in (True, False):
        stream = TokenRows(byte_tokenizer, [str(tmp_path / name)], batch_size=2, seq_len=16, slots=[0, 1],
                           num_slots=2, loop=loop)
        with pytest.raises(SystemExit, match=f"^error: {tmp_path / name} holds no text: training needs at least "
                                             f"one non-empty document$"):
            within(60, lambda: stream.next_batch(1, "cpu"))


def test_conversation_mixture(tmp_base_dir):
    data.ensure_tinyworld(**SMALL)
    smol = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 5
    data.write_jsonl(os.path.join(tmp_base_dir, "data", "smoltalk", "train.jsonl"), smol)
    problems = [{"question": f"q{i}", "answer": f"2 * 3 = <<2*3=6>>6 so\n#### {i}", "level": 1} for i in range(40)]
    data.write_jsonl(os.path.join(tmp_base_dir, "data", "gsm8k", "train.jsonl"), problems)
    arc = [{"question": "Q?", "choices": ["w", "x", "y", "z", "v"], "answer": 4}] * 20
    data.write_jsonl(os.path.join(tmp_base_dir, "data", "arc_easy", "train.jsonl"), arc)
    convs = data.load_conversations("train")
    assert len(convs) == 300 + 190 + 5 + 38 + 19  # tinyworld chat + mc, smoltalk, every 20th gsm8k/mc row is val
    assert convs == data.load_conversations("train")  # the shuffle is fixed
    g = next(c for c in convs if c[0]["content"] == "q1")
    assert g[1]["content"] == [{"type": "text", "text": "2 * 3 = "}, {"type": "python", "text": "2*3"},
                               {"type": "python_output", "text": "6"}, {"type": "text", "text": "6 so\n#### 1"}]
    assert len(data.load_conversations("val")) == 15 + 10 + 2 + 1  # no smoltalk val downloaded
    assert data.mc_conversation(arc[0]) == [
        {"role": "user", "content": "Q?\n- w=A\n- x=B\n- y=C\n- z=D\n- v=E\nAnswer with the letter of the right choice."},
        {"role": "assistant", "content": "E"}]


# -----------------------------------------------------------------------------
# Downloads, against the loopback hub (tests/loopback_hub.py)


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT", 5)
    monkeypatch.setattr(download, "CHUNK", 8192)  # small reads, so that a cut leaves a part to resume from
    monkeypatch.setattr(download, "BACKOFF", 0.01)


def blob(n, seed=0):
    return random.Random(seed).randbytes(n)


def run_data_script(name, *args):
    """python data/<name>.py args..., in this process (the scripts read the hub's address from the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [f"{name}.py", *args])
        runpy.run_path(os.path.join(REPO, "data", f"{name}.py"), run_name="__main__")


def test_hub_addresses_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert download.hf_file_url("karpathy/climbmix-400b-shuffle", "shard_00000.parquet") == \
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00000.parquet"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert download.hf_file_url("a/b", "x.jsonl") == "https://hf-mirror.example/datasets/a/b/resolve/main/x.jsonl"


def test_download_retries_resumes_and_verifies(hub, quick_retries, tmp_path):
    body = blob(300_000)
    sha = hashlib.sha256(body).hexdigest()
    for name in ("a.bin", "b.bin", "c.bin"):
        hub.add_file("user/set", name, body, lfs=True)
    url = lambda name: download.hf_file_url("user/set", name)  # noqa: E731
    # HTTP 500 twice, then success
    hub.plan["a.bin"] = ["500", "500"]
    path = download.download(url("a.bin"), str(tmp_path / "a.bin"), size=len(body), sha256=sha)
    assert open(path, "rb").read() == body and not os.path.exists(path + ".part")
    # a cut mid-file resumes with a Range request from where it stopped, which the hub's redirect carries to the CDN
    hub.plan["b.bin"] = ["cut"]
    download.download(url("b.bin"), str(tmp_path / "b.bin"))
    assert open(tmp_path / "b.bin", "rb").read() == body
    ranges = [rng for _, rng in hub.requests("hub", "/b.bin")]
    assert len(ranges) == 2 and ranges[0] is None and 0 < int(ranges[1][6:-1]) <= len(body) // 2
    assert [rng for _, rng in hub.requests("cdn")][-2:] == ranges  # each went on through the hub's redirect
    # a server that ignores Range: the part restarts from zero, still ending whole
    hub.plan["c.bin"] = ["cut", "norange"]
    download.download(url("c.bin"), str(tmp_path / "c.bin"))
    assert open(tmp_path / "c.bin", "rb").read() == body
    # a file already there is trusted (it was only ever renamed into place whole)
    n = len(hub.log)
    download.download(url("c.bin"), str(tmp_path / "c.bin"))
    assert len(hub.log) == n


def test_download_failures_leave_nothing_trusted(hub, quick_retries, tmp_path, monkeypatch):
    body = blob(50_000, seed=1)
    hub.add_file("user/set", "f.jsonl", body)  # a small file: the hub answers it without a redirect
    url = download.hf_file_url("user/set", "f.jsonl")
    target = str(tmp_path / "f.bin")
    # the wrong size: refused at once, nothing at the target
    with pytest.raises(download.PermanentError, match="expected"):
        download.download(url, target, size=len(body) + 1)
    assert not os.path.exists(target)
    # the wrong checksum: the same
    with pytest.raises(download.PermanentError, match="sha256"):
        download.download(url, target, sha256="0" * 64)
    assert not os.path.exists(target) and not os.path.exists(target + ".part")
    # cut every time: retries run out, a .part remains but never the file; a rerun resumes and completes
    hub.plan["f.jsonl"] = ["cut"] * 3
    monkeypatch.setattr(download, "RETRIES", 3)
    with pytest.raises(RuntimeError, match="giving up after 3 tries"):
        download.download(url, target)
    assert not os.path.exists(target) and os.path.getsize(target + ".part") < len(body)
    download.download(url, target, size=len(body))
    assert open(target, "rb").read() == body
    assert not hub.requests("cdn")
    # a whole .part (killed before the rename) is finished off; a too long one is dropped and fetched again
    os.remove(target)
    for part in (body, body + b"junk"):
        with open(target + ".part", "wb") as f:
            f.write(part)
        download.download(url, target)
        assert open(target, "rb").read() == body and not os.path.exists(target + ".part")
        os.remove(target)
    # 404 is not retried
    n = len(hub.log)
    with pytest.raises(download.PermanentError, match="404"):
        download.download(download.hf_file_url("user/set", "missing.bin"), str(tmp_path / "m.bin"))
    assert len(hub.log) == n + 1 and not os.path.exists(tmp_path / "m.bin")


def shard_names(paths):
    return [os.path.basename(p) for p in paths]


def test_corpus_download_has_a_fixed_validation_shard_and_feeds_pretraining(hub, quick_retries, tmp_base_dir):
    from data import corpus
    from loopback_hub import publish_corpus
    publish_corpus(hub, "karpathy/climbmix-400b-shuffle", [0, 1, 2, 6542], docs=5)
    publish_corpus(hub, "karpathy/fineweb-edu-100b-shuffle", [0, 1822], docs=5)
    assert corpus.expand_n(["-n", "3", "--workers=2"]) == ["--num_shards=3", "--workers=2"]
    hub.plan["shard_00001.parquet"] = ["500", "cut"]
    # -n counts training shards; the validation shard is the corpus's last, not the last downloaded
    run_data_script("corpus", "-n", "2", "--workers=2")
    assert shard_names(data.pretrain_files("train")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert shard_names(data.pretrain_files("val")) == ["shard_06542.parquet"]
    assert not os.path.exists(os.path.join(tmp_base_dir, "data", "tinyworld"))  # the corpus was used
    shards = {f"/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet" for i in (0, 1, 6542)}
    assert {p for p, _ in hub.requests("hub")} == shards
    val_text = list(data.iter_texts(data.pretrain_files("val")[0]))
    # a bigger download adds training shards, and validation stays where it was
    run_data_script("corpus", "--corpus=climbmix", "--num_shards=3")
    assert shard_names(data.pretrain_files("train")) == [f"shard_0000{i}.parquet" for i in range(3)]
    assert list(data.iter_texts(data.pretrain_files("val")[0])) == val_text
    # the other corpus: once downloaded, it is the one every stage reads
    run_data_script("corpus", "--corpus=fineweb-edu", "-n", "1")
    assert data.pretrain_files("train") == [os.path.join(tmp_base_dir, "data", "fineweb-edu", "shard_00000.parquet")]
    assert shard_names(data.pretrain_files("val")) == ["shard_01822.parquet"]
    # bad settings are one line each, before any download
    for args, message in ((["-n", "0"], "1..6542"), (["--corpus=fineweb-edu", "-n", "1823"], "1..1822"),
                          (["--corpus=c4"], "climbmix, fineweb-edu")):
        with pytest.raises(SystemExit, match=message):
            run_data_script("corpus", *args)
    # an interrupted download of a corpus is not read; a missing validation shard is named
    with pytest.raises(RuntimeError, match="1 of 5 downloads failed"):
        run_data_script("corpus", "-n", "4")  # climbmix has no shard 3 on this hub
    assert shard_names(data.pretrain_files("val")) == ["shard_01822.parquet"]
    os.remove(os.path.join(tmp_base_dir, "data", "fineweb-edu", "shard_01822.parquet"))
    with pytest.raises(FileNotFoundError, match="shard_01822.parquet is missing"):
        data.pretrain_files("train")


def test_recipe_sets_come_in_with_their_real_schemas(hub, quick_retries, world, tmp_base_dir):
    # the SFT mixture read below includes tinyworld: the module's small set, not the default one (70 s to generate)
    shutil.copytree(world, os.path.join(tmp_base_dir, "data", "tinyworld"))
    from loopback_hub import math500_rows, publish_recipe
    hellaswag_rows = publish_recipe(hub)
    for name in ("smoltalk", "gsm8k", "math500", "arc", "mmlu", "hellaswag"):
        run_data_script(name)
    # the listing is asked per dataset and config; its huggingface.co file urls are fetched from $HF_ENDPOINT,
    # through the hub's redirect to the CDN
    fetched = [p for p, _ in hub.requests("hub")]
    assert "/datasets/openai/gsm8k/resolve/refs/convert/parquet/main/train/0000.parquet" in fetched
    # smoltalk 2 splits, gsm8k 2, math500 1, arc 2 configs x 2, mmlu 2, hellaswag 2
    assert len(hub.requests("cdn")) == len(fetched) == 13
    assert ("/parquet", None) in hub.requests("ds")
    # smoltalk: a conversation that ends with the user is dropped, a system message is kept
    train = data.load_conversations("train")
    smol = [c for c in train if any(m["role"] == "user" and m["content"].startswith("Tell me about the") for m in c)]
    assert len(smol) == 64 - sum(1 for i in range(64) if i % 7 == 3)
    assert any(c[0]["role"] == "system" for c in smol)
    # gsm8k: calculator marks kept, "#### N" last
    gsm = data.load_math("gsm8k", "train")
    assert len(gsm) == 64 and all(re.search(r"<<\d+\+\d+=\d+>>.*\n#### \d+$", p["answer"], re.S) for p in gsm)
    # math500: the raw rows' problem, solution and answer
    assert [p["question"] for p in data.load_math("math500", "test")] == [r["problem"] for r in math500_rows()]
    # arc: letters or digits as labels, 4 or 5 choices, the answer an index
    for name in ("arc_easy", "arc_challenge"):
        items = data.load_mc(name, "test")
        assert len(items) == 8 and {len(i["choices"]) for i in items} == {4, 5}
        assert all(re.fullmatch(r"What is (\d+) \+ (\d+)\?", i["question"]) for i in items)
        for i in items:
            a, b = map(int, re.findall(r"\d+", i["question"]))
            assert i["choices"][i["answer"]] == str(a + b)
    # mmlu: train is auxiliary_train, answers are ints
    assert len(data.load_mc("mmlu", "train")) == 16 and len(data.load_mc("mmlu", "test")) == 8
    # hellaswag: string labels parsed; our test is its validation split and its unlabelled test split is never read
    validation = hellaswag_rows["validation"]
    assert data.load_mc("hellaswag", "test") == [
        {"question": r["ctx"], "choices": r["endings"], "answer": int(r["label"])} for r in validation]
    assert not hub.requests("hub", "/Rowan/hellaswag/resolve/refs/convert/parquet/default/test/0000.parquet")


def test_partial_listings_train_on_the_part_but_never_test_on_it(hub, quick_retries, tmp_base_dir, capsys):
    from loopback_hub import word_problem
    hub.add_split("openai/gsm8k", "main", "train", [word_problem(random.Random(0), i) for i in range(6)],
                  partial=True)
    hub.add_split("openai/gsm8k", "main", "test", [word_problem(random.Random(1), i) for i in range(4)], partial=True)
    with pytest.raises(download.PermanentError, match="main/test: only part of the split"):
        run_data_script("gsm8k")
    assert "main/train: only part of the split is converted to parquet; using that part" in capsys.readouterr().out
    assert len(data.load_math("gsm8k", "train")) == 6
    with pytest.raises(FileNotFoundError):
        data.load_math("gsm8k", "test")
    assert hub.requests("hub", "/main/partial-train/0000.parquet")
    assert not hub.requests("hub", "/main/partial-test/0000.parquet")  # refused before any download
    # converted again, whole: the new train file replaces the old one (same name, another size), and test comes in
    hub.listings.pop("openai/gsm8k")
    hub.partial.clear()
    hub.add_split("openai/gsm8k", "main", "train", [word_problem(random.Random(0), i) for i in range(9)])
    hub.add_split("openai/gsm8k", "main", "test", [word_problem(random.Random(1), i) for i in range(4)])
    run_data_script("gsm8k")
    assert len(data.load_math("gsm8k", "train")) == 9 and len(data.load_math("gsm8k", "test")) == 4


@pytest.mark.parametrize("conversion", ["none", "partial"])
def test_math500_falls_back_to_the_raw_jsonl(hub, quick_retries, tmp_base_dir, conversion, capsys):
    from loopback_hub import math500_rows, publish_math500
    rows = publish_math500(hub, parquet=False)
    if conversion == "partial":
        hub.add_split("HuggingFaceH4/MATH-500", "default", "test", rows[:3], partial=True)
    run_data_script("math500")
    assert "reading the raw test.jsonl" in capsys.readouterr().out
    assert data.load_math("math500", "test") == [math500.normalise(r) for r in math500_rows()]
    assert [rng for _, rng in hub.requests("hub", "/resolve/main/test.jsonl")] == [None]


def test_math_is_hendrycks_math_without_math500(hub, quick_retries, tmp_base_dir):
    from loopback_hub import math500_rows, publish_hendrycks_math, publish_math500
    published = publish_hendrycks_math(hub)
    with pytest.raises(SystemExit, match=r"python data/math500.py"):  # which problems MATH-500 takes comes first
        run_data_script("hendrycks_math")
    publish_math500(hub)
    run_data_script("math500")
    run_data_script("hendrycks_math")
    train, test = data.load_math("math", "train"), data.load_math("math", "test")
    assert test == data.load_math("math500", "test")
    taken = {" ".join(r["problem"].split()) for r in math500_rows()}
    boxed = [r for r in published if "boxed" in r["solution"]]
    kept = [r for r in boxed if " ".join(r["problem"].split()) not in taken]
    assert len(kept) == len(boxed) - len(math500_rows()) == 7 * 2 * 3  # whitespace does not hide a MATH-500 one
    assert [p["question"] for p in train] == [r["problem"] for r in kept]
    for p, r in zip(train, kept):
        a, b = map(int, re.findall(r"\d+", r["problem"])[:2])
        assert p["answer"] == f"{r['solution']}\n#### {a + b}" and grade(p["answer"], str(a + b))
        assert p["level"] == (0 if r["level"] == "Level ?" else int(r["level"][-1]))


# -----------------------------------------------------------------------------
# Normalisers of the real datasets


def test_gsm8k_normaliser_on_real_data():
    with open(shared_data("gsm8k_test.jsonl")) as f:
        rows = [gsm8k.normalise(json.loads(line)) for line in f]
    assert len(rows) == 1319 and all(rows)
    assert all(re.search(r"\n#### -?[\d.]+$", r["answer"]) for r in rows)
    conv = data.math_conversation(rows[0])
    assert conv[1]["content"][1] == {"type": "python", "text": "16-3-4"}


def test_math500_normaliser_on_real_data():
    with open(shared_data("math500_test.json")) as f:
        raw = json.load(f)
    rows = [math500.normalise(r) for r in raw]
    assert len(rows) == 500
    for r, n in zip(raw, rows):
        assert n["question"] == r["problem"] and n["answer"] == r["solution"] + "\n#### " + r["answer"]
        assert 1 <= n["level"] <= 5


def test_mc_and_chat_normalisers():
    assert arc.normalise({"question": "Q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                          "answerKey": "2"}) == {"question": "Q", "choices": ["a", "b", "c"], "answer": 1}
    row = {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "x"}
    assert mmlu.normalise(row)["answer"] == 3
    assert mmlu.normalise({"train": {"question": "Q", "choices": ["a", "b"], "answer": 0}})["question"] == "Q"
    row = {"ctx": "A man", "endings": ["w", "x", "y", "z"], "label": "2", "activity_label": "a"}
    assert hellaswag.normalise(row) == {"question": "A man", "choices": ["w", "x", "y", "z"], "answer": 2}
    assert hellaswag.normalise({**row, "label": ""}) is None
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert smoltalk.normalise({"messages": ok}) == {"messages": ok}
    assert smoltalk.normalise({"messages": ok[:2]}) is None
    assert smoltalk.normalise({"messages": ok[1:] + ok[1:]})["messages"] == ok[1:] + ok[1:]
    assert smoltalk.normalise({"messages": [ok[2], ok[1]]}) is None
