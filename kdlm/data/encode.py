"""Turn rows into token ids and labels, with the loss mask of each format.

`labels[i] == input_ids[i]` where token i is counted in the loss and -100 elsewhere
(the Hugging Face convention); the model's output at position i-1 predicts token i.
- text: every token counted.
- prompt_completion: the completion (and the EOS after it) counted; optional chat template.
- messages: rendered with the tokenizer's chat template; assistant turns counted, through their end-of-turn token.
With `completion_only: false` every token is counted.

Context distillation (`data.teacher_messages_field`): the row also holds the teacher's version of the chat
(e.g. demonstrations before the question). It is encoded the same way, counting only its last assistant
turn(s), as many as the student's chat has; its counted tokens must equal the student's, so that the
teacher's and the student's counted positions line up one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

IGNORE = -100


class RowError(ValueError):
    """A row that does not fit its format; the caller adds the file and line."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    teacher_input_ids: Optional[list[int]] = None  # context distillation: the teacher's own input
    teacher_labels: Optional[list[int]] = None  # its counted tokens equal the student's (checked)


def detect_format(row: dict, *, text_field: str, prompt_field: str, completion_field: str, messages_field: str) -> str:
    """The format of a row under `format: auto`."""
    if messages_field in row:
        return "messages"
    if prompt_field in row and completion_field in row:
        return "prompt_completion"
    if text_field in row:
        return "text"
    raise RowError(
        f"cannot tell the format from keys {sorted(row)}: expected '{messages_field}', "
        f"'{prompt_field}'+'{completion_field}' or '{text_field}'"
    )


def encode_row(row: dict, fmt: str, tokenizer, cfg: Any) -> Encoded:
    """Encode one row; `cfg` is a DataConfig (field names, max_length, completion_only, chat_template,
    teacher_messages_field)."""
    encoded = _encode_student(row, fmt, tokenizer, cfg)
    field = getattr(cfg, "teacher_messages_field", None)
    if field is None or not counted_tokens(encoded.labels):  # nothing counted: the row is dropped anyway
        return encoded
    messages = row.get(field)
    _check_messages(messages, field)
    student_turns = sum(m["role"] == "assistant" for m in row[cfg.messages_field]) if fmt == "messages" else 1
    teacher = _encode_chat(messages, tokenizer, cfg, last_turns=student_turns)
    mine, theirs = counted_tokens(encoded.labels), counted_tokens(teacher.labels)
    if mine != theirs:
        if encoded.truncated or teacher.truncated:
            raise RowError(f"data.max_length ({cfg.max_length}) cuts the answer differently in '{cfg.messages_field}' "
                           f"({len(mine)} answer tokens left) and '{field}' ({len(theirs)}); raise data.max_length")
        raise RowError(f"answer tokens differ between '{cfg.messages_field}' and '{field}' ({len(mine)} vs "
                       f"{len(theirs)} tokens): the last assistant turn(s) of '{field}' must be the same text as "
                       f"the student's, and the student's row a chat (format messages)")
    encoded.teacher_input_ids, encoded.teacher_labels = teacher.input_ids, teacher.labels
    encoded.truncated = encoded.truncated or teacher.truncated
    return encoded


def counted_tokens(labels: list[int]) -> list[int]:
    """The tokens a row's loss counts, in order (position 0 is never predicted)."""
    return [label for label in labels[1:] if label != IGNORE]


def example_weight(row: dict, field: str) -> float:
    """The row's loss weight from column `field`: a finite number >= 0 (bools are not numbers here)."""
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        got = "nothing" if field not in row else repr(value)
        raise RowError(f"field '{field}' (data.weight_field) must be a number >= 0, got {got:.40}")
    return float(value)


def example_negative(row: dict, field: str) -> bool:
    """Whether the row is a rejected (negative) completion, from bool column `field`."""
    value = row.get(field)
    if not isinstance(value, bool):
        got = "nothing" if field not in row else repr(value)
        raise RowError(f"field '{field}' (data.negative_field) must be true or false, got {got:.40}")
    return value


def _encode_student(row: dict, fmt: str, tokenizer, cfg: Any) -> Encoded:
    if fmt == "text":
        text = _string(row, cfg.text_field)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return _truncate(ids, list(ids), cfg.max_length)
    if fmt == "prompt_completion":
        prompt, completion = _string(row, cfg.prompt_field), _string(row, cfg.completion_field)
        if cfg.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _encode_chat(messages, tokenizer, cfg)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        prompt_labels = list(prompt_ids) if not cfg.completion_only else [IGNORE] * len(prompt_ids)
        return _truncate(ids, prompt_labels + completion_ids, cfg.max_length)
    if fmt == "messages":
        messages = row.get(cfg.messages_field)
        _check_messages(messages, cfg.messages_field)
        return _encode_chat(messages, tokenizer, cfg)
    raise RowError(f"unknown format {fmt!r}")


def _encode_chat(messages: list[dict], tokenizer, cfg: Any, *, last_turns: Optional[int] = None) -> Encoded:
    """Render with the chat template; assistant spans found by rendering each prefix of the conversation.

    For assistant turn k, the tokens between render(messages[:k], generation prompt) and
    render(messages[:k+1]) are that turn's answer (with its end-of-turn token). This needs
    the template to render prefixes as prefixes, which we check instead of assuming.
    `last_turns`: count only the last that many assistant turns (a teacher chat's demonstrations
    are assistant turns too, but not the answer being distilled); None counts them all.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("the tokenizer has no chat template; use format text or prompt_completion")
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids) if cfg.completion_only else list(ids)
    if cfg.completion_only:
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        counted = set(turns if last_turns is None else turns[max(0, len(turns) - last_turns):])
        for k in sorted(counted):
            start = len(_render(tokenizer, messages[:k], add_generation_prompt=True)) if k else 0
            upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
            if ids[: len(upto)] != upto:
                raise RowError("the chat template does not render conversation prefixes as prefixes; set completion_only: false")
            end = start + _through_end_of_turn(upto[start:], tokenizer)
            labels[start:end] = upto[start:end]
    if all(label == IGNORE for label in labels):
        raise RowError("no assistant turn to learn from")
    return _truncate(ids, labels, cfg.max_length)


def _through_end_of_turn(turn: list[int], tokenizer) -> int:
    """How many tokens of a rendered assistant turn the student learns: up to and including its last special
    token (the end-of-turn marker, e.g. ChatML's <|im_end|>, Llama 3's <|eot_id|>). What a template puts after it
    (ChatML's "\n") is never generated, so it is not a target. A turn without a special token is kept whole."""
    special = set(tokenizer.all_special_ids)
    last = max((i for i, token in enumerate(turn) if token in special), default=len(turn) - 1)
    return last + 1


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _truncate(ids: list[int], labels: list[int], max_length: int) -> Encoded:
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def _string(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__ if key in row else 'nothing'}")
    return value


def _check_messages(messages: Optional[list], key: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"field '{key}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in (
            "system", "user", "assistant", "tool"
        ):
            raise RowError(f"{key}[{i}] must be {{role: system|user|assistant|tool, content: string}}, got {message!r:.80}")
