"""Packing: several short examples per sequence, so no compute goes to padding.

Examples are placed into rows of at most `pack_length` tokens by first-fit decreasing
(deterministic). Inside a row each example keeps its own positions (position ids restart
at 0) and attends only to itself: the batch carries `position_ids` and no 2-D attention
mask, from which transformers builds a block-diagonal causal mask (SDPA/eager) or uses
variable-length attention (FlashAttention-2). The first token of every example is never
scored, so the last token of one example never "predicts" the first token of the next.
Results equal the unpacked computation (tests/data/test_packing.py).
"""

from __future__ import annotations

from kdlm.data.dataset import Example
from kdlm.data.encode import IGNORE


def pack_examples(examples: list[Example], pack_length: int) -> list[Example]:
    """Pack `examples` into rows of at most `pack_length` tokens; each row lists its members in order."""
    bins: list[list[Example]] = []
    space: list[int] = []
    for ex in sorted(examples, key=lambda e: (-len(e.input_ids), e.sample_id)):
        n = len(ex.input_ids)
        for b, free in enumerate(space):  # first fit
            if n <= free:
                bins[b].append(ex)
                space[b] -= n
                break
        else:
            bins.append([ex])
            space.append(pack_length - n)
    return [_join(members) for members in bins]


def _join(members: list[Example]) -> Example:
    if any(ex.teacher_input_ids is not None for ex in members):
        raise ValueError("examples with the teacher's own input (context distillation) cannot be packed")
    input_ids, labels, positions = [], [], []
    for ex in members:
        input_ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]  # an example's first token has no prediction from inside it
        positions += list(range(len(ex.input_ids)))
    # each member keeps its own loss weight and negative flag (the collator spreads them over its tokens)
    return Example(sample_id=members[0].sample_id, input_ids=input_ids, labels=labels, position_ids=positions,
                   members=[ex.sample_id for ex in members], member_weights=[ex.weight for ex in members],
                   member_negatives=[ex.negative for ex in members])
