"""Grading math answers without ever evaluating model text as code.

`grade_boxed(text, truth)` takes the last `\\boxed{...}` of the response and compares it with the
ground truth: by normalised string, then numerically (LaTeX like `\\frac{2\\sqrt{2}}{5}`, `5\\sqrt{3}`,
`3\\pi`, `60^\\circ` is parsed into a tiny arithmetic tree -- numbers, + - * / ^, sqrt, pi -- and
evaluated by our own walker, never by eval). The work is bounded by construction, in the caller's own
process: answers over MAX_ANSWER_CHARS are not parsed, every regex is linear, powers are floats (a huge
one raises OverflowError at once) and nesting is capped by the parser. So `grade_boxed` can run in any
reward function: a script without a `__main__` guard, a multiprocessing worker, a thread.

Forms real models write are accepted: an assignment (`x = 5`, `m \\angle B = 60`, `AB \\approx 7.2`: the
value after the last `=` or `\\approx`), units (`5 \\text{ cm}`, `\\mathrm{cm}^2`, `square units`), and a
ground truth rounded to 1-2 decimals, as Geometry3K gives many: an answer equal to it at the truth's
precision is correct (`2\\sqrt{13}` = 7.2111 for 7.21). An empty ground truth never grades correct.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

MAX_ANSWER_CHARS = 200  # longer boxed answers are not parsed numerically (malformed)


@dataclass
class Grade:
    correct: bool
    format_ok: bool  # a \boxed{} answer was found
    reason: str  # exact | numeric | rounded | mismatch | no_boxed | unparsed | no_truth | not_text
    answer: str | None = None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    text = text[-20000:]
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


_UNIT_WORDS = r"(square|sq\.?|cubic)?\s*(units?|cm|mm|km|m|meters?|metres?|ft|feet|foot|in|inch(es)?|yd|yards?|miles?)"
_UNITS = re.compile(r"(\^\s*\{?\s*\\circ\s*\}?|°|\\degree|degrees?|(?<![a-zA-Z\\])" + _UNIT_WORDS
                    + r"(?![a-zA-Z])(\s*\^\s*\{?\s*[23]\s*\}?)?)")


def _value_part(s: str) -> str:
    """The value of an assignment or approximation: what follows the last `=` or `\\approx`."""
    parts = re.split(r"=|\\approx|\\simeq|≈", s)
    return parts[-1] if len(parts) > 1 and parts[-1].strip() else s


def normalize(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(text|mathrm|textrm|mbox|operatorname)\s*\{([^{}]*)\}", r"\2", s)
    s = _value_part(s)
    s = re.sub(r"\\(left|right|displaystyle|!|,|;|quad)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _UNITS.sub("", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def latex_to_expr(s: str) -> str:
    """LaTeX arithmetic -> a Python-syntax expression string (only parsed by `safe_eval`, never run)."""
    s = normalize(s)
    if len(s) > MAX_ANSWER_CHARS:
        raise ValueError("answer too long")
    for _ in range(40):  # innermost first: \frac{a}{b} and \sqrt{a} with brace-free arguments
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\frac(\d)(\d)", r"((\1)/(\2))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        new = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", new)
        if new == s:  # only then plain groups {x} -> (x): they may be a \frac's arguments
            new = re.sub(r"\{([^{}]*)\}", r"(\1)", s)
        if new == s:
            break
        s = new
    s = s.replace("\\pi", "pi").replace("π", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("^", "**")
    # implicit multiplication: 2sqrt(3), 3pi, 2(x), )(, )sqrt
    s = re.sub(r"(\d|\))\s*(?=(sqrt|pi|\())", r"\1*", s)
    s = re.sub(r"(pi)\s*(?=(\d|sqrt|\())", r"\1*", s)
    return s


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}


def safe_eval(expr: str) -> float:
    """Evaluate numbers, + - * / **, sqrt(), pi. Anything else is a ValueError."""
    tree = ast.parse(expr, mode="eval")

    def ev(node) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "pi":
            return math.pi
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return math.pow(ev(node.left), ev(node.right))  # floats: overflow raises, no huge ints
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
                and len(node.args) == 1 and not node.keywords):
            return math.sqrt(ev(node.args[0]))
        raise ValueError(f"unsupported {type(node).__name__}")

    return ev(tree)


def to_number(s: str) -> float:
    return safe_eval(latex_to_expr(s))


def _decimals(truth: str) -> int | None:
    """Digits after the point of a plain decimal ground truth ("7.21" -> 2), else None."""
    m = re.fullmatch(r"-?\d+\.(\d+)", normalize(truth))
    return len(m.group(1)) if m else None


def numeric_equal(answer: str, truth: str) -> str:
    """'numeric' | 'rounded' | 'mismatch' | 'unparsed': the two as numbers (bounded work, no process)."""
    try:
        a, t = to_number(answer), to_number(truth)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, TypeError):
        return "unparsed"
    if math.isclose(a, t, rel_tol=1e-4, abs_tol=1e-6):
        return "numeric"
    d = _decimals(truth)
    if d is not None and d <= 2 and abs(a - t) <= 0.5 * 10 ** -d + 1e-9:  # the truth is `a` rounded
        return "rounded"
    return "mismatch"


def grade_boxed(text, truth) -> Grade:
    """Grade the last \\boxed{} of `text` against `truth` (a string or a number)."""
    if not isinstance(text, str):
        return Grade(False, False, "not_text")
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float)):
        return Grade(False, False, "no_truth")
    truth = truth if isinstance(truth, str) else repr(truth)
    answer = last_boxed(text)
    if answer is None:
        return Grade(False, False, "no_boxed")
    if not normalize(truth):  # an empty ground truth grades nothing correct
        return Grade(False, True, "no_truth", answer)
    if normalize(answer) == normalize(truth):
        return Grade(True, True, "exact", answer)
    if len(answer) > MAX_ANSWER_CHARS:
        return Grade(False, True, "unparsed", answer[:MAX_ANSWER_CHARS])
    reason = numeric_equal(answer, truth)
    return Grade(reason in ("numeric", "rounded"), True, reason, answer)


def grade_any(text, truths: list) -> Grade:
    """grade_boxed against each accepted answer: the first that grades correct, else the first's grade."""
    grades = [grade_boxed(text, t) for t in truths] or [grade_boxed(text, "")]
    return next((g for g in grades if g.correct), grades[0])
