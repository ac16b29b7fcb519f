"""Teacher/student tokenizer compatibility.

Logit distillation compares the two models' distributions token by token, so both
must map the same strings to the same ids. We compare vocabularies (token -> id),
not tokenizer names. Embedding matrices are often padded past the real vocabulary
(Qwen2-7B has 152,064 rows, smaller Qwen2 models 151,936): the distributions are
then compared over the shared real vocabulary only. Padding the smaller side with
zero logits, as some toolkits do, would give those fake tokens probability mass.
"""

from __future__ import annotations

from kdlm.errors import ModelError


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int) -> int:
    """Number of leading logit columns both models agree on; raise ModelError if the vocabularies differ.

    `*_rows` are the models' output-embedding rows (logit width), which may exceed the tokenizer's size.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_t = sorted(set(teacher_vocab) - set(student_vocab), key=teacher_vocab.get)[:3]
        only_s = sorted(set(student_vocab) - set(teacher_vocab), key=student_vocab.get)[:3]
        moved = [t for t in teacher_vocab if t in student_vocab and teacher_vocab[t] != student_vocab[t]][:3]
        detail = []
        if only_t:
            detail.append(f"only the teacher has {only_t}")
        if only_s:
            detail.append(f"only the student has {only_s}")
        if moved:
            detail.append(f"ids differ for {moved}")
        raise ModelError(
            f"teacher and student tokenizers differ (teacher {len(teacher_vocab)} tokens, student "
            f"{len(student_vocab)}; {'; '.join(detail)}): logit distillation needs a shared vocabulary"
        )
    real = max(teacher_vocab.values()) + 1
    for role, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < real:
            raise ModelError(f"{role} has {rows} output rows but its tokenizer has ids up to {real - 1}")
    return min(teacher_rows, student_rows)
