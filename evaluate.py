"""
Evaluate picochat models, assemble the report card, and verify math answers (the verifier is rl.py's reward).

    python evaluate.py                                   # the sft model: bits per byte, multiple choice, math
    python evaluate.py --source=all                      # base, sft and rl: each stage that has a checkpoint
    python evaluate.py --source=base --task=bpb,mc       # tasks: bpb, mc, math (comma-separated)
    python evaluate.py --task=mc --dataset=arc_easy      # a downloaded set (python data/arc.py first)
    python evaluate.py --task=math --dataset=gsm8k --max_problems=200
    python evaluate.py --task=math --num_samples=8       # pass@1 and pass@8, sampled (temperature 1 unless given)
    python evaluate.py --task=math --num_samples=8 --vote=1   # and maj@8: the samples' majority answer, graded
    python evaluate.py --report=1                        # $PICOCHAT_DIR/report/report.md from the stages' sections

The tasks:
- bpb: bits per byte on held-out pretraining text (the last shard, as pretrain.py measures it), next to the
  unigram baseline: the bits per byte of a model that knows only how often each token occurs in that text.
- mc: multiple-choice accuracy and the centred score (acc - chance) / (1 - chance), on the built-in items plus
  every downloaded set (arc_easy, arc_challenge, mmlu, hellaswag), or on the sets --dataset names. A base model
  picks the choice it finds likeliest as a continuation of the question (lowest mean loss per token, as
  nanochat's CORE); a chat model picks a letter: of the letters of the item's choices, the one it finds likeliest
  as the first token of its reply.
- math: word problems (built in; gsm8k and math500 with --dataset), answers generated with the KV-cache engine
  (calculator included) and graded by grade(). Greedy by default; with --num_samples=K, pass@1 and pass@K (at
  temperature 1.0 when --temperature is left at 0, which cannot give K different samples); with --vote=1 also
  maj@K (self-consistency). A chat model gets the question as a user turn; a base model a few-shot prompt of
  solved problems in the pretraining documents' "Question: ...\nAnswer: ..." format.
Each run prints a markdown table and writes report/eval_<source>.json: the checkpoint (stage, tag, step), the
settings and every metric; results of earlier runs on the same checkpoint are kept unless measured again. It runs
as one process (not under torchrun).

The report card (--report=1) reads report/*.json (tokenizer, tokenizer_eval, base, sft, rl, eval_*) and the
<stage>.seconds files of speedrun.sh; whatever is missing is left out. Its last line of output is one JSON object:
{"total_min", "tokenizer_min", "pretrain_min", "sft_min", "rl_min", "eval_min", "bpb", "pass1_sft", "pass1_rl"}.

The verifier on its own:

    python -c "from evaluate import grade; print(grade(r'so the answer is $\\boxed{\\frac12}$', '0.5'))"  # True

grade(prediction, reference) extracts the final answer of both sides (last \\boxed{...}, else "#### N", else the
text itself; for a prediction written as prose, the last number), normalises the LaTeX and compares:
plain numbers exactly with fractions.Fraction, everything else structurally (tuples, intervals, sets, unions,
matrices, equations, text) and expression by expression with sympy. Decisions worth knowing:
- percent: "50\\%" is 50 (MATH's convention), so 0.5 is not 50\\%; units, "\\$" and degrees are dropped likewise.
- "\\pm": "a \\pm b" is the set {a+b, a-b}, so "\\pm 2" equals "2, -2" (a comma list is an unordered set of
  solutions), while "(1,2)" is ordered and "[2,5)" differs from "(2,5]".
- exactness: decimals are rationals, 0.5 = 1/2 but 0.33 != 1/3, with no numeric tolerance; only constants sympy
  cannot simplify (nested radicals) are settled by agreeing to 50 digits.
- text answers ("\\text{Evelyn}") compare case-insensitively; base subscripts (52_8) as strings; choice letters
  "(C)", "\\textbf{(C)}" and "C" are one; "x = 5" equals "5" and "y = 2x+3" equals "2x+3".
- time: sympy can hang (10^{10^{10}} is evaluated eagerly), so every expression is first parsed unevaluated and
  rejected when its value would be too large; then each sympy comparison runs under a SIGALRM timer when grade is
  called from the main thread (signal timers exist only there), and under the structural guard alone elsewhere.
  Garbage, empty or enormous input returns False quickly and never raises.
"""

import glob
import json
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = "sft"              # base|sft|rl, or all: each of them that has a checkpoint
task = "bpb,mc,math"        # comma-separated: bpb, mc, math
dataset = ""                # comma-separated sets (each to the task it belongs to); "": the tasks' defaults
model_tag = ""              # "": the stage's most recently saved model
step = -1                   # -1: its latest step
max_problems = 0            # mc items / math problems per set, the first ones (0: all)
eval_tokens = 65536         # bpb: tokens of held-out text (pretrain.py's default, so the numbers compare; 0: all)
num_samples = 1             # math: answers per problem
vote = False                # math: also grade the majority answer of the num_samples answers (maj@k)
temperature = 0.0           # math: 0 is greedy
top_k = 0                   # math: sample from the k likeliest tokens (0: all)
max_new_tokens = 256        # math: longest answer
batch_size = 16             # problems per generation batch; rows per forward for bpb and mc
dtype = "float32"           # float32|bfloat16
device = ""                 # cuda|mps|cpu; "": the best available
report = False              # assemble the report card instead of evaluating
seed = 0

# -----------------------------------------------------------------------------
# answer extraction and grading

MAX_ANSWER_LEN = 400  # longer "answers" are garbage for our tasks, and sympy time grows with length
MAX_DIGITS = 2000  # largest number (in decimal digits) an expression may evaluate to before sympy sees it
SYMPY_TIMEOUT = 5.0  # wall seconds per sympy step (main thread only): a hang guard, generous for busy machines

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _brace_matches(text):
    """Map each '{' to its matching '}' in one pass, so unbalanced or adversarial input stays linear."""
    match, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


def _last_box(text):
    """Content of the last top-level \\boxed{...} / \\fbox{...} / \\boxed X, or None."""
    match, found, covered = None, None, -1
    for m in _BOX.finditer(text):
        if m.start() < covered:
            continue  # a box inside the previous box: the outer one is the answer
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            match = match if match is not None else _brace_matches(text)
            if i not in match:
                continue  # unbalanced: no answer here
            found, covered = text[i + 1:match[i]], match[i]
        else:  # "\boxed 5": the answer runs to the next space or math delimiter
            m2 = re.match(r"[^\s$]+", text[i:])
            if m2:
                found, covered = m2.group(0), i + m2.end()
    return found


def extract_answer(text, allow_fallback=True):
    """The final answer in a solution: the last \\boxed{}, else the last "#### N", else (when allowed) the last
    number in the text. Returns a string, or None when there is no answer."""
    if not isinstance(text, str):
        return None
    boxed = _last_box(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    if allow_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


# ---- LaTeX normalisation: a string -> a cleaner LaTeX string

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u00f7": "/",
            "\u00b0": r"^\circ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt", "\u00b1": r"\pm ",
            "\u222a": r"\cup ", "\u2264": r"\le ", "\u2265": r"\ge ", "\u00a0": " ", "\u2009": " ", "\n": " "}
_UNITS = set("""cm m km mm in inch inches ft foot feet yd yard yards mi mile miles meter meters metre metres
centimeter centimeters kilometer kilometers unit units sq square cubic degree degrees cent cents dollar dollars
hour hours hr hrs minute minutes min mins second seconds sec s day days week weeks month months year years g
gram grams kg kilogram kilograms lb lbs pound pounds oz ounce ounces l liter liters litre litres ml mph
gallon gallons cup cups people students""".split())
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|texttt|mbox|mathrm|mathbf|mathit|mathsf)\s*"
                       r"\{([^{}]*)\}(\s*\^\s*\{?[23]\}?)?")
_ROW = "\x01"  # stands in for the matrix row separator "\\" while other backslash commands are cleaned


def _unwrap_text(m):
    words = m.group(1).strip()
    if words and all(w.lower() in _UNITS for w in words.replace(".", " ").split()):
        return " "  # a unit: "10\text{ cm}^2" is 10
    return " " + words + " " + (m.group(2) or "")


def _normalize(s):
    """Clean LaTeX so that equal answers written differently become comparable."""
    for a, b in _UNICODE.items():
        s = s.replace(a, b)
    s = s.replace("\\\\", _ROW)
    s = re.sub(r"(\d),\\!\s*(?=\d{3})", r"\1", s)  # thousands: 10,\!080
    s = s.replace("{,}", "")  # thousands: 1{,}000
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:displaystyle|quad|qquad)(?![a-zA-Z])|\\[!,;: ]|~", " ", s)
    s = s.replace("\\$", "").replace("$", "")  # money, then math delimiters
    s = re.sub(r"\\[()\[\]]", "", s)  # \( \) \[ \] math delimiters
    s = re.sub(r"\\?%", "", s)  # percent: 50\% is 50, as in MATH
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\(?:circ|degree)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\(?:boxed|fbox)(?![a-zA-Z])", "", s)
    for _ in range(3):  # text wrappers may nest (\text{\textbf{C}}); three levels is plenty
        s = _TEXT_CMD.sub(_unwrap_text, s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    while True:  # trailing bare units, "5.4 cents", "15 square feet"
        m = re.fullmatch(r"(.*[\d})]) ([a-zA-Z]{2,})(?: ?\^ ?\{?[23]\}?)?", s)
        if not (m and m.group(2).lower() in _UNITS):
            break
        s = m.group(1).strip()
    while s.startswith("{") and _brace_matches(s).get(0) == len(s) - 1:
        s = s[1:-1].strip()
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # "x \in [-2,7]"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 (but "(1,2)" and "1, 2" are lists)
    return s


# ---- structure: a clean string -> a nested tuple comparing like the answer it denotes

def _split_top(s, sep):
    """Split s at top-level occurrences of sep (outside (), [], {}), or None when brackets don't balance."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    if depth != 0:
        return None
    return parts + [s[start:]]


def _closes_at_end(s):
    """True when the bracket opening s closes at its last character: "(1,2)" yes, "(a+5)(b+2)" no."""
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            return i == len(s) - 1
    return False


def _elements(items):
    """Parse the items of a set or list; an item with \\pm stands for its two signs."""
    out = []
    for item in items:
        if re.search(r"\\(?:pm|mp)(?![a-zA-Z])", item):
            out.append(_parse(re.sub(r"\\pm(?![a-zA-Z])", "+", re.sub(r"\\mp(?![a-zA-Z])", "-", item))))
            out.append(_parse(re.sub(r"\\pm(?![a-zA-Z])", "-", re.sub(r"\\mp(?![a-zA-Z])", "+", item))))
        else:
            out.append(_parse(item))
    return out


def _parse(s):
    """A clean answer string -> ("expr"|"text"|"choice"|"str", s) or ("seq", brackets, items),
    ("set", items), ("union", parts), ("matrix", rows), ("eq", lhs, rhs); None when it makes no sense."""
    s = s.strip()
    if not s or len(s) > MAX_ANSWER_LEN:
        return None
    if "_" in s:  # base subscripts 52_8 (and x_1): compared as strings, never as numbers
        m = re.fullmatch(r"([0-9A-Za-z]+)_\s*(?:\{\s*([0-9A-Za-z]+)\s*\}|([0-9A-Za-z]))", s)
        return ("str", m.group(1) + "_" + (m.group(2) or m.group(3))) if m else None
    m = re.fullmatch(r"\(([A-Ea-e])\)|([A-Z])", s)  # a choice letter: (C), (c), C
    if m:
        return ("choice", (m.group(1) or m.group(2)).upper())
    words = s.lower().split()
    if re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)*", s) and any(len(w) > 1 and w not in _MATH_WORDS for w in words):
        return ("text", " ".join(words))  # a word answer ("Evelyn", "even"), not "sin x" or "pi"
    parts = _split_top(s, r"\cup")
    if parts is None:
        return None
    if len(parts) > 1:
        return ("union", [_parse(p) for p in parts])
    m = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^}]*\})?(.*)\\end\{\1\}", s)
    if m:
        rows = [r for r in m.group(2).split(_ROW) if r.strip()]
        return ("matrix", [[_parse(c) for c in r.split("&")] for r in rows])
    if s.startswith(r"\{") and s.endswith(r"\}"):
        items = _split_top(s[2:-2], ",")
        return ("set", _elements(items)) if items is not None else None
    if s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        items = _split_top(s[1:-1], ",")
        if items is not None and len(items) > 1:
            return ("seq", s[0] + s[-1], [_parse(i) for i in items])
    items = _split_top(s, ",")  # before "=": "x = 1, 2" and "x=1, x=2" are both the solutions {1, 2}
    if len(items) > 1 or re.search(r"\\(?:pm|mp)(?![a-zA-Z])", s):
        return ("set", _elements(items))
    sides = _split_top(s, "=")
    if len(sides) == 2 and not re.search(r"[<>!]$|\\(?:le|ge|ne)$", sides[0]):
        return ("eq", _parse(sides[0]), _parse(sides[1]))
    return ("expr", s) if len(sides) == 1 else None


# ---- comparison

def _is_variable(p):
    """The left side of an answer like "x = 5" or "f(x) = 2x": a name, not an expression."""
    return p is not None and p[0] in ("expr", "choice", "text") and bool(
        re.fullmatch(r"\\?[a-zA-Z]+(?:\s*\(\s*[a-z]\s*\))?", p[1])) and len(p[1]) <= 8


def _match_unordered(xs, ys):
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        for j, y in enumerate(left):
            if _equal(x, y):
                del left[j]
                break
        else:
            return False
    return True


def _equal(a, b):
    if a is None or b is None:
        return False
    if a[0] == "eq" and b[0] != "eq":
        return _is_variable(a[1]) and _equal(a[2], b)
    if b[0] == "eq" and a[0] != "eq":
        return _is_variable(b[1]) and _equal(a, b[2])
    if a[0] == "set" and b[0] != "set" and len(a[1]) == 1:
        return _equal(a[1][0], b)
    if b[0] == "set" and a[0] != "set" and len(b[1]) == 1:
        return _equal(a, b[1][0])
    if a[0] == "choice" and b[0] == "text" or a[0] == "text" and b[0] == "choice":
        return a[1].lower() == b[1].lower()
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "expr":
        return _expr_equal(a[1], b[1])
    if kind in ("text", "choice", "str"):
        return a[1] == b[1]
    if kind == "seq":
        return a[1] == b[1] and len(a[2]) == len(b[2]) and all(_equal(x, y) for x, y in zip(a[2], b[2]))
    if kind in ("set", "union"):
        return _match_unordered(a[1], b[1])
    if kind == "matrix":
        return [len(r) for r in a[1]] == [len(r) for r in b[1]] and all(
            _equal(x, y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
    # two equations: the same sides, either way round, or proportional (x + y = 1 vs 2x + 2y = 2)
    if (_equal(a[1], b[1]) and _equal(a[2], b[2])) or (_equal(a[1], b[2]) and _equal(a[2], b[1])):
        return True
    if all(p is not None and p[0] == "expr" for p in (a[1], a[2], b[1], b[2])):
        return _sympy_proportional(a[1][1] + "-(" + a[2][1] + ")", b[1][1] + "-(" + b[2][1] + ")")
    return False


_FRAC_ARG = r"(?:\{\s*(\d+)\s*\}|(\d))"


def _as_fraction(s):
    """Plain numbers (integers, decimals, 1.5e3, a/b, \\frac{a}{b}, mixed 3\\frac12) exactly, else None."""
    s = s.replace(" ", "")
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d{1,3})?", s) and len(s) < 100:
        return Fraction(s)
    m = re.fullmatch(r"([-+]?)(\d+)/(\d+)", s)
    if m and int(m.group(3)) != 0:
        return Fraction(int(m.group(1) + m.group(2)), int(m.group(3)))
    m = re.fullmatch(r"([-+]?)(\d*)\\frac" + _FRAC_ARG + _FRAC_ARG, s)
    if m:
        sign, whole, num, den = m.group(1), m.group(2), m.group(3) or m.group(4), m.group(5) or m.group(6)
        if int(den) == 0:
            return None
        value = int(whole or 0) + Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _expr_equal(a, b):
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb  # the fast exact path: no sympy for plain numbers
    if re.sub(r"\s", "", a) == re.sub(r"\s", "", b):
        return _to_sympy(a) is not None  # the same text, provided it means something
    return _sympy_equal(a, b)


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds):
    """Raise _Timeout after `seconds` of wall time. SIGALRM works only in the main thread, and we don't
    disturb a timer that someone else has set: in those cases the structural guard in _to_sympy is all we have."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_FUNCS = {"sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "arcsin": "asin",
          "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "log": "log",
          "ln": "log", "exp": "exp"}
_GREEK = set("alpha beta gamma delta epsilon theta lambda mu nu rho sigma tau phi psi omega".split())
_MATH_WORDS = set(_FUNCS) | {"pi", "sqrt", "inf", "infinity"}


def _latex_arg(s, i):
    """Read one argument of \\frac or \\sqrt at s[i]: a {group}, a \\command or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        j = _brace_matches(s[i:]).get(0)
        return (None, i) if j is None else (_latex_to_code(s[i + 1:i + j]), i + j + 1)
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        return (None, i) if m is None else (_latex_to_code(m.group(0)), i + m.end())
    return s[i], i + 1


def _latex_to_code(s):
    """A LaTeX expression -> a string for sympy's parse_expr, or None when it uses something we don't know."""
    # mixed numbers: 3\frac{1}{2} is 3 + 1/2, not 3 * 1/2
    s = re.sub(r"(?<![\d.^_}])(\d+)\s*\\frac" + _FRAC_ARG + r"\s*" + _FRAC_ARG,
               lambda m: "(%s+\\frac{%s}{%s})" % (m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)), s)
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if m is None:
                if s[i:i + 2] in ("\\{", "\\}"):
                    out.append("(" if s[i + 1] == "{" else ")")
                    i += 2
                    continue
                return None
            name, i = m.group(1), i + m.end()
            if name == "frac" or name == "binom":
                a, i = _latex_arg(s, i)
                b, i = _latex_arg(s, i)
                if a is None or b is None:
                    return None
                out.append("((%s)/(%s))" % (a, b) if name == "frac" else " binomial(%s,%s) " % (a, b))
            elif name == "sqrt":
                root = ""
                if i < len(s) and s[i] == "[":
                    j = s.find("]", i)
                    if j < 0:
                        return None
                    root, i = _latex_to_code(s[i + 1:j]), j + 1
                a, i = _latex_arg(s, i)
                if a is None or root is None:
                    return None
                out.append("((%s)**(1/(%s)))" % (a, root) if root else " sqrt(%s) " % a)
            elif name in _FUNCS:
                out.append(" %s " % _FUNCS[name])
            elif name in ("cdot", "times", "ast"):
                out.append("*")
            elif name == "div":
                out.append("/")
            elif name == "pi" or name in _GREEK:
                out.append(" lamda " if name == "lambda" else " %s " % name)  # lambda is a Python keyword
            elif name == "infty":
                out.append(" oo ")
            else:
                return None
        elif ch in "{}":
            out.append("(" if ch == "{" else ")")
            i += 1
        elif ch == "^":
            out.append("**")
            i += 1
        elif ch == ",":
            return None  # a comma inside one expression: a tuple sympy would build, not a number
        else:
            out.append(ch)
            i += 1
    # 1.5e3 as 1.5*10**(3), exact and visible to the size guard (1e999999999 must not reach Rational)
    code = re.sub(r"(\d)[eE]([-+]?\d+)", r"\1*10**(\2)", "".join(out))
    # only arithmetic reaches parse_expr (it evals): names, numbers, operators, brackets; no attribute access
    if not re.fullmatch(r"[A-Za-z0-9\s+\-*/().,!]*", code) or re.search(r"\.\s*[A-Za-z(]", code):
        return None
    # an empty "()" or a function with nothing to apply to ("9\log") would make sympy build (and warn about)
    # products of non-expressions
    if re.search(r"\(\s*\)|\b(?:%s)\b(?!\s*(?:[\w(]|\*\*))" % "|".join(set(_FUNCS.values())), code):
        return None
    return code


_SYMPY = {}


def _sympy_parser():
    """Import sympy on first use only: importing evaluate (rl.py does) stays cheap."""
    if not _SYMPY:
        import sympy
        from sympy.parsing import sympy_parser as sp
        names = {n: getattr(sympy, n) for n in "Add Mul Pow Symbol Integer Float Rational Function factorial binomial "
                 "sqrt sin cos tan cot sec csc asin acos atan sinh cosh tanh log exp pi oo Abs".split()}
        names["__builtins__"] = {}
        local = {"i": sympy.I}
        local.update({g: sympy.Symbol(g) for g in _GREEK})
        transformations = sp.standard_transformations + (sp.implicit_multiplication_application,
                                                         sp.convert_xor, sp.rationalize)
        # functions that compute eagerly even under evaluate=False: 1000000! would take minutes
        unevaluated = {n: (lambda f: lambda *a: f(*a, evaluate=False))(names[n]) for n in ("factorial", "binomial")}
        _SYMPY.update(sympy=sympy, parse=sp.parse_expr, unevaluated=unevaluated, names=names, local=local,
                      transformations=transformations)
    return _SYMPY


def _digits(e, sympy):
    """Upper bound on log10 |value| (at least 0) of an unevaluated expression; inf when it may be astronomical."""
    if e.is_Rational:
        return max(math.log10(abs(e.p) or 1), math.log10(e.q))
    if e.is_Number or e.is_Symbol or not e.args:
        return 1.0  # floats, pi, oo, symbols: small
    ds = [_digits(a, sympy) for a in e.args]
    if e.is_Pow:
        base, exp = ds
        return math.inf if exp > 5 else base * 10 ** exp
    if isinstance(e, sympy.factorial):
        return math.inf if ds[0] > 5 else ds[0] * 10 ** ds[0]
    if isinstance(e, (sympy.binomial, sympy.exp)):
        return math.inf if ds[0] > 5 else 10 ** ds[0]
    return sum(ds) + 1  # Add, Mul, functions: generous


@lru_cache(maxsize=4096)
def _to_sympy(s):
    """LaTeX -> a sympy expression, or None. Parsed unevaluated first so that 10^{10^{10}} is rejected before
    sympy tries to compute it."""
    code = _latex_to_code(s)
    if code is None or not code.strip() or len(code) > 2 * MAX_ANSWER_LEN:
        return None
    sp = _sympy_parser()
    try:
        with _time_limit(SYMPY_TIMEOUT):
            kwargs = dict(local_dict=dict(sp["local"]), global_dict=dict(sp["names"]),
                          transformations=sp["transformations"])
            guard = dict(kwargs, global_dict=dict(sp["names"], **sp["unevaluated"]))
            if _digits(sp["parse"](code, evaluate=False, **guard), sp["sympy"]) > MAX_DIGITS:
                return None
            expr = sp["parse"](code, **kwargs)
    except Exception:
        return None
    sympy = sp["sympy"]
    return expr if isinstance(expr, sympy.Expr) and not expr.has(sympy.zoo, sympy.nan) else None  # 1/0 is no answer


def _is_zero(diff, sympy):
    if diff == 0:
        return True
    if diff.is_Rational or diff.has(sympy.nan, sympy.zoo):
        return False
    # cheap disproof before simplify (the slow part): a clearly nonzero value at one rational point settles it
    # (strict evalf raises unless it has 30 correct digits, so a zero never passes for nonzero)
    point = {x: sympy.Rational(7 + 2 * k, 13 + k) for k, x in enumerate(sorted(diff.free_symbols, key=str))}
    try:
        value = diff.subs(point).evalf(30, strict=True)
        if value.is_number and value.is_finite and value != 0:
            return False
    except sympy.core.evalf.PrecisionExhausted:
        pass
    if sympy.expand(diff) == 0 or sympy.simplify(diff) == 0:
        return True
    if diff.free_symbols:
        return False
    # identities simplify misses (nested radicals): 60 digits agreeing is proof enough for contest answers,
    # and rationals never get here, so 0.33 vs 1/3 is still decided exactly
    value = diff.evalf(60)
    return value.is_number and value.is_finite is not False and abs(value) < sympy.Float("1e-50", 60)


def _sympy_equal(a, b):
    ea, eb = _to_sympy(a), _to_sympy(b)
    if ea is None or eb is None:
        return False
    if ea == eb:
        return True
    sympy = _sympy_parser()["sympy"]
    try:
        with _time_limit(SYMPY_TIMEOUT):
            return bool(_is_zero(ea - eb, sympy))
    except Exception:
        return False


def _sympy_proportional(a, b):
    """Two equations lhs - rhs = 0 that say the same thing: their differences are constant multiples."""
    ea, eb = _to_sympy(a), _to_sympy(b)
    if ea is None or eb is None or eb == 0:
        return False
    sympy = _sympy_parser()["sympy"]
    try:
        with _time_limit(SYMPY_TIMEOUT):
            ratio = sympy.simplify(ea / eb)
            return bool(ratio.is_number and ratio.is_finite and ratio != 0)
    except Exception:
        return False


def _interpret(answer):
    """An answer string -> its structure, or None; overlong strings are refused before any work."""
    if answer is None or len(answer) > 4 * MAX_ANSWER_LEN:
        return None
    return _parse(_normalize(answer))


def _is_prose(text):
    """A sentence rather than a bare answer: at least two words, one of them a plain word of 3+ letters."""
    words = text.split()
    return len(words) > 1 and any(re.fullmatch(r"[A-Za-z]{3,}[.,:;]?", w) for w in words)


def grade(prediction, reference, allow_fallback=True):
    """True when prediction's final answer equals reference's. Either side may be a full solution (its last
    \\boxed{} or "#### N" is used) or a bare answer; a prediction in prose with neither falls back to its last
    number when allow_fallback. Never raises; False for garbage."""
    try:
        if not isinstance(prediction, str) or not isinstance(reference, str):
            return False
        ref = extract_answer(reference, allow_fallback=False)
        ref = _interpret(ref if ref is not None else reference)
        if ref is None:
            return False
        pred = extract_answer(prediction, allow_fallback=False)
        if pred is not None:
            return _equal(_interpret(pred), ref)
        if _equal(_interpret(prediction), ref):
            return True
        if allow_fallback and _is_prose(prediction):
            return _equal(_interpret(extract_answer(prediction)), ref)
        return False
    except Exception:  # RecursionError, _Timeout escaping a guard, anything sympy throws: not a match
        return False

# -----------------------------------------------------------------------------
# sampling metrics: pass@k and majority vote


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every choice of k samples contains a correct one
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers):
    """The most common of some answers (extract_answer's outputs, or solutions with a \\boxed{} / "####"),
    grouping answers that grade equal: 1/2 and 0.5 vote together. A tie goes to the group seen first; None,
    empty and meaningless answers never vote. Returns the first-seen member of the winning group, or None."""
    groups = []  # [representative, count]
    for answer in answers:
        if not isinstance(answer, str):
            continue
        extracted = extract_answer(answer, allow_fallback=False)
        if _interpret(extracted if extracted is not None else answer) is None:
            continue  # empty or meaningless: no vote
        for group in groups:
            if grade(answer, group[0]):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    if not groups:
        return None
    return max(groups, key=lambda g: g[1])[0]  # max keeps the first of equal counts

# -----------------------------------------------------------------------------
# Task: bits per byte


def eval_bpb(model, tokenizer, device, autocast_ctx, max_tokens=65536, rows_per_batch=16):
    """Bits per byte on the held-out pretraining text (pretrain.py's measure, on the same stream of rows), and the
    unigram baseline on the same tokens. The baseline is fitted to the very tokens it is scored on, so it is a
    slightly optimistic bar; how far below it a model gets is what it learned from context."""
    import torch
    from data import pretrain_files
    from pretrain import TokenRows, evaluate_bpb
    seq_len = model.config.sequence_len
    rows = TokenRows(tokenizer, pretrain_files("val"), rows_per_batch, seq_len, slots=[0], num_slots=1, loop=False)
    num_batches = max(1, max_tokens // (rows_per_batch * seq_len)) if max_tokens > 0 else math.inf
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)  # how often each token is a target

    def batches():
        n = 0
        while n < num_batches:
            batch = rows.next_batch(0, device)
            if batch is None:
                return
            counts.add_(torch.bincount(batch[1].flatten().cpu(), minlength=tokenizer.vocab_size).double())
            n += 1
            yield batch

    token_bytes = torch.tensor(tokenizer.token_bytes, dtype=torch.long, device=device)
    bpb = evaluate_bpb(model, batches(), token_bytes, autocast_ctx)
    nbytes = torch.tensor(tokenizer.token_bytes, dtype=torch.float64)
    counts *= nbytes > 0  # special tokens stand for no text: left out, as evaluate_bpb does
    total = counts.sum()
    if total == 0:
        raise SystemExit(f"error: the held-out text is shorter than one batch of {rows_per_batch} rows of "
                         f"{seq_len} tokens; lower --batch_size")
    p = counts[counts > 0] / total
    bits_per_token = -(p * p.log2()).sum()  # the entropy of the unigram distribution
    unigram = bits_per_token * total / (counts * nbytes).sum()
    return {"bpb": bpb, "unigram_bpb": unigram.item(), "tokens": int(total)}

# -----------------------------------------------------------------------------
# Task: multiple choice


def model_device(model):
    return next(model.parameters()).device


def mc_loglik_choices(model, tokenizer, items, autocast_ctx, rows_per_batch=16, max_len=0):
    """Base models: each choice as a continuation of its question, tokens of `question + " " + choice` after
    those of the question alone; the choice with the lowest mean loss per token wins (nanochat's CORE; the mean,
    not the sum, so long choices are not penalised for their length). max_len > 0 crops each row from the left.
    Returns the chosen index of each item."""
    import torch
    rows, owners = [], []  # (ids, index of the first continuation token), and the item of each row
    for i, item in enumerate(items):
        context = tokenizer.encode(item["question"], prepend=tokenizer.bos_id)
        for choice in item["choices"]:
            ids = tokenizer.encode(item["question"] + " " + choice, prepend=tokenizer.bos_id)
            # compare tokens, not text: where the question's last token merges with the choice, it counts as
            # part of the continuation
            start = next((j for j, (a, b) in enumerate(zip(context, ids)) if a != b), len(context))
            start = min(start, len(ids) - 1)  # an empty choice is still scored on its last token
            if max_len and len(ids) > max_len + 1:
                cut = len(ids) - max_len - 1
                ids, start = ids[cut:], max(1, start - cut)
            rows.append((ids, start))
            owners.append(i)
    device = model_device(model)
    losses = []
    for b in range(0, len(rows), rows_per_batch):
        chunk = rows[b:b + rows_per_batch]
        T = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)  # padding is never a target: any token does
        y = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1: not scored
        for r, (ids, start) in enumerate(chunk):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[r, start - 1:len(ids) - 1] = torch.tensor(ids[start:])
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), autocast_ctx:
            loss = model(x, y, loss_reduction="none").float()  # (B, T)
        scored = y >= 0
        losses += ((loss * scored).sum(dim=1) / scored.sum(dim=1)).tolist()
    per_item = [[] for _ in items]
    for i, loss in zip(owners, losses):
        per_item[i].append(loss)
    return [min(range(len(ls)), key=ls.__getitem__) for ls in per_item]  # a tie goes to the earlier choice


def mc_letter_choices(model, tokenizer, items, autocast_ctx, rows_per_batch=16, max_len=0):
    """Chat models: the item as a user turn with lettered choices (data.mc_conversation, the SFT format); the
    model's answer is the letter, among the item's own, that it finds likeliest as the first token of its reply
    (nanochat's way: one forward pass, and a reply in some other format still gets read). max_len > 0 crops each
    prompt from the left. Returns the chosen index of each item."""
    import torch
    from data import LETTERS, mc_conversation
    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer.encode(letter)
        assert len(ids) == 1, f"the choice letter {letter!r} is not one token"  # every byte is a token
        letter_ids.append(ids[0])
    prompts = []
    for item in items:
        if not 2 <= len(item["choices"]) <= len(LETTERS):
            raise ValueError(f"a multiple-choice item needs 2 to {len(LETTERS)} choices: {item['question'][:60]!r}")
        ids = tokenizer.render_for_completion(mc_conversation(item)[:1])
        prompts.append(ids[len(ids) - max_len:] if max_len and len(ids) > max_len else ids)
    device = model_device(model)
    chosen = []
    for b in range(0, len(prompts), rows_per_batch):
        chunk, chunk_items = prompts[b:b + rows_per_batch], items[b:b + rows_per_batch]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # padded on the right: causal
        for r, ids in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        with torch.no_grad(), autocast_ctx:
            logits = model(x.to(device))  # (B, T, V)
        last = logits[torch.arange(len(chunk)), torch.tensor([len(ids) - 1 for ids in chunk])].float()  # (B, V)
        for r, item in enumerate(chunk_items):
            candidates = last[r, letter_ids[:len(item["choices"])]]  # (C,)
            chosen.append(int(candidates.argmax()))  # argmax: a tie goes to the earlier letter
    return chosen


def mc_metrics(items, chosen):
    """Accuracy, and the centred score: 0 at chance (the mean of 1/choices), 1 when all are right."""
    acc = sum(c == item["answer"] for c, item in zip(chosen, items)) / len(items)
    chance = sum(1 / len(item["choices"]) for item in items) / len(items)
    return {"acc": acc, "centered": (acc - chance) / (1 - chance), "n": len(items)}

# -----------------------------------------------------------------------------
# Task: math word problems

BASE_SHOTS = 3  # solved problems in a base model's prompt (fewer when they do not fit its context)


def fewshot_prompt(tokenizer, question, shots, limit):
    """A base model's prompt: solved problems as separate documents in the pretraining format (data/tinyworld.py's
    doc_problem: "Question: ...\\nAnswer: ...\\n#### N"), then the question. Each document begins with <|bos|>,
    as in pretraining, so a model that learned the format ends its answer with <|bos|> (a stop token). As many
    shots as keep the prompt within `limit` tokens."""
    for k in range(len(shots), -1, -1):
        ids = []
        for shot in shots[:k]:
            ids += tokenizer.encode(f"Question: {shot['question']}\nAnswer: {shot['answer']}", prepend=tokenizer.bos_id)
        ids += tokenizer.encode(f"Question: {question}\nAnswer:", prepend=tokenizer.bos_id)
        if len(ids) <= limit or k == 0:
            return ids


def completion_text(tokens, tokenizer, chat=True):
    """One generated answer as the text to grade: without the stop token that ended it. A base model may go on
    past its answer (to the next "Question:"), so its text ends at the first "#### N" line."""
    stops = (tokenizer.special("<|assistant_end|>"), tokenizer.bos_id)
    text = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stops else tokens)
    if not chat:
        text = text.split("\nQuestion:")[0]
        m = re.search(r"####[^\n]*", text)
        text = text[:m.end()] if m else text
    return text


def eval_math(engine, problems, prompts, chat=True, num_samples=1, vote=False, temperature=0.0, top_k=0,
              max_new_tokens=256, batch_size=16, seed=0, label="math"):
    """Generate num_samples answers to each prompt (batch_size problems per batch; the samples of one prompt share
    its prefill) and grade them against the problems' answers. Returns pass@1, pass@k (k = num_samples; the
    unbiased estimate, averaged over problems) and with vote maj@k: the most common extracted answer (equal
    answers grouped, ties to the first seen), graded."""
    k = num_samples
    keys = ["pass@1"] + ([f"pass@{k}"] if k > 1 else []) + ([f"maj@{k}"] if vote else [])
    sums = dict.fromkeys(keys, 0.0)
    t0 = time.time()
    for b in range(0, len(problems), batch_size):
        outs = engine.generate_batch(prompts[b:b + batch_size], num_samples=k, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed + b)
        for problem, samples in zip(problems[b:b + batch_size], outs):
            texts = [completion_text(tokens, engine.tokenizer, chat) for tokens, _ in samples]
            correct = sum(grade(text, problem["answer"]) for text in texts)
            sums["pass@1"] += pass_at_k(k, correct, 1)
            if k > 1:
                sums[f"pass@{k}"] += pass_at_k(k, correct, k)
            if vote:
                voted = majority_vote([extract_answer(text) for text in texts])
                sums[f"maj@{k}"] += voted is not None and grade(voted, problem["answer"])
        done = min(b + batch_size, len(problems))
        print(f"{label}: {done}/{len(problems)} problems, pass@1 {sums['pass@1'] / done:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    return {**{key: total / len(problems) for key, total in sums.items()}, "n": len(problems)}

# -----------------------------------------------------------------------------
# Running the tasks on one checkpoint

TASKS = ("bpb", "mc", "math")


def datasets_of(tasks, names):
    """The sets each task runs on. Each name given goes to the task it belongs to (tinyworld to both); a task
    with none named runs its default: mc the built-in items and every downloaded set, math the built-in problems
    (generation is the slow task: a downloaded set is run when asked for)."""
    from data import MATH_SPLITS, MC_SPLITS, data_dir
    for name in names:
        kinds = [t for t, sets in (("mc", MC_SPLITS), ("math", MATH_SPLITS)) if name in sets]
        if not kinds:
            raise SystemExit(f"error: unknown --dataset {name!r}: expected one of "
                             f"{', '.join(dict.fromkeys([*MC_SPLITS, *MATH_SPLITS]))}")
        if not set(kinds) & set(tasks):
            raise SystemExit(f"error: --dataset={name} is a {' and '.join(kinds)} set, but --task has no "
                             f"{' or '.join(kinds)}")
    mc = [n for n in names if n in MC_SPLITS] or ["tinyworld"] + [
        n for n in MC_SPLITS if n != "tinyworld" and os.path.exists(os.path.join(data_dir(n), "test.jsonl"))]
    math_sets = [n for n in names if n in MATH_SPLITS] or ["tinyworld"]
    return {"mc": mc if "mc" in tasks else [], "math": math_sets if "math" in tasks else []}


def load_set(kind, name, limit):
    import data
    try:
        rows = (data.load_mc if kind == "mc" else data.load_math)(name, "test")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    rows = rows[:limit] if limit > 0 else rows
    if not rows:
        raise SystemExit(f"error: the {name} {kind} test set is empty")
    return rows


def run_tasks(model, tokenizer, stage, tasks, sets, device, autocast_ctx):
    """Every requested task on one model; sets: {"mc": {name: items}, "math": {name: problems}}.
    Returns {result name: {metric: value, ..., "settings": {...}}}."""
    import data
    from model import Engine
    chat = stage != "base"
    context = model.cos.size(0)  # the longest sequence the model can take (its rotary cache)
    results = {}
    if "bpb" in tasks:
        r = eval_bpb(model, tokenizer, device, autocast_ctx, eval_tokens, batch_size)
        results["bpb"] = {**r, "settings": {"eval_tokens": eval_tokens}}
        print(f"bpb: {r['bpb']:.4f} (unigram baseline {r['unigram_bpb']:.4f}) on {r['tokens']:,} tokens", flush=True)
    for name, items in sets["mc"].items():
        scorer = mc_letter_choices if chat else mc_loglik_choices
        r = mc_metrics(items, scorer(model, tokenizer, items, autocast_ctx, batch_size, context))
        results[f"mc/{name}"] = {**r, "settings": {"max_problems": max_problems,
                                                   "scoring": "letter" if chat else "loglik"}}
        print(f"mc/{name}: acc {r['acc']:.4f}, centred {r['centered']:.4f} ({r['n']} items)", flush=True)
    for name, problems in sets["math"].items():
        if chat:
            prompts = [tokenizer.render_for_completion([{"role": "user", "content": p["question"]}]) for p in problems]
        else:
            try:  # solved problems of the same set, when it has a train split on disk
                shots = data.load_math(name, "train")[:BASE_SHOTS]
            except (FileNotFoundError, ValueError):
                shots = []
            limit = model.config.sequence_len - max_new_tokens  # shots only as far as the trained context allows
            prompts = [fewshot_prompt(tokenizer, p["question"], shots, limit) for p in problems]
            used = sorted({ids.count(tokenizer.bos_id) - 1 for ids in prompts})  # one <|bos|> per document
            style = f"{used[0]}-shot" if len(used) == 1 else f"{used[0]}- to {used[-1]}-shot"
        longest = max(map(len, prompts))
        if longest + max_new_tokens > context:
            raise SystemExit(f"error: a {name} prompt of {longest} tokens + --max_new_tokens={max_new_tokens} is "
                             f"more than the model can take ({context} tokens); lower --max_new_tokens")
        with autocast_ctx:
            r = eval_math(Engine(model, tokenizer), problems, prompts, chat, num_samples, vote, temperature, top_k,
                          max_new_tokens, batch_size, seed, label=f"math/{name}")
        settings = {"max_problems": max_problems, "num_samples": num_samples, "vote": vote, "temperature": temperature,
                    "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "prompt": "chat" if chat else style}
        results[f"math/{name}"] = {**r, "settings": settings}
    return results


def flat_metrics(results):
    """{"bpb": .., "mc/tinyworld/acc": .., "math/tinyworld/pass@1": ..}: every number of the results."""
    out = {}
    for name, r in results.items():
        for key, value in r.items():
            if key not in ("settings", "n", "tokens"):
                out[key if name == "bpb" else f"{name}/{key}"] = value
    return out


def markdown_table(corner, columns, rows, cells):
    """A markdown table: corner names the column of row names; cells(row, column) -> str."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + row + " | " + " | ".join(cells(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def metric_order(keys):
    """bpb first, then multiple choice, then math; within each, the order first seen."""
    rank = lambda k: 0 if k in ("bpb", "unigram_bpb") else 1 if k.startswith("mc/") else 2
    return sorted(dict.fromkeys(keys), key=rank)


def format_value(value):
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

# -----------------------------------------------------------------------------
# The report card: report.md from the sections the stages left in report/

STAGES = ("base", "sft", "rl")
TIMES = (("tokenizer", "tokenizer"), ("pretrain", "base"), ("sft", "sft"), ("rl", "rl"), ("eval", "eval"))


def read_report_dir(report_dir):
    """The JSON sections ({name: dict}) and the stages' wall seconds ({name: float}) in report_dir."""
    sections, seconds = {}, {}
    for path in sorted(glob.glob(os.path.join(report_dir, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                sections[os.path.basename(path)[:-5]] = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read the report section {path} ({e}); rerun its stage or delete it")
    for path in sorted(glob.glob(os.path.join(report_dir, "*.seconds"))):
        try:
            with open(path) as f:
                seconds[os.path.basename(path)[:-8]] = float(f.read())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {path} ({e}): it should hold a number of seconds")
    return sections, seconds


def environment():
    """Hardware and software versions of this machine, as markdown lines; anything unknown is left out."""
    import platform
    import subprocess
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"- CPU: {cpu}, {os.cpu_count()} cores"]
    try:
        lines[0] += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):  # sysconf names differ by platform
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"- GPU: {len(names)} x {names[0]}")
    else:
        lines.append("- GPU: none")
    commit = "unknown"
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else commit
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        pass
    lines.append(f"- Python {platform.python_version()}, torch {torch.__version__}, picochat commit {commit}")
    return lines


def config_line(config):
    return "`" + " ".join(f"{k}={v!r}" for k, v in sorted(config.items())) + "`"


def chart(history, names, title):
    """An SVG chart of some of a history's series ({name: [[step, value], ...]}), or "" when it has none."""
    import common
    series = {label: history[key] for key, label in names if history.get(key)}
    return common.svg_chart(series, title) if series else ""


def build_report(sections, seconds, environment_lines):
    """report.md's text and the summary dict of the last line."""
    minutes = {f"{key}_min": seconds[name] / 60 if name in seconds else None for key, name in TIMES}
    evals = {stage: sections[f"eval_{stage}"] for stage in STAGES if f"eval_{stage}" in sections}
    metric = lambda stage, key: evals.get(stage, {}).get("metrics", {}).get(key)
    base_bpb = metric("base", "bpb")
    if base_bpb is None:
        base_bpb = sections.get("base", {}).get("metrics", {}).get("val_bpb")
    summary = {"total_min": sum(seconds.values()) / 60 if seconds else None, **minutes, "bpb": base_bpb,
               "pass1_sft": metric("sft", "math/tinyworld/pass@1"), "pass1_rl": metric("rl", "math/tinyworld/pass@1")}

    out = ["# picochat report card", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "",
           "## Environment", "", *environment_lines, ""]
    if evals:
        keys = metric_order(k for e in evals.values() for k in e.get("metrics", {}))
        table = markdown_table("metric", list(STAGES), keys, lambda k, s: format_value(metric(s, k)))
        out += ["## Metrics", "", table, ""]
    if seconds:
        order = ["data"] + [name for _, name in TIMES]  # pipeline order, then any other timed stage
        stages = sorted(seconds, key=lambda n: order.index(n) if n in order else len(order))
        total = summary["total_min"]
        table = markdown_table("stage", ["minutes"], [*stages, "total"],
                               lambda r, c: f"{total if r == 'total' else seconds[r] / 60:.1f}")
        out += ["## Time", "", table, ""]

    if "tokenizer" in sections or "tokenizer_eval" in sections:
        tok, tok_eval = sections.get("tokenizer", {}), sections.get("tokenizer_eval", {})
        out += ["## Tokenizer", ""]
        if "vocab_size" in tok:
            out.append(f"- vocabulary: {tok['vocab_size']:,} tokens, trained in {tok.get('train_seconds', 0):.1f}s")
        if "bytes_per_token" in tok_eval:
            out.append(f"- held-out text: {tok_eval['bytes_per_token']:.3f} bytes per token")
        if "config" in tok:
            out.append(f"- config: {config_line(tok['config'])}")
        out.append("")
    charts = {"base": [(("loss", "train loss"),), (("val_bpb", "val bpb"),)],
              "sft": [(("loss", "train loss"), ("val_loss", "val loss"))],
              "rl": [(("reward", "reward"), ("pass1", "pass@1"), ("greedy_pass1", "greedy pass@1"))]}
    titles = {"base": ["Pretraining: training loss", "Pretraining: validation bits per byte"],
              "sft": ["SFT: loss"], "rl": ["RL: reward and held-out pass@1"]}
    headings = {"base": "Pretraining (base)", "sft": "Chat fine-tuning (sft)", "rl": "Reinforcement learning (rl)"}
    for stage in STAGES:
        if stage not in sections:
            continue
        sec = sections[stage]
        out += [f"## {headings[stage]}", ""]
        if sec.get("checkpoint"):
            out.append(f"- checkpoint: `{sec['checkpoint']}`")
        metrics = {k: v for k, v in sec.get("metrics", {}).items() if isinstance(v, (int, float))}
        if metrics:
            out.append("- metrics: " + ", ".join(f"{k} {format_value(v)}" for k, v in metrics.items()))
        if "config" in sec:
            out.append(f"- config: {config_line(sec['config'])}")
        out.append("")
        for names, title in zip(charts[stage], titles[stage]):
            svg = chart(sec.get("history", {}), names, title)
            if svg:
                out += [svg, ""]
    for stage, sec in evals.items():
        ckpt = sec.get("checkpoint", {})
        out += [f"## Evaluation of {stage}", "", f"- checkpoint: {ckpt.get('stage', stage)}, "
                f"tag {ckpt.get('model_tag', '?')}, step {ckpt.get('step', '?')}"]
        for name, r in sec.get("results", {}).items():
            settings = r.get("settings", {})
            out.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        out.append("")
    return "\n".join(out), summary


def write_report():
    """Regenerate report.md; print its path, then the summary JSON as the last line."""
    import common
    report_dir = os.path.join(common.get_base_dir(), "report")
    sections, seconds = read_report_dir(report_dir)
    text, summary = build_report(sections, seconds, environment())
    path = os.path.join(report_dir, "report.md")
    common.atomic_write_text(path, text)
    print(f"report card: {path} ({len(sections)} sections)")
    print(json.dumps(summary))
    return summary

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    import common
    config = common.configure(globals())
    if report:
        write_report()
        raise SystemExit(0)

    # ---- settings that cannot work, refused before any time is spent
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    errors = []
    if not tasks or set(tasks) - set(TASKS):
        errors.append(f"--task must name some of {', '.join(TASKS)} (comma-separated), got {task!r}")
    if source not in (*STAGES, "all"):
        errors.append(f"--source must be base, sft, rl or all, got {source!r}")
    for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("max_problems", max_problems, 0),
                             ("eval_tokens", eval_tokens, 0), ("top_k", top_k, 0)):
        if value < low:
            errors.append(f"--{name} must be >= {low}, got {value}")
    if temperature < 0:
        errors.append(f"--temperature must be >= 0, got {temperature}")
    if vote and num_samples < 2:
        errors.append("--vote=1 takes the majority of several answers: give --num_samples=K with K > 1")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    if num_samples > 1 and temperature == 0:
        # greedy decoding would give K copies of one answer, making pass@K = pass@1
        temperature = config["temperature"] = 1.0
        print(f"--num_samples={num_samples} needs sampling: temperature set to 1.0")
    names = datasets_of(tasks, [d.strip() for d in dataset.split(",") if d.strip()])

    # ---- which checkpoints, then the data: what is missing is found before any work
    if source == "all":
        ckpts = os.path.join(common.get_base_dir(), "checkpoints")
        sources = [s for s in STAGES if glob.glob(os.path.join(ckpts, s, model_tag or "*", "meta_*.json"))]
        if not sources:
            raise SystemExit(f"error: no base, sft or rl checkpoint under {ckpts}")
    else:
        sources = [source]
    tags = {stage: common.find_model_tag(stage, model_tag) for stage in sources}
    sets = {kind: {name: load_set(kind, name, max_problems) for name in names[kind]} for kind in ("mc", "math")}
    _, _, _, _, device = common.setup_device(device)
    autocast_ctx = common.autocast(device, dtype)

    # ---- evaluate each, and leave its report section
    all_metrics = {}
    for stage in sources:
        common.seed_everything(seed)
        tag = tags[stage]
        model, tokenizer, meta = common.load_model(stage, device, tag, step)
        checkpoint = {"stage": stage, "model_tag": tag, "step": meta["step"]}
        print(f"== {stage} (tag {tag}, step {meta['step']}): {', '.join(tasks)}", flush=True)
        t0 = time.time()
        results = run_tasks(model, tokenizer, stage, tasks, sets, device, autocast_ctx)
        all_metrics[stage] = flat_metrics(results)
        path = os.path.join(common.get_base_dir(), "report", f"eval_{stage}.json")
        if os.path.exists(path):  # earlier results on this same checkpoint stay, unless measured again now
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous.get("checkpoint") == checkpoint:
                results = {**previous.get("results", {}), **results}
        section = {"stage": "eval", "checkpoint": checkpoint, "config": config, "results": results,
                   "metrics": flat_metrics(results), "minutes": (time.time() - t0) / 60}
        print(f"report section: {common.write_report_section(f'eval_{stage}', section)}")
        del model

    # ---- the summary table
    keys = metric_order(k for m in all_metrics.values() for k in m)
    print()
    print(markdown_table("metric", sources, keys, lambda k, s: format_value(all_metrics[s].get(k))))
