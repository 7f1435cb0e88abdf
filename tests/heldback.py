"""
Held-back probes: the material issue 12's targets are measured on. They use tinyworld's own words (names, places,
items, jobs, pets, ...), number ranges and facts, but were written without looking at any of the generator's
sentence templates, so that they test whether a model generalises, not whether it has seen the phrasing. Never
train on them and never copy their wordings into data/tinyworld.py: once the generator knows a phrasing, its
probe no longer measures anything. tests/test_heldback.py checks that no probe is in a generated set, verbatim or
with its names, things and numbers masked.

    from tests import heldback
    problems = heldback.word_problems()      # 300 MathProbe: reworded word problems, 12 categories
    sums = heldback.arithmetic_probes()      # 72 MathProbe: bare arithmetic in new phrasings, 6 categories
    chats = heldback.chat_probes()           # 48 ChatProbe: identity, small talk, world questions
    heldback.grade_math(problems[0], reply), heldback.grade_chat(chats[0], reply)   # -> True / False

Every set is a pure function of its seed. A reply is graded as chat.py shows it to people: calculator calls
inline as <<expr=result>> (or <<expr>> when the sandbox refused the expression).

How each set is graded:
- Word problems and arithmetic (grade_math): the reply's final answer is its last \\boxed{...}, else its last
  "#### N" line, else its last number (evaluate.extract_answer with its fallback). Right when that answer, with
  thousands commas removed, is exactly the probe's integer answer. A calculator result counts: "<<23*4=92>>" alone
  answers 92, since using the tool is what the model should do. A reply that keeps writing numbers after its
  answer is graded on the last one.
- Chat probes (grade_chat): a reply is handled when it
  1. has text (at least one letter) after stripping,
  2. contains no "####" (the final-answer mark of a math solution),
  3. contains no calculator call ("<<" of <<expr=result>>),
  and, per category:
  - identity and smalltalk: no digit and no person or place of the world appears (a greeting or an introduction
    needs neither: digits are a math answer leaking in, names are world facts recited instead of a reply);
    identity replies must also say what they are: "picochat", "assistant" or "model" (as in "language model")
    as a word. Small talk is not judged further: there is no fair automatic rule for "a good reply to 'thanks a
    lot!'", and what the target measures is that the chat model still talks instead of answering a question
    nobody asked;
  - world: the right fact is named, as a whole word in any casing, also in the singular or with a plural or
    "-man" ending ("peaches": "peach"; "fisher": "fishermen"), and no other value of the same kind is, so listing
    every place does not pass. For "who lives in <place>" any of its people is right and anyone else is wrong.
    The question's subject is ignored: Mia's own name is no wrong answer to "who is Mia's friend?", nor is "Pine
    Hill" the feature "hill". An age is right as digits ("40") or in words ("forty").
  Colours are not asked: the vocabulary alone does not say whose colour the world's "color" fact is, and the
  generator's templates, which would, were not read.

Word-problem categories (25 each): start_unknown (how many at first), distractor (a number that must not be
used), other_person (the question is about the second person), number_words (numbers as words), grouped
((a+b)*k-style orders), rate, sharing, question_first, comparison, together, chain_short (1-2 operations) and
chain_long (3-4 operations). Numbers in a story are 2..99, answers whole, 0..a few thousand.
"""
import random
import re
from collections import namedtuple

from data.tinyworld import ITEMS, NAMES, PETS, PLACES, PLACE_KINDS, PLACE_FEATURES, JOBS, FOODS, OBJECTS, TIMES
from data.tinyworld import build_world, words
from data.grade import extract_answer

# question and integer answer; expr computes the answer from the numbers in the question (tests check both agree)
MathProbe = namedtuple("MathProbe", "question answer category expr")
# a world question's subject is the person or place it asks about; right: the values a reply must name (one is
# enough); wrong: values of the same kind it must not name. Identity and small talk have none of the three.
ChatProbe = namedtuple("ChatProbe", "question category subject right wrong")

# the one word of each place feature that says it, as a reply would put it in its own words
FEATURE_WORDS = {feature: feature.split()[-1] for feature in PLACE_FEATURES}


def world_facts():
    """(people, places) as data/tinyworld.py's generate() draws them at seed 0."""
    return build_world(random.Random("0/world"))

# -----------------------------------------------------------------------------
# Grading


def final_number(reply):
    """The reply's final answer as an int (see the module docstring), or None."""
    answer = extract_answer(reply)
    if answer is None:
        return None
    answer = answer.replace(",", "").strip()
    return int(answer) if re.fullmatch(r"-?\d+", answer) else None


def grade_math(probe, reply):
    return final_number(reply) == probe.answer


def handled(reply):
    """Not a math answer and not empty: the part of the grade every chat probe shares."""
    return re.search(r"[A-Za-z]", reply) is not None and "####" not in reply and "<<" not in reply


def value_pattern(value):
    """A fact as a whole word or phrase: itself, its singular ("peaches" -> "peach", "berries" -> "berry"), and
    with a plural or "-man" ending ("fisher" -> "fishermen")."""
    forms = {value, value[:-1] if value.endswith("s") else value}
    if value.endswith("ies"):
        forms.add(value[:-3] + "y")
    if value.endswith(("oes", "ches")):
        forms.add(value[:-2])
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})(?:s|es|man|men|woman|women)?\b", re.I)


def named_values(reply, values):
    """The values the reply names. The longest claims its words first, so "farm town" is not also "town" and the
    place "Pine Hill" is not also the feature "hill"."""
    claimed, named = [], set()
    for value in sorted(values, key=len, reverse=True):
        for m in value_pattern(value).finditer(reply):
            if not any(m.start() < end and start < m.end() for start, end in claimed):
                claimed.append(m.span())
                named.add(value)
    return named


def grade_chat(probe, reply):
    if not handled(reply):
        return False
    if probe.category in ("identity", "smalltalk"):
        if re.search(r"\d", reply) or named_values(reply, NAMES + PLACES):
            return False
        return probe.category == "smalltalk" or re.search(r"\b(picochat|assistant|model)\b", reply, re.I) is not None
    # world: the subject's own name is claimed first and ignored ("Kira is Mia's friend" names Mia)
    named = named_values(reply, (probe.subject, *probe.right, *probe.wrong))
    return bool(named & set(probe.right)) and not named & set(probe.wrong)

# -----------------------------------------------------------------------------
# Word problems: one function per category, each returning (question, answer, expr)


def _n(rng, lo=2, hi=99):
    return rng.randint(lo, hi)


def _cast(rng, k=2):
    """k different people and two different items."""
    return rng.sample(NAMES, k), rng.sample(ITEMS, 2)


def _scene(rng):
    """An opening that sets the story in the world, or nothing."""
    return rng.choice(["", "", f"One {rng.choice(TIMES)} in {rng.choice(PLACES)}, ", f"In {rng.choice(PLACES)}, "])


def _open(scene, sentence):
    """The scene, then the story; its first word keeps its capital only when it is a name."""
    if not scene or sentence.split()[0] in NAMES:
        return scene + sentence
    return scene + sentence[0].lower() + sentence[1:]


def start_unknown(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    start = _n(rng)
    if form == 0:
        x = _n(rng)
        return (f"{a} had some {item}. After picking up {x} more, {a} has {start + x}. "
                f"How many {item} did {a} have at first?", start, f"{start + x}-{x}")
    if form == 1:
        x = _n(rng, 2, start) if start > 2 else 2
        start = max(start, x)
        return (f"{a} handed {x} {item} to {b} and was left with {start - x}. "
                f"How many {item} did {a} start with?", start, f"{start - x}+{x}")
    if form == 2:
        k = _n(rng, 2, 9)
        return (f"By evening {a} owned {k} times as many {item} as in the morning: {start * k} in all. "
                f"How many {item} did {a} own in the morning?", start, f"{start * k}/{k}")
    x, y = _n(rng), _n(rng)
    y = min(y, start + x)
    now = start + x - y
    return (f"{a} bought {x} {item}, then gave away {y}, and now owns {now}. "
            f"How many {item} did {a} own before shopping?", start, f"{now}-{x}+{y}")


def distractor(rng):
    (a, b), (item, other) = _cast(rng)
    form = rng.randrange(4)
    x, y, k = _n(rng), _n(rng), _n(rng, 2, 12)
    noise = rng.choice([v for v in range(8, 71) if v not in (x, y, k)])  # never equal to a number that is used
    if form == 0:
        return (f"{a} is {noise} years old and keeps {x} {item} in a drawer. {a} buys {y} more {item}. "
                f"How many {item} are in the drawer now?", x + y, f"{x}+{y}")
    if form == 1:
        x, y = max(x, y), min(x, y)
        return (f"{a} has {x} {item} and {noise} {other}. {a} gives {y} of the {item} to {b}. "
                f"How many {item} does {a} still have?", x - y, f"{x}-{y}")
    if form == 2:
        return (f"A crate holds {x} {item}. {a} carries {k} crates home and also {noise} {other} in a bag. "
                f"How many {item} did {a} carry?", x * k, f"{x}*{k}")
    return (f"{a} walked for {noise} minutes to the market and bought {k} bags with {x} {item} in each bag. "
            f"How many {item} did {a} buy?", k * x, f"{k}*{x}")


def other_person(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    x, y = _n(rng), _n(rng)
    if form == 0:
        return (f"{a} has {x} {item}. {b} has {y} more {item} than {a}. How many {item} does {b} have?",
                x + y, f"{x}+{y}")
    if form == 1:
        x, z = max(x, y), min(x, y)
        w = _n(rng)
        return (f"{a} has {x} {item} and gives {z} of them to {b}, who already had {w}. "
                f"How many {item} does {b} have now?", w + z, f"{w}+{z}")
    if form == 2:
        k = _n(rng, 2, 9)
        return (f"{a} owns {k} times as many {item} as {b}. {a} has {x * k}. How many {item} does {b} own?",
                x, f"{x * k}/{k}")
    return (f"{a} and {b} have {x + y} {item} between them. {a} has {x} of them. How many belong to {b}?",
            y, f"{x + y}-{x}")


def number_words(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    x, y = _n(rng), _n(rng)
    if form == 0:
        z = _n(rng, 2, x + y)
        return (f"{a} picked {words(x)} {item} and then {words(y)} more, and ate {words(z)} of them. "
                f"How many {item} are left?", x + y - z, f"{x}+{y}-{z}")
    if form == 1:
        k = _n(rng, 2, 12)
        return (f"There are {words(k)} baskets with {words(x)} {item} in each. How many {item} is that in all?",
                k * x, f"{k}*{x}")
    if form == 2:
        k = _n(rng, 2, 9)
        return (f"{a} split {words(x * k)} {item} evenly into {words(k)} bags. How many {item} went into each bag?",
                x, f"{x * k}/{k}")
    return (f"{a} has {words(x)} {item}. {b} has {y} {item}. How many {item} do they have together?",
            x + y, f"{x}+{y}")


def grouped(rng):
    (a, b), (item, other) = _cast(rng)
    form = rng.randrange(4)
    x, y, k = _n(rng, 2, 60), _n(rng, 2, 60), _n(rng, 2, 12)
    if form == 0:
        return (f"Each of {k} baskets holds {x} {item} and {y} {other}. How many things are in the baskets "
                f"altogether?", k * (x + y), f"{k}*({x}+{y})")
    if form == 1:
        x, y = max(x, y) + 1, min(x, y)
        return (f"For {k} days, {a} collects {x} {item} every day and gives {y} of them away the same day. "
                f"How many {item} has {a} kept after the {k} days?", k * (x - y), f"{k}*({x}-{y})")
    if form == 2:
        k = _n(rng, 2, 6)
        return (f"{a} has {x} {item} and {b} has {y}. Then each of them ends up with {k} times as many as before. "
                f"How many {item} do they have together now?", (x + y) * k, f"({x}+{y})*{k}")
    c = _n(rng, 2, k * (x + y))
    return (f"A shelf has {k} rows, and each row holds {x} {item} and {y} {other}. {a} takes {c} things off the "
            f"shelf. How many things are left on it?", k * (x + y) - c, f"{k}*({x}+{y})-{c}")


def rate(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    r, t = _n(rng, 2, 40), _n(rng, 2, 30)
    if form == 0:
        return (f"{a} earns {r} coins for each hour of work. How many coins does {a} earn in {t} hours?",
                r * t, f"{r}*{t}")
    if form == 1:
        return (f"Every day {a} adds {r} {item} to a collection that started empty. How many {item} are in it "
                f"after {t} days?", r * t, f"{r}*{t}")
    if form == 2:
        s = _n(rng, 2, r * t)
        return (f"{a} saves {r} coins a week for {t} weeks and then spends {s} coins on a present for {b}. "
                f"How many coins are left?", r * t - s, f"{r}*{t}-{s}")
    return (f"{a} needs {r * t} {item} and gets {r} of them each day. How many days does it take?",
            t, f"{r * t}/{r}")


def sharing(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    x, k = _n(rng, 2, 60), _n(rng, 2, 9)
    if form == 0:
        return (f"{a} shares {x * k} {item} equally among {k} friends. How many {item} does each friend get?",
                x, f"{x * k}/{k}")
    if form == 1:
        return (f"{a} and {b} split {2 * x} {item} evenly between the two of them. How many {item} does {b} get?",
                x, f"{2 * x}/2")
    if form == 2:
        c = _n(rng)
        return (f"{a} has {x * k + c} {item}, keeps {c} and gives the rest out equally to {k} neighbours. "
                f"How many {item} does each neighbour receive?", x, f"({x * k + c}-{c})/{k}")
    c = _n(rng, 2, x) if x > 2 else 2
    x = max(x, c)
    return (f"A group of {k} children shares {x * k} {item} equally. Then {a}, one of the children, gives {c} of "
            f"them to {b}. How many {item} does {a} have left?", x - c, f"{x * k}/{k}-{c}")


def question_first(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    x, y, z = _n(rng), _n(rng), _n(rng)
    if form == 0:
        x, y = max(x, y), min(x, y)
        return (f"How many {item} does {a} have left, if {a} starts with {x}, gives {y} to {b} and then finds {z}?",
                x - y + z, f"{x}-{y}+{z}")
    if form == 1:
        return (f"What is the total number of {item} that {a} and {b} have, when {a} has {x} and {b} has {y}?",
                x + y, f"{x}+{y}")
    if form == 2:
        k = _n(rng, 2, 9)
        return (f"How many {item} will {a} have after buying {k} packs of {x}, if {a} already has {z}?",
                z + k * x, f"{z}+{k}*{x}")
    k = _n(rng, 2, 12)
    return (f"Can you tell me how many {item} are in {k} jars, if every jar holds {x}?", k * x, f"{k}*{x}")


def comparison(rng):
    (a, b), (item, _) = _cast(rng)
    form = rng.randrange(4)
    x, y = _n(rng), _n(rng)
    if x == y:
        x += 1
    if form == 0:
        k = _n(rng, 2, 9)
        return (f"{a} has {x} {item}. {b} has {k} times as many. How many more {item} does {b} have than {a}?",
                x * k - x, f"{x}*{k}-{x}")
    x, y = max(x, y), min(x, y)
    if form == 1:
        return (f"{a} has {x} {item} and {b} has {y}. How many fewer {item} does {b} have?", x - y, f"{x}-{y}")
    if form == 2:
        return (f"{a} is {x} years old and {b} is {y}. By how many years is {a} older than {b}?", x - y,
                f"{x}-{y}")
    return (f"{a} has {y} {item}. How many more does {a} need to have {x} in all?", x - y, f"{x}-{y}")


def together(rng):
    (a, b, c), (item, _) = _cast(rng, 3)
    form = rng.randrange(4)
    x, y, z = _n(rng), _n(rng), _n(rng)
    if form == 0:
        return (f"{a} has {x} {item}, {b} has {y} and {c} has {z}. How many {item} do the three of them have?",
                x + y + z, f"{x}+{y}+{z}")
    if form == 1:
        x, y = max(x, y), min(x, y)
        return (f"{a} has {x} {item}. {b} has {y} fewer than {a}. How many {item} do the two of them have "
                f"together?", x + (x - y), f"{x}+({x}-{y})")
    if form == 2:
        return (f"{a} has {x} {item}, and {b} has twice as many. How many {item} do both of them have?",
                x + 2 * x, f"{x}+2*{x}")
    return (f"{a} collected {x} {item} in the morning and {y} in the evening, and {b} collected {z}. "
            f"How many {item} did the two collect?", x + y + z, f"{x}+{y}+{z}")


def chain(rng, num_ops):
    """A start value and num_ops changes, told in order; the value stays whole, >= 1 and at most 4000."""
    (a, b), (item, _) = _cast(rng)
    value = _n(rng)
    expr = str(value)
    sentences = [f"{a} has {value} {item}."]
    for _ in range(num_ops):
        options = ["add"] + (["sub"] if value >= 3 else []) + (["mul"] if value * 2 <= 1000 else []) + (
            ["div"] if any(value % k == 0 for k in range(2, 10)) else [])
        op = rng.choice(options)
        if op == "add":
            x = _n(rng)
            value, expr = value + x, f"{expr}+{x}"
            sentences.append(rng.choice([f"Then {a} finds {x} more.", f"{b} gives {a} another {x}.",
                                         f"Next, {a} buys {x} more {item}."]))
        elif op == "sub":
            x = _n(rng, 2, min(value - 1, 99))  # something stays: a later "keep one pile of k" needs it
            value, expr = value - x, f"{expr}-{x}"
            sentences.append(rng.choice([f"{a} gives {x} of them to {b}.", f"Later {a} loses {x}.",
                                         f"After that, {x} of the {item} are sold."]))
        elif op == "mul":
            k = _n(rng, 2, min(5, 4000 // value))
            value, expr = value * k, f"({expr})*{k}"
            sentences.append(rng.choice([f"Then the number of {item} becomes {k} times as big.",
                                         f"{a} ends up with {k} times as many as that."]))
        else:
            k = rng.choice([k for k in range(2, 10) if value % k == 0])
            value, expr = value // k, f"({expr})/{k}"
            sentences.append(rng.choice([f"{a} puts them into {k} equal piles and keeps only one pile.",
                                         f"{a} keeps one part out of {k} equal parts and gives the rest away."]))
    sentences.append(rng.choice([f"How many {item} does {a} have now?", f"How many {item} does {a} end up with?",
                                 f"What number of {item} is {a} left holding?"]))
    return " ".join(sentences), value, expr


def chain_short(rng):
    return chain(rng, rng.randint(1, 2))


def chain_long(rng):
    return chain(rng, rng.randint(3, 4))


WORD_PROBLEM_CATEGORIES = [start_unknown, distractor, other_person, number_words, grouped, rate, sharing,
                           question_first, comparison, together, chain_short, chain_long]


def word_problems(n=300, seed=0):
    """n reworded word problems, the categories taken in turn (25 each at n=300)."""
    rng = random.Random(f"heldback/word/{seed}")
    problems = []
    for i in range(n):
        make = WORD_PROBLEM_CATEGORIES[i % len(WORD_PROBLEM_CATEGORIES)]
        scene = _scene(rng) if make is not question_first else ""  # its question must come first
        question, answer, expr = make(rng)
        problems.append(MathProbe(_open(scene, question), answer, make.__name__, expr))
    return problems

# -----------------------------------------------------------------------------
# Arithmetic in new phrasings: (category, form) pairs; a form makes (question, answer, expr) from x > y and z, all
# 2..99, a second factor f (2..31) and a small factor d (2..12): results stay in tinyworld's range, a few thousand
# at most.


ARITHMETIC_FORMS = [
    ("mixed", lambda x, y, z, f, d: (f"Compute {x} * {f} + {z}.", x * f + z, f"{x}*{f}+{z}")),
    ("multiply", lambda x, y, z, f, d: (f"What is {x} times {f}?", x * f, f"{x}*{f}")),
    ("multiply", lambda x, y, z, f, d: (f"What do you get when you multiply {f} by {x}?", f * x, f"{f}*{x}")),
    ("multiply", lambda x, y, z, f, d: (f"Find the product of {x} and {f}.", x * f, f"{x}*{f}")),
    ("multiply", lambda x, y, z, f, d: (f"{y} multiplied by {d} equals what?", y * d, f"{y}*{d}")),
    ("subtract", lambda x, y, z, f, d: (f"Take {y} away from {x}.", x - y, f"{x}-{y}")),
    ("subtract", lambda x, y, z, f, d: (f"What is {y} less than {x}?", x - y, f"{x}-{y}")),
    ("subtract", lambda x, y, z, f, d: (f"How far apart are {y} and {x}?", x - y, f"{x}-{y}")),
    ("add", lambda x, y, z, f, d: (f"What's the total of {x}, {y} and {z}?", x + y + z, f"{x}+{y}+{z}")),
    ("add", lambda x, y, z, f, d: (f"Find the sum of {y} and {x}.", y + x, f"{y}+{x}")),
    ("add", lambda x, y, z, f, d: (f"What number is {x} more than {z}?", z + x, f"{z}+{x}")),
    ("add", lambda x, y, z, f, d: (f"Put {x} and {y} together: how much is that?", x + y, f"{x}+{y}")),
    ("divide", lambda x, y, z, f, d: (f"How many times does {d} go into {x * d}?", x, f"{x * d}/{d}")),
    ("divide", lambda x, y, z, f, d: (f"What is {y * d} shared equally by {d}?", y, f"{y * d}/{d}")),
    ("divide", lambda x, y, z, f, d: (f"What is half of {2 * z}?", z, f"{2 * z}/2")),
    ("words", lambda x, y, z, f, d: (f"How much is {words(x)} plus {words(z)}?", x + z, f"{x}+{z}")),
    ("words", lambda x, y, z, f, d: (f"Work out {words(x)} times {words(d)}.", x * d, f"{x}*{d}")),
    ("words", lambda x, y, z, f, d: (f"What is {words(x)} take away {words(y)}?", x - y, f"{x}-{y}")),
    ("words", lambda x, y, z, f, d: (f"Add {words(y)} to {z}.", y + z, f"{y}+{z}")),
    ("mixed", lambda x, y, z, f, d: (f"Double {x}, then add {z}.", 2 * x + z, f"2*{x}+{z}")),
    ("mixed", lambda x, y, z, f, d: (f"Please calculate ({x} + {z}) * {d}.", (x + z) * d, f"({x}+{z})*{d}")),
    ("mixed", lambda x, y, z, f, d: (f"Multiply {x} by {d}, then subtract {y}.", x * d - y, f"{x}*{d}-{y}")),
    ("mixed", lambda x, y, z, f, d: (f"If you add {y} and {z} and then triple the result, what do you get?",
                                     3 * (y + z), f"3*({y}+{z})")),
    ("mixed", lambda x, y, z, f, d: (f"I start with {x}, take away {y}, then add {z}. Where do I end up?",
                                     x - y + z, f"{x}-{y}+{z}")),
]


def arithmetic_probes(per_form=3, seed=0):
    """per_form questions for each form of ARITHMETIC_FORMS (72 at the default)."""
    rng = random.Random(f"heldback/arithmetic/{seed}")
    probes = []
    for category, form in ARITHMETIC_FORMS:
        for _ in range(per_form):
            x, y = rng.sample(range(2, 100), 2)
            question, answer, expr = form(max(x, y), min(x, y), _n(rng), _n(rng, 2, 31), _n(rng, 2, 12))
            probes.append(MathProbe(question, answer, category, expr))
    return probes

# -----------------------------------------------------------------------------
# Chat probes: identity, small talk, and world questions in phrasings of our own


IDENTITY_PROBES = ["Please introduce yourself.", "Tell me a little about yourself.", "What should I call you?",
                   "Are you a person or a program?", "Which assistant am I talking to?", "Do you have a name?",
                   "Describe yourself in one sentence.", "Who am I chatting with right now?",
                   "hey, what's your name?", "What kind of thing are you?"]
SMALLTALK_PROBES = ["good afternoon", "Lovely weather today, isn't it?", "good evening", "how are you doing?",
                    "How's it going?", "thanks a lot!", "Thank you so much.", "nice to meet you", "hey there",
                    "see you later!", "Have a nice day!", "what's up?", "cheers!", "I'm back.", "Good night!"]
# (fact, question forms): {n} is a person, {p} a place
WORLD_FORMS = [
    ("home", ["In which town is {n}'s home?", "Which place does {n} call home?", "{n} lives in which town?",
              "What's the name of the place where {n} lives?"]),
    ("job", ["What does {n} do for a living?", "What is {n}'s line of work?", "Which job does {n} have?"]),
    ("pet", ["Tell me which animal {n} looks after.", "What kind of pet does {n} own?"]),
    ("food", ["Which food does {n} enjoy the most?", "What does {n} love to eat?"]),
    ("object", ["Which object belongs to {n}?", "What prized possession does {n} have?"]),
    ("friend", ["Who is {n}'s closest friend?", "Which person is {n}'s best buddy?"]),
    ("age", ["What is {n}'s age?", "How many years old is {n}?"]),
    ("people", ["Name someone who lives in {p}.", "Who has a home in {p}?"]),
    ("kind", ["What sort of place is {p}?", "What type of settlement is {p}?"]),
    ("feature", ["Where is {p} situated?", "What is the land around {p} like?"]),
]
# the values of each fact: a world answer naming another one of them is wrong
VALUES = {"home": PLACES, "job": JOBS, "pet": PETS, "food": FOODS, "object": OBJECTS, "friend": NAMES,
          "people": NAMES, "kind": PLACE_KINDS, "feature": sorted(set(FEATURE_WORDS.values()))}


def world_probe(fact, form, rng, people, places):
    """One world question about a person or place drawn by rng, with its right and wrong values."""
    if fact in ("people", "kind", "feature"):
        place = rng.choice([p for p in PLACES if places[p]["people"]] if fact == "people" else PLACES)
        right = {"people": places[place]["people"], "kind": [places[place]["kind"]],
                 "feature": [FEATURE_WORDS[places[place]["feature"]]]}[fact]
        return ChatProbe(form.format(p=place), "world", place, tuple(right),
                         tuple(v for v in VALUES[fact] if v not in right))
    name = rng.choice(NAMES)
    value = people[name][fact]
    if fact == "age":  # as digits or in words; any other number is not checked
        return ChatProbe(form.format(n=name), "world", name, (str(value), words(value)), ())
    return ChatProbe(form.format(n=name), "world", name, (value,),
                     tuple(v for v in VALUES[fact] if v not in (value, name)))


def chat_probes(seed=0):
    """The identity and small-talk probes, then one world question per form of WORLD_FORMS (48 in all)."""
    rng = random.Random(f"heldback/chat/{seed}")
    people, places = world_facts()
    probes = [ChatProbe(q, "identity", "", (), ()) for q in IDENTITY_PROBES]
    probes += [ChatProbe(q, "smalltalk", "", (), ()) for q in SMALLTALK_PROBES]
    probes += [world_probe(fact, form, rng, people, places) for fact, forms in WORLD_FORMS for form in forms]
    return probes
