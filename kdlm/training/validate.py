"""Held-out figures of a student against its teacher, per counted token:

- ce: the student's cross-entropy on the reference tokens (nats/token);
- kl_to_teacher: KL(p_teacher || p_student) at temperature 1 (a true KL, teacher entropy included);
- top1_agreement: share of positions where the student's argmax equals the teacher's;
- teacher_ce: the teacher's own cross-entropy on the same tokens (a floor for reading `ce`).
With an offline top-k cache as the teacher, kl_to_teacher is the tail-bucket KL (a lower bound
of the dense KL) at the cache temperature, and teacher_ce is NaN (not computable from top-k).
Without a teacher (an objective of ce / redi terms only) only ce and tokens are reported.
Across tokenizers (alm / uld terms) there is no shared vocabulary to take a KL over; the figures are then over
the byte-aligned chunks (kdlm.data.alignment), whose likelihoods both models define:
- chunk_gap: mean over counted chunks of |log p_teacher(chunk) - log p_student(chunk)| (nats per chunk);
- chunk_logp_gap: mean of log p_teacher(chunk) - log p_student(chunk) (> 0: the teacher finds the text likelier);
- chunks: how many chunks were compared.
Both models run under the same autocast as training.

The figures are unweighted: per-example loss weights do not enter them, and tokens of negative
(rejected) examples are left out, since they are not references to imitate.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdlm.data.dataset import Collator, Example
from kdlm.losses.cross_tokenizer import chunk_logprobs, token_logprobs
from kdlm.losses.divergences import per_position_divergence
from kdlm.losses.fused import DEFAULT_CHUNK_BYTES, chunk_rows
from kdlm.losses.objective import lm_head_of
from kdlm.losses.sparse import SparseTeacher, sparse_validation_figures
from kdlm.training.step import TeacherRows, counted_positions, last_hidden, model_inputs, teacher_autocast, teacher_signal


@torch.no_grad()
def validate(
    student: torch.nn.Module,
    teacher,
    examples: list[Example],
    *,
    collator: Collator,
    batch_size: int,
    vocab: int,
    accelerator=None,
    max_batches: Optional[int] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, float]:
    """Validation figures over `examples` (sharded across processes when an accelerator is given).
    `teacher` is a live `Teacher`, a `CachedTeacher`, or None (no term needs one: ce only)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(student.parameters()).device
    head = lm_head_of(student, vocab)
    rows_per_chunk = chunk_rows(vocab, ["ce", "forward_kl"], chunk_bytes=chunk_bytes)
    was_training = student.training
    student.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # ce, kl, agree, tokens, teacher ce
    aligned = torch.zeros(3, dtype=torch.float64, device=device)  # cross-tokenizer: |gap| sum, gap sum, chunks
    loader = DataLoader(examples[rank::world], batch_size=batch_size, collate_fn=collator)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        mask, targets = counted_positions(batch["labels"])
        signal = None
        if teacher is not None:
            with teacher_autocast(accelerator) if accelerator else contextlib.nullcontext():
                signal = teacher_signal(teacher, batch, features=False)  # live: hidden states [N, H_t]; cache: top-k
        with accelerator.autocast() if accelerator else contextlib.nullcontext():
            hidden = last_hidden(student, model_inputs(batch))[:, :-1][mask]  # [N, H]
        if signal is not None and "student_chunk" in batch:  # across tokenizers: chunk likelihoods, no KL
            student_lp = token_logprobs(hidden, head, targets, chunk_rows=rows_per_chunk)  # [N], no [N, V] logits
            totals[0] -= student_lp.sum().double()
            totals[3] += targets.numel()
            aligned += _chunk_gaps(student_lp, batch["student_chunk"][:, 1:][mask], signal)
            continue
        if "negative" in batch:  # rejected completions are not references: keep the positive tokens only
            keep = ~batch["negative"][:, 1:][mask]  # [N]
            hidden, targets = hidden[keep], targets[keep]
            signal = _select(signal, keep)
        # a chunk of rows at a time: never [N, V] logits for the whole batch
        for start in range(0, targets.numel(), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            student_logits = head.logits(hidden[rows])  # [n, V] fp32
            if signal is None:
                totals[0] += F.cross_entropy(student_logits, targets[rows], reduction="sum").double()
                continue
            if isinstance(signal, SparseTeacher):
                figures = sparse_validation_figures(student_logits, signal.slice_rows(rows.start, rows.start + len(
                    student_logits)), targets[rows])
                totals[:3] += torch.stack([figures["ce"], figures["kl"], figures["top1_agreement"]])
                totals[4] = float("nan")  # a top-k cache cannot give the teacher's own CE
                continue
            teacher_logits = signal.head.logits(signal.hidden[rows])  # [n, V] fp32
            totals[0] += F.cross_entropy(student_logits, targets[rows], reduction="sum").double()
            totals[1] += per_position_divergence(student_logits, teacher_logits, "forward_kl").sum().double()
            totals[2] += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
            totals[4] += F.cross_entropy(teacher_logits, targets[rows], reduction="sum").double()
        totals[3] += targets.numel()
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    student.train(was_training)
    n = max(totals[3].item(), 1.0)
    if aligned[2] > 0:
        aligned = accelerator.reduce(aligned, reduction="sum") if accelerator is not None and world > 1 else aligned
        chunks = aligned[2].item()
        return {"ce": totals[0].item() / n, "tokens": int(totals[3].item()), "chunk_gap": aligned[0].item() / chunks,
                "chunk_logp_gap": aligned[1].item() / chunks, "chunks": int(chunks)}
    if teacher is None:
        return {"ce": totals[0].item() / n, "tokens": int(totals[3].item())}
    return {"ce": totals[0].item() / n, "kl_to_teacher": totals[1].item() / n,
            "top1_agreement": totals[2].item() / n, "tokens": int(totals[3].item()), "teacher_ce": totals[4].item() / n}


def _chunk_gaps(student_lp: torch.Tensor, chunk: torch.Tensor, signal: TeacherRows) -> torch.Tensor:
    """[3] float64: sum over the batch's counted chunks of |log p_t - log p_s|, of log p_t - log p_s, and their count.
    student_lp [N]: the student's log-prob of each counted token; chunk [N]: its chunk id (-1: not counted)."""
    keep = chunk >= 0
    num = int(signal.chunks.max()) + 1 if signal.chunks.numel() else 0
    if num == 0:
        return torch.zeros(3, dtype=torch.float64, device=student_lp.device)
    student = chunk_logprobs(student_lp[keep], chunk[keep], num).double()
    teacher = chunk_logprobs(token_logprobs(signal.hidden, signal.head, signal.targets), signal.chunks, num).double()
    gap = teacher - student
    return torch.stack([gap.abs().sum(), gap.sum(), torch.tensor(float(num), dtype=torch.float64, device=gap.device)])


def _select(signal, keep: torch.Tensor):
    """The teacher's signal at the kept counted positions (`keep` [N] bool)."""
    if signal is None:
        return None
    if isinstance(signal, SparseTeacher):
        keep = keep.to(signal.ids.device)
        return SparseTeacher(signal.ids[keep], signal.logprobs[keep], signal.tail_logprob[keep], signal.temperature)
    return TeacherRows(signal.hidden[keep], signal.head)
