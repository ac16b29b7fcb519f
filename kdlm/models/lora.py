"""LoRA students through `peft`: adapters on a frozen student, their parameter count, and the export.

`apply_lora` wraps the (already cut) student in a `peft.PeftModel` whose only trainable parameters are the
adapters (and `modules_to_save`'s copies), so the optimizer, the gradients and AdamW's moments cover those
alone. The rest of kdlm keeps working on the wrapper: it forwards `config`, `get_output_embeddings`,
`generation_config` and `gradient_checkpointing_enable` to the decoder, and the two places that reach
*inside* the decoder (`kdlm.training.step.last_hidden`, `kdlm.models.init_student.decoder_layers`) look through
it with `get_base_model()`.

`export_lora` writes either a merged plain Hugging Face folder (the adapters folded into the weights, loaded
by `AutoModelForCausalLM.from_pretrained` without peft) or the adapter alone (`adapter_config.json` +
`adapter_model.safetensors`, for `peft.PeftModel.from_pretrained`). `planned_lora_parameters` counts the
trainable parameters from a model config alone, for `kdlm plan`.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from torch import nn

from kdlm.errors import ConfigError

FIELD = "student.lora"


def _linear_types() -> tuple[type, ...]:
    """The layer types LoRA adapts here: nn.Linear, and GPT-2 style Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module's dotted path is the name or ends with '.' + name."""
    return name == target or name.endswith("." + target)


def _targets(cfg: Any) -> Any:
    """target_modules as peft takes it: the string all-linear, or a list of names."""
    targets = cfg.target_modules
    if isinstance(targets, list) and targets == ["all-linear"]:
        return "all-linear"
    return targets if isinstance(targets, str) else list(targets)


def check_targets(model: nn.Module, cfg: Any) -> None:
    """Each target_modules / modules_to_save name must match a module of `model` (a target: a linear one);
    else a one-line ConfigError naming the model's linear layer kinds."""
    names = [n for n, _ in model.named_modules() if n]
    linear_kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                      if isinstance(m, _linear_types())))
    kinds = ", ".join(linear_kinds) or "none"
    targets = _targets(cfg)
    if targets != "all-linear":
        for target in targets:
            hit = [m for n, m in model.named_modules() if n and _matches(n, target)]
            if not hit:
                raise ConfigError(f"{FIELD}.target_modules: {target} matches no module of the student "
                                  f"(its linear layers: {kinds})")
            if not any(isinstance(m, _linear_types()) for m in hit):
                raise ConfigError(f"{FIELD}.target_modules: {target} names {type(hit[0]).__name__} modules, not "
                                  f"linear layers (its linear layers: {kinds})")
    for module in cfg.modules_to_save:
        if not any(n.endswith(module) for n in names):  # peft's rule here: a plain suffix
            every = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()))
            raise ConfigError(f"{FIELD}.modules_to_save: {module} matches no module of the student "
                              f"(its modules: {every})")


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """`model` wrapped in a peft.PeftModel with LoRA adapters per `cfg` (a LoraConfig); only the adapters (and
    modules_to_save) require gradients. The targets are checked first (one-line ConfigError)."""
    import peft

    check_targets(model, cfg)
    extra = {}
    if cfg.modules_to_save and "ensure_weight_tying" in peft.LoraConfig.__dataclass_fields__:
        extra["ensure_weight_tying"] = True  # a tied embedding / LM head stays one (trained) matrix
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=_targets(cfg),
                             modules_to_save=list(cfg.modules_to_save) or None, bias="none",
                             task_type=peft.TaskType.CAUSAL_LM, **extra)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # anything peft refuses that the check above did not foresee
        raise ConfigError(f"{FIELD}: peft refused the adapters: {str(err).splitlines()[0]}") from None


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require gradients, all parameters), tied weights counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def adapted_kinds(model: nn.Module) -> list[str]:
    """The module kinds (last name component, e.g. q_proj) that carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)))


def summary(model: nn.Module, cfg: Any) -> str:
    """'LoRA r=16 on 7 module kinds: 4.9M trainable of 139.4M parameters (3.50%)'."""
    trainable, total = trainable_parameters(model)
    kinds = len(adapted_kinds(model))
    return (f"LoRA r={cfg.r} on {kinds} module kind{'s' if kinds != 1 else ''}: {trainable / 1e6:.1f}M trainable of "
            f"{total / 1e6:.1f}M parameters ({trainable / max(total, 1):.2%})")


def merged_model(model: nn.Module, *, in_place: bool = False) -> nn.Module:
    """The plain transformers model with the adapters folded into its weights (modules_to_save: the trained
    copies). `in_place` merges `model` itself (no second copy in memory; the PeftModel is unusable after)."""
    target = model if in_place else copy.deepcopy(model)
    return target.merge_and_unload()


def export_lora(model: nn.Module, tokenizer, folder: Path, card: str, mode: str = "merged", *,
                in_place: bool = False) -> None:
    """Write the LoRA student to `folder`, replacing it atomically. merged: a plain HF folder (safetensors,
    config, generation config, tokenizer, README.md) of the merged model; adapter: the adapter alone
    (adapter_config.json, adapter_model.safetensors), tokenizer and README.md."""
    from kdlm.training.export import save_student_folder

    folder = Path(folder)
    if mode == "merged":
        save_student_folder(merged_model(model, in_place=in_place), tokenizer, folder, card)
        return
    if mode != "adapter":
        raise ConfigError(f"{FIELD}.export: {mode!r} is not one of merged, adapter")
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    base = getattr(getattr(model, "peft_config", {}).get("default"), "base_model_name_or_path", None)
    (tmp / "README.md").write_text(card + adapter_card_note(base or "the student model"))
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def adapter_card_note(base: str) -> str:
    """The paragraph an adapter export's README adds: how to load it."""
    return (f"\n## Loading this adapter\n\nThis folder holds a LoRA adapter (peft), not a whole model. Load it on "
            f"top of its base, `{base}` cut as the run cut it (student.keep_layers / student.prune):\n\n"
            f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"<this folder>\")\n"
            f"model = model.merge_and_unload()  # optional: a plain transformers model\n```\n")


# ----------------------------------------------------------------------------- planning (no weights)

LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(*, hidden_size: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                  intermediate_size: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of a Llama-style decoder block's linear layers."""
    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim
    return {"q_proj": (hidden_size, q), "k_proj": (hidden_size, kv), "v_proj": (hidden_size, kv),
            "o_proj": (q, hidden_size), "gate_proj": (hidden_size, intermediate_size),
            "up_proj": (hidden_size, intermediate_size), "down_proj": (intermediate_size, hidden_size)}


def planned_lora_parameters(cfg: Any, *, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                            head_dim: int, intermediate_size: int, num_hidden_layers: int,
                            vocab_size: Optional[int] = None, tie_word_embeddings: bool = True) -> int:
    """Trainable parameters of a LoRA student from its (cut) config dimensions alone: r * (in + out) per
    targeted linear layer, plus the full size of each modules_to_save module (embed_tokens / lm_head:
    vocab x hidden, once when they are tied; a block linear: in x out per layer; norms: hidden). Names it
    cannot size count 0."""
    shapes = linear_shapes(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                           num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                           intermediate_size=intermediate_size)
    targets = _targets(cfg)
    kinds = list(LINEAR_KINDS) if targets == "all-linear" else [t.rsplit(".", 1)[-1] for t in targets]
    total = sum(cfg.r * sum(shapes[k]) * num_hidden_layers for k in dict.fromkeys(kinds) if k in shapes)
    # peft wraps every module whose dotted path ends with a modules_to_save entry (plain suffix: `norm` also
    # takes input_layernorm and post_attention_layernorm); a dotted entry names one kind exactly
    kinds = ("embed_tokens", "lm_head", *LINEAR_KINDS, "input_layernorm", "post_attention_layernorm", "norm")
    saved = [k for k in kinds if any(k == m.rsplit(".", 1)[-1] if "." in m else k.endswith(m)
                                     for m in cfg.modules_to_save)]
    embeddings_counted = False
    for module in saved:
        if module in ("embed_tokens", "lm_head"):
            if vocab_size and not (tie_word_embeddings and embeddings_counted):  # tied: one trained matrix
                total += vocab_size * hidden_size
            embeddings_counted = True
        elif module in shapes:
            total += shapes[module][0] * shapes[module][1] * num_hidden_layers
        elif module in ("input_layernorm", "post_attention_layernorm"):
            total += hidden_size * num_hidden_layers
        else:  # the final norm
            total += hidden_size
    return total
