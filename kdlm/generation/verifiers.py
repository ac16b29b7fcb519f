"""Answer verifiers for chain-of-thought rejection sampling (`generate.verifier`).

The teacher writes k rationales per question; a rationale is kept when the answer it ends
with matches the gold answer (STaR, Zelikman et al. 2022; rejection-sampling fine-tuning,
Yuan et al. 2023). Without a gold answer, `majority_vote` gives a self-consistency
pseudo-label (Wang et al. 2023). A verifier has three parts:

    extract(text)       -> the final answer of a rationale, normalised (None: no answer found)
    gold(reference)     -> the normalised gold answer from a dataset's reference field
    match(pred, gold)   -> whether they agree (never when either is None)

Built-ins (`generate.verifier_options` in brackets):
- `gsm8k`: gold after the reference's `#### `; prediction by `kdlm.evaluation.answers.extract_number`;
- `boxed`: the last balanced `\\boxed{...}` (nested braces allowed); numbers normalised;
- `exact` [case_sensitive=False]: the text after the last "answer is"/"Answer:", else the whole text;
- `regex` [pattern, required]: group 1 (else the whole match) of the pattern's last match;
- `choice` [letters="ABCDE"]: a multiple-choice letter; gold is a letter or a 0-based index.

Configs name verifiers; they never import code. To add one, register it from Python
before running kdlm from that same process (e.g. a script that then calls `kdlm.cli.main`):

    from kdlm.generation.verifiers import Verifier, register_verifier

    @register_verifier("last_word")
    class LastWord(Verifier):
        def extract(self, text):
            words = text.split()
            return words[-1].strip(".").lower() if words else None

and name it in the recipe: `generate: {verifier: last_word}`. Keyword arguments of the
class's `__init__` are its options. Registering a name twice is a ValueError.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections import Counter
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

from kdlm.errors import ConfigError
from kdlm.generation.registry import look_up, register_into
from kdlm.evaluation.answers import extract_number, normalize_number

__all__ = [
    "VERIFIERS",
    "Verifier",
    "get_verifier",
    "last_boxed",
    "majority_vote",
    "register_verifier",
]


class Verifier:
    """Base class: `extract` a rationale's final answer, read the `gold` answer, `match` the two.

    Both `extract` and `gold` return normalised strings so that `match` can be plain equality.
    The default `gold` normalises the reference with `extract`, which suits verifiers whose
    reference looks like an answer.
    """

    def extract(self, text: str) -> Optional[str]:
        """The final answer of a rationale, normalised; None when it has none."""
        raise NotImplementedError

    def gold(self, reference: str) -> Optional[str]:
        """The normalised gold answer from a dataset's reference field; None when there is none."""
        return self.extract(str(reference))

    def match(self, pred: Optional[str], gold: Optional[str]) -> bool:
        """True when both answers exist and are equal (a missing answer never matches)."""
        return pred is not None and gold is not None and pred == gold

    def verify(self, text: str, reference: str) -> bool:
        """`match(extract(text), gold(reference))`: does the rationale reach the reference's answer?"""
        return self.match(self.extract(text), self.gold(reference))


# A factory is a Verifier subclass (or any callable) taking the options as keywords.
VerifierFactory = Callable[..., Verifier]

_REGISTRY: dict[str, VerifierFactory] = {}
VERIFIERS: Mapping[str, VerifierFactory] = MappingProxyType(_REGISTRY)  # read-only view: names -> factories


def register_verifier(name: str) -> Callable[[VerifierFactory], VerifierFactory]:
    """Decorator: register a Verifier class (or factory) as `name`; a name already taken is a ValueError."""
    return register_into(_REGISTRY, "verifier", name)


def get_verifier(name: str, **options: object) -> Verifier:
    """A new verifier `name` built with `options` (ConfigError naming the nearest valid name or option)."""
    factory = look_up(_REGISTRY, "verifier", "generate.verifier", name)
    accepted = _keyword_names(factory)
    if accepted is not None:
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.0)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                valid = ", ".join(sorted(accepted)) or "none"
                raise ConfigError(
                    f"generate.verifier_options.{key}: verifier {name!r} has no option {key!r}{hint} (valid: {valid})"
                )
    return factory(**options)


def _keyword_names(factory: VerifierFactory) -> Optional[set[str]]:
    """The keyword options a factory accepts; None when it takes **kwargs (anything goes)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# ----------------------------------------------------------------------------- normalisation


def _collapse(text: str) -> str:
    """Strip and collapse runs of whitespace to one space."""
    return " ".join(text.split())


def _answer_like(text: str) -> str:
    """Whitespace-collapsed text, as a canonical number when it parses as one ("1,000.0" -> "1000")."""
    collapsed = _collapse(text)
    number = normalize_number(collapsed)
    return number if number is not None else collapsed


def last_boxed(text: str) -> Optional[str]:
    """The content of the last complete `\\boxed{...}` in `text`, braces balanced (`\\boxed{\\frac{1}{2}}`)."""
    found: Optional[str] = None
    for start in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, start.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:  # an unclosed box (a truncated rationale) is no answer
            found = text[start.end() : i - 1]
    return found


# ----------------------------------------------------------------------------- the built-in verifiers


@register_verifier("gsm8k")
class Gsm8kVerifier(Verifier):
    """GSM8K: the gold is the number after `#### ` (the reference ends with `#### 72`); the prediction is
    `extract_number` of the rationale (`#### n`, `\\boxed{n}`, "the answer is n", else the last number)."""

    _GOLD = re.compile(r"####\s*([^\n]+)")

    def extract(self, text: str) -> Optional[str]:
        return extract_number(text)

    def gold(self, reference: str) -> Optional[str]:
        found = self._GOLD.findall(str(reference))
        # a reference that is already a bare number (some GSM8K copies keep only the answer) is its own gold
        return normalize_number(found[-1] if found else str(reference))


@register_verifier("boxed")
class BoxedVerifier(Verifier):
    """MATH-style: the content of the last `\\boxed{...}`, whitespace-collapsed, numbers normalised;
    the gold is the reference's boxed content, or the whole reference when it has no box."""

    def extract(self, text: str) -> Optional[str]:
        content = last_boxed(text)
        return _answer_like(content) if content is not None and content.strip() else None

    def gold(self, reference: str) -> Optional[str]:
        content = last_boxed(str(reference))
        value = _answer_like(content if content is not None else str(reference))
        return value or None


_ANSWER_MARK = re.compile(r"answer\s+is\b|answer\s*:", re.IGNORECASE)


def _after_answer_mark(text: str) -> Optional[str]:
    """The first non-empty line after the last "answer is"/"Answer:", or None when there is no such mark."""
    marks = list(_ANSWER_MARK.finditer(text))
    if not marks:
        return None
    rest = text[marks[-1].end() :].lstrip(" \t:")
    lines = [line for line in rest.splitlines() if line.strip()]
    return lines[0] if lines else ""


@register_verifier("exact")
class ExactVerifier(Verifier):
    """Short-answer string equality: stripped, whitespace-collapsed, case-folded unless `case_sensitive`.

    A trailing full stop and enclosing `**`/quotes are dropped on both sides, since "The answer is **Paris**."
    is how chat models state the answer `Paris`.
    """

    def __init__(self, *, case_sensitive: bool = False) -> None:
        if not isinstance(case_sensitive, bool):
            raise ConfigError(f"generate.verifier_options.case_sensitive: expected true or false, got {case_sensitive!r}")
        self.case_sensitive = case_sensitive

    def _normalise(self, text: str) -> Optional[str]:
        value = _collapse(text).rstrip(".").strip()
        for left, right in (("**", "**"), ('"', '"'), ("'", "'")):
            if len(value) > len(left) + len(right) and value.startswith(left) and value.endswith(right):
                value = value[len(left) : -len(right)].strip()
        value = value.rstrip(".").strip()
        if not self.case_sensitive:
            value = value.casefold()
        return value or None

    def extract(self, text: str) -> Optional[str]:
        after = _after_answer_mark(text)
        return self._normalise(after if after is not None else text)

    def gold(self, reference: str) -> Optional[str]:
        return self._normalise(str(reference))


@register_verifier("regex")
class RegexVerifier(Verifier):
    """The last match of `pattern` in the rationale: its group 1, or the whole match when it has no group.

    The gold is the raw reference (the pattern is not applied to it); both sides are whitespace-collapsed,
    and numbers normalised. Flags go inline in the pattern, e.g. `(?i)answer:\\s*(\\w+)`.
    """

    def __init__(self, *, pattern: Optional[str] = None) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("generate.verifier_options.pattern: the regex verifier needs a non-empty pattern")
        try:
            self.pattern = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"generate.verifier_options.pattern: invalid regular expression {pattern!r} ({err})") from None

    def extract(self, text: str) -> Optional[str]:
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        value = last.group(1) if self.pattern.groups else last.group(0)
        return _answer_like(value) if value and value.strip() else None

    def gold(self, reference: str) -> Optional[str]:
        return _answer_like(str(reference)) or None


@register_verifier("choice")
class ChoiceVerifier(Verifier):
    """A multiple-choice letter from `letters` (default "ABCDE"), upper-cased.

    Read, in this order: the last "answer is (B)" / "Answer: **B**" / "answer is B"; the last line that is only
    a letter ("B.", "(b)", "**C**"); a "(b)" ending the text; the last bold letter "**B**". A lower-case letter
    counts only inside brackets or bold, so "the answer is a dog" is no answer. The gold is a letter or a
    0-based index (`0` -> "A").
    """

    def __init__(self, *, letters: str = "ABCDE") -> None:
        if not isinstance(letters, str) or not letters.isalpha() or len(set(letters.upper())) != len(letters):
            raise ConfigError(f"generate.verifier_options.letters: expected distinct letters such as 'ABCD', got {letters!r}")
        self.letters = letters.upper()
        upper = "".join(re.escape(c) for c in self.letters)
        any_case = upper + upper.lower()
        # an upper-case letter bare, or any case when enclosed in (..), [..] or **..**
        letter = rf"(?:\(([{any_case}])\)|\[([{any_case}])\]|\*\*([{any_case}])\*\*|([{upper}]))(?![A-Za-z0-9])"
        # only "answer" is case-insensitive (scoped flag): the whole pattern so would let a bare "a" through
        self._after_mark = re.compile(rf"(?i:answer\s+is|answer\s*:)[\s:]*{letter}")
        self._only_line = re.compile(rf"^[ \t]*{letter}[ \t]*[.:)]?[ \t]*$", re.MULTILINE)
        self._paren_end = re.compile(rf"\(([{any_case}])\)[\s.*]*$")
        self._bold = re.compile(rf"\*\*([{any_case}])\*\*")

    def extract(self, text: str) -> Optional[str]:
        for pattern in (self._after_mark, self._only_line, self._paren_end, self._bold):
            matches = list(pattern.finditer(text))
            if matches:
                return next(g for g in matches[-1].groups() if g).upper()
        return None

    def gold(self, reference: Union[str, int]) -> Optional[str]:
        if isinstance(reference, bool):  # bool is an int; True is no index
            return None
        if isinstance(reference, int):
            return self.letters[reference] if 0 <= reference < len(self.letters) else None
        value = str(reference).strip()
        if value.isdigit():
            index = int(value)
            return self.letters[index] if index < len(self.letters) else None
        bare = value.strip("()[]*. ").upper()
        if len(bare) == 1 and bare in self.letters:
            return bare
        return self.extract(value)


# ----------------------------------------------------------------------------- self-consistency


def majority_vote(answers: list[Optional[str]]) -> tuple[Optional[str], float]:
    """Self-consistency pseudo-label (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning").

    Returns the most common non-None answer and its share of ALL samples (None answers count in the
    denominator: 2 of 4 samples agreeing is 0.5 even when the other two found no answer). Ties go to the
    answer seen first. No answer at all: (None, 0.0).
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    # Counter keeps insertion (first-occurrence) order and max() returns the first maximum: ties -> earliest
    best = max(counts, key=counts.__getitem__)
    return best, counts[best] / len(answers)
