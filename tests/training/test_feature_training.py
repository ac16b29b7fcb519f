"""Feature terms in the one loop: projections train, are checkpointed and resumed, never exported; every term
is logged on its own; bad feature settings fail before any weights load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kdlm.config import load_recipe
from kdlm.errors import ConfigError
from kdlm.training import distill
from kdlm.training.metrics import read_metrics

HINT = "{name: hint, weight: 0.5, layers: [[0, 1], [1, 2]], projection: xavier, metric: normalised_mse}"
RELATION = "{name: attention_relation, weight: 0.5, layers: [[1, 2]], relation_heads: 2, relations: [qq, kk, vv]}"


def _recipe(recipe_file, *extra):
    return load_recipe(recipe_file, [f"loss.terms=[{{name: forward_kl, weight: 1.0}}, {HINT}, {RELATION}]",
                                     "train.save_every=3", *extra])


def _checkpoint_tensors(folder):
    tensors = {}
    for file in folder.rglob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def test_feature_terms_train_log_checkpoint_and_stay_out_of_the_export(recipe_file):
    recipe = _recipe(recipe_file)
    result = distill(recipe, show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 6
    for r in rows:  # each term on its own, and the total is their weighted sum
        assert r["loss/hint"] > 0 and r["loss/attention_relation"] > 0
        assert r["loss/total"] == pytest.approx(r["loss/forward_kl"] + 0.5 * r["loss/hint"]
                                                + 0.5 * r["loss/attention_relation"], rel=1e-5)
    assert rows[-1]["loss/hint"] < rows[0]["loss/hint"]

    checkpoint = sorted((result.output_dir / "checkpoints").glob("step-*"))[-1]
    saved = _checkpoint_tensors(checkpoint)
    keys = [k for k in saved if "projections" in k]
    assert sorted(keys) == ["projections.maps.hint__0__1.weight", "projections.maps.hint__1__2.weight"]
    assert not torch.allclose(saved[keys[0]], torch.zeros_like(saved[keys[0]]))
    # the optimizer holds AdamW moments for the projections: as many state entries as trainable parameters
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    student_params = sum(1 for k in saved if not k.startswith("projections"))
    assert len(optimizer["state"]) == student_params + 2

    exported = load_file(result.model_dir / "model.safetensors")
    assert not any("projection" in k for k in exported), "projections are never exported"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.model_dir)  # a plain student


def test_projections_change_and_resume_exactly(recipe_file, tmp_path):
    from kdlm.training import trainer

    captured = {}
    real = trainer.DistillationModule

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured["module"] = self
            captured["initial"] = {k: v.detach().clone() for k, v in self.projections.state_dict().items()}

    trainer.DistillationModule = Spy
    try:
        full = distill(_recipe(recipe_file), show_progress=False)
        final = {k: v.detach().clone() for k, v in captured["module"].projections.state_dict().items()}
        for key, before in captured["initial"].items():
            assert not torch.allclose(before, final[key]), f"{key} did not train"

        interrupted = _recipe(recipe_file, f"output.dir={tmp_path / 'resumed'}")

        def stop(step):
            if step == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            distill(interrupted, on_step=stop, show_progress=False)
        distill(interrupted, resume=True, show_progress=False)
        resumed = captured["module"].projections.state_dict()
    finally:
        trainer.DistillationModule = real
    for key, value in final.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
    assert full.steps == 6


@pytest.mark.parametrize("overrides, message", [
    (["loss.terms=[{name: hint, layers: [[0, 9]]}]"], r"loss.terms\[0\].layers.0: teacher layer 9 does not exist: "
                                                      r"the teacher has 4 decoder layers"),
    (["loss.terms=[{name: hint, layers: [[2, 1]]}]"], r"student layer 2 does not exist: the student has 2"),
    (["loss.terms=[{name: attention_relation, relation_heads: 3}]"], r"loss.terms\[0\].relation_heads: 3 does not "
                                                                     r"divide"),
])
def test_bad_feature_settings_fail_before_weights_load(recipe_file, overrides, message, monkeypatch, tmp_path):
    import kdlm.training.trainer as trainer

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(trainer, "load_model", no_weights)
    with pytest.raises(ConfigError, match=message) as err:
        distill(load_recipe(recipe_file, overrides), show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_feature_terms_with_a_cached_teacher_are_a_config_error(recipe_file):
    with pytest.raises(ConfigError, match="hint compares the teacher's internals.*teacher.source: live"):
        load_recipe(recipe_file, ["loss.terms=[{name: hint}]", "teacher.source=cache"])


def test_the_teacher_captures_only_the_mapped_layers_and_only_when_asked(sharp_teacher_dir):
    from transformers import AutoModelForCausalLM

    from kdlm.training.step import Teacher

    model = AutoModelForCausalLM.from_pretrained(sharp_teacher_dir).eval()
    teacher = Teacher(model, 448, hidden_layers=[1, "final"], attention_layers=[2])
    ids = torch.randint(0, 448, (2, 7))
    mask = torch.ones(2, 6, dtype=torch.bool)
    rows = teacher.rows({"input_ids": ids}, mask)
    assert sorted(rows.features, key=str) == [1, "final"] and list(rows.qkv) == [2]
    assert rows.features[1].shape == (12, 32) and not rows.features[1].requires_grad
    torch.testing.assert_close(rows.features["final"], rows.hidden)  # the final norm's output is the LM head's input
    plain = teacher.rows({"input_ids": ids}, mask, features=False)  # validation: the last hidden state only
    assert plain.features == {} and plain.qkv == {}
    torch.testing.assert_close(plain.hidden, rows.hidden, rtol=0, atol=0)
