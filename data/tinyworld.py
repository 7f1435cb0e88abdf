"""
tinyworld: picochat's built-in offline data, generated from a seed (same seed and settings, byte-identical files).

    python data/tinyworld.py                      # the default set (~20 MB of pretraining text)
    python data/tinyworld.py --pretrain_mb=1      # a small set, e.g. for a CPU smoke run
    python data/tinyworld.py --seed=1 --num_chat=5000

The stages call data.ensure_tinyworld(), which generates the set when it is missing (at $PICOCHAT_TINYWORLD_MB
megabytes when that is set). Either way it is written to a temp dir renamed into $PICOCHAT_DIR/data/tinyworld/:
    pretrain/shard_XXXXX.jsonl  {"text"}            the last shard is the validation shard
    chat_{train,val}.jsonl      {"messages"}
    math_{train,test}.jsonl     {"question", "answer": "...\\n#### N", "level"}
    mc_{train,test}.jsonl       {"question", "choices" (4), "answer" (index)}
    meta.json                   the settings it was generated with, and the generator's VERSION

The world (drawn from the seed) is small and closed so that a tiny model sees every fact many times: 30 people,
20 places, 30 objects. Each person has a home, a job, a food they like, one object (with a color), a pet, a best
friend and an age; each place a kind and a feature. Numbers appear both in words and in digits.

Grammar, briefly:
    pretrain doc := fact sheet | place description | story | dialogue | list | arithmetic drill | worked problem
    step         := "<words> a OP b = c<words>"         (OP in + - * /, always spaced, integers only)
    math problem := template(level) filled with a person, an item and numbers; its answer is one step per line
                    and a last line "#### N". Level 1 = one step with small numbers, level k ~ k steps (4 = 4-5).
    chat         := 1-3 exchanges of greeting | identity | fact question | arithmetic | calculator | word problem;
                    every numeric answer ends with "\\n#### N" (the one final-answer convention, as in math_*).
                    A calculator call is the parts text, {"type":"python","text":"12*7"}, {"type":"python_output",
                    "text":"84"}, text.
    mc item      := a fact question, "who lives in P" or "what is a OP b", 4 choices, the answer's index.
Splits: a math problem's signature is (the numbers of its question, the operators of its answer) and
crc32(signature) % 5 == 0 puts it in test, so no test problem is a train problem reworded (pretraining docs and
chat use train problems only). MC items split the same way on their question text; test questions are unique.
"""
import json
import os
import random
import re
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
seed = 0
pretrain_mb = 20.0      # megabytes of pretraining text (the stages use the default set)
shard_mb = 2.0          # target size of a pretraining shard; there are always at least 2 (train + val)
num_chat = 20000        # train conversations (val gets 1/20 of this)
num_math_train = 8000   # spread evenly over the levels
num_math_test = 400     # spread evenly over the levels
num_mc_train = 4000
num_mc_test = 300

VERSION = 1  # bump when the generator's output changes: sets made by another version are regenerated

# -----------------------------------------------------------------------------
# The world's vocabulary

NAMES = ["Mia", "Tom", "Sam", "Lily", "Ben", "Zoe", "Max", "Ella", "Leo", "Ava", "Finn", "Ruby", "Jack", "Nora",
         "Owen", "Ivy", "Hugo", "Rosa", "Theo", "Lucy", "Omar", "Maya", "Eli", "Anna", "Noah", "Kira", "Ivan",
         "Lena", "Paul", "Tara"]
PLACES = ["Oakvale", "Riverton", "Pine Hill", "Stonebridge", "Maple Creek", "Sunport", "Fogmoor", "Willowby",
          "Redcliff", "Lakeside", "Ashford", "Brightwater", "Cedar Falls", "Dunmore", "Elmstead", "Greenholt",
          "Hollow Bay", "Ironwood", "Juniper", "Kestrel Point"]
PLACE_KINDS = ["village", "town", "city", "harbor town", "farm town"]
PLACE_FEATURES = ["by the sea", "in the mountains", "next to a big forest", "on a wide river", "near a quiet lake",
                  "in a green valley", "on a windy hill"]
OBJECTS = ["kite", "lamp", "drum", "bicycle", "guitar", "hat", "umbrella", "clock", "book", "boat", "ball",
           "violin", "camera", "scarf", "basket", "telescope", "map", "kettle", "ladder", "compass", "flute",
           "backpack", "blanket", "mirror", "shovel", "wagon", "bell", "painting", "radio", "jacket"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "brown", "pink"]
JOBS = ["baker", "farmer", "teacher", "fisher", "painter", "doctor", "builder", "singer", "tailor", "miller",
        "gardener", "sailor"]
FOODS = ["apples", "pears", "plums", "carrots", "cookies", "cakes", "berries", "muffins", "oranges", "peaches",
         "buns", "potatoes"]
PETS = ["cat", "dog", "goat", "parrot", "rabbit", "horse", "duck", "owl", "turtle", "hamster"]
ITEMS = ["apples", "pears", "eggs", "coins", "marbles", "books", "shells", "stamps", "cookies", "flowers",
         "pencils", "stickers", "plums", "carrots"]
TIMES = ["morning", "day", "evening", "afternoon", "spring day", "rainy day", "summer morning"]
IDENTITY = ("I am picochat, a small language model trained with picochat. I know about a little world of people "
            "and places, and I can do arithmetic.")
SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def words(n):
    """An integer 0..999 in English words (larger numbers stay digits)."""
    if n < 20:
        return SMALL[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + SMALL[n % 10])
    if n < 1000:
        return SMALL[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + words(n % 100))
    return str(n)


def an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def build_world(rng):
    """Fixed facts: who lives where, does what, likes, owns and befriends whom."""
    places = {p: {"kind": rng.choice(PLACE_KINDS), "feature": rng.choice(PLACE_FEATURES), "people": []}
              for p in PLACES}
    objects = OBJECTS[:]
    rng.shuffle(objects)
    order = NAMES[:]
    rng.shuffle(order)
    friend = {}
    for i in range(0, len(order), 2):  # best friends come in pairs
        friend[order[i]], friend[order[i + 1]] = order[i + 1], order[i]
    people = {}
    for i, name in enumerate(NAMES):
        home = rng.choice(PLACES)
        places[home]["people"].append(name)
        people[name] = {"home": home, "job": rng.choice(JOBS), "food": rng.choice(FOODS), "object": objects[i],
                        "color": rng.choice(COLORS), "pet": rng.choice(PETS), "friend": friend[name],
                        "age": rng.randint(8, 70)}
    return people, places


# -----------------------------------------------------------------------------
# Facts in several wordings; the same wordings serve pretraining, chat answers and MC questions

FACT_TEMPLATES = {
    "home": ["{n} lives in {home}.", "{n}'s home is in {home}.", "{n} has a house in {home}.",
             "In {home} lives {n}."],
    "job": ["{n} is {a_job}.", "{n} works as {a_job}.", "By trade, {n} is {a_job}."],
    "food": ["{n} likes {food}.", "{n}'s favorite food is {food}.", "{n} loves to eat {food}."],
    "object": ["{n} owns {a_color} {object}.", "{n} has {a_color} {object}.", "The {color} {object} belongs to {n}."],
    "pet": ["{n} has a pet {pet}.", "{n} keeps {a_pet} at home.", "{n}'s pet is {a_pet}."],
    "friend": ["{n}'s best friend is {friend}.", "{n} and {friend} are best friends.",
               "{friend} is the best friend of {n}."],
    "age": ["{n} is {age} years old.", "{n} is {age_words} years old.", "The age of {n} is {age}."],
}
FACT_QUESTIONS = {
    "home": ["Where does {n} live?", "In which place does {n} live?", "Where is {n}'s home?"],
    "job": ["What is {n}'s job?", "What does {n} do for work?", "What does {n} work as?"],
    "food": ["What food does {n} like?", "What is {n}'s favorite food?", "Which food does {n} love to eat?"],
    "object": ["What does {n} own?", "Which thing belongs to {n}?", "What is the thing that {n} has?"],
    "pet": ["What pet does {n} have?", "Which animal does {n} keep at home?", "What kind of pet does {n} have?"],
    "friend": ["Who is {n}'s best friend?", "Who is the best friend of {n}?", "Who is {n} best friends with?"],
    "age": ["How old is {n}?"],
}


def fact_fields(name, p):
    return {"n": name, "home": p["home"], "a_job": an(p["job"]), "food": p["food"], "a_color": an(p["color"]),
            "color": p["color"], "object": p["object"], "pet": p["pet"], "a_pet": an(p["pet"]),
            "friend": p["friend"], "age": p["age"], "age_words": words(p["age"])}


def fact(rng, name, p, kind):
    return rng.choice(FACT_TEMPLATES[kind]).format(**fact_fields(name, p))


# -----------------------------------------------------------------------------
# Math word problems: templates by level. Each returns (question, steps, answer); a step is
# (before, a, op, b, c, after) and renders as "before a op b = c after".

def step(before, a, op, b, after=""):
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    assert c >= 0 and (op != "/" or a % b == 0), "templates must draw numbers with whole, non-negative results"
    return (before, a, op, b, c, after), c


def level1(rng, A, B, item):
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = rng.choice([f"{A} has {a} {item}. {B} gives {A} {b} more {item}. How many {item} does {A} have now?",
                        f"{A} found {a} {item} in the morning and {b} {item} in the afternoon. "
                        f"How many {item} did {A} find in all?"])
        s, c = step(f"{A} has ", a, "+", b, f" {item}.")
    elif kind == 1:
        a = rng.randint(5, 30)
        b = rng.randint(2, a - 2)
        q = rng.choice([f"{A} has {a} {item}. {A} gives {b} {item} to {B}. How many {item} does {A} have left?",
                        f"There were {a} {item} in a basket. {A} took {b} of them. How many {item} are left?"])
        s, c = step("There are ", a, "-", b, f" {item} left.")
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = rng.choice([f"{A} has {a} boxes. Each box holds {b} {item}. How many {item} does {A} have?",
                        f"{A} makes {a} bags with {b} {item} in each bag. How many {item} is that?"])
        s, c = step("That is ", a, "*", b, f" {item}.")
    else:
        b, k = rng.randint(2, 9), rng.randint(2, 9)
        q = rng.choice([f"{A} shares {b * k} {item} equally among {b} friends. How many {item} does each get?",
                        f"{b * k} {item} are put into {b} equal groups. How many {item} are in each group?"])
        s, c = step("Each gets ", b * k, "/", b, f" {item}.")
    return q, [s], c


def level2(rng, A, B, item):
    kind = rng.randrange(4)
    if kind == 0:
        a, b, k = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 9)
        q = f"{A} has {a} {item}. {A} buys {b} bags with {k} {item} in each bag. How many {item} does {A} have now?"
        s1, d = step(f"{A} buys ", b, "*", k, f" {item}.")
        s2, c = step("Now there are ", a, "+", d, f" {item}.")
    elif kind == 1:
        a = rng.randint(20, 99)
        b = rng.randint(2, a // 2)
        k = rng.randint(2, a - b - 2)
        f1, f2 = rng.sample(FOODS, 2)
        q = f"{A} has {a} coins. {A} spends {b} coins on {f1} and {k} coins on {f2}. How many coins are left?"
        s1, d = step("After the first buy, ", a, "-", b, " coins are left.")
        s2, c = step("After the second buy, ", d, "-", k, " coins are left.")
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 7)
        k = rng.randint(2, a * b - 2)
        q = (f"{A} picks {a} {item} every day for {b} days. Then {A} gives {k} {item} to {B}. "
             f"How many {item} does {A} keep?")
        s1, d = step(f"{A} picks ", a, "*", b, f" {item}.")
        s2, c = step(f"{A} keeps ", d, "-", k, f" {item}.")
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 59)
        q = f"{A} reads for {a} hours and {b} minutes. How many minutes does {A} read in all?"
        s1, d = step("One hour is 60 minutes, so ", a, "*", 60, " minutes.")
        s2, c = step("In all, ", d, "+", b, " minutes.")
    return q, [s1, s2], c


def level3(rng, A, B, item):
    kind = rng.randrange(4)
    if kind == 0:
        a, b, k, d = rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6)
        q = (f"{A} walks {a} km each hour for {b} hours, then {k} km each hour for {d} hours. "
             f"How many km does {A} walk in all?")
        s1, x = step("First ", a, "*", b, " km.")
        s2, y = step("Then ", k, "*", d, " km.")
        s3, c = step("In all, ", x, "+", y, " km.")
    elif kind == 1:
        a, b = rng.randint(2, 9), rng.randint(4, 12)
        k = rng.randint(2, a * b // 2)
        d = rng.randint(2, a * b - k - 2)
        C = rng.choice([n for n in NAMES if n not in (A, B)])
        q = (f"{A} buys {a} packs of {b} {item}. {A} gives {k} {item} to {B} and {d} {item} to {C}. "
             f"How many {item} does {A} have left?")
        s1, x = step(f"{A} buys ", a, "*", b, f" {item}.")
        s2, y = step(f"After giving some to {B}, ", x, "-", k, " are left.")
        s3, c = step(f"After giving some to {C}, ", y, "-", d, " are left.")
    elif kind == 2:
        a, b, d = rng.randint(2, 8), rng.randint(2, 9), rng.randint(2, 6)
        k = (d - a * b % d) % d + d * rng.randint(0, 3) or d
        q = (f"{A} has {a} boxes with {b} {item} in each. {A} adds {k} more {item} and shares them equally "
             f"among {d} friends. How many {item} does each friend get?")
        s1, x = step("The boxes hold ", a, "*", b, f" {item}.")
        s2, y = step("With the extra ones, ", x, "+", k, f" {item}.")
        s3, c = step("Each friend gets ", y, "/", d, f" {item}.")
    else:
        a, b, k, d = rng.randint(2, 15), rng.randint(2, 8), rng.randint(2, 20), rng.randint(2, 30)
        k = min(k, a * b - 2)
        q = (f"{A} earns {a} coins an hour for {b} hours. {A} spends {k} coins, then earns {d} more coins. "
             f"How many coins does {A} have now?")
        s1, x = step(f"{A} earns ", a, "*", b, " coins.")
        s2, y = step("After spending, ", x, "-", k, " coins.")
        s3, c = step("Now ", y, "+", d, " coins.")
    return q, [s1, s2, s3], c


def level4(rng, A, B, item):
    kind = rng.randrange(3)
    if kind == 0:
        a, b, k, d = rng.randint(2, 9), rng.randint(3, 12), rng.randint(2, 9), rng.randint(3, 12)
        f = rng.randint(2, 6)
        t = a * b + k * d
        e = t % f + f * rng.randint(1, min(3, t // f - 1))  # leaves at least f fruits, a multiple of f
        q = (f"{A} buys {a} bags of {b} apples and {k} bags of {d} pears. {A} eats {e} of the fruits and shares "
             f"the rest equally among {f} friends. How many fruits does each friend get?")
        s1, x = step("Apples: ", a, "*", b, ".")
        s2, y = step("Pears: ", k, "*", d, ".")
        s3, z = step("All the fruits: ", x, "+", y, ".")
        s4, w = step("After eating, ", z, "-", e, " are left.")
        s5, c = step("Each friend gets ", w, "/", f, " fruits.")
        return q, [s1, s2, s3, s4, s5], c
    if kind == 1:
        a, b, k, d = rng.randint(2, 9), rng.randint(2, 4), rng.randint(2, 6), rng.randint(2, 9)
        b = min(b, a * 12 // k)
        q = (f"{A} has {a} dozen eggs. {A} uses {b} eggs each day for {k} days. Then {A} buys {d} boxes of 6 eggs. "
             f"How many eggs does {A} have now?")
        s1, x = step("A dozen is 12, so ", a, "*", 12, " eggs.")
        s2, y = step(f"{A} uses ", b, "*", k, " eggs.")
        s3, z = step("That leaves ", x, "-", y, " eggs.")
        s4, w = step(f"{A} buys ", d, "*", 6, " eggs.")
        s5, c = step("Now ", z, "+", w, " eggs.")
        return q, [s1, s2, s3, s4, s5], c
    a, b, k = rng.randint(2, 8), rng.randint(2, 6), rng.randint(3, 15)
    d = rng.randint(2, a * b * k - 2)
    d += (a * b * k - d) % 2  # an even rest, to share in two
    q = (f"{A} works {a} hours each day for {b} days and earns {k} coins an hour. {A} spends {d} coins and "
         f"shares the rest equally with {B}. How many coins does each of them get?")
    s1, x = step(f"{A} works ", a, "*", b, " hours.")
    s2, y = step(f"{A} earns ", x, "*", k, " coins.")
    s3, z = step("After spending, ", y, "-", d, " coins are left.")
    s4, c = step("Each gets ", z, "/", 2, " coins.")
    return q, [s1, s2, s3, s4], c


LEVELS = [level1, level2, level3, level4]
NUMBER = re.compile(r"\d+")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def render_step(s):
    before, a, op, b, c, after = s
    return f"{before}{a} {op} {b} = {c}{after}"


def signature(question, answer):
    """What a problem *is*, whatever its wording: the numbers in its question and the operators of its answer."""
    return (tuple(NUMBER.findall(question)), tuple(m[1] for m in STEP.findall(answer)))


def is_test(key):
    return zlib.crc32(repr(key).encode()) % 5 == 0


def make_problem(rng, level):
    """A random problem of `level` (1-4) as {question, answer, level, steps}; steps are kept for the chat's
    calculator rendering and dropped before writing."""
    A, B = rng.sample(NAMES, 2)
    q, steps, c = LEVELS[level - 1](rng, A, B, rng.choice(ITEMS))
    answer = "\n".join(render_step(s) for s in steps) + f"\n#### {c}"
    return {"question": q, "answer": answer, "level": level, "steps": steps}


def train_problem(rng, level=0):
    """A problem whose signature is on the train side (for pretraining docs, chat and math_train)."""
    while True:
        p = make_problem(rng, level or rng.randint(1, 4))
        if not is_test(signature(p["question"], p["answer"])):
            return p


def math_split(rng, n, test):
    """n problems spread evenly over the levels; test problems are also unique by signature."""
    rows, seen = [], set()
    for i in range(n):
        level = 1 + i * len(LEVELS) // n
        for _ in range(10000):
            p = make_problem(rng, level)
            sig = signature(p["question"], p["answer"])
            key = sig if test else p["question"]
            if is_test(sig) == test and key not in seen:
                break
        else:
            raise RuntimeError(f"could not draw {n} distinct level-{level} problems; ask for fewer")
        seen.add(key)
        rows.append({"question": p["question"], "answer": p["answer"], "level": level})
    return rows


# -----------------------------------------------------------------------------
# Pretraining documents

def doc_facts(rng, people, places):
    name = rng.choice(NAMES)
    kinds = list(FACT_TEMPLATES)
    rng.shuffle(kinds)
    return " ".join(fact(rng, name, people[name], k) for k in kinds)


def doc_place(rng, people, places):
    p = rng.choice(PLACES)
    info = places[p]
    lines = [f"{p} is {an(info['kind'])} {info['feature']}."]
    if info["people"]:
        who = info["people"]
        lines.append(f"{len(who)} of our people live in {p}: {', '.join(who)}." if len(who) > 1
                     else f"Only {who[0]} lives in {p}.")
        for name in who:
            lines.append(fact(rng, name, people[name], rng.choice(["job", "pet", "object", "food"])))
    else:
        lines.append(f"Nobody we know lives in {p}, but people visit it.")
    return " ".join(lines)


def doc_story(rng, people, places):
    A = rng.choice(NAMES)
    pa = people[A]
    B = pa["friend"] if rng.random() < 0.5 else rng.choice([n for n in NAMES if n != A])
    pb = people[B]
    food = pa["food"]
    a, b = rng.randint(2, 12), rng.randint(2, 12)  # 2+: no "one apples"
    lines = [f"One {rng.choice(TIMES)}, {A} the {pa['job']} left home in {pa['home']} to visit {B} in {pb['home']}.",
             f"{A} took the {pa['color']} {pa['object']} and the pet {pa['pet']} along.",
             f"{B} lives in {pb['home']} and works as {an(pb['job'])}."]
    if B == pa["friend"]:
        lines.append(f"{B} is {A}'s best friend, so they were very happy.")
    lines.append(f"{A} had {words(a)} {food}. {B} gave {A} {words(b)} more, so {A} had {a} + {b} = {a + b} {food}.")
    k = rng.randint(1, a + b - 2)
    lines.append(f"They ate {k} of them together. {a + b} - {k} = {a + b - k}, so {a + b - k} {food} were left.")
    lines.append(f"In the {rng.choice(['evening', 'night'])}, {A} went back home to {pa['home']}.")
    return " ".join(lines)


def doc_dialogue(rng, people, places):
    A, B = rng.sample(NAMES, 2)
    pa, pb = people[A], people[B]
    lines = [f"{A}: Hello, {B}! How are you?", f"{B}: Hello, {A}! I am well, thank you."]
    topics = ["home", "job", "pet", "food", "math"]
    rng.shuffle(topics)
    for t in topics[:3]:
        if t == "home":
            lines += [f"{A}: Where do you live, {B}?", f"{B}: I live in {pb['home']}. And you?",
                      f"{A}: I live in {pa['home']}."]
        elif t == "job":
            lines += [f"{B}: What do you do for work?", f"{A}: I am {an(pa['job'])}."]
        elif t == "pet":
            lines += [f"{A}: Do you have a pet?", f"{B}: Yes, I have {an(pb['pet'])}."]
        elif t == "food":
            lines += [f"{B}: What do you like to eat?", f"{A}: I like {pa['food']} best."]
        else:
            x, y = rng.randint(2, 12), rng.randint(2, 12)
            op = rng.choice("+*")
            z = x + y if op == "+" else x * y
            lines += [f"{A}: What is {x} {OP_WORDS[op]} {y}?", f"{B}: {x} {op} {y} = {z}. It is {words(z)}."]
    lines.append(f"{B}: Goodbye, {A}!")
    return "\n".join(lines)


def doc_list(rng, people, places):
    kind = rng.randrange(3)
    if kind == 0:
        p = rng.choice([p for p in PLACES if places[p]["people"]])
        return f"People who live in {p}:\n" + "\n".join(f"- {n}" for n in places[p]["people"])
    if kind == 1:
        names = rng.sample(NAMES, 6)
        field = rng.choice(["job", "pet", "food", "home"])
        return f"Who is what ({field}):\n" + "\n".join(f"- {n}: {people[n][field]}" for n in names)
    A = rng.choice(NAMES)
    counts = [(rng.randint(2, 9), item) for item in rng.sample(ITEMS, 3)]
    lines = [f"Things in {A}'s bag:", f"- the {people[A]['color']} {people[A]['object']}"]
    lines += [f"- {words(k)} {item} ({k})" for k, item in counts]
    total = " + ".join(str(k) for k, _ in counts)
    lines.append(f"That is {total} = {sum(k for k, _ in counts)} small things and one {people[A]['object']}.")
    return "\n".join(lines)


def doc_drill(rng, people, places):
    lines = []
    for _ in range(rng.randint(4, 8)):
        op = rng.choice("+-*/")
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if op == "-":
            a, b = max(a, b), min(a, b)
        if op == "/":
            a = a * b
        s, c = step("", a, op, b)
        lines.append(f"{words(a).capitalize()} {OP_WORDS[op]} {words(b)} is {words(c)}. {render_step(s)}.")
    return "\n".join(lines)


def doc_problem(rng, people, places):
    p = train_problem(rng)
    return f"Question: {p['question']}\nAnswer: {p['answer']}"


DOCS = [(doc_facts, 4), (doc_place, 2), (doc_story, 4), (doc_dialogue, 3), (doc_list, 1), (doc_drill, 2),
        (doc_problem, 3)]


def pretrain_shards(rng, people, places, total_bytes, shard_bytes):
    """Yield lists of jsonl lines, one list per shard, about `shard_bytes` each, at least 2 shards."""
    n_shards = max(2, round(total_bytes / shard_bytes))
    per_shard = total_bytes / n_shards
    makers, weights = zip(*DOCS)
    for _ in range(n_shards):
        lines, size = [], 0
        while size < per_shard:
            text = rng.choices(makers, weights)[0](rng, people, places)
            lines.append(json.dumps({"text": text}))
            size += len(text) + 1
        yield lines


# -----------------------------------------------------------------------------
# Chat conversations

GREETINGS = [("hi", "Hello! How can I help you today?"), ("hello!", "Hi there! What would you like to know?"),
             ("good morning", "Good morning! How can I help?"), ("hey", "Hey! What can I do for you?"),
             ("thank you!", "You are welcome!"), ("thanks, bye", "Goodbye! Have a nice day.")]
IDENTITY_QUESTIONS = ["who are you?", "what is your name?", "what are you?", "who made you?", "are you a person?",
                      "tell me about yourself"]


def calc_parts(intro, steps, final):
    """An answer that calls the calculator for every step: text, python, python_output, text, ..."""
    parts = [{"type": "text", "text": intro}]
    for before, a, op, b, c, after in steps:
        parts[-1]["text"] += before  # "One hour is 60 minutes, so " <calculator 9*60 -> 540> "9 * 60 = 540 ..."
        parts += [{"type": "python", "text": f"{a}{op}{b}"}, {"type": "python_output", "text": str(c)},
                  {"type": "text", "text": f"{a} {op} {b} = {c}{after}\n"}]
    parts[-1]["text"] += final
    return parts


def exchange(rng, people):
    """One (user, assistant) pair."""
    kind = rng.choices(["greet", "identity", "fact", "arith", "calc", "problem"], [1, 1, 4, 2, 1, 4])[0]
    if kind == "greet":
        return rng.choice(GREETINGS)
    if kind == "identity":
        return rng.choice(IDENTITY_QUESTIONS), IDENTITY
    if kind == "fact":
        name = rng.choice(NAMES)
        k = rng.choice(list(FACT_QUESTIONS))
        f = fact_fields(name, people[name])
        return rng.choice(FACT_QUESTIONS[k]).format(**f), rng.choice(FACT_TEMPLATES[k]).format(**f)
    if kind == "arith":
        a, b, d = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 30)
        s1, x = step("First, ", a, "*", b, ".")
        s2, c = step("Then ", x, "+", d, ".")
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.\n#### {a + b}"
        return f"What is {a} * {b} + {d}?", f"{render_step(s1)}\n{render_step(s2)}\n#### {c}"
    if kind == "calc":
        a, b = rng.randint(100, 999), rng.randint(11, 99)
        s, c = step("", a, rng.choice("+-*"), b, ".")
        return f"Use the calculator: what is {a} {s[2]} {b}?", calc_parts("Let me use the calculator.\n", [s],
                                                                         f"#### {c}")
    p = train_problem(rng)
    if rng.random() < 0.3:
        c = p["answer"].rsplit("#### ", 1)[1]
        return p["question"], calc_parts("Let me work it out with the calculator.\n", p["steps"], f"#### {c}")
    return p["question"], p["answer"]


def conversation(rng, people):
    messages = []
    for _ in range(rng.choices([1, 2, 3], [6, 3, 1])[0]):
        user, assistant = exchange(rng, people)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


# -----------------------------------------------------------------------------
# Multiple choice

def mc_item(rng, people, places):
    """(question, choices, answer index): a fact with 3 wrong choices of the same kind, or a + - * b."""
    kind = rng.choices(["arith", "resident", "fact"], [2, 1, 7])[0]
    if kind == "arith":
        a, b = rng.randint(12, 99), rng.randint(2, 12)  # a >= b: no negative differences
        s, right = step("", a, rng.choice("+-*"), b)
        wrong = set()
        while len(wrong) < 3:
            w = right + rng.choice([-10, -2, -1, 1, 2, 10, b, -b])
            if w >= 0 and w != right:
                wrong.add(w)
        options = [str(right)] + [str(w) for w in sorted(wrong)]
        question = f"What is {a} {s[2]} {b}?"
    elif kind == "resident":
        p = rng.choice([p for p in PLACES if places[p]["people"]])
        options = [rng.choice(places[p]["people"])] + rng.sample([n for n in NAMES if people[n]["home"] != p], 3)
        question = f"Who lives in {p}?"
    else:
        name = rng.choice(NAMES)
        k = rng.choice(["home", "job", "food", "object", "pet", "friend"])
        pool = {"home": PLACES, "job": JOBS, "food": FOODS, "object": OBJECTS, "pet": PETS, "friend": NAMES}[k]
        right = people[name][k]
        options = [right] + rng.sample([x for x in pool if x != right and x != name], 3)
        question = rng.choice(FACT_QUESTIONS[k]).format(n=name)
    order = list(range(4))
    rng.shuffle(order)
    return question, [options[i] for i in order], order.index(0)


def mc_split(rng, people, places, n, test):
    """n items on one side of the split; test questions are unique."""
    rows, seen = [], set()
    for _ in range(n):
        for _ in range(10000):
            q, choices, answer = mc_item(rng, people, places)
            if is_test(q) == test and not (test and q in seen):
                break
        else:
            raise RuntimeError(f"could not draw {n} distinct test questions; ask for fewer")
        seen.add(q)
        rows.append({"question": q, "choices": choices, "answer": answer})
    return rows


# -----------------------------------------------------------------------------
# Writing the set

def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def generate(out_dir, seed=seed, pretrain_mb=pretrain_mb, shard_mb=shard_mb, num_chat=num_chat,
             num_math_train=num_math_train, num_math_test=num_math_test, num_mc_train=num_mc_train,
             num_mc_test=num_mc_test):
    """Write the whole set into `out_dir` (a fresh directory; data.ensure_tinyworld renames it into place)."""
    if pretrain_mb <= 0 or shard_mb <= 0 or min(num_chat, num_math_train, num_math_test, num_mc_test) < 1:
        raise ValueError("tinyworld sizes must be positive")
    settings = dict(seed=seed, pretrain_mb=pretrain_mb, shard_mb=shard_mb, num_chat=num_chat,
                    num_math_train=num_math_train, num_math_test=num_math_test, num_mc_train=num_mc_train,
                    num_mc_test=num_mc_test)
    # one generator per part, so that changing the size of one part leaves the others byte-identical
    def rng(part):
        return random.Random(f"{seed}/{part}")
    people, places = build_world(rng("world"))
    os.makedirs(os.path.join(out_dir, "pretrain"))
    shards = pretrain_shards(rng("pretrain"), people, places, pretrain_mb * 1e6, shard_mb * 1e6)
    for i, lines in enumerate(shards):
        write_lines(os.path.join(out_dir, "pretrain", f"shard_{i:05d}.jsonl"), lines)
    for split, n in (("train", num_chat), ("val", max(1, num_chat // 20))):
        r = rng(f"chat_{split}")
        write_lines(os.path.join(out_dir, f"chat_{split}.jsonl"),
                    [json.dumps(conversation(r, people)) for _ in range(n)])
    for split, n in (("train", num_math_train), ("test", num_math_test)):
        rows = math_split(rng(f"math_{split}"), n, split == "test")
        write_lines(os.path.join(out_dir, f"math_{split}.jsonl"), [json.dumps(r) for r in rows])
    for split, n in (("train", num_mc_train), ("test", num_mc_test)):
        rows = mc_split(rng(f"mc_{split}"), people, places, n, split == "test")
        write_lines(os.path.join(out_dir, f"mc_{split}.jsonl"), [json.dumps(r) for r in rows])
    # meta.json last: data.ensure_tinyworld compares it with the settings asked for
    write_lines(os.path.join(out_dir, "meta.json"), [json.dumps({**settings, "version": VERSION}, sort_keys=True)])


if __name__ == "__main__":
    import common
    import data
    config = common.configure(globals())
    t0 = time.time()
    path = data.ensure_tinyworld(**config)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    common.print0(f"tinyworld at {path}: {size / 1e6:.1f} MB in {time.time() - t0:.1f}s")
