"""Hygiene filters: hand-made rows per filter, ROUGE-L dedup against a brute-force reference, the registry."""

from __future__ import annotations

import random
import time

import pytest

from kdlm.errors import ConfigError, DataError
from kdlm.generation import filters
from kdlm.generation.filters import (
    FILTERS,
    RougeLIndex,
    check_end_of_turn,
    decontaminate,
    dedup_exact,
    dedup_rouge,
    drop_truncated,
    end_of_turn,
    get_filter,
    prompt_text,
    register_filter,
    repeated_ngrams,
    response_text,
    rouge_l_max,
    run_filter,
    template_end_of_turn,
)


def chat(prompt: str, response: str, finish_reason: str = "stop") -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ],
        "provenance": {"finish_reason": finish_reason},
    }


def responses(rows: list[dict]) -> list[str]:
    return [response_text(r) for r in rows]


@pytest.fixture(scope="module")
def scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


# ----------------------------------------------------------------------------- row access


def test_response_and_prompt_text():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert response_text(row) == "d"  # the last assistant turn
    assert prompt_text(row) == "a\nc"  # the user turns
    assert response_text({"prompt": "p", "completion": "x"}) == "x"
    assert prompt_text({"prompt": "p", "completion": "x"}) == "p"
    assert response_text({"text": "t"}) == "t"
    assert response_text({}) == "" and prompt_text({}) == ""


# ----------------------------------------------------------------------------- drop_truncated


def test_drop_truncated():
    rows = [chat("q1", "done."), chat("q2", "and then", "length"), {"completion": "no provenance"}]
    kept, dropped = drop_truncated(rows)
    assert kept == [rows[0], rows[2]]
    assert dropped == [(rows[1], "truncated: finish_reason=length")]
    kept, dropped = drop_truncated(rows, reasons=["length", "stop"])
    assert kept == [rows[2]] and len(dropped) == 2


# ----------------------------------------------------------------------------- dedup_exact


def test_dedup_exact_on_pair_prompt_response():
    rows = [chat("What is 2+2?", "4"), chat("What is  2+2? ", " 4"), chat("What is 2+2?", "Four"), chat("Hi", "4")]
    kept, dropped = dedup_exact(rows)
    assert kept == [rows[0], rows[2], rows[3]]  # whitespace differences do not make a new pair
    assert dropped == [(rows[1], "exact duplicate (pair) of row 0")]
    assert dedup_exact(rows, on="prompt")[0] == [rows[0], rows[3]]
    assert dedup_exact(rows, on="response")[0] == [rows[0], rows[2]]
    with pytest.raises(ConfigError, match=r"generate\.filters\.dedup_exact\.on"):
        dedup_exact(rows, on="both")


# ----------------------------------------------------------------------------- dedup_rouge


def _brute_force_kept(texts: list[str], threshold: float, scorer) -> list[int]:
    """Self-Instruct's filter, literally: keep a text unless its ROUGE-L with some kept one exceeds threshold."""
    kept: list[int] = []
    for i, text in enumerate(texts):
        if all(scorer.score(texts[k], text)["rougeL"].fmeasure <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_dedup_rouge_matches_brute_force(seed, threshold, scorer):
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran far 7 Cat, mat.".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 9))) for _ in range(50)]
    rows = [{"prompt": f"p{i}", "completion": t} for i, t in enumerate(texts)]
    kept, dropped = dedup_rouge(rows, threshold=threshold)
    assert [rows.index(r) for r in kept] == _brute_force_kept(texts, threshold, scorer)
    assert len(kept) + len(dropped) == len(rows)


@pytest.mark.parametrize("seed", range(4))
def test_rouge_l_max_matches_brute_force(seed, scorer):
    rng = random.Random(100 + seed)
    words = "alpha beta gamma delta eps zeta eta theta".split()
    pool = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(40)]
    for candidate in [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(10)]:
        reference = max(scorer.score(p, candidate)["rougeL"].fmeasure for p in pool)
        assert rouge_l_max(candidate, pool) == reference  # the same float, not only close


def test_rouge_index_max_score_and_edges():
    index = RougeLIndex()
    for text in ["the cat sat on the mat", "a dog ran far away", ""]:
        index.add(text)
    score, where = index.max_score("the cat sat on a mat")
    assert where == 0 and score == pytest.approx(2 * 5 / 12)  # LCS 5 of lengths 6 and 6: F = 2L/(m+n)
    assert index.max_score("") == (0.0, None)
    assert index.first_above("unrelated words only", 0.1) is None
    assert rouge_l_max("anything", []) == 0.0


def test_dedup_rouge_threshold_is_strict_and_on_prompt():
    # LCS 1 of two 2-word texts: F = 2*1/4 = 0.5 exactly, which is not > 0.5
    rows = [{"prompt": "red car", "completion": "x"}, {"prompt": "red bus", "completion": "y"}]
    assert dedup_rouge(rows, threshold=0.5, on="prompt")[0] == rows
    kept, dropped = dedup_rouge(rows, threshold=0.4, on="prompt")
    assert kept == rows[:1] and dropped[0][1] == "near duplicate (prompt): ROUGE-L 0.500 > 0.4 with row 0"
    with pytest.raises(ConfigError, match="threshold"):
        dedup_rouge(rows, threshold=1.5)


def test_dedup_rouge_speed_on_2000_rows():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    zipf = [1 / (i + 1) for i in range(3000)]  # word frequencies of natural text
    texts: list[str] = []
    for _ in range(2000):
        if texts and rng.random() < 0.1:  # a paraphrase: an earlier response with 10% of its words replaced
            words = rng.choice(texts).split()
            for _ in range(len(words) // 10):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choices(vocab, zipf, k=rng.randint(50, 300))))
    start = time.perf_counter()
    kept, dropped = dedup_rouge([{"completion": t} for t in texts])
    seconds = time.perf_counter() - start
    print(f"dedup_rouge on 2000 rows (50-300 words): {seconds:.2f} s, {len(dropped)} dropped")
    assert 150 < len(dropped) < 250  # the ~200 paraphrases, about
    assert seconds < 60  # brute force would take hours; a loose bound that a loaded CI machine still meets


# ----------------------------------------------------------------------------- repeated_ngrams


def test_repeated_ngrams():
    loop = "I am sorry, I cannot help. " * 10
    varied = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."
    rows = [chat("q", loop), chat("q", varied), chat("q", "too short")]
    kept, dropped = repeated_ngrams(rows)
    assert kept == rows[1:]
    assert dropped[0][0] is rows[0] and dropped[0][1].startswith("repetitive: ")
    assert filters.repeated_share(loop) == pytest.approx(1 - 6 / 57)  # 60 words, 57 4-grams, 6 distinct
    assert repeated_ngrams(rows, max_share=0.95)[0] == rows
    with pytest.raises(ConfigError):
        repeated_ngrams(rows, n=0)


# ----------------------------------------------------------------------------- decontaminate

EVAL_QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four."
)


@pytest.fixture
def eval_file(make_jsonl):
    return make_jsonl([{"question": EVAL_QUESTION, "answer": "#### 18"}, {"id": 2, "question": "Too short."}], "test.jsonl")


def test_decontaminate_drops_overlaps_in_prompt_or_response(eval_file):
    rows = [
        chat(EVAL_QUESTION.upper().replace(".", "!"), "18"),  # case and punctuation do not hide it
        chat("Solve this.", "Recall: janet's ducks lay 16 eggs per day; she eats three for breakfast every morning..."),
        chat("Janet has ducks that lay 16 eggs a day.", "She sells the rest."),  # a paraphrase: no shared 13-gram
        chat("Too short.", "Too short."),  # under 13 words: not checked
    ]
    kept, dropped = decontaminate(rows, files=[str(eval_file)])
    assert kept == rows[2:]
    assert [d[0] for d in dropped] == rows[:2]
    assert dropped[0][1].startswith("contaminated: prompt shares the 13-gram 'janet s ducks lay")
    assert dropped[1][1].startswith("contaminated: response shares")
    short = decontaminate(rows[3:], files=[str(eval_file)], n=2)[1]  # now "too short" is a 2-gram too
    assert short == [(rows[3], "contaminated: prompt shares the 2-gram 'too short' with evaluation data")]


def test_decontaminate_fields_option(eval_file):
    rows = [chat(EVAL_QUESTION, "x")]
    assert decontaminate(rows, files=[str(eval_file)], fields=["answer"])[0] == rows


def test_decontaminate_errors(tmp_path, make_jsonl):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl"):
        decontaminate([], files=[str(missing)])
    with pytest.raises(ConfigError, match=r"generate\.filters\.decontaminate\.files"):
        decontaminate([])
    bad = make_jsonl(['{"question": "ok"}', "{not json"], "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        decontaminate([chat("q", "r")], files=[str(bad)])


# ----------------------------------------------------------------------------- end_of_turn

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_end_of_turn_filter(tiny_tokenizer):
    rows = [
        chat("q", "Fine answer."),
        chat("q", "Done.<|im_end|>\n<|im_start|>user\nmore"),  # the student's own end-of-turn token
        chat("q", "Done.<|eot_id|>"),  # a Llama 3 teacher's template leaked
        chat("q", "Use <s>strike</s> in HTML."),  # </s> is the tiny student's eos
    ]
    kept, dropped = end_of_turn(rows, tokenizer=tiny_tokenizer)
    assert kept == rows[:1]
    assert [reason for _, reason in dropped] == [
        "response contains '<|im_start|>' (a special token of the student)",
        "response contains '<|eot_id|>' (a chat-template marker)",
        "response contains '</s>' (a special token of the student)",
    ]
    # without a student tokenizer, plain <s>/</s> are HTML, not markers
    assert end_of_turn(rows)[0] == [rows[0], rows[3]]
    assert end_of_turn(rows[:1], extra_markers=["Fine"])[0] == []


def test_check_end_of_turn_chatml(tiny_tokenizer):
    assert template_end_of_turn(tiny_tokenizer) == "<|im_end|>"
    warning = check_end_of_turn(tiny_tokenizer, ["ok"])
    assert "'<|im_end|>'" in warning and "eos is '</s>'" in warning  # ChatML turns end with im_end, eos is </s>
    tiny_tokenizer.eos_token = "<|im_end|>"
    assert check_end_of_turn(tiny_tokenizer, ["ok", "fine"]) is None
    assert check_end_of_turn(tiny_tokenizer, ["ok", "leak <|eot_id|>"]) == "1 of 2 teacher outputs contain chat-template markers"


def test_check_end_of_turn_llama3_and_bare_templates(tiny_tokenizer):
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tiny_tokenizer.chat_template = LLAMA3_TEMPLATE
    assert template_end_of_turn(tiny_tokenizer) == "<|eot_id|>"
    assert "'<|eot_id|>'" in check_end_of_turn(tiny_tokenizer)
    tiny_tokenizer.eos_token = "<|eot_id|>"
    assert check_end_of_turn(tiny_tokenizer) is None
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert "no special token" in check_end_of_turn(tiny_tokenizer)
    tiny_tokenizer.chat_template = None
    assert check_end_of_turn(tiny_tokenizer) == "the student tokenizer has no chat template"


# ----------------------------------------------------------------------------- registry and contract


def test_builtins_are_registered():
    assert set(FILTERS) >= {"drop_truncated", "dedup_exact", "dedup_rouge", "repeated_ngrams", "decontaminate", "end_of_turn"}
    assert get_filter("dedup_rouge") is dedup_rouge


def test_unknown_filter_names_the_nearest():
    with pytest.raises(ConfigError, match=r"^generate\.filters: .*'dedup_rogue'.*did you mean 'dedup_rouge'"):
        get_filter("dedup_rogue")


def test_duplicate_filter_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_filter("dedup_exact")(dedup_exact)


def test_run_filter_checks_options():
    rows = [chat("q", "a"), chat("q", "a")]
    assert run_filter("dedup_exact", rows, on="response") == ([rows[0]], [(rows[1], "exact duplicate (response) of row 0")])
    with pytest.raises(ConfigError, match=r"generate\.filters\.dedup_rouge\.treshold: .*did you mean 'threshold'"):
        run_filter("dedup_rouge", rows, treshold=0.5)


def test_user_filter_by_name(monkeypatch):
    monkeypatch.setattr(filters, "_REGISTRY", dict(filters._REGISTRY))  # keep the real registry clean

    @register_filter("short_only")
    def short_only(rows, *, max_chars: int = 5):
        kept = [r for r in rows if len(response_text(r)) <= max_chars]
        return kept, [(r, "too long") for r in rows if len(response_text(r)) > max_chars]

    rows = [chat("q", "ok"), chat("q", "far too long")]
    assert run_filter("short_only", rows) == ([rows[0]], [(rows[1], "too long")])


def test_every_builtin_partitions_its_rows_in_order(eval_file, tiny_tokenizer):
    rows = [chat("q", "same"), chat("q", "same"), chat("q2", "loop " * 20, "length"), chat(EVAL_QUESTION, "x <|im_end|>")]
    options = {"decontaminate": {"files": [str(eval_file)]}, "end_of_turn": {"tokenizer": tiny_tokenizer}}
    for name in ("drop_truncated", "dedup_exact", "dedup_rouge", "repeated_ngrams", "decontaminate", "end_of_turn"):
        kept, dropped = get_filter(name)(rows, **options.get(name, {}))
        assert dropped, name  # each catches its row here
        assert kept == [r for r in rows if all(r is not d for d, _ in dropped)], name
        assert len(kept) + len(dropped) == len(rows), name
        assert all(isinstance(reason, str) and "\n" not in reason for _, reason in dropped), name
