"""A sharded live teacher (kdlm.training.sharding) under two CPU processes (gloo, FSDP2 `fully_shard`).

accelerate refuses FSDP on CPU, so these runs ask for sharding with KDLM_TEACHER_SHARD=always (the
`teacher.shard: always` switch) on a plain 2-process MULTI_CPU run started by torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kdlm.errors import ConfigError, ModelError
from kdlm.training.sharding import check_distributed_setup, shard_mode, teacher_memory_per_process

WORKER = textwrap.dedent('''
    import copy, json, os, sys
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM
    from kdlm.training.sharding import ShardedTeacher, shard_teacher, teacher_local_bytes
    from kdlm.training.step import Teacher, counted_positions

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    out = {}
    for tied in (True, False):
        torch.manual_seed(0)  # the same weights on both processes
        cfg = LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
        full = Teacher(copy.deepcopy(model), 128)  # 131 rows, 128 compared: an uneven shard of the head
        teacher = shard_teacher(Teacher(model, 128), acc)
        assert isinstance(teacher, ShardedTeacher), type(teacher)
        g = torch.Generator().manual_seed(1 + acc.process_index)  # each process its own batch, as in training
        ids = torch.randint(0, 131, (2, 9), generator=g)
        attn = torch.ones_like(ids); attn[1, 6:] = 0
        labels = ids.clone(); labels[:, :3] = -100; labels[1, 6:] = -100
        mask = counted_positions(labels)[0]
        inputs = {"input_ids": ids, "attention_mask": attn}
        ref, got = full.rows(inputs, mask), teacher.rows(inputs, mask)
        ref_logits, got_logits = full.logits(inputs, mask), teacher.logits(inputs, mask)
        out["tied" if tied else "untied"] = {
            "rows": int(mask.sum()),
            "hidden_err": (ref.hidden - got.hidden).abs().max().item(),
            "logits_err": (ref_logits - got_logits).abs().max().item(),
            "head_err": (ref.head.logits(ref.hidden) - got.head.logits(got.hidden)).abs().max().item(),
            "full_bytes": teacher_local_bytes(full.model), "local_bytes": teacher_local_bytes(teacher.model),
            "head_tied_after": teacher.model.lm_head.weight is teacher.model.model.embed_tokens.weight,
        }
    with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
        json.dump(out, f)
''')


def _launch(args, env_extra, timeout=300):
    # torchrun, not `accelerate launch --cpu --num_processes 2`: without mpirun that starts ONE process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
           "ACCELERATE_MIXED_PRECISION": "no", **env_extra}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_sharded_teacher_matches_full_copy_at_half_the_bytes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = _launch([str(script), str(tmp_path)], {"KDLM_TEACHER_SHARD": "always"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in result.items():
            assert r["rows"] > 0
            assert r["hidden_err"] <= 1e-5 and r["logits_err"] <= 1e-5 and r["head_err"] <= 1e-5, (name, r)
            # every tensor sharded: half the bytes (plus at most one padding row per sharded tensor)
            assert abs(r["local_bytes"] - r["full_bytes"] / 2) <= 0.02 * r["full_bytes"], (name, r)
        assert result["tied"]["head_tied_after"] and not result["untied"]["head_tied_after"]


@pytest.mark.slow
def test_distill_with_sharded_teacher_matches_full_copy(recipe_file, tmp_path):
    """The same 3-step `kdlm distill` under 2 processes with the teacher whole (DDP-style) and sharded: the same
    losses and validation figures (the sharded teacher's logits are the full one's)."""
    from kdlm.training.metrics import read_metrics

    runs = {}
    for mode in ("never", "always"):
        run = tmp_path / mode
        proc = _launch(["-m", "kdlm", "distill", str(recipe_file), "--no-progress", "--set", f"output.dir={run}",
                        "--set", "train.max_steps=3", "--set", "train.save_every=0", "--set", "train.report_to=[]"],
                       {"KDLM_TEACHER_SHARD": mode}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("teacher sharded (fsdp)" in proc.stdout) == (mode == "always"), proc.stdout[-2000:]
        runs[mode] = ([r["loss/total"] for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r],
                      json.loads((run / "final_metrics.json").read_text()))
    (never_losses, never_final), (sharded_losses, sharded_final) = runs["never"], runs["always"]
    assert len(never_losses) == 3 and sharded_losses == pytest.approx(never_losses, rel=1e-5, abs=1e-6)
    for key in ("kl_to_teacher", "teacher_ce", "top1_agreement"):
        assert sharded_final["after"][key] == pytest.approx(never_final["after"][key], rel=1e-5, abs=1e-6)


def test_teacher_memory_per_process():
    assert teacher_memory_per_process(1000, mode="ddp", world=4) == 1000
    assert teacher_memory_per_process(1000, mode="fsdp", world=4) == 250
    assert teacher_memory_per_process(1001, mode="zero3", world=2) == 501
    assert teacher_memory_per_process(1000, mode="fsdp", world=4, layer_bytes=10, head_bytes=100) == 370
    assert teacher_memory_per_process(1000, mode="fsdp", world=1) == 1000
    with pytest.raises(ValueError):
        teacher_memory_per_process(1000, mode="tp", world=2)


def test_zero3_without_deepspeed_is_one_line(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ModelError, match="pip install deepspeed") as e:
        check_distributed_setup(None)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_distributed_setup(None)  # ZeRO-2 shards no parameters: nothing to refuse


def test_shard_mode(monkeypatch):
    monkeypatch.delenv("KDLM_TEACHER_SHARD", raising=False)
    assert shard_mode(None) == "auto"
    monkeypatch.setenv("KDLM_TEACHER_SHARD", "sometimes")
    with pytest.raises(ConfigError):
        shard_mode(None)


def test_distill_refuses_zero3_without_deepspeed_before_accelerate(recipe_file, monkeypatch, tmp_path):
    import importlib.util

    from kdlm.config import load_recipe
    from kdlm.errors import ModelError
    from kdlm.training import distill

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ModelError, match="ZeRO-3 needs DeepSpeed: pip install deepspeed") as err:
        distill(load_recipe(recipe_file), show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
