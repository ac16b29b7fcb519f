"""The `vllm` backend's mapping onto vLLM's offline API, with a stand-in `vllm` module (vLLM itself needs its own
environment here; on a GPU machine the same code runs against the real engine). Also the cost ledger's --max-cost."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from kdlm.config import from_dict
from kdlm.config.generation import GenerateRecipe
from kdlm.generation.run import Limits, generate
from servers.fake_vllm import install


@dataclass
class FakeLogprob:
    logprob: float
    rank: int


class FakeEngine:
    made: list[dict] = []
    calls: list[tuple] = []

    def __init__(self, **kwargs):
        FakeEngine.made.append(kwargs)

    def chat(self, messages, params, use_tqdm=False):
        FakeEngine.calls.append((messages, params))
        outs = []
        for chat, p in zip(messages, params):
            choices = []
            for j in range(p.kwargs["n"]):
                ids = [11 + j, 12, 2]
                lps = [{t: FakeLogprob(-0.1, 1), 99: FakeLogprob(-3.0, 3), 98: FakeLogprob(-2.0, 2)} for t in ids]
                choices.append(types.SimpleNamespace(text=f"{chat[-1]['content']} #{p.kwargs['seed'] + j}",
                                                     finish_reason="stop", token_ids=ids, logprobs=lps))
            outs.append(types.SimpleNamespace(prompt_token_ids=[1, 2, 3, 4], outputs=choices))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = install(monkeypatch, FakeEngine)
    FakeEngine.made, FakeEngine.calls = [], []
    return module


def test_vllm_backend_maps_recipe_to_engine_and_sampling_params(tmp_path, tiny_model_dir, fake_vllm):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(5)))
    recipe = from_dict(GenerateRecipe, {
        "teacher": {"backend": "vllm", "model": str(tiny_model_dir), "tensor_parallel_size": 2, "data_parallel_size": 2,
                    "max_model_len": 512},
        "generate": {"prompts": str(prompts), "n": 2, "temperature": 0.7, "top_k": 20, "seed": 5, "logprobs": 2,
                     "max_new_tokens": 16, "concurrency": 8},
        "output": {"dir": str(tmp_path / "out")}})
    result = generate(recipe, show_progress=False)
    (made,) = FakeEngine.made
    assert made["tensor_parallel_size"] == 2 and made["data_parallel_size"] == 2 and made["max_model_len"] == 512
    assert made["model"] == str(tiny_model_dir)
    assert len(FakeEngine.calls) == 1  # every prompt in one engine call: vLLM schedules its own batches
    params = FakeEngine.calls[0][1]
    assert all(p.kwargs["n"] == 2 and p.kwargs["seed"] == 5 and p.kwargs["temperature"] == 0.7
               and p.kwargs["top_k"] == 20 and p.kwargs["logprobs"] == 2 and p.kwargs["max_tokens"] == 16 for p in params)
    from kdlm.data import read_rows

    rows = read_rows(str(result.output_dir), "train").rows
    assert len(rows) == 10
    lp = rows[0]["teacher_logprobs"]
    assert lp["tokens"] == ["token_id:11", "token_id:12", "token_id:2"]
    assert lp["top"][0] == [["token_id:11", -0.1], ["token_id:98", -2.0]]  # by rank, cut at generate.logprobs
    assert rows[0]["provenance"]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}


def test_vllm_missing_is_one_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    from kdlm.generation.backends.base import FatalBackendError

    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}) + "\n")
    recipe = from_dict(GenerateRecipe, {"teacher": {"backend": "vllm", "model": str(tiny_model_dir)},
                                        "generate": {"prompts": str(prompts)}, "output": {"dir": str(tmp_path / "o")}})
    with pytest.raises(FatalBackendError, match="vllm is not installed"):
        generate(recipe, show_progress=False)


def test_max_cost_stops_sending(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from servers.fault_server import FaultServer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(30)))
    with FaultServer() as srv:
        recipe = from_dict(GenerateRecipe, {
            "teacher": {"backend": "openai", "model": "fault-teacher", "base_url": srv.base_url,
                        "price_input_per_1m": 1000.0, "price_output_per_1m": 1000.0},
            "generate": {"prompts": str(prompts), "concurrency": 1, "max_new_tokens": 16},
            "output": {"dir": str(tmp_path / "out")}})
        result = generate(recipe, limits=Limits(max_cost=0.05), show_progress=False)
    s = result.summary
    # each answer costs (prompt + completion tokens) * 1e-3: about 0.014, so the fourth one passes 0.05
    assert s["stopped"] and "--max-cost" in s["stopped"] and 0.05 <= s["cost"] < 0.05 + 0.03
    assert 3 <= s["requests"] < 30
