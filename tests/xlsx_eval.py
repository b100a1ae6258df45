"""A small evaluator of the spreadsheet formulas the workbook writes, independent of it.

Supports numbers, text, cell and range references (optionally sheet-qualified),
+ - * / ^, comparisons, and IF, MIN, MAX, SUM.  Formulas are tokenised by
openpyxl's Tokenizer and turned into Python expressions; anything else is
refused, so a formula outside this subset fails the test instead of being
guessed at.
"""

from __future__ import annotations

import re
from typing import Any

from openpyxl.formula import Tokenizer
from openpyxl.formula.tokenizer import Token
from openpyxl.utils import column_index_from_string, get_column_letter

_CELL = re.compile(r"^\$?([A-Z]+)\$?(\d+)$")
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "^": "**", "=": "==", "<>": "!=",
        "<": "<", ">": ">", "<=": "<=", ">=": ">="}  # fmt: skip
_FUNCS = {"IF(": "_IF(", "MIN(": "_MIN(", "MAX(": "_MAX(", "SUM(": "_SUM("}


def _flat(args: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return [x for x in out if x is not None]


class Evaluator:
    def __init__(self, wb: Any) -> None:
        self.wb = wb
        self.overrides: dict[tuple[str, str], Any] = {}
        self.cache: dict[tuple[str, str], Any] = {}

    def set(self, sheet: str, cell: str, value: Any) -> None:
        self.overrides[(sheet, cell)] = value
        self.cache.clear()

    def value(self, sheet: str, cell: str) -> Any:
        key = (sheet, cell.replace("$", ""))
        if key in self.cache:
            return self.cache[key]
        v = self.overrides.get(key, self.wb[sheet][key[1]].value)
        if isinstance(v, str) and v.startswith("="):
            v = self._eval(sheet, v)
        self.cache[key] = v
        return v

    def _ref(self, sheet: str, text: str) -> Any:
        if "!" in text:
            sheet, text = text.rsplit("!", 1)
            sheet = sheet.strip("'")
        if ":" in text:
            a, b = text.split(":")
            (ca, ra), (cb, rb) = (_CELL.match(x).groups() for x in (a, b))  # type: ignore[union-attr]
            return [
                self.value(sheet, f"{get_column_letter(c)}{r}")
                for c in range(column_index_from_string(ca), column_index_from_string(cb) + 1)
                for r in range(int(ra), int(rb) + 1)
            ]
        if not _CELL.match(text):
            raise ValueError(f"not a cell reference: {text}")
        return self.value(sheet, text)

    def _eval(self, sheet: str, formula: str) -> Any:
        parts: list[str] = []
        for t in Tokenizer(formula).items:
            if t.type == Token.OPERAND and t.subtype == Token.RANGE:
                parts.append(f"_ref({t.value!r})")
            elif t.type == Token.OPERAND and t.subtype in (Token.NUMBER, Token.TEXT):
                parts.append(repr(float(t.value)) if t.subtype == Token.NUMBER else t.value)
            elif t.type == Token.FUNC and t.subtype == Token.OPEN:
                if t.value not in _FUNCS:
                    raise ValueError(f"function outside the subset: {t.value}")
                parts.append(_FUNCS[t.value])
            elif t.type in (Token.FUNC, Token.PAREN):
                parts.append(")" if t.subtype == Token.CLOSE else "(")
            elif t.type == Token.SEP and t.subtype == Token.ARG:
                parts.append(",")
            elif t.type in (Token.OP_IN, Token.OP_PRE):
                if t.value not in _OPS:
                    raise ValueError(f"operator outside the subset: {t.value}")
                parts.append(_OPS[t.value])
            elif t.type == Token.WSPACE:
                continue
            else:
                raise ValueError(f"token outside the subset: {t.type} {t.value!r}")
        env = {
            "_ref": lambda text: self._ref(sheet, text),
            "_IF": lambda c, a, b: a if c else b,
            "_MIN": lambda *a: min(_flat(a)),
            "_MAX": lambda *a: max(_flat(a)),
            "_SUM": lambda *a: sum(_flat(a)),
        }
        return eval(" ".join(parts), {"__builtins__": {}}, env)  # noqa: S307
