"""The generation pipelines end to end with a scripted teacher: rows, provenance, prompt formats and caching
(responses), rejection sampling and the vote (cot), step-by-step rows, demonstrations (context), and the
Self-Instruct instruction pool, each checked against values worked out by hand from the script."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from kdlm.errors import ConfigError, DataError
from kdlm.generation.backends.base import Sampling
from kdlm.generation.pipelines import parse_instructions, read_items, split_rationale
from kdlm.generation.store import request_key

from .conftest import FINGERPRINT, TEACHER, last_user


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- responses

PROMPTS = [
    {"prompt": "Say hi"},
    {"question": "What is 2+2?"},
    {"instruction": "Translate to French", "input": "cat"},
    {"messages": [{"role": "system", "content": "Own system"}, {"role": "user", "content": "Hello there"},
                  {"role": "assistant", "content": "Gold reply"}]},
]


def echo(messages, seed):
    return f"A<{last_user(messages)}|{seed}>"


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def test_responses_rows_messages_and_provenance(prompts_file, make_recipe, scripted, run_generate, read_dataset):
    recipe = make_recipe(prompts_file, n=2, temperature=0.8, seed=10, max_new_tokens=32, system="Be brief.",
                         prompt_template="Q: {prompt}")
    teacher = scripted(echo)
    result = run_generate(recipe, teacher)
    rows, manifest = read_dataset(result.output_dir)

    chats = [  # what each prompt becomes: generate.system unless the chat has its own, the template on the user turn
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: Say hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: Translate to French\n\ncat"}],
        [{"role": "system", "content": "Own system"}, {"role": "user", "content": "Q: Hello there"}],
    ]
    assert result.rows == 8 and len(rows) == 8 and manifest["rows"] == 8
    assert len({r["id"] for r in rows}) == 8
    assert teacher.calls == 4 and [r.n for r in teacher.requests] == [2] * 4 and [r.seed for r in teacher.requests] == [10] * 4
    sampling = Sampling(max_new_tokens=32, temperature=0.8)
    for k, row in enumerate(rows):
        p, j = divmod(k, 2)  # prompt order, then sample order
        chat = chats[p]
        answer = f"A<{chat[-1]['content']}|{10 + j}>"
        assert row["messages"] == chat + [{"role": "assistant", "content": answer}]
        key = request_key({"backend": "openai", "model": "scripted-teacher", "fingerprint": FINGERPRINT,
                           "messages": chat, "sampling": sampling.as_dict(), "seed": 10, "sample_index": j})
        prov = row["provenance"]
        assert row["id"] == key and prov["request_key"] == key
        assert prov["pipeline"] == "responses"
        assert prov["teacher"] == {**TEACHER, "fingerprint": FINGERPRINT}
        assert prov["sampling"] == {**sampling.as_dict(), "seed": 10 + j}
        assert prov["sample_index"] == j
        assert prov["finish_reason"] == "stop"
        assert prov["usage"] == {"prompt_tokens": sum(len(m["content"].split()) for m in chat),
                                 "completion_tokens": len(answer.split())}
        assert prov["latency_s"] == 0.001
        assert prov["verdict"] is None
        assert prov["cached"] is False
        assert prov["source"] == f"{prompts_file}:{p + 1}"
    assert "Gold reply" not in json.dumps(rows)  # the reference turn never goes to the teacher nor into the row


def test_prompt_formats_and_gold(prompts_file, make_recipe):
    items = read_items(make_recipe(prompts_file))
    assert [it.text for it in items] == ["Say hi", "What is 2+2?", "Translate to French\n\ncat", "Hello there"]
    assert [it.gold for it in items] == [None, None, None, "Gold reply"]  # a trailing assistant turn is the gold
    assert items[3].messages == [{"role": "system", "content": "Own system"}, {"role": "user", "content": "Hello there"}]
    assert [it.ref for it in items] == [f"{prompts_file}:{i}" for i in range(1, 5)]
    # an explicit answer column wins over the trailing assistant turn
    path = write_jsonl(prompts_file.parent / "both.jsonl", [{**PROMPTS[3], "answer": "42"}])
    assert read_items(make_recipe(path))[0].gold == "42"
    # generate.prompt_field picks the column
    path = write_jsonl(prompts_file.parent / "field.jsonl", [{"query": "custom column", "prompt": "not this"}])
    assert read_items(make_recipe(path, prompt_field="query"))[0].messages == [{"role": "user", "content": "custom column"}]


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON line"),
    ('{"nothing": "here"}', "no prompt"),
    ('{"prompt": "   "}', "no prompt"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}', "must end with a user turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "non-empty list of {role, content}"),
])
def test_bad_prompt_line_is_a_data_error_naming_file_and_line(tmp_path, make_recipe, scripted, run_generate, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, line])
    teacher = scripted(echo)
    recipe = make_recipe(path)
    with pytest.raises(DataError, match=re.escape(f"{path}:2")) as err:
        run_generate(recipe, teacher)
    assert message in str(err.value)
    assert not teacher.started and not (tmp_path / "out").exists()  # checked before anything is loaded or written


def test_greedy_with_several_samples_is_a_config_error(prompts_file, make_recipe, scripted, run_generate, tmp_path):
    teacher = scripted(echo)
    with pytest.raises(ConfigError, match="generate.n"):
        run_generate(make_recipe(prompts_file, n=2, temperature=0.0), teacher)
    assert not teacher.started and not (tmp_path / "out").exists()


def test_folder_reads_back_in_prompt_order_with_manifest_and_card(prompts_file, make_recipe, scripted, run_generate,
                                                                  read_dataset):
    result = run_generate(make_recipe(prompts_file), scripted(echo))
    rows, manifest = read_dataset(result.output_dir)
    assert [r["messages"][-1]["content"] for r in rows] == [
        "A<Say hi|0>", "A<What is 2+2?|0>", "A<Translate to French\n\ncat|0>", "A<Hello there|0>"]
    assert manifest["format"] == "kdlm-dataset" and manifest["complete"] is True
    assert manifest["shards"] == ["data-00000.jsonl"] and manifest["pipeline"] == "responses"
    assert manifest["counts"] == {"filtered": {}, "finish_reason": {"stop": 4}}
    assert manifest["teacher"]["fingerprint"] == FINGERPRINT
    card = (result.output_dir / "README.md").read_text()
    assert card.startswith("# Teacher-written dataset: `responses`")
    assert "- rows: 4 in 1 shard(s)" in card and "fingerprint `scripted-fp-1`" in card
    assert json.loads((result.output_dir / "summary.json").read_text())["rows"] == 4


def test_identical_rerun_sends_nothing_and_writes_the_same_rows(prompts_file, make_recipe, scripted, run_generate,
                                                                read_dataset):
    recipe = make_recipe(prompts_file, n=2, temperature=0.5)
    first = run_generate(recipe, scripted(echo))
    rows1, _ = read_dataset(first.output_dir)
    again = scripted(echo)
    second = run_generate(recipe, again)
    rows2, _ = read_dataset(second.output_dir)
    assert again.started and again.calls == 0
    assert second.summary["requests"] == 0 and second.summary["samples_cached"] == 8
    assert rows2 == rows1


def test_shared_cache_dir_answers_a_second_output_folder(prompts_file, make_recipe, scripted, run_generate,
                                                         read_dataset, tmp_path):
    cache = tmp_path / "shared_cache"
    run_generate(make_recipe(prompts_file, "out1", cache_dir=str(cache)), scripted(echo))
    again = scripted(echo)
    second = run_generate(make_recipe(prompts_file, "out2", cache_dir=str(cache)), again)
    assert again.calls == 0 and second.rows == 4
    rows1, _ = read_dataset(tmp_path / "out1")
    rows2, _ = read_dataset(tmp_path / "out2")
    assert [r["id"] for r in rows2] == [r["id"] for r in rows1]
    assert [r["messages"] for r in rows2] == [r["messages"] for r in rows1]
    assert all(r["provenance"]["cached"] for r in rows2)
    assert not (tmp_path / "out2" / "request_cache").exists()
    # another fingerprint is another teacher: nothing is reused
    other = scripted(echo, fingerprint="scripted-fp-2")
    run_generate(make_recipe(prompts_file, "out3", cache_dir=str(cache)), other)
    assert other.calls == 4


def test_duplicate_prompts_share_one_row(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    teacher = scripted(echo)
    result = run_generate(make_recipe(path), teacher)
    rows, _ = read_dataset(result.output_dir)
    # one content address, one answer, one row (the later duplicate is answered from the cache)
    assert teacher.calls == 2 and result.summary["samples_cached"] == 1
    assert [r["provenance"]["source"] for r in rows] == [f"{path}:1", f"{path}:3"]


def test_duplicate_prompts_in_flight_are_sent_once(tmp_path, make_recipe, scripted, run_generate):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    teacher = scripted(echo, delay_s=0.01)  # a network teacher: the requests overlap
    run_generate(make_recipe(path), teacher)
    assert teacher.calls == 2


def test_samples_around_a_cached_one_use_their_own_seeds(prompts_file, make_recipe, scripted, tmp_path):
    from kdlm.generation.run import Generator, Limits
    from kdlm.generation.store import JsonlLog, RequestCache

    recipe = make_recipe(prompts_file, n=3, temperature=1.0, seed=100)
    teacher = scripted(lambda messages, seed: f"seed {seed}")
    asyncio.run(teacher.start())
    cache = RequestCache(tmp_path / "cache")
    gen = Generator(recipe, teacher, cache, JsonlLog(tmp_path / "failed.jsonl"), teacher.counters, Limits())
    chat = [{"role": "user", "content": "q"}]
    cache.put([(gen.key(chat, gen.sampling(), 100, 1), {"text": "cached", "finish_reason": "stop"})])
    got = asyncio.run(gen.samples(chat, n=3))
    assert [s.text for s in got] == ["seed 100", "cached", "seed 102"]


# ----------------------------------------------------------------------------- cot

COT_INSTRUCTION = "Solve the problem step by step. End with a line '#### <answer>'."
APPLES = "Tom has 3 apples and buys 4 more. How many apples?"
EGGS = "A box holds 6 eggs. How many eggs are in 2 boxes?"
PENS = "Sam had 9 pens and lost 4. How many are left?"
PAGES = "Ann reads 4 pages then 5 more. How many pages?"
COT_PROMPTS = [
    {"question": APPLES, "answer": "3 + 4 = 7\n#### 7"},
    {"question": EGGS, "answer": "6 * 2 = 12\n#### 12"},
    {"question": PENS, "answer": "9 - 4 = 5\n#### 5"},
    {"messages": [{"role": "user", "content": PAGES}, {"role": "assistant", "content": "4 + 5 = 9\n#### 9"}]},
]
# the teacher's rationale for each question by sample seed (seed 0, n 4: round 1 is seeds 0-3, round 2 seeds 4-7)
COT_SCRIPT = {
    APPLES: {0: "Tom starts with 3 apples. 3 + 4 = 7. So the answer is 7.", 1: "3 + 4 = 8\n#### 8",
             2: "I cannot tell.", 3: "Adding gives 7.\n#### 7"},
    EGGS: {0: "#### 11", 1: "#### 10", 2: "no idea", 3: "#### 6",
           4: "#### 13", 5: "Two boxes of 6 is 12. The answer is 12.", 6: "#### 2", 7: "unsure"},
    PENS: {s: ("#### 13" if s % 2 == 0 else "hmm") for s in range(8)},
    PAGES: {0: "#### 20", 1: "#### 1", 2: "4 + 5 = 9\n#### 9", 3: "#### 45"},
}
V, R, N = "verified", "rejected", "no_answer"
COT_VERDICTS = {APPLES: [V, R, N, V], EGGS: [R, R, N, R, R, V, R, N], PENS: [R, N] * 4, PAGES: [R, R, V, R]}
COT_GOLD = {APPLES: "7", EGGS: "12", PENS: "5", PAGES: "9"}


def question_of(messages) -> str:
    user = last_user(messages)
    return next(q for q in COT_SCRIPT if user.startswith(q))


def cot_teacher(messages, seed):
    return COT_SCRIPT[question_of(messages)][seed]


@pytest.fixture
def cot_file(tmp_path):
    return write_jsonl(tmp_path / "gsm.jsonl", COT_PROMPTS)


def run_cot(make_recipe, scripted, run_generate, cot_file, out="cot", **generate):
    teacher = scripted(cot_teacher)
    options = {"pipeline": "cot", "n": 4, "temperature": 0.7, "max_rounds": 2, **generate}
    return run_generate(make_recipe(cot_file, out, **options), teacher), teacher


def test_cot_verdicts_negatives_and_gold(cot_file, make_recipe, scripted, run_generate, read_dataset):
    result, teacher = run_cot(make_recipe, scripted, run_generate, cot_file)
    rows, manifest = read_dataset(result.output_dir)
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(question_of(row["messages"]), []).append(row)
    assert list(by_question) == [APPLES, EGGS, PENS, PAGES]  # prompt order
    for question, verdicts in COT_VERDICTS.items():
        got = by_question[question]
        assert [r["provenance"]["sample_index"] for r in got] == list(range(len(verdicts)))
        assert [r["verdict"] for r in got] == verdicts
        assert [r["provenance"]["verdict"] for r in got] == verdicts
        assert [r["negative"] for r in got] == [v != V for v in verdicts]
        assert {r["answer"] for r in got} == {COT_GOLD[question]}
        for r in got:
            seed = r["provenance"]["sample_index"]
            assert r["messages"] == [{"role": "user", "content": f"{question}\n{COT_INSTRUCTION}"},
                                     {"role": "assistant", "content": COT_SCRIPT[question][seed]}]
    # provenance.answer is what the verifier read from the rationale (absent when it read nothing)
    apples = by_question[APPLES]
    assert [r["provenance"].get("answer") for r in apples] == ["7", "8", None, "7"]
    assert manifest["counts"]["verdict"] == {V: 4, R: 13, N: 7}


def test_cot_resamples_only_questions_without_a_verified_rationale(cot_file, make_recipe, scripted, run_generate,
                                                                   read_dataset):
    result, teacher = run_cot(make_recipe, scripted, run_generate, cot_file)
    rows, _ = read_dataset(result.output_dir)
    late = {question_of(r["messages"]) for r in rows if r["provenance"]["sample_index"] >= 4}
    assert late == {EGGS, PENS}
    assert teacher.calls == 6
    second_round = [question_of(r.messages) for r in teacher.requests if r.seed == 4]
    assert sorted(second_round) == sorted([EGGS, PENS]) and all(r.n == 4 for r in teacher.requests)
    assert sorted({r["provenance"]["sample_index"] for r in rows if question_of(r["messages"]) == PENS}) == list(range(8))
    s = result.summary
    assert (s["questions"], s["cot_samples"], s["verified_samples"], s["questions_verified"]) == (4, 24, 4, 3)
    assert s["verified_fraction"] == pytest.approx(4 / 24, abs=1e-12)
    assert s["questions_verified_fraction"] == 0.75


def test_cot_one_round_stops_after_the_first(cot_file, make_recipe, scripted, run_generate):
    result, teacher = run_cot(make_recipe, scripted, run_generate, cot_file, max_rounds=1)
    assert teacher.calls == 4 and result.rows == 16
    assert result.summary["verified_fraction"] == pytest.approx(3 / 16, abs=1e-12)


def test_cot_without_negatives_keeps_only_verified(cot_file, make_recipe, scripted, run_generate, read_dataset):
    result, _ = run_cot(make_recipe, scripted, run_generate, cot_file, keep_negatives=False)
    rows, manifest = read_dataset(result.output_dir)
    assert [(question_of(r["messages"]), r["provenance"]["sample_index"]) for r in rows] == [
        (APPLES, 0), (APPLES, 3), (EGGS, 5), (PAGES, 2)]
    assert all(r["verdict"] == V and r["negative"] is False for r in rows)
    assert manifest["counts"]["verdict"] == {V: 4}
    assert result.summary["verified_fraction"] == pytest.approx(4 / 24, abs=1e-12)  # the figures count every sample


def test_cot_without_gold_votes_a_pseudo_label(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    path = write_jsonl(tmp_path / "nogold.jsonl", [{"question": "Q one"}, {"question": "Q two"}])
    script = {"Q one": ["#### 5", "so 5\n#### 5", "#### 6", "no idea"], "Q two": ["nothing", "nope", "none", "no"]}
    teacher = scripted(lambda m, seed: script[last_user(m).split("\n")[0]][seed])
    result = run_generate(make_recipe(path, pipeline="cot", n=4, temperature=0.7, max_rounds=3), teacher)
    rows, _ = read_dataset(result.output_dir)
    assert teacher.calls == 2  # nothing to verify against: no resampling round
    one, two = rows[:4], rows[4:]
    assert [r["verdict"] for r in one] == [V, V, R, N]
    assert {(r["answer"], r["pseudo_label"], r["vote_share"]) for r in one} == {("5", True, 0.5)}
    assert [r["negative"] for r in one] == [False, False, True, True]
    assert [r["verdict"] for r in two] == [N] * 4
    assert {(r["answer"], r["vote_share"]) for r in two} == {(None, 0.0)}
    assert result.summary["verified_fraction"] == 2 / 8


# ----------------------------------------------------------------------------- step_by_step

# (question, cot sample index) of every verified rationale, with its split
STEPS = [
    (APPLES, 0, "Tom starts with 3 apples. 3 + 4 = 7.", "7"),
    (APPLES, 3, "Adding gives 7.", "7"),
    (EGGS, 5, "Two boxes of 6 is 12.", "12"),
    (PAGES, 2, "4 + 5 = 9", "9"),
]


def expected_step_rows(alpha: float) -> list[tuple]:
    out = []
    for question, _, rationale, label in STEPS:
        out.append(([{"role": "user", "content": f"[label] {question}"}, {"role": "assistant", "content": label}],
                    "label", alpha))
        out.append(([{"role": "user", "content": f"[rationale] {question}"},
                     {"role": "assistant", "content": rationale}], "rationale", 1 - alpha))
    return out


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_step_by_step_from_a_cot_folder(alpha, cot_file, make_recipe, scripted, run_generate, read_dataset, tmp_path):
    cot, _ = run_cot(make_recipe, scripted, run_generate, cot_file)
    cot_rows, _ = read_dataset(cot.output_dir)
    teacher = scripted(cot_teacher)
    options = {"alpha": alpha} if alpha is not None else {}
    result = run_generate(make_recipe(cot.output_dir, "steps", pipeline="step_by_step", temperature=0.7, **options),
                          teacher)
    rows, manifest = read_dataset(result.output_dir)
    assert teacher.calls == 0 and result.summary["requests"] == 0
    assert [(r["messages"], r["task"], r["weight"]) for r in rows] == expected_step_rows(alpha if alpha else 0.5)
    verified = [(i, r) for i, r in enumerate(cot_rows) if r["verdict"] == V]
    assert [r["id"] for r in rows] == [f"{r['id']}:{task}" for _, r in verified for task in ("label", "rationale")]
    assert [r["provenance"]["cot_source"] for r in rows] == [
        f"{cot.output_dir}/data-00000.jsonl:{i + 1}" for i, _ in verified for _ in range(2)]
    assert {r["provenance"]["pipeline"] for r in rows} == {"step_by_step"}
    assert manifest["counts"]["task"] == {"label": 4, "rationale": 4}
    assert "weight" in manifest["columns"] and "task" in manifest["columns"]


def test_step_by_step_from_plain_questions_runs_cot_inline(cot_file, make_recipe, scripted, run_generate,
                                                           read_dataset):
    teacher = scripted(cot_teacher)
    result = run_generate(make_recipe(cot_file, pipeline="step_by_step", n=4, temperature=0.7, max_rounds=2), teacher)
    rows, _ = read_dataset(result.output_dir)
    assert teacher.calls == 6  # the same requests as the cot run: round 2 for eggs and pens only
    assert [(r["messages"], r["task"], r["weight"]) for r in rows] == expected_step_rows(0.5)
    refs = {APPLES: 1, EGGS: 2, PAGES: 4}
    assert [r["provenance"]["cot_source"] for r in rows] == [f"{cot_file}:{refs[q]}" for q, *_ in STEPS for _ in "lr"]


def test_step_by_step_from_a_cot_folder_needs_no_sampling_settings(cot_file, make_recipe, scripted, run_generate):
    cot, _ = run_cot(make_recipe, scripted, run_generate, cot_file)
    result = run_generate(make_recipe(cot.output_dir, "steps", pipeline="step_by_step"), scripted(cot_teacher))
    assert result.rows == 8


@pytest.mark.parametrize("text, expected", [
    ("Tom has 3. 3 + 4 = 7. So the answer is 7.", ("Tom has 3. 3 + 4 = 7.", "7")),
    ("Two boxes. The answer is: 12.", ("Two boxes.", "12")),
    ("4 + 5 = 9\n#### 9", ("4 + 5 = 9", "9")),
    ("So the answer is 3. Wait, no. So the answer is 4.", ("So the answer is 3. Wait, no.", "4")),  # the last match
    ("The answer is 5. #### 5. So the answer is 6", ("The answer is 5. #### 5.", "6")),  # the first pattern found
    ("  no marker here  ", ("no marker here", "")),
])
def test_split_rationale(text, expected):
    assert split_rationale(text, ["So the answer is", "The answer is", "####"]) == expected


# ----------------------------------------------------------------------------- context

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]


@pytest.fixture
def capitals_file(tmp_path):
    return write_jsonl(tmp_path / "capitals.jsonl",
                       [{"question": f"Capital of {c}?", "answer": city} for c, city in CAPITALS])


def guess(messages, seed):
    return f"Guess for {last_user(messages)}"


def test_context_demonstrations_reach_the_teacher_not_the_student(capitals_file, make_recipe, scripted, run_generate,
                                                                   read_dataset):
    teacher = scripted(guess)
    result = run_generate(make_recipe(capitals_file, pipeline="context", k_shot=2, seed=3), teacher)
    rows, manifest = read_dataset(result.output_dir)
    assert len(rows) == 5 and teacher.calls == 5
    for i, row in enumerate(rows):
        question = f"Capital of {CAPITALS[i][0]}?"
        answer = f"Guess for {question}"
        refs = row["demonstrations"]
        lines = [int(ref.rsplit(":", 1)[1]) for ref in refs]
        assert len(lines) == 2 and len(set(lines)) == 2 and i + 1 not in lines  # never its own demonstration
        assert all(ref.startswith(f"{capitals_file}:") for ref in refs)
        shots = []
        for line in lines:
            country, city = CAPITALS[line - 1]
            shots += [{"role": "user", "content": f"Capital of {country}?"}, {"role": "assistant", "content": city}]
        assert row["teacher_messages"] == shots + [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": answer}]
        assert row["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        assert row["teacher_messages"][:-1] in teacher.seen()  # the teacher got the demonstrations
    assert all(len(chat) == 5 for chat in teacher.seen())
    assert {"teacher_messages", "demonstrations"} <= set(manifest["columns"])
    # seeded: a second run in another folder draws the same demonstrations
    again = run_generate(make_recipe(capitals_file, "again", pipeline="context", k_shot=2, seed=3), scripted(guess))
    assert [r["demonstrations"] for r in read_dataset(again.output_dir)[0]] == [r["demonstrations"] for r in rows]


def test_context_student_sees_demonstrations_and_instruction(capitals_file, make_recipe, scripted, run_generate,
                                                             read_dataset):
    teacher = scripted(guess)
    result = run_generate(make_recipe(capitals_file, pipeline="context", k_shot=3, student_sees_demonstrations=True,
                                      system="SYS", context_instruction="Answer like the examples."), teacher)
    rows, _ = read_dataset(result.output_dir)
    for row in rows:
        assert row["messages"] == row["teacher_messages"]
        assert row["messages"][0] == {"role": "system", "content": "SYS\n\nAnswer like the examples."}
        assert [m["role"] for m in row["messages"]] == ["system"] + ["user", "assistant"] * 4
    # without the student seeing them, the student keeps its own system message, without the teacher's instruction
    result = run_generate(make_recipe(capitals_file, "plain", pipeline="context", k_shot=3, system="SYS",
                                      context_instruction="Answer like the examples."), scripted(guess))
    first = read_dataset(result.output_dir)[0][0]
    assert first["messages"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Capital of France?"},
                                 {"role": "assistant", "content": "Guess for Capital of France?"}]


def test_context_needs_enough_demonstrations(tmp_path, make_recipe, scripted, run_generate):
    rows = [{"question": f"Capital of {c}?", "answer": city} for c, city in CAPITALS[:3]] + [{"question": "No answer?"}]
    path = write_jsonl(tmp_path / "few.jsonl", rows)
    teacher = scripted(guess)
    with pytest.raises(DataError, match="3 rows with an answer .* fewer than generate.k_shot = 3"):
        run_generate(make_recipe(path, pipeline="context", k_shot=3), teacher)  # each prompt needs 3 others
    assert not teacher.started
    result = run_generate(make_recipe(path, pipeline="context", k_shot=2), scripted(guess))
    assert result.rows == 4


def test_context_demonstrations_file(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = write_jsonl(tmp_path / "inputs.jsonl", [{"question": "Capital of Italy?"}, {"question": "Capital of Spain?"}])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"question": "Capital of France?", "answer": "Paris"},
                                                   {"question": "No answer here?"},
                                                   {"question": "Capital of Japan?", "answer": "Tokyo"}])
    teacher = scripted(guess)
    result = run_generate(make_recipe(prompts, pipeline="context", k_shot=2, demonstrations=str(demos)), teacher)
    rows, _ = read_dataset(result.output_dir)
    for row in rows:
        assert sorted(row["demonstrations"]) == [f"{demos}:1", f"{demos}:3"]
        pairs = {(row["teacher_messages"][k]["content"], row["teacher_messages"][k + 1]["content"]) for k in (0, 2)}
        assert pairs == {("Capital of France?", "Paris"), ("Capital of Japan?", "Tokyo")}
    with pytest.raises(DataError, match=re.escape(f"{demos}: 2 rows with an answer")):
        run_generate(make_recipe(prompts, "more", pipeline="context", k_shot=3, demonstrations=str(demos)),
                     scripted(guess))


def test_context_demonstration_field(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = write_jsonl(tmp_path / "inputs.jsonl", [{"question": "Capital of Italy?"}])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"question": "Capital of France?", "output": "Paris"},
                                                   {"question": "Capital of Japan?", "output": "Tokyo"}])
    result = run_generate(make_recipe(prompts, pipeline="context", k_shot=2, demonstrations=str(demos),
                                      demonstration_field="output"), scripted(guess))
    row = read_dataset(result.output_dir)[0][0]
    assert {m["content"] for m in row["teacher_messages"] if m["role"] == "assistant"} >= {"Paris", "Tokyo"}


# ----------------------------------------------------------------------------- self_instruct

SEEDS = ["Write a haiku about the ocean at night", "List three uses of a paperclip", "Explain gravity to a child",
         "Summarize the rules of chess briefly", "Suggest a name for a coffee shop", "Give tips for a job interview",
         "Convert ten miles to kilometers", "Describe a sunset over mountains"]
GOOD = ["Compose a limerick featuring a forgetful wizard", "Outline steps for planting tomato seedlings",
        "Compare electric cars against diesel trucks", "Recommend novels for teenage mystery fans",
        "Estimate monthly grocery costs for students", "Rewrite this sentence using passive voice",
        "Identify logical fallacies within political speeches", "Propose weekend activities during rainy weather"]
NEAR_SEED = "Write a haiku about the ocean at dawn"  # ROUGE-L 0.875 against the first seed
BANNED = re.compile(r"\b(image|images|graph|graphs|picture|pictures|file|files|map|maps|draw|plot|go to|video|audio|"
                    r"music|flowchart|diagram)\b", re.I)
INSTRUCTION_REQUEST = re.compile(r"^Come up with a series of diverse tasks\. Here are (\d+) examples:\n(.*)\n\n"
                                 r"Write 8 new tasks, different from these and from each other, one per line, "
                                 r"numbered from (\d+)\.$", re.S)


class InstructionTeacher:
    """Answers instruction requests with numbered lines: `per_request` new good tasks among rejects, else an answer."""

    def __init__(self, per_request: int = 2):
        self.per_request = per_request
        self.next_good = 0

    def __call__(self, messages, seed):
        user = last_user(messages)
        m = INSTRUCTION_REQUEST.match(user)
        if m is None:
            return f"Answer: {user}"
        start = int(m.group(3))
        good = [GOOD[(self.next_good + k) % len(GOOD)] for k in range(self.per_request)]
        self.next_good += self.per_request
        lines = ["1. Plan a picnic menu for eight hungry hikers",  # numbered below `start`: not a new task
                 good[0], "Sing.", "Draw a picture of a cat sitting on a mat", NEAR_SEED, good[0],
                 "(optional) Provide feedback on student essays", *good[1:]]
        return "\n".join([lines[0]] + [f"{start + k}. {text}" for k, text in enumerate(lines[1:])])


def test_self_instruct_pool_rules_prompts_and_rows(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    from rouge_score.rouge_scorer import RougeScorer

    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in SEEDS])
    teacher = scripted(InstructionTeacher(per_request=2))
    result = run_generate(make_recipe(seeds, pipeline="self_instruct", num_instructions=5, concurrency=1), teacher)
    rows, manifest = read_dataset(result.output_dir)

    kept = [r["messages"][0]["content"] for r in rows]
    assert kept == GOOD[:5]
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": t}, {"role": "assistant", "content": f"Answer: {t}"}]
                                             for t in kept]
    assert [r["instruction_round"] for r in rows] == [1, 1, 2, 2, 3]
    assert all(r["provenance"]["source"].startswith("self_instruct:") for r in rows)
    assert "instruction_round" in manifest["columns"]
    # the rules, checked with rouge_score itself
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    assert scorer.score(SEEDS[0], NEAR_SEED)["rougeL"].fmeasure > 0.7  # the near duplicate is one
    for i, text in enumerate(kept):
        assert 3 <= len(text.split()) <= 150 and not BANNED.search(text)
        for other in SEEDS + kept[:i]:
            assert scorer.score(other, text)["rougeL"].fmeasure <= 0.7
    # stops at num_instructions: 2 kept per request, so 3 rounds of 1 request, then the 5 answers
    asked = [r for r in teacher.requests if INSTRUCTION_REQUEST.match(last_user(r.messages))]
    assert len(asked) == 3 and teacher.calls == 8
    assert result.summary["self_instruct_rounds"] == 3 and result.summary["instructions_kept"] == 5
    assert result.summary["instructions_rejected"] == {"length": 2, "keyword": 2, "rouge": 4, "format": 2}
    # each request shows 6 seed tasks and (once there are) 2 generated ones, numbered 1..8, asks from 9
    so_far: list[str] = []
    for request in asked:
        m = INSTRUCTION_REQUEST.match(last_user(request.messages))
        shown = [re.match(r"^(\d+)\. (.*)$", line).groups() for line in m.group(2).split("\n")]
        assert [int(k) for k, _ in shown] == list(range(1, int(m.group(1)) + 1))
        texts = [t for _, t in shown]
        from_seeds = [t for t in texts if t in SEEDS]
        generated = [t for t in texts if t in so_far]
        assert len(from_seeds) == 6 and len(set(from_seeds)) == 6
        assert len(generated) == min(2, len(so_far)) and len(texts) == 6 + len(generated)
        assert int(m.group(3)) == len(texts) + 1
        assert request.sampling.temperature == 0.7  # instruction rounds sample even when the answers are greedy
        so_far = kept[: len(so_far) + 2]
    assert all(r.sampling.temperature == 0.0 for r in teacher.requests if r not in asked)


def test_self_instruct_keeps_exactly_num_instructions(tmp_path, make_recipe, scripted, run_generate):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in SEEDS])
    teacher = scripted(InstructionTeacher(per_request=2))
    # 3 requests a round, 2 new tasks each: the second reaches 3, the third must add nothing
    result = run_generate(make_recipe(seeds, pipeline="self_instruct", num_instructions=3, concurrency=3), teacher)
    assert result.rows == 3 and result.summary["instructions_kept"] == 3


def test_self_instruct_rerun_sends_nothing(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in SEEDS])
    recipe = make_recipe(seeds, pipeline="self_instruct", num_instructions=4, concurrency=1)
    first = run_generate(recipe, scripted(InstructionTeacher()))
    again = scripted(InstructionTeacher())
    second = run_generate(recipe, again)
    assert again.calls == 0
    assert read_dataset(second.output_dir)[0] == read_dataset(first.output_dir)[0]


def test_parse_instructions():
    text = ("8. An old example\n9. Write a haiku about spring\n**10.** **Bold task here**\nTask 11: Name three rivers\n"
            '12) Plan a trip\nnot numbered\n13 - List primes\n14.   \n15. "Quoted task"\n')
    assert parse_instructions(text, 9) == ["Write a haiku about spring", "Bold task here", "Name three rivers",
                                           "Plan a trip", "List primes", "Quoted task"]
    assert parse_instructions(text, 14) == ["Quoted task"]
    assert parse_instructions("no numbers at all", 1) == []
