"""From a recipe's `data` section to tokenised train/validation examples and padded batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from kdlm.data.encode import IGNORE, RowError, detect_format, encode_row, example_negative, example_weight
from kdlm.data.sources import RawRows, read_rows
from kdlm.errors import DataError


@dataclass
class Example:
    sample_id: str  # where the row came from (`file:line`); stable across shuffles and resumes
    input_ids: list[int]
    labels: list[int]
    position_ids: Optional[list[int]] = None  # packed rows only: positions restart at 0 for each member
    members: Optional[list[str]] = None  # packed rows only: sample ids of the examples in the row, in order
    weight: float = 1.0  # loss weight of every counted token (data.weight_field)
    negative: bool = False  # a rejected completion: counted by the redi term only (data.negative_field)
    teacher_input_ids: Optional[list[int]] = None  # context distillation: the teacher's own input ...
    teacher_labels: Optional[list[int]] = None  # ... whose counted tokens are the student's counted tokens
    member_weights: Optional[list[float]] = None  # packed rows only: each member's weight, in order
    member_negatives: Optional[list[bool]] = None  # packed rows only: each member's negative flag, in order
    domain: Optional[str] = None  # data.domain_field: the row's domain (DDK's domain-weighted sampling)
    # Rows sampled during training (kdlm.training.sources): the completion was drawn by the student or teacher.
    sampled: bool = False
    # ... and, when the objective needs them, per-token log-probs of each sampled token (aligned with input_ids,
    # 0.0 on the prompt): of the proposal it was drawn from, and of the untempered student and teacher then.
    sample_logprobs: Optional[dict[str, list[float]]] = None
    # Multi-teacher, loss.teacher_pooling: domain: the index of the teacher the row's domain is routed to.
    route: Optional[int] = None
    # Cross-tokenizer terms (kdlm.data.alignment): per token, the index of its counted byte-aligned chunk, or -1;
    # student_chunk runs along input_ids, teacher_chunk along teacher_input_ids (the teacher's tokens of the text).
    student_chunk: Optional[list[int]] = None
    teacher_chunk: Optional[list[int]] = None

    @property
    def prompt_length(self) -> int:
        """Tokens before the first counted one: the prompt a sampled completion continues."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))

    def spans(self) -> list[tuple[int, int, float, bool]]:
        """(start, end, weight, negative) of each example in the row: the row itself, or each packed member."""
        if self.position_ids is None or self.member_weights is None:
            return [(0, len(self.input_ids), self.weight, self.negative)]
        starts = [i for i, p in enumerate(self.position_ids) if p == 0] + [len(self.input_ids)]
        negatives = self.member_negatives or [False] * len(self.member_weights)
        return [(a, b, w, n) for a, b, w, n in zip(starts, starts[1:], self.member_weights, negatives)]


@dataclass
class DataReport:
    """What happened to the rows: printed before training and written into the run folder."""

    rows: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_empty: int = 0  # no counted token left (e.g. truncation cut the whole completion)
    train_examples: int = 0
    validation_examples: int = 0
    train_counted_tokens: int = 0
    negative_examples: int = 0  # train + validation examples marked negative by data.negative_field
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        negatives = f" ({self.negative_examples} negative)" if self.negative_examples else ""
        return (
            f"{self.rows} rows -> {self.train_examples} train / {self.validation_examples} validation examples"
            f"{negatives}; {self.train_counted_tokens} counted train tokens; truncated {self.truncated}, "
            f"skipped bad {self.skipped_bad}, dropped with nothing to learn {self.dropped_empty}"
        )


def encode_rows(raw: RawRows, tokenizer, cfg: Any, report: DataReport, desc: str) -> list[Example]:
    """Encode every row, naming `file:line` for a bad one (or skipping it under skip_bad_rows)."""
    out = []
    for row, where in tqdm(list(zip(raw.rows, raw.locations)), desc=desc, unit="row", leave=False, disable=len(raw.rows) < 2000):
        report.rows += 1
        try:
            fmt = cfg.format if cfg.format != "auto" else detect_format(
                row, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                completion_field=cfg.completion_field, messages_field=cfg.messages_field,
            )
            encoded = encode_row(row, fmt, tokenizer, cfg)
            weight = example_weight(row, cfg.weight_field) if cfg.weight_field else 1.0
            negative = example_negative(row, cfg.negative_field) if cfg.negative_field else False
        except RowError as err:
            if cfg.skip_bad_rows:
                report.skipped_bad += 1
                continue
            raise DataError(f"{where}: {err}; set data.skip_bad_rows to skip such rows") from None
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        report.truncated += encoded.truncated
        if all(label == IGNORE for label in encoded.labels[1:]):  # position 0 is never predicted
            report.dropped_empty += 1
            continue
        report.negative_examples += negative
        domain = _domain(row, cfg.domain_field, where) if cfg.domain_field else None
        out.append(Example(where, encoded.input_ids, encoded.labels, weight=weight, negative=negative,
                           teacher_input_ids=encoded.teacher_input_ids, teacher_labels=encoded.teacher_labels,
                           domain=domain))
    report.skipped_bad += raw.skipped
    return out


def _domain(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: data.domain_field {field!r} must be a non-empty string, got {value!r}")
    return value


def prepare_data(cfg: Any, tokenizer, *, seed: int) -> tuple[list[Example], list[Example], DataReport]:
    """Read, encode and split the recipe's data. Validation is `cfg.validation` or a seeded held-out share."""
    if not cfg.train:
        raise DataError("data.train: no training data given")
    report = DataReport()
    train = encode_rows(read_rows(cfg.train, cfg.train_split, skip_bad_rows=cfg.skip_bad_rows, limit=cfg.max_samples),
                        tokenizer, cfg, report, "encode train")
    if cfg.validation:
        raw_val = read_rows(cfg.validation, cfg.validation_split, skip_bad_rows=cfg.skip_bad_rows)
        validation = encode_rows(raw_val, tokenizer, cfg, report, "encode validation")
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = round(len(train) * cfg.validation_fraction)
        if cfg.validation_fraction > 0 and len(train) > 1:
            n_val = max(1, n_val)
        held = set(order[:n_val])
        validation = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"{cfg.train}: no usable training examples ({report.summary()})")
    report.train_examples, report.validation_examples = len(train), len(validation)
    report.train_counted_tokens = sum(sum(label != IGNORE for label in ex.labels[1:]) for ex in train)
    return train, validation, report


class Collator:
    """Right-pad Examples into a batch: input_ids, labels [B, L] and attention_mask [B, L], plus sample ids.

    A batch of packed rows carries position_ids [B, L] instead of an attention mask: the padding
    after a row's last member gets positions 0, 1, ... so it forms a block of its own, never attended
    by real tokens. `sample_ids` lists the examples in the order their scored positions appear.
    Only when some example needs them:
    - token_weights [B, L] fp32: the loss weight of the example each token belongs to (some weight != 1);
    - negative [B, L] bool: the token belongs to a negative example (some example is negative);
    - teacher_input_ids, teacher_labels, teacher_attention_mask [B, L_t]: the teacher's own input
      (context distillation, or its own tokens of the text in a cross-tokenizer run), padded like the student's;
    - student_chunk [B, L], teacher_chunk [B, L_t] long: cross-tokenizer chunk ids, made unique across the batch
      (row r's ids are offset by the counted chunks of rows before it), -1 outside counted chunks;
    - teacher_route [B, L] long: multi-teacher domain routing, the teacher index of each row.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[Example]) -> dict:
        longest = max(len(ex.input_ids) for ex in batch)
        width = -(-longest // self.multiple) * self.multiple
        packed = any(ex.position_ids is not None for ex in batch)
        input_ids, labels, attention_mask = self._pad([ex.input_ids for ex in batch], [ex.labels for ex in batch], width)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex.input_ids)
            position_ids[row, :n] = torch.tensor(ex.position_ids if ex.position_ids is not None else range(n))
            position_ids[row, n:] = torch.arange(width - n)
        out = {"input_ids": input_ids, "labels": labels,
               "sample_ids": [sid for ex in batch for sid in (ex.members or [ex.sample_id])]}
        if packed:
            out["position_ids"] = position_ids
        else:
            out["attention_mask"] = attention_mask
        # the common case (every weight 1, nothing negative) builds neither tensor
        if any(w != 1.0 for ex in batch for w in (ex.member_weights or [ex.weight])):
            out["token_weights"] = self._per_token(batch, width, torch.float32, lambda weight, negative: weight)
        if any(ex.negative or any(ex.member_negatives or []) for ex in batch):
            out["negative"] = self._per_token(batch, width, torch.bool, lambda weight, negative: negative)
        if any(ex.teacher_input_ids is not None for ex in batch):
            out.update(self._teacher_inputs(batch))
        if any(ex.route is not None for ex in batch):
            out["teacher_route"] = self._per_row(batch, width, torch.long, lambda ex: ex.route)
        if any(ex.student_chunk is not None for ex in batch):
            out.update(self._chunks(batch, width, out["teacher_input_ids"].shape[1]))
        if any(ex.sampled for ex in batch):
            out["sampled"] = self._per_row(batch, width, torch.bool, lambda ex: ex.sampled)
            keys = sorted({k for ex in batch for k in (ex.sample_logprobs or {})})
            for key in keys:  # [B, L] fp32: 0 on prompts, padding and data rows
                rows = torch.zeros((len(batch), width), dtype=torch.float32)
                for row, ex in enumerate(batch):
                    if ex.sample_logprobs and key in ex.sample_logprobs:
                        values = ex.sample_logprobs[key]
                        rows[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
                out[f"{key}_logprobs"] = rows
        return out

    @staticmethod
    def _per_row(batch: list[Example], width: int, dtype: torch.dtype, value) -> torch.Tensor:
        """[B, L]: value(example) on each row's tokens."""
        out = torch.zeros((len(batch), width), dtype=dtype)
        for row, ex in enumerate(batch):
            out[row, : len(ex.input_ids)] = value(ex)
        return out

    def _pad(self, ids: list[list[int]], labels: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded input_ids, labels (-100) and attention_mask, each [B, width]."""
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        label_rows = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            n = len(row_ids)
            input_ids[row, :n] = torch.tensor(row_ids)
            label_rows[row, :n] = torch.tensor(row_labels)
            attention_mask[row, :n] = 1
        return input_ids, label_rows, attention_mask

    @staticmethod
    def _per_token(batch: list[Example], width: int, dtype: torch.dtype, value) -> torch.Tensor:
        """[B, L]: value(weight, negative) of the example (packed member) each token belongs to."""
        out = torch.zeros((len(batch), width), dtype=dtype)
        for row, ex in enumerate(batch):
            for start, end, weight, negative in ex.spans():
                out[row, start:end] = value(weight, negative)
        return out

    @staticmethod
    def _chunks(batch: list[Example], width: int, teacher_width: int) -> dict:
        """Cross-tokenizer chunk ids per token, offset per row so that they are unique in the batch."""
        student = torch.full((len(batch), width), -1, dtype=torch.long)
        teacher = torch.full((len(batch), teacher_width), -1, dtype=torch.long)
        offset = 0
        for row, ex in enumerate(batch):
            if ex.student_chunk is None or ex.teacher_chunk is None:
                raise ValueError(f"{ex.sample_id}: a batch mixes aligned and unaligned examples")
            s, t = torch.tensor(ex.student_chunk, dtype=torch.long), torch.tensor(ex.teacher_chunk, dtype=torch.long)
            student[row, : len(s)] = torch.where(s >= 0, s + offset, s)
            teacher[row, : len(t)] = torch.where(t >= 0, t + offset, t)
            offset += int(s.max().item()) + 1 if len(s) and s.max() >= 0 else 0
        return {"student_chunk": student, "teacher_chunk": teacher}

    def _teacher_inputs(self, batch: list[Example]) -> dict:
        if any(ex.teacher_input_ids is None for ex in batch):
            missing = next(ex.sample_id for ex in batch if ex.teacher_input_ids is None)
            raise ValueError(f"{missing}: a batch mixes examples with and without the teacher's own input")
        longest = max(len(ex.teacher_input_ids) for ex in batch)
        width = -(-longest // self.multiple) * self.multiple
        input_ids, labels, attention_mask = self._pad([ex.teacher_input_ids for ex in batch],
                                                      [ex.teacher_labels for ex in batch], width)
        return {"teacher_input_ids": input_ids, "teacher_labels": labels, "teacher_attention_mask": attention_mask}
