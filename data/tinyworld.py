"""
tinyworld: picochat's built-in offline data, generated from a seed (same seed and settings, byte-identical files).

    python data/tinyworld.py                      # the default set (~20 MB of pretraining text)
    python data/tinyworld.py --pretrain_mb=1      # a small set, e.g. for a CPU smoke run
    python data/tinyworld.py --seed=1 --num_chat=5000

The stages call data.ensure_tinyworld(), which generates the set when it is missing (at $PICOCHAT_TINYWORLD_MB
megabytes when that is set). Either way it is written to a temp dir renamed into $PICOCHAT_DIR/data/tinyworld/:
    pretrain/shard_XXXXX.jsonl  {"text"}            the last shard is the validation shard (no train document in it)
    chat_{train,val}.jsonl      {"messages"}        no val conversation is a train conversation
    math_train.jsonl            {"question", "answer": "...\\n#### N", "level"}
    math_test.jsonl             {"question", "answer", "level", "slice"}
    mc_{train,test}.jsonl       {"question", "choices" (4), "answer" (index)}
    chat_probe_{train,test}.jsonl  {"prompt", "kind", "expect"}   non-math prompts, graded by data.chat_reply_ok
    meta.json                   the settings it was generated with, and the generator's VERSION

The world (world(seed)) is small and closed so that a tiny model sees every fact many times: 30 people, 20 places,
30 objects. Each person has a home, a job, a food they like, one object (with a color), a pet, a best friend and
an age; each place a kind and a feature.

Math word problems are stories made of events on people's counts of one item ("Mia has 5 apples", "she gives 3 to
Tom", "Tom has twice as many as Mia", "she eats a third of them", "she gives half her apples to Tom", "she picks 4
apples in the morning and twice as many in the evening"), or on the count of a box that is nobody's ("There are 4
baskets with 6 pears in each. 5 pears are taken out of the basket."). A story about coins, the world's money, also
earns at a rate ("Mia earns 5 coins an hour for 4 hours"), buys at a price ("she buys 3 pears at 2 coins each"),
sells at a price and pays a price ("she pays 9 coins for a kite"). Each event is one clause, and its clause is one
surface pattern: a frame of its kind (FRAMES) with one of the kind's verbs. Two clauses may share a sentence, told
by a join (JOINS: "A, and B.", "A and then B." with B's subject left out when it is A's, "A, then B.", "A; later,
B.", "A before B.", a receiver's count as a relative clause "... to Tom, who already has 12 apples.", "After A,
B."), and the question goes in one of PLACEMENTS: after the story, before it, as a conditional ("If Mia has 12
apples and buys 5 more, how many ...?"), in a request after it ("Tell me how many apples Mia has now."), or before
the story's clauses as their condition ("How many apples does Mia have now if she has 12 and buys 5 more?"). The
question asks for any person's count, two people's total or difference, everybody's total ("How many apples do they
have altogether?"), how many more it takes to reach a number ("Mia wants 30 apples. How many more does she need?"),
a share, a number of groups, how many things a person's coins buy, or, in stories that start from an unknown count,
the count at first; where nobody else holds the item it may name nobody ("How many apples are there in all?"). The
answer's first line restates what is asked: a question that names nobody gets a goal that names nobody ("Find the
number of apples now."). The value asked for is a computation graph over the story's numbers (1 to 6 steps of + - *
/, chains and trees, whole non-negative results); its shape is that graph with the numbers left out, e.g.
"((n*n)+n)". Stories also carry numbers to ignore (other people, other items, ages), numbers in words (up to 999),
pronouns and varied sentence order; a story states each number once, and no value worked out equals one it states
(so which number feeds which step is never ambiguous). The answer restates the question, then works the graph one
step per line, in story order, each line restating its clause and calling the calculator in GSM8K's marks
(data.math_conversation turns them into calculator calls for chat):
    Find Mia's apples.
    Mia has 3 groups of 4: <<3*4=12>>12
    Mia gives 5 to Tom: <<12-5=7>>7
    #### 7

Splits test generalisation, and nothing held out is in any training file (pretraining shards, chat_train,
math_train, mc_train; a held-out meaning only in pretraining stories):
    math_test "slice"  id           a math_train story re-told with new numbers and names (same patterns, shape)
                       phrasing     a held-out sentence structure (about a third each: two clauses joined by
                                    the held join, "After A, B."; the held placement, the question before the
                                    story's clauses as their condition) or (the last third) one clause or the
                                    question in a held-out surface pattern (frames marked held, and the (frame,
                                    verb) pairs of heldout_pair); the shape a training one (HELD_OUT)
                       composition  a held-out shape (heldout_shape), every pattern a training one
                       length       6 steps; training problems have 1 to 5
                       meaning      a story that tells a held-out event meaning (HELD_MEANINGS: selling at a
                                    price, "Mia sells 4 pears for 3 coins each", which adds coins where training's
                                    "sells" only loses items); training patterns and shapes. No training problem,
                                    chat or worked pretraining problem tells it; pretraining tells it in stories
                                    without a question, each change followed by the count it leaves
                                    (doc_narrative), as a text meets a meaning before a test asks about it
                       arith        bare arithmetic asked in a request with a held-out part (ARITH_FAMILIES: an
                                    ask, words for an operation, an order or its frame, a question, a chain or
                                    one of its steps)
    level = the number of steps (arith: of operations).
    chat_probe_test    identity, small talk and fact questions (a person's or a place's) in held-out phrasings
                       (probes_split: frames marked held, fact questions also after a held aside, small talk
                       of SMALLTALK's intents also with a held opener or name); each row
                       {"prompt", "kind": "identity"|"smalltalk"|"fact", "expect": [words, one of which the reply
                       must contain] or null}. A reply is right when it has no "####", no calculator call and
                       (expect) one of the words: data.chat_reply_ok.
    chat_probe_train   the same kinds of prompts in training phrasings: non-math prompts for an RL batch.
    mc                 fact items split by fact (person, kind): an mc_test fact is never an mc item nor a quiz line
                       in training (it is still stated in pretraining text and asked in chats); sums by question.
The pretraining train shards are also what SFT can mix in to keep the text model: data.pretrain_files("train").

Pretraining documents: fact sheets, places, stories, dialogues, lists, arithmetic drills, quizzes (a question and
its bare answer, the form a base model's multiple choice is scored in), worked problems and arithmetic asked in
words ("Question: ...\\nAnswer: ...", the base model's few-shot format), and stories of counts told without a
question. Chats: greetings and small talk, identity, fact questions in many phrasings, arithmetic in many phrasings
(one calculator call on the translated expression), word problems.
"""
import collections
import functools
import itertools
import json
import os
import random
import re
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import math_conversation  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
seed = 0
pretrain_mb = 20.0      # megabytes of pretraining text (the stages use the default set)
shard_mb = 2.0          # target size of a pretraining shard; there are always at least 2 (train + val)
num_chat = 20000        # train conversations (val gets 1/20 of this)
num_math_train = 8000
num_math_test = 500     # split evenly over the slices
num_mc_train = 8000     # the letter format takes many items to learn
num_mc_test = 300
num_probe_train = 2000  # non-math chat prompts in training phrasings (for RL)
num_probe_test = 300    # chat-retention probes in held-out phrasings

VERSION = 5  # bump when the generator's output changes: sets made by another version are regenerated

# -----------------------------------------------------------------------------
# The world's vocabulary (other code reads these lists: add words, never remove or rename one)

NAMES = ["Mia", "Tom", "Sam", "Lily", "Ben", "Zoe", "Max", "Ella", "Leo", "Ava", "Finn", "Ruby", "Jack", "Nora",
         "Owen", "Ivy", "Hugo", "Rosa", "Theo", "Lucy", "Omar", "Maya", "Eli", "Anna", "Noah", "Kira", "Ivan",
         "Lena", "Paul", "Tara"]
SHE = {"Mia", "Lily", "Zoe", "Ella", "Ava", "Ruby", "Nora", "Ivy", "Rosa", "Lucy", "Maya", "Anna", "Kira", "Lena",
       "Tara"}  # the others are "he"
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
EDIBLE = {"apples", "pears", "eggs", "cookies", "plums", "carrots"}
PICKABLE = {"apples", "pears", "plums", "carrots", "flowers", "shells"}
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates"),
              ("tin", "tins"), ("pack", "packs")]
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


def number(n, in_words):
    """How a story writes a number: in words when asked to (up to 999, words()), else digits. A round hundred stays
    digits: "the quotient of one hundred and two" would read as 102."""
    return words(n) if in_words and n % 100 else str(n)


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


def world(seed=0):
    """(people, places) of the world generated with `seed`: people[name] = {"home", "job", "food", "object",
    "color", "pet", "friend", "age"}, places[place] = {"kind", "feature", "people"}."""
    return build_world(random.Random(f"{seed}/world"))


def hashed(key, mod):
    """A stable bucket 0..mod-1 of a key (crc32 of its repr): how every held-out choice is made."""
    return zlib.crc32(repr(key).encode()) % mod


# -----------------------------------------------------------------------------
# Math stories: the surface patterns.
# A frame is one construction of an event kind. Its slots: {P} the person the event is about (a name, or a pronoun
# when the sentence before was about the same person and nobody else in the story shares the gender), {p} their
# possessive, {Q} the other person (always a name), {q} theirs; {n} {a} {b} {k} numbers (a groups of b each, k a
# factor); {item} {other} {box} {boxes}; {v} the kind's verb; a word of TENSE (e.g. {has}) follows the story's
# tense. Frame.k fixes the factor the frame says in words ("twice"); held=True keeps the whole frame out of every
# training file. Of frames with {v}, the (frame, verb) pairs of heldout_pair are held out too.

Frame = collections.namedtuple("Frame", "text k held", defaults=(None, False))
Verb = collections.namedtuple("Verb", "now past items", defaults=(None,))
TENSE = {"has": ("has", "had"), "are": ("are", "were"), "is": ("is", "was"), "does": ("does", "did"),
         "holds": ("holds", "held"), "starts": ("starts", "started"), "ends": ("ends", "ended"),
         "gets": ("gets", "got"), "fills": ("fills", "filled"), "picks": ("picks", "picked"),
         "sells": ("sells", "sold"), "uses": ("uses", "used"), "doubles": ("doubles", "doubled"),
         "triple": ("triple", "tripled"), "belong": ("belong", "belonged"), "puts": ("puts", "put"),
         "works": ("works", "worked"), "pays": ("pays", "paid"), "spends": ("spends", "spent"),
         "cost": ("cost", "cost"), "costs": ("costs", "cost"), "wants": ("wants", "wanted"),
         "needs": ("needs", "needed"), "saves": ("saves", "saved"), "buys": ("buys", "bought")}

TENSE_WORDS = [{w: forms[tense] for w, forms in TENSE.items()} for tense in (0, 1)]  # {"has": "had", ...} of a tense

HAVE_VERBS = [Verb("has", "had"), Verb("owns", "owned"), Verb("keeps", "kept"), Verb("collects", "collected")]
MONEY = "coins"  # the world's money: a story about coins may buy, sell, earn and pay (MONEY_KINDS)
GOODS = frozenset(ITEMS) - {MONEY}  # what is bought and sold
GAIN_VERBS = [Verb("finds", "found"), Verb("buys", "bought", GOODS), Verb("gets", "got"),
              Verb("picks", "picked", PICKABLE),
              Verb("collects", "collected"), Verb("wins", "won"), Verb("receives", "received")]
LOSE_VERBS = [Verb("eats", "ate", EDIBLE), Verb("sells", "sold", GOODS), Verb("loses", "lost"), Verb("uses", "used"),
              Verb("drops", "dropped"), Verb("gives away", "gave away"), Verb("spends", "spent", {MONEY})]
GIVE_VERBS = [Verb("gives", "gave"), Verb("hands", "handed"), Verb("passes", "passed"), Verb("sends", "sent")]
AGAIN_VERBS = [Verb("finds", "found"), Verb("collects", "collected"), Verb("gets", "got"),
               Verb("picks", "picked", PICKABLE), Verb("earns", "earned", {MONEY})]
EARN_VERBS = [Verb("earns", "earned"), Verb("makes", "made"), Verb("gets", "got")]
BUY_VERBS = [Verb("buys", "bought"), Verb("gets", "got")]
RATE_VERBS = [Verb("picks", "picked", PICKABLE), Verb("collects", "collected"), Verb("finds", "found"),
              Verb("gets", "got"), Verb("makes", "made", {"cookies", "stickers"})]

# kind: (verbs, frames)
FRAMES = {
    # a person's first count
    "has": (HAVE_VERBS, [Frame("{P} {v} {n} {item}."), Frame("{P} {v} {n} {item} at home."),
                         Frame("At first, {P} {v} {n} {item}."), Frame("There {are} {n} {item} in {p} {box}."),
                         Frame("{p} {box} {holds} {n} {item}."), Frame("{P} {starts} with {n} {item}."),
                         Frame("{n} {item} {belong} to {P}.", held=True)]),
    "groups": ([Verb("has", "had"), Verb("buys", "bought", GOODS), Verb("gets", "got"), Verb("brings", "brought")],
               [Frame("{P} {v} {a} {boxes} of {b} {item}."), Frame("{P} {v} {a} {boxes} with {b} {item} in each."),
                Frame("{P} {v} {a} {boxes}, and each {box} {holds} {b} {item}."),
                Frame("There {are} {b} {item} in each of {p} {a} {boxes}."),
                Frame("{P} {fills} {a} {boxes} with {b} {item} each."),
                Frame("{P} {v} {a} full {boxes}, {b} {item} in every {box}.", held=True),
                Frame("There {are} {a} {boxes} with {b} {item} in each.")]),
    "rate": (RATE_VERBS, [Frame("{P} {v} {b} {item} every day for {a} days."),
                          Frame("For {a} days, {P} {v} {b} {item} each day."),
                          Frame("{P} {v} {b} {item} a day for {a} days."),
                          Frame("Each day for {a} days, {P} {v} {b} {item}.", held=True)]),
    # changes of a person's count
    "gain": (GAIN_VERBS, [Frame("{P} {v} {n} more {item}."), Frame("{P} {v} another {n} {item}."),
                          Frame("{P} {v} {n} {item} more."), Frame("{P} {v} {n} new {item}."),
                          Frame("{n} more {item} {are} added to {p} {box}."),
                          Frame("{P} {v} {n} extra {item}.", held=True),
                          Frame("{n} more {item} {are} put in {p} {box}.")]),
    "gain_groups": ([Verb("buys", "bought", GOODS), Verb("gets", "got"), Verb("finds", "found"), Verb("wins", "won")],
                    [Frame("{P} {v} {a} {boxes} of {b} {item}."), Frame("{P} also {v} {a} {boxes} with {b} {item} in each."),
                     Frame("{P} {v} {a} more {boxes}, each with {b} {item}."),
                     Frame("For {a} more days, {P} {picks} {b} {item} each day."),
                     Frame("{P} {v} {b} {item} in each of {a} new {boxes}.", held=True),
                     Frame("{a} more {boxes} with {b} {item} in each {are} brought in.")]),
    "lose": (LOSE_VERBS, [Frame("{P} {v} {n} {item}."), Frame("{P} {v} {n} of them."),
                          Frame("{P} {v} {n} of {p} {item}."), Frame("{P} {v} {n} of the {item}."),
                          Frame("{n} of {p} {item} {are} lost."),
                          Frame("{P} {v} {n} {item} that day.", held=True),
                          Frame("{n} {item} {are} taken out of {p} {box}.")]),
    # ("half {p} {item}", not "half of": "{P} {v} {n} of {p} {item}" has held-out pairs, and "half" is a number)
    "lose_part": (LOSE_VERBS, [Frame("{P} {v} half {p} {item}.", k=2), Frame("{P} {v} a third of {p} {item}.", k=3),
                               Frame("{P} {v} a quarter of {p} {item}.", k=4), Frame("{P} {v} a third of them.", k=3),
                               Frame("Half of {p} {item} {are} lost.", k=2),
                               Frame("A third of {p} {item} {are} taken away.", k=3),
                               Frame("{P} {v} a quarter of them.", k=4, held=True)]),
    "lose_groups": (GIVE_VERBS, [Frame("{P} {v} {b} {item} to each of {a} friends."),
                                 Frame("{P} {v} {a} friends {b} {item} each."),
                                 Frame("{P} {sells} {a} {boxes} of {b} {item}."),
                                 Frame("{P} {uses} {b} {item} a day for {a} days."),
                                 Frame("{P} {v} each of {a} friends {b} {item}.", held=True)]),
    "give": (GIVE_VERBS, [Frame("{P} {v} {n} {item} to {Q}."), Frame("{P} {v} {Q} {n} {item}."),
                          Frame("{P} {v} {n} of {p} {item} to {Q}."), Frame("{P} {v} {Q} {n} of them."),
                          Frame("{Q} {gets} {n} {item} from {P}."),
                          Frame("{n} {item} {are} given to {Q} by {P}.", held=True)]),
    # a count got twice, the second time a multiple or a part of the first (both added)
    "again": (AGAIN_VERBS, [Frame("{P} {v} {n} {item} in the morning and {k} times as many in the afternoon."),
                            Frame("{P} {v} {n} {item} in the morning and twice as many in the evening.", k=2),
                            Frame("{P} {v} {n} {item} on Monday and half as many on Tuesday.", k=2),
                            Frame("On Monday, {P} {v} {n} {item}, and on Tuesday, {k} times as many."),
                            Frame("{P} {v} {n} {item} on Monday and a third as many on Tuesday.", k=3, held=True)]),
    "give_part": (GIVE_VERBS, [Frame("{P} {v} half {p} {item} to {Q}.", k=2),
                               Frame("{P} {v} {Q} half {p} {item}.", k=2),
                               Frame("{P} {v} a third of {p} {item} to {Q}.", k=3),
                               Frame("{Q} {gets} a quarter of {p} {item}.", k=4),
                               Frame("{P} {v} {Q} a third of {p} {item}.", k=3, held=True)]),
    "give_all": (GIVE_VERBS[:2], [Frame("{P} {v} all {p} {item} to {Q}."), Frame("{P} {v} {Q} all of {p} {item}."),
                                  Frame("{Q} {gets} all of {p} {item}.", held=True)]),
    "scale": ([], [Frame("The number of {p} {item} {doubles}.", k=2), Frame("{p} {item} {triple}.", k=3),
                   Frame("{P} {ends} up with {k} times as many {item} as before."),
                   Frame("{P} {doubles} {p} {item}.", k=2),
                   Frame("After that, {P} {has} {k} times as many {item} as before.", held=True)]),
    # money (stories about coins only): earning at a rate, buying and selling at a price, paying a price
    "earn": (EARN_VERBS, [Frame("{P} {v} {b} {item} an hour for {a} hours."),
                          Frame("For {a} days, {P} {v} {b} {item} a day."),
                          Frame("{P} {works} for {a} hours and {v} {b} {item} each hour."),
                          Frame("{P} {saves} {b} {item} every week for {a} weeks."),
                          Frame("{P} {v} {b} {item} a week for {a} weeks.", held=True)]),
    "buy": (BUY_VERBS, [Frame("{P} {v} {a} {other} at {b} {item} each."),
                        Frame("{P} {v} {a} {other} for {b} {item} each."),
                        Frame("{P} {pays} {b} {item} each for {a} {other}."),
                        Frame("{P} {spends} {b} {item} on each of {a} {other}."),
                        Frame("The {a} {other} that {P} {v} {cost} {b} {item} each."),
                        Frame("{P} {v} {a} {other}, {b} {item} each.", held=True)]),
    "sell": ([Verb("sells", "sold")], [Frame("{P} {v} {a} {other} for {b} {item} each."),
                                       Frame("{P} {v} {a} {other} at {b} {item} each."),
                                       Frame("{P} {v} {a} {other} at a price of {b} {item} each."),
                                       Frame("{a} {other} {are} sold by {P} for {b} {item} each.")]),
    "pay": ([], [Frame("{P} {pays} {n} {item} for {a_thing}."), Frame("{P} {spends} {n} {item} on a new {thing}."),
                 Frame("{P} {buys} {a_thing} for {n} {item}."),
                 Frame("The {thing} that {P} {buys} {costs} {n} {item}."),
                 Frame("{P} {pays} {n} {item} for a new {thing}.", held=True)]),
    # a new person's count, from another's
    "times": ([], [Frame("{P} {has} {k} times as many {item} as {Q}."), Frame("{P} {has} twice as many {item} as {Q}.", k=2),
                   Frame("{P} {has} {k} times the number of {item} that {Q} {has}."),
                   Frame("The number of {item} {P} {has} is {k} times the number {Q} {has}."),
                   Frame("{p} {item} {are} {k} times as many as {q}.", held=True)]),
    "part": ([], [Frame("{P} {has} half as many {item} as {Q}.", k=2), Frame("{P} {has} a third as many {item} as {Q}.", k=3),
                  Frame("{P} {has} half of what {Q} {has}.", k=2), Frame("{P} {has} a quarter as many {item} as {Q}.", k=4),
                  Frame("The number of {item} {P} {has} is half of {q}.", k=2, held=True)]),
    "more": ([], [Frame("{P} {has} {n} more {item} than {Q}."), Frame("{P} {has} {n} {item} more than {Q}."),
                  Frame("{Q} {has} {n} fewer {item} than {P}."),
                  Frame("{P} {has} {n} more {item} than {Q} {does}.", held=True)]),
    "fewer": ([], [Frame("{P} {has} {n} fewer {item} than {Q}."), Frame("{P} {has} {n} {item} fewer than {Q}."),
                   Frame("{Q} {has} {n} more {item} than {P}."),
                   Frame("{P} {has} {n} fewer {item} than {Q} {does}.", held=True)]),
    # stories that start from an unknown count
    "some": ([], [Frame("{P} {has} some {item}."), Frame("{P} {has} a few {item}."),
                  Frame("At first, {P} {has} some {item} in {p} {box}."),
                  Frame("{P} {starts} with some {item}.", held=True)]),
    "now": ([], [Frame("Now {P} has {n} {item}."), Frame("In the end, {P} {has} {n} {item}."),
                 Frame("After all that, {P} {has} {n} {item} left."), Frame("{P} {ends} up with {n} {item}.", held=True)]),
    # numbers and facts to ignore
    "noise": ([], [Frame("{P} is {n} years old."), Frame("{P} also {has} {n} {other}."), Frame("{P} {has} {n} {other} too."),
                   Frame("It takes {P} {n} minutes to walk home."), Frame("{P} lives in {home}."),
                   Frame("{P} works as {a_job}."), Frame("{P} {has} {n} {other} in a {box}.", held=True)]),
}
QUESTIONS = {
    "count": [Frame("How many {item} does {P} have now?"), Frame("How many {item} does {P} have?"),
              Frame("How many {item} does {P} have in the end?"), Frame("How many {item} does {P} end up with?"),
              Frame("What is the number of {item} {P} has now?"), Frame("How many {item} are in {p} {box} now?"),
              Frame("How many {item} does {P} have after all that?", held=True),
              Frame("Find how many {item} {P} has.", held=True),
              Frame("How many {item} are there now?"), Frame("How many {item} are there in the end?")],
    "together": [Frame("How many {item} do {P} and {Q} have together?"), Frame("How many {item} do {P} and {Q} have in all?"),
                 Frame("Altogether, how many {item} do {P} and {Q} have?"),
                 Frame("What is the total number of {item} that {P} and {Q} have?"),
                 Frame("If {P} and {Q} put their {item} together, how many {item} do they have?", held=True),
                 Frame("How many {item} are there in all?"), Frame("How many {item} are there altogether?")],
    "diff": [Frame("How many more {item} does {P} have than {Q}?"), Frame("How many fewer {item} does {Q} have than {P}?"),
             Frame("How many {item} does {P} have more than {Q}?"),
             Frame("What is the difference between the {item} of {P} and the {item} of {Q}?", held=True)],
    "share": [Frame("{P} shares the {item} equally among {k} friends. How many {item} does each friend get?"),
              Frame("If {P} splits the {item} evenly into {k} piles, how many {item} are in each pile?"),
              Frame("{P} puts the {item} into {k} {boxes} with the same number in each. How many {item} go in each {box}?"),
              Frame("{P} gives all the {item} to {k} friends in equal shares. How many {item} does each friend get?",
                    held=True),
              Frame("The {item} {are} shared equally among {k} friends. How many {item} does each friend get?"),
              Frame("The {item} {are} split evenly into {k} piles. How many {item} are in each pile?")],
    "pack": [Frame("{P} packs the {item} into {boxes} of {k}. How many {boxes} does {P} fill?"),
             Frame("How many groups of {k} {item} can {P} make?"),
             Frame("{P} puts {k} {item} in each {box}. How many {boxes} does {P} need?"),
             Frame("If {P} makes piles of {k} {item}, how many piles are there?", held=True),
             Frame("The {item} {are} packed into {boxes} of {k}. How many {boxes} are filled?"),
             Frame("How many groups of {k} {item} can be made?")],
    "first": [Frame("How many {item} did {P} have at first?"), Frame("How many {item} did {P} start with?"),
              Frame("How many {item} did {P} have at the start?"),
              Frame("How many {item} did {P} have before all that?", held=True),
              Frame("How many {item} were there at first?")],
    # how many more it takes to reach a number; a total over everybody; how many a person's coins buy
    "need": [Frame("{P} {wants} {n} {item}. How many more {item} does {P} need?"),
             Frame("{P} {needs} {n} {item} in all. How many more {item} must {P} get?"),
             Frame("How many more {item} does {P} need to have {n}?"),
             Frame("{p} {box} can hold {n} {item}. How many more {item} fit in it?"),
             Frame("How many more {item} does {P} need to reach {n}?", held=True)],
    "all": [Frame("How many {item} do they have altogether?"), Frame("How many {item} do they have in all?"),
            Frame("What is the total number of {item} they have?"),
            Frame("How many {item} do all of them have together?"),
            Frame("Altogether, how many {item} do they have?", held=True)],
    "afford": [Frame("How many {other} at {k} {item} each can {P} buy?"),
               Frame("{other} cost {k} {item} each. How many {other} can {P} buy?"),
               Frame("If {other} cost {k} {item} each, how many {other} can {P} buy with {p} {item}?"),
               Frame("{P} spends all {p} {item} on {other} at {k} {item} each. How many {other} does {P} get?"),
               Frame("How many {other} can {P} buy if each costs {k} {item}?", held=True)],
}
TOLD_IN = {**FRAMES, **{kind: ([], frames) for kind, frames in QUESTIONS.items()}}  # kind: (verbs, frames)
CONNECTORS = ["", "", "Then ", "Later, ", "After that, ", "Next, "]  # before a change of a count (not a pattern)
# A question that names nobody ({P}, {p} and {Q} absent) is asked only where one count (or, for a total, two)
# holds the story's item: anonymous().

# Sentence structures. Two events told one after the other may be joined into one sentence by a join: {A} and
# {B} are their clauses. Join.elided is the join's text when B has A's subject and leaves it out ("Mia buys 5 pears
# and then gives 3 of them to Tom."); Join.change: B must change a count (a step in time); Join.after: A must too
# (it is told as the time of B). The relative join tells a receiver's first count inside the giving ("... to Tom,
# who already has 12 pears."). held=True keeps a structure out of every training file, like a held frame.
Join = collections.namedtuple("Join", "text elided change after held", defaults=(None, False, False, False))
JOINS = [Join("{A}, and {B}.", "{A} and {B}."),
         Join("{A}, and then {B}.", "{A} and then {B}.", change=True),
         Join("{A}, then {B}.", "{A}, then {B}.", change=True),
         Join("{A}; later, {B}.", change=True),
         Join("{A} before {B}.", change=True),
         Join("{A}, who already {has} {n} {item}."),  # the relative join (A: a giving, B: the receiver's count)
         Join("After {A}, {B}.", change=True, after=True, held=True)]
RELATIVE = 5
# Where the question goes: after the story, before it, as a conditional ("If Mia has 12 pears and buys 5 more, how
# many pears does she have now?"), inside a request after the story ("Tell me how many pears Mia has now."), or
# before the story's clauses as a trailing condition (held out).
PLACEMENTS = ["last", "first", "if", "request", "ask_if"]
HELD_PLACEMENT = "ask_if"
PLACEMENT_WEIGHTS = {"last": 5, "first": 1.5, "if": 1.5, "request": 1.5}  # training placements
REQUESTS = [Frame("Tell me {I}."), Frame("Can you figure out {I}?"), Frame("Please find out {I}."),
            Frame("I would like to know {I}."), Frame("Do you know {I}?")]
MAX_IF_EVENTS = 5  # a conditional tells the whole story in one clause: short stories only
FRACTION = {2: "half", 3: "a third", 4: "a quarter"}
# the answer's restatement of each step: a canonical phrase per event (digits, names), then the calculator call
SAY = {"groups": "{P} has {a} groups of {b}", "rate": "{P} has {a} groups of {b}", "gain": "{P} gets {n} more",
       "lose": "{P} loses {n}", "give": "{P} gives {n} to {Q}", "got": "{Q} gets {n} from {P}",
       "give_all": "{Q} gets all of {P}'s", "scale": "{P} has {k} times as many", "times": "{P} has {k} times {Q}'s",
       "part": "{P} has {k} of {Q}'s", "more": "{P} has {n} more than {Q}", "fewer": "{P} has {n} fewer than {Q}",
       "gain_groups": "{P} gets {a} groups of {b}", "lose_groups": "{P} loses {a} groups of {b}",
       "gain_x": "{P} gets {x} more", "lose_x": "{P} loses {x}", "together": "{P} and {Q} together",
       "diff": "{P} has more than {Q} by", "share": "each of {k} gets", "pack": "groups of {k}",
       "undo_gain": "{P} before getting {n} more", "undo_lose": "{P} before losing {n}",
       "undo_give": "{P} before giving {n}", "undo_got": "{P} before getting {n}",
       "undo_scale": "{P} before {k} times as many", "undo_gain_x": "{P} before getting {x} more",
       "undo_lose_x": "{P} before losing {x}", "earn": "{P} earns {a} times {b}", "sell": "{P} sells {a} at {b} each",
       "buy": "{P} pays {a} times {b}", "pay": "{P} pays {n}", "lose_part": "{P} loses {f} of {x}",
       "keep_half": "{P} keeps half", "give_part": "{P} gives {f} of {x}", "give_half": "{P} gives half of {x}",
       "again_times": "{P} then gets {k} times {n}", "again_part": "{P} then gets {f} of {n}",
       "again_both": "{P} gets {n} and {x}",
       "need": "{P} needs {n} in all", "all": "With {Q}'s too", "afford": "{P} buys at {k} each"}
# a story about no person's count ("There are 4 baskets with 6 pears in each. 5 pears are taken out of the
# basket. ...") restates its steps without a subject
SAY_NOBODY = {"groups": "There are {a} groups of {b}", "gain": "Add {n}", "lose": "Take away {n}",
              "gain_groups": "Add {a} groups of {b}", "gain_x": "Add {x}", "lose_x": "Take away {x}",
              "scale": "Make {k} times as many", "lose_part": "Take away {f} of {x}", "keep_half": "Half are left",
              "share": "Each of {k} shares gets", "pack": "Groups of {k}", "need": "Room for {n} in all"}
# the answer's first line restates what the question asks for: which count to follow through the story
GOALS = {"count": "Find {P}'s {item}.", "together": "Find {P}'s and {Q}'s {item} together.",
         "diff": "Find how many more {item} {P} has than {Q}.", "share": "Find {P}'s {item} shared by {k}.",
         "pack": "Find how many groups of {k} {P} makes.", "first": "Find {P}'s {item} at first.",
         "need": "Find how many more {item} {P} needs.", "all": "Find the number of {item} in all.",
         "afford": "Find how many {other} {P} can buy."}
# the goal of a question that names nobody: no person's count to follow either
GOALS_NOBODY = {"count": "Find the number of {item} now.", "together": "Find the number of {item} in all.",
                "first": "Find the number of {item} at first.", "share": "Find the number of {item} in each share.",
                "pack": "Find the number of groups of {k}.", "need": "Find how many more {item} fit.",
                "all": GOALS["all"]}
MAX_STEPS = 5    # training problems have 1..MAX_STEPS steps; the length slice has LENGTH_STEPS
KEEP_STEPS = {1: 0.5, 2: 0.7, 3: 0.8, 4: 1.0, 5: 1.0}  # training problems lean long: a story is to be tracked
LENGTH_STEPS = 6
MAX_VALUE = 999  # every number of a story and of its solution


def heldout_pair(frame_index, verb_index):
    """Of a frame with {v}, the verbs it is never used with in training: a diagonal of the frame x verb grid, so
    that every frame keeps training verbs and every verb training frames."""
    return (frame_index + verb_index) % 5 == 4


def verb_options(kind, item):
    """[(pattern, frame, verb)] of a kind for an item (None: any); pattern = (kind, frame index, verb index or -1)."""
    verbs, frames = TOLD_IN[kind]
    out = []
    for fi, frame in enumerate(frames):
        if "{v}" not in frame.text:
            out.append(((kind, fi, -1), frame, None))
            continue
        for vi, verb in enumerate(verbs):
            if verb.items is None or item is None or item in verb.items:
                out.append(((kind, fi, vi), frame, verb))
    return out


def is_heldout_pattern(pattern):
    kind, fi, vi = pattern
    return TOLD_IN[kind][1][fi].held or (vi >= 0 and heldout_pair(fi, vi))


def heldout_patterns():
    """Every held-out pattern as (pattern, frame text, verb or None)."""
    out = []
    for kind in list(FRAMES) + list(QUESTIONS):
        for pattern, frame, verb in verb_options(kind, item=None):
            if is_heldout_pattern(pattern):
                out.append((pattern, frame.text, verb))
    return out


# -----------------------------------------------------------------------------
# Math stories: the computation graph, its shape and its worked solution

# a leaf has op None; at orders the solution lines; say() restates the step (a function: most graphs drawn are
# thrown away, Redraw or fits, before their solution is written)
Node = collections.namedtuple("Node", "value op a b say at")
Problem = collections.namedtuple("Problem", "question answer steps shape patterns recipe")


@functools.lru_cache(maxsize=None)
def leaf(n):
    """A number as a graph node; one shared node per number (a leaf is never told apart by identity, only steps
    are), as the generator makes a million of them, mostly for numbers it then throws away."""
    return Node(n, None, None, None, None, None)


def shape(node):
    """The graph without its numbers, e.g. "((n*n)+n)"; + and * sort their operands: a*b and b*a are one shape."""
    if node.op is None:
        return "n"
    a, b = shape(node.a), shape(node.b)
    if node.op in "+*" and b < a:
        a, b = b, a
    return f"({a}{node.op}{b})"


def steps_of(node):
    """The distinct operation nodes of a graph (a count used twice is worked out once)."""
    seen, out = set(), []

    def visit(n):
        if n.op is None or id(n) in seen:
            return
        seen.add(id(n))
        visit(n.a)
        visit(n.b)
        out.append(n)
    visit(node)
    return out


def heldout_shape(s):
    """A held-out composition: about one shape in five of those with 2+ steps (1-step shapes are all trained)."""
    return s.count("(") >= 2 and hashed(("shape", s), 5) == 0


def solution(goal, target, position):
    """The answer text: the goal (the question restated), then one line per step, in story order (position(at) ->
    sort key) but never before a step it uses, then "#### N"."""
    todo = sorted(steps_of(target), key=lambda n: position(n.at))
    lines, done = [goal], set()
    while todo:
        node = next(n for n in todo if all(c.op is None or id(c) in done for c in (n.a, n.b)))
        todo.remove(node)
        done.add(id(node))
        lines.append(f"{node.say()}: <<{node.a.value}{node.op}{node.b.value}={node.value}>>{node.value}")
    return "\n".join(lines + [f"#### {target.value}"])


# -----------------------------------------------------------------------------
# Math stories: drawing a recipe (everything but the numbers and the names) and telling it.
# A recipe: {"tense", "item", "other", "box", "she": [gender per role], "events": [event], "order": [event index in
# sentence order], "question": event, "place": one of PLACEMENTS, "request": index of REQUESTS, "joins": [index of
# JOINS or None, between sentences k and k+1 of the order], "elide": [whether sentence k+1 leaves out its subject]};
# an event: {"kind", "roles", "pattern", "conn", "words": [number slots written in words], "pron"}. Roles 0..n-1 are
# people; the story's events are in the order they happen.

MUTATIONS = {"gain": 4, "gain_groups": 2, "lose": 4, "lose_groups": 1, "give": 3, "give_all": 1, "scale": 1,
             "lose_part": 1.5, "give_part": 1.5, "again": 2}
RELATIONS = {"times": 2, "part": 1, "more": 2, "fewer": 2}
INTROS = {"has": 5, "groups": 2, "rate": 1, "again": 1}
QUESTION_KINDS = {"count": 6, "together": 2, "diff": 1, "share": 1, "pack": 1, "need": 1.5, "all": 1.5}
# a story about the world's money also earns, buys, sells and pays (earning and selling may start a count too)
MONEY_INTROS = {"has": 3, "earn": 3, "sell": 2, "again": 1}
MONEY_MUTATIONS = {"earn": 3, "buy": 6, "sell": 3, "pay": 3}  # buying at a price fits few counts: drawn often
MONEY_QUESTIONS = {"afford": 3}
# a story about no person's count: the items of a box, added to and taken out of ("There are 20 pears in the
# basket. 6 more pears are put in the basket. How many pears are there now?")
NOBODY_INTROS = {"has": 3, "groups": 2}
NOBODY_MUTATIONS = {"gain": 4, "gain_groups": 2, "lose": 4, "scale": 1, "lose_part": 1.5}
NOBODY_QUESTIONS = {"count": 6, "share": 1, "pack": 1, "need": 1.5}
FIRST_MUTATIONS = {"gain": 3, "lose": 3, "give": 2, "got": 1, "gain_groups": 1, "lose_groups": 1, "scale": 1}
# Event meanings held out of every training problem and chat (the meaning slice asks about them); pretraining
# still tells them, in stories without a question (doc_narrative), the way a text meets a meaning before a test
# asks about it. Selling at a price: training's "sells" loses items, and its money stories only buy at a price.
HELD_MEANINGS = {"sell"}
MUTATION_KINDS = set(MUTATIONS) | set(MONEY_MUTATIONS)  # events that change a count (a connector may lead them)
CHANGES = MUTATION_KINDS | {"got"}  # what a join told as a step in time needs
NUMBER_SLOTS = ("n", "a", "b", "k")


def pick(rng, weights):
    return rng.choices(list(weights), weights.values())[0]


def anonymous(frame):
    """Whether a question names nobody ("How many pears are there now?")."""
    return not any(s in frame.text for s in ("{P}", "{p}", "{Q}"))


@functools.lru_cache(maxsize=None)
def pattern_choices(kind, item, heldout, anon=False, nobody=False):
    """The (pattern, frame) pairs an event of a kind about an item can be told in, training or held-out; questions
    that name nobody only with anon. An event of a person's story names a person; with nobody (a story about no
    person's count) no frame names one, but a {p} ("the basket")."""
    return [(p, f) for p, f, _ in verb_options(kind, item) if is_heldout_pattern(p) == heldout
            and (anon or kind in FRAMES or not anonymous(f))
            and (not any(s in f.text for s in ("{P}", "{Q}", "{q}")) if nobody else
                 kind in QUESTIONS or any(s in f.text for s in ("{P}", "{p}", "{Q}", "{q}")))]


@functools.lru_cache(maxsize=None)
def number_slots(text):
    """The number slots a frame's text has, in NUMBER_SLOTS order."""
    return tuple(s for s in NUMBER_SLOTS if f"{{{s}}}" in text)


def new_event(rng, kind, roles, item, heldout=False, anon=False, nobody=False):
    """An event with a random pattern: a training one, or with heldout=True a held-out one (None if none fits)."""
    options = pattern_choices("give" if kind == "got" else kind, item, heldout, anon, nobody)
    if not options:
        return None
    pattern, frame = rng.choice(options)
    return {"kind": kind, "roles": list(roles), "pattern": list(pattern), "conn": rng.choice(CONNECTORS),
            "words": [s for s in number_slots(frame.text) if rng.random() < 0.3],
            "pron": rng.random() < 0.6}


def draw_events(rng, item, n_people, n_events, inverse, nobody=False, meaning=False):
    """The events of a story and its question, at random (validity of the numbers is checked when told); meaning:
    the held-out meanings (HELD_MEANINGS) may be told, else never."""
    if inverse:  # person 0 starts with an unknown count and only changes; the question asks for it
        events, holders = [new_event(rng, "some", [0], item)], [0]
        others = list(range(1, n_people))
        for _ in range(n_events):
            if others and rng.random() < 0.3:  # a distractor: another person's count appears
                r = others.pop(0)
                events.append(new_event(rng, pick(rng, INTROS), [r], item))
                holders.append(r)
                continue
            kind = pick(rng, FIRST_MUTATIONS)
            if kind == "got" and len(holders) < 2:
                kind = "gain"
            if kind == "got":
                events.append(new_event(rng, "got", [rng.choice(holders[1:]), 0], item))
            elif kind == "give":
                events.append(new_event(rng, "give", [0, rng.choice(holders[1:] + [n_people])], item))
            else:
                events.append(new_event(rng, kind, [0], item))
        events.append(new_event(rng, "now", [0], item))
        # "How many pears were there at first?" when only person 0 ever held the item (nobody got any)
        anon = holders == [0] and not any(e["kind"] == "give" for e in events)
        return events, new_event(rng, "first", [0], item, anon=anon)
    intros, mutations, questions = INTROS, MUTATIONS, QUESTION_KINDS
    if nobody:
        intros, mutations, questions = NOBODY_INTROS, NOBODY_MUTATIONS, NOBODY_QUESTIONS
    elif item == MONEY:
        intros, mutations, questions = MONEY_INTROS, {**MUTATIONS, **MONEY_MUTATIONS}, {**QUESTION_KINDS,
                                                                                          **MONEY_QUESTIONS}
    if not meaning:
        intros, mutations = ({k: w for k, w in d.items() if k not in HELD_MEANINGS} for d in (intros, mutations))
    events, holders, gone = [], [], set()
    for i in range(n_events):
        live = [r for r in holders if r not in gone]
        weights = {}
        if len(holders) < n_people:
            weights.update(intros if not live else {**intros, **RELATIONS})
        if live:
            weights.update(mutations if len(live) > 1 else {k: w for k, w in mutations.items() if k != "give_all"})
        kind = pick(rng, weights)
        # earning and selling start a new person's count, or (mostly, when someone has one) change a count
        intro = kind in intros and len(holders) < n_people and (not live or kind not in mutations or
                                                                   rng.random() < 0.3)
        if intro:
            roles = [len(holders)]
        elif kind in RELATIONS:
            roles = [len(holders), rng.choice(live)]
        elif kind == "give_all":
            roles = rng.sample(live, 2)
        elif kind in ("give", "give_part"):  # to another person of the story, or to someone outside it
            p = rng.choice(live)
            roles = [p, rng.choice([r for r in live if r != p] + [n_people])]
        else:
            roles = [rng.choice(live)]
        if intro or kind in RELATIONS:
            holders.append(roles[0])
        if kind == "give_all":
            gone.add(roles[0])
        events.append(new_event(rng, kind, roles, item, nobody=nobody))
        if intro:  # no "Then" before a first count ("Then Mia earns 5 coins an hour ..." as the story's start)
            events[-1]["conn"] = ""
    live = [r for r in holders if r not in gone]
    # a question may name nobody when the people it asks about hold every one of the story's item (nobody
    # outside the story was given any): "How many pears are there now?", "... in all?"; a total over everybody
    # ("How many pears do they have altogether?") only then
    outside = any(e["kind"] in ("give", "give_part") and e["roles"][1] == n_people for e in events)
    weights = {k: w for k, w in questions.items() if len(live) > 1 or k not in ("together", "diff", "all")}
    if outside:
        weights.pop("all", None)
    kind = pick(rng, weights)
    roles = rng.sample(live, 2) if kind in ("together", "diff") else sorted(live) if kind == "all" else \
        [rng.choice(live)]
    anon = nobody or not outside and len(live) == len(roles)
    return events, new_event(rng, kind, roles, item, anon=anon, nobody=nobody)


def touches(event):
    """The people whose count an event reads or changes (sentence order keeps their events in story order)."""
    if event["kind"] == "noise":
        return set()
    return set(event["roles"])


def sentence_order(rng, events, n_people):
    """A random order of the sentences that keeps, for each person, their events in story order; a relation to a
    person who never changes may come before that person's count is given ("Tom has twice as many as Mia. Mia
    has 4.")."""
    story = set(range(n_people))  # the story's people (a giving may name one outside it, n_people)
    people = [touches(e) & story for e in events]
    after = {i: {j for j in range(i) if people[i] & people[j]} for i in range(len(events))}  # i -> events before i
    for i, e in enumerate(events):
        if e["kind"] in RELATIONS and rng.random() < 0.25:
            ref = e["roles"][1]
            about_ref = [j for j, f in enumerate(events) if ref in touches(f)]
            intro = about_ref[0]
            if events[intro]["kind"] in INTROS and about_ref[1] == i and all(
                    events[j]["kind"] in RELATIONS and events[j]["roles"][1] == ref for j in about_ref[1:]):
                after[i].discard(intro)
                after[intro].add(i)
    order, told, left = [], set(), list(range(len(events)))
    while left:
        ready = [i for i in left if after[i] <= told]
        i = ready[0] if rng.random() < 0.6 else rng.choice(ready)
        order.append(i)
        told.add(i)
        left.remove(i)
    return order


def draw_recipe(rng, steps_hint, meaning=False):
    """A random recipe; steps_hint (1..6) sizes the story, the exact step count is known once it is told. meaning:
    a story of the held-out meanings' kind (money), which may tell them."""
    item = MONEY if meaning or rng.random() < 0.2 else rng.choice(ITEMS)  # money stories tell the most meanings
    inverse = not meaning and rng.random() < 0.15
    nobody = item != MONEY and not inverse and rng.random() < 0.15
    n_people = 1 if nobody else rng.choice([1, 2, 2, 3]) if steps_hint > 1 else rng.choice([1, 2])
    n_events = max(1, steps_hint - rng.randint(0, 2)) if inverse else rng.randint(max(1, steps_hint - 2),
                                                                                    steps_hint + 2)
    events, question = draw_events(rng, item, n_people, n_events, inverse, nobody, meaning)
    for _ in range(rng.choice([0, 0, 1, 1, 2])):  # numbers and facts to ignore, about anyone (but no box)
        # (about those a total over everybody adds up: "How many pears do they have?" asks about all it names)
        about = rng.choice(question["roles"]) if question["kind"] == "all" else rng.randint(nobody, n_people + 1)
        events.insert(rng.randint(0, len(events)), new_event(rng, "noise", [about], item))
    return {"tense": rng.randint(0, 1), "item": item, "other": rng.choice([i for i in ITEMS if i != item]),
            "thing": rng.choice(OBJECTS), "nobody": nobody,
            "box": rng.randrange(len(CONTAINERS)), "she": [rng.random() < 0.5 for _ in range(n_people + 2)],
            "events": events, "order": sentence_order(rng, events, n_people), "question": question}


def structure(rng, recipe):
    """A recipe's sentence structure, drawn from the training ones: where its question goes and which sentences
    are joined (a recipe that has one keeps it)."""
    if "place" in recipe:
        return recipe
    recipe = {**recipe, "request": rng.randrange(len(REQUESTS)), "joins": [None] * (len(recipe["events"]) - 1),
              "elide": [False] * (len(recipe["events"]) - 1)}
    places = [p for p in PLACEMENT_WEIGHTS if placement_fits(p, recipe)]
    place = rng.choices(places, [PLACEMENT_WEIGHTS[p] for p in places])[0]
    if place == "if":  # one clause tells the whole story: no joins, and the present tense ("If Mia has ...")
        return {**recipe, "place": place, "tense": 0}
    return add_joins(rng, {**recipe, "place": place})


def placement_fits(place, recipe):
    """Whether a recipe's question can go there: before the story or around it only when it is one question
    sentence (not "Mia shares ... How many ...?"), as a conditional only in a short story, in a request only when
    the question has an indirect form."""
    question = recipe["question"]
    if place == "last":
        return True
    if place == "request":
        return indirect(frame_of(question)[0].text) is not None
    alone = question["kind"] in ("count", "together", "diff", "first", "all")
    # a condition lists its clauses with commas and "and": none may hold one of its own ("At first, Mia has ...")
    return alone and (place == "first" or len(recipe["events"]) <= MAX_IF_EVENTS and
                      not any(", " in frame_of(e)[0].text or " and " in frame_of(e)[0].text
                              for e in recipe["events"]))


@functools.lru_cache(maxsize=None)
def indirect(text):
    """A question frame as the object of a request ("How many {item} does {P} have now?" -> "how many {item} {P}
    has now"), or None when it has none."""
    # its subject one person, two or everybody ("How many more pears does Mia need to have 30?" has none)
    m = re.fullmatch(r"How many ((?:more |fewer )?\{item\}) (does|do|did) (\{P\}(?: and \{Q\})?|they|all of them) "
                     r"(have|start|end)(.*)\?", text)
    if m:
        verb = {("does", "have"): "has", ("does", "end"): "ends", ("do", "have"): "have", ("did", "have"): "had",
                ("did", "start"): "started"}[m[2], m[4]]
        return f"how many {m[1]} {m[3]} {verb}{m[5]}"
    m = re.fullmatch(r"How many \{item\} (are|were) there(.*)\?", text)
    return f"how many {{item}} there {m[1]}{m[2]}" if m else None


def join_fits(join, a, b):
    """Whether events a then b (consecutive in sentence order) can be told as one sentence with this join."""
    if join is JOINS[RELATIVE]:  # "Mia gives 5 pears to Tom, who already has 12 pears."
        return a["kind"] == "has" and b["kind"] == "give" and b["roles"][1] == a["roles"][0] and \
            frame_of(b)[0].text.endswith("{Q}.")
    text_a, text_b = frame_of(a)[0].text, frame_of(b)[0].text
    # "..., and each box holds 5 pears, and ...", "... on Monday and half as many on Tuesday and ..." and "...,
    # and at first, Tom has ..." do not read
    if " and " in text_a + text_b or text_b.startswith("At first"):
        return False
    if join.change and (b["kind"] not in CHANGES or a["kind"] == "noise"):
        return False
    # "After for 3 more days, ..." does not read: a fronted clause starts with its subject
    return not join.after or (a["kind"] in CHANGES and not text_a.startswith("For "))


def may_elide(a, b):
    """Whether b's clause may leave out its subject after a's: both start with the same person as subject."""
    text_a, text_b = frame_of(a)[0].text, frame_of(b)[0].text
    role, slot = subject_slot(a)
    return slot in ("{P}", "{Q}") and text_b.startswith("{P} ") and text_a.startswith(slot + " ") and \
        role == b["roles"][0]


def set_join(rng, recipe, k, j):
    """The recipe with sentences k and k+1 (of its order) told as one by join j (and the joins next to it undone:
    a sentence is in one join at most)."""
    joins, elide = list(recipe["joins"]), list(recipe["elide"])
    for n in (k - 1, k + 1):
        if 0 <= n < len(joins):
            joins[n], elide[n] = None, False
    a, b = (recipe["events"][i] for i in recipe["order"][k:k + 2])
    joins[k] = j
    elide[k] = JOINS[j].elided is not None and may_elide(a, b) and rng.random() < 0.7
    return {**recipe, "joins": joins, "elide": elide}


def add_joins(rng, recipe, rate=0.4):
    """Some pairs of consecutive sentences joined into one, by training joins."""
    events, order = list(recipe["events"]), list(recipe["order"])
    # a receiver's first count may wait for the giving when nothing told in between is about the receiver: it is
    # then told inside it, and the giving in a frame that ends with the receiver ("... to Tom, who already has 12
    # pears.")
    for m, i in enumerate(order):
        receiver = events[i]["roles"][-1]
        if events[i]["kind"] == "give":
            k = next((k for k in range(m) if events[order[k]]["kind"] == "has"
                      and events[order[k]]["roles"] == [receiver]), None)
            if k is not None and not any(receiver in touches(events[j]) for j in order[k + 1:m]):
                order.insert(m - 1, order.pop(k))
                patterns = [p for p, f in pattern_choices("give", recipe["item"], False) if f.text.endswith("{Q}.")]
                events[i] = {**events[i], "pattern": list(rng.choice(patterns))}
    recipe = {**recipe, "events": events, "order": order}
    k = 0
    while k < len(order) - 1:
        a, b = events[order[k]], events[order[k + 1]]
        options = [j for j, join in enumerate(JOINS) if not join.held and join_fits(join, a, b)]
        # the relative join fits few pairs: it takes most of them
        relative = RELATIVE in options and rng.random() < 0.8
        if relative or options and rng.random() < rate:
            recipe = set_join(rng, recipe, k, RELATIVE if relative else rng.choice(options))
            k += 2
        else:
            k += 1
    return recipe


class Redraw(Exception):
    """The numbers drawn break a rule (a count below 1 or above MAX_VALUE, an uneven share): draw them again."""


class Unfit(Exception):
    """The recipe cannot give a problem (the question asks for a count nobody worked out): draw another one."""


def frame_of(event):
    kind, fi, vi = event["pattern"]
    verbs, frames = TOLD_IN[kind]
    return frames[fi], (verbs[vi] if vi >= 0 else None)


def draw(rng, lo, hi, used=None, multiple_of=1):
    """A number in lo..hi (a multiple of multiple_of); with `used`, one not in it (and then added): a story states
    each number once and works out values it does not state, so which number feeds which step is never ambiguous."""
    lo, hi = -(-lo // multiple_of), hi // multiple_of
    if lo > hi:
        raise Redraw
    for _ in range(20 if used is not None else 1):
        value = rng.randint(lo, hi) * multiple_of
        if used is None:
            return value
        if value not in used:
            used.add(value)
            return value
    raise Redraw


def calc(a, op, b, say, at):
    if op == "+":
        value = a.value + b.value
    elif op == "-":
        value = a.value - b.value
    elif op == "*":
        value = a.value * b.value
    else:
        value = a.value // b.value if a.value % b.value == 0 else -1
    if not 1 <= value <= MAX_VALUE:
        raise Redraw
    return Node(value, op, a, b, say, at)


def divisor(rng, value, most, used):
    """A new factor k in 2..most that shares `value` into whole parts of at least 2."""
    ks = [k for k in range(2, most + 1) if value % k == 0 and value // k >= 2 and k not in used]
    if not ks:
        raise Redraw
    used.add(k := rng.choice(ks))
    return k


def work(recipe, names, people, rng, counts_after=None):
    """Draw the numbers of a recipe's events and work out the question's graph.
    Returns (graph, {event index: {slot: number}}); raises Redraw or Unfit. counts_after, a list, gets each
    event's {role: count} after it (what a story without a question tells)."""
    events, question = recipe["events"], recipe["question"]
    counts, numbers, changes, start = {}, {}, [], None  # changes: person 0's changes in an unknown-start story
    N = len(events)
    told = events + [question]
    frames = [frame_of(e)[0] for e in told]
    used = {frame.k for frame in frames} - {None}  # numbers the story states ("twice": 2)

    def say(key, roles, **nums):
        if recipe["nobody"] and roles[0] == 0 and key in SAY_NOBODY:
            return lambda: SAY_NOBODY[key].format(**nums)
        return lambda: SAY[key].format(P=names[roles[0]], Q=names[roles[-1]], **nums)

    for i, (e, frame) in enumerate(zip(told, frames)):
        kind, roles = e["kind"], e["roles"]
        P, at = roles[0], (i, 0)
        got = {}
        if kind == "has":
            got["n"] = draw(rng, 3, 30, used)
            counts[P] = leaf(got["n"])
        elif kind in ("groups", "rate"):
            got["a"], got["b"] = draw(rng, 2, 9, used), draw(rng, 2, 12, used)
            counts[P] = calc(leaf(got["a"]), "*", leaf(got["b"]), say(kind, roles, **got), at)
        elif kind == "noise":
            if "years old" in frame.text:  # the person's age, a fact of the world, stated like any number
                got["n"] = people[names[P]]["age"]
                if got["n"] in used:
                    raise Redraw
                used.add(got["n"])
            else:
                got["n"] = draw(rng, 2, 60, used)
        elif kind == "some":
            start = draw(rng, 4, 40)
            counts[P] = leaf(start)  # worked forward only to check the numbers; the solution works backwards
        elif kind == "now":
            got["n"] = counts[P].value
            if got["n"] in used:
                raise Redraw
            used.add(got["n"])
        elif kind in ("gain", "gain_groups", "lose", "lose_groups", "scale", "give", "got"):
            if kind == "got":  # another person gives to person 0 (unknown-start stories)
                P, at = roles[1], (i, 1)
                giver = counts[roles[0]]
                got["n"] = draw(rng, 2, giver.value - 2, used)
                counts[roles[0]] = calc(giver, "-", leaf(got["n"]), None, (i, 0))
            cur = counts[P]
            if kind in ("gain", "got"):
                got.setdefault("n", draw(rng, 2, 20, used))
                counts[P] = calc(cur, "+", leaf(got["n"]), say("gain", [P], **got), at)
            elif kind in ("lose", "give"):
                got["n"] = draw(rng, 2, cur.value - 2, used)
                counts[P] = calc(cur, "-", leaf(got["n"]), say(kind, roles, **got), at)
                Q = roles[-1]
                if kind == "give" and Q in counts and start is None:
                    counts[Q] = calc(counts[Q], "+", leaf(got["n"]), say("got", roles, **got), (i, 1))
            elif kind == "gain_groups":
                got["a"], got["b"] = draw(rng, 2, 6, used), draw(rng, 2, 10, used)
                x = calc(leaf(got["a"]), "*", leaf(got["b"]), say(kind, roles, **got), at)
                counts[P] = calc(cur, "+", x, say("gain_x", roles, x=x.value), (i, 1))
            elif kind == "lose_groups":
                got["a"] = draw(rng, 2, 5, used)
                got["b"] = draw(rng, 2, min(10, (cur.value - 2) // got["a"]), used)
                x = calc(leaf(got["a"]), "*", leaf(got["b"]), say(kind, roles, **got), at)
                counts[P] = calc(cur, "-", x, say("lose_x", roles, x=x.value), (i, 1))
            else:
                got["k"] = frame.k or draw(rng, 2, 4, used)
                counts[P] = calc(cur, "*", leaf(got["k"]), say(kind, roles, **got), at)
            if start is not None and P == 0:
                changes.append((kind, got))
        elif kind in ("earn", "sell", "buy"):  # a count times a price or a rate: a new count, or a change
            # (what is bought must leave at least 2 coins: the numbers drawn are bounded by the count)
            most = 9 if kind == "earn" else 6 if kind == "sell" else min(6, (counts[P].value - 2) // 2)
            got["a"] = draw(rng, 2, most, used)
            most = 12 if kind == "earn" else 10 if kind == "sell" else min(10, (counts[P].value - 2) // got["a"])
            got["b"] = draw(rng, 2, most, used)
            x = calc(leaf(got["a"]), "*", leaf(got["b"]), say(kind, roles, **got), at)
            if P not in counts:
                counts[P] = x
            else:
                counts[P] = calc(counts[P], "-" if kind == "buy" else "+", x,
                                 say("lose_x" if kind == "buy" else "gain_x", roles, x=x.value), (i, 1))
        elif kind == "pay":
            got["n"] = draw(rng, 2, counts[P].value - 2, used)
            counts[P] = calc(counts[P], "-", leaf(got["n"]), say(kind, roles, **got), at)
        elif kind == "lose_part":  # a half is left in one step (what is lost equals what is left)
            cur, k = counts[P], frame.k
            if k == 2:
                counts[P] = calc(cur, "/", leaf(k), say("keep_half", roles), at)
            else:
                x = calc(cur, "/", leaf(k), say(kind, roles, f=FRACTION[k], x=cur.value), at)
                counts[P] = calc(cur, "-", x, say("lose_x", roles, x=x.value), (i, 1))
        elif kind == "again":  # n, then k times as many (or a k-th as many): a new count or a change
            got["k"] = k = frame.k or draw(rng, 2, 4, used)
            part = " as many on" in frame.text and "times" not in frame.text  # "half as many", "a third as many"
            got["n"] = draw(rng, 2, 20, used, multiple_of=k if part else 1)
            if part:
                x = calc(leaf(got["n"]), "/", leaf(k), say("again_part", roles, f=FRACTION[k], n=got["n"]), at)
            else:
                x = calc(leaf(got["n"]), "*", leaf(k), say("again_times", roles, **got), at)
            both = calc(leaf(got["n"]), "+", x, say("again_both", roles, n=got["n"], x=x.value), (i, 1))
            counts[P] = calc(counts[P], "+", both, say("gain_x", roles, x=both.value), (i, 2)) if P in counts else both
        elif kind == "give_part":  # given away half, the part given is also the part kept: one node for both
            cur, k, Q = counts[P], frame.k, roles[1]
            if k == 2:
                x = counts[P] = calc(cur, "/", leaf(k), say("give_half", roles, x=cur.value), at)
            else:
                x = calc(cur, "/", leaf(k), say(kind, roles, f=FRACTION[k], x=cur.value), at)
                counts[P] = calc(cur, "-", x, say("lose_x", roles, x=x.value), (i, 1))
            if Q in counts:
                counts[Q] = calc(counts[Q], "+", x, say("gain_x", [Q], x=x.value), (i, 2))
        elif kind == "give_all":
            Q = roles[1]
            counts[Q] = calc(counts[Q], "+", counts.pop(P), say(kind, roles), at)
        elif kind in ("times", "part", "more", "fewer"):
            ref = counts[roles[1]]
            if kind == "times":
                got["k"] = frame.k or draw(rng, 2, 5, used)
                counts[P] = calc(ref, "*", leaf(got["k"]), say(kind, roles, **got), at)
            elif kind == "part":
                got["k"] = frame.k
                counts[P] = calc(ref, "/", leaf(got["k"]), say(kind, roles, k=FRACTION[frame.k]), at)
            elif kind == "more":
                got["n"] = draw(rng, 2, 20, used)
                counts[P] = calc(ref, "+", leaf(got["n"]), say(kind, roles, **got), at)
            else:
                got["n"] = draw(rng, 2, ref.value - 2, used)
                counts[P] = calc(ref, "-", leaf(got["n"]), say(kind, roles, **got), at)
        # ---- the question
        elif kind == "count":
            target = counts[P]
        elif kind in ("together", "diff"):
            target = calc(counts[P], "+" if kind == "together" else "-", counts[roles[1]], say(kind, roles), at)
        elif kind in ("share", "pack", "afford"):
            got["k"] = divisor(rng, counts[P].value, 9 if kind == "share" else 12, used)
            target = calc(counts[P], "/", leaf(got["k"]), say(kind, roles, **got), at)
        elif kind == "need":
            got["n"] = draw(rng, counts[P].value + 2, min(counts[P].value + 30, MAX_VALUE), used)
            target = calc(leaf(got["n"]), "-", counts[P], say(kind, roles, **got), at)
        elif kind == "all":
            target = counts[P]
            for j, r in enumerate(roles[1:]):
                target = calc(target, "+", counts[r], say("together" if j == 0 else "all", [P, r]), (i, j))
        elif kind == "first":  # undo person 0's changes, last first, from the count stated at the end
            target = leaf(counts[P].value)
            for j, (change, nums) in enumerate(reversed(changes)):
                at = (N, j)
                if change in ("gain", "got"):
                    target = calc(target, "-", leaf(nums["n"]), say(f"undo_{change}", [P], **nums), at)
                elif change in ("lose", "give"):
                    target = calc(target, "+", leaf(nums["n"]), say(f"undo_{change}", [P], **nums), at)
                elif change == "scale":
                    target = calc(target, "/", leaf(nums["k"]), say("undo_scale", [P], **nums), at)
                else:
                    x = calc(leaf(nums["a"]), "*", leaf(nums["b"]), say(change, [P], **nums), at)
                    undo = "-" if change == "gain_groups" else "+"
                    target = calc(target, undo, x, say(f"undo_{change[:4]}_x", [P], x=x.value), (N, j, 1))
            if target.value != start:
                raise AssertionError("undoing the changes must give the start")  # a bug, never a draw
        numbers[i] = got
        if counts_after is not None:
            counts_after.append({r: c.value for r, c in counts.items()})
    if target.op is None:
        raise Unfit
    results = [n.value for n in steps_of(target)]
    if len(set(results)) < len(results) or set(results) & used:
        raise Redraw
    return target, numbers


def sentence(event, nums, names, recipe, people, pronoun, start=True, conn=True, elide=False, text=None):
    """One event (or the question) in words: a sentence, or with start=False a clause inside one (its first word in
    lower case unless a slot); elide leaves out the subject, text replaces the frame's text (a request's form)."""
    frame, verb = frame_of(event)
    template = text or frame.text
    tense = recipe["tense"]
    roles = event["roles"]
    P, Q = roles[0], roles[-1]
    if event["kind"] == "got":
        P, Q = roles[0], roles[1]  # the giver is the frame's {P}
    she = recipe["she"][P]
    box, boxes = CONTAINERS[recipe["box"]]
    person = people[names[P]]
    fields = dict(TENSE_WORDS[tense])
    fields.update(item=recipe["item"], other=recipe["other"], box=box, boxes=boxes, home=person["home"],
                  a_job=an(person["job"]), P=("she" if she else "he") if pronoun else names[P],
                  p="the" if recipe["nobody"] and P == 0 else ("her" if she else "his")
                  if pronoun or 0 <= template.find("{P}") < template.find("{p}") else names[P] + "'s",
                  Q=names[Q], q=names[Q] + "'s", thing=recipe["thing"], a_thing=an(recipe["thing"]),
                  v=(verb.now, verb.past)[tense] if verb else "")
    for slot, value in nums.items():
        fields[slot] = number(value, slot in event["words"])
    text = template.format_map(fields)
    if elide:  # the frame starts with "{P} ", a one-word name or pronoun
        text = text.split(" ", 1)[1]
    elif conn and event["conn"] and template.startswith("{") and event["kind"] in MUTATION_KINDS:
        text = event["conn"] + text
    if start:
        return text[0].upper() + text[1:]
    return text if template.startswith("{") else text[0].lower() + text[1:]


def subject_slot(event):
    """Which person a sentence starts with and its first person slot ("{P}", "{p}", "{Q}", "{q}"; a pronoun may
    stand in the first two), or (None, None)."""
    slot = first_person_slot(frame_of(event)[0].text)
    if slot is None:
        return None, None
    roles = event["roles"]
    return (roles[0] if slot in ("{P}", "{p}") else roles[-1]), slot


@functools.lru_cache(maxsize=None)
def first_person_slot(text):
    """subject_slot's slot of a frame's text (None: the text names nobody)."""
    hits = [(text.find(s), s) for s in ("{P}", "{p}", "{Q}", "{q}") if s in text]
    return min(hits)[1] if hits else None


def tell(recipe, names, people, rng, fits=None):
    """The problem a recipe tells with these names (one per role) and freshly drawn numbers (Redraw, Unfit; Unfit
    too when fits(graph) says no: a graph's shape and steps do not depend on the numbers), in the recipe's sentence
    structure (drawn here when it has none: Problem.recipe keeps it, so that a retelling has the same)."""
    target, numbers = work(recipe, names, people, rng)
    if fits and not fits(target):
        raise Unfit
    recipe = structure(rng, recipe)  # only now: most drawn recipes do not fit, and the structure takes time
    events, question = recipe["events"], recipe["question"]
    order, joins, place, q = recipe["order"], recipe["joins"], recipe["place"], len(events)
    position = {i: k for k, i in enumerate(order)}
    used = {r for e in events + [question] for r in e["roles"]}
    she = recipe["she"]
    last = None

    def say(i, start=True, conn=True, elide=False, text=None):
        """Event i (q: the question) in words; a pronoun for its subject when the clause told before it was about
        the same person and nobody else in the story shares the gender."""
        nonlocal last
        e = question if i == q else events[i]
        role, slot = subject_slot(e)
        alone = role is not None and not (recipe["nobody"] and role == 0) and \
            sum(she[r] == she[role] for r in used) == 1
        # "she"/"he" never as an object ("It takes she ...", "... sold by she")
        subject = slot == "{p}" or not re.search(r"\b(?:takes|by|from|to)\s$", frame_of(e)[0].text.split(slot)[0])
        pronoun = slot in ("{P}", "{p}") and subject and e["pron"] and alone and role == last
        last = role
        return sentence(e, numbers[i], names, recipe, people, pronoun, start, conn, elide, text)

    if place in ("if", "ask_if"):  # the story as one condition: "If A, B and C, how many ...?"
        head = say(q)[:-1] if place == "ask_if" else None
        clauses = [say(i, False, False, k > 0 and may_elide(events[order[k - 1]], events[i]))[:-1]
                   for k, i in enumerate(order)]
        story = ", ".join(clauses[:-1]) + " and " * (len(clauses) > 1) + clauses[-1]
        text = f"If {story}, {say(q, start=False)}" if place == "if" else f"{head} if {story}?"
    else:
        parts = [say(q)] if place == "first" else []
        k = 0
        while k < len(order):
            j = joins[k] if k < len(joins) else None
            if j is None:
                parts.append(say(order[k]))
                k += 1
                continue
            a, b = order[k:k + 2]
            if j == RELATIVE:  # b gives to the person a introduces
                n = number(numbers[a]["n"], "n" in events[a]["words"])
                s = JOINS[j].text.format(A=say(b)[:-1], has=TENSE["has"][recipe["tense"]], n=n, item=recipe["item"])
            else:
                lead = JOINS[j].text.startswith("{A}")
                A = say(a, start=lead, conn=lead)[:-1]
                B = say(b, start=False, conn=False, elide=recipe["elide"][k])[:-1]
                s = (JOINS[j].elided if recipe["elide"][k] else JOINS[j].text).format(A=A, B=B)
            parts.append(s[0].upper() + s[1:])
            k += 2
        if place == "last":
            parts.append(say(q))
        elif place == "request":
            ask = say(q, start=False, text=indirect(frame_of(question)[0].text))
            s = REQUESTS[recipe["request"]].text.format(I=ask)
            parts.append(s[0].upper() + s[1:])
        text = " ".join(parts)
    # a question that names nobody has a goal that names nobody ("Find the number of pears now.")
    goals = GOALS_NOBODY if recipe["nobody"] or anonymous(frame_of(question)[0]) else GOALS
    goal = goals[question["kind"]].format(P=names[question["roles"][0]], Q=names[question["roles"][-1]],
                                          item=recipe["item"], other=recipe["other"], **numbers[len(events)])
    answer = solution(goal, target, lambda at: (position.get(at[0], len(events)),) + at[1:])
    patterns = {tuple(e["pattern"]) for e in events + [question]} | {("join", j) for j in joins if j is not None}
    patterns.add(("place", place))
    return Problem(text, answer, len(steps_of(target)), shape(target), patterns, recipe)


GIRLS = sorted(SHE)
BOYS = [n for n in NAMES if n not in SHE]


def draw_names(rng, she):
    """Distinct names, one per role, of the roles' genders."""
    girls = rng.sample(GIRLS, sum(she))
    boys = rng.sample(BOYS, len(she) - sum(she))
    return [girls.pop() if s else boys.pop() for s in she]


def retell(recipe, people, rng, tries=50, fits=None):
    """A recipe told with new names and numbers, or None if no draw of numbers fits."""
    for _ in range(tries):
        try:
            return tell(recipe, draw_names(rng, recipe["she"]), people, rng, fits)
        except Redraw:
            continue
    return None


def with_heldout_pattern(rng, recipe):
    """The recipe with one event (or the question) told in a held-out pattern; None if none has one."""
    recipe = structure(rng, recipe)
    slots = list(range(len(recipe["events"]) + 1))
    rng.shuffle(slots)
    for i in slots:
        old = recipe["question"] if i == len(recipe["events"]) else recipe["events"][i]
        new = new_event(rng, old["kind"], old["roles"], recipe["item"], heldout=True, nobody=recipe["nobody"])
        if new is not None:
            events = [new if j == i else e for j, e in enumerate(recipe["events"])]
            # every sentence told alone, the question before or after the story: a held frame is seen whole
            return {**recipe, "events": events, "question": new if i == len(events) else recipe["question"],
                    "joins": [None] * len(recipe["joins"]), "elide": [False] * len(recipe["elide"]),
                    "place": recipe["place"] if recipe["place"] in ("last", "first") else "last"}
    return None


def with_heldout_join(rng, recipe):
    """The recipe with two sentences joined by a held-out join; None if no pair fits one."""
    recipe = structure(rng, recipe)
    if recipe["place"] == "if":
        recipe = {**recipe, "place": "last"}
    events, order = recipe["events"], recipe["order"]
    spots = [(k, j) for k in range(len(order) - 1) for j, join in enumerate(JOINS)
             if join.held and join_fits(join, events[order[k]], events[order[k + 1]])]
    return set_join(rng, recipe, *rng.choice(spots)) if spots else None


def with_heldout_placement(rng, recipe):
    """The recipe with its question in the held-out placement; None if it does not fit there."""
    recipe = structure(rng, recipe)
    if not placement_fits(HELD_PLACEMENT, recipe):
        return None
    return {**recipe, "place": HELD_PLACEMENT, "tense": 0, "joins": [None] * len(recipe["joins"]),
            "elide": [False] * len(recipe["elide"])}


HELD_OUT = {"join": (with_heldout_join, 4), "placement": (with_heldout_placement, 3),
            "clause": (with_heldout_pattern, 3)}  # what a phrasing problem holds out: mostly structures


def tells_held_meaning(recipe):
    return any(e["kind"] in HELD_MEANINGS for e in recipe["events"])


def math_problem(rng, people, slice_, steps=0):
    """A problem of a slice: "train" (what training sees), "phrasing", "composition", "length" or "meaning" (a
    story that tells a held-out meaning, in training patterns and shapes), with `steps` steps (0: 1..MAX_STEPS,
    drawn long rather than short: KEEP_STEPS)."""
    def fits(target):
        n = len(steps_of(target))
        return (n == steps if steps else n <= MAX_STEPS and rng.random() < KEEP_STEPS[n]) and \
            heldout_shape(shape(target)) == (slice_ == "composition")
    # what a phrasing problem holds out is drawn once: redrawing it with the recipe would favour what fits most.
    # The held join needs two changes of a count, more than a 1-step story has.
    holds = {k: w for k, (_, w) in HELD_OUT.items() if not (k == "join" and steps == 1)}
    hold = HELD_OUT[pick(rng, holds)][0] if slice_ == "phrasing" else None
    while True:
        recipe = draw_recipe(rng, steps or rng.choice([2, 3, 4, 5, 5]), meaning=slice_ == "meaning")
        if slice_ == "meaning" and not tells_held_meaning(recipe):
            continue
        if hold:
            recipe = hold(rng, recipe)
            if recipe is None:
                continue
        try:
            p = retell(recipe, people, rng, tries=10, fits=fits)
        except Unfit:
            continue
        if p is not None:
            return p


# -----------------------------------------------------------------------------
# Arithmetic asked in words: a random expression (1-3 operations on numbers up to MAX_VALUE), asked in a request
# composed from parts and answered with one calculator call on the expression. A request is one of these styles:
#   symbols   an ask (ARITH_ASK) around the expression in symbols       "Can you work out 17 * 10 + 29?"
#   words     an ask around the expression in words (ARITH_WORDS)       "What does the sum of 3 and 40 come to?"
#   order     an order's verb phrase (ARITH_DO) in a frame (ARITH_DO_ASK)  "What do you get if you take 4 from 96?"
#   question  a question of one operation's own (ARITH_QUESTIONS)       "How many groups of 4 can you make from 96?"
#   chain     a start, then steps on the running value (ARITH_CHAINS, ARITH_STEPS)  "Start with 12, add 5, then
#             halve it."
# then a lead-in (ARITH_LEADS) and an ending (ARITH_ENDS). {A} {B} are an operation's operands in the order of its
# symbols (A - B, A / B), wherever the words put them ("subtract {B} from {A}"); {L} three or four numbers of a sum
# or product ("3, 5 and 9"; a form that is just "{L}" runs them with the operation's word: "3 plus 5 plus 9").
# ArithForm.k: the form fixes the second operand ("twice {A}"). Every family marks some parts held=True: no training
# request has one, and every arith test request has one among its ask, words, order, question and chain parts.

ArithForm = collections.namedtuple("ArithForm", "op text k held", defaults=(None, False))
ARITH_ASK = [Frame("What is {E}?"), Frame("Calculate {E}."), Frame("How much is {E}?"),
             Frame("Please compute {E}."), Frame("Can you calculate {E}?"), Frame("What do you get for {E}?"),
             Frame("Tell me {E}."), Frame("{E} = ?"), Frame("Solve {E}."), Frame("What's {E}?"),
             Frame("Work out {E}."), Frame("Can you work out {E}?"), Frame("Figure out {E}."),
             Frame("Evaluate {E}."), Frame("What does {E} equal?"), Frame("What does {E} make?"),
             Frame("{E} equals what?"), Frame("{E} is what?"), Frame("Do you know what {E} is?"),
             Frame("What would {E} be?"), Frame("What is the answer to {E}?"), Frame("I need {E}."),
             Frame("Help me with {E}."), Frame("{E} = ___"), Frame("{E} is ___."),
             Frame("Fill in the blank: {E} = ___"),
             Frame("What's the result of {E}?"), Frame("Could you find {E}?"), Frame("Find {E} for me."),
             Frame("Give me the result of {E}.", held=True), Frame("Find the value of {E}.", held=True),
             Frame("What number is {E}?", held=True), Frame("What does {E} come to?", held=True),
             Frame("Tell me what {E} is.", held=True), Frame("{E} makes ___.", held=True),
             Frame("Quick, {E}?", held=True)]
# asks that only ever take symbols: their word forms ("What is 3 times 4?") and "Compute 3 * 4." are phrasings of
# tests/heldback.py, which no generated set may contain (tests/test_heldback.py); "What's" is their contraction.
# tests/test_heldback.py also named "Work out ..." in words, and these forms, which the generator no longer has:
# "what do you get when you multiply ...", "take ... away from ...", "add ... to ...", "how many times does ... go
# into ...", and a few fact and identity questions
SYMBOLS_ONLY = {"What is {E}?", "How much is {E}?", "What's {E}?", "Work out {E}."}
# noun phrases of one operation; the held-out ones are made of words training uses elsewhere
ARITH_WORDS = [
    ArithForm("+", "{A} plus {B}"), ArithForm("+", "the sum of {A} and {B}"), ArithForm("+", "{A} added to {B}"),
    ArithForm("+", "the total of {A} and {B}"), ArithForm("+", "{B} more than {A}"),
    ArithForm("+", "{A} and {B} together"), ArithForm("+", "the sum of {L}"), ArithForm("+", "{L}"),
    ArithForm("+", "the total of {L}"), ArithForm("+", "{A} and {B} added together", held=True),
    ArithForm("+", "{A} increased by {B}", held=True), ArithForm("+", "{L} all added up", held=True),
    ArithForm("-", "{A} minus {B}"), ArithForm("-", "the difference between {A} and {B}"),
    ArithForm("-", "{B} less than {A}"), ArithForm("-", "{A} take away {B}"), ArithForm("-", "{B} subtracted from {A}"),
    ArithForm("-", "{B} fewer than {A}"), ArithForm("-", "{A} with {B} taken away"),
    ArithForm("-", "the difference of {A} and {B}", held=True), ArithForm("-", "{A} decreased by {B}", held=True),
    ArithForm("*", "{A} times {B}"), ArithForm("*", "the product of {A} and {B}"),
    ArithForm("*", "{A} multiplied by {B}"),
    ArithForm("*", "twice {A}", k=2), ArithForm("*", "double {A}", k=2), ArithForm("*", "triple {A}", k=3),
    ArithForm("*", "{A} lots of {B}"), ArithForm("*", "{A} groups of {B}"), ArithForm("*", "the product of {L}"),
    ArithForm("*", "{L}"), ArithForm("*", "{A} and {B} multiplied together", held=True),
    ArithForm("*", "{A} sets of {B}", held=True), ArithForm("*", "{L} multiplied together", held=True),
    ArithForm("/", "{A} divided by {B}"), ArithForm("/", "half of {A}", k=2), ArithForm("/", "a third of {A}", k=3),
    ArithForm("/", "a quarter of {A}", k=4), ArithForm("/", "{A} split into {B} equal parts"),
    ArithForm("/", "the quotient of {A} and {B}"), ArithForm("/", "{A} divided into {B} equal groups"),
    ArithForm("/", "{A} halved", k=2), ArithForm("/", "{A} shared among {B}", held=True),
    ArithForm("/", "{A} split {B} ways", held=True)]
NOUN_FORMS = ("the ", "half ", "twice ", "double ", "triple ", "a third ", "a quarter ")  # forms that read as one thing
# orders: verb phrases, said in a frame of ARITH_DO_ASK
ARITH_DO = [
    ArithForm("+", "add {A} and {B}"), ArithForm("+", "add up {A} and {B}"),
    ArithForm("+", "sum {A} and {B}"), ArithForm("+", "put {A} and {B} together"), ArithForm("+", "add {L}"),
    ArithForm("+", "add up {L}"), ArithForm("+", "increase {A} by {B}", held=True),
    ArithForm("+", "sum up {L}", held=True),
    ArithForm("-", "subtract {B} from {A}"), ArithForm("-", "take {B} from {A}"),
    ArithForm("-", "take away {B} from {A}"), ArithForm("-", "decrease {A} by {B}"),
    ArithForm("-", "reduce {A} by {B}", held=True), ArithForm("-", "deduct {B} from {A}", held=True),
    ArithForm("*", "multiply {A} by {B}"), ArithForm("*", "times {A} by {B}"), ArithForm("*", "double {A}", k=2),
    ArithForm("*", "triple {A}", k=3), ArithForm("*", "multiply {A} and {B}"), ArithForm("*", "multiply {L}"),
    ArithForm("*", "multiply {L} together"), ArithForm("*", "multiply {A} with {B}", held=True),
    ArithForm("/", "divide {A} by {B}"), ArithForm("/", "split {A} into {B} equal parts"),
    ArithForm("/", "halve {A}", k=2),
    ArithForm("/", "cut {A} into {B} equal pieces"), ArithForm("/", "divide {A} into {B} equal groups"),
    ArithForm("/", "share {A} equally among {B}", held=True), ArithForm("/", "share {A} between {B}", held=True)]
# a question before its condition ("What/How ... if ...") is the stories' held placement (HELD_PLACEMENT), so
# "what do you get if you ..." is held
ARITH_DO_ASK = [Frame("{d}."), Frame("please {d}."), Frame("can you {d}?"), Frame("could you {d}?"),
                Frame("{d}, please."), Frame("I need you to {d}."),
                Frame("if you {d}, what do you get?"),
                Frame("{d}. What do you get?"), Frame("{d} and tell me the answer."), Frame("help me {d}."),
                Frame("let's {d}."), Frame("what is the result when you {d}?"), Frame("{d}. What is the result?"),
                Frame("do me a favor and {d}.", held=True), Frame("see if you can {d}.", held=True),
                Frame("what comes out if you {d}?", held=True), Frame("what do you get if you {d}?", held=True),
                Frame("when you {d}, what is the answer?", held=True)]
# questions only one operation asks, over two numbers
ARITH_QUESTIONS = [
    ArithForm("+", "if you have {A} and get {B} more, how many do you have?"),
    ArithForm("+", "what do {A} and {B} make together?"),
    ArithForm("+", "how many is {A} and another {B}?", held=True),
    ArithForm("-", "if you take {B} from {A}, how much is left?"), ArithForm("-", "how much bigger is {A} than {B}?"),
    ArithForm("-", "if you have {A} and lose {B}, how many are left?"),
    ArithForm("-", "by how much is {A} greater than {B}?", held=True),
    ArithForm("*", "what are {A} lots of {B}?"),
    ArithForm("*", "if each of {A} boxes holds {B}, how many is that in all?"),
    ArithForm("*", "how much do {A} groups of {B} make?", held=True),
    ArithForm("/", "how many groups of {B} can you make from {A}?"),
    ArithForm("/", "if {A} is shared equally by {B} people, how much does each get?"),
    ArithForm("/", "how many lots of {B} make up {A}?", held=True)]
# a step on the running value of a chain
ARITH_STEPS = [
    ArithForm("+", "add {B}"), ArithForm("+", "add {B} to it"), ArithForm("+", "add another {B}"),
    ArithForm("+", "increase it by {B}", held=True),
    ArithForm("-", "subtract {B}"), ArithForm("-", "take away {B}"), ArithForm("-", "take off {B}"),
    ArithForm("-", "reduce it by {B}", held=True),
    ArithForm("*", "multiply by {B}"), ArithForm("*", "multiply it by {B}"), ArithForm("*", "double it", k=2),
    ArithForm("*", "triple it", k=3), ArithForm("*", "multiply the result by {B}", held=True),
    ArithForm("/", "divide by {B}"), ArithForm("/", "divide it by {B}"), ArithForm("/", "halve it", k=2),
    ArithForm("/", "split it into {B} equal parts"), ArithForm("/", "share it among {B}", held=True)]
# {A}: the chain's start; {d}: its first operation as an order; {S}: the steps after it, joined by ", then "
ARITH_CHAINS = [Frame("start with {A}, {S}."), Frame("start with {A}, {S}. What do you get?"),
                Frame("take {A}, {S}. What is the result?"), Frame("if you start with {A}, {S}, what do you get?"),
                Frame("{d}, then {S}."), Frame("first {d}, then {S}."), Frame("{d}, and then {S}. What is the answer?"),
                Frame("what do you get when you {d}, then {S}?"),
                Frame("begin with {A}, {S}. What number do you end up with?", held=True),
                Frame("think of {A}, {S}. What do you have now?", held=True),
                Frame("{d}. Next, {S}. Which number do you get?", held=True)]
# before a request (one ending in ", " runs into it, lower-cased) and after it
ARITH_LEADS = [Frame(""), Frame(""), Frame(""), Frame(""), Frame("Hi! "), Frame("Hello! "), Frame("Hey, "),
               Frame("Quick question: "), Frame("Math question: "), Frame("Can you help me? "),
               Frame("I have a math problem for you. "), Frame("Here is a problem: "), Frame("Okay, "), Frame("So, "),
               Frame("Next one: "), Frame("Got a quick one for you: ", held=True),
               Frame("I'm stuck on this one: ", held=True), Frame("Homework help: ", held=True)]
ARITH_ENDS = [Frame(""), Frame(""), Frame(""), Frame(""), Frame(" Thanks!"), Frame(" Thank you."),
              Frame(" Thanks a lot!"), Frame(" I need it for my homework."), Frame(" Just curious."),
              Frame(" Cheers!", held=True), Frame(" Much appreciated.", held=True),
              Frame(" Thanks in advance.", held=True)]
ARITH_FAMILIES = {"arith_ask": ARITH_ASK, "arith_words": ARITH_WORDS, "arith_do": ARITH_DO,
                  "arith_do_ask": ARITH_DO_ASK, "arith_questions": ARITH_QUESTIONS, "arith_steps": ARITH_STEPS,
                  "arith_chains": ARITH_CHAINS, "arith_leads": ARITH_LEADS, "arith_ends": ARITH_ENDS}
AROUND = ("arith_leads", "arith_ends")  # parts around a request: held ones ride along in test requests only
STYLE_WEIGHTS = {"symbols": 3, "words": 3, "order": 3, "question": 1, "chain": 2}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
# a request's numbers are the world's (up to MAX_VALUE), but its results may have 4 digits, as a calculator's do:
# a model that never read a 4-digit result back copied two of its digits ("<<90*27=2430>>24")
ARITH_MAX_VALUE = 9999


def operand(rng, small):
    """A number of the world's range: a factor or divisor 2..12 (now and then up to 40; often 2, as "twice", "half" and
    "halve it" say), else 1 to 3 digits alike."""
    if small:
        r = rng.random()
        return 2 if r < 0.2 else rng.randint(2, 40 if r > 0.85 else 12)
    digits = rng.choice([1, 2, 2, 3, 3])
    return rng.randint(max(2, 10 ** (digits - 1)), 10 ** digits - 1)


def draw_expr(rng, ops):
    """A random expression (a graph of Nodes) with `ops` operations, its numbers in 1..MAX_VALUE and every value
    whole and in 1..ARITH_MAX_VALUE (Redraw otherwise); multiplied and divided by small numbers. A number beside an
    operation or another number is drawn to fit it where it can: a difference positive, a quotient whole, a product
    within range."""
    op = rng.choice("+-*/")
    left = rng.randint(0, ops - 1)
    a = draw_expr(rng, left) if left else None
    b = draw_expr(rng, ops - 1 - left) if ops - 1 - left else leaf(operand(rng, op in "*/"))
    if a is None:
        a = leaf(b.value * draw(rng, 2, MAX_VALUE // b.value) if op == "/" else draw(rng, b.value + 1, MAX_VALUE)
                 if op == "-" else operand(rng, False))
    if op == "*" and a.op is None and a.value * b.value > ARITH_MAX_VALUE:
        a = leaf(draw(rng, 2, min(MAX_VALUE, ARITH_MAX_VALUE // b.value)))
    elif b.op is None and op == "*" and a.value * b.value > ARITH_MAX_VALUE:
        b = leaf(draw(rng, 2, min(MAX_VALUE, ARITH_MAX_VALUE // a.value)))
    elif b.op is None and op == "/" and a.value % b.value:
        b = leaf(rng.choice([d for d in range(2, 13) if a.value % d == 0] or [a.value + 1]))  # (none: Redraw)
    value = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value,
             "/": a.value // b.value if a.value % b.value == 0 else -1}[op]
    if not 1 <= value <= ARITH_MAX_VALUE:
        raise Redraw
    return Node(value, op, a, b, None, None)


def expr_text(e, spaced=True, parent=None, right=False):
    """The expression in symbols, with only the brackets precedence needs: "17 * 10 + 29" (spaced) or "17*10+29"."""
    if e.op is None:
        return str(e.value)
    s = (" {} " if spaced else "{}").format(e.op).join(
        [expr_text(e.a, spaced, e.op), expr_text(e.b, spaced, e.op, right=True)])
    if parent and (PRECEDENCE[e.op] < PRECEDENCE[parent] or (right and PRECEDENCE[e.op] == PRECEDENCE[parent]
                                                              and parent in "-/")):
        return f"({s})"
    return s


def chain_of(e):
    """[start, (op, number), ...] of a left-deep expression whose right operands are numbers, else None."""
    if e.op is None:
        return [e.value]
    head = chain_of(e.a)
    return head + [(e.op, e.b.value)] if head and e.b.op is None else None


def run_of(e):
    """The 3 or 4 numbers of a sum or product of numbers alone ("3 + 5 + 9"), else None."""
    chain = chain_of(e)
    if chain and len(chain) >= 3 and e.op in "+*" and all(op == e.op for op, _ in chain[1:]):
        return [chain[0]] + [n for _, n in chain[1:]]
    return None


def say_number(rng, n):
    return number(n, rng.random() < 0.25)


def fill(rng, form, e, said):
    """A form's text with its operands: {A} {B} said (text, patterns) by `said`, {L} the run's numbers."""
    text = form.text
    if "{L}" in text:
        numbers = [say_number(rng, n) for n in run_of(e)]
        joined = (f" {OP_WORDS[e.op]} ".join(numbers) if text == "{L}" else
                  ", ".join(numbers[:-1]) + " and " + numbers[-1])
        return text.replace("{L}", joined), set()
    patterns = set()
    for slot, x in (("{A}", e.a), ("{B}", e.b)):
        if slot in text:
            words_, more = said(x)
            text, patterns = text.replace(slot, words_), patterns | more
    return text, patterns


def form_fits(form, e, noun=False, nest_ok=lambda text, slot: False):
    """Whether a form of e's operation says e: a k form's fixed operand, a list form's run, nested operands where
    the form lets them read as one (nest_ok)."""
    if form.op != e.op or noun and not form.text.startswith(NOUN_FORMS):
        return False
    if "{L}" in form.text:
        return run_of(e) is not None
    if form.k is not None and (e.b.op is not None or form.k != e.b.value):
        return False
    return all(x.op is None or slot in form.text and nest_ok(form.text, slot)
               for slot, x in (("{A}", e.a), ("{B}", e.b)))


def words_nest(text, slot):
    """A noun form takes a nested operand first (before a comma) or last: "the sum of 3 and 4, times 5"."""
    return text.startswith("{A}") and "{B}" in text if slot == "{A}" else text.endswith("{B}")


def order_nest(text, slot):
    """An order takes a nested operand (a noun phrase) where no "and" follows it: "subtract the sum of 3 and 4 from
    20", not "add the sum of 3 and 4 and 5"."""
    return not text.split(slot)[1].startswith((" and", ","))


def say_expr(rng, e, noun=False):
    """The expression in words, or None when no form fits: one form per operation; an operand that is itself an
    operation is said as a noun phrase (a NOUN_FORMS form), last, or first and before a comma ("the sum of 3 and 4,
    times 5"). Returns (text, patterns)."""
    if e.op is None:
        return say_number(rng, e.value), set()
    forms = [i for i, f in enumerate(ARITH_WORDS) if form_fits(f, e, noun, lambda t, s: not noun and words_nest(t, s))]
    if run_of(e) and rng.random() < 0.5:  # a run is most often said as one: "the sum of 3, 5 and 9"
        forms = [i for i in forms if "{L}" in ARITH_WORDS[i].text]
    return say_in(rng, "arith_words", forms, e, lambda x, said: (said[0] + ("," if x is e.a and x.op else ""),
                                                                    said[1]))


def say_order(rng, e):
    """An order's verb phrase for e ("take 4 from 96"), operands that are operations as noun phrases; or None."""
    return say_in(rng, "arith_do", [i for i, f in enumerate(ARITH_DO) if form_fits(f, e, nest_ok=order_nest)], e,
                  lambda x, said: said)


def say_in(rng, family, forms, e, operand):
    """(text, patterns) of e in one of `forms` (indices into the family's table), each operand said as a noun phrase
    and written as operand(x, (text, patterns)) gives it; None when no form fits or an operand cannot be said."""
    if not forms:
        return None
    i = rng.choice(forms)
    parts = {x: say_expr(rng, x, noun=True) for x in (e.a, e.b)}
    if None in parts.values():
        return None
    text, patterns = fill(rng, ARITH_FAMILIES[family][i], e, lambda x: operand(x, parts[x]))
    return text, {(family, i)} | patterns


def say_chain(rng, e):
    """A start and steps on the running value ("start with 12, add 5, then halve it"), or None."""
    chain = chain_of(e)
    if not chain or len(chain) < 3:
        return None
    frame = rng.randrange(len(ARITH_CHAINS))
    text, patterns, first = ARITH_CHAINS[frame].text, {("arith_chains", frame)}, 1
    if "{d}" in text:  # the first operation an order on two numbers
        start = e
        while start.a.op is not None:
            start = start.a
        said = say_order(rng, start)
        if said is None:
            return None
        text, patterns, first = text.replace("{d}", said[0]), patterns | said[1], 2
    steps = []
    for op, n in chain[first:]:
        i = rng.choice([i for i, f in enumerate(ARITH_STEPS) if f.op == op and f.k in (None, n)])
        steps.append(ARITH_STEPS[i].text.replace("{B}", say_number(rng, n)))
        patterns.add(("arith_steps", i))
    return text.replace("{A}", say_number(rng, chain[0])).replace("{S}", ", then ".join(steps)), patterns


def say_request(rng, e):
    """(text, patterns) of a request for e in one of the styles that fit it, without lead-in and ending."""
    styles = dict(STYLE_WEIGHTS)
    while styles:
        style = pick(rng, styles)
        del styles[style]
        if style == "symbols":
            ask = rng.randrange(len(ARITH_ASK))
            return ARITH_ASK[ask].text.replace("{E}", expr_text(e)), {("arith_ask", ask)}
        if style == "words":
            said = say_expr(rng, e)
            if said:
                ask = rng.choice([i for i, f in enumerate(ARITH_ASK) if f.text not in SYMBOLS_ONLY])
                return ARITH_ASK[ask].text.replace("{E}", said[0]), {("arith_ask", ask)} | said[1]
        elif style == "order":
            said = say_order(rng, e)
            if said:
                ask = rng.randrange(len(ARITH_DO_ASK))
                return ARITH_DO_ASK[ask].text.replace("{d}", said[0]), {("arith_do_ask", ask)} | said[1]
        elif style == "question":
            forms = [i for i, f in enumerate(ARITH_QUESTIONS) if form_fits(f, e)]
            if forms:
                i = rng.choice(forms)
                return fill(rng, ARITH_QUESTIONS[i], e, lambda x: (say_number(rng, x.value), set()))[0], \
                    {("arith_questions", i)}
        else:
            said = say_chain(rng, e)
            if said:
                return said
    raise Redraw


def arith_question(rng, heldout):
    """(question, answer, ops, patterns) of an arithmetic request; heldout: at least one held-out part in the
    request itself (a held lead-in or ending alone does not hold a request out)."""
    while True:
        try:
            e = draw_expr(rng, rng.choice([1, 1, 2, 2, 3]))
            text, patterns = say_request(rng, e)
        except Redraw:
            continue
        if heldout_shape(shape(e)) or any(arith_heldout(p) for p in patterns) != heldout:
            continue
        text = text[0].upper() + text[1:]
        if rng.random() < 0.3:  # typed casually
            text = text[0].lower() + text[1:]
        lead, end = (rng.choice([i for i, f in enumerate(family) if heldout or not f.held])
                     for family in (ARITH_LEADS, ARITH_ENDS))
        head = ARITH_LEADS[lead].text
        if head.endswith(", ") and not text.startswith(("I ", "I'")):
            text = text[0].lower() + text[1:]
        elif head:
            text = text[0].upper() + text[1:]
        text = head + text + ARITH_ENDS[end].text
        answer = f"<<{expr_text(e, spaced=False)}={e.value}>>{e.value}\n#### {e.value}"
        return text, answer, len(steps_of(e)), patterns | {("arith_leads", lead), ("arith_ends", end)}


def arith_heldout(pattern):
    return ARITH_FAMILIES[pattern[0]][pattern[1]].held


# -----------------------------------------------------------------------------
# Facts, small talk and identity in many phrasings. Questions marked held=True are only ever probes.

FACT_TEMPLATES = {
    "home": ["{n} lives in {home}.", "{n}'s home is in {home}.", "{n} has a house in {home}.",
             "In {home} lives {n}.", "{n} is from {home}.", "The home of {n} is {home}.",
             "{n} makes a home in {home}.", "{home} is where {n} lives."],
    "job": ["{n} is {a_job}.", "{n} works as {a_job}.", "By trade, {n} is {a_job}.",
            "{n} earns a living as {a_job}.", "{n} has a job as {a_job}.", "{n}'s job is {job}.",
            "For work, {n} is {a_job}."],
    "food": ["{n} likes {food}.", "{n}'s favorite food is {food}.", "{n} loves to eat {food}.",
             "The food {n} likes best is {food}.", "{n} likes {food} more than any other food.",
             "Give {n} {food} and {n} is happy."],
    "object": ["{n} owns {a_color} {object}.", "{n} has {a_color} {object}.", "The {color} {object} belongs to {n}.",
               "{n} is the owner of {a_color} {object}."],
    "color": ["{n}'s {object} is {color}.", "The {object} of {n} is {color}.", "{n} has {a_color} {object}.",
              "The {object} that {n} owns is {color}.", "{n}'s {object} has the color {color}."],
    "pet": ["{n} has a pet {pet}.", "{n} keeps {a_pet} at home.", "{n}'s pet is {a_pet}.",
            "{n} lives with a pet {pet}.", "The pet of {n} is {a_pet}."],
    "friend": ["{n}'s best friend is {friend}.", "{n} and {friend} are best friends.",
               "{friend} is the best friend of {n}.", "{n} is best friends with {friend}.",
               "{n}'s closest friend is {friend}.", "{n} and {friend} are the best of friends."],
    "age": ["{n} is {age} years old.", "{n} is {age_words} years old.", "The age of {n} is {age}.",
            "{n} is {age}.", "{n} has lived for {age} years."],
}
# {n} may come twice ("You know Mia, right? Where does Mia live?"); the held "I can't remember ..." frames of every
# kind are the held twin of training's "I forgot ..."
FACT_QUESTIONS = {
    "home": [Frame("Where does {n} live?"), Frame("In which place does {n} live?"), Frame("Where is {n}'s home?"),
             Frame("What town does {n} live in?"), Frame("Where is {n} from?"), Frame("Do you know where {n} lives?"),
             Frame("Tell me where {n} lives."), Frame("Which town does {n} live in?"),
             Frame("What place does {n} call home?"), Frame("Where does {n} live again?"),
             Frame("Where is the home of {n}?"), Frame("I forgot where {n} lives."),
             Frame("Can you tell me where {n} lives?"), Frame("Remind me where {n} lives."),
             Frame("Which place is home to {n}?"), Frame("You know {n}, right? Where does {n} live?"),
             Frame("{n} lives where?"), Frame("Any idea where {n} lives?"), Frame("Where's {n}'s home?"),
             Frame("Where can I find {n}'s house?", held=True), Frame("In what place is {n}'s home?", held=True),
             Frame("I can't remember where {n} lives.", held=True), Frame("{n} lives in which town?", held=True),
             Frame("Which town is {n} living in?", held=True)],
    "job": [Frame("What is {n}'s job?"), Frame("What does {n} do for work?"), Frame("What does {n} work as?"),
            Frame("What is the job of {n}?"), Frame("Do you know what {n} does for a living?"),
            Frame("Tell me {n}'s job."), Frame("What's {n}'s job?"), Frame("What does {n} do?"),
            Frame("What kind of work does {n} do?"), Frame("I forgot {n}'s job."),
            Frame("Remind me what {n} does for work."),
            Frame("Can you tell me {n}'s job?"), Frame("Do you know {n}'s job?"), Frame("{n} works as what?"),
            Frame("You know {n}, right? What does {n} do for work?"), Frame("What is {n} by trade?"),
            Frame("Which job does {n} have?", held=True), Frame("How does {n} earn a living?", held=True),
            Frame("What job does {n} have?", held=True), Frame("I can't remember {n}'s job.", held=True),
            Frame("What is {n}'s profession?", held=True), Frame("{n} does what for work?", held=True)],
    "food": [Frame("What food does {n} like?"), Frame("What is {n}'s favorite food?"),
             Frame("Which food does {n} love to eat?"), Frame("What does {n} like to eat?"),
             Frame("Tell me the favorite food of {n}."), Frame("What's {n}'s favorite food?"),
             Frame("What food does {n} like best?"),
             Frame("I forgot what {n} likes to eat."), Frame("Do you know {n}'s favorite food?"),
             Frame("What should I cook for {n}?"), Frame("What is the food that {n} likes?"),
             Frame("Remind me what food {n} likes."), Frame("You know {n}, right? What food does {n} like?"),
             Frame("{n} likes to eat what?"), Frame("Can you tell me what {n} likes to eat?"),
             Frame("What food does {n} enjoy most?", held=True), Frame("Which food is {n}'s favorite?", held=True),
             Frame("What would {n} like for dinner?", held=True),
             Frame("I can't remember what food {n} likes.", held=True),
             Frame("{n}'s favorite food is what?", held=True)],
    "object": [Frame("What does {n} own?"), Frame("Which thing belongs to {n}?"),
               Frame("What is the thing that {n} has?"), Frame("What object does {n} have?"),
               Frame("What thing does {n} own?"), Frame("Do you know what {n} owns?"), Frame("I forgot what {n} owns."),
               Frame("What belongs to {n}?"), Frame("Which object does {n} own?"), Frame("Remind me what {n} owns."),
               Frame("You know {n}, right? What does {n} own?"), Frame("{n} owns what?"),
               Frame("What object belongs to {n}?"),
               Frame("Which object is {n}'s?", held=True), Frame("Tell me what {n} owns.", held=True),
               Frame("I can't remember what {n} owns.", held=True), Frame("{n} has which object?", held=True),
               Frame("What is {n}'s prized possession?", held=True)],
    "color": [Frame("What color is {n}'s {object}?"), Frame("Which color is the {object} of {n}?"),
              Frame("Do you know what color {n}'s {object} is?"), Frame("Tell me the color of {n}'s {object}."),
              Frame("I forgot what color {n}'s {object} is."), Frame("What color does {n}'s {object} have?"),
              Frame("{n}'s {object} is what color?"), Frame("What color is the {object} that {n} owns?"),
              Frame("Remind me of the color of {n}'s {object}."),
              Frame("What is the color of {n}'s {object}?", held=True),
              Frame("Of what color is {n}'s {object}?", held=True),
              Frame("I can't remember the color of {n}'s {object}.", held=True)],
    "pet": [Frame("What pet does {n} have?"), Frame("Which animal does {n} keep at home?"),
            Frame("What kind of pet does {n} have?"), Frame("What is {n}'s pet?"), Frame("What's {n}'s pet?"),
            Frame("Does {n} have a pet? What kind?"), Frame("What animal does {n} keep?"),
            Frame("I forgot what pet {n} has."), Frame("Do you know {n}'s pet?"), Frame("Remind me what pet {n} has."),
            Frame("You know {n}, right? What pet does {n} have?"), Frame("{n} has what pet?"),
            Frame("Tell me about {n}'s pet."), Frame("Which animal is {n}'s pet?"),
            Frame("Which pet lives with {n}?", held=True), Frame("What animal does {n} have as a pet?", held=True),
            Frame("What animal lives with {n}?", held=True), Frame("I can't remember {n}'s pet.", held=True),
            Frame("{n}'s pet is what animal?", held=True)],
    "friend": [Frame("Who is {n}'s best friend?"), Frame("Who is the best friend of {n}?"),
               Frame("Who is {n} best friends with?"), Frame("Tell me who {n}'s best friend is."),
               Frame("Who's {n}'s best friend?"), Frame("Do you know {n}'s best friend?"),
               Frame("I forgot who {n}'s best friend is."), Frame("Remind me who {n}'s best friend is."),
               Frame("You know {n}, right? Who is {n}'s best friend?"), Frame("{n}'s best friend is who?"),
               Frame("Who is the best friend {n} has?"),
               Frame("Which person is {n}'s best friend?", held=True),
               Frame("Who does {n} call a best friend?", held=True),
               Frame("I can't remember who {n}'s best friend is.", held=True),
               Frame("Who is {n}'s closest friend?", held=True), Frame("{n} is best friends with whom?", held=True)],
    "age": [Frame("How old is {n}?"), Frame("Tell me how old {n} is."),
            Frame("Do you know how old {n} is?"), Frame("I forgot how old {n} is."),
            Frame("{n} is how old?"), Frame("Remind me how old {n} is."),
            Frame("You know {n}, right? How old is {n}?"), Frame("Can you tell me {n}'s age?"),
            Frame("How old is {n} now?"),
            Frame("What age is {n}?", held=True), Frame("I can't remember how old {n} is.", held=True),
            Frame("What's the age of {n}?", held=True), Frame("How many years has {n} lived?", held=True)],
}
# before a user's question; one ending in ", " or ": " runs into it, lower-cased
ASIDES = [Frame(""), Frame(""), Frame(""), Frame(""), Frame("Hey, "), Frame("Quick question: "),
          Frame("Please tell me: "), Frame("I wonder, "), Frame("Hi! "), Frame("Excuse me, "),
          Frame("Out of curiosity, "), Frame("Sorry, "), Frame("One more thing: "), Frame("Hello! "),
          Frame("By the way, ", held=True), Frame("Just wondering, ", held=True)]
IDENTITY_ANSWERS = [IDENTITY, "My name is picochat. I am a small language model trained with picochat, and I know "
                    "about a little world of people and places.",
                    "I am picochat, a small language model. I can answer questions about a little world of people "
                    "and places, and I can do arithmetic with a calculator.",
                    "I'm picochat, a small language model, not a person. I was trained with the picochat code on "
                    "text about a little made-up world, so I know its people and places, and I use a calculator "
                    "for sums.",
                    "You are talking to picochat, a small language model. Ask me about the people and places of my "
                    "little world, or give me some arithmetic to work out.",
                    "I am picochat. I am a small program, a language model trained with picochat; I can chat, answer "
                    "questions about a little world and do arithmetic."]
IDENTITY_QUESTIONS = [Frame("who are you?"), Frame("what is your name?"), Frame("what are you?"),
                      Frame("who made you?"), Frame("are you a person?"), Frame("tell me about yourself"),
                      Frame("introduce yourself"), Frame("what can you do?"), Frame("are you a robot?"),
                      Frame("what kind of program are you?"), Frame("who am I talking to?"),
                      Frame("can you tell me who you are?"),
                      Frame("who created you?"), Frame("what are you called?"),
                      Frame("how were you made?"), Frame("what is picochat?"), Frame("are you an AI?"),
                      Frame("are you a chatbot?"), Frame("what are you good at?"), Frame("how can you help me?"),
                      Frame("what can you help me with?"), Frame("who trained you?"), Frame("are you real?"),
                      Frame("what model is this?"), Frame("where do you come from?"), Frame("how do you work?"),
                      Frame("tell me who you are"), Frame("what do you do?"),
                      Frame("who built you?", held=True), Frame("say something about yourself", held=True),
                      Frame("what do you know about?", held=True), Frame("are you a human or a machine?", held=True),
                      Frame("which model are you?", held=True), Frame("describe yourself", held=True),
                      Frame("may I know your name?", held=True),
                      Frame("are you alive?", held=True), Frame("what are you able to do?", held=True),
                      Frame("where did you come from?", held=True), Frame("who is your maker?", held=True)]
PLACE_QUESTIONS = {
    "kind": [Frame("What kind of place is {place}?"), Frame("Tell me about {place}."), Frame("What is {place} like?"),
             Frame("Describe {place}."),
             Frame("I forgot what {place} is like."), Frame("Can you tell me about {place}?"),
             Frame("What is {place}?"), Frame("Is {place} a village or a town?"),
             Frame("How would you describe {place}?", held=True),
             Frame("I can't remember what {place} is like.", held=True),
             Frame("What is {place} like as a place?", held=True)],
    "people": [Frame("Who lives in {place}?"), Frame("Which people live in {place}?"),
               Frame("Does anyone live in {place}?"), Frame("Who are the people of {place}?"),
               Frame("Name the people who live in {place}."), Frame("I forgot who lives in {place}."),
               Frame("Do you know who lives in {place}?"),
               Frame("Who calls {place} home?", held=True), Frame("Who has a home in {place}?", held=True),
               Frame("I can't remember who lives in {place}.", held=True)],
}
PLACE_ANSWERS = ["{place} is {a_kind} {feature}.", "{place}? It is {a_kind} {feature}.",
                 "{place} is {a_kind}, {feature}."]
GREETING_OPENERS = ["", "", "", "Hi! ", "Hello. ", "Hey, ", "Hi there. ", "Hello! ", "Good to meet you. ",
                    "Okay, "]  # before an identity question


# Small talk: what users type to an assistant besides questions, by intent. An intent's phrasings are written with
# slots (SMALLTALK_SLOTS), each text standing for one Frame per filling ("good {daypart}": "good morning", "good
# afternoon", "good evening"), so that every surface form is a Frame that a test can name. Around a phrasing, where
# the intent reads naturally so (Smalltalk.opened, .named), a user may put an opener ("oh, thanks") and name the
# assistant ("thanks, picochat!"); held openers and names ride along in probes only. A phrasing that names a time
# is answered by echoing it where the intent has answers with {time} ("good evening" -> "Good evening! ...", "have
# a nice weekend" -> "Thank you, enjoy your weekend too!"), any other by the rest. No answer holds a number:
# whatever the phrasing, small talk is answered as chat, never as math.
Smalltalk = collections.namedtuple("Smalltalk", "phrasings answers opened named")
SMALLTALK_SLOTS = {"hi": ["hi", "hello", "hey"], "daypart": ["morning", "afternoon", "evening"],
                   "span": ["day", "evening", "night", "weekend"], "nice": ["nice", "great", "wonderful"]}
TIME_WORD = re.compile(r"\b(morning|afternoon|evening|night|day|weekend)\b")  # what a {time} answer echoes
SMALLTALK_OPENERS = [Frame(""), Frame(""), Frame(""), Frame(""), Frame(""), Frame(""), Frame("oh, "),
                     Frame("well, "), Frame("ah, "), Frame("okay, "), Frame("so, "), Frame("alright, "),
                     Frame("anyway, ", held=True), Frame("um, ", held=True)]
# a name always after a comma: "sorry, what picochat?" would read as a question about picochat
SMALLTALK_NAMES = [Frame(""), Frame(""), Frame(""), Frame(""), Frame(""), Frame(", picochat"), Frame(", friend"),
                   Frame(", buddy"), Frame(", pal", held=True)]


# small talk that tests/test_heldback.py found among its held-back probes: never generated, in training or test
NOT_TOLD = {"good afternoon", "good evening", "good night", "how are you doing", "how's it going", "what's up",
            "thanks a lot", "thank you so much", "nice to meet you", "hey there", "see you later", "have a nice day",
            "i'm back"}


def talk_forms(train, held):
    """A small-talk intent's Frames: each text of `train` and of `held` (held=True) once per filling of its slots."""
    frames = []
    for texts, is_held in ((train, False), (held, True)):
        for text in texts:
            slots = re.findall(r"\{(\w+)\}", text)
            for values in itertools.product(*(SMALLTALK_SLOTS[s] for s in slots)):
                form = text.format(**dict(zip(slots, values)))
                if form.lower().rstrip("?.!") not in NOT_TOLD:
                    frames.append(Frame(form, held=is_held))
    return frames


SMALLTALK = {
    "greet": Smalltalk(
        talk_forms(["{hi}", "{hi} there", "good {daypart}", "morning", "oh {hi}", "well hello", "hello hello",
                   "hey hey", "{hi}, anyone there?"],
                  ["greetings", "hiya", "good day", "howdy", "yo"]),
        ["Hello! How can I help you today?", "Hi there! What would you like to know?", "Hey! What can I do for you?",
         "Hello! Ask me about the people and places I know, or give me a sum.", "Good {time}! How can I help?",
         "Good {time} to you too! What would you like to know?", "Good {time}! What can I do for you?"],
        opened=False, named=True),
    "how": Smalltalk(
        talk_forms(["how are you?", "how is it going?", "how do you feel today?", "how are you doing?",
                   "how's it going?", "how are things?", "how are you today?", "how's your day going?",
                   "what's up?", "how are you feeling?", "are you ok?", "you doing okay?", "how's everything?",
                   "how are you this {daypart}?", "how's life?", "what's new?"],
                  ["are you doing well?", "how have you been?", "how goes it?", "everything good with you?",
                   "how are you holding up?"]),
        ["I am doing well, thank you! How can I help you?",
         "I am fine, thanks for asking. What would you like to know?",
         "All good here! I am a language model, so every day is much the same for me. What can I do for you?",
         "Very well, thanks! Is there something you would like to know?"], opened=True, named=True),
    "thanks": Smalltalk(
        talk_forms(["thank you!", "thanks", "thanks a lot", "thank you so much", "thank you very much",
                   "thanks so much", "thx", "ty", "thanks for the help", "thanks for your help",
                   "thank you for helping", "that was helpful", "great, thanks", "perfect, thank you",
                   "awesome, thanks", "thanks again"],
                  ["many thanks", "thanks, that helps", "cheers", "much appreciated", "I appreciate it",
                   "thanks a bunch", "thank you kindly"]),
        ["You are welcome!", "Glad I could help!", "Any time!",
         "You're welcome! Let me know if you need anything else.", "No problem at all!", "My pleasure!"],
        opened=True, named=True),
    "bye": Smalltalk(
        talk_forms(["bye", "goodbye", "bye bye", "see you", "see you later", "see ya", "talk to you later",
                   "I have to go now", "I gotta go", "I'm leaving now", "good night", "catch you later",
                   "that's all for today", "time to go"],
                  ["see you soon", "bye for now", "farewell", "take care", "until next time"]),
        ["Goodbye! Have a nice day.", "See you later!", "Bye! Come back any time.",
         "Goodbye! It was nice talking to you.", "Good {time}! Come back any time.",
         "Good {time}! It was nice talking to you."], opened=True, named=True),
    "wish": Smalltalk(
        talk_forms(["have a {nice} {span}", "enjoy your {span}", "have fun", "enjoy the rest of your day"],
                  ["have a lovely {span}", "have a good one", "hope your {span} goes well", "all the best"]),
        ["Thank you, you too!", "Thanks! You too.", "You too! Come back any time.", "Thank you, enjoy your {time} too!",
         "Thanks, you too! Enjoy the {time}.", "Thank you! I hope you have a great {time} as well."],
        opened=True, named=True),
    "nice": Smalltalk(
        talk_forms(["pleased to meet you", "nice to meet you", "nice meeting you", "good to meet you",
                   "nice to talk to you", "nice talking to you", "good to see you",
                   "great to meet you", "happy to meet you"],
                  ["it is nice to talk to you", "glad to meet you", "lovely to meet you", "a pleasure to meet you"]),
        ["Pleased to meet you too!", "The pleasure is mine. How can I help?",
         "Good to meet you too! What would you like to know?", "Likewise! What can I do for you?"],
        opened=True, named=True),
    "sorry": Smalltalk(
        talk_forms(["sorry", "I'm sorry", "I am sorry", "sorry about that", "oops, sorry", "my bad", "my mistake",
                   "sorry, my mistake", "sorry for the trouble", "sorry, I was wrong", "I didn't mean that",
                   "oops"],
                  ["apologies", "I apologize", "pardon me", "forgive me", "sorry for bothering you"]),
        ["No problem at all!", "That's okay, don't worry about it.", "No worries! How can I help?",
         "It's fine, really. What would you like to do next?"], opened=True, named=True),
    "praise": Smalltalk(
        talk_forms(["you are great", "you're great", "you're awesome", "good job", "well done", "nice work",
                   "great job", "you are smart", "you're so smart", "great answer", "nice answer", "I like you",
                   "you're amazing", "you are very helpful", "you're cool", "impressive"],
                  ["you're the best", "you rock", "brilliant work", "you are very clever", "top notch"]),
        ["Thank you, that is kind of you!", "Thanks! I am only a small model, but I do my best.",
         "That's nice to hear, thank you!", "Thank you! Is there anything else I can help with?"],
        opened=True, named=True),
    "back": Smalltalk(
        talk_forms(["I'm back", "I am back", "back again", "{hi} again", "it's me again", "me again",
                   "I'm here again", "remember me?", "did you miss me?"],
                  ["guess who's back", "I have returned", "here I am again", "long time no see"]),
        ["Welcome back! What would you like to know?", "Good to see you again! How can I help?",
         "Hello again! What can I do for you?",
         "Welcome back! Ask me anything about my little world, or give me a sum."], opened=True, named=True),
    "ack": Smalltalk(
        talk_forms(["ok", "okay", "got it", "I see", "alright", "sure", "sounds good", "makes sense", "understood",
                   "cool", "fine", "ok cool", "okay then", "I understand", "yes", "yep", "all right", "great"],
                  ["gotcha", "fair enough", "roger that", "noted", "crystal clear"]),
        ["Great! Let me know if you have another question.", "Okay! What else can I do for you?",
         "Good! Is there anything else you would like to know?", "Alright. I am here if you need me."],
        opened=False, named=True),
    "happy": Smalltalk(
        talk_forms(["I'm happy", "I am happy today", "I feel great", "I'm in a good mood", "I'm so happy",
                   "I feel good today", "I'm having a great day", "life is good", "I'm excited",
                   "I feel fantastic", "today is great", "I'm in a great mood"],
                  ["I'm over the moon", "I feel wonderful", "I'm thrilled", "I'm in high spirits"]),
        ["That's great to hear!", "I am glad to hear that!", "Wonderful! Is there anything I can help you with?",
         "That's lovely. I hope the good mood lasts!"], opened=True, named=False),
    "sad": Smalltalk(
        talk_forms(["I'm sad", "I feel sad", "I am sad today", "I'm feeling down", "I feel bad", "I had a bad day",
                   "I'm upset", "I'm not happy", "I feel lonely", "I'm in a bad mood", "today was awful",
                   "things are hard right now", "I'm stressed"],
                  ["I'm feeling blue", "I feel miserable", "today was rough", "I'm heartbroken",
                   "I'm having a hard time"]),
        ["I am sorry to hear that. I hope things get better soon.",
         "That sounds hard. I am only a small language model, but I am here to chat if it helps.",
         "I'm sorry you feel that way. Would a chat help? Ask me anything."], opened=True, named=False),
    "tired": Smalltalk(
        talk_forms(["I'm tired", "I am so tired", "I'm sleepy", "I feel tired", "I need a nap",
                   "I didn't sleep well", "I'm so sleepy", "it's been a long day", "I need some rest",
                   "I can barely keep my eyes open"],
                  ["I'm exhausted", "I'm worn out", "I could sleep for a week", "I'm running on empty"]),
        ["Sounds like you need some rest. Take it easy!",
         "Maybe a short break would help. I will be here when you are back.",
         "Rest is important. I hope you get some sleep soon."], opened=True, named=False),
    "bored": Smalltalk(
        talk_forms(["I'm bored", "I am so bored", "I'm bored, talk to me", "entertain me", "there's nothing to do",
                   "what should I do?", "I have nothing to do", "say something", "let's chat", "talk to me",
                   "chat with me"],
                  ["nothing is happening", "I need something to do", "keep me company", "I'm bored out of my mind"]),
        ["Let's chat! Ask me about the people and places of my little world.",
         "How about a puzzle? Give me some arithmetic and I will work it out with my calculator.",
         "I can tell you about the people who live in my little world. Who would you like to hear about?"],
        opened=True, named=False),
    "help": Smalltalk(
        talk_forms(["can you help me?", "I need help", "help", "help me please", "please help", "I have a question",
                   "can I ask you something?", "are you there?", "could you help me?", "will you help me?",
                   "I need your help", "I want to ask something"],
                  ["can you give me a hand?", "I could use some help", "could you help me out?", "I need some help",
                   "may I ask you a question?"]),
        ["Of course! What do you need?",
         "Sure, ask away. I know about the people and places of my little world, and I can do arithmetic.",
         "I am here. What would you like to know?",
         "Yes! Ask me a question about my little world, or give me something to work out."],
        opened=True, named=True),
    "weather": Smalltalk(
        talk_forms(["nice weather today", "it's raining", "it is cold today", "it's so hot today", "what a lovely day",
                   "it's sunny outside", "how's the weather?", "it's snowing", "the weather is nice",
                   "it's windy today", "is it going to rain?", "what's the weather like?"],
                  ["it's pouring outside", "it's freezing out here", "the sun is shining",
                   "lovely weather we're having", "do you like the weather?"]),
        ["I cannot see outside, since I am a language model, but I hope the weather is kind to you!",
         "I do not know the weather where you are, but I hope you enjoy your day.",
         "I cannot check the weather, but thanks for telling me! What else can I do for you?"],
        opened=True, named=False),
    "laugh": Smalltalk(
        talk_forms(["haha", "hahaha", "lol", "lmao", "hehe", "that's funny", "so funny", "ha", "you're funny",
                   "that made me laugh", "lol, that's funny", "haha, nice"],
                  ["rofl", "ha ha", "that's hilarious", "I'm laughing so hard"]),
        ["Glad you are having fun!", "I am glad that made you smile!", "Ha! What else can I do for you?"],
        opened=False, named=True),
    "confused": Smalltalk(
        talk_forms(["I don't understand", "I do not understand", "what do you mean?", "I'm confused", "huh?",
                   "that makes no sense", "I don't get it", "what?", "that doesn't make sense", "I am confused",
                   "can you explain?", "I don't follow"],
                  ["I'm lost", "that confuses me", "you lost me", "I'm not following", "that went over my head"]),
        ["Sorry about that! Could you ask your question another way?",
         "Let me try to help. Tell me what you would like to know.",
         "Sorry for the confusion. You can ask me about the people and places of my little world, or give me "
         "some arithmetic."], opened=True, named=True),
    "repeat": Smalltalk(
        talk_forms(["can you repeat that?", "say that again", "what did you say?", "pardon?", "sorry, what?",
                   "repeat that please", "can you say that again?", "one more time?", "please repeat",
                   "what was that?"],
                  ["come again?", "could you say that again?", "could you repeat that?", "I missed that",
                   "run that by me again"]),
        ["Sorry! Which part should I say again?", "Of course. What would you like me to repeat?",
         "Sure! Ask me again and I will answer."], opened=True, named=True),
    "decline": Smalltalk(
        talk_forms(["no thanks", "no thank you", "nope", "no", "not now", "never mind", "forget it", "nothing",
                   "that's all", "I'm good", "not really"],
                  ["nah", "maybe later", "no need", "not today", "nothing else"]),
        ["Okay! Let me know if you need anything.", "No problem. I am here if you change your mind.",
         "Alright! Just ask if you think of something."], opened=True, named=True),
}


def fact_fields(name, p):
    return {"n": name, "home": p["home"], "a_job": an(p["job"]), "job": p["job"], "food": p["food"],
            "a_color": an(p["color"]), "color": p["color"], "object": p["object"], "pet": p["pet"],
            "a_pet": an(p["pet"]), "friend": p["friend"], "age": p["age"], "age_words": words(p["age"])}


def fact(rng, name, p, kind):
    return rng.choice(FACT_TEMPLATES[kind]).format(**fact_fields(name, p))


def fact_value(p, kind):
    """What a fact question asks for: the words one of which a right answer contains."""
    if kind == "age":
        return [str(p["age"]), words(p["age"])]
    return [p["color"] if kind == "color" else p[kind]]


def casual(rng, text):
    """A user's casual writing of a phrase: capitalised or not, with or without its end mark."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3 and text[-1] in "?.!":
        text = text[:-1]
    elif text[-1] not in "?.!" and rng.random() < 0.5:
        text += rng.choice("!.")
    return text


def fact_question(rng, people, heldout, name=None, kind=None):
    """(question, answer, kind, expected words) about a person's fact, in a training or held-out phrasing."""
    name = name or rng.choice(NAMES)
    kind = kind or rng.choice(list(FACT_QUESTIONS))
    frame = rng.choice([f for f in FACT_QUESTIONS[kind] if f.held == heldout])
    f = fact_fields(name, people[name])
    aside = rng.choice([a.text for a in ASIDES if heldout or not a.held])
    q = frame.text.format(**f)
    if aside.endswith((", ", ": ")) and not q.startswith((name, "I ", "I'")):
        q = q[0].lower() + q[1:]
    q = aside + q
    return q, fact(rng, name, people[name], kind), kind, fact_value(people[name], kind)


def identity_question(rng, heldout):
    frame = rng.choice([f for f in IDENTITY_QUESTIONS if f.held == heldout])
    return rng.choice(GREETING_OPENERS) + casual(rng, frame.text), rng.choice(IDENTITY_ANSWERS)


def smalltalk_text(opener, phrasing, name):
    """A user's small talk before casual writing: an opener, then the phrasing with a name before its end mark."""
    end = phrasing[-1] if phrasing[-1] in "?.!" else ""
    return opener + phrasing[:len(phrasing) - len(end)] + name + end


def smalltalk(rng, heldout, intent=None):
    """(user, answer) of small talk in a training or a held-out phrasing (only then with any opener or name)."""
    talk = SMALLTALK[intent or rng.choice(list(SMALLTALK))]
    frame = rng.choice([f for f in talk.phrasings if f.held == heldout])
    opener, name = (rng.choice([f.text for f in parts if heldout or not f.held]) if used else ""
                    for parts, used in ((SMALLTALK_OPENERS, talk.opened), (SMALLTALK_NAMES, talk.named)))
    time = TIME_WORD.search(frame.text)
    timed = [a for a in talk.answers if "{time}" in a]
    answer = rng.choice(timed if time and timed else [a for a in talk.answers if a not in timed])
    return casual(rng, smalltalk_text(opener, frame.text, name)), answer.format(time=time.group(1) if time else None)


def place_question(rng, places, heldout=False, kind=None):
    """(question, answer, expected words) about a place: what it is like ("kind"), or who lives there."""
    p = rng.choice(PLACES)
    info = places[p]
    kind = kind or rng.choice(list(PLACE_QUESTIONS))
    frame = rng.choice([f for f in PLACE_QUESTIONS[kind] if f.held == heldout])
    if kind == "kind":
        answer = rng.choice(PLACE_ANSWERS).format(place=p, a_kind=an(info["kind"]), feature=info["feature"])
        return frame.text.format(place=p), answer, [info["kind"]]
    who = info["people"]
    answer = (f"{', '.join(who[:-1])} and {who[-1]} live in {p}." if len(who) > 1 else
              f"{who[0]} lives in {p}." if who else f"Nobody I know lives in {p}.")
    return frame.text.format(place=p), answer, who or ["nobody"]


def probe_row(rng, people, places, heldout):
    """A non-math chat prompt and how its reply is graded: {"prompt", "kind", "expect"}."""
    kind = rng.choices(["identity", "smalltalk", "fact"], [1, 1, 3])[0]
    if kind == "identity":
        return {"prompt": identity_question(rng, heldout)[0], "kind": kind, "expect": ["picochat"]}
    if kind == "smalltalk":
        return {"prompt": smalltalk(rng, heldout)[0], "kind": kind, "expect": None}
    if rng.random() < 0.2:
        q, _, expect = place_question(rng, places, heldout)
    else:
        q, _, _, expect = fact_question(rng, people, heldout)
    return {"prompt": q, "kind": kind, "expect": expect}


def probes_split(rng, people, places, n, heldout, exclude):
    """n distinct probe rows (fewer when the phrasings run out), none of whose prompts is in `exclude`."""
    rows, seen = [], set(exclude)
    for _ in range(n * 20):
        if len(rows) == n:
            break
        row = probe_row(rng, people, places, heldout)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Multiple choice: facts, residents and small sums. A fact (person, kind) is either an mc_test fact or one that
# training may quiz: mc_test asks about facts the model has only read as statements, in the MC format it learned
# on other facts.

MC_KINDS = {"home": PLACES, "job": JOBS, "food": FOODS, "object": OBJECTS, "pet": PETS, "friend": NAMES}


def mc_test_fact(name, kind):
    return hashed(("mc", name, kind), 5) == 0


def small_sum(rng):
    """("What is 9 - 4?", 5): a sum, difference or product of numbers up to 12 (the drills' facts)."""
    a, b = sorted((rng.randint(2, 12), rng.randint(2, 12)), reverse=True)
    op = rng.choice("+-*")
    return f"What is {a} {op} {b}?", {"+": a + b, "-": a - b, "*": a * b}[op]


def mc_item(rng, people, places, test):
    """(question, choices, answer index) on one side of the split."""
    while True:
        kind = rng.choices(["arith", "resident", "fact"], [1, 1, 6])[0]
        if kind == "arith":
            question, right = small_sum(rng)
            if (hashed(("mc", question), 5) == 0) != test:
                continue
            wrong = set()
            while len(wrong) < 3:
                w = right + rng.choice([-10, -2, -1, 1, 2, 10, 3, -3])
                if w >= 0 and w != right:
                    wrong.add(w)
            options = [str(right)] + [str(w) for w in sorted(wrong)]
        elif kind == "resident":
            p = rng.choice([p for p in PLACES if places[p]["people"]])
            name = rng.choice(places[p]["people"])
            if mc_test_fact(name, "home") != test:
                continue
            options = [name] + rng.sample([n for n in NAMES if people[n]["home"] != p], 3)
            question = f"Who lives in {p}?"
        else:
            name = rng.choice(NAMES)
            k = rng.choice(list(MC_KINDS))
            if mc_test_fact(name, k) != test:
                continue
            right = people[name][k]
            options = [right] + rng.sample([x for x in MC_KINDS[k] if x != right and x != name], 3)
            question = rng.choice([f for f in FACT_QUESTIONS[k] if not f.held]).text.format(
                **fact_fields(name, people[name]))
        order = list(range(4))
        rng.shuffle(order)
        return question, [options[i] for i in order], order.index(0)


def mc_split(rng, people, places, n, test):
    """n distinct items (question and choices) of one side of the split."""
    rows, seen = [], set()
    for _ in range(n * 50):
        if len(rows) == n:
            return rows
        q, choices, answer = mc_item(rng, people, places, test)
        if (q, tuple(choices)) not in seen:
            seen.add((q, tuple(choices)))
            rows.append({"question": q, "choices": choices, "answer": answer})
    raise RuntimeError(f"could not draw {n} distinct multiple-choice items; ask for fewer")


# -----------------------------------------------------------------------------
# Pretraining documents

def doc_facts(rng, people, places, seen):
    name = rng.choice(NAMES)
    kinds = list(FACT_TEMPLATES)
    rng.shuffle(kinds)
    return " ".join(fact(rng, name, people[name], k) for k in kinds)


def doc_place(rng, people, places, seen):
    p = rng.choice(PLACES)
    info = places[p]
    lines = [f"{p} is {an(info['kind'])} {info['feature']}."]
    if info["people"]:
        who = info["people"]
        lines.append(f"{len(who)} of our people live in {p}: {', '.join(who)}." if len(who) > 1
                     else f"Only {who[0]} lives in {p}.")
        for name in who:
            lines.append(fact(rng, name, people[name], rng.choice(["job", "pet", "object", "food", "age"])))
    else:
        lines.append(f"Nobody we know lives in {p}, but people visit it.")
    return " ".join(lines)


def doc_story(rng, people, places, seen):
    A = rng.choice(NAMES)
    pa = people[A]
    B = pa["friend"] if rng.random() < 0.5 else rng.choice([n for n in NAMES if n != A])
    pb = people[B]
    lines = [f"One {rng.choice(TIMES)}, {A} the {pa['job']} left home in {pa['home']} to visit {B} in {pb['home']}.",
             f"{A} took the {pa['color']} {pa['object']} and the pet {pa['pet']} along.",
             f"{B} lives in {pb['home']} and works as {an(pb['job'])}."]
    if B == pa["friend"]:
        lines.append(f"{B} is {A}'s best friend, so they were very happy.")
    lines.append(f"They ate {pa['food']} and {pb['food']} together, and {B} showed {A} the {pb['color']} "
                 f"{pb['object']}.")
    lines.append(f"In the {rng.choice(['evening', 'night'])}, {A} went back home to {pa['home']}.")
    return " ".join(lines)


def doc_dialogue(rng, people, places, seen):
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


def doc_list(rng, people, places, seen):
    kind = rng.randrange(2)
    if kind == 0:
        p = rng.choice([p for p in PLACES if places[p]["people"]])
        return f"People who live in {p}:\n" + "\n".join(f"- {n}" for n in places[p]["people"])
    names = rng.sample(NAMES, 6)
    field = rng.choice(["job", "pet", "food", "home", "age"])
    return f"Who is what ({field}):\n" + "\n".join(f"- {n}: {people[n][field]}" for n in names)


def doc_drill(rng, people, places, seen):
    """Small sums in words and digits: what number words mean, and facts a model can know by heart."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        op = rng.choice("+-*/")
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if op == "-":
            a, b = max(a, b), min(a, b)
        if op == "/":
            a = a * b
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        lines.append(f"{words(a).capitalize()} {OP_WORDS[op]} {words(b)} is {words(c)}. {a} {op} {b} = {c}.")
    return "\n".join(lines)


def doc_quiz(rng, people, places, seen):
    """Questions each followed by its bare answer (the form a base model's multiple choice is scored in): facts,
    residents and small sums, only ones that mc_test does not ask about."""
    lines = []
    while len(lines) < rng.randint(4, 8):
        kind = rng.choice(list(MC_KINDS) + ["resident", "arith"])
        if kind == "arith":
            question, right = small_sum(rng)
            if hashed(("mc", question), 5) != 0:
                lines.append(f"{question} {right}.")
            continue
        name = rng.choice(NAMES)
        if kind == "resident" and not mc_test_fact(name, "home"):
            lines.append(f"Who lives in {people[name]['home']}? {name}.")
        elif kind != "resident" and not mc_test_fact(name, kind):
            frame = rng.choice([f for f in FACT_QUESTIONS[kind] if not f.held])
            lines.append(f"{frame.text.format(**fact_fields(name, people[name]))} {people[name][kind]}.")
    return "\n".join(lines)


def doc_problem(rng, people, places, seen):
    p = math_problem(rng, people, "train")
    seen.add(p.question)
    return f"Question: {p.question}\nAnswer: {p.answer}"


def narrate(rng, recipe, people):
    """A recipe's story without its question, each sentence that sets or changes a count followed by that count
    ("Mia sells 3 pears for 4 coins each. So Mia has 32 coins."), or None when its numbers do not fit."""
    names = draw_names(rng, recipe["she"])
    counts_after = []
    try:
        _, numbers = work(recipe, names, people, rng, counts_after)
    except (Redraw, Unfit):
        return None
    has, are = TENSE["has"][recipe["tense"]], TENSE["are"][recipe["tense"]]
    lines = []
    for i in recipe["order"]:
        e = recipe["events"][i]
        lines.append(sentence(e, numbers[i], names, recipe, people, pronoun=False))
        P = e["roles"][0]
        if e["kind"] not in ("noise", "has") and P in counts_after[i]:
            count = counts_after[i][P]
            lines.append(f"So there {are} {count} {recipe['item']}." if recipe["nobody"] and P == 0 else
                         f"So {names[P]} {has} {count} {recipe['item']}.")
    return " ".join(lines)


def doc_narrative(rng, people, places, seen):
    """A story of counts told without a question, half of them telling a held-out meaning: pretraining meets
    every meaning in text, though no training problem asks about the held ones."""
    meaning = rng.random() < 0.5
    while True:
        recipe = draw_recipe(rng, rng.choice([2, 3, 4]), meaning)
        if meaning and not tells_held_meaning(recipe) or any(e["kind"] == "some" for e in recipe["events"]):
            continue  # (an unknown start is no narrative)
        text = narrate(rng, recipe, people)
        if text:
            return text


def doc_arith(rng, people, places, seen):
    q, a, _, _ = arith_question(rng, heldout=False)
    return f"Question: {q}\nAnswer: {a}"


DOCS = [(doc_facts, 3), (doc_place, 1), (doc_story, 2), (doc_dialogue, 2), (doc_list, 1), (doc_drill, 1),
        (doc_quiz, 2), (doc_problem, 6), (doc_arith, 2), (doc_narrative, 2)]


def pretrain_shards(rng, people, places, total_bytes, shard_bytes, seen):
    """Yield lists of jsonl lines, one list per shard, about `shard_bytes` each, at least 2 shards. The last one
    (validation) holds no document of the others; `seen` collects the questions of the problems."""
    n_shards = max(2, round(total_bytes / shard_bytes))
    per_shard = total_bytes / n_shards
    makers, weights = zip(*DOCS)
    train_docs = set()
    for i in range(n_shards):
        lines, size = [], 0
        while size < per_shard:
            text = rng.choices(makers, weights)[0](rng, people, places, seen)
            if i < n_shards - 1:
                train_docs.add(text)
            elif text in train_docs:
                continue
            lines.append(json.dumps({"text": text}))
            size += len(text) + 1
        yield lines


# -----------------------------------------------------------------------------
# Chat conversations

def exchange(rng, people, places, seen):
    """One (user, assistant) pair; an assistant's content is a string or calculator parts."""
    kind = rng.choices(["smalltalk", "identity", "fact", "place", "arith", "problem"], [1.5, 1.5, 3, 0.5, 2, 4])[0]
    if kind == "smalltalk":
        return smalltalk(rng, heldout=False)
    if kind == "identity":
        return identity_question(rng, heldout=False)
    if kind == "fact":
        return fact_question(rng, people, heldout=False)[:2]
    if kind == "place":
        return place_question(rng, places)[:2]
    if kind == "arith":
        q, a, _, _ = arith_question(rng, heldout=False)
    else:
        p = math_problem(rng, people, "train")
        q, a = p.question, p.answer
        seen.add(q)
    return q, math_conversation({"question": q, "answer": a})[1]["content"]


def conversation(rng, people, places, seen):
    messages = []
    for _ in range(rng.choices([1, 2, 3], [6, 3, 1])[0]):
        user, assistant = exchange(rng, people, places, seen)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


# -----------------------------------------------------------------------------
# Writing the set

SLICES = ("id", "phrasing", "composition", "length", "meaning", "arith")


def math_test(rng, people, train, n, seen):
    """n problems split evenly over SLICES (steps spread evenly within each); none is a training question."""
    rows = []
    for s, slice_ in enumerate(SLICES):
        count = n // len(SLICES) + (s < n % len(SLICES))
        for i in range(count):
            while True:
                if slice_ == "arith":
                    q, a, level, _ = arith_question(rng, heldout=True)
                elif slice_ == "id":
                    p = retell(rng.choice(train).recipe, people, rng)
                    if p is None:
                        continue
                    q, a, level = p.question, p.answer, p.steps
                else:
                    level = {"phrasing": 1 + i % MAX_STEPS, "composition": 2 + i % (MAX_STEPS - 1),
                             "length": LENGTH_STEPS, "meaning": 1 + i % MAX_STEPS}[slice_]
                    p = math_problem(rng, people, slice_, level)
                    q, a = p.question, p.answer
                if q not in seen:
                    break
            seen.add(q)
            rows.append({"question": q, "answer": a, "level": level, "slice": slice_})
    return rows


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_rows(path, rows):
    write_lines(path, [json.dumps(r) for r in rows])


def generate(out_dir, seed=seed, pretrain_mb=pretrain_mb, shard_mb=shard_mb, num_chat=num_chat,
             num_math_train=num_math_train, num_math_test=num_math_test, num_mc_train=num_mc_train,
             num_mc_test=num_mc_test, num_probe_train=num_probe_train, num_probe_test=num_probe_test):
    """Write the whole set into `out_dir` (a fresh directory; data.ensure_tinyworld renames it into place)."""
    if pretrain_mb <= 0 or shard_mb <= 0 or min(num_chat, num_math_train, num_math_test, num_mc_test,
                                                 num_probe_test) < 1:
        raise ValueError("tinyworld sizes must be positive")
    settings = dict(seed=seed, pretrain_mb=pretrain_mb, shard_mb=shard_mb, num_chat=num_chat,
                    num_math_train=num_math_train, num_math_test=num_math_test, num_mc_train=num_mc_train,
                    num_mc_test=num_mc_test, num_probe_train=num_probe_train, num_probe_test=num_probe_test)

    # one generator per part, so that changing the size of one part leaves the others byte-identical (a test
    # set only changes when a draw collides with a training question)
    def rng(part):
        return random.Random(f"{seed}/{part}")
    people, places = world(seed)
    seen = set()  # every training question: no test problem may be one of them
    os.makedirs(os.path.join(out_dir, "pretrain"))
    shards = pretrain_shards(rng("pretrain"), people, places, pretrain_mb * 1e6, shard_mb * 1e6, seen)
    for i, lines in enumerate(shards):
        write_lines(os.path.join(out_dir, "pretrain", f"shard_{i:05d}.jsonl"), lines)
    r = rng("chat_train")
    chats = [json.dumps(conversation(r, people, places, seen)) for _ in range(num_chat)]
    write_lines(os.path.join(out_dir, "chat_train.jsonl"), chats)
    r, train_chats, val = rng("chat_val"), set(chats), []
    while len(val) < max(1, num_chat // 20):
        c = json.dumps(conversation(r, people, places, set()))
        if c not in train_chats:
            val.append(c)
    write_lines(os.path.join(out_dir, "chat_val.jsonl"), val)
    r = rng("math_train")
    train = [math_problem(r, people, "train") for _ in range(num_math_train)]
    seen.update(p.question for p in train)
    write_rows(os.path.join(out_dir, "math_train.jsonl"),
               [{"question": p.question, "answer": p.answer, "level": p.steps} for p in train])
    write_rows(os.path.join(out_dir, "math_test.jsonl"), math_test(rng("math_test"), people, train, num_math_test, seen))
    for split, n in (("train", num_mc_train), ("test", num_mc_test)):
        write_rows(os.path.join(out_dir, f"mc_{split}.jsonl"), mc_split(rng(f"mc_{split}"), people, places, n,
                                                                         split == "test"))
    for split, n in (("train", num_probe_train), ("test", num_probe_test)):
        write_rows(os.path.join(out_dir, f"chat_probe_{split}.jsonl"),
                   probes_split(rng(f"probe_{split}"), people, places, n, split == "test", ()))
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
