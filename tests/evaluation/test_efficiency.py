"""Efficiency figures: parameter count with tied weights, disk size, percentiles, ratios, timings, memory probe."""

from __future__ import annotations

import pytest

from kdlm.evaluation import efficiency as E


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_parameter_count_counts_tied_embeddings_once(tiny):
    model, _ = tiny
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    named = dict(model.named_parameters(remove_duplicate=False))
    all_tensors = sum(p.numel() for p in named.values())
    assert E.parameter_count(model) == all_tensors - model.get_output_embeddings().weight.numel()
    # by hand: 448 x 32 embedding + 4 layers x (q 32x32 + k,v 32x16 each + o 32x32 + MLP 3 x 32x64 + 2 norms of 32)
    # + final norm 32
    layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert E.parameter_count(model) == 448 * 32 + 4 * layer + 32


def test_disk_mb_counts_weight_files(tiny_model_dir, tmp_path):
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    assert E.disk_mb(str(tiny_model_dir)) == pytest.approx(size / 2**20)
    (tmp_path / "m.gguf").write_bytes(b"x" * 2**20)
    assert E.disk_mb(str(tmp_path), "m.gguf") == pytest.approx(1.0)
    assert E.disk_mb(str(tmp_path / "nothing-here")) is None


def test_percentile_like_numpy():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert E.percentile(data, 50) == 3.0
    assert E.percentile(data, 95) == pytest.approx(4.8)  # 4 + 0.8 * (5 - 4)
    assert E.percentile([7.0], 95) == 7.0


def test_ratios_student_over_reference():
    ref = {"parameters": 100, "disk_mb": 10.0, "latency_ms_p50": 20.0, "throughput_tok_s": 50.0, "peak_memory_mb": 0.0}
    student = {"parameters": 40, "disk_mb": 4.0, "latency_ms_p50": 10.0, "throughput_tok_s": 100.0, "peak_memory_mb": 5.0}
    assert E.ratios(student, ref) == {"parameters": 0.4, "disk_mb": 0.4, "latency_ms_p50": 0.5,
                                      "throughput_tok_s": 2.0, "peak_memory_mb": None}


def test_latency_and_throughput(tiny):
    model, tok = tiny
    lat = E.measure_latency(model, tok, new_tokens=4, repeats=3)
    assert 0 < lat["latency_ms_p50"] <= lat["latency_ms_p95"]
    thr = E.measure_throughput(model, tok, batch_size=2, new_tokens=4, repeats=1)
    assert thr["throughput_tok_s"] > 0
    # min_new_tokens forces the length: exactly new_tokens tokens are generated per row
    out = E._generate_fixed(model, tok, E.prompt_ids(tok), 2, 4)
    assert out.shape == (2, len(E.prompt_ids(tok)) + 4)


def test_cpu_memory_probe_in_a_subprocess(tiny_model_dir, monkeypatch):
    mb = E.probe_cpu_memory(str(tiny_model_dir), None, batch_size=1, new_tokens=2)
    assert mb is not None and 0 <= mb < 2000

    def timeout(*args, **kwargs):
        raise E.subprocess.TimeoutExpired(args[0], 1)

    monkeypatch.setattr(E.subprocess, "run", timeout)
    assert E.probe_cpu_memory(str(tiny_model_dir), None) is None  # a failed probe gives no figure, not an error
