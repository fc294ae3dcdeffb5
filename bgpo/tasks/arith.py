"""Safe exact arithmetic for Countdown answers (docs/methods.md §6: "never `eval` arbitrary text").

A tokenizer and a recursive-descent parser over integer literals, ``+ - * /``, parentheses and
unary minus; nothing else is accepted (no ``**``, no decimals, no names). Values are exact
``fractions.Fraction``. Hostile input is rejected with ``ArithError`` before it can cost time or
memory:

- more than ``MAX_CHARS`` characters, or more than ``MAX_DEPTH`` nested parentheses / unary minus;
- any literal or intermediate result with ``|x| > MAX_ABS`` or a denominator above ``MAX_ABS``;
- division by zero; any character outside ``[0-9+-*/() ]``; trailing or missing tokens.

Grammar::

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := NUMBER | '(' expr ')' | '-' factor
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200  # longer answers are rejected unread
MAX_DEPTH = 32  # nesting of parentheses and unary minus
MAX_ABS = 10**12  # cap on |literal|, |intermediate value| and denominators
ALLOWED_CHARS = frozenset("0123456789+-*/() ")


class ArithError(ValueError):
    """The text is not an acceptable expression (syntax, size, depth, magnitude or x/0)."""


@dataclass(frozen=True)
class Evaluation:
    value: Fraction  # exact value of the expression
    numbers: list[int]  # integer literals in order of appearance


def tokenize(text: str) -> list[str]:
    """Split into integer literals and single-character operators; spaces are dropped."""
    if len(text) > MAX_CHARS:
        raise ArithError(f"expression longer than {MAX_CHARS} characters")
    bad = set(text) - ALLOWED_CHARS
    if bad:
        raise ArithError(f"characters outside [0-9+-*/() ]: {sorted(bad)!r}")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch == " ":
            i += 1
        else:
            tokens.append(ch)
            i += 1
    return tokens


def _checked(x: Fraction) -> Fraction:
    if abs(x) > MAX_ABS or x.denominator > MAX_ABS:
        raise ArithError(f"intermediate value out of range (cap {MAX_ABS:.0e})")
    return x


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ArithError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _checked(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = _checked(value * rhs)
            else:
                if rhs == 0:
                    raise ArithError("division by zero")
                value = _checked(value / rhs)
        return value

    def factor(self) -> Fraction:
        tok = self.take()
        if tok.isdigit():
            n = int(tok) if len(tok) <= 13 else MAX_ABS + 1  # no huge int parsing
            if n > MAX_ABS:
                raise ArithError(f"literal out of range (cap {MAX_ABS:.0e})")
            self.numbers.append(n)
            return Fraction(n)
        if tok in ("(", "-"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ArithError(f"nesting deeper than {MAX_DEPTH}")
            if tok == "(":
                value = self.expr()
                if self.take() != ")":
                    raise ArithError("expected ')'")
            else:
                value = -self.factor()
            self.depth -= 1
            return value
        raise ArithError(f"unexpected token {tok!r}")


def evaluate(text: str) -> Evaluation:
    """Exact value and literals of ``text``; raises ``ArithError`` on anything unacceptable."""
    tokens = tokenize(text)
    if not tokens:
        raise ArithError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise ArithError(f"unexpected token {tokens[parser.pos]!r}")
    return Evaluation(value=value, numbers=parser.numbers)


def try_evaluate(text: str) -> Evaluation | None:
    """``evaluate`` that returns None instead of raising."""
    try:
        return evaluate(text)
    except ArithError:
        return None
