"""Grading math answers without ever evaluating model text as code.

`grade_boxed(text, truth)` takes the last `\\boxed{...}` of the response and compares it with the
ground truth: by normalised string, then numerically (LaTeX like `\\frac{2\\sqrt{2}}{5}`, `5\\sqrt{3}`,
`3\\pi`, `60^\\circ` is parsed into a tiny arithmetic tree -- numbers, + - * / ^, sqrt, pi -- and
evaluated by our own walker, never by eval). Numeric grading runs in a helper process under a time
limit: whatever the input, a grade comes back in bounded time (a timeout grades as incorrect).
"""

from __future__ import annotations

import ast
import math
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

MAX_ANSWER_CHARS = 200  # longer boxed answers are not parsed numerically (malformed)


@dataclass
class Grade:
    correct: bool
    format_ok: bool  # a \boxed{} answer was found
    reason: str  # exact | numeric | mismatch | no_boxed | unparsed | timeout
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


_UNITS = re.compile(r"(\^\s*\{?\s*\\circ\s*\}?|°|\\degree|degrees?|units?|cm|mm|m\b|ft|in\b)")


def normalize(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
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


def _numeric_equal(answer: str, truth: str) -> str:
    try:
        a, t = to_number(answer), to_number(truth)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, TypeError):
        return "unparsed"
    return "numeric" if math.isclose(a, t, rel_tol=1e-4, abs_tol=1e-6) else "mismatch"


_POOL: ProcessPoolExecutor | None = None


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        from .parallel import mp_context

        _POOL = ProcessPoolExecutor(max_workers=1, mp_context=mp_context())
    return _POOL


def _kill_pool() -> None:
    global _POOL
    if _POOL is not None:
        for p in list(getattr(_POOL, "_processes", {}).values()):
            p.kill()
        _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = None


def numeric_equal(answer: str, truth: str, timeout_s: float = 2.0) -> str:
    """'numeric' | 'mismatch' | 'unparsed' | 'timeout', computed in a helper process under a time limit."""
    future = _pool().submit(_numeric_equal, answer, truth)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        _kill_pool()  # the helper may be stuck in C code: kill it, the next call starts a fresh one
        return "timeout"


def grade_boxed(text: str, truth: str, timeout_s: float = 2.0) -> Grade:
    answer = last_boxed(text)
    if answer is None:
        return Grade(False, False, "no_boxed")
    if normalize(answer) == normalize(truth):
        return Grade(True, True, "exact", answer)
    if len(answer) > MAX_ANSWER_CHARS:
        return Grade(False, True, "unparsed", answer[:MAX_ANSWER_CHARS])
    reason = numeric_equal(answer, truth, timeout_s)
    return Grade(reason == "numeric", True, reason, answer)
