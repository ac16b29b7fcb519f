"""Tests for kdlm.training.sampling: KV-cached batched sampling for on-policy distillation."""

from __future__ import annotations

import math

import pytest
import torch

from kdlm.training.sampling import Completions, SampleSettings, sample_completions

VOCAB = 448  # tiny models' logit width (see tests/conftest.py MODEL_VOCAB)


@pytest.fixture(scope="module")
def pad_id(tiny_model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return _load(tiny_student_dir)  # near-uniform random model


@pytest.fixture(scope="module")
def teacher(sharp_teacher_dir):
    return _load(sharp_teacher_dir)  # peaked distributions


@pytest.fixture
def fresh_teacher(sharp_teacher_dir):
    return _load(sharp_teacher_dir)  # for tests that change the module's mode/config


@pytest.fixture(scope="module")
def abs_pos_model(pad_id):
    """A tiny GPT-2 with big learned ABSOLUTE position embeddings: RoPE models are blind to a constant position
    shift per row, so only a model like this notices position ids that ignore the left padding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        model = GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            model.transformer.wpe.weight.normal_(0.0, 1.0)
            model.transformer.ln_f.weight.mul_(30.0)
    return model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 400, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [3, 9, 5, 12, 1]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(model, prompts, pad_id, *, stop_ids=(), seed=0, role="student", **settings):
    kwargs = {role: model}
    return sample_completions(prompts=prompts, settings=SampleSettings(**settings), stop_ids=stop_ids, pad_id=pad_id,
                              generator=_gen(seed), vocab=VOCAB, sample_from=role, **kwargs)


def _hf_greedy(model, prompts, pad_id, max_new, eos):
    """Reference: HF generate on a left-padded batch, cut after the first eos (generate pads after it)."""
    from transformers import GenerationConfig

    L = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=0, pad_token_id=pad_id,
                           eos_token_id=eos, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, L:].tolist()
    cut = []
    for row in out:
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        cut.append(row)
    return cut


def _full_logprobs(model, prompt, completion):
    """No-cache reference: log_softmax of one full forward over prompt+completion, at the completion's positions."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(completion), :VOCAB].float()
    return logits.log_softmax(-1)  # [T, V]


def _at(lp, completion):
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# 1 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_top_k_1_matches_hf_greedy_generate_with_left_padding_and_stop(which, teacher, abs_pos_model, pad_id):
    teacher = {"llama": teacher, "gpt2": abs_pos_model}[which]
    prompts = _prompts(LENGTHS)
    free = _hf_greedy(teacher, prompts, pad_id, 10, eos=None)
    ours_free = _run(teacher, prompts, pad_id, top_k=1, max_new_tokens=10)
    assert ours_free.tokens == free
    assert all(len(t) == 10 for t in free)

    stop = free[0][2]  # a token the greedy decode really emits
    ref = _hf_greedy(teacher, prompts, pad_id, 10, eos=stop)
    ours = _run(teacher, prompts, pad_id, top_k=1, max_new_tokens=10, stop_ids=[stop])
    assert ours.tokens == ref
    assert len(ours.tokens[0]) <= 3 and ours.tokens[0][-1] == stop
    assert ours.truncated == [stop not in row for row in ref]
    assert ours.new_tokens == sum(map(len, ref))


def test_vocab_cut_excludes_padding_rows(student, pad_id):
    out = sample_completions(prompts=_prompts([4] * 8), settings=SampleSettings(max_new_tokens=16), stop_ids=[],
                             pad_id=pad_id, generator=_gen(), vocab=7, student=student)
    assert all(0 <= t < 7 for row in out.tokens for t in row)


# 2 ------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_samples_different_seed_different(student, pad_id):
    prompts = _prompts(LENGTHS)
    a = _run(student, prompts, pad_id, max_new_tokens=16, seed=7)
    b = _run(student, prompts, pad_id, max_new_tokens=16, seed=7)
    c = _run(student, prompts, pad_id, max_new_tokens=16, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert len(set(a.tokens[0])) > 4  # really sampled, not stuck on one token


# 3 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_cached_logprobs_equal_full_forward(which, student, abs_pos_model, pad_id):
    student = {"llama": student, "gpt2": abs_pos_model}[which]
    prompts = _prompts(LENGTHS, seed=1)
    out = sample_completions(prompts=prompts, settings=SampleSettings(max_new_tokens=12), stop_ids=[], pad_id=pad_id,
                             generator=_gen(3), vocab=VOCAB, student=student, record_logprobs=True)
    assert out.teacher_logprobs is None
    for p, y, s, beh in zip(prompts, out.tokens, out.student_logprobs, out.behavior_logprobs):
        assert len(y) == len(s) == len(beh) == 12
        assert all(type(v) is float for v in s)
        ref = _at(_full_logprobs(student, p, y), y)
        torch.testing.assert_close(torch.tensor(s), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(beh), ref, atol=1e-4, rtol=0)  # T=1, no filter: behavior == q


def test_behavior_logprobs_follow_hf_temperature_top_k_top_p(teacher, pad_id):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    prompts = _prompts(LENGTHS, seed=2)
    for settings in (SampleSettings(temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=8),
                     SampleSettings(temperature=1.5, top_p=0.5, max_new_tokens=8)):
        out = sample_completions(prompts=prompts, settings=settings, stop_ids=[], pad_id=pad_id, generator=_gen(5),
                                 vocab=VOCAB, teacher=teacher, sample_from="teacher", record_logprobs=True)
        assert out.student_logprobs is None
        for p, y, beh, tl in zip(prompts, out.tokens, out.behavior_logprobs, out.teacher_logprobs):
            raw = _full_logprobs(teacher, p, y)
            z = TemperatureLogitsWarper(settings.temperature)(None, raw.clone())
            if settings.top_k:
                z = TopKLogitsWarper(settings.top_k)(None, z)
            z = TopPLogitsWarper(settings.top_p)(None, z)
            ref = _at(z.log_softmax(-1), y)
            assert torch.isfinite(ref).all()  # every sampled token is inside the filtered support
            torch.testing.assert_close(torch.tensor(beh), ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(tl), _at(raw, y), atol=1e-4, rtol=0)


# 4 ------------------------------------------------------------------------------------------------------------------
def test_teacher_mix_behavior_is_mixture_and_both_models_recorded(student, teacher, pad_id):
    prompts = _prompts(LENGTHS, seed=3)
    alpha = 0.2
    out = sample_completions(prompts=prompts, settings=SampleSettings(max_new_tokens=10, teacher_mix=alpha),
                             stop_ids=[], pad_id=pad_id, generator=_gen(11), vocab=VOCAB, student=student,
                             teacher=teacher, record_logprobs=True)
    gap = 0.0
    for p, y, beh, sl, tl in zip(prompts, out.tokens, out.behavior_logprobs, out.student_logprobs,
                                 out.teacher_logprobs):
        q, pt = _at(_full_logprobs(student, p, y), y), _at(_full_logprobs(teacher, p, y), y)
        torch.testing.assert_close(torch.tensor(sl), q, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(tl), pt, atol=1e-4, rtol=0)
        mix = torch.log(alpha * pt.exp() + (1 - alpha) * q.exp())
        torch.testing.assert_close(torch.tensor(beh), mix, atol=1e-4, rtol=0)
        gap = max(gap, (mix - q).abs().max().item())
    assert gap > 0.1  # the mixture really differs from q


def test_sample_from_teacher_records_teacher_and_student(student, teacher, pad_id):
    prompts = _prompts(LENGTHS, seed=4)
    out = sample_completions(prompts=prompts, settings=SampleSettings(max_new_tokens=8), stop_ids=[], pad_id=pad_id,
                             generator=_gen(2), vocab=VOCAB, student=student, teacher=teacher,
                             sample_from="teacher", record_logprobs=True)
    for p, y, beh, sl, tl in zip(prompts, out.tokens, out.behavior_logprobs, out.student_logprobs,
                                 out.teacher_logprobs):
        pt = _at(_full_logprobs(teacher, p, y), y)
        torch.testing.assert_close(torch.tensor(tl), pt, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(beh), pt, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(sl), _at(_full_logprobs(student, p, y), y), atol=1e-4, rtol=0)


def test_without_record_only_sampling_model_runs(student, teacher, pad_id):
    calls = {"student": 0, "teacher": 0}
    hooks = [m.register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in (("student", student), ("teacher", teacher))]
    try:
        out = sample_completions(prompts=_prompts([3, 4]), settings=SampleSettings(max_new_tokens=4), stop_ids=[],
                                 pad_id=pad_id, generator=_gen(), vocab=VOCAB, student=student, teacher=teacher)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"student": 4, "teacher": 0}  # one prefill + 3 cached decode steps
    assert out.behavior_logprobs is None and out.student_logprobs is None and out.teacher_logprobs is None


# 5 ------------------------------------------------------------------------------------------------------------------
def test_stop_cut_and_truncated_flags(student, pad_id):
    stops = set(range(100, 140))  # ~9% of the near-uniform mass per step
    out = _run(student, _prompts([2, 5, 8, 3] * 4, seed=5), pad_id, max_new_tokens=12, stop_ids=stops, seed=1)
    assert 0 < sum(out.truncated) < len(out.truncated)  # both kinds present
    for row, trunc in zip(out.tokens, out.truncated):
        assert not any(t in stops for t in row[:-1])  # cut at the FIRST stop
        if trunc:
            assert len(row) == 12 and row[-1] not in stops
        else:
            assert 1 <= len(row) <= 12 and row[-1] in stops


# 6 ------------------------------------------------------------------------------------------------------------------
def test_bucketing_and_batch_size_do_not_change_greedy_results(teacher, pad_id):
    prompts = _prompts([4, 11, 2, 7, 7, 1, 9], seed=6)
    stop = _run(teacher, prompts[:1], pad_id, top_k=1, max_new_tokens=3).tokens[0][-1]
    ref = [_run(teacher, [p], pad_id, top_k=1, max_new_tokens=8, stop_ids=[stop]).tokens[0] for p in prompts]
    for bucket in (True, False):
        for bs in (1, 2, 3, None):
            out = _run(teacher, prompts, pad_id, top_k=1, max_new_tokens=8, stop_ids=[stop], bucket=bucket,
                       batch_size=bs)
            assert out.tokens == ref, (bucket, bs)


# 7 ------------------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_and_train_mode(fresh_teacher, pad_id):
    model = fresh_teacher
    prompts = _prompts(LENGTHS, seed=7)
    ref = _hf_greedy(model, prompts, pad_id, 8, eos=None)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False  # as the trainer does
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    seen = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((mod.training, kwargs["input_ids"].shape[1], kwargs.get("use_cache"))),
        with_kwargs=True)
    try:
        out = _run(model, prompts, pad_id, top_k=1, max_new_tokens=8)
    finally:
        hook.remove()
    assert out.tokens == ref  # one-token decode steps are only right if the cache really was used
    assert [s[0] for s in seen] == [False] * 8 and all(s[2] is True for s in seen)
    assert [s[1] for s in seen[1:]] == [1] * 7
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else \
        model.is_gradient_checkpointing
    assert on


def test_autocast_bf16_smoke(student, pad_id):
    out = sample_completions(prompts=_prompts([3, 6]), settings=SampleSettings(max_new_tokens=5), stop_ids=[],
                             pad_id=pad_id, generator=_gen(), vocab=VOCAB, student=student, record_logprobs=True,
                             autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert [len(t) for t in out.tokens] == [5, 5]
    assert all(type(v) is float and v <= 0 for row in out.student_logprobs for v in row)


# 8 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [0, 5])
def test_mixture_sampling_frequencies(student, teacher, pad_id, top_k):
    prompt, n, alpha = _prompts([6], seed=8)[0], 4000, 0.5
    settings = SampleSettings(max_new_tokens=1, teacher_mix=alpha, top_k=top_k)
    out = sample_completions(prompts=[prompt] * n, settings=settings, stop_ids=[], pad_id=pad_id,
                             generator=_gen(13), vocab=VOCAB, student=student, teacher=teacher)
    counts = torch.bincount(torch.tensor([row[0] for row in out.tokens]), minlength=VOCAB).double()
    with torch.no_grad():
        zs = student(input_ids=torch.tensor([prompt])).logits[0, -1, :VOCAB].double()
        zt = teacher(input_ids=torch.tensor([prompt])).logits[0, -1, :VOCAB].double()
    if top_k:
        zs = zs.masked_fill(zs < zs.topk(top_k).values[-1], -math.inf)
        zt = zt.masked_fill(zt < zt.topk(top_k).values[-1], -math.inf)
    q, p = zs.softmax(-1), zt.softmax(-1)
    m = alpha * p + (1 - alpha) * q
    assert (p - q).abs().max() > 0.2  # the sharp teacher makes the mixture differ from q
    freq = counts / n
    se = (m * (1 - m) / n).sqrt()
    assert ((freq - m).abs() <= 5 * se + 1.0 / n).all()
    assert counts[m == 0].sum() == 0
    top = int(p.argmax())
    assert abs(freq[top] - m[top]) < abs(freq[top] - q[top]) - 0.1  # matches m, clearly not q


# validation -----------------------------------------------------------------------------------------------------------
def test_validation_errors_and_empty(student, teacher, pad_id):
    base = dict(stop_ids=[], pad_id=pad_id, generator=_gen(), vocab=VOCAB)
    empty = sample_completions(prompts=[], settings=SampleSettings(), student=student, record_logprobs=True, **base)
    assert isinstance(empty, Completions) and empty.tokens == [] and empty.new_tokens == 0
    assert empty.student_logprobs == [] and empty.teacher_logprobs is None
    cases = [
        (dict(prompts=[[5], []], settings=SampleSettings(), student=student), "prompt 1"),
        (dict(prompts=[[5]], settings=SampleSettings(temperature=0.0), student=student), "temperature"),
        (dict(prompts=[[5]], settings=SampleSettings()), "student"),
        (dict(prompts=[[5]], settings=SampleSettings(teacher_mix=0.3), student=student), "teacher"),
        (dict(prompts=[[5]], settings=SampleSettings(), student=student, sample_from="teacher"), "teacher"),
        (dict(prompts=[[5]], settings=SampleSettings(teacher_mix=0.3), teacher=teacher, sample_from="teacher"),
         "teacher_mix"),
        (dict(prompts=[[5]], settings=SampleSettings(top_p=0.0), student=student), "top_p"),
        (dict(prompts=[[5]], settings=SampleSettings(max_new_tokens=0), student=student), "max_new_tokens"),
        (dict(prompts=[[5]], settings=SampleSettings(batch_size=0), student=student), "batch_size"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sample_completions(**kwargs, **base)
    with pytest.raises(ValueError, match="vocab"):
        sample_completions(prompts=[[5]], settings=SampleSettings(), student=student,
                           **{**base, "vocab": VOCAB + 1})
