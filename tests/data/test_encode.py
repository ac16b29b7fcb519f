"""Tests for kdlm.data.encode: token ids and loss masks of each row format."""

from __future__ import annotations

import pytest

from kdlm.config import DataConfig
from kdlm.data import IGNORE, RowError, detect_format, encode_row

PROMPT = "What is the capital of France?"
COMPLETION = " Paris is the capital of France."


def counted(encoded) -> list[int]:
    """Token ids whose label is kept in the loss (label equals the input id there)."""
    for token, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE, token), "a kept label must equal its input id"
    return [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]


def counted_spans(encoded) -> list[tuple[int, int]]:
    """[start, end) runs of counted positions."""
    spans, start = [], None
    for i, label in enumerate(encoded.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------- the fixture tokenizer itself


def test_fixture_tokenizer_is_sane(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.chat_template
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert decode(tok, ids[1:]) == "Hello world"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok("x<|im_end|>", add_special_tokens=False)["input_ids"][-1] == im_end


# ----------------------------------------------------------------------------- text


def test_text_counts_every_token(tiny_tokenizer):
    cfg = DataConfig(format="text")
    text = "The quick brown fox jumps over the lazy dog."
    enc = encode_row({"text": text}, "text", tiny_tokenizer, cfg)
    expected = tiny_tokenizer(text)["input_ids"]
    assert enc.input_ids == expected
    assert enc.labels == expected
    assert enc.truncated is False
    assert decode(tiny_tokenizer, enc.input_ids) == "<s>" + text


def test_text_custom_field(tiny_tokenizer):
    cfg = DataConfig(text_field="body")
    enc = encode_row({"body": "Hello world", "text": "ignored"}, "text", tiny_tokenizer, cfg)
    assert enc.input_ids == tiny_tokenizer("Hello world")["input_ids"]


def test_text_truncated_to_max_length(tiny_tokenizer):
    cfg = DataConfig(max_length=8)
    text = "Knowledge distillation trains a small student model to imitate a large teacher model."
    full = tiny_tokenizer(text)["input_ids"]
    assert len(full) > 8
    enc = encode_row({"text": text}, "text", tiny_tokenizer, cfg)
    assert enc.input_ids == full[:8] and enc.labels == full[:8]
    assert enc.truncated is True


def test_exact_max_length_is_not_truncated(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    n = len(tiny_tokenizer(text)["input_ids"])
    enc = encode_row({"text": text}, "text", tiny_tokenizer, DataConfig(max_length=n))
    assert len(enc.input_ids) == n and enc.truncated is False


# ----------------------------------------------------------------------------- prompt_completion


def test_prompt_completion_counts_completion_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row({"prompt": PROMPT, "completion": COMPLETION}, "prompt_completion", tok, DataConfig())
    prompt_ids = tok(PROMPT)["input_ids"]
    completion_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert enc.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert enc.labels[len(prompt_ids):] == completion_ids + [tok.eos_token_id]
    assert decode(tok, counted(enc)) == COMPLETION + "</s>"
    assert enc.input_ids.count(tok.bos_token_id) == 1  # no second BOS before the completion
    assert enc.truncated is False


def test_prompt_completion_all_tokens_when_not_completion_only(tiny_tokenizer):
    enc = encode_row({"prompt": PROMPT, "completion": COMPLETION}, "prompt_completion", tiny_tokenizer,
                     DataConfig(completion_only=False))
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_prompt_completion_custom_fields(tiny_tokenizer):
    cfg = DataConfig(prompt_field="question", completion_field="answer")
    enc = encode_row({"question": PROMPT, "answer": COMPLETION}, "prompt_completion", tiny_tokenizer, cfg)
    assert decode(tiny_tokenizer, counted(enc)) == COMPLETION + "</s>"


def test_prompt_completion_truncation_keeps_labels_aligned(tiny_tokenizer):
    tok = tiny_tokenizer
    n_prompt = len(tok(PROMPT)["input_ids"])
    enc = encode_row({"prompt": PROMPT, "completion": COMPLETION}, "prompt_completion", tok,
                     DataConfig(max_length=n_prompt + 2))
    assert enc.truncated is True
    assert len(enc.input_ids) == len(enc.labels) == n_prompt + 2
    assert enc.labels == [IGNORE] * n_prompt + enc.input_ids[n_prompt:]


def test_prompt_completion_through_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row({"prompt": PROMPT, "completion": COMPLETION}, "prompt_completion", tok,
                     DataConfig(chat_template=True))
    text = decode(tok, enc.input_ids)
    assert text.startswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{COMPLETION}<|im_end|>")
    prefix = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    (start, end), = counted_spans(enc)
    assert decode(tok, enc.input_ids[:start]) == prefix  # the prompt and the generation prompt are not counted
    assert decode(tok, enc.input_ids[start:end]).startswith(COMPLETION + "<|im_end|>")


# ----------------------------------------------------------------------------- messages


CHAT = [
    {"role": "system", "content": "You are a fox."},
    {"role": "user", "content": "Hello world!"},
    {"role": "assistant", "content": "How are you today?"},
]


def _rendered(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_messages_use_the_chat_template(tiny_tokenizer):
    enc = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, DataConfig())
    text = decode(tiny_tokenizer, enc.input_ids)
    assert "<|im_start|>user" in text
    assert text == _rendered(CHAT)


def test_messages_count_only_the_assistant_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row({"messages": CHAT}, "messages", tok, DataConfig())
    (start, end), = counted_spans(enc)
    # everything before the answer (system, user, the assistant header) is masked
    assert decode(tok, enc.input_ids[:start]) == _rendered(CHAT[:2]) + "<|im_start|>assistant\n"
    answer = decode(tok, enc.input_ids[start:end])
    assert answer.startswith("How are you today?<|im_end|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in enc.input_ids[start:end]
    # user/system content tokens never counted
    assert "Hello world" not in decode(tok, counted(enc)) and "fox" not in decode(tok, counted(enc))


def test_messages_count_exactly_content_and_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row({"messages": CHAT}, "messages", tok, DataConfig())
    assert decode(tok, counted(enc)) == "How are you today?<|im_end|>"


def test_messages_multi_turn_counts_every_assistant_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    chat = [
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ]
    enc = encode_row({"messages": chat}, "messages", tok, DataConfig())
    spans = counted_spans(enc)
    assert len(spans) == 2
    first, second = (decode(tok, enc.input_ids[s:e]) for s, e in spans)
    assert first.startswith("I am fine, thank you.<|im_end|>")
    assert second.startswith("Paris is the capital of France.<|im_end|>")
    assert decode(tok, enc.input_ids[: spans[0][0]]) == _rendered(chat[:1]) + "<|im_start|>assistant\n"
    between = decode(tok, enc.input_ids[spans[0][1]: spans[1][0]])
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in between
    assert between.endswith("<|im_start|>assistant\n")


def test_messages_not_completion_only_counts_everything(tiny_tokenizer):
    enc = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, DataConfig(completion_only=False))
    assert enc.labels == enc.input_ids


def test_messages_custom_field(tiny_tokenizer):
    enc = encode_row({"conversation": CHAT}, "messages", tiny_tokenizer, DataConfig(messages_field="conversation"))
    assert decode(tiny_tokenizer, enc.input_ids) == _rendered(CHAT)


def test_messages_truncated(tiny_tokenizer):
    enc = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, DataConfig(max_length=8))
    full = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, DataConfig())
    assert enc.truncated is True
    assert enc.input_ids == full.input_ids[:8] and enc.labels == full.labels[:8]


def test_messages_without_assistant_turn(tiny_tokenizer):
    with pytest.raises(RowError, match="assistant"):
        encode_row({"messages": CHAT[:2]}, "messages", tiny_tokenizer, DataConfig())


@pytest.mark.parametrize(
    "messages, where",
    [
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "messages[1]"),
        ([{"role": "user", "content": 3}], "messages[0]"),
        ([{"role": "user"}], "messages[0]"),
        (["hi"], "messages[0]"),
        ([], "messages"),
        ("hi", "messages"),
        (None, "messages"),
    ],
)
def test_malformed_messages(tiny_tokenizer, messages, where):
    with pytest.raises(RowError) as info:
        encode_row({"messages": messages}, "messages", tiny_tokenizer, DataConfig())
    assert where in str(info.value)


def test_chat_needs_a_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(RowError, match="chat template"):
        encode_row({"messages": CHAT}, "messages", tiny_tokenizer, DataConfig())
    with pytest.raises(RowError, match="chat template"):
        encode_row({"prompt": PROMPT, "completion": COMPLETION}, "prompt_completion", tiny_tokenizer,
                   DataConfig(chat_template=True))


# ----------------------------------------------------------------------------- field errors and detection


@pytest.mark.parametrize(
    "row, fmt, field",
    [
        ({"txt": "hello"}, "text", "'text'"),
        ({"text": 5}, "text", "'text'"),
        ({"prompt": "hi"}, "prompt_completion", "'completion'"),
        ({"completion": "hi"}, "prompt_completion", "'prompt'"),
        ({"prompt": ["a"], "completion": "hi"}, "prompt_completion", "'prompt'"),
    ],
)
def test_missing_or_wrong_field(tiny_tokenizer, row, fmt, field):
    with pytest.raises(RowError) as info:
        encode_row(row, fmt, tiny_tokenizer, DataConfig())
    assert field in str(info.value)


def test_unknown_format(tiny_tokenizer):
    with pytest.raises(RowError, match="format"):
        encode_row({"text": "x"}, "chatml", tiny_tokenizer, DataConfig())


FIELDS = dict(text_field="text", prompt_field="prompt", completion_field="completion", messages_field="messages")


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"text": "a"}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a", "completion": "b", "text": "c"}, "prompt_completion"),
        ({"messages": [], "prompt": "a", "completion": "b", "text": "c"}, "messages"),
        ({"prompt": "a", "text": "c"}, "text"),  # a prompt without a completion is not prompt_completion
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row, **FIELDS) == fmt


def test_detect_format_custom_fields():
    fields = dict(text_field="body", prompt_field="q", completion_field="a", messages_field="chat")
    assert detect_format({"q": "x", "a": "y"}, **fields) == "prompt_completion"
    assert detect_format({"chat": []}, **fields) == "messages"
    assert detect_format({"body": ""}, **fields) == "text"
    with pytest.raises(RowError):
        detect_format({"text": "x"}, **fields)


def test_detect_format_names_the_expected_keys():
    with pytest.raises(RowError) as info:
        detect_format({"prompt": "a", "other": 1}, **FIELDS)
    message = str(info.value)
    for key in ("messages", "prompt", "completion", "text", "other"):
        assert key in message
