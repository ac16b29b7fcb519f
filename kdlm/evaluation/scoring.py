"""What `kdlm eval` asks of a model: batched generation, log-likelihoods of given continuations (classification
options, perplexity references) and the token-level agreement of a student with its teacher.

Contexts are token ids: a chat context is rendered by the tokenizer's chat template (with the generation prompt)
and encoded without extra special tokens; a plain context is encoded with them (e.g. a BOS token). A scored
continuation is encoded on its own (no special tokens) and appended to the context ids, so every model, and the
hand computation in the tests, sees exactly the same tokens. Log-likelihoods are computed from the final hidden
states at the continuation's positions only (never [B, L, V] logits for a whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from kdlm.evaluation.tasks import Context
from kdlm.losses.divergences import per_position_divergence
from kdlm.losses.objective import LMHead, lm_head_of


ROWS_PER_CHUNK = 1024  # logit rows projected at a time
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- encoding


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def flatten_messages(messages: list[dict[str, str]]) -> str:
    """The plain-text fallback of a chat context, for tokenizers without a chat template."""
    return "\n\n".join(m["content"] for m in messages)


def context_ids(tokenizer, context: Context) -> list[int]:
    """Token ids of a context: chat messages through the chat template (ending with the assistant prompt), or text."""
    if isinstance(context, list):
        if has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        context = flatten_messages(context)
    return list(tokenizer(context, add_special_tokens=True)["input_ids"])


def continuation_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def max_positions(model) -> Optional[int]:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


def fit_context(ids: list[int], room: int, limit: Optional[int]) -> list[int]:
    """Keep the last tokens of a context so that `room` more tokens still fit the model's positions."""
    if limit is None or len(ids) + room <= limit:
        return ids
    return ids[-max(limit - room, 1):]


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config and tokenizer, plus end-of-turn markers the vocabulary has."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


# ----------------------------------------------------------------------------- generation


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: Optional[int] = None,
    min_new_tokens: Optional[int] = None,
    stop: Sequence[str] = (),
    desc: str = "generate",
    show_progress: bool = True,
) -> list[str]:
    """Answers to each context (token ids), in order: batched by length with left padding; greedy unless
    `do_sample` (then seeded once before the first batch: same seed and batch size give the same samples)."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(model, tokenizer)
    limit = max_positions(model)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    answers = [""] * len(contexts)
    bar = tqdm(total=len(contexts), desc=desc, unit="ex", disable=not show_progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [fit_context(contexts[i], max_new_tokens, limit) for i in idx]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            input_ids[b, width - len(r):] = torch.tensor(r)
            attention[b, width - len(r):] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos or None,
        )
        for i, row in zip(idx, out[:, width:]):
            answers[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
        bar.update(len(idx))
    bar.close()
    return answers


# ----------------------------------------------------------------------------- log-likelihoods


@dataclass
class Scored:
    """A sequence to score: context ids followed by `n_target` continuation ids (the last n_target of `ids`)."""

    ids: list[int]
    n_target: int


def _hidden(model, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    out = model.base_model(input_ids=input_ids, attention_mask=attention, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, L, H]


def _batches(seqs: Sequence[Scored], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _target_hidden(model, seqs: Sequence[Scored], idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Hidden states at the positions that predict each target token [N, H], the target ids [N], and how many
    targets each sequence contributed. Right padding: a sequence's real tokens keep positions 0..len-1."""
    width = max(len(seqs[i].ids) for i in idx)
    input_ids = torch.zeros((len(idx), width), dtype=torch.long)
    attention = torch.zeros((len(idx), width), dtype=torch.long)
    for b, i in enumerate(idx):
        input_ids[b, :len(seqs[i].ids)] = torch.tensor(seqs[i].ids)
        attention[b, :len(seqs[i].ids)] = 1
    hidden = _hidden(model, input_ids.to(device), attention.to(device))  # [B, L, H]
    rows, batch_pos, counts = [], [], []
    for b, i in enumerate(idx):
        n, length = seqs[i].n_target, len(seqs[i].ids)
        positions = list(range(length - n - 1, length - 1))  # position t predicts token t + 1
        rows += [b] * n
        batch_pos += positions
        counts.append(n)
    targets = torch.tensor([t for i in idx for t in seqs[i].ids[len(seqs[i].ids) - seqs[i].n_target:]], dtype=torch.long)
    return hidden[torch.tensor(rows, dtype=torch.long), torch.tensor(batch_pos, dtype=torch.long)], targets.to(device), counts


def _check(seqs: Sequence[Scored]) -> None:
    for s in seqs:
        if s.n_target < 1 or len(s.ids) - s.n_target < 1:
            raise ValueError(f"a scored sequence needs a non-empty context and continuation (got {len(s.ids)} ids, "
                             f"{s.n_target} targets)")


@torch.no_grad()
def target_logprobs(model, seqs: Sequence[Scored], *, batch_size: int = 8, head: Optional[LMHead] = None,
                    desc: str = "score", show_progress: bool = False) -> list[torch.Tensor]:
    """log p(target token | everything before it) for each continuation token of each sequence: [n_target] each."""
    _check(seqs)
    device = next(model.parameters()).device
    head = head or lm_head_of(model, model.get_output_embeddings().weight.shape[0])
    out: list[Optional[torch.Tensor]] = [None] * len(seqs)
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=not show_progress, leave=False)
    for idx in _batches(seqs, batch_size):
        hidden, targets, counts = _target_hidden(model, seqs, idx, device)
        logprobs = torch.empty(targets.numel(), dtype=torch.float32, device=device)
        for start in range(0, targets.numel(), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            logits = head.logits(hidden[rows])  # [n, V] fp32
            logprobs[rows] = torch.log_softmax(logits, -1).gather(1, targets[rows, None])[:, 0]
        for i, part in zip(idx, logprobs.split(counts)):
            out[i] = part.cpu()
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


@dataclass
class AgreementTotals:
    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, other: "AgreementTotals") -> None:
        self.kl_sum += other.kl_sum
        self.agree += other.agree
        self.tokens += other.tokens

    def as_dict(self) -> dict:
        n = self.tokens
        return {"kl_to_teacher": self.kl_sum / n if n else None, "top1_agreement": self.agree / n if n else None,
                "tokens": n}


@torch.no_grad()
def agreement(teacher, student, seqs: Sequence[Scored], *, vocab: int, batch_size: int = 8,
              desc: str = "agreement", show_progress: bool = False) -> list[AgreementTotals]:
    """Per sequence: KL(p_teacher || p_student) summed over its continuation tokens (temperature 1, over the first
    `vocab` logits both models share), the number of positions where both models' most likely next token agree,
    and the token count."""
    _check(seqs)
    t_dev, s_dev = next(teacher.parameters()).device, next(student.parameters()).device
    t_head, s_head = lm_head_of(teacher, vocab), lm_head_of(student, vocab)
    out: list[AgreementTotals] = [AgreementTotals() for _ in seqs]
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=not show_progress, leave=False)
    for idx in _batches(seqs, batch_size):
        t_hidden, _, counts = _target_hidden(teacher, seqs, idx, t_dev)
        s_hidden, _, _ = _target_hidden(student, seqs, idx, s_dev)
        kl = torch.empty(t_hidden.shape[0], dtype=torch.float64)
        same = torch.empty(t_hidden.shape[0], dtype=torch.bool)
        for start in range(0, t_hidden.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            t_logits = t_head.logits(t_hidden[rows])
            s_logits = s_head.logits(s_hidden[rows]).to(t_logits.device)
            kl[rows] = per_position_divergence(s_logits, t_logits, "forward_kl").double().cpu()
            same[rows] = (s_logits.argmax(-1) == t_logits.argmax(-1)).cpu()
        for i, k, a in zip(idx, kl.split(counts), same.split(counts)):
            out[i] = AgreementTotals(float(k.sum()), int(a.sum()), len(k))
        bar.update(len(idx))
    bar.close()
    return out


def option_sequences(tokenizer, contexts: list[list[int]], options: Sequence[str], prefix: str = "",
                     limit: Optional[int] = None) -> tuple[list[Scored], int]:
    """One Scored sequence per (context, option), context-major; returns them and the number of options."""
    opt_ids = [continuation_ids(tokenizer, prefix + o) for o in options]
    for o, ids in zip(options, opt_ids):
        if not ids:
            raise ValueError(f"option {o!r} encodes to no tokens")
    room = max(len(ids) for ids in opt_ids)
    seqs = [Scored(fit_context(ctx, room, limit) + ids, len(ids)) for ctx in contexts for ids in opt_ids]
    return seqs, len(options)


def option_scores(model, tokenizer, contexts: list[list[int]], options: Sequence[str], *, prefix: str = "",
                  reduce: str = "sum", batch_size: int = 8, desc: str = "options",
                  show_progress: bool = True) -> list[list[float]]:
    """Per context, the log-likelihood of each option as its continuation: summed over the option's tokens
    (`sum`) or averaged (`mean`)."""
    seqs, k = option_sequences(tokenizer, contexts, options, prefix, max_positions(model))
    lps = target_logprobs(model, seqs, batch_size=batch_size, desc=desc, show_progress=show_progress)
    values = [float(lp.sum()) if reduce == "sum" else float(lp.mean()) for lp in lps]
    return [values[j * k:(j + 1) * k] for j in range(len(contexts))]
