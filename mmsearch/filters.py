"""`--where` filters: parsed here, executed in the store as bound parameters (never string-built SQL)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import QueryError

OPERATORS = ("<=", ">=", "!=", "=", "<", ">", "~")
_PATTERN = re.compile(r"^\s*([^<>=!~]+?)\s*(<=|>=|!=|=|<|>|~)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Condition:
    field: str
    op: str  # one of OPERATORS; '~' is a case-insensitive substring match
    value: str | int | float

    def to_str(self) -> str:
        return f"{self.field}{self.op}{self.value}"


def parse_condition(text: str) -> Condition:
    match = _PATTERN.match(text or "")
    if not match:
        raise QueryError(f"bad filter {text!r}: use FIELD=VALUE, FIELD<N, >, <=, >=, != or FIELD~TEXT")
    field, op, raw = match.groups()
    if op in ("<", ">", "<=", ">="):
        value = _number(raw)
        if value is None:
            raise QueryError(f"bad filter {text!r}: {op} needs a number, got {raw!r}")
        return Condition(field, op, value)
    if op == "~":
        return Condition(field, op, raw)
    number = _number(raw)
    return Condition(field, op, raw if number is None else number)


def parse_conditions(texts) -> list[Condition]:
    return [c if isinstance(c, Condition) else parse_condition(c) for c in texts or ()]


def _number(raw: str) -> int | float | None:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return None
