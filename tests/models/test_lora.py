"""LoRA students (kdlm.models.lora): adapters through peft, target checks, parameter counts and the two exports."""

from __future__ import annotations

import pytest
import torch

from kdlm.config import from_dict
from kdlm.config.schema import LoraConfig, Recipe
from kdlm.errors import ConfigError
from kdlm.models.lora import (apply_lora, export_lora, planned_lora_parameters, summary, trainable_parameters)


def _tiny(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _lora(**kw) -> LoraConfig:
    return LoraConfig(enabled=True, **kw)


def _perturb(model, seed: int = 0) -> None:
    """Give the adapters non-zero B (peft starts B at 0, so an untrained adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_only_adapters_train_and_kdlm_finds_the_decoder_through_peft(tiny_model_dir, one_thread):
    from kdlm.losses.objective import lm_head_of
    from kdlm.models.init_student import decoder_layers
    from kdlm.training.step import last_hidden

    plain = _tiny(tiny_model_dir)
    ids = {"input_ids": torch.tensor([[1, 5, 9, 30, 41]])}
    reference = last_hidden(plain, ids)
    model = apply_lora(plain, _lora(r=4))
    trainable, total = trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) < total
    # the decoder's hidden states, not the tuner's logits; B = 0 at the start: the same model
    torch.testing.assert_close(last_hidden(model, ids), reference)
    assert len(decoder_layers(model)) == 4
    assert lm_head_of(model, 448).weight.shape == (448, 32)
    assert summary(model, _lora(r=4)).startswith("LoRA r=4 on 7 module kinds: ")


def test_a_target_that_matches_nothing_is_one_line(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    with pytest.raises(ConfigError) as err:
        apply_lora(model, _lora(target_modules=["q_projx"]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("student.lora.target_modules: q_projx matches no module")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg
    with pytest.raises(ConfigError, match="mlp names LlamaMLP modules, not linear layers"):
        apply_lora(model, _lora(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match="modules_to_save: lm_headx matches no module"):
        apply_lora(model, _lora(modules_to_save=["lm_headx"]))


def test_recipe_fields_are_checked():
    lora = lambda **kw: from_dict(Recipe, {"student": {"lora": {"enabled": True, **kw}}}).student.lora  # noqa: E731
    assert lora().target_modules[0] == "q_proj" and lora().export == "merged"
    assert lora(alpha=0).alpha == 0.0  # alpha 0 is allowed (the adapters then do nothing)
    assert lora(target_modules="all-linear").target_modules == "all-linear"
    for bad, match in [({"r": 0}, "student.lora.r"), ({"dropout": 1.0}, "student.lora.dropout"),
                       ({"target_modules": "q_proj"}, "neither all-linear"), ({"export": "gguf"}, "student.lora.export"),
                       ({"target_modules": []}, "at least one")]:
        with pytest.raises(ConfigError, match=match):
            lora(**bad)
    with pytest.raises(ConfigError, match="sampling.engine: vllm"):
        from_dict(Recipe, {"student": {"lora": {"enabled": True}}, "source": {"kind": "student"},
                           "data": {"format": "messages", "max_length": 512}, "sampling": {"engine": "vllm"}})


def test_merged_export_is_a_plain_folder_with_the_same_logits(tiny_model_dir, tiny_tokenizer, tmp_path, one_thread):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = apply_lora(_tiny(tiny_model_dir), _lora(r=4, modules_to_save=["lm_head"]))
    _perturb(model)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 30, 41, 7, 3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_lora(model, tiny_tokenizer, tmp_path / "model", "# card\n", "merged")
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    keys = load_file(tmp_path / "model" / "model.safetensors").keys()
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in keys)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(plain).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    # the PeftModel itself is left as it was (the merge ran on a copy)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_adapter_export_loads_with_peft(tiny_model_dir, tiny_tokenizer, tmp_path, one_thread):
    from peft import PeftModel

    model = apply_lora(_tiny(tiny_model_dir), _lora(r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model, seed=1)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 30, 41]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_lora(model, tiny_tokenizer, tmp_path / "adapter", "# card\n", "adapter")
    folder = tmp_path / "adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and "PeftModel.from_pretrained" in (folder / "README.md").read_text()
    loaded = PeftModel.from_pretrained(_tiny(tiny_model_dir), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, {"target_modules": "all-linear"},
                                {"r": 2, "modules_to_save": ["lm_head"]},
                                {"r": 8, "target_modules": ["down_proj"], "modules_to_save": ["embed_tokens", "norm"]}])
def test_planned_parameters_equal_peft_count(tiny_model_dir, kw):
    cfg = _lora(**kw)
    model = _tiny(tiny_model_dir)
    c = model.config
    planned = planned_lora_parameters(cfg, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                      vocab_size=c.vocab_size, tie_word_embeddings=c.tie_word_embeddings)
    assert planned == trainable_parameters(apply_lora(model, cfg))[0]
