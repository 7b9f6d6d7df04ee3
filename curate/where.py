"""The ``--where`` expression language: a small allowlist that builds polars expressions.

User text is parsed with :func:`ast.parse` (parsing only: nothing is compiled
or evaluated) and the tree is walked by :func:`build`, which constructs the
polars expression itself from an allowlist. Anything not listed below is
refused with one sentence, so no user text can reach ``eval``, attribute
lookup, pickled callbacks (``Expr.deserialize``) or I/O.

Grammar (Python syntax, polars semantics)::

    expr     := expr OR expr | expr AND expr | NOT expr | comparison
    OR/AND/NOT := | & ~  (or the words or, and, not)
    comparison := arith (CMP arith)*       CMP: == != < <= > >= ; chains mean "and"
                | arith [not] in [literal, ...]
                | arith is [not] None
    arith    := arith (+ - * / // %) arith | -arith | arith ** NUMBER (|NUMBER| <= 64)
              | column | literal | method call | ( expr )
    column   := name | pl.col('name')
    literal  := number | 'string' | True | False | None | pl.lit(literal)
    method   := column-expression . METHOD(literal args)

Methods: is_null, is_not_null, is_nan, is_not_nan, is_finite, abs, sqrt, exp,
log([base]), log1p, fill_null(v), fill_nan(v), is_in([...]), is_between(lo,
hi[, closed=...]) (alias between), and on strings str.contains(text) (a
literal match; regex only with literal=False and a pattern of at most
:data:`MAX_REGEX` characters), str.starts_with, str.ends_with,
str.len_chars(), str.to_lowercase().

Cost is bounded before any polars object exists: at most
:data:`MAX_LENGTH` characters, :data:`MAX_NODES` syntax nodes and
:data:`MAX_DEPTH` levels of nesting; literals are never combined in Python
(``9**9**9`` is refused: an exponent must be a small number).
"""

from __future__ import annotations

import ast
import math
from typing import Any, Callable

import polars as pl

from curate.errors import CurateError

MAX_LENGTH = 2000
MAX_NODES = 400
MAX_DEPTH = 40
MAX_REGEX = 100
MAX_EXPONENT = 64
MAX_LIST = 1000
MAX_INT = 2**63 - 1
EXAMPLE = "e.g. \"pl.col('rm_margin_std') > 2\" or \"(flip_prob > 0.6) & (rm_vote_share < 0.3)\""

_COMPARE: dict[type, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}
_ARITH: dict[type, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b,
}
# method name -> (number of positional literal arguments allowed (min, max), allowed keywords)
_METHODS: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {
    "is_null": ((0, 0), ()), "is_not_null": ((0, 0), ()), "is_nan": ((0, 0), ()), "is_not_nan": ((0, 0), ()),
    "is_finite": ((0, 0), ()), "abs": ((0, 0), ()), "sqrt": ((0, 0), ()), "exp": ((0, 0), ()),
    "log": ((0, 1), ()), "log1p": ((0, 0), ()), "fill_null": ((1, 1), ()), "fill_nan": ((1, 1), ()),
    "is_in": ((1, 1), ()), "is_between": ((2, 2), ("closed",)), "between": ((2, 2), ("closed",)),
}
_STR_METHODS: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {
    "contains": ((1, 1), ("literal",)), "starts_with": ((1, 1), ()), "ends_with": ((1, 1), ()),
    "len_chars": ((0, 0), ()), "to_lowercase": ((0, 0), ()),
}
_CLOSED = ("both", "left", "right", "none")


def _show(text: str) -> str:
    """The expression as quoted in an error: shortened, so a huge input gives a short sentence."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _Refused(Exception):
    """Raised inside the walk; turned into one CurateError naming the expression."""


def _check_size(tree: ast.AST) -> None:
    """Refuse trees with too many nodes or too deep a nesting (iteratively: no recursion here)."""
    stack = [(tree, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise _Refused(f"it has more than {MAX_NODES} parts; split it into several --where rules")
        if depth > MAX_DEPTH:
            raise _Refused(f"it nests deeper than {MAX_DEPTH} levels; simplify it")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _parse(text: str) -> ast.expr:
    if not isinstance(text, str) or not text.strip():
        raise CurateError(f"--where needs an expression, {EXAMPLE}")
    if len(text) > MAX_LENGTH:
        raise CurateError(f"--where expression is {len(text)} characters, over the limit of {MAX_LENGTH}: split it into several --where rules")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise CurateError(f"--where {_show(text)} is not a valid expression ({reason}); {EXAMPLE}") from None
    try:
        _check_size(tree)
    except _Refused as exc:
        raise CurateError(f"--where {_show(text)} is refused: {exc}") from None
    return tree.body


# ----------------------------------------------------------------- literals
def _literal(node: ast.AST) -> Any:
    """A Python value from a literal node: number, string, bool, None, negative number, or pl.lit(...)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                raise _Refused(f"the integer {str(value)[:20]}... is too large")
            return value
        if isinstance(value, float):
            return value
        raise _Refused(f"{type(value).__name__} literals are not allowed")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refused("a sign applies to numbers only")
        return -value if isinstance(node.op, ast.USub) else value
    if _is_pl_call(node, "lit"):
        (arg,) = _plain_args(node, 1, 1)
        return _literal(arg)
    raise _Refused(f"expected a literal (number, 'text', True, False, None), found {_describe(node)}")


def _literal_list(node: ast.AST) -> list[Any]:
    if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        raise _Refused(f"is_in / in needs a list of literals such as [1, 2], found {_describe(node)}")
    if len(node.elts) > MAX_LIST:
        raise _Refused(f"a list of more than {MAX_LIST} values")
    return [_literal(e) for e in node.elts]


# ----------------------------------------------------------------- helpers
def _describe(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # unparse of odd trees: describe by node type
        text = type(node).__name__
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _is_pl_call(node: ast.AST, name: str) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "pl"
    )


def _plain_args(call: ast.Call, low: int, high: int, keywords: tuple[str, ...] = ()) -> list[ast.expr]:
    name = ast.unparse(call.func) if isinstance(call.func, ast.Attribute) else "call"
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise _Refused(f"{name}: * and ** arguments are not allowed")
    if not low <= len(call.args) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise _Refused(f"{name} takes {want} argument{'s' if high != 1 else ''}, got {len(call.args)}")
    for kw in call.keywords:
        if kw.arg not in keywords:
            raise _Refused(f"{name} does not take the keyword {kw.arg!r}")
    return list(call.args)


def _keyword(call: ast.Call, name: str, default: Any) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return _literal(kw.value)
    return default


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Refused(f"{what} must be a finite number")
    return value


# ----------------------------------------------------------------- the walk
class _Builder:
    def __init__(self) -> None:
        self.columns: list[str] = []

    def column(self, name: Any) -> pl.Expr:
        if not isinstance(name, str) or not name:
            raise _Refused("pl.col takes one column name in quotes, e.g. pl.col('flip_prob')")
        if name not in self.columns:
            self.columns.append(name)
        return pl.col(name)

    def build(self, node: ast.AST) -> pl.Expr:
        if isinstance(node, ast.Name):
            if node.id == "pl":
                raise _Refused("pl alone is not an expression: use pl.col('name')")
            return self.column(node.id)
        if isinstance(node, ast.Constant) or _is_pl_call(node, "lit"):
            return pl.lit(_literal(node))
        if isinstance(node, ast.BoolOp):
            parts = [self.build(v) for v in node.values]
            out = parts[0]
            for part in parts[1:]:
                out = (out & part) if isinstance(node.op, ast.And) else (out | part)
            return out
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.Not, ast.Invert)):
                return ~self.build(node.operand)
            if isinstance(node.op, ast.USub):
                return -self.build(node.operand)
            return self.build(node.operand)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                exponent = _number(_literal(node.right), "an exponent (after **)")
                if abs(exponent) > MAX_EXPONENT:
                    raise _Refused(f"an exponent must be at most {MAX_EXPONENT} in size, got {exponent}")
                return self.build(node.left).pow(exponent)
            op = _ARITH.get(type(node.op))
            if op is None:
                raise _Refused(f"the operator {type(node.op).__name__} is not allowed")
            return op(self.build(node.left), self.build(node.right))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise _Refused(f"{_describe(node)} ({type(node).__name__}) is not allowed")

    def compare(self, node: ast.Compare) -> pl.Expr:
        out: pl.Expr | None = None
        left_node = node.left
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                part = self.build(left_node).is_in(_literal_list(right_node))
                part = ~part if isinstance(op, ast.NotIn) else part
            elif isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                    raise _Refused("'is' compares with None only: write x is None or x is not None")
                part = self.build(left_node).is_null() if isinstance(op, ast.Is) else self.build(left_node).is_not_null()
            else:
                part = _COMPARE[type(op)](self.build(left_node), self.build(right_node))
            out = part if out is None else out & part
            left_node = right_node
        return out

    def call(self, node: ast.Call) -> pl.Expr:
        func = node.func
        if _is_pl_call(node, "col"):
            (arg,) = _plain_args(node, 1, 1)
            return self.column(_literal(arg))
        if not isinstance(func, ast.Attribute):
            raise _Refused(f"{_describe(func)}(...) is not allowed; only methods such as .is_null() and .abs()")
        target = func.value
        if isinstance(target, ast.Attribute) and target.attr == "str":
            table, name, receiver = _STR_METHODS, f"str.{func.attr}", target.value
        elif isinstance(target, ast.Name) and target.id == "pl":
            raise _Refused(f"pl.{func.attr} is not allowed: use pl.col('name') and pl.lit(value)")
        else:
            table, name, receiver = _METHODS, func.attr, target
        if func.attr not in table:
            allowed = ", ".join(sorted(_METHODS)) + ", " + ", ".join(f"str.{m}" for m in sorted(_STR_METHODS))
            raise _Refused(f"the method {name} is not allowed; the allowed methods are {allowed}")
        (low, high), keywords = table[func.attr]
        args = _plain_args(node, low, high, keywords)
        base = self.build(receiver)
        return self.method(base, name, args, node)

    def method(self, base: pl.Expr, name: str, args: list[ast.expr], node: ast.Call) -> pl.Expr:
        if name == "is_in":
            return base.is_in(_literal_list(args[0]))
        if name in ("is_between", "between"):
            closed = _keyword(node, "closed", "both")
            if closed not in _CLOSED:
                raise _Refused(f"closed must be one of {', '.join(_CLOSED)}")
            low, high = (_number(_literal(a), f"{name}'s bounds") for a in args)
            return base.is_between(low, high, closed=closed)
        if name == "log":
            return base.log(_number(_literal(args[0]), "log's base") if args else math.e)
        if name in ("fill_null", "fill_nan"):
            return getattr(base, name)(pl.lit(_literal(args[0])))
        if name.startswith("str."):
            return self.string_method(base, name[4:], args, node)
        return getattr(base, name)()  # the no-argument methods of _METHODS

    def string_method(self, base: pl.Expr, name: str, args: list[ast.expr], node: ast.Call) -> pl.Expr:
        if not args:
            return getattr(base.str, name)()
        text = _literal(args[0])
        if not isinstance(text, str):
            raise _Refused(f"str.{name} takes a text in quotes")
        if name != "contains":
            return getattr(base.str, name)(text)
        literal = _keyword(node, "literal", True)
        if not isinstance(literal, bool):
            raise _Refused("str.contains's literal must be True or False")
        if not literal and len(text) > MAX_REGEX:
            raise _Refused(f"a regex pattern may be at most {MAX_REGEX} characters")
        return base.str.contains(text, literal=literal)


def parse(text: str) -> tuple[pl.Expr, list[str]]:
    """(the polars expression, the columns it reads) for a ``--where`` text; CurateError if refused."""
    tree = _parse(text)
    builder = _Builder()
    try:
        expr = builder.build(tree)
    except _Refused as exc:
        raise CurateError(f"--where {_show(text)} is refused: {exc}") from None
    except (ValueError, TypeError, OverflowError, pl.exceptions.PolarsError) as exc:
        raise CurateError(f"--where {_show(text)} could not be built ({exc}); {EXAMPLE}") from None
    if not builder.columns:
        raise CurateError(f"--where {_show(text)} reads no column, so it is the same for every pair; {EXAMPLE}")
    return expr, builder.columns


def columns(text: str) -> list[str]:
    """The columns a ``--where`` text reads (validates it too)."""
    return parse(text)[1]
