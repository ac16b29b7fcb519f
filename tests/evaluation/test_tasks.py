"""Task files: built-ins, validation errors naming file and field, data reading, options, few-shot, input spans."""

from __future__ import annotations

import pytest

from kdlm.errors import ConfigError, DataError, KdlmError
from kdlm.evaluation.tasks import (builtin_task_names, build_context, class_options, few_shot_turns, load_examples,
                                   match_option, perturbable_span, resolve_task, with_input)
from .conftest import shared_data_or_skip, write_jsonl

BUILTINS = {"selfinst", "gsm8k", "gsm8k_fewshot", "gsm8k_direct", "sentiment_imdb", "paraphrase_mrpc", "samsum",
            "samsum_ppl"}


def test_builtin_tasks_parse():
    assert BUILTINS <= set(builtin_task_names())
    for name in builtin_task_names():
        task = resolve_task(name)
        assert task.name == name and task.primary_metric == task.metrics[0]
    assert resolve_task("selfinst").metrics[0] == "rouge_l"
    assert resolve_task("gsm8k").extract == "number"
    assert set(resolve_task("sentiment_imdb").ood) == {"rotten_tomatoes", "amazon_polarity"}


def test_unknown_task_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown task 'gsm8': did you mean 'gsm8k'|unknown task 'gsm8'; did you mean 'gsm8k'"):
        resolve_task("gsm8")
    with pytest.raises(ConfigError, match="task file nope.yaml: not found"):
        resolve_task("nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("type: generation\nsource: a.jsonl\ntemplete: '{x}'\n", "unknown field 'templete'; did you mean 'template'"),
    ("type: gen\nsource: a.jsonl\n", "field 'type' must be one of generation, classification, perplexity"),
    ("type: generation\n", "missing field 'source'"),
    ("type: generation\nsource: a.jsonl\nmax_new_tokens: many\n", "field 'max_new_tokens' must be a int"),
    ("type: generation\nsource: a.jsonl\nmetrics: [bleu]\n", "field 'metrics' has 'bleu'"),
    ("type: generation\nsource: a.jsonl\nmetrics: [accuracy]\n", "needs an answer `extract` rule"),
    ("type: classification\nsource: a.jsonl\noptions: [good]\n", "field 'options' needs at least two options"),
    ("type: classification\nsource: a.jsonl\noptions: [yes, no]\n", "field 'options' has a YAML boolean"),
    ("type: generation\nsource: a.jsonl\ninput_pattern: '(x'\n", "field 'input_pattern' is not a valid regular expression"),
    ("type: generation\nsource: a.jsonl\ninput_pattern: 'x'\n", "needs a named group"),
    ("type: generation\nsource: a.jsonl\ntemplate: '{a.b}'\n", "field 'template' may only use plain"),
    ("type: classification\nsource: a.jsonl\nood: {x: {sorce: b.jsonl}}\n", "unknown field 'ood.x.sorce'"),
    ("type: generation\nsource: a.jsonl\nfew_shot: {source: b.jsonl}\n", "missing field 'few_shot.k'"),
    ("type: generation\nsource: a.jsonl\nrobustness: {kinds: [emoji]}\n", "field 'robustness.kinds' has 'emoji'"),
    ("- just\n- a list\n", "must be a mapping of fields"),
    ("type: [unclosed\n", "not valid YAML at line"),
])
def test_bad_task_file_names_file_and_field(write_task, text, message):
    path = write_task(text)
    with pytest.raises(ConfigError) as err:
        resolve_task(str(path))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_data_file_is_named(tmp_path):
    task = resolve_task("selfinst")
    with pytest.raises(DataError) as err:
        load_examples(task.data, tmp_path, task.name)
    assert str(tmp_path / "self-instruct" / "user_oriented_instructions.jsonl") in str(err.value)
    assert "--data-dir" in str(err.value)


def test_selfinst_explodes_instances(data_dir):
    task = resolve_task("selfinst")
    examples = load_examples(task.data, data_dir, task.name)
    assert len(examples) == 3
    assert examples[0].user == "Rewrite the sentence to be shorter.\n\nThe quick brown fox jumps over the lazy dog."
    assert examples[0].reference == "The fox jumps over the dog."
    assert examples[1].user == "Say hello to the user."  # empty input: the template's trailing blank line is stripped
    assert len(load_examples(task.data, data_dir, task.name, limit=2)) == 2


def test_bad_rows_name_file_and_line(tmp_path, write_task):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "x"}\n{not json}\n')
    task = resolve_task(str(write_task("type: generation\nsource: bad.jsonl\n")))
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_examples(task.data, tmp_path, task.name)
    write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    task = resolve_task(str(write_task("type: generation\nsource: nofield.jsonl\n", "t2.yaml")))
    with pytest.raises(DataError, match=r"nofield.jsonl line 2: field 'prompt' missing"):
        load_examples(task.data, tmp_path, task.name)


def test_reference_strips_endoftext_and_maps_labels(tmp_path, write_task):
    write_jsonl(tmp_path / "adv.json".replace(".json", ".jsonl"), [{"sentence": "fine film", "label": 1}])
    text = ("type: classification\nsource: adv.jsonl\ntemplate: '{sentence}'\nreference: '{label}'\n"
            "label_names: [negative, positive]\n")
    task = resolve_task(str(write_task(text)))
    [ex] = load_examples(task.data, tmp_path, task.name)
    assert (ex.user, ex.reference) == ("fine film", "positive")


def test_advglue_json_subset(tmp_path, write_task):
    import json

    (tmp_path / "dev.json").write_text(json.dumps({"sst2": [{"idx": 0, "sentence": "a gr8 movie", "label": 1}],
                                                   "qqp": []}))
    text = ("type: classification\nsource: dev.json\nsubset: sst2\ntemplate: '{sentence}'\nreference: '{label}'\n"
            "label_names: {'0': negative, '1': positive}\n")
    task = resolve_task(str(write_task(text)))
    [ex] = load_examples(task.data, tmp_path, task.name)
    assert ex.reference == "positive"
    with pytest.raises(DataError, match="no set 'mnli'"):
        load_examples(task.data.__class__(**{**task.data.__dict__, "subset": "mnli"}), tmp_path, task.name)


def test_options_derived_listed_or_inherited(data_dir, sentiment_task):
    task = resolve_task(str(sentiment_task))
    assert class_options(task.data, data_dir, task.name) == ("negative", "positive")
    # the OOD set's own completions (Positive/Negative) give its options; a one-class file would inherit the task's
    assert class_options(task.ood["shop"], data_dir, task.name, ("negative", "positive")) == ("Negative", "Positive")
    write_jsonl(data_dir / "t0" / "one.jsonl", [{"prompt": "p", "completion": "positive<|endoftext|>"}])
    one = task.ood["shop"].__class__(**{**task.ood["shop"].__dict__, "source": "t0/one.jsonl"})
    assert class_options(one, data_dir, task.name, ("negative", "positive")) == ("negative", "positive")
    with pytest.raises(ConfigError, match="list them under `options:`"):
        class_options(one, data_dir, task.name)
    assert match_option("Positive", ("negative", "positive"), "here") == 1
    with pytest.raises(DataError, match="here: reference 'neutral' is not one of the options"):
        match_option("neutral", ("negative", "positive"), "here")


def test_few_shot_turns_rewrite_and_context(data_dir):
    task = resolve_task("gsm8k_fewshot")
    task = task.__class__(**{**task.__dict__, "few_shot": task.few_shot.__class__(
        k=2, data=task.few_shot.data, rewrite=task.few_shot.rewrite, separator="\n\n")})
    shots = few_shot_turns(task, data_dir)
    assert [a for _, a in shots] == ["5*2=10\nThe answer is 10.", "3+4=7\nThe answer is 7."]
    context = build_context(task, "Q?", shots)
    assert [m["role"] for m in context] == ["user", "assistant", "user", "assistant", "user"]
    assert context[0]["content"].startswith("A pen costs $2.") and context[-1]["content"] == "Q?"


def test_perturbable_span_is_only_the_input(data_dir, sentiment_task):
    task = resolve_task(str(sentiment_task))
    [ex] = load_examples(task.data, data_dir, task.name, limit=1)
    before, text, after = perturbable_span(task.data, ex)
    assert (before, text) == ("", "The film was great and I loved it.")
    assert after == " \nIs this review positive or negative?\n"
    assert with_input(task.data, ex, "CHANGED") == "CHANGED \nIs this review positive or negative?"


# ----------------------------------------------------------------------------- the real data, when present


def test_builtin_tasks_on_real_data():
    data = shared_data_or_skip()
    for name in sorted(BUILTINS):
        task = resolve_task(name)
        examples = load_examples(task.data, data, name, limit=20)
        assert len(examples) == 20 and all(ex.user and ex.reference for ex in examples), name
    imdb = resolve_task("sentiment_imdb")
    assert class_options(imdb.data, data, "sentiment_imdb") == ("negative", "positive")
    assert class_options(imdb.ood["amazon_polarity"], data, "x", ("negative", "positive")) == ("Negative", "Positive")
    assert class_options(imdb.ood["rotten_tomatoes"], data, "x", ("negative", "positive")) == ("negative", "positive")
    assert class_options(resolve_task("paraphrase_mrpc").data, data, "x") == ("no", "yes")
    # the input pattern finds the review in every IMDB prompt: the question stays out of the span
    for ex in load_examples(imdb.data, data, "x", limit=50):
        _, text, after = perturbable_span(imdb.data, ex)
        assert "Is this review positive or negative?" in after and text and "Is this review" not in text
    from kdlm.evaluation.answers import extract_number

    gsm = resolve_task("gsm8k")
    assert all(extract_number(ex.reference) for ex in load_examples(gsm.data, data, "gsm8k"))
    shots = few_shot_turns(resolve_task("gsm8k_fewshot"), data)
    assert len(shots) == 4 and all(a.endswith(".") and "The answer is" in a and "<<" not in a for _, a in shots)


def test_all_errors_are_kdlm_errors():
    assert issubclass(ConfigError, KdlmError) and issubclass(DataError, KdlmError)


def test_reference_doc_examples_parse():
    import re
    from pathlib import Path

    import yaml

    from kdlm.evaluation.tasks import parse_task

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "task_files.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        raw = yaml.safe_load(block)
        if "type" not in raw:  # a fragment: the adversarial section of a sentiment task
            raw = {"type": "classification", "source": "x.jsonl", "options": ["negative", "positive"], **raw}
        task = parse_task(raw, "doc", "task_files.md")
        assert task.type in ("generation", "classification", "perplexity")
