"""Tests for kdlm.models.loading: sources, devices, dtypes, loading models and tokenizers."""

from __future__ import annotations

import types

import pytest
import torch

from kdlm.errors import ModelError
from kdlm.models.loading import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- resolve_source


def test_folder(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    assert source == ModelSource(str(tiny_model_dir), None, None)
    assert source.kwargs == {}


def test_folder_with_tilde(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_source("~/model").path == str(tmp_path / "model")


@pytest.mark.parametrize("name", ["/nonexistent/kdlm-model", "./missing-model", "../missing-model", "a/b/c"])
def test_missing_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as info:
        resolve_source(name)
    assert name in str(info.value) and "not found" in str(info.value)


def test_missing_gguf_file(tmp_path):
    name = str(tmp_path / "model.Q4_0.gguf")
    with pytest.raises(ModelError) as info:
        resolve_source(name)
    assert name in str(info.value) and "GGUF" in str(info.value)


def test_relative_missing_gguf_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError):
        resolve_source("org/model.gguf")


def test_gguf_file(tmp_path):
    path = tmp_path / "model.Q8_0.gguf"
    path.write_bytes(b"GGUF")
    source = resolve_source(str(path))
    assert source.path == str(tmp_path) and source.gguf_file == "model.Q8_0.gguf"
    assert source.kwargs == {"gguf_file": "model.Q8_0.gguf"}


def test_folder_with_one_gguf_file(tmp_path):
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path)) == ModelSource(str(tmp_path), "only.gguf")


def test_folder_with_several_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="several GGUF"):
        resolve_source(str(tmp_path))
    # naming one of them resolves the ambiguity
    assert resolve_source(str(tmp_path), gguf_file="b.gguf").gguf_file == "b.gguf"


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_source(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelError):
        resolve_source(str(path))


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_id_passes_through(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # so no local folder of that name can shadow it
    source = resolve_source(name, revision="main")
    assert source == ModelSource(name, None, "main")
    assert source.kwargs == {"revision": "main"}


def test_hub_id_with_gguf_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = resolve_source("org/model-GGUF", gguf_file="model.Q4_K_M.gguf")
    assert source.kwargs == {"gguf_file": "model.Q4_K_M.gguf"}


# ----------------------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize("trainable", [True, False])
def test_auto_dtype_is_float32_on_cpu(trainable):
    assert resolve_dtype("auto", CPU, trainable=trainable) is torch.float32


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16)])
def test_explicit_dtype(name, dtype):
    assert resolve_dtype(name, CPU, trainable=True) is dtype


def test_auto_dtype_trainable_stays_float32_on_cuda():
    assert resolve_dtype("auto", torch.device("cuda"), trainable=True) is torch.float32


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto", default=torch.device("cpu")) == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ModelError, match="CUDA"):
        resolve_device("cuda:0")


def test_bad_device_name():
    with pytest.raises(ModelError, match="gpu0"):
        resolve_device("gpu0")


# ----------------------------------------------------------------------------- load_model / load_tokenizer


def test_frozen_model_is_in_eval_mode_without_gradients(tiny_model_dir):
    model = load_model(ModelSource(str(tiny_model_dir)), dtype=torch.float32, device=CPU, frozen=True)
    assert model.training is False
    assert all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert model.config.num_hidden_layers == 4


def test_trainable_model_keeps_gradients(tiny_model_dir):
    model = load_model(ModelSource(str(tiny_model_dir)), dtype=torch.float32, device=CPU)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dtype_is_applied(tiny_model_dir):
    model = load_model(ModelSource(str(tiny_model_dir)), dtype=torch.bfloat16, device=CPU, frozen=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_loaded_weights_match_the_folder(tiny_model_dir):
    from safetensors.torch import load_file

    model = load_model(ModelSource(str(tiny_model_dir)), dtype=torch.float32, device=CPU, frozen=True)
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_missing_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(ModelSource(str(tmp_path / "nope")), dtype=torch.float32, device=CPU)
    assert str(tmp_path / "nope") in str(info.value)


class _Captured:
    def __init__(self):
        self.calls = []

    def model(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        module = torch.nn.Linear(2, 2)
        module.config = types.SimpleNamespace()
        return module

    def tokenizer(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return types.SimpleNamespace(pad_token=None, eos_token="</s>")


def test_trust_remote_code_is_off_by_default(monkeypatch):
    import transformers

    captured = _Captured()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", captured.model)
    source = ModelSource("org/model", "m.gguf", "v1")
    load_model(source, dtype=torch.float32, device=CPU)
    (args, kwargs), = captured.calls
    assert args == ("org/model",)
    assert kwargs["trust_remote_code"] is False
    assert kwargs["dtype"] is torch.float32
    assert kwargs["gguf_file"] == "m.gguf" and kwargs["revision"] == "v1"

    load_model(source, dtype=torch.float32, device=CPU, trust_remote_code=True)
    assert captured.calls[1][1]["trust_remote_code"] is True


def test_tokenizer_trust_remote_code_is_off_by_default(monkeypatch):
    import transformers

    captured = _Captured()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", captured.tokenizer)
    tok = load_tokenizer(ModelSource("org/model"))
    (args, kwargs), = captured.calls
    assert args == ("org/model",) and kwargs["trust_remote_code"] is False
    assert tok.pad_token == "</s>"  # no pad token: the EOS token is used


def test_load_tokenizer_keeps_its_pad_token(tiny_model_dir):
    tok = load_tokenizer(ModelSource(str(tiny_model_dir)))
    assert tok.pad_token == "<pad>" and tok.chat_template


def test_load_tokenizer_without_pad_uses_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelSource(str(tmp_path)))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_gguf_quantization_marker_is_dropped():
    from kdlm.models.loading import drop_gguf_quantization_marker

    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(quantization_config=types.SimpleNamespace(quant_method="gguf"))
    model.hf_quantizer = object()
    drop_gguf_quantization_marker(model)
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None

    other = torch.nn.Linear(2, 2)
    marker = types.SimpleNamespace(quant_method="bitsandbytes")
    other.config = types.SimpleNamespace(quantization_config=marker)
    drop_gguf_quantization_marker(other)
    assert other.config.quantization_config is marker
