"""Byte-exact alignment of two tokenisations of the same text (cross-tokenizer distillation).

Every cross-tokenizer loss needs to know which student tokens and which teacher tokens cover the
same piece of text. This module answers that once, for every loss.

Algorithm
---------
1. **Bytes per token** (:func:`token_bytes`). Each token id is mapped to the exact UTF-8 bytes it
   contributes to the text, from ``convert_ids_to_tokens`` and the tokenizer's scheme (read off the
   backend's ``decoder`` in ``tokenizer.json``):

   * byte-level BPE (GPT-2 / SmolLM2 / Llama-3 style, ``ByteLevel`` decoder): every character of the
     token string stands for one byte through GPT-2's ``bytes_to_unicode`` table;
   * SentencePiece style (Gemma / Llama-2 style, ``Replace("▁", " ")`` or ``Metaspace`` decoder, with
     optional ``ByteFallback``): ``▁`` is a space, ``<0xNN>`` is the single byte ``0xNN``, anything
     else is its UTF-8;
   * added / special tokens (``<|im_start|>``, Gemma's ``\\n\\n`` run tokens, ...): their content
     string in UTF-8, except the tokens a tokenizer inserts by itself (see :func:`zero_byte_ids`),
     which are not part of the text and contribute ``b""``.

   Decoding token by token (``decode([id])``) would be wrong: a byte-level token holding half of a
   multi-byte character decodes to U+FFFD and its bytes are lost.

2. **Byte end offsets** (:func:`encode_with_bytes`): the cumulative sum of the token byte lengths,
   checked against ``text.encode("utf-8")``. A tokenizer whose normaliser changes the text (NFKC,
   lower-casing, a dummy-prefix space, Gemma's ``" " -> "▁"`` applied to a literal ``▁`` in the text)
   cannot be aligned byte-exactly, and :class:`AlignmentError` says where the bytes first differ.

3. **Chunks** (:func:`align`): a *boundary* is a byte offset where both tokenisations end a token.
   Chunks are the spans between consecutive boundaries, starting at byte 0 and ending at the total
   length. Both end lists are sorted, so a two-pointer merge finds them in O(n + m). Each chunk is the
   smallest unit over which a student and a teacher probability can be compared: the product of the
   probabilities of the student tokens of a chunk and that of the teacher tokens of the same chunk
   are both the probability of the same byte string.

   Zero-byte tokens (BOS, EOS added by the tokenizer) cover no text. A token ending at byte offset
   ``e`` belongs to the chunk ``k`` with ``b_lo < e <= b_hi``; so a leading zero-byte token (``e =
   0``, e.g. Gemma's ``<bos>``) is outside all chunks (the first chunk starts after it), and a
   zero-byte token elsewhere attaches to the chunk that ends at (or, if its offset is not a common
   boundary, contains) its offset, e.g. a trailing EOS joins the last chunk. Every token with at least
   one byte is in exactly one chunk; token index ranges of consecutive chunks are contiguous.

4. **Labels** (:func:`chunk_labels`): a chunk is counted by a loss iff all its student tokens have a
   label (completion-only training masks prompt tokens) and it contains neither side's index 0 (the
   first token of a sequence is never predicted).

Why bytes, not characters
-------------------------
Byte-level BPE tokenizers split characters: SmolLM2 encodes many CJK characters and emoji as
several tokens, each holding only some of the character's UTF-8 bytes (a ZWJ sequence such as
"👩‍💻" becomes a run of partial characters). TRL's GOLD cross-tokenizer loss aligned on character
offsets; in character coordinates the pieces of a split character all get the same span (or an
empty one), so tokens overlap, boundaries inside a character are invented or lost, and the chunk
texts of the two sides no longer match byte for byte (the loss then compares probabilities of
different strings). In bytes, every token of either tokenizer has a unique,
non-overlapping span, and the concatenation of the student tokens of a chunk equals that of the
teacher tokens exactly; the tests check this on real texts.

Scope
-----
Alignment runs per example, on the unpacked token ids (before sequence packing). Packing, which
concatenates examples, must carry each example's chunks along with its offset in the pack; this
module does not know about packs. Tokenizers without a fast (``tokenizers``) backend, or with a
normaliser that rewrites text, raise :class:`AlignmentError`.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

try:  # one-line errors in the CLI
    from kdlm.errors import DataError as _Base
except ImportError:  # pragma: no cover - kdlm.errors always exists in this package
    _Base = ValueError  # type: ignore[misc,assignment]

__all__ = [
    "AlignmentError",
    "Alignment",
    "token_bytes",
    "encode_with_bytes",
    "align",
    "align_ids",
    "chunk_labels",
    "zero_byte_ids",
    "ends_from_bytes",
]


class AlignmentError(_Base, ValueError):
    """Two tokenisations cannot be aligned byte-exactly (the message names the tokenizer and offset)."""


# ---------------------------------------------------------------------------------------------
# bytes of tokens


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignmentError(
            f"tokenizer {_tokenizer_name(tokenizer)}: no fast (tokenizers) backend; byte alignment needs one"
        )
    return json.loads(backend.to_str())


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a (possibly nested ``Sequence``) decoder / normaliser / pre-tokenizer."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for key in ("decoders", "normalizers", "pretokenizers"):
            for child in node.get(key) or []:
                out.extend(_flatten(child))
        return out
    return [node]


def _scheme(tokenizer: Any, js: dict[str, Any]) -> str:
    """``"byte_level"`` or ``"sentencepiece"``, from the backend's decoder (then pre-tokenizer)."""
    steps = _flatten(js.get("decoder")) + _flatten(js.get("pre_tokenizer"))
    types = [s.get("type") for s in steps]
    if "ByteLevel" in types:
        return "byte_level"
    for s in steps:
        if s.get("type") in ("Metaspace", "ByteFallback"):
            return "sentencepiece"
        if s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == "\u2581":
            return "sentencepiece"
    raise AlignmentError(
        f"tokenizer {_tokenizer_name(tokenizer)}: unsupported decoder {types!r}; byte alignment knows "
        "byte-level BPE (ByteLevel) and SentencePiece-style (Replace ▁ / Metaspace, ByteFallback) tokenizers"
    )


def zero_byte_ids(tokenizer: Any) -> frozenset[int]:
    """Token ids that contribute no bytes: the special tokens the tokenizer inserts by itself.

    These are the ids that ``tokenizer("a", add_special_tokens=True)`` has beyond
    ``add_special_tokens=False`` (e.g. Gemma's ``<bos>``, a Llama tokenizer's ``<s>``). When the
    tokenizer inserts any, its BOS / EOS / pad tokens are treated as not-text too, unless the
    tokenizer's chat template writes them literally (then they are text, e.g. ChatML's
    ``<|im_end|>``). A tokenizer that inserts nothing (SmolLM2) has no zero-byte tokens: its
    ``<|im_start|>`` / ``<|im_end|>`` (also its bos / eos / pad) are the text ``"<|im_start|>"``...
    """
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    added = set(with_special)
    for i in without:
        added.discard(i)
    if not added:
        return frozenset()
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    for attr in ("bos_token", "eos_token", "pad_token"):
        token = getattr(tokenizer, attr, None)
        token_id = getattr(tokenizer, attr + "_id", None)
        if token is None or token_id is None:
            continue
        if template and str(token) in template:
            continue
        added.add(int(token_id))
    return frozenset(added)


class _Info:
    """Per-tokenizer facts and a lazily filled id -> bytes cache."""

    def __init__(self, tokenizer: Any) -> None:
        js = _backend_json(tokenizer)
        self.name = _tokenizer_name(tokenizer)
        self.scheme = _scheme(tokenizer, js)
        self.added: dict[int, bytes] = {}
        for tok in js.get("added_tokens") or []:
            content: str = tok["content"]
            if self.scheme == "sentencepiece" and tok.get("normalized"):
                content = content.replace("\u2581", " ")  # matched in normalised text: ▁ stands for a space
            self.added[int(tok["id"])] = content.encode("utf-8")
        self.zero = zero_byte_ids(tokenizer)
        self.cache: dict[int, bytes] = {i: b"" for i in self.zero}
        for i, b in self.added.items():
            self.cache.setdefault(i, b)
        self.convert = tokenizer.convert_ids_to_tokens

    def bytes_of(self, token_id: int, token: str | None) -> bytes:
        if token is None:
            raise AlignmentError(f"tokenizer {self.name}: token id {token_id} is not in the vocabulary")
        if self.scheme == "byte_level":
            table = _byte_decoder()
            try:
                return bytes(table[c] for c in token)
            except KeyError as e:
                raise AlignmentError(
                    f"tokenizer {self.name}: token {token!r} (id {token_id}) has a character outside the "
                    f"byte-level alphabet: {e.args[0]!r}"
                ) from None
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")


_INFOS: "weakref.WeakKeyDictionary[Any, _Info]" = weakref.WeakKeyDictionary()
_INFOS_BY_ID: dict[int, tuple[Any, _Info]] = {}  # fallback for tokenizers that refuse weak references


def _info(tokenizer: Any) -> _Info:
    try:
        info = _INFOS.get(tokenizer)
        if info is None:
            info = _INFOS[tokenizer] = _Info(tokenizer)
        return info
    except TypeError:
        hit = _INFOS_BY_ID.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            hit = _INFOS_BY_ID[id(tokenizer)] = (tokenizer, _Info(tokenizer))
        return hit[1]


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The exact bytes each token of ``ids`` contributes to the text.

    Byte-level BPE tokens go through the inverse GPT-2 byte map; SentencePiece tokens map ``▁`` to a
    space and ``<0xNN>`` to one byte; added / special tokens give their content in UTF-8 (so
    SmolLM2's ``<|im_start|>`` is ``b"<|im_start|>"``), except the tokens the tokenizer inserts by
    itself (:func:`zero_byte_ids`, e.g. Gemma's ``<bos>``), which give ``b""``. Works on token
    strings, not ``decode`` per token, which loses the bytes of a split UTF-8 character.
    Results are cached per tokenizer and id.
    """
    info = _info(tokenizer)
    cache = info.cache
    out: list[bytes] = []
    missing: list[int] = []
    for i in ids:
        b = cache.get(i)
        if b is None:
            missing.append(i)
        out.append(b)  # type: ignore[arg-type]
    if missing:
        uniq = list(dict.fromkeys(int(i) for i in missing))
        tokens = info.convert(uniq)
        for i, tok in zip(uniq, tokens):
            cache[i] = info.bytes_of(i, tok)
        out = [cache[i] for i in ids]
    return out


def ends_from_bytes(pieces: list[bytes]) -> list[int]:
    """Cumulative byte end offsets of a list of token byte strings."""
    ends: list[int] = []
    total = 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    return ends


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def encode_with_bytes(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """``(ids, ends)``: the token ids of ``text`` and, per token, the byte offset in
    ``text.encode("utf-8")`` where the token ends (cumulative sum of :func:`token_bytes`).

    Raises :class:`AlignmentError` naming the tokenizer and the first differing byte offset when the
    tokens' bytes do not reproduce the text exactly (a normaliser that changes the text, an unknown
    token, ...).
    """
    ids = [int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]
    pieces = token_bytes(tokenizer, ids)
    got = b"".join(pieces)
    want = text.encode("utf-8")
    if got != want:
        k = _first_difference(got, want)
        raise AlignmentError(
            f"tokenizer {_tokenizer_name(tokenizer)}: the token bytes differ from the text's bytes at byte {k} "
            f"(text {want[max(0, k - 12):k + 12]!r}, tokens {got[max(0, k - 12):k + 12]!r}; "
            f"{len(want)} vs {len(got)} bytes); its normaliser changes the text, so it cannot be aligned byte-exactly"
        )
    return ids, ends_from_bytes(pieces)


# ---------------------------------------------------------------------------------------------
# chunks


@dataclass
class Alignment:
    """Chunks shared by two tokenisations of the same bytes.

    ``chunks[k] = (s_lo, s_hi, t_lo, t_hi)``: student tokens ``[s_lo, s_hi)`` and teacher tokens
    ``[t_lo, t_hi)`` cover exactly the bytes ``byte_spans[k] = (b_lo, b_hi)``. Leading zero-byte
    tokens are in no chunk; other zero-byte tokens belong to the chunk whose span ends at (or
    contains) their offset.
    """

    student_ends: list[int]  # per student token: byte end offset
    teacher_ends: list[int]
    chunks: list[tuple[int, int, int, int]]  # (s_lo, s_hi, t_lo, t_hi): token index ranges [lo, hi)
    byte_spans: list[tuple[int, int]]  # per chunk: [b_lo, b_hi) in the text's bytes

    def __len__(self) -> int:
        return len(self.chunks)


def _check_sorted(ends: list[int], side: str) -> None:
    prev = 0
    for k, e in enumerate(ends):
        if e < prev:
            raise AlignmentError(f"{side} byte ends must be non-decreasing and >= 0; index {k} has {e} after {prev}")
        prev = e


def align(student_ends: list[int], teacher_ends: list[int]) -> Alignment:
    """Chunks between the byte offsets where both tokenisations end a token (two-pointer merge).

    Chunks start at byte 0 and chain up to the total length. A token ending at byte ``e`` is in the
    chunk with ``b_lo < e <= b_hi``: leading zero-byte tokens (``e == 0``) are outside all chunks, a
    zero-byte token elsewhere (e.g. a trailing EOS) attaches to the chunk that ends at (or contains)
    its offset. Every token with >0 bytes is in exactly one chunk. Raises :class:`AlignmentError` if
    the total byte lengths differ or an end list decreases.
    """
    s = list(student_ends)
    t = list(teacher_ends)
    _check_sorted(s, "student")
    _check_sorted(t, "teacher")
    total_s = s[-1] if s else 0
    total_t = t[-1] if t else 0
    if total_s != total_t:
        raise AlignmentError(
            f"student and teacher tokens cover different byte lengths ({total_s} vs {total_t}); "
            "they are not tokenisations of the same text"
        )
    ns, nt = len(s), len(t)
    i = 0
    while i < ns and s[i] == 0:
        i += 1
    j = 0
    while j < nt and t[j] == 0:
        j += 1
    chunks: list[tuple[int, int, int, int]] = []
    spans: list[tuple[int, int]] = []
    s_lo, t_lo, b_lo = i, j, 0
    while i < ns and j < nt:
        a = s[i]
        b = t[j]
        if a < b:
            i += 1
        elif b < a:
            j += 1
        else:  # common boundary: take every token ending here (zero-byte ones included)
            i += 1
            while i < ns and s[i] == a:
                i += 1
            j += 1
            while j < nt and t[j] == a:
                j += 1
            chunks.append((s_lo, i, t_lo, j))
            spans.append((b_lo, a))
            s_lo, t_lo, b_lo = i, j, a
    return Alignment(student_ends=s, teacher_ends=t, chunks=chunks, byte_spans=spans)


def align_ids(
    student_tok: Any,
    student_ids: list[int],
    teacher_tok: Any,
    *,
    teacher_add_special_tokens: bool = True,
) -> tuple[list[int], Alignment]:
    """Re-tokenise a student sequence for the teacher and align the two: ``(teacher_ids, alignment)``.

    The student's ids are rendered as bytes (:func:`token_bytes`), decoded as UTF-8 (the whole
    sequence must be valid UTF-8 even where single tokens split a character), encoded with the
    teacher (:func:`encode_with_bytes`) and aligned (:func:`align`). Student special tokens the
    teacher does not know (``<|im_start|>`` for Gemma) become plain text for the teacher; ones it
    knows are recognised as its own special tokens. Student tokens the student tokenizer inserts by
    itself (its BOS) have no bytes and reach the teacher only as the teacher's own
    (``teacher_add_special_tokens``).
    """
    pieces = token_bytes(student_tok, [int(i) for i in student_ids])
    raw = b"".join(pieces)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AlignmentError(
            f"tokenizer {_tokenizer_name(student_tok)}: the student tokens are not valid UTF-8 at byte {e.start} "
            f"({raw[max(0, e.start - 8):e.start + 8]!r}); was the sequence truncated inside a character?"
        ) from None
    teacher_ids, teacher_ends = encode_with_bytes(teacher_tok, text, add_special_tokens=teacher_add_special_tokens)
    return teacher_ids, align(ends_from_bytes(pieces), teacher_ends)


def chunk_labels(
    alignment: Alignment,
    student_labels: list[int],
    teacher_ids: list[int],
    ignore: int = -100,
) -> tuple[list[int], list[int], list[int]]:
    """Which chunks a loss counts, per token: ``(teacher_labels, student_chunk, teacher_chunk)``.

    A chunk counts iff every student token in it has a label ``!= ignore`` and neither side's token
    at index 0 is in it (index 0 has no prediction). ``teacher_labels[j]`` is ``teacher_ids[j]`` where
    token ``j``'s chunk counts, else ``ignore``. ``student_chunk`` / ``teacher_chunk`` give, per token,
    the index of its counted chunk (renumbered 0, 1, ... over counted chunks, in order) or -1.
    Zero-byte tokens are never counted (they keep ``ignore`` / -1 even inside a counted chunk).
    """
    s_ends = alignment.student_ends
    t_ends = alignment.teacher_ends
    if len(student_labels) != len(s_ends):
        raise AlignmentError(f"{len(student_labels)} student labels for {len(s_ends)} aligned student tokens")
    if len(teacher_ids) != len(t_ends):
        raise AlignmentError(f"{len(teacher_ids)} teacher ids for {len(t_ends)} aligned teacher tokens")
    teacher_labels = [ignore] * len(t_ends)
    student_chunk = [-1] * len(s_ends)
    teacher_chunk = [-1] * len(t_ends)
    counted = 0
    for s_lo, s_hi, t_lo, t_hi in alignment.chunks:
        if s_lo == 0 or t_lo == 0:
            continue
        if any(student_labels[k] == ignore for k in range(s_lo, s_hi)):
            continue
        prev = s_ends[s_lo - 1]
        for k in range(s_lo, s_hi):
            e = s_ends[k]
            if e != prev:
                student_chunk[k] = counted
            prev = e
        prev = t_ends[t_lo - 1]
        for k in range(t_lo, t_hi):
            e = t_ends[k]
            if e != prev:
                teacher_chunk[k] = counted
                teacher_labels[k] = teacher_ids[k]
            prev = e
        counted += 1
    return teacher_labels, student_chunk, teacher_chunk
