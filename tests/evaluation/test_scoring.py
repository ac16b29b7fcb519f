"""Model-side scoring on the tiny random Llamas, against manual full-logit computations."""

from __future__ import annotations

import pytest
import torch

from kdlm.evaluation import scoring


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    return teacher, student, AutoTokenizer.from_pretrained(tiny_model_dir)


def manual_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation token | prefix) from one unbatched forward pass over the full logits."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)  # [L, V]
    n = len(continuation)
    positions = range(len(context) - 1, len(context) - 1 + n)
    return sum(logprobs[p, t].item() for p, t in zip(positions, continuation))


def test_context_ids_use_the_chat_template(models):
    _, _, tok = models
    ids = scoring.context_ids(tok, [{"role": "user", "content": "Hello world!"}])
    assert tok.decode(ids) == "<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    plain = scoring.context_ids(tok, "Hello world!")
    assert plain[0] == tok.bos_token_id  # plain text gets the tokenizer's special tokens


def test_option_scores_equal_manual_log_likelihood(models):
    teacher, _, tok = models
    chats = [[{"role": "user", "content": text}] for text in
             ("The film was great. Is this review positive or negative?", "Bad.", "How are you today? One two three.")]
    contexts = [scoring.context_ids(tok, c) for c in chats]
    options = ["negative", "positive", "so-so indeed"]  # different token lengths -> padding inside batches
    got = scoring.option_scores(teacher, tok, contexts, options, batch_size=4, show_progress=False)
    for ctx, row in zip(contexts, got):
        for option, value in zip(options, row):
            expected = manual_logprob(teacher, ctx, scoring.continuation_ids(tok, option))
            assert value == pytest.approx(expected, abs=1e-4)
    # per-token mean
    mean = scoring.option_scores(teacher, tok, contexts[:1], options, reduce="mean", batch_size=2, show_progress=False)
    n = len(scoring.continuation_ids(tok, "so-so indeed"))
    assert mean[0][2] == pytest.approx(got[0][2] / n, abs=1e-5)


def test_target_logprobs_independent_of_batching(models):
    teacher, _, tok = models
    seqs = [scoring.Scored(scoring.context_ids(tok, t) + scoring.continuation_ids(tok, " fox"), len(scoring.continuation_ids(tok, " fox")))
            for t in ("The quick brown", "Hello", "One two three four five six seven eight nine ten.")]
    one = scoring.target_logprobs(teacher, seqs, batch_size=1)
    many = scoring.target_logprobs(teacher, seqs, batch_size=3)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty context"):
        scoring.target_logprobs(teacher, [scoring.Scored([1, 2], 2)])


def test_agreement_equals_manual_kl_and_top1(models):
    teacher, student, tok = models
    ctx = scoring.context_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    answer = scoring.continuation_ids(tok, "Paris is the capital of France.")
    ctx2 = scoring.context_ids(tok, "Hello")
    answer2 = scoring.continuation_ids(tok, " world!")
    seqs = [scoring.Scored(ctx + answer, len(answer)), scoring.Scored(ctx2 + answer2, len(answer2))]
    vocab = 448
    got = scoring.agreement(teacher, student, seqs, vocab=vocab, batch_size=2)
    for seq, totals in zip(seqs, got):
        ids = torch.tensor([seq.ids])
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits[0, :, :vocab].double(), -1)
            s = torch.log_softmax(student(ids).logits[0, :, :vocab].double(), -1)
        pos = slice(len(seq.ids) - seq.n_target - 1, len(seq.ids) - 1)
        kl = (t[pos].exp() * (t[pos] - s[pos])).sum(-1)  # KL(teacher || student) per position
        assert totals.tokens == seq.n_target
        assert totals.kl_sum == pytest.approx(kl.sum().item(), rel=1e-4)
        assert totals.agree == int((t[pos].argmax(-1) == s[pos].argmax(-1)).sum())
    same = scoring.agreement(teacher, teacher, seqs, vocab=vocab)
    assert all(abs(x.kl_sum) < 1e-5 and x.agree == x.tokens for x in same)


def test_generate_greedy_and_seeded_sampling(models):
    teacher, _, tok = models
    contexts = [scoring.context_ids(tok, [{"role": "user", "content": t}]) for t in ("Hello", "The quick brown fox jumps")]
    greedy = scoring.generate(teacher, tok, contexts, max_new_tokens=5, batch_size=2, show_progress=False)
    assert greedy == scoring.generate(teacher, tok, contexts, max_new_tokens=5, batch_size=1, show_progress=False)
    a = scoring.generate(teacher, tok, contexts, max_new_tokens=6, do_sample=True, seed=3, show_progress=False)
    b = scoring.generate(teacher, tok, contexts, max_new_tokens=6, do_sample=True, seed=3, show_progress=False)
    assert a == b and any(a)


def test_cut_at_stop():
    assert scoring.cut_at_stop("42\n\nQuestion: next", ["\n\nQuestion:"]) == "42"
    assert scoring.cut_at_stop(" 42 ", []) == "42"
