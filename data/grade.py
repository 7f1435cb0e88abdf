"""
The math answer checker: does a model's answer equal the reference? evaluate.py's math task and rl.py's reward
grade with it, and evaluate.py re-exports it for users (`from evaluate import grade` works).

    python -c "from data.grade import grade; print(grade(r'so the answer is $\\boxed{\\frac12}$', '0.5'))"  # True

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

Also here: pass@k (the unbiased estimate) and majority_vote (self-consistency), the sampling metrics of evaluate.py,
rl.py and dpo.py; and sampled answers graded: sample_groups (a group of scored answers per prompt, GRPO's unit)
and pass_rates (held-out pass@1 / pass@k / greedy pass@1 over ranks).
"""

import math
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import sympy
from sympy.parsing import sympy_parser

import common

# -----------------------------------------------------------------------------
# Answer extraction

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


# sympy's parser, kept to arithmetic: only these names exist (no builtins), and the transformations read
# implicit products (2x), ^ for powers and decimals as exact rationals
_SYMPY_NAMES = {n: getattr(sympy, n) for n in "Add Mul Pow Symbol Integer Float Rational Function factorial binomial "
                "sqrt sin cos tan cot sec csc asin acos atan sinh cosh tanh log exp pi oo Abs".split()}
_SYMPY_NAMES["__builtins__"] = {}
_SYMPY_LOCAL = {"i": sympy.I, **{g: sympy.Symbol(g) for g in _GREEK}}
_TRANSFORMATIONS = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,
                                                            sympy_parser.convert_xor, sympy_parser.rationalize)
# functions that compute eagerly even under evaluate=False: 1000000! would take minutes
_UNEVALUATED = {n: (lambda f: lambda *a: f(*a, evaluate=False))(_SYMPY_NAMES[n]) for n in ("factorial", "binomial")}


def _digits(e):
    """Upper bound on log10 |value| (at least 0) of an unevaluated expression; inf when it may be astronomical."""
    if e.is_Rational:
        return max(math.log10(abs(e.p) or 1), math.log10(e.q))
    if e.is_Number or e.is_Symbol or not e.args:
        return 1.0  # floats, pi, oo, symbols: small
    ds = [_digits(a) for a in e.args]
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
    try:
        with _time_limit(SYMPY_TIMEOUT):
            kwargs = dict(local_dict=dict(_SYMPY_LOCAL), global_dict=dict(_SYMPY_NAMES), transformations=_TRANSFORMATIONS)
            guard = dict(kwargs, global_dict=dict(_SYMPY_NAMES, **_UNEVALUATED))
            if _digits(sympy_parser.parse_expr(code, evaluate=False, **guard)) > MAX_DIGITS:
                return None
            expr = sympy_parser.parse_expr(code, **kwargs)
    except Exception:
        return None
    return expr if isinstance(expr, sympy.Expr) and not expr.has(sympy.zoo, sympy.nan) else None  # 1/0 is no answer


def _is_zero(diff):
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
    try:
        with _time_limit(SYMPY_TIMEOUT):
            return bool(_is_zero(ea - eb))
    except Exception:
        return False


def _sympy_proportional(a, b):
    """Two equations lhs - rhs = 0 that say the same thing: their differences are constant multiples."""
    ea, eb = _to_sympy(a), _to_sympy(b)
    if ea is None or eb is None or eb == 0:
        return False
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
# Sampling metrics: pass@k and majority vote


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
# Sampled answers, graded: what rl.py learns from, what dpo.py pairs, and the held-out pass rates both measure.
# The engine is model.py's Engine (passed in); grader is grade, or a stand-in in tests.

FINAL_LINE = re.compile(r"(?:^|\n)#### *-?\d[\d,]*(?:\.\d+)?\s*$")  # the answer convention of every math dataset


@dataclass
class Sample:
    tokens: list  # the answer as generated, ending with its stop token when it ended its turn
    mask: list  # 1 on the tokens the policy chose, 0 on forced calculator outputs
    reward: float
    correct: bool


def response_text(tokens, tokenizer):
    """The answer as text, without the stop token that ended it (the verifier reads the last line)."""
    stops = (tokenizer.special("<|assistant_end|>"), tokenizer.bos_id)
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stops else tokens)


def score(text, reference, finished, grader, format_bonus=0.0):
    """(reward, correct) of one answer: 1 when the verifier says its final answer equals the reference's, plus
    format_bonus when it ended its turn on a well-formed "#### N" line (a dense signal while correct answers are
    rare; keep it small, or the policy learns the format and stops there)."""
    correct = bool(grader(text, reference))
    well_formed = finished and FINAL_LINE.search(text) is not None
    return float(correct) + format_bonus * well_formed, correct


def sample_groups(engine, prompts, references, *, num_samples, max_new_tokens, temperature, top_k, seed, grader,
                  format_bonus=0.0, top_p=1.0):
    """Sample num_samples answers to each prompt and score them: per prompt, a list of Samples."""
    outs = engine.generate_batch(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    end = engine.tokenizer.special("<|assistant_end|>")
    groups = []
    for answers, reference in zip(outs, references):
        group = []
        for tokens, mask in answers:
            finished = bool(tokens) and tokens[-1] == end
            reward, correct = score(response_text(tokens, engine.tokenizer), reference, finished, grader,
                                    format_bonus)
            group.append(Sample(tokens, mask, reward, correct))
        groups.append(group)
    return groups


def pass_rates(engine, items, *, num_samples, greedy, chunk_size, max_new_tokens, temperature, top_k, seed, grader,
               rank, world_size, device, top_p=1.0):
    """Held-out pass@1 (the mean over num_samples answers), pass@k (k = num_samples) and, with greedy, greedy
    pass@1 on (prompt ids, reference) items, each rank taking every world_size-th item, chunk_size at a time. The
    seeds depend only on the seed, the chunk and the rank, so every evaluation draws alike and a curve of these
    shows the model changing, not the sampling noise."""
    mine = items[rank::world_size]
    sums = {"pass1": 0.0, "passk": 0.0, "greedy": 0.0, "problems": 0}
    for i in range(0, len(mine), chunk_size):
        prompts, references = [p for p, _ in mine[i:i + chunk_size]], [a for _, a in mine[i:i + chunk_size]]
        groups = sample_groups(engine, prompts, references, num_samples=num_samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=common.derive_seed(seed, "eval", i, rank), grader=grader)
        if greedy:
            greedy_groups = sample_groups(engine, prompts, references, num_samples=1, max_new_tokens=max_new_tokens,
                                          temperature=0.0, top_k=0, seed=None, grader=grader)
            sums["greedy"] += sum(group[0].correct for group in greedy_groups)
        for group in groups:
            correct = sum(sample.correct for sample in group)
            sums["pass1"] += pass_at_k(num_samples, correct, 1)
            sums["passk"] += pass_at_k(num_samples, correct, num_samples)
            sums["problems"] += 1
    total = common.all_sum(sums, device)
    n = total["problems"]
    rates = {"pass1": total["pass1"] / n, f"pass{num_samples}": total["passk"] / n}
    if greedy:
        rates["greedy_pass1"] = total["greedy"] / n
    return rates
