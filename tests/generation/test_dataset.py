"""The dataset folder `kdlm generate` writes: shards, manifest, card, filtered rows, dry runs, and the checks
that keep one output folder from being mixed up with another generation or with unrelated files."""

from __future__ import annotations

import json

import pytest

from kdlm.errors import ConfigError, OutputError
from kdlm.generation.run import Limits

from .conftest import last_user


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def shard_lines(folder) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted(folder.glob("data-*.jsonl"))}


def echo(messages, seed):
    return f"A<{last_user(messages)}>"


# ----------------------------------------------------------------------------- filters through the recipe

FILTER_PROMPTS = [
    {"prompt": "p one"},
    {"prompt": "p two"},  # the teacher is cut off here
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "p one"}]},  # same prompt and answer
    {"prompt": "p four"},
]


def filter_teacher(messages, seed):
    user = last_user(messages)
    return ("cut off mid", "length") if user == "p two" else f"answer to {user}"


def test_filters_drop_rows_into_filtered_jsonl(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", FILTER_PROMPTS)
    steps = [{"name": "drop_truncated"}, {"name": "dedup_exact"}]
    result = run_generate(make_recipe(prompts, filters=steps), scripted(filter_teacher))
    rows, manifest = read_dataset(result.output_dir)
    assert [r["messages"][-2:] for r in rows] == [
        [{"role": "user", "content": "p one"}, {"role": "assistant", "content": "answer to p one"}],
        [{"role": "user", "content": "p four"}, {"role": "assistant", "content": "answer to p four"}]]
    dropped = [json.loads(line) for line in (result.output_dir / "filtered.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dropped] == ["drop_truncated: truncated: finish_reason=length",
                                             "dedup_exact: exact duplicate (pair) of row 0"]
    assert [d["row"]["provenance"]["source"] for d in dropped] == [f"{prompts}:2", f"{prompts}:3"]
    assert manifest["rows"] == 2 and result.rows == 2 and result.summary["rows_before_filters"] == 4
    assert manifest["counts"]["filtered"] == {"drop_truncated": 1, "dedup_exact": 1}
    assert manifest["counts"]["finish_reason"] == {"stop": 2}
    # filters are operational: a re-run without them rebuilds all rows from the row log, sending nothing
    again = scripted(filter_teacher)
    result = run_generate(make_recipe(prompts), again)
    assert again.calls == 0 and result.rows == 4
    assert not (result.output_dir / "filtered.jsonl").exists()


@pytest.mark.parametrize("steps, message", [
    ([{"name": "dedup_exact", "options": {"bogus": 1}}], "generate.filters.dedup_exact.bogus: unknown option"),
    ([{"name": "dedup_exakt"}], "unknown filter 'dedup_exakt'; did you mean 'dedup_exact'?"),
])
def test_unknown_filter_or_option_is_a_config_error(tmp_path, make_recipe, scripted, run_generate, steps, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", FILTER_PROMPTS)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        run_generate(make_recipe(prompts, filters=steps), scripted(filter_teacher))


def test_unknown_filter_option_is_refused_before_any_request(tmp_path, make_recipe, scripted, run_generate):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", FILTER_PROMPTS)
    teacher = scripted(filter_teacher)
    with pytest.raises(ConfigError):
        run_generate(make_recipe(prompts, filters=[{"name": "dedup_exact", "options": {"bogus": 1}}]), teacher)
    assert teacher.calls == 0


def test_filter_step_keys_are_checked(make_recipe, tmp_path):
    with pytest.raises(ConfigError, match=r"generate\.filters\.0\.threshold: unknown field"):
        make_recipe(tmp_path / "p.jsonl", filters=[{"name": "dedup_rouge", "threshold": 0.7}])


# ----------------------------------------------------------------------------- shards and manifest

def seven_prompts(tmp_path):
    return write_jsonl(tmp_path / "seven.jsonl", [{"prompt": f"prompt {i}"} for i in range(7)])


def cut_after_four(messages, seed):
    i = int(last_user(messages).split()[1])
    return (f"answer {i}", "stop") if i < 4 else (f"answer {i} cut", "length")


def test_shards_split_at_shard_rows_and_stale_ones_go(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = seven_prompts(tmp_path)
    result = run_generate(make_recipe(prompts, output={"shard_rows": 3}), scripted(cut_after_four))
    rows, manifest = read_dataset(result.output_dir)
    assert manifest["shards"] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    assert shard_lines(result.output_dir) == {"data-00000.jsonl": 3, "data-00001.jsonl": 3, "data-00002.jsonl": 1}
    assert [r["messages"][-1]["content"] for r in rows] == [f"answer {i}" + (" cut" if i >= 4 else "") for i in range(7)]
    assert manifest["counts"]["finish_reason"] == {"stop": 4, "length": 3}
    # fewer rows on a re-run (a filter added): the third shard is stale and removed
    again = scripted(cut_after_four)
    result = run_generate(make_recipe(prompts, output={"shard_rows": 3}, filters=[{"name": "drop_truncated"}]), again)
    rows, manifest = read_dataset(result.output_dir)
    assert again.calls == 0 and manifest["rows"] == 4
    assert shard_lines(result.output_dir) == {"data-00000.jsonl": 3, "data-00001.jsonl": 1}
    assert manifest["shards"] == ["data-00000.jsonl", "data-00001.jsonl"]
    assert [r["messages"][-1]["content"] for r in rows] == [f"answer {i}" for i in range(4)]
    # shard_rows is operational too: one shard now
    result = run_generate(make_recipe(prompts, output={"shard_rows": 100}), scripted(cut_after_four))
    assert shard_lines(result.output_dir) == {"data-00000.jsonl": 7}


def test_manifest_complete_only_when_nothing_was_left_out(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = write_jsonl(tmp_path / "five.jsonl", [{"prompt": f"prompt {i}"} for i in range(5)])
    recipe = make_recipe(prompts)
    first = scripted(echo)
    result = run_generate(recipe, first, limits=Limits(max_requests=2))
    rows, manifest = read_dataset(result.output_dir)
    assert first.calls == 2 and manifest["complete"] is False and manifest["rows"] == 2
    assert result.summary["stopped"] == "--max-requests 2 reached"
    assert "**Incomplete**" in (result.output_dir / "README.md").read_text()
    rest = scripted(echo)
    result = run_generate(recipe, rest)
    rows, manifest = read_dataset(result.output_dir)
    assert rest.calls == 3 and manifest["complete"] is True and manifest["rows"] == 5
    assert [r["messages"][-1]["content"] for r in rows] == [f"A<prompt {i}>" for i in range(5)]
    assert "Incomplete" not in (result.output_dir / "README.md").read_text()


def test_manifest_columns_and_card_name_the_pipeline_columns(tmp_path, make_recipe, scripted, run_generate,
                                                             read_dataset):
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": "Two plus two?", "answer": "#### 4"}])
    result = run_generate(make_recipe(prompts, pipeline="cot", n=2, temperature=0.5, max_rounds=1),
                          scripted(lambda m, seed: "#### 4" if seed == 0 else "#### 5"))
    _, manifest = read_dataset(result.output_dir)
    assert list(manifest["columns"]) == ["id", "messages", "provenance", "answer", "verdict", "negative"]
    assert manifest["counts"]["verdict"] == {"verified": 1, "rejected": 1}
    assert manifest["sampling"] == {"max_new_tokens": 256, "n": 2, "temperature": 0.5, "top_p": 1.0, "top_k": None,
                                    "seed": 0, "logprobs": 0}
    card = (result.output_dir / "README.md").read_text()
    assert "- `verdict`: verified | rejected | no_answer" in card
    assert '"negative_field": "negative"' in card  # how to train on the negatives
    assert "- verified: 50.0% of 2 rationales; 100.0% of questions have one" in card


def test_dry_run_sends_nothing_and_writes_nothing(tmp_path, make_recipe, scripted, run_generate):
    prompts = write_jsonl(tmp_path / "four.jsonl", [{"prompt": "x" * 40}] * 4)
    teacher = scripted(echo)
    result = run_generate(make_recipe(prompts, n=2, temperature=0.5, max_new_tokens=16), teacher, dry_run=True)
    assert result.summary == {"dry_run": True, "prompts": 4, "requests": 4, "samples": 8, "prompt_tokens": 40,
                              "max_completion_tokens": 128}
    assert result.rows == 0 and not teacher.started and teacher.calls == 0
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- output folder safety


def test_a_folder_of_another_generation_is_refused(tmp_path, make_recipe, scripted, run_generate, read_dataset):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "c"}])
    run_generate(make_recipe(prompts), scripted(echo))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    for changes, field in (({"pipeline": "cot", "temperature": 0.5}, "generate.pipeline"),
                           ({"prompts": str(other)}, "generate.prompts")):
        teacher = scripted(echo)
        recipe = make_recipe(changes.pop("prompts", prompts), **changes)
        with pytest.raises(OutputError, match=f"holds another generation .*{field}"):
            run_generate(recipe, teacher)
        assert not teacher.started
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_rows_and_keeps_the_request_cache(tmp_path, make_recipe, scripted, run_generate,
                                                                  read_dataset):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(3)])
    fewer = write_jsonl(tmp_path / "fewer.jsonl", [{"prompt": "prompt 0"}, {"prompt": "new one"}])
    run_generate(make_recipe(prompts, output={"shard_rows": 1}), scripted(echo))
    cache_file = tmp_path / "out" / "request_cache" / "responses.jsonl"
    old_cache = cache_file.read_text()
    teacher = scripted(echo)
    result = run_generate(make_recipe(fewer, output={"overwrite": True}), teacher)
    rows, manifest = read_dataset(result.output_dir)
    assert teacher.calls == 1  # "prompt 0" is answered from the kept cache
    assert [r["messages"][-1]["content"] for r in rows] == ["A<prompt 0>", "A<new one>"]
    assert [r["provenance"]["cached"] for r in rows] == [True, False]
    assert shard_lines(result.output_dir) == {"data-00000.jsonl": 2}  # the old data-00001/2 are gone
    assert cache_file.read_text().startswith(old_cache) and len(cache_file.read_text().splitlines()) == 4
    assert manifest["prompts"] == str(fewer)


def test_a_folder_with_unrelated_files_is_refused(tmp_path, make_recipe, scripted, run_generate):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    teacher = scripted(echo)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="holds other files"):
            run_generate(make_recipe(prompts, output={"overwrite": overwrite}), teacher)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and not teacher.started
    (tmp_path / "file_out").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        run_generate(make_recipe(prompts, "file_out"), teacher)


def test_logprobs_from_a_teacher_without_them_stop_before_anything_is_written(tmp_path, make_recipe, scripted,
                                                                              run_generate):
    from kdlm.generation.backends.base import FatalBackendError

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    teacher = scripted(echo)
    with pytest.raises(FatalBackendError, match="returns no log-probs"):
        run_generate(make_recipe(prompts, logprobs=5), teacher)
    assert teacher.calls == 0 and not (tmp_path / "out").exists()
