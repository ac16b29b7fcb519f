"""`kdlm plan RECIPE`: peak memory and speed of a run, estimated before it starts.

Nothing heavy is loaded: parameter counts come from the safetensors headers (or the
config), token statistics from the recipe's data (a sample of it), and the device's
matmul speed from a short measurement. The memory model, per process:

    baseline       the Python process with torch + transformers imported (measured here)
    teacher        teacher weights (absent with teacher.source: cache, or when no loss term
                   needs a teacher: ce / redi only) + autocast copies
    student        fp32 master weights + gradients + AdamW's two moments (16 bytes/param)
                   + autocast's low-precision weight copies; a LoRA student (student.lora): its frozen
                   weights (4 bytes/param) + 16 bytes per trainable parameter (adapters, modules_to_save)
    activations    student activations kept for backward: per token per layer
                   (6H + 2*kv + 4I) elements in the autocast dtype + 2H fp32 (residual
                   stream and norm inputs); with gradient checkpointing only the layer
                   inputs plus one layer's activations
    teacher pass   one layer's transient activations under no_grad + the counted rows' hidden
    loss           fused: the chunk budget + [V, H] fp32 gradient accumulators;
                   unfused: ~10 fp32 [N_counted, V] buffers
The sum is compared with what the run measures (`final_metrics.json` memory.peak_rss_mb).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kdlm.config import Recipe
from kdlm.config.schema import SAMPLED_SOURCES
from kdlm.data import prepare_data
from kdlm.data.encode import IGNORE
from kdlm.data.packing import pack_examples
from kdlm.losses.fused import chunk_rows
from kdlm.losses.objective import resolve_terms
from kdlm.memory import current_rss_mb
from kdlm.models.loading import load_tokenizer, resolve_source

MiB = 2**20


@dataclass
class ModelShape:
    """What the memory and FLOP models need to know about a causal LM."""

    params: int  # every parameter, tied weights once
    embedding_params: int  # input embedding (+ untied output head)
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    heads: int = 0  # query heads (after width pruning)
    head_dim: int = 0
    tied: bool = True  # input embedding and LM head are one matrix

    @property
    def body_params(self) -> int:
        return self.params - self.embedding_params


@dataclass
class Plan:
    memory_mb: dict[str, float] = field(default_factory=dict)
    total_mb: float = 0.0
    available_mb: Optional[float] = None
    tokens_per_s: float = 0.0  # counted (supervised) tokens per second, estimated
    step_seconds: float = 0.0
    device: str = "cpu"
    data: dict[str, float] = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)
    trainable_params: int = 0  # what the optimizer updates: every student parameter, or LoRA's adapters
    student_params: int = 0  # every student parameter (a LoRA student: base + adapters + modules_to_save copies)
    optimizer_state_mb: float = 0.0  # AdamW's two fp32 moments of the trainable parameters (inside the memory lines)
    # a live teacher's weights per process by mode (ddp: full copy; fsdp / zero3: a 1/world shard plus two gathered
    # layers and the gathered LM head), at `world` processes (kdlm.training.sharding.teacher_memory_per_process)
    teacher_per_process_mb: dict[str, float] = field(default_factory=dict)
    world: int = 1


def model_shape(name: str, gguf_file: Optional[str] = None, keep_layers: Any = None, prune: Any = None) -> ModelShape:
    """Shape of a model from its config and safetensors headers, without loading weights; with `keep_layers`
    and a `prune` config (student.prune), the shape of the student cut from it."""
    from transformers import AutoConfig

    source = resolve_source(name, gguf_file)
    config = AutoConfig.from_pretrained(source.path, **source.kwargs)
    config = getattr(config, "text_config", None) or config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    tied = getattr(config, "tie_word_embeddings", True)

    def per_layer(hidden: int, heads: int, kv_heads: int, intermediate: int) -> int:
        kv_dim = kv_heads * head_dim
        return hidden * (heads * head_dim + 2 * kv_dim) + heads * head_dim * hidden + 3 * hidden * intermediate + 2 * hidden

    embedding = config.vocab_size * hidden * (1 if tied else 2)
    counted = _safetensors_params(Path(source.path)) if Path(source.path).is_dir() and not source.gguf_file else None
    total = counted if counted else embedding + layers * per_layer(hidden, heads, kv_heads, intermediate) + hidden
    if keep_layers is not None:
        kept = keep_layers if isinstance(keep_layers, int) else len(keep_layers)
        total -= (layers - kept) * per_layer(hidden, heads, kv_heads, intermediate)
        layers = kept
    if prune is not None and any(getattr(prune, k, None) for k in ("intermediate_size", "num_key_value_heads", "hidden_size")):
        before = layers * per_layer(hidden, heads, kv_heads, intermediate) + embedding + hidden
        new_kv = prune.num_key_value_heads or kv_heads
        heads, kv_heads = heads // kv_heads * new_kv, new_kv
        intermediate = prune.intermediate_size or intermediate
        hidden = prune.hidden_size or hidden
        embedding = config.vocab_size * hidden * (1 if tied else 2)
        total += layers * per_layer(hidden, heads, kv_heads, intermediate) + embedding + hidden - before
    return ModelShape(total, embedding, layers, hidden, intermediate, kv_heads * head_dim, config.vocab_size,
                      heads=heads, head_dim=head_dim, tied=bool(tied))


def _safetensors_params(folder: Path) -> Optional[int]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                total += _prod(fh.get_slice(key).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def measure_matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Sustained matmul throughput of this device in `dtype`: the best rate over short timed bursts of
    size x size products, after a warm-up (the first bf16 products on a CPU include oneDNN's set-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def data_statistics(recipe: Recipe, tokenizer, sample: int = 2000) -> dict[str, float]:
    """Tokens per micro-batch as the run will see them (padding or packing included), and the counted share."""
    cfg = recipe.data
    limited = type(cfg)(**{**asdict(cfg), "max_samples": min(cfg.max_samples or sample, sample)})
    train, _, _ = prepare_data(limited, tokenizer, seed=recipe.train.seed)
    lengths = [len(ex.input_ids) for ex in train]
    counted = sum(sum(label != IGNORE for label in ex.labels[1:]) for ex in train)
    batch = recipe.train.batch_size
    if cfg.packing:
        rows = pack_examples(train, cfg.pack_length or cfg.max_length)
        row_tokens = sum(lengths) / max(len(rows), 1)
        width = max(len(r.input_ids) for r in rows)
        tokens_per_batch = batch * width  # rows are padded to the longest row of the batch
        counted_per_batch = counted / max(len(rows), 1) * batch
    else:
        row_tokens = sum(lengths) / len(lengths)
        # right padding to the longest of a random batch: estimate with the mean of the batch maxima
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(lengths), generator=g).tolist()
        maxima = [max(lengths[i] for i in perm[s:s + batch]) for s in range(0, len(perm), batch)]
        width = sum(maxima) / len(maxima)
        tokens_per_batch = batch * width
        counted_per_batch = counted / len(lengths) * batch
    return {"examples_sampled": len(train), "mean_tokens_per_row": row_tokens, "mean_padded_width": width,
            "tokens_per_micro_batch": tokens_per_batch, "counted_per_micro_batch": counted_per_batch}


def estimate(recipe: Recipe, *, device: Optional[torch.device] = None) -> Plan:
    """The plan for `recipe` on `device` (default: CUDA if present, else CPU)."""
    from kdlm.models.generate import cpu_has_fast_bf16

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = Plan(device=str(device))
    tokenizer = load_tokenizer(resolve_source(recipe.student.model, recipe.student.gguf_file))
    plan.data = data_statistics(recipe, tokenizer)
    terms = resolve_terms(recipe.loss)
    needs_teacher = any(t.needs_teacher for t in terms)
    # no teacher runs with an offline cache, nor when no term needs one (its model need not even exist then)
    no_live_teacher = recipe.teacher.source == "cache" or not needs_teacher
    student = model_shape(recipe.student.model, recipe.student.gguf_file, recipe.student.keep_layers,
                          recipe.student.prune)
    # without a teacher the student's shape stands in for it where only the shared vocabulary is read
    teacher = model_shape(recipe.teacher.model, recipe.teacher.gguf_file) if needs_teacher else student
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and cpu_has_fast_bf16()) else "no"
    act_bytes = 4 if mixed == "no" else 2
    teacher_bytes = 2 if recipe.teacher.dtype in ("bfloat16", "float16") or (
        recipe.teacher.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()) else 4
    tokens = plan.data["tokens_per_micro_batch"]
    counted = plan.data["counted_per_micro_batch"]

    mem = plan.memory_mb
    mem["baseline (python, torch, transformers)"] = current_rss_mb() if device.type == "cpu" else 0.0
    if not no_live_teacher:
        mem["teacher weights"] = teacher.params * teacher_bytes / MiB
        plan.world, plan.teacher_per_process_mb = _teacher_modes(teacher, teacher_bytes)
        if act_bytes == 2 and teacher_bytes == 4:
            mem["teacher autocast weight copies"] = teacher.body_params * 2 / MiB
    lora = recipe.student.lora
    if lora.enabled:  # frozen fp32 weights; weights, grads and AdamW moments only for the adapters
        from kdlm.models.lora import planned_lora_parameters

        plan.trainable_params = planned_lora_parameters(
            lora, hidden_size=student.hidden, num_attention_heads=student.heads,
            num_key_value_heads=student.kv_dim // max(student.head_dim, 1), head_dim=student.head_dim,
            intermediate_size=student.intermediate, num_hidden_layers=student.layers, vocab_size=student.vocab,
            tie_word_embeddings=student.tied)
        plan.student_params = student.params + plan.trainable_params
        mem["student weights (frozen)"] = student.params * 4 / MiB
        mem["LoRA weights + grads + AdamW"] = plan.trainable_params * 16 / MiB
    else:
        plan.trainable_params = plan.student_params = student.params
        mem["student weights + grads + AdamW"] = student.params * 16 / MiB
    plan.optimizer_state_mb = plan.trainable_params * 8 / MiB
    saved = {m.rsplit(".", 1)[-1] for m in lora.modules_to_save}
    head_trains = not lora.enabled or "lm_head" in saved or (student.tied and "embed_tokens" in saved)
    if act_bytes == 2:
        mem["student autocast weight copies"] = student.body_params * 2 / MiB
    per_token_layer = (6 * student.hidden + 2 * student.kv_dim + 4 * student.intermediate) * act_bytes + 2 * student.hidden * 4
    if recipe.train.gradient_checkpointing:
        activations = tokens * (student.layers * student.hidden * act_bytes + per_token_layer)
    else:
        activations = tokens * student.layers * per_token_layer
    mem["student activations"] = activations / MiB
    if not no_live_teacher:
        mem["teacher forward (transient)"] = tokens * ((3 * teacher.intermediate + 4 * teacher.hidden) * act_bytes) / MiB \
            + counted * teacher.hidden * 4 / MiB
    vocab = min(teacher.vocab, student.vocab)
    if recipe.loss.fused:
        rows = chunk_rows(vocab, [t.name for t in terms], chunk_bytes=recipe.loss.chunk_mb * MiB)
        # + the LM head's [V, H] fp32 gradient accumulators, when the head trains
        loss = min(rows, counted) * vocab * 4 * 10 + (2 * vocab * student.hidden * 4 if head_trains else 0)
    else:
        loss = counted * vocab * 4 * 10
    mem["loss (LM head + divergences)"] = loss / MiB
    if any(t.is_feature for t in terms):
        mem["feature terms (hint / attention)"] = feature_memory(recipe, terms, tokens=tokens, counted=counted,
                                                                act_bytes=act_bytes) / MiB
    plan.total_mb = sum(mem.values())
    plan.available_mb = _available_mb(device)

    # speed: a FLOP model against this device's measured matmul rates. The decoder bodies run in the
    # autocast dtype; the LM heads and losses always in fp32 (kdlm.losses.fused), which on a CPU with
    # native bf16 is several times slower per FLOP, so the heads get the fp32 rate.
    fp32_rate = measure_matmul_gflops(torch.float32, device) * 1e9
    body_rate = measure_matmul_gflops(torch.bfloat16, device) * 1e9 if act_bytes == 2 else fp32_rate
    efficiency = 0.32 if device.type == "cpu" else 0.4  # achieved / matmul peak for whole training steps (measured)
    # forward + backward = 6 FLOP per parameter and token; gradient checkpointing runs the forward twice; a
    # frozen weight (LoRA's base) skips its weight-gradient matmul (2 of the 6)
    body_flops = ((8 if recipe.train.gradient_checkpointing else 6) - (2 if lora.enabled else 0)) \
        * student.body_params * tokens
    head_flops = (6 if head_trains else 4) * vocab * student.hidden * counted
    if not no_live_teacher:
        body_flops += 2 * teacher.body_params * tokens
        head_flops += 2 * vocab * teacher.hidden * counted
    accum = recipe.train.grad_accum
    plan.step_seconds = (body_flops / body_rate + head_flops / fp32_rate) * accum / efficiency
    plan.tokens_per_s = counted * accum / plan.step_seconds
    plan.suggestions = _suggest(recipe, plan, mem, no_live_teacher)
    if needs_teacher:
        advice = capacity_gap_advice(teacher.params, student.params, has_taid=any(t.name == "taid" for t in terms))
        if advice:
            plan.suggestions = [s for s in plan.suggestions if s != "no change needed"] + [advice]
    return plan


# MiniMA (Zhang et al. 2023, "Towards the law of capacity gap in distilling language models"): the best teacher
# is about 2.5x the student's size; much larger teachers distil worse, not better.
BEST_TEACHER_RATIO = 2.5
WARN_TEACHER_RATIO = 2 * BEST_TEACHER_RATIO


def capacity_gap_advice(teacher_params: int, student_params: int, *, has_taid: bool = False) -> Optional[str]:
    """A warning when the teacher is much larger than the student (over WARN_TEACHER_RATIO x), else None."""
    ratio = teacher_params / max(student_params, 1)
    if ratio <= WARN_TEACHER_RATIO:
        return None
    bridge = "" if has_taid else " or a taid term (TAID interpolates from the student towards the teacher)"
    return (f"capacity gap: the teacher has {ratio:.1f}x the student's parameters; the capacity-gap law (MiniMA) "
            f"puts the best teacher at about {BEST_TEACHER_RATIO}x the student: consider an intermediate teacher "
            f"of about {BEST_TEACHER_RATIO * student_params / 1e6:,.0f}M parameters{bridge}")


def _teacher_modes(teacher: ModelShape, teacher_bytes: int) -> tuple[int, dict[str, float]]:
    """A live teacher's weights per process under DDP and sharded, at the launch's process count (WORLD_SIZE under
    accelerate / torchrun; 8 when planning outside a launch, as a typical node)."""
    import os

    from kdlm.training.sharding import teacher_memory_per_process

    world = int(os.environ.get("WORLD_SIZE", "0")) or 8
    total = teacher.params * teacher_bytes
    head = teacher.vocab * teacher.hidden * teacher_bytes  # gathered for the loss (tied or not)
    layer_bytes = teacher.body_params // max(teacher.layers, 1) * teacher_bytes
    return world, {mode: teacher_memory_per_process(total, mode=mode, world=world, layer_bytes=layer_bytes,
                                                    head_bytes=head) / MiB for mode in ("ddp", "fsdp")}


def feature_memory(recipe: Recipe, terms: list, *, tokens: float, counted: float, act_bytes: int) -> float:
    """Extra bytes of the feature terms, per process (docs/concepts/features.md):
    hint, per layer pair: the teacher's captured states at the counted tokens (autocast dtype) and ~3 fp32
    [counted, H_t] buffers the distance keeps for backward, plus a projection's weight, grad and AdamW moments;
    attention, per layer pair: the teacher's captured q / k / v (autocast dtype), and one query-row chunk's
    [batch, relation heads, chunk, L] fp32 scores for ~4 buffers (student and teacher softmax, log-ratio, grad)
    per relation. The student's own captured states are activations it keeps anyway."""
    from kdlm.training.trainer import planned_dims, resolve_features

    student, teacher = planned_dims(recipe, student=True), planned_dims(recipe, student=False)
    resolved = resolve_features(recipe, list(terms), student, teacher)
    width = tokens / max(recipe.train.batch_size, 1)  # padded row length
    total = 0.0
    for term in resolved:
        if not term.is_feature:
            continue
        pairs = len(term.layers)
        if term.name == "hint":
            projection = 16 * student.hidden * teacher.hidden if (
                student.hidden != teacher.hidden or term.projection == "xavier") else 0
            total += pairs * (counted * teacher.hidden * (act_bytes + 3 * 4) + projection)
            continue
        qkv = tokens * (teacher.heads + 2 * teacher.kv_heads) * teacher.head_dim * act_bytes
        heads = term.relation_heads or teacher.heads
        kinds = len(term.relations) if term.name == "attention_relation" else 1
        chunk = recipe.train.batch_size * heads * min(term.chunk_rows, width) * width * 4 * 4 * kinds
        total += pairs * qkv + chunk
    return total


def _suggest(recipe: Recipe, plan: Plan, mem: dict[str, float], no_live_teacher: bool) -> list[str]:
    out = []
    if plan.available_mb and plan.total_mb > 0.9 * plan.available_mb:
        out.append(f"estimated peak {plan.total_mb:,.0f} MiB exceeds 90% of the {plan.available_mb:,.0f} MiB available:")
        if not recipe.train.gradient_checkpointing and mem["student activations"] > 0.2 * plan.total_mb:
            out.append("  set train.gradient_checkpointing: true (activations are the largest part)")
        if recipe.train.batch_size > 1:
            out.append(f"  lower train.batch_size (now {recipe.train.batch_size}) and raise train.grad_accum to keep the tokens per step")
        if not no_live_teacher and mem.get("teacher weights", 0) > 0.25 * plan.total_mb:
            out.append("  cache the teacher (`kdlm cache-teacher`, teacher.source: cache): its weights are not loaded then")
    if not recipe.loss.fused:
        out.append("set loss.fused: true: the unfused loss holds ~10 [tokens, vocab] fp32 buffers")
    sampled = recipe.source.kind in SAMPLED_SOURCES
    if sampled:
        out.append(f"source.kind {recipe.source.kind} samples completions during training: the figures above model "
                   f"the data's own completions; sampling time and its KV cache (up to "
                   f"{recipe.sampling.max_new_tokens} new tokens per prompt) are not included")
    if not sampled and not recipe.data.packing and plan.data["mean_padded_width"] > 1.15 * plan.data["mean_tokens_per_row"]:
        waste = 1 - plan.data["mean_tokens_per_row"] / plan.data["mean_padded_width"]
        out.append(f"set data.packing: true: about {waste:.0%} of each batch is padding")
    if not out:
        out.append("no change needed")
    return out


def _available_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total / MiB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def render(plan: Plan) -> str:
    """The plan as a terminal table."""
    lines = [f"kdlm plan on {plan.device}", "", f"{'memory (per process)':45} {'MiB':>10}"]
    for name, mb in plan.memory_mb.items():
        lines.append(f"  {name:43} {mb:10,.0f}")
    lines.append(f"  {'estimated peak':43} {plan.total_mb:10,.0f}")
    if plan.available_mb:
        lines.append(f"  {'available':43} {plan.available_mb:10,.0f}")
    if plan.student_params:
        share = plan.trainable_params / plan.student_params
        lines += ["", f"trainable parameters: {plan.trainable_params / 1e6:,.2f}M of {plan.student_params / 1e6:,.1f}M "
                  f"({share:.2%}); optimizer state (AdamW, 2 fp32 moments): {plan.optimizer_state_mb:,.0f} MiB"]
    if plan.teacher_per_process_mb:
        t = plan.teacher_per_process_mb
        lines += ["", f"teacher weights per process at {plan.world} processes: {t['ddp']:,.0f} MiB as a full copy "
                  f"(DDP), {t['fsdp']:,.0f} MiB sharded (teacher.shard under FSDP / ZeRO-3)"]
    d = plan.data
    lines += ["", f"data: {d['mean_tokens_per_row']:.0f} tokens per row, padded width {d['mean_padded_width']:.0f}, "
              f"{d['tokens_per_micro_batch']:.0f} tokens and {d['counted_per_micro_batch']:.0f} counted per micro-batch",
              f"speed: about {plan.tokens_per_s:,.0f} counted tokens/s ({plan.step_seconds:.1f} s per optimizer step)",
              "", "suggestions:"] + [f"  {s}" for s in plan.suggestions]
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps(asdict(plan), indent=2)
