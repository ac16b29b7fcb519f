"""Answer extraction: the final number of a GSM8K-style answer.

A reference ends with `#### <number>`; a model's answer is read, in this order, from
1. the last `#### <number>`,
2. the last `\\boxed{<number>}`,
3. the last "answer is <number>" / "answer: <number>" (case-insensitive, `$` and `**` allowed in between),
4. else the last number anywhere in the text.
Numbers are normalised before comparison: `$` and thousands separators removed, `18.0`/`18.00` -> `18`,
`0.50` -> `0.5`, `.5` -> `0.5`, a leading minus kept (`-3`), a trailing full stop dropped.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

# a number: "1,234.5" (proper thousands groups), "1234", "3.25", ".5", optionally negative and with "$"
_NUM = r"(?:(?<![\d.])-\s?)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(_NUM)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
_ANSWER_IS = re.compile(r"answer(?:\s+is|:)\s*[:=]?\s*(?:\*\*)?\s*(" + _NUM + ")", re.IGNORECASE)


def normalize_number(text: str) -> Optional[str]:
    """Canonical text of a number ("$1,000.50" -> "1000.5", "18.0" -> "18", "-3" -> "-3"); None if not a number."""
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    cleaned = cleaned.replace("\u2212", "-")  # unicode minus
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last(pattern: re.Pattern, text: str) -> Optional[str]:
    matches = pattern.findall(text)
    return matches[-1] if matches else None


def extract_number(text: str) -> Optional[str]:
    """The final numeric answer in `text`, normalised (see the module docstring), or None when there is none."""
    text = text.replace("\u2212", "-")
    for pattern in (_HASHES, _BOXED, _ANSWER_IS, _NUMBER):
        found = _last(pattern, text)
        if found is not None:
            return normalize_number(found)
    return None


EXTRACTORS = {"number": extract_number}


def extract(kind: Optional[str], text: str) -> Optional[str]:
    """Apply the task's `extract` rule (`none`/None: the text itself, stripped)."""
    if kind in (None, "none"):
        return text.strip()
    return EXTRACTORS[kind](text)
