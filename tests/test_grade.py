"""Tests of the math verifier, data/grade.py: python -m pytest tests/test_grade.py -x -q"""

import json
import re
import threading
import time

import pytest

from conftest import shared_data
from data.grade import extract_answer, grade, majority_vote, pass_at_k, score

# (prediction, reference, expected)
TABLE = [
    # fractions
    (r"\frac12", "1/2", True), (r"\frac12", r"\frac{1}{2}", True), (r"\frac12", "12", False),
    (r"\dfrac{3}{4}", r"\frac34", True), (r"\tfrac{3}{4}", "0.75", True), (r"\frac 59", r"\frac{5}{9}", True),
    (r"\frac{270}7", r"\frac{270}{7}", True), (r"\frac{2}{3}", r"\frac{3}{2}", False),
    (r"\sqrt{\frac{1}{2}}", r"\frac{\sqrt{2}}{2}", True), (r"\sqrt{\frac{1}{2}}", r"\frac{1}{2}", False),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True), (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}", False),
    (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", True),
    # mixed numbers
    (r"3\frac{1}{2}", r"\frac{7}{2}", True), (r"3\frac{1}{2}", "3.5", True), (r"3\frac{1}{2}", r"\frac{3}{2}", False),
    (r"137 \frac{1}{2}", "137.5", True), (r"-1\frac12", "-1.5", True),
    # decimals: exact
    ("0.5", r"\frac{1}{2}", True), ("0.33", r"\frac{1}{3}", False), (".35625", r"\frac{57}{160}", True),
    ("0.333", r"\frac13", False), ("1.25", "1.250", True), ("3.21", "3.2", False),
    # thousands separators vs tuples
    ("1{,}000", "1000", True), ("1,000", "1000", True), (r"10,\!080", "10080", True),
    (r"11,\! 111,\! 111,\! 100", "11111111100", True), ("(1,2)", "12", False), ("1,000", "1", False),
    # money, percent, units, degrees
    (r"\$18.90", "18.9", True), (r"\$18.90", "18.09", False), (r"\$32,\!348", "32348", True),
    (r"50\%", "50", True), ("0.5", r"50\%", False), ("50%", "50", True),
    (r"10\text{ cm}", "10", True), (r"10\text{ cm}", "11", False), (r"864 \mbox{ inches}^2", "864", True),
    ("5.4 cents", r"5.4 \text{ cents}", True), (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True),
    (r"30^\circ", "30", True), (r"30^{\circ}", "30", True), (r"30^\circ", "60", False), ("30°", "30", True),
    # constants and functions
    (r"\pi", r"\pi", True), (r"2\pi", r"\pi", False), (r"\frac{\pi}{2}", r"\frac12\pi", True),
    (r"\sqrt2", r"\sqrt{2}", True), (r"\sqrt2", "1.414", False), (r"11\sqrt2", r"11 \sqrt{2}", True),
    (r"\sqrt[3]{8}", "2", True), (r"\cot x", r"\frac{\cos x}{\sin x}", True), (r"\sin x", r"\cos x", False),
    (r"\log 8", r"3\log 2", True), (r"6 \cdot 7", "42", True), (r"6 \times 7", "41", False),
    ("5!", "120", True), (r"\binom{5}{2}", "10", True), (r"\binom{5}{2}", "20", False),
    # scientific notation and the unicode minus
    (r"1.5\times10^{3}", "1500", True), ("1.5e3", "1500", True), ("1.5e3", "150", False),
    ("\u22125", "-5", True), ("\u22125", "5", False),
    # intervals and unions
    ("[2,5)", "[2,5)", True), ("[2,5)", "(2,5]", False), (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"(-\infty, 3]", r"(-\infty, 3)", False), (r"\left(\frac{3}{5},\frac{8}{3}\right]", "(0.6, 8/3]", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty, 1) \cup (2, \infty)", True),
    (r"(2,\infty)\cup(-\infty,1)", r"(-\infty,1)\cup(2,\infty)", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty,1]\cup(2,\infty)", False), (r"x \in [-2,7]", "[-2,7]", True),
    # tuples, sets and solution lists
    ("(1,2)", "(1,2)", True), ("(1,2)", "(2,1)", False), (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2\}", r"\{1,3\}", False),
    ("1, 2", "2, 1", True), ("1, 2", "1, 2, 3", False), ("3, 5, 7", "7,5,3", True), ("(1,2)", "1, 2", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True), ("(6,31,-1)", "(6,31,1)", False),
    # plus-minus: a \pm b is the set {a+b, a-b}
    (r"\pm 2", "2, -2", True), (r"\pm 2", "2", False), (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", True),
    (r"\{1\pm\sqrt{5},-2\}", r"-2, 1-\sqrt5, 1+\sqrt5", True), (r"3 \pm 2 \sqrt{2}", r"3 + 2\sqrt2", False),
    # equations and expressions
    ("x = 1, 2", "2, 1", True), ("x=1, x=2", "1, 2", True), ("x = 1, 2", "1", False),
    (r"\infty", r"\infty", True), (r"\infty", r"-\infty", False),
    ("x=5", "5", True), ("5", "x = 5", True), ("x=5", "6", False), ("y=2x+3", "2x+3", True),
    ("y=2x+3", "y=3+2x", True), ("y=2x+3", "y=3x+2", False), ("5x - 7y + 11z + 4 = 0", "10x-14y+22z+8=0", True),
    ("2x", "x+x", True), ("2x", "x^2", False), ("x^2+2x+1", "(x+1)^2", True), ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("2k+2", "2(k+1)", True), ("3R^2", "3R^{2}", True), ("6 - 5i", "6-5i", True), ("6 - 5i", "6+5i", False),
    ("p - q", "-q+p", True), ("x^5 - x^4 + x^3 - x^2 + x - 1", "x^5 - x^4 + x^3 - x^2 + x + 1", False),
    # matrices
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{bmatrix}1 \\ 2\end{bmatrix}", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}", r"\begin{pmatrix} -\frac13 \\ \frac23 \end{pmatrix}", True),
    (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix} 1 & 0 & 0 & 1 \end{pmatrix}", False),
    # text, choices, bases
    (r"\text{Evelyn}", "Evelyn", True), (r"\text{Evelyn}", "evelyn", True), (r"\text{Evelyn}", "Navin", False),
    (r"\textbf{(C)}", "C", True), ("(C)", "C", True), ("(c)", "C", True), ("c", "C", False),
    (r"\text{(C)}", "(B)", False),
    (r"\text{east}", "East", True), ("sin x", r"\sin x", True), (r"2\lambda", r"\lambda+\lambda", True),
    ("52_8", "52_{8}", True), ("52_8", "52", False), ("52_8", "52_9", False), ("4210_{5}", "4210_5", True),
    # spacing and sizing commands
    (r"\left(1,2\right)", "(1,2)", True), (r"1\!000", "1000", True), (r"2\,\pi", r"2\pi", True),
    (r"\displaystyle \frac{1}{4}", "0.25", True),
]


@pytest.mark.parametrize("prediction,reference,expected", TABLE)
def test_table(prediction, reference, expected):
    assert grade(prediction, reference) is expected
    assert grade(reference, prediction) is expected  # the verifier is symmetric on bare answers


def test_table_size():
    assert len(TABLE) >= 80 and sum(e for _, _, e in TABLE) >= 40 and sum(not e for _, _, e in TABLE) >= 40


# -----------------------------------------------------------------------------
# extraction


def test_extract_answer():
    assert extract_answer(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\sqrt{\frac{1}{\{2\}}}}") == r"\sqrt{\frac{1}{\{2\}}}"  # nested braces
    assert extract_answer(r"first \boxed{1} then \boxed{2}") == "2"  # the last box wins
    assert extract_answer(r"\boxed{\boxed{7}} and no more") == r"\boxed{7}"  # nested boxes: the outer one
    assert extract_answer(r"thus \boxed 5 apples") == "5" and extract_answer(r"\fbox{x+1}") == "x+1"
    assert extract_answer("work\n#### 1,234\n") == "1,234"
    assert extract_answer(r"\boxed{3} and later \boxed{4") == "3"  # an unclosed box is no answer
    assert extract_answer("I think it is 12, no, 13.5 apples") == "13.5"
    assert extract_answer("I think it is 13", allow_fallback=False) is None
    assert extract_answer("no numbers here") is None and extract_answer(None) is None


def test_grade_full_solutions():
    assert grade(r"The area is $\boxed{\dfrac{3}{2}}$ square units.", "1.5")
    assert grade("She earns 9 * 2 = $18.\n#### 18", "Janet ... = <<9*2=18>>18 dollars\n#### 18")
    assert not grade("#### 17", "#### 18")
    assert grade("The answer is 42 dollars.", "42")  # prose falls back to its last number
    assert not grade("The answer is 42 dollars.", "42", allow_fallback=False)
    assert not grade(r"\frac12", "12")  # a bare answer is never cut down to its last number
    assert grade(r"I get \boxed{7} but \boxed{8}", "8") and not grade(r"\boxed{7} then \boxed{8}", "7")


# -----------------------------------------------------------------------------
# robustness: garbage, empty and enormous input is False, fast, and never raises

GARBAGE = ["", " ", "}}}{{{", r"\boxed{", r"\frac{1}{", r"\sqrt", "(((((", "$$", "\\", "^^^", "\x00\x01",
           "9" * 100000, r"10^{10^{10^{10}}}", r"\boxed{10^{10^{10}}}", "2^{2^{2^{2^{2^{2}}}}}", r"(10^{10})!",
           "10000000!", r"\binom{10^{7}}{5000000}", r"e^{10^{10}}",
           "1e999999999", "1.5e99999", "x.subs", "(" * 300 + "1" + ")" * 300, r"\sqrt[\foo]{2}",
           "x" * 5000, r"\frac{1}{0}", "1/0", "__import__('os')", "().__class__", r"\begin{pmatrix}1\\",
           "(" * 3000 + ")" * 3000, r"\boxed{" * 3000, "{" * 50000, "1," * 10000]


@pytest.mark.parametrize("junk", GARBAGE)
def test_garbage_is_false_and_fast(junk):
    for prediction, reference in ((junk, "5"), ("5", junk), (junk, junk), (junk, r"10^{10^{10}} + 1")):
        t0 = time.time()
        assert grade(prediction, reference) is False
        assert time.time() - t0 < 1.0
    assert grade(None, "5") is False and grade("5", 5) is False


def test_huge_exponent_off_the_main_thread():
    # no SIGALRM in a thread: the structural guard alone must stop sympy from computing 10^(10^10)
    results = []
    thread = threading.Thread(target=lambda: results.append(grade(r"10^{10^{10}}", r"10^{10^{10}} + 1")))
    t0 = time.time()
    thread.start()
    thread.join(5.0)
    assert results == [False] and time.time() - t0 < 1.0


def test_time_limit_and_threads():
    from data.grade import _time_limit, _Timeout
    t0 = time.time()
    with pytest.raises(_Timeout):
        with _time_limit(0.05):
            while True:
                pass
    assert time.time() - t0 < 1.0
    results = []  # off the main thread there is no timer, and ordinary grading still works
    thread = threading.Thread(target=lambda: results.extend([grade(r"\sqrt{\frac12}", r"\frac{\sqrt2}{2}"),
                                                             grade("x^2", "2x")]))
    thread.start()
    thread.join(30.0)
    assert results == [True, False]


def test_big_but_reasonable_numbers():
    assert grade("2^{100}", "1267650600228229401496703205376")
    assert not grade("2^{100}", "1267650600228229401496703205377")


# -----------------------------------------------------------------------------
# pass@k and majority vote


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 8, 3) == 1.0  # only 2 wrong samples: every 3 contain a right one
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_majority_vote():
    assert majority_vote(["0.5", "3", r"\frac12", "3", "1/2"]) == "0.5"  # equivalent answers vote together
    assert majority_vote(["3", "4", "4", "3"]) == "3"  # a tie goes to the group seen first
    assert majority_vote([None, None, "", "7", None]) == "7"  # None never wins over a real answer
    assert majority_vote([None, "", "}{"]) is None and majority_vote([]) is None
    assert majority_vote([r"\boxed{2}", "x = 2", "(2,3)"]) == r"\boxed{2}"


# -----------------------------------------------------------------------------
# self-consistency on real gold answers (../shared/data, skipped when absent)


def _strict(answer):
    """A strict normal form of an answer string, to tell apart pairs that are genuinely different."""
    answer = re.sub(r"^[a-z]\s*=", "", answer).replace(r"\dfrac", r"\frac")
    return re.sub(r"\\left|\\right|\\[!,;: ]|\s|\\(?:text|mbox)\{[^}]*\}(?:\^2)?|\^\{?\\circ\}?|\\\$", "", answer)


def test_math500_gold_self_consistency():
    with open(shared_data("math500_test.json")) as f:
        golds = [row["answer"] for row in json.load(f)]
    assert all(grade(r"so $\boxed{%s}$" % g, g) for g in golds)
    # each gold against the next different one: none may grade equal (no false positives)
    # each gold against the next five: no two genuinely different answers may grade equal (no false positives)
    pairs = [(g, golds[(i + k) % len(golds)]) for i, g in enumerate(golds) for k in range(1, 6)]
    pairs = [(g, h) for g, h in pairs if _strict(g) != _strict(h)]
    assert len(pairs) > 2000
    equal = [(g, h) for g, h in pairs if grade(r"\boxed{%s}" % g, h)]
    assert not equal, equal


def test_gsm8k_gold_self_consistency():
    with open(shared_data("gsm8k_test.jsonl")) as f:
        solutions = [json.loads(line)["answer"] for line in f]
    golds = [s.split("####")[-1].strip() for s in solutions]
    assert all(grade("#### " + g, s) for g, s in zip(golds, solutions))
    assert all(grade(r"The answer is $\boxed{%s}$." % g, s) for g, s in zip(golds, solutions))
    different = [(g, h) for g, h in zip(golds, golds[1:] + golds[:1]) if g.replace(",", "") != h.replace(",", "")]
    assert not [p for p in different if grade("#### " + p[0], "#### " + p[1])]


# -----------------------------------------------------------------------------
# Sampled answers: the reward of one


def test_score_and_format_bonus():
    grader = lambda text, ref: text.strip().endswith(ref.split("####")[-1].strip())
    assert score("2 + 3 = 5\n#### 5", "#### 5", True, grader, 0.1) == (1.1, True)
    assert score("2 + 3 = 5\n#### 5", "#### 5", False, grader, 0.1) == (1.0, True)  # cut off: no bonus
    assert score("2 + 3 = 6\n#### 6", "#### 5", True, grader, 0.1) == (0.1, False)  # wrong but well formed
    assert score("it is 6", "#### 5", True, grader, 0.1) == (0.0, False)
