"""Filter expressions over items: parsed into a tree (never evaluated as code), then applied
to a table of every live item to give the ids a search, count or scroll may return.

Grammar (keywords are case-insensitive)::

    expr  := term ("or" term)*
    term  := unary ("and" unary)*
    unary := "not" unary | "(" expr ")" | test
    test  := FIELD OP value | FIELD "in" "(" value ("," value)* ")"
           | FIELD "prefix" STRING | FIELD "exists"
    FIELD := label | split | key | added | meta.NAME
    OP    := == | != | < | <= | > | >=
    value := "string" | 'string' | number | true | false

`added` compares with a number (unix seconds) or an ISO date string ("2026-12-01",
"2026-12-01T10:00:00Z"). A test on a field an item lacks (no label, no such metadata
field) is false, `!=` included; `not (label == "cat")` also matches unlabelled items.
Values of different kinds never compare equal or ordered (3 is not "3").
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, shown

MAX_FILTER_CHARS = 4096
MAX_DEPTH = 32
FIELDS = ("label", "split", "key", "added")

Value = str | float | bool

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op>==|!=|<=|>=|<|>|\(|\)|,)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)*)
    )""",
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Token:
    kind: str  # num, str, op, word, end
    text: str
    pos: int  # 1-based character position in the filter


# ---- the tree --------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One comparison of a field with constants."""

    field: str  # label, split, key, added or meta.NAME
    op: str  # == != < <= > >= in prefix exists
    values: tuple[Value, ...] = ()


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class All:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Any_:
    children: tuple[Node, ...]


Node = Test | Not | All | Any_


# ---- parsing ---------------------------------------------------------------------------


def tokens(text: str) -> list[Token]:
    out: list[Token] = []
    i = 0
    while i < len(text):
        if text[i:].strip() == "":
            break
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            j = i + len(text[i:]) - len(text[i:].lstrip())
            raise InvalidInput(f"filter: unexpected {shown(text[j])} at position {j + 1}")
        kind = m.lastgroup or "op"
        start = m.start(kind)
        out.append(Token(kind, m.group(kind), start + 1))
        i = m.end()
    out.append(Token("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self) -> Token:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, want: str, t: Token | None = None) -> InvalidInput:
        t = t or self.peek()
        got = "the end" if t.kind == "end" else shown(t.text)
        return InvalidInput(f"filter: expected {want} at position {t.pos}, got {got}")

    def word(self, *names: str) -> bool:
        t = self.peek()
        if t.kind == "word" and t.text.lower() in names:
            self.i += 1
            return True
        return False

    def expect_op(self, text: str) -> None:
        if self.peek().kind != "op" or self.peek().text != text:
            raise self.fail(repr(text))
        self.i += 1

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"at most {MAX_DEPTH} nested parts")
        parts = [self.term()]
        while self.word("or"):
            parts.append(self.term())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else Any_(tuple(parts))

    def term(self) -> Node:
        parts = [self.unary()]
        while self.word("and"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def unary(self) -> Node:
        if self.word("not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"at most {MAX_DEPTH} nested parts")
            child = self.unary()
            self.depth -= 1
            return Not(child)
        t = self.peek()
        if t.kind == "op" and t.text == "(":
            self.i += 1
            node = self.expr()
            self.expect_op(")")
            return node
        return self.test()

    def test(self) -> Node:
        t = self.take()
        name = t.text.lower() if t.kind == "word" else ""
        if t.kind != "word" or not (name in FIELDS or name.startswith("meta.")):
            raise self.fail("a field (label, split, key, added or meta.NAME)", t)
        field = name if name in FIELDS else "meta." + t.text[5:]
        if self.word("exists"):
            return Test(field, "exists")
        if self.word("prefix"):
            v = self.take()
            if v.kind != "str":
                raise self.fail("a quoted string after 'prefix'", v)
            return Test(field, "prefix", (self.literal(field, v),))
        if self.word("in"):
            self.expect_op("(")
            values = [self.value(field)]
            while self.peek().kind == "op" and self.peek().text == ",":
                self.i += 1
                values.append(self.value(field))
            self.expect_op(")")
            return Test(field, "in", tuple(values))
        op = self.peek()
        if op.kind != "op" or op.text not in _COMPARE:
            raise self.fail("an operator (==, !=, <, <=, >, >=, in, prefix, exists)")
        self.i += 1
        return Test(field, op.text, (self.value(field),))

    def value(self, field: str) -> Value:
        return self.literal(field, self.take())

    def literal(self, field: str, t: Token) -> Value:
        if t.kind == "num":
            return float(t.text)
        if t.kind == "str":
            text = _ESCAPE.sub(r"\1", t.text[1:-1])
            return _parse_time(text, t) if field == "added" else text
        if t.kind == "word" and t.text.lower() in ("true", "false"):
            return t.text.lower() == "true"
        raise self.fail("a value (a quoted string, a number, true or false)", t)


def _parse_time(text: str, t: Token) -> float:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"filter: {shown(text)} at position {t.pos} is not a date (use e.g. 2026-12-01 "
            "or 2026-12-01T10:00:00Z, or unix seconds)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse(text: str) -> Node | None:
    """The tree of a filter string; None for an empty one. InvalidInput names the position."""
    if not isinstance(text, str):
        raise InvalidInput(f"filter must be a string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidInput(f"filter is {len(text)} characters; at most {MAX_FILTER_CHARS}")
    if not text.strip():
        return None
    p = _Parser(text)
    node = p.expr()
    if p.peek().kind != "end":
        raise p.fail("'and', 'or' or the end")
    return node


# ---- applying it -----------------------------------------------------------------------

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    return "str" if isinstance(v, str) else "none"


def _predicate(test: Test) -> Callable[[Any], bool]:
    """A test on one value (None = the item lacks the field)."""
    if test.op == "exists":
        return lambda v: v is not None
    if test.op == "prefix":
        pre = str(test.values[0])
        return lambda v: isinstance(v, str) and v.startswith(pre)
    if test.op == "in":
        wanted = {(_kind(x), x) for x in test.values}
        return lambda v: v is not None and (_kind(v), v) in wanted
    cmp, want = _COMPARE[test.op], test.values[0]
    kind = _kind(want)
    ordered = test.op not in ("==", "!=")

    def pred(v: Any) -> bool:
        if v is None or _kind(v) != kind or (ordered and kind == "bool"):
            return False
        return bool(cmp(v, want))

    return pred


class Table:
    """The columns filters test, one row per live item in id order."""

    def __init__(
        self,
        ids: np.ndarray,
        labels: Sequence[str | None],
        splits: Sequence[str],
        keys: Sequence[str],
        meta: Sequence[dict[str, Any]],
        generation: int,
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.generation = generation
        self._columns: dict[str, Sequence[Any]] = {
            "label": labels, "split": splits, "key": keys,
        }
        self.meta = meta

    @classmethod
    def of_store(cls, store: Any) -> Table:
        gen = int(store.generation)
        items = store.item_table()
        return cls(items.ids, items.labels, items.splits, items.keys, items.meta, gen)

    def column(self, field: str) -> list[Any]:
        if field in self._columns:
            return list(self._columns[field])
        name = "added" if field == "added" else field[5:]
        return [m.get(name) for m in self.meta]

    def mask(self, node: Node) -> np.ndarray:
        """Which rows pass `node`."""
        if isinstance(node, Not):
            return ~self.mask(node.child)
        if isinstance(node, All):
            out = self.mask(node.children[0])
            for c in node.children[1:]:
                out &= self.mask(c)
            return out
        if isinstance(node, Any_):
            out = self.mask(node.children[0])
            for c in node.children[1:]:
                out |= self.mask(c)
            return out
        values = self.column(node.field)
        pred = _predicate(node)
        if node.field in self._columns and node.field != "key":  # few distinct values
            seen = {v: pred(v) for v in set(values)}
            return np.fromiter((seen[v] for v in values), bool, len(values))
        return np.fromiter((pred(v) for v in values), bool, len(values))

    def matching(self, node: Node | None) -> np.ndarray:
        """Sorted ids of the rows that pass (every row when `node` is None)."""
        return self.ids if node is None else self.ids[self.mask(node)]


# ---- planning a filtered search ------------------------------------------------------------
# Measured by benchmarks/filter_bench.py (200k x 128, HNSW32): an IVF over the matching items
# alone (index/subset.py) answers a 50 % filter at 0.55-0.85x the unfiltered graph's rate,
# correlated or not, where unfiltered candidates deep enough to hold k passing ones cost
# 1.7-2.3x the unfiltered search; only a filter passing nearly everything is cheaper to serve
# from candidates.

EXACT_MAX = 5_000  # matching sets this small are scanned exactly
PROBE_MIN_FRACTION = 0.8  # from here, unfiltered candidates find k passing ones cheaply
SUBSET_MAX_BYTES = 1 << 30  # largest copy of matching vectors a subset index may hold
PROBE_MAX = 1024  # most candidates an unfiltered probe fetches


def probe_k(k: int, fraction: float) -> int:
    """Candidates to fetch unfiltered so that k of them pass a filter of this selectivity
    (about twice the expected need), or 0 when the filter is too tight for that to pay."""
    want = int(np.ceil(2.0 * k / max(fraction, 1e-9))) + k
    return want if fraction >= PROBE_MIN_FRACTION and want <= PROBE_MAX else 0


def first_passing(
    ids: np.ndarray, dist: np.ndarray, allowed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's first k candidates that pass, and which rows found k of them."""
    ok = np.isin(ids, allowed) & (ids >= 0)
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_dist = np.take_along_axis(dist, order, 1)
    passed = np.take_along_axis(ok, order, 1)
    out_ids = np.where(passed, out_ids, -1)
    return out_ids, out_dist, np.asarray(passed.all(axis=1))
