"""sampling.engine: vllm against a stand-in `vllm` module (vLLM needs a CUDA GPU; on a GPU machine the same code
runs against the real engine): the engine's lifecycle, the in-place weight sync, the mapping of the settings, and
that the batch source uses it for student samples only."""

from __future__ import annotations

import types

import pytest
import torch

from servers.fake_vllm import install

from kdlm.config import load_recipe
from kdlm.errors import ConfigError, ModelError
from kdlm.training.sampling import SampleSettings


class FakeModel:
    def __init__(self):
        self.loads: list[dict] = []

    def load_weights(self, weights):
        self.loads.append({name: tensor.clone() for name, tensor in weights})


class FakeLLM:
    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.events, self.calls = kwargs, [], []
        self.model = FakeModel()
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(worker=worker)))
        FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self):
        self.events.append("wake")

    def reset_prefix_cache(self):
        self.events.append("reset")

    def generate(self, prompts, params, use_tqdm=False):
        self.events.append("generate")
        self.calls.append((prompts, params))
        outs = []
        for i, _ in enumerate(prompts):  # prompt 0 stops at token 2 (then junk), the others run to max_tokens
            ids = [5, 2, 7] if i == 0 else [6] * params.kwargs["max_tokens"]
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason="stop")]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances = []
    install(monkeypatch, FakeLLM)


@pytest.fixture
def student(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_engine_sleeps_wakes_and_syncs_weights_in_place_only_when_the_student_changed(fake_vllm, student, tmp_path):
    from kdlm.training.vllm_sampler import VllmSampler

    model, tokenizer = student
    sampler = VllmSampler(model, tokenizer, folder=tmp_path / "vllm-student", gpu_memory_utilization=0.25, sleep=True,
                          max_model_len=64, seed=3)
    llm = FakeLLM.instances[0]
    assert (tmp_path / "vllm-student" / "config.json").is_file()  # the engine loads the student as saved at start
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["gpu_memory_utilization"] == 0.25
    assert llm.events == ["sleep1"]
    settings = SampleSettings(temperature=0.9, top_k=0, max_new_tokens=4)
    out = sampler.sample(model, 0, prompts=[[1, 2, 3], [4, 5]], settings=settings, stop_ids=[2], seed=11)
    assert out.tokens == [[5, 2], [6, 6, 6, 6]] and out.truncated == [False, True] and out.new_tokens == 6
    assert llm.model.loads == []  # version 0 is what the engine loaded from the folder: nothing to push
    params = llm.calls[0][1].kwargs
    assert params["top_k"] == -1 and params["temperature"] == 0.9 and params["stop_token_ids"] == [2]
    assert params["max_tokens"] == 4 and params["seed"] == 11
    assert llm.calls[0][0] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    with torch.no_grad():  # an optimizer step changes the student
        next(model.parameters()).add_(1.0)
    sampler.sample(model, 1, prompts=[[1]], settings=settings, stop_ids=[2], seed=12)
    sampler.sample(model, 1, prompts=[[1]], settings=settings, stop_ids=[2], seed=13)
    assert len(llm.model.loads) == 1  # synced once for version 1, not again
    pushed = llm.model.loads[0]
    assert pushed.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(pushed[name], tensor), name
    assert llm.events == ["sleep1", "wake", "generate", "sleep1", "wake", "reset", "generate", "sleep1",
                          "wake", "generate", "sleep1"]


def test_sampled_source_uses_the_engine_for_student_samples_only(fake_vllm, student, tiny_tokenizer):
    from kdlm.config.schema import SamplingConfig, SourceConfig
    from kdlm.data.dataset import Collator, Example
    from kdlm.training.sources import SampledSource, SamplerModels

    model, _ = student

    class Engine:
        def __init__(self):
            self.calls = []

        def sample(self, student, version, *, prompts, settings, stop_ids, seed):
            from kdlm.training.sampling import Completions

            self.calls.append((version, prompts))
            return Completions([[9, 2]] * len(prompts), [False] * len(prompts), None, None, None, 0.1, 2 * len(prompts))

    class Stream:
        def next_batch(self, step, index):
            return [Example(f"r{i}", [1, 4, 5, 6, 2], [-100, -100, -100, 6, 2]) for i in range(2)]

    accelerator = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                        is_main_process=True)
    engine = Engine()
    models = SamplerModels(student=lambda: model, teacher=model, vocab=model.config.vocab_size, stop_ids=(2,),
                           pad_id=0, vllm=engine)
    source = SampledSource(SourceConfig(kind="student"), SamplingConfig(max_new_tokens=3), stream=Stream(),
                           collate=Collator(0), grad_accum=1, models=models, record_logprobs=False, seed=0,
                           accelerator=accelerator)
    rows = source.next_step(7)
    assert engine.calls == [(7, [[1, 4, 5], [1, 4, 5]])]  # prompts without their dataset completion
    assert rows.micro[0]["input_ids"][0, :5].tolist() == [1, 4, 5, 9, 2]
    teacher_source = SampledSource(SourceConfig(kind="teacher"), SamplingConfig(max_new_tokens=3), stream=Stream(),
                                   collate=Collator(0), grad_accum=1, models=models, record_logprobs=False, seed=0,
                                   accelerator=accelerator)
    teacher_source.next_step(0)
    assert len(engine.calls) == 1  # teacher samples come from kdlm's loop on the teacher


@pytest.mark.parametrize("overrides", [["sampling.teacher_mix=0.2"], ["loss.terms=[{name: pg}]"]])
def test_engine_vllm_refuses_what_needs_both_distributions(recipe_file, overrides):
    with pytest.raises(ConfigError, match="sampling.engine: vllm"):
        load_recipe(recipe_file, ["source.kind=student", "sampling.engine=vllm", "sampling.max_new_tokens=8", *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_engine_vllm_without_a_gpu_is_one_line_before_models_load(recipe_file, tmp_path):
    from kdlm.training import distill

    recipe = load_recipe(recipe_file, ["source.kind=student", "sampling.engine=vllm", "sampling.max_new_tokens=8"])
    with pytest.raises(ModelError, match="CUDA GPU"):
        distill(recipe, show_progress=False)
    assert not (tmp_path / "run").exists()
