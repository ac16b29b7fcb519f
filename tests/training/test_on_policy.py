"""Sampled batch sources, TAID and DDK on the one loop, on tiny models: equivalences, counts, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlm.config import load_recipe
from kdlm.errors import ConfigError, DataError
from kdlm.training import distill
from kdlm.training.metrics import read_metrics

SAMPLED = ["sampling.max_new_tokens=8", "sampling.temperature=1.0"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]


def _assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lambda_zero_equals_the_static_loop_exactly(recipe_file, tmp_path):
    static = distill(load_recipe(recipe_file, [f"output.dir={tmp_path / 'static'}"]), show_progress=False)
    mixed = distill(load_recipe(recipe_file, [f"output.dir={tmp_path / 'mixed'}", "source.kind=mixed",
                                              "source.lmbda=0.0", *SAMPLED]), show_progress=False)
    _assert_same_weights(_weights(static.output_dir), _weights(mixed.output_dir))
    a, b = _train_rows(static.output_dir), _train_rows(mixed.output_dir)
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    assert all(r["source/data_fraction"] == 1.0 for r in b) and not any("gen/seconds" in r for r in b)


def test_on_policy_counts_only_the_sampled_completions(recipe_file, tmp_path, monkeypatch):
    """Every step trains on student samples; the loss counts their tokens (end-of-turn included), never the prompt."""
    import kdlm.training.loop as loop_module

    seen = []
    original = loop_module.accumulate_gradients

    def observed(module, teacher, micro, terms, accelerator):
        seen.append(micro)
        return original(module, teacher, micro, terms, accelerator)

    monkeypatch.setattr(loop_module, "accumulate_gradients", observed)
    recipe = load_recipe(recipe_file, ["source.kind=student", "train.grad_accum=2", *SAMPLED])
    result = distill(recipe, show_progress=False)
    rows = _train_rows(result.output_dir)
    assert len(seen) == 6 and all(len(step) == 2 for step in seen)
    for step, record in zip(seen, rows):
        counted = 0
        for mb in step:
            labels, sampled = mb["labels"], mb["sampled"]
            assert bool(sampled.any())
            scored = labels[:, 1:] != -100
            assert bool((~sampled[:, 1:] & scored).sum() == 0), "a prompt token was counted"
            lengths = scored.sum(1)
            assert bool((lengths >= 1).all()) and bool((lengths <= 8).all())
            counted += int(scored.sum())
        assert record["counted_tokens"] == counted
        assert record["gen/new_tokens"] == counted  # the counts come from the generated completions
        assert record["source/student_fraction"] == 1.0 and 0 <= record["gen/truncated_fraction"] <= 1
        assert record["gen/tokens_per_s"] > 0 and 0 < record["gen/share_of_step"] < 1


def test_gkd_seq_kd_mixes_student_and_teacher_steps(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file, ["source.kind=mixed", "source.lmbda=0.5", "source.off_policy=teacher",
                                       "train.max_steps=8", *SAMPLED])
    rows = _train_rows(distill(recipe, show_progress=False).output_dir)
    kinds = ["student" if r.get("source/student_fraction") else "teacher" for r in rows]
    assert set(kinds) == {"student", "teacher"}  # a fixed seed: both kinds occur in 8 steps
    assert all(r.get("source/student_fraction", 0) + r.get("source/teacher_fraction", 0) == 1.0 for r in rows)


def test_minillm_runs_with_all_three_tricks(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file, [
        "source.kind=student", "source.data_rows=true", "sampling.teacher_mix=0.2", *SAMPLED,
        "loss.terms=[{name: reverse_kl, rows: samples}, {name: pg, rows: samples}, {name: ce, rows: data, weight: 0.5}]"])
    result = distill(recipe, show_progress=False)
    rows = _train_rows(result.output_dir)
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert all(r["loss/ce"] > 0 and r["loss/reverse_kl"] > 0 for r in rows)


def test_taid_t_follows_its_schedule_and_is_logged(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file, ["loss.terms=[{name: taid}]", "schedule.taid_alpha=0.05"])
    rows = _train_rows(distill(recipe, show_progress=False).output_dir)
    ts = [r["taid/t"] for r in rows]
    assert ts[0] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > ts[0]
    linear = [0.4 + 0.6 * s / 6 for s in range(6)]
    assert all(t >= lin - 1e-12 for t, lin in zip(ts, linear))


@pytest.fixture
def domain_recipe(tmp_path, sharp_teacher_dir, tiny_model_dir, make_jsonl):
    from training.conftest import _chat_rows

    rows = _chat_rows(48)
    for i, row in enumerate(rows):
        row["domain"] = ["alpha", "beta", "gamma"][i % 3]
    data = make_jsonl(rows, name="domains.jsonl")
    path = tmp_path / "ddk.yaml"
    path.write_text(f"""
teacher: {{model: {sharp_teacher_dir}}}
student: {{model: {tiny_model_dir}, keep_layers: 2}}
data: {{train: {data}, validation_fraction: 0.25, max_length: 64, domain_field: domain}}
loss: {{terms: [{{name: forward_kl}}]}}
schedule: {{ddk_every: 2}}
train: {{max_steps: 6, batch_size: 4, learning_rate: 0.003, save_every: 1, log_every: 1, lr_scheduler: constant,
        report_to: []}}
output: {{dir: {tmp_path / "run"}}}
""")
    return path


def test_ddk_weights_are_logged_and_follow_the_ce_ratios(domain_recipe):
    rows = _train_rows(distill(load_recipe(domain_recipe), show_progress=False).output_dir)
    updates = [r for r in rows if "ddk/weight/alpha" in r]
    assert [r["step"] for r in updates] == [2, 4, 6]
    for r in updates:
        weights = {d: r[f"ddk/weight/{d}"] for d in ("alpha", "beta", "gamma")}
        ratios = {d: r[f"ddk/ce_ratio/{d}"] for d in ("alpha", "beta", "gamma")}
        assert sum(weights.values()) == pytest.approx(1.0)
    # after the first update (from uniform), the order of the weights is the order of the ratios
    first = updates[0]
    order_w = sorted(("alpha", "beta", "gamma"), key=lambda d: first[f"ddk/weight/{d}"])
    order_r = sorted(("alpha", "beta", "gamma"), key=lambda d: first[f"ddk/ce_ratio/{d}"])
    assert order_w == order_r


class _Crash(RuntimeError):
    pass


def _crash_at(n: int):
    def hook(step: int) -> None:
        if step == n:
            raise _Crash
    return hook


@pytest.mark.parametrize("settings", [
    pytest.param(["source.kind=replay", "source.fresh_start=0.5", "train.eval_every=2", *SAMPLED], id="distillm-replay"),
    pytest.param(["source.kind=mixed", "source.lmbda=0.5", *SAMPLED, "loss.terms=[{name: taid}]",
                  "schedule.taid_alpha=0.05"], id="gkd-taid"),
])
def test_resume_is_exact(recipe_file, tmp_path, settings):
    """Kill a run after step 3 (checkpoint at 2), resume it: the same weights, losses, t and replay draws as an
    uninterrupted run (sampler RNG from (seed, step), the replay buffer per rank, TAID's t in the state)."""
    common = ["train.save_every=1", *settings]
    straight = distill(load_recipe(recipe_file, [f"output.dir={tmp_path / 'straight'}", *common]), show_progress=False)
    recipe = load_recipe(recipe_file, [f"output.dir={tmp_path / 'crashed'}", "train.save_every=2", *settings])
    with pytest.raises(_Crash):
        distill(recipe, on_step=_crash_at(3), show_progress=False)
    distill(recipe, resume=True, show_progress=False)
    _assert_same_weights(_weights(straight.output_dir), _weights(tmp_path / "crashed"), exact=False)
    a = {r["step"]: r for r in _train_rows(straight.output_dir)}
    b = {r["step"]: r for r in _train_rows(tmp_path / "crashed")}  # the resumed run's step 3 overwrites the first
    for step in range(1, 7):
        for key in a[step]:
            if key.startswith(("loss/", "taid/", "source/")) or key == "counted_tokens":
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_ddk_resume_restores_the_weights(domain_recipe, tmp_path):
    straight = distill(load_recipe(domain_recipe, [f"output.dir={tmp_path / 'straight'}"]), show_progress=False)
    recipe = load_recipe(domain_recipe, [f"output.dir={tmp_path / 'crashed'}", "train.save_every=3"])
    with pytest.raises(_Crash):
        distill(recipe, on_step=_crash_at(4), show_progress=False)
    distill(recipe, resume=True, show_progress=False)
    _assert_same_weights(_weights(straight.output_dir), _weights(tmp_path / "crashed"), exact=False)
    a = [r for r in _train_rows(straight.output_dir) if "ddk/weight/alpha" in r][-1]
    b = [r for r in _train_rows(tmp_path / "crashed") if "ddk/weight/alpha" in r][-1]
    assert a["ddk/weight/alpha"] == pytest.approx(b["ddk/weight/alpha"], rel=1e-6)


# ----------------------------------------------------------------------------- bad input: one line, before any model


@pytest.mark.parametrize("overrides, message", [
    (["source.kind=student", "data.completion_only=false"], "needs prompts"),
    (["source.kind=student", "data.packing=true"], "data.packing"),
    (["source.kind=student", "sampling.max_new_tokens=64"], "must be below data.max_length"),
    (["loss.terms=[{name: pg}]"], "pg is a policy gradient"),
    (["source.kind=static", "sampling.teacher_mix=0.2"], "teacher_mix"),
    (["source.kind=replay", *SAMPLED], "train.eval_every"),
    (["source.kind=bogus"], "source.kind"),
    (["schedule.ddk_every=2"], "data.domain_field"),
])
def test_bad_method_parts_are_one_line_errors(recipe_file, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(recipe_file, overrides)
    assert "\n" not in str(err.value)


def test_a_prompt_too_long_for_max_new_tokens_fails_before_models_load(recipe_file, tmp_path, monkeypatch):
    import kdlm.training.trainer as trainer

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "models_stage", no_models)
    recipe = load_recipe(recipe_file, ["source.kind=student", "sampling.max_new_tokens=60"])
    with pytest.raises(DataError, match=r"prompt of \d+ tokens \+ sampling.max_new_tokens 60 exceeds data.max_length 64"):
        distill(recipe, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_recipes_in_the_package_name_their_method():
    from kdlm.config import load_recipe as load

    recipes = Path(__file__).resolve().parents[2] / "kdlm" / "recipes"
    expect = {"gkd-cpu.yaml": "mixed", "gkd-lambda1-cpu.yaml": "student", "minillm-cpu.yaml": "student",
              "distillm-cpu.yaml": "replay", "taid-cpu.yaml": "static", "ddk-cpu.yaml": "static",
              "seqkd-cpu.yaml": "teacher"}
    for name, kind in expect.items():
        recipe = load(recipes / name)
        assert recipe.source.kind == kind, name
    assert any(t.name == "pg" for t in load(recipes / "minillm-cpu.yaml").loss.terms)
    assert load(recipes / "minillm-cpu.yaml").sampling.teacher_mix == 0.2
    assert any(t.name == "taid" for t in load(recipes / "taid-cpu.yaml").loss.terms)
    assert load(recipes / "ddk-cpu.yaml").schedule.ddk_every > 0
