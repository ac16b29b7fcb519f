"""Hygiene filters for teacher-written training data, as named steps (`generate.filters`).

A filter is `f(rows, **options) -> (kept, dropped)`: `kept` are the rows it keeps, in order, and
`dropped` pairs every other row with a one-line reason, so a run can report what it threw away and why.
Rows are JSONL dicts; the teacher's output is `response_text(row)`, the question `prompt_text(row)`.
Recipes name the steps, e.g.

    generate:
      filters:
        - {name: drop_truncated}
        - {name: dedup_rouge, options: {threshold: 0.7}}
        - {name: decontaminate, options: {files: [eval/gsm8k_test.jsonl]}}

Built-ins: drop_truncated, dedup_exact, dedup_rouge, repeated_ngrams, decontaminate, end_of_turn.
Add one with `@register_filter("name")` from Python before running kdlm in that process; a name
registered twice is a ValueError.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from array import array
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from kdlm.errors import ConfigError, DataError
from kdlm.generation.registry import look_up, register_into

Row = dict[str, Any]
Dropped = list[tuple[Row, str]]
FilterFn = Callable[..., tuple[list[Row], Dropped]]

__all__ = [
    "FILTERS",
    "RougeLIndex",
    "check_end_of_turn",
    "get_filter",
    "prompt_text",
    "register_filter",
    "response_text",
    "rouge_l_max",
    "run_filter",
]

_REGISTRY: dict[str, FilterFn] = {}
FILTERS: Mapping[str, FilterFn] = MappingProxyType(_REGISTRY)  # read-only view: names -> filters


def register_filter(name: str) -> Callable[[FilterFn], FilterFn]:
    """Decorator: register `f(rows, **options) -> (kept, dropped)` as `name`; a name already taken is a ValueError."""
    return register_into(_REGISTRY, "filter", name)


def get_filter(name: str) -> FilterFn:
    """The filter registered as `name` (ConfigError naming the nearest valid name when unknown)."""
    return look_up(_REGISTRY, "filter", "generate.filters", name)


def run_filter(name: str, rows: list[Row], **options: Any) -> tuple[list[Row], Dropped]:
    """Run filter `name` on `rows`, first checking `options` against its keyword parameters (ConfigError)."""
    fn = check_filter(name, options)
    return fn(rows, **options)


def check_filter(name: str, options: dict) -> Callable:
    """The filter `name`, after checking that it exists and takes `options` (ConfigError naming the nearest)."""
    fn = get_filter(name)
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.0)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"generate.filters.{name}.{key}: unknown option{hint} (valid: {', '.join(accepted) or 'none'})")
    return fn


# ----------------------------------------------------------------------------- row access


def response_text(row: Row) -> str:
    """The teacher's output: the last assistant message's content, else `completion`, else `text`, else ""."""
    messages = row.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "assistant":
                return str(message.get("content") or "")
    for key in ("completion", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    return ""


def prompt_text(row: Row) -> str:
    """The question: the user turns joined by newlines, else `prompt`, else ""."""
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [str(m.get("content") or "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return "\n".join(users)
    prompt = row.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _side(on: str, *, allowed: Sequence[str], step: str) -> str:
    if on not in allowed:
        raise ConfigError(f"generate.filters.{step}.on: expected one of {', '.join(allowed)}, got {on!r}")
    return on


_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    """Lower-cased words with punctuation dropped (the decontamination and repetition unit)."""
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------- truncation and exact duplicates


@register_filter("drop_truncated")
def drop_truncated(rows: list[Row], *, reasons: Sequence[str] = ("length",)) -> tuple[list[Row], Dropped]:
    """Drop rows whose `provenance.finish_reason` is in `reasons`: a response cut at max_tokens has no ending
    (and usually no answer), and training on it teaches the student to stop mid-sentence."""
    bad = set(reasons)
    kept: list[Row] = []
    dropped: Dropped = []
    for row in rows:
        provenance = row.get("provenance")
        reason = provenance.get("finish_reason") if isinstance(provenance, dict) else None
        if reason in bad:
            dropped.append((row, f"truncated: finish_reason={reason}"))
        else:
            kept.append(row)
    return kept, dropped


@register_filter("dedup_exact")
def dedup_exact(rows: list[Row], *, on: str = "pair") -> tuple[list[Row], Dropped]:
    """Drop exact duplicates of an earlier row (whitespace-collapsed), by "response", "prompt" or the "pair"."""
    _side(on, allowed=("response", "prompt", "pair"), step="dedup_exact")
    first: dict[tuple[str, ...], int] = {}
    kept: list[Row] = []
    dropped: Dropped = []
    for i, row in enumerate(rows):
        parts = {"prompt": (prompt_text(row),), "response": (response_text(row),)}.get(on) or (
            prompt_text(row),
            response_text(row),
        )
        key = tuple(" ".join(part.split()) for part in parts)  # whitespace-collapsed
        if key in first:
            dropped.append((row, f"exact duplicate ({on}) of row {first[key]}"))
        else:
            first[key] = i
            kept.append(row)
    return kept, dropped


# ----------------------------------------------------------------------------- ROUGE-L near duplicates


class _Prepared:
    """One text tokenised once: its length and, per token, the bit mask of its positions (for the LCS)."""

    __slots__ = ("length", "masks")

    def __init__(self, tokens: list[str]) -> None:
        self.length = len(tokens)
        self.masks: dict[str, int] = {}
        for i, token in enumerate(tokens):
            self.masks[token] = self.masks.get(token, 0) | (1 << i)


def _lcs_length(a: _Prepared, b_tokens: Iterable[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): len(b) big-int steps of len(a) bits.

    Bit i of `row` is 0 where the DP row steps up at position i of `a`; the LCS length is the number of steps.
    """
    full = (1 << a.length) - 1
    row = full
    for token in b_tokens:
        match = row & a.masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return a.length - row.bit_count()


def _fmeasure(lcs: int, len_target: int, len_prediction: int) -> float:
    """rouge_score's ROUGE-L F-measure, computed the same way (so equal to its float)."""
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len_prediction, lcs / len_target
    return 2 * precision * recall / (precision + recall)


class RougeLIndex:
    """Texts to compare new texts against by ROUGE-L F-measure (rouge-score's `rougeL`, no stemming).

    Scores are exact (rouge-score's own tokenizer, the same F formula), but computed only where they can
    matter. With lengths m, n and LCS length L, P = L/n and R = L/m give F = 2PR/(P+R) = 2L/(m+n).
    L <= min(m, n) and L <= the multiset overlap sum_t min(count_a(t), count_b(t)) <= min(m, n), so
    F <= 2*overlap/(m+n) (which implies the length-ratio bound F <= 2*min(m, n)/(m+n)). The overlaps with
    every indexed text come at once from an inverted index; only texts whose bound beats the score to
    beat get their O(m*n/64) LCS computed, best bound first.
    """

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer  # what RougeScorer(["rougeL"], use_stemmer=False) uses

        self._tokenize = DefaultTokenizer(use_stemmer=False).tokenize
        self._items: list[_Prepared] = []
        self._lengths = array("q")  # token count of each indexed text
        self._postings: dict[tuple[str, int], array] = {}  # (token, k) -> texts holding token at least k times

    def __len__(self) -> int:
        return len(self._items)

    def add(self, text: str) -> int:
        """Add `text`; returns its position in the index."""
        return self._add_tokens(self._tokenize(text))

    def _add_tokens(self, tokens: list[str]) -> int:
        pos = len(self._items)
        self._items.append(_Prepared(tokens))
        self._lengths.append(len(tokens))
        seen: Counter[str] = Counter()
        for token in tokens:
            # the k-th occurrence of a token is a feature of its own, so that the number of features two
            # texts share is their multiset overlap sum_t min(count_a(t), count_b(t)); array('q') appends
            # in C and numpy reads it without a copy (np.frombuffer) when scoring
            seen[token] += 1
            self._postings.setdefault((token, seen[token]), array("q")).append(pos)
        return pos

    def _scores(self, tokens: list[str], beat: float, stop_above: Optional[float]) -> Iterable[tuple[int, float]]:
        """Yield (position, F) of indexed texts whose exact F exceeds `beat`; without `stop_above` (looking
        for the max) `beat` rises to each score yielded, else the first score above `stop_above` ends it."""
        m = len(tokens)
        if m == 0 or not self._items:
            return  # rouge_score scores an empty text 0 against anything
        seen: Counter[str] = Counter()
        holders = []
        for token in tokens:
            seen[token] += 1
            post = self._postings.get((token, seen[token]))
            if post is not None:
                holders.append(np.frombuffer(post, dtype=np.int64))
        if not holders:
            return
        overlap = np.bincount(np.concatenate(holders), minlength=len(self._items))  # [items] multiset overlaps
        del holders  # release the buffer views: an array('q') cannot grow while one is exported
        # (the lengths' view below dies with the division's result; `bound` is a new array)
        bound = 2 * overlap / (m + np.frombuffer(self._lengths, dtype=np.int64))  # [items] >= exact F
        # 1e-12 slack: skip only what is surely not above `beat`, whatever the rounding of the exact F
        order = np.nonzero(bound > beat - 1e-12)[0]
        order = order[np.argsort(-bound[order], kind="stable")]  # best bound first: an early hit ends the search
        for pos in order.tolist():
            if bound[pos] <= beat - 1e-12:
                return  # sorted: no later text can beat `beat` either
            item = self._items[pos]
            score = _fmeasure(_lcs_length(item, tokens), item.length, m)
            if score > beat:
                yield pos, score
                if stop_above is not None:
                    return
                beat = score

    def max_score(self, text: str) -> tuple[float, Optional[int]]:
        """The highest ROUGE-L F of `text` against the indexed texts, and where that text is (0.0, None if none)."""
        best, where = 0.0, None
        for pos, score in self._scores(self._tokenize(text), 0.0, None):
            best, where = score, pos
        return best, where

    def first_above(self, text: str, threshold: float) -> Optional[tuple[int, float]]:
        """An indexed text whose ROUGE-L F with `text` exceeds `threshold`, as (position, F); None if none."""
        return self._first_above(self._tokenize(text), threshold)

    def _first_above(self, tokens: list[str], threshold: float) -> Optional[tuple[int, float]]:
        for hit in self._scores(tokens, threshold, threshold):
            return hit
        return None


def rouge_l_max(candidate: str, pool: list[str]) -> float:
    """The highest ROUGE-L F-measure of `candidate` against any text of `pool` (0.0 for an empty pool).

    Self-Instruct (Wang et al. 2023) adds a new instruction to its pool only when this is below 0.7. For many
    candidates against a growing pool, keep a `RougeLIndex` instead (it tokenises each text once).
    """
    index = RougeLIndex()
    for text in pool:
        index.add(text)
    return index.max_score(candidate)[0]


@register_filter("dedup_rouge")
def dedup_rouge(rows: list[Row], *, threshold: float = 0.7, on: str = "response") -> tuple[list[Row], Dropped]:
    """Drop a row whose response (or prompt, `on`) has ROUGE-L F > `threshold` with an already kept one.

    Greedy in row order, as Self-Instruct (Wang et al. 2023) filters its instruction pool at 0.7.
    """
    _side(on, allowed=("response", "prompt"), step="dedup_rouge")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"generate.filters.dedup_rouge.threshold: expected a value in [0, 1], got {threshold!r}")
    text_of = response_text if on == "response" else prompt_text
    index = RougeLIndex()
    kept_rows: list[int] = []  # index position -> row number
    kept: list[Row] = []
    dropped: Dropped = []
    for i, row in enumerate(rows):
        tokens = index._tokenize(text_of(row))  # once, for the search and the index
        hit = index._first_above(tokens, float(threshold))
        if hit is None:
            index._add_tokens(tokens)
            kept_rows.append(i)
            kept.append(row)
        else:
            pos, score = hit
            dropped.append((row, f"near duplicate ({on}): ROUGE-L {score:.3f} > {threshold} with row {kept_rows[pos]}"))
    return kept, dropped


# ----------------------------------------------------------------------------- degenerate repetition


def repeated_share(text: str, n: int = 4) -> float:
    """1 - unique/total word n-grams of `text` (0.0 when it has none): 0 for varied text, near 1 for a loop."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@register_filter("repeated_ngrams")
def repeated_ngrams(rows: list[Row], *, n: int = 4, max_share: float = 0.3) -> tuple[list[Row], Dropped]:
    """Drop a response whose share of repeated word n-grams exceeds `max_share`: small teachers fall into
    loops ("I am sorry. I am sorry. ...") that a student would learn to repeat."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"generate.filters.repeated_ngrams.n: expected a positive integer, got {n!r}")
    kept: list[Row] = []
    dropped: Dropped = []
    for row in rows:
        share = repeated_share(response_text(row), n)
        if share > max_share:
            dropped.append((row, f"repetitive: {share:.0%} of word {n}-grams repeat (> {max_share:.0%})"))
        else:
            kept.append(row)
    return kept, dropped


# ----------------------------------------------------------------------------- decontamination

DECONTAMINATION_FIELDS = ("question", "prompt", "instruction", "input")


def _ngrams(words: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i : i + n]) for i in range(len(words) - n + 1))


@lru_cache(maxsize=4)
def _eval_ngrams(files: tuple[tuple[str, float, int], ...], fields: tuple[str, ...], n: int) -> frozenset:
    """All word n-grams of `fields` in the JSONL `files`; cached on (path, mtime, size) so a pipeline that
    calls the filter per batch reads the evaluation data once."""
    grams: set[tuple[str, ...]] = set()
    for path, _, _ in files:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({err})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                for field in fields:
                    if isinstance(row.get(field), str):
                        grams.update(_ngrams(_words(row[field]), n))
    return frozenset(grams)


@register_filter("decontaminate")
def decontaminate(
    rows: list[Row], *, files: Sequence[str] = (), fields: Sequence[str] = DECONTAMINATION_FIELDS, n: int = 13
) -> tuple[list[Row], Dropped]:
    """Drop rows whose prompt or response shares a word n-gram with evaluation data (GPT-3, Brown et al. 2020,
    app. C: 13-grams of lower-cased, punctuation-free words; open-r1 does the same).

    An evaluation text shorter than n words has no n-gram and is not checked: lower `n` for short benchmarks.
    """
    if isinstance(files, str):
        files = [files]
    if not files:
        raise ConfigError("generate.filters.decontaminate.files: name at least one evaluation JSONL file")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"generate.filters.decontaminate.n: expected a positive integer, got {n!r}")
    keys = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: evaluation file for decontamination not found")
        stat = path.stat()
        keys.append((str(path.resolve()), stat.st_mtime, stat.st_size))
    grams = _eval_ngrams(tuple(keys), tuple(fields), n)
    kept: list[Row] = []
    dropped: Dropped = []
    for row in rows:
        hit = None
        for side, text in (("prompt", prompt_text(row)), ("response", response_text(row))):
            hit = next(((side, g) for g in _ngrams(_words(text), n) if g in grams), None)
            if hit:
                break
        if hit:
            dropped.append((row, f"contaminated: {hit[0]} shares the {n}-gram {' '.join(hit[1])!r} with evaluation data"))
        else:
            kept.append(row)
    return kept, dropped


# ----------------------------------------------------------------------------- end-of-turn agreement

# Turn and end markers of common chat templates (ChatML/Qwen, Llama 3, Gemma, Phi-3, Mistral, DeepSeek,
# gpt-oss). Plain "<s>"/"</s>" are left out here: they are also HTML; they count when they are the student's.
CHAT_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<start_of_turn>", "<end_of_turn>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "[INST]", "[/INST]",
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<|start|>", "<|message|>", "<|channel|>", "<|return|>",
)  # fmt: skip


def _render_ids(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def template_end_of_turn(tokenizer: Any) -> Optional[str]:
    """The special token the student's chat template ends an assistant turn with (the last special token of
    the rendered turn), or None when the tokenizer has no template or the turn has no special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "Hi"}]
    prefix = _render_ids(tokenizer, user, add_generation_prompt=True)
    full = _render_ids(tokenizer, user + [{"role": "assistant", "content": "Hello"}], add_generation_prompt=False)
    special = set(tokenizer.all_special_ids)
    turn = full[len(prefix) :] if full[: len(prefix)] == prefix else full
    last = next((t for t in reversed(turn) if t in special), None)
    return tokenizer.convert_ids_to_tokens(last) if last is not None else None


def _student_specials(tokenizer: Any) -> set[str]:
    """Every special token string of the student: HF tokenisation turns them into control tokens, even in data."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content if hasattr(added, "content") else added))
    return {t for t in tokens if t}


def check_end_of_turn(tokenizer: Any, sample_texts: Sequence[str] = ()) -> Optional[str]:
    """A warning when the student's template and tokenizer disagree on how a turn ends, else None.

    The student learns to emit its template's end-of-turn token; if that is not the tokenizer's eos (Gemma's
    `<end_of_turn>` vs `<eos>`), generation will not stop there unless the generation config says so. Also
    warns when the template ends a turn with no special token, and when teacher outputs in `sample_texts`
    contain chat markers (the teacher's template differs, or it echoes its own).
    """
    problems = []
    end = template_end_of_turn(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        problems.append("the student tokenizer has no chat template")
    elif end is None:
        problems.append("the student's chat template ends an assistant turn with no special token: it will not learn to stop")
    elif end != tokenizer.eos_token:
        problems.append(
            f"the student's chat template ends a turn with {end!r} but the tokenizer's eos is {tokenizer.eos_token!r}: "
            "set the student's generation eos to it or generation will not stop at the end of a turn"
        )
    markers = _student_specials(tokenizer) | set(CHAT_MARKERS)
    leaked = [t for t in sample_texts if any(m in t for m in markers)]
    if leaked:
        problems.append(f"{len(leaked)} of {len(sample_texts)} teacher outputs contain chat-template markers")
    return "; ".join(problems) or None


@register_filter("end_of_turn")
def end_of_turn(
    rows: list[Row], *, tokenizer: Any = None, extra_markers: Sequence[str] = ()
) -> tuple[list[Row], Dropped]:
    """Drop rows whose response contains a special token of the student (`<|im_end|>`, `</s>`, ...) or another
    chat template's marker: tokenised as a control token it would end or break the turn mid-answer, and it
    shows the teacher's template leaked into its output. `tokenizer` is the loaded student tokenizer."""
    own = _student_specials(tokenizer) if tokenizer is not None else set()
    markers = sorted(own | set(CHAT_MARKERS) | set(extra_markers), key=len, reverse=True)
    kept: list[Row] = []
    dropped: Dropped = []
    for row in rows:
        text = response_text(row)
        found = next((m for m in markers if m in text), None)
        if found is None:
            kept.append(row)
        else:
            whose = "a special token of the student" if found in own else "a chat-template marker"
            dropped.append((row, f"response contains {found!r} ({whose})"))
    return kept, dropped


@register_filter("same_tokens")
def same_tokens(rows: list[Row], *, tokenizer: Any = None) -> tuple[list[Row], Dropped]:
    """Grey-box rows only: drop a row whose answer text, encoded by the student's tokenizer, is not the token
    sequence the teacher generated (its `teacher_logprobs`). Sampling can produce a non-canonical split ("aj" +
    "o" where the tokenizer writes "ajo"); the student then trains on other tokens than the teacher scored, so
    the per-position log-probs cannot line up. Rows without teacher_logprobs are kept."""
    if tokenizer is None:
        raise ConfigError("generate.filters.same_tokens: needs the student's tokenizer (options.student)")
    from kdlm.generation.greybox import TokenMapper

    mapper = TokenMapper(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []))
    kept: list[Row] = []
    dropped: Dropped = []
    for row in rows:
        lp = row.get("teacher_logprobs")
        if not lp:
            kept.append(row)
            continue
        generated = [mapper(t) for t in lp.get("tokens") or []]
        while generated and generated[-1] in special:  # the end-of-turn token the server listed
            generated.pop()
        encoded = tokenizer(response_text(row), add_special_tokens=False)["input_ids"]
        if generated == encoded:
            kept.append(row)
        else:
            at = next((i for i, (a, b) in enumerate(zip(generated, encoded)) if a != b), min(len(generated), len(encoded)))
            dropped.append((row, f"the answer re-tokenises differently from the teacher's tokens (from token {at} of "
                                 f"{len(generated)})"))
    return kept, dropped
