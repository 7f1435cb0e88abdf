"""Tests of the held-back probe set (tests/heldback.py): deterministic, arithmetic right, graders that accept right
replies and reject wrong ones, and probes that the tinyworld generator does not produce."""
import json
import os
import re

from data.tinyworld import IDENTITY, ITEMS, FOODS, JOBS, NAMES, OBJECTS, PETS, PLACES, words
from tests import heldback
from tests.conftest import run_script

# words that stand for a number the question does not write out
IMPLICIT = {2: ("half", "twice", "double", "two of them"), 3: ("triple",)}
UNUSED = {"distractor": {1}, "other_person": {0, 1}}  # how many numbers of a question its answer does not use


def all_probes():
    return heldback.word_problems() + heldback.arithmetic_probes() + heldback.chat_probes()


def test_sets_are_deterministic_under_their_seed():
    assert heldback.word_problems() == heldback.word_problems(300, 0)
    assert heldback.arithmetic_probes() == heldback.arithmetic_probes(seed=0)
    assert heldback.chat_probes() == heldback.chat_probes(0)
    assert heldback.word_problems(seed=1) != heldback.word_problems(seed=0)
    assert heldback.arithmetic_probes(seed=1) != heldback.arithmetic_probes(seed=0)
    assert heldback.chat_probes(1) != heldback.chat_probes(0)


def test_sizes_and_categories():
    problems = heldback.word_problems()
    categories = [f.__name__ for f in heldback.WORD_PROBLEM_CATEGORIES]
    assert len(problems) == 300 and [p.category for p in problems[:12]] == categories
    assert all(sum(p.category == c for p in problems) == 25 for c in categories)
    assert len(set(p.question for p in problems)) == 300
    assert len(heldback.arithmetic_probes()) >= 60
    chats = heldback.chat_probes()
    assert len(chats) >= 40 and {p.category for p in chats} == {"identity", "smalltalk", "world"}


def appears(n, question):
    """n is written in the question: as digits, in words, or as a word that means it."""
    q = question.lower()
    return (re.search(rf"(?<!\d){n}(?!\d)", q) is not None
            or re.search(rf"(?<![\w-]){re.escape(words(n))}(?![\w-])", q) is not None
            or any(w in q for w in IMPLICIT.get(n, ())))


def test_every_answer_follows_from_the_numbers_in_its_question():
    for p in heldback.word_problems() + heldback.arithmetic_probes():
        assert re.fullmatch(r"[\d+\-*/() ]+", p.expr), p
        value = eval(p.expr, {"__builtins__": {}})  # only digits and operators, checked above
        assert value == p.answer and isinstance(p.answer, int) and 0 <= p.answer <= 4000, p
        used = {int(n) for n in re.findall(r"\d+", p.expr)}
        assert all(appears(n, p.question) for n in used), p
        written = {int(n) for n in re.findall(r"\d+", p.question)}
        # every number written in digits is used, except a distractor's one, and the first person's count when
        # the question is about the second
        assert len(written - used) in UNUSED.get(p.category, {0}), p


def test_math_grader_takes_the_final_number():
    p = heldback.MathProbe("What is 23 times 4?", 92, "multiply", "23*4")
    for right in ["#### 92", "<<23*4=92>>", "23 * 4 = 92", "Let me compute. <<23*4=92>> #### 92",
                  "The answer is 92.", "92"]:
        assert heldback.grade_math(p, right), right
    for wrong in ["#### 93", "<<23+4=27>>", "23 * 4 = 28", "92 ... #### 93", "The answer is 92, no, 94.", "",
                  "I do not know.", "#### 92/1 apples are 9.2"]:
        assert not heldback.grade_math(p, wrong), wrong
    big = heldback.MathProbe("Compute 64 * 90 + 43.", 5803, "mixed", "64*90+43")
    assert heldback.grade_math(big, "#### 5,803") and not heldback.grade_math(big, "#### 5,804")
    for p in heldback.word_problems()[:24] + heldback.arithmetic_probes()[:24]:
        assert heldback.grade_math(p, f"<<{p.expr}={p.answer}>>\n#### {p.answer}")
        assert not heldback.grade_math(p, f"<<{p.expr}={p.answer}>>\n#### {p.answer + 1}")


def test_chat_grader_identity_and_small_talk():
    identity = heldback.ChatProbe("Please introduce yourself.", "identity", "", (), ())
    small = heldback.ChatProbe("good afternoon", "smalltalk", "", (), ())
    assert heldback.grade_chat(identity, IDENTITY)
    assert heldback.grade_chat(identity, "I'm a small assistant.")
    for wrong in ["", "   ", "Hello there!", "I am picochat. #### 5", "<<2+2=4>> I am picochat.",
                  "Let me work it out with the calculator. <<4*92=368>> #### 368", "I am picochat, 3 years old.",
                  "I am picochat and I live in Oakvale."]:
        assert not heldback.grade_chat(identity, wrong), wrong
    assert heldback.grade_chat(small, "Good afternoon! How can I help you today?")
    for wrong in ["", "#### 12", "Let me work it out with the calculator. <<61*4=244>>", "Mia has 3 apples.",
                  "Mia is a fisher. Mia's best friend is Kira."]:
        assert not heldback.grade_chat(small, wrong), wrong


def test_chat_grader_world_questions():
    home = heldback.ChatProbe("In which town is Mia's home?", "world", "Mia", ("Willowby",),
                              tuple(p for p in PLACES if p != "Willowby"))
    assert heldback.grade_chat(home, "Mia lives in Willowby.")
    assert heldback.grade_chat(home, "willowby")
    for wrong in ["Mia lives in Oakvale.", "Willowby or Oakvale.", "Mia.", "#### Willowby",
                  "<<1+1=2>> Willowby", "Mia lives in Willowbyshire Oakvale"]:
        assert not heldback.grade_chat(home, wrong), wrong
    # the subject's own name is not a wrong friend; another name is
    friend = heldback.ChatProbe("Who is Kira's closest friend?", "world", "Kira", ("Mia",),
                                tuple(n for n in NAMES if n not in ("Mia", "Kira")))
    assert heldback.grade_chat(friend, "Kira's best friend is Mia.")
    assert not heldback.grade_chat(friend, "Kira's best friend is Tom.")
    # "farm town" is another kind than "town"; "harbor town" is not also "town"
    kinds = ["village", "town", "city", "harbor town", "farm town"]
    town = heldback.ChatProbe("What sort of place is X?", "world", "X", ("town",),
                              tuple(k for k in kinds if k != "town"))
    harbor = heldback.ChatProbe("What sort of place is X?", "world", "X", ("harbor town",),
                                tuple(k for k in kinds if k != "harbor town"))
    assert heldback.grade_chat(town, "It is a town.") and not heldback.grade_chat(town, "It is a farm town.")
    assert heldback.grade_chat(harbor, "A harbor town.") and not heldback.grade_chat(harbor, "A town.")
    # a place named "Pine Hill" does not answer "hill"
    features = sorted(set(heldback.FEATURE_WORDS.values()))
    hill = heldback.ChatProbe("Where is Pine Hill situated?", "world", "Pine Hill", ("hill",),
                              tuple(f for f in features if f != "hill"))
    assert heldback.grade_chat(hill, "Pine Hill is on a windy hill.")
    assert not heldback.grade_chat(hill, "Pine Hill is by the sea.")
    # singular, plural and -man forms of a fact
    food = heldback.ChatProbe("What does Tara love to eat?", "world", "Tara", ("peaches",),
                              tuple(f for f in FOODS if f != "peaches"))
    assert heldback.grade_chat(food, "Tara loves a ripe peach.") and not heldback.grade_chat(food, "Plums.")
    job = heldback.ChatProbe("What does Eli do for a living?", "world", "Eli", ("fisher",),
                             tuple(j for j in JOBS if j != "fisher"))
    assert heldback.grade_chat(job, "Eli is a fisherman.") and not heldback.grade_chat(job, "Eli bakes: a baker.")
    pet = heldback.ChatProbe("Which animal?", "world", "Lena", ("cat",), tuple(p for p in PETS if p != "cat"))
    assert not heldback.grade_chat(pet, "Lena will catch a dog.") and heldback.grade_chat(pet, "Two cats.")


def test_world_probes_ask_the_facts_of_the_world():
    people, places = heldback.world_facts()
    probes = [p for p in heldback.chat_probes() if p.category == "world"]
    assert len(probes) >= 20
    for p in probes:
        assert p.subject in p.question and p.right and not set(p.right) & set(p.wrong)
        if p.subject in people and p.wrong:  # a person's fact: exactly one right value, in the person's facts
            assert len(p.right) == 1 and p.right[0] in people[p.subject].values()
        if p.subject in places and p.right[0] in NAMES:
            assert set(p.right) == set(places[p.subject]["people"])
    # a right reply built from the facts passes, and so does nothing else of the same kind
    for p in probes:
        assert heldback.grade_chat(p, f"{p.subject}: {p.right[0]}."), p
        if p.wrong:
            assert not heldback.grade_chat(p, f"{p.subject}: {p.wrong[0]}."), p


# ---- the probes are not in the generated data

NUMBER_WORDS = set(" ".join(words(n) for n in range(100)).replace("-", " ").split()) | {"hundred"}
# each particular and its mark; one alternation, longest first, so that "Pine Hill" is masked whole
MARKS = {**{v.lower(): "X" for v in ITEMS + FOODS + OBJECTS + PETS + JOBS}, **{n.lower(): "N" for n in NAMES},
         **{p.lower(): "P" for p in PLACES}}
PARTICULAR = re.compile(r"\b(" + "|".join(re.escape(v) for v in sorted(MARKS, key=len, reverse=True)) + r")\b")


def shape(text):
    """The sentence without its particulars: numbers -> #, people -> N, places -> P, things -> X, lower case."""
    text = PARTICULAR.sub(lambda m: MARKS[m.group(1)], text.lower())
    tokens = []
    for token in re.findall(r"[a-z0-9]+|[NPX]", text.replace("-", " ")):
        token = "#" if token.isdigit() or token in NUMBER_WORDS else token
        if not (token == "#" and tokens and tokens[-1] == "#"):
            tokens.append(token)
    return " ".join(tokens)


def normalised(text):
    return " ".join(text.lower().split())


def test_probes_are_not_in_a_generated_tinyworld(tmp_base_dir):
    """No probe is a question of a generated set (verbatim, or with its names, things and numbers masked), and no
    probe of four words or more is anywhere in its files. This test reads the generated data; the probes were
    written without it."""
    run_script(["python", "data/tinyworld.py", "--pretrain_mb=0.3"], tmp_base_dir, timeout=600)
    root = os.path.join(tmp_base_dir, "data", "tinyworld")
    questions, texts = [], []
    for directory, _, files in os.walk(root):
        for name in sorted(files):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                text = f.read()
            texts.append(normalised(text))
            for line in text.splitlines() if name.endswith(".jsonl") else []:
                row = json.loads(line)
                turns = [m["content"] for m in row.get("messages", []) if m["role"] == "user"]
                questions += [row["question"]] if "question" in row else [t for t in turns if isinstance(t, str)]
    num_questions = len(questions)  # a plain number, so a failure prints no generated text
    assert num_questions > 1000
    asked = {normalised(q) for q in questions}
    shapes = {shape(q) for q in questions}
    # the failures name only the probes, never the generated text: the probes' author must not read it
    probes = [p.question for p in all_probes()]
    verbatim = [q for q in probes if normalised(q) in asked]
    same_phrasing = [q for q in probes if shape(q) in shapes]
    in_files = [q for q in probes if len(q.split()) >= 4 and any(normalised(q) in t for t in texts)]
    assert not verbatim, "probes asked verbatim in the generated set"
    assert not same_phrasing, "probes whose phrasing is in the generated set"
    assert not in_files, "probes found in the generated files"
