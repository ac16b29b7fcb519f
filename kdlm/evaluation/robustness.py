"""Adversarial perturbations of task inputs, deterministic under a seed, and the attack success rate.

Three kinds, in the spirit of AdvGLUE's (Wang et al. 2021) word- and sentence-level attacks and of typo attacks
(TextBugger), implemented here without any network or NLP library:

- `char`: typos in about `rate` of the words (at least one): swap two adjacent letters, drop a letter, or replace a
  letter by a QWERTY keyboard neighbour;
- `word`: about `rate` of the words (at least one) deleted, swapped with the next word, or replaced by a synonym
  from a small built-in table;
- `sentence`: one irrelevant, label-neutral distractor sentence inserted at a sentence boundary.

Only alphabetic words are touched: numbers (a GSM8K question's quantities) and negations (not, never, no, ...)
are never changed, so a perturbation does not change the right answer. Each example's perturbation depends only on
(seed, kind, example index), never on the model, so every model sees the same perturbed inputs.

Attack success rate (ASR): among the examples a model answers correctly on the clean input, the share it answers
incorrectly once the input is perturbed (`kdlm.evaluation.metrics.attack_success_rate`).
"""

from __future__ import annotations

import random
import re
from typing import Callable, Optional, Sequence

from kdlm.evaluation.metrics import attack_success_rate

KINDS = ("char", "word", "sentence")

_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_ROW_OFFSETS = [0.0, 0.25, 0.75]  # the stagger of a QWERTY keyboard's rows, in key widths


def _keyboard_neighbours() -> dict[str, str]:
    """Keys next to each letter: left/right in its row, and keys of the rows above and below less than one key
    width away horizontally (so 'a' -> q, w, s, z and 'g' -> t, y, f, h, v, b)."""
    out = {}
    for r, row in enumerate(_ROWS):
        for c, ch in enumerate(row):
            x = c + _ROW_OFFSETS[r]
            near = []
            for r2, row2 in enumerate(_ROWS):
                for c2, ch2 in enumerate(row2):
                    dx = abs(c2 + _ROW_OFFSETS[r2] - x)
                    if (r2 == r and abs(c2 - c) == 1) or (abs(r2 - r) == 1 and dx < 1):
                        near.append(ch2)
            out[ch] = "".join(near)
    return out


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()

# meaning-preserving substitutes (no antonyms; sentiment words keep their polarity)
SYNONYMS: dict[str, list[str]] = {
    "movie": ["film", "picture"], "film": ["movie", "picture"], "book": ["novel", "volume"],
    "good": ["fine", "decent", "nice"], "great": ["excellent", "terrific", "superb"], "bad": ["poor", "awful", "lousy"],
    "terrible": ["awful", "dreadful", "horrible"], "awful": ["terrible", "dreadful"], "excellent": ["great", "superb"],
    "boring": ["dull", "tedious"], "funny": ["amusing", "hilarious"], "beautiful": ["lovely", "gorgeous"],
    "love": ["adore", "like"], "loved": ["adored", "liked"], "like": ["enjoy"], "liked": ["enjoyed"],
    "hate": ["detest", "loathe"], "hated": ["detested", "loathed"], "big": ["large", "huge"], "large": ["big", "huge"],
    "small": ["little", "tiny"], "little": ["small"], "fast": ["quick", "rapid"], "quick": ["fast", "rapid"],
    "slow": ["sluggish"], "happy": ["glad", "cheerful"], "sad": ["unhappy", "sorrowful"], "buy": ["purchase"],
    "bought": ["purchased"], "sell": ["vend"], "sold": ["vended"], "make": ["produce", "create"], "made": ["produced", "created"],
    "start": ["begin"], "started": ["began"], "begin": ["start"], "end": ["finish"], "ended": ["finished"],
    "finish": ["complete"], "finished": ["completed"], "help": ["assist", "aid"], "show": ["display"], "shows": ["displays"],
    "story": ["tale", "narrative"], "plot": ["storyline"], "actor": ["performer"], "actors": ["performers"],
    "really": ["truly", "genuinely"], "very": ["extremely", "highly"], "quite": ["fairly", "rather"],
    "totally": ["completely", "entirely"], "completely": ["totally", "entirely"], "often": ["frequently"],
    "maybe": ["perhaps"], "perhaps": ["maybe"], "simple": ["easy", "plain"], "easy": ["simple"], "hard": ["difficult", "tough"],
    "difficult": ["hard", "tough"], "smart": ["clever", "intelligent"], "stupid": ["dumb", "foolish"],
    "strange": ["odd", "weird"], "weird": ["strange", "odd"], "amazing": ["astonishing", "incredible"],
    "wonderful": ["marvelous", "fantastic"], "nice": ["pleasant", "good"], "pretty": ["fairly", "rather"],
    "child": ["kid"], "children": ["kids"], "kids": ["children"], "friend": ["pal", "companion"],
    "friends": ["pals", "companions"], "house": ["home"], "car": ["automobile"], "shop": ["store"], "store": ["shop"],
    "each": ["every"], "every": ["each"], "total": ["overall"], "buys": ["purchases"], "gets": ["receives", "obtains"],
    "got": ["received", "obtained"], "gave": ["handed"], "give": ["hand"], "wants": ["wishes"], "want": ["wish"],
    "needs": ["requires"], "need": ["require"], "used": ["utilized"], "use": ["utilize"], "uses": ["utilizes"],
    "answer": ["reply", "response"], "question": ["query"], "problem": ["issue"], "job": ["task"], "work": ["labor"],
    "product": ["item"], "item": ["article"], "price": ["cost"], "cost": ["price"], "money": ["cash", "funds"],
    "begins": ["starts"], "starts": ["begins"], "tells": ["informs"], "said": ["stated", "remarked"],
    "says": ["states"], "write": ["compose"], "wrote": ["composed"], "rewrite": ["rephrase"], "list": ["enumerate"],
}
SYNONYMS = {k: [s for s in v if s != k] for k, v in SYNONYMS.items() if any(s != k for s in v)}

NEGATIONS = frozenset({"not", "no", "never", "nor", "none", "nothing", "neither", "nobody", "nowhere", "without",
                       "hardly", "barely", "cannot"})
# quantities written as words: a maths question's numbers stay as they are
NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion half "
    "halves third thirds quarter quarters twice double triple dozen dozens percent once first second last".split())
PROTECTED = NEGATIONS | NUMBER_WORDS

# irrelevant, label-neutral sentences with no numbers (AdvGLUE-style distraction; GSM8K answers are unaffected)
DISTRACTORS = [
    "The weather was mild that afternoon.",
    "Some people prefer tea to coffee in the morning.",
    "The library down the street closes early on holidays.",
    "Many birds migrate south when autumn arrives.",
    "A train passed by in the distance.",
    "Note that this text was typed on a laptop.",
    "The walls of the room were painted a pale blue.",
    "It is well known that water freezes when it gets cold enough.",
    "Someone in the next room was humming a tune.",
    "The sky looked grey for a while.",
]

_WORD = re.compile(r"^([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)$")  # leading punctuation, letters, trailing punctuation


def example_rng(seed: int, kind: str, index: int, salt: str = "") -> random.Random:
    """A generator that depends only on (seed, kind, index, salt): string seeds are hashed stably (SHA-512)."""
    return random.Random(f"kdlm-robustness:{seed}:{kind}:{salt}:{index}")


def _split(text: str) -> list[str]:
    """Words at even indices, the whitespace between them at odd ones (kept verbatim on re-joining)."""
    return re.split(r"(\s+)", text)


def _candidates(tokens: list[str], min_letters: int) -> list[int]:
    out = []
    for i in range(0, len(tokens), 2):
        m = _WORD.match(tokens[i])
        if m and len(m.group(2)) >= min_letters and m.group(2).lower() not in PROTECTED and "n't" not in tokens[i].lower():
            out.append(i)
    return out


def _count(n_candidates: int, rate: float) -> int:
    return min(n_candidates, max(1, round(n_candidates * rate)))


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def typo(word: str, rng: random.Random) -> str:
    """One typo in a word of letters: adjacent swap, deletion or keyboard-neighbour substitution (always a change)."""
    ops = ["swap", "drop", "key"]
    rng.shuffle(ops)
    for op in ops:
        if op == "swap":
            spots = [i for i in range(len(word) - 1) if word[i].lower() != word[i + 1].lower()]
            if spots:
                i = rng.choice(spots)
                return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "drop" and len(word) > 1:
            i = rng.randrange(len(word))
            return word[:i] + word[i + 1:]
        elif op == "key":
            i = rng.randrange(len(word))
            near = KEYBOARD_NEIGHBOURS.get(word[i].lower())
            if near:
                ch = rng.choice(near)
                return word[:i] + (ch.upper() if word[i].isupper() else ch) + word[i + 1:]
    return word


def perturb_char(text: str, rng: random.Random, rate: float = 0.1) -> str:
    tokens = _split(text)
    cand = _candidates(tokens, min_letters=3) or _candidates(tokens, min_letters=2)
    for i in sorted(rng.sample(cand, _count(len(cand), rate))):
        pre, core, post = _WORD.match(tokens[i]).groups()
        tokens[i] = pre + typo(core, rng) + post
    return "".join(tokens)


def perturb_word(text: str, rng: random.Random, rate: float = 0.1) -> str:
    tokens = _split(text)
    cand = _candidates(tokens, min_letters=2)
    chosen = sorted(rng.sample(cand, _count(len(cand), rate)))
    deleted = set()
    for i in chosen:
        if i in deleted:
            continue
        pre, core, post = _WORD.match(tokens[i]).groups()
        ops = []
        if core.lower() in SYNONYMS:
            ops += ["synonym", "synonym"]  # preferred when available: the most natural substitution
        if i + 2 < len(tokens) and i + 2 in cand and i + 2 not in deleted:
            ops.append("swap")
        if len([c for c in cand if c not in deleted]) > 1:
            ops.append("delete")
        if not ops:
            continue
        op = rng.choice(ops)
        if op == "synonym":
            tokens[i] = pre + _match_case(rng.choice(SYNONYMS[core.lower()]), core) + post
        elif op == "swap":
            n_pre, n_core, n_post = _WORD.match(tokens[i + 2]).groups()
            # swap the words, keep the punctuation where it was
            tokens[i], tokens[i + 2] = pre + n_core + post, n_pre + core + n_post
        else:
            _delete(tokens, i)
            deleted.add(i)
    return "".join(tokens)


def _delete(tokens: list[str], i: int) -> None:
    """Delete word i with one neighbouring space; its punctuation stays, attached to the previous word."""
    pre, _, post = _WORD.match(tokens[i]).groups()
    tokens[i] = pre + post
    if post and not pre and i >= 2:
        tokens[i - 1] = ""  # "I loved it." -> "I loved."
    elif not tokens[i]:
        if i + 1 < len(tokens):
            tokens[i + 1] = ""
        elif i >= 1:
            tokens[i - 1] = ""


def perturb_sentence(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Insert one distractor sentence at a random sentence boundary (start, between sentences, or end)."""
    distractor = rng.choice(DISTRACTORS)
    bounds = [m.end() for m in re.finditer(r"[.!?](?=\s+[A-Z\"'(])", text)]
    stripped = text.rstrip()
    spots = [0] + bounds + ([len(stripped)] if stripped.endswith((".", "!", "?")) else [])
    at = rng.choice(spots)
    if at == 0:
        return distractor + " " + text
    return text[:at] + " " + distractor + text[at:]


PERTURBERS: dict[str, Callable[[str, random.Random, float], str]] = {
    "char": perturb_char, "word": perturb_word, "sentence": perturb_sentence}


def perturb(text: str, kind: str, *, seed: int, index: int, rate: float = 0.1, salt: str = "") -> str:
    """The `kind` perturbation of `text` for example `index` under `seed` (same inputs -> same output)."""
    if kind not in PERTURBERS:
        raise ValueError(f"unknown perturbation kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not text.strip():
        return text
    return PERTURBERS[kind](text, example_rng(seed, kind, index, salt), rate)


def summarize_asr(clean_correct: Sequence[bool], perturbed: dict[str, Sequence[Optional[bool]]]) -> dict:
    """The robustness entry of one model and task.

    asr[kind]: ASR of that perturbation kind; asr['overall']: flips summed over kinds / clean-correct summed over kinds
    (every kind is tried on every clean-correct example, so it is the mean of the kinds' ASRs); extra key
    asr_any: the share of clean-correct examples flipped by at least one kind (the worst case per example).
    """
    asr: dict[str, Optional[float]] = {}
    flips = total = 0
    for kind, results in perturbed.items():
        rate, n = attack_success_rate(clean_correct, results)
        asr[kind] = rate
        if rate is not None:
            flips += round(rate * n)
            total += n
    asr["overall"] = flips / total if total else None
    any_flip = [any(not perturbed[k][i] for k in perturbed) for i, c in enumerate(clean_correct) if c]
    n_clean = sum(1 for c in clean_correct if c)
    return {
        "clean_accuracy": n_clean / len(clean_correct) if clean_correct else None,
        "asr": asr,
        "n_correct_clean": n_clean,
        "asr_any": (sum(any_flip) / len(any_flip)) if any_flip else None,
        "n": len(clean_correct),
    }
