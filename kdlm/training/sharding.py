"""A sharded live teacher: under FSDP (or DeepSpeed ZeRO-3) each process holds 1/world of the frozen teacher.

`accelerator.prepare` wraps only the student + objective module; the teacher (`kdlm.training.step.Teacher`) is a
full copy on every process unless `shard_teacher` shards it. A frozen teacher has no gradients and no optimizer
state, so sharding it costs only the all-gathers of its forward and saves (1 - 1/world) of its weights.

How (FSDP, torch's FSDP2 `fully_shard`, whatever fsdp_version the student's plugin uses):
- each decoder layer is one unit and the decoder body (`model.base_model`: embeddings + final norm) the root,
  all with `reshard_after_forward=True`: a layer is gathered for its own forward and freed after it, so the
  resident teacher is its 1/world shard plus one or two gathered layers in flight (FSDP2 prefetches the next);
- the LM head. The loss reads `TeacherRows.head.weight` outside the teacher's forward (fused chunks, validation),
  where a sharded weight cannot be used. `ShardedTeacher.rows` therefore all-gathers the head once per teacher
  forward, collectively on every process, and hands the loss that full copy: the head is sharded at rest and
  materialised only for the step that uses it (freed with the step's TeacherRows), as FSDP would materialise it
  inside a forward. A tied head (SmolLM2, Qwen2.5-0.5B, Gemma) is the sharded embedding itself; an untied one
  is sharded as its own unit;
- `teacher.model.base_model(...)` (step.last_hidden) runs the FSDP hooks of the body and of every layer, so
  Teacher.rows, FeatureCapture hooks (hidden states, attention q / k / v) and the logits are unchanged.

Constraints of a sharded teacher (every process must run the same number of teacher forwards, in lockstep):
- sampled sources (source.kind student / teacher / mixed / replay) generate with `teacher.model` per process,
  for uneven lengths: the teacher is left unsharded there (`teacher.shard: auto`) or refused (`always`);
- validation shards examples[rank::world]: an uneven number of validation batches per process would hang, so
  `shard_teacher(..., validation_examples=n)` refuses (always) / skips (auto) such a split.

When: `teacher.shard` (read with getattr, default "auto"; the env var KDLM_TEACHER_SHARD overrides it):
- auto: shard under accelerate FSDP, and under DeepSpeed ZeRO-3; never under DDP / MULTI_CPU / one process;
- always: also shard under plain multi-process runs, including CPU with gloo (accelerate refuses FSDP on CPU:
  `--cpu --use_fsdp` is "You can only use one of ..." and a config with `distributed_type: FSDP` falls back to
  DistributedType.NO / MULTI_CPU there), which is how the CPU tests and benchmark exercise this path;
- never: always a full copy.

DeepSpeed ZeRO-3: `deepspeed.initialize(model=teacher, config={zero stage 3, no optimizer})` (TRL's pattern for
a reference / teacher model), head gathered with `deepspeed.zero.GatheredParameters`. deepspeed is not installed
where this was written: that path is untested; without deepspeed a ZeRO-3 run stops before training with one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor, nn

from kdlm.errors import ConfigError, ModelError
from kdlm.losses.objective import LMHead, lm_head_of
from kdlm.training.step import Teacher, TeacherEnsemble, TeacherRows

SHARD_MODES = ("auto", "always", "never")
ZERO3_NEEDS_DEEPSPEED = "DeepSpeed ZeRO-3 was asked for (accelerate launch --use_deepspeed --zero_stage 3) but " \
                        "deepspeed is not installed; ZeRO-3 needs DeepSpeed: pip install deepspeed"


# ----------------------------------------------------------------------------- what the run asks for


def shard_mode(recipe=None) -> str:
    """auto | always | never: KDLM_TEACHER_SHARD, else `recipe.teacher.shard`, else auto."""
    mode = os.environ.get("KDLM_TEACHER_SHARD") or getattr(getattr(recipe, "teacher", None), "shard", None) or "auto"
    if mode not in SHARD_MODES:
        raise ConfigError(f"teacher.shard: {mode!r} is not one of {', '.join(SHARD_MODES)}")
    return mode


def _zero_stage(accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of this run, or None when it is not a DeepSpeed run (read from the accelerator,
    else from the environment `accelerate launch --use_deepspeed` sets)."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
    return None


def check_distributed_setup(accelerator) -> None:
    """Before training: a ZeRO-3 run without deepspeed importable stops here, in one line."""
    if _zero_stage(accelerator) == 3 and importlib.util.find_spec("deepspeed") is None:
        raise ModelError(ZERO3_NEEDS_DEEPSPEED)


def sharding_kind(accelerator, recipe=None) -> Optional[str]:
    """"fsdp", "zero3" or None (a full copy): what `shard_teacher` will do for this run."""
    from accelerate.utils import DistributedType

    mode = shard_mode(recipe)
    if mode == "never" or accelerator is None or accelerator.num_processes < 2:
        return None
    if _zero_stage(accelerator) == 3:
        return "zero3"
    if accelerator.distributed_type == DistributedType.FSDP or mode == "always":
        return "fsdp"
    return None


# ----------------------------------------------------------------------------- the sharded teacher


def local_bytes(tensor: Tensor) -> int:
    """Bytes of `tensor` this process holds: a DTensor's local shard, a ZeRO-3 parameter's partition."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    elif hasattr(tensor, "ds_tensor"):  # deepspeed ZeRO-3: the local partition
        tensor = tensor.ds_tensor
    return tensor.numel() * tensor.element_size()


def teacher_local_bytes(model: nn.Module) -> int:
    """Parameter (and buffer) bytes of `model` held by this process; shared (tied) tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += local_bytes(t)
    return total


class ShardedTeacher(Teacher):
    """A `Teacher` whose model is sharded: every `rows` call gathers the LM head (collectively, once) and hands
    the loss that full copy. `kind`: "fsdp" or "zero3"."""

    def __init__(self, teacher: Teacher, kind: str):
        self.__dict__.update(teacher.__dict__)  # model, head (vocab), hidden / attention layers
        self.kind = kind
        self.head = dataclasses.replace(lm_head_of(self.model, self.head.vocab), vocab=self.head.vocab)  # sharded

    def gathered_head(self) -> LMHead:
        """The LM head with full (gathered) weight and bias: a collective, every process must call it."""
        return dataclasses.replace(self.head, weight=_gather(self.head.weight, self.kind),
                                   bias=_gather(self.head.bias, self.kind) if self.head.bias is not None else None)

    @torch.no_grad()
    def rows(self, inputs: dict[str, Tensor], mask: Tensor, *, features: bool = True) -> TeacherRows:
        rows = super().rows(inputs, mask, features=features)
        rows.head = self.gathered_head()
        return rows


def _gather(weight: Tensor, kind: str) -> Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return weight.full_tensor()
    if kind == "zero3" and hasattr(weight, "ds_id"):  # untested here: deepspeed is not installed
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def _fsdp_shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over a frozen HF causal LM: each decoder layer, the untied LM head, then the body as the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    except Exception as e:  # noqa: BLE001  (a backend without the collectives FSDP needs)
        raise ModelError(f"cannot shard the teacher over {dist.get_world_size()} processes on {device.type}: {e}") from e
    body = model.base_model
    layers = _decoder_layers(model, body)
    if not layers:
        raise ModelError(f"cannot shard the teacher: no decoder layer list found in {type(body).__name__}")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    model.requires_grad_(False)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    if head is not None and not tied and not _inside(head, body):
        fully_shard(head, mesh=mesh, reshard_after_forward=True)
    # explicit True: a root left to "auto" keeps its parameters gathered after forward (FSDP2's training default)
    fully_shard(body, mesh=mesh, reshard_after_forward=True)
    if tied:  # the head still points at the old full tensor: point it at the sharded embedding, freeing the copy
        head.weight = model.get_input_embeddings().weight
    return model


def _inside(module: nn.Module, root: nn.Module) -> bool:
    return any(m is module for m in root.modules())


def _decoder_layers(model: nn.Module, body: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules of the classes HF keeps whole (`_no_split_modules`, e.g. LlamaDecoderLayer),
    else the longest nn.ModuleList directly under the body (`layers`, `h`, `blocks`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in body.modules() if type(m).__name__ in names]
    if found:
        return found[::-1]  # innermost first: FSDP2 shards bottom-up
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _zero3_shard(model: nn.Module, accelerator) -> nn.Module:
    """DeepSpeed ZeRO-3 inference engine for the teacher (TRL's prepare_deepspeed). Untested: no deepspeed here."""
    check_distributed_setup(accelerator)
    import deepspeed

    config = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": 3}
    if config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        config["train_micro_batch_size_per_gpu"] = 1
    config.pop("train_batch_size", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return engine.module  # its submodules carry ZeRO-3's gather hooks: base_model(...) works as before


def shard_teacher(teacher, accelerator, recipe=None, *, validation_examples: Optional[int] = None,
                  batch_size: Optional[int] = None, eval_batches: Optional[int] = None):
    """The teacher, sharded over the processes when the run asks for it (`sharding_kind`), else unchanged.

    A `TeacherEnsemble` has each live member sharded; an offline cache or None passes through. `recipe`, when
    given, supplies teacher.shard, the source kind and (with `validation_examples`) the validation split check."""
    kind = sharding_kind(accelerator, recipe)
    if kind is None or teacher is None:
        return teacher
    why = _why_not(accelerator, recipe, validation_examples, batch_size, eval_batches)
    if why:
        if shard_mode(recipe) == "always":
            raise ConfigError(f"teacher.shard: always: {why}")
        if accelerator.is_main_process:
            print(f"kdlm: teacher kept whole on every process ({why})", flush=True)
        return teacher
    if isinstance(teacher, TeacherEnsemble):
        teacher.members = [(name, w, _shard_one(m, kind, accelerator)) for name, w, m in teacher.members]
        return teacher
    return _shard_one(teacher, kind, accelerator)


def _shard_one(teacher, kind: str, accelerator):
    if not isinstance(teacher, Teacher) or isinstance(teacher, ShardedTeacher):
        return teacher  # an offline cache: nothing to shard
    full = teacher_local_bytes(teacher.model)
    teacher.model = _zero3_shard(teacher.model, accelerator) if kind == "zero3" else \
        _fsdp_shard(teacher.model, accelerator.device)
    sharded = ShardedTeacher(teacher, kind)
    if accelerator.is_main_process:
        print(f"kdlm: teacher sharded ({kind}) over {accelerator.num_processes} processes: "
              f"{teacher_local_bytes(sharded.model) / 2**20:.1f} of {full / 2**20:.1f} MiB per process", flush=True)
    return sharded


def _why_not(accelerator, recipe, validation_examples, batch_size, eval_batches) -> Optional[str]:
    """Why this run cannot have a sharded teacher (its processes would not run the teacher in lockstep)."""
    from kdlm.config.schema import SAMPLED_SOURCES

    if recipe is not None and recipe.source.kind in SAMPLED_SOURCES:
        return (f"source.kind: {recipe.source.kind} samples with the teacher on each process for uneven lengths; "
                "a sharded teacher needs every process in lockstep")
    if validation_examples:
        world = accelerator.num_processes
        bs = batch_size or (recipe.train.batch_size if recipe is not None else 1)
        cap = eval_batches if eval_batches is not None else (recipe.train.eval_batches if recipe is not None else None)
        counts = {_batches(len(range(r, validation_examples, world)), bs, cap) for r in range(world)}
        if len(counts) > 1:
            return (f"{validation_examples} validation examples in batches of {bs} give the {world} processes "
                    f"{sorted(counts)} teacher forwards; make the validation set a multiple of {world * bs}")
    return None


def _batches(n: int, batch_size: int, cap: Optional[int]) -> int:
    b = -(-n // batch_size)
    return min(b, cap) if cap is not None else b


# ----------------------------------------------------------------------------- for `kdlm plan`


def teacher_memory_per_process(param_bytes: int, *, mode: str, world: int, layer_bytes: int = 0,
                               head_bytes: int = 0) -> int:
    """Teacher weight bytes resident on one process: "ddp" a full copy; "fsdp" / "zero3" a 1/world shard, plus,
    when given, the transient gathered working set: two decoder layers (the one running and the prefetched next)
    and the LM head gathered for the loss (`layer_bytes` / `head_bytes`: one layer's / the head's full bytes)."""
    if mode == "ddp" or world <= 1:
        return int(param_bytes)
    if mode not in ("fsdp", "zero3"):
        raise ValueError(f"mode must be ddp, fsdp or zero3, not {mode!r}")
    return -(-int(param_bytes) // world) + 2 * int(layer_bytes) + int(head_bytes)
