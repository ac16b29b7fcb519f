"""Initialise a student by keeping a subset of a model's decoder layers.

DistilBERT (Sanh et al., 2019) keeps every other layer of BERT; Minitron (Muralidharan
et al., 2024) prunes whole layers before distilling. Keeping the embeddings, final
norm, LM head and a uniform stride of layers gives a student that starts close to the
teacher, so distillation has to repair the gap rather than learn from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from kdlm.errors import ModelError


def uniform_layers(total: int, keep: int) -> list[int]:
    """`keep` indices spread evenly over `total` layers, first and last included."""
    if not 1 <= keep <= total:
        raise ModelError(f"keep_layers={keep}: must be between 1 and the model's {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama/Qwen/Mistral/Gemma: model.layers; GPT-2: transformer.h); a peft
    model (a LoRA student) is looked through."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelError(f"{type(model).__name__}: cannot find its decoder layers to select from")


def keep_layers(model: nn.Module, keep: Union[int, list[int]]) -> list[int]:
    """Drop all decoder layers but `keep` (a count for a uniform stride, or explicit indices), in place."""
    layers = decoder_layers(model)
    total = len(layers)
    indices = uniform_layers(total, keep) if isinstance(keep, int) else list(keep)
    if not indices or sorted(set(indices)) != indices or indices[0] < 0 or indices[-1] >= total:
        raise ModelError(f"keep_layers={keep}: need strictly increasing indices within 0..{total - 1}")
    kept = nn.ModuleList([layers[i] for i in indices])
    for new_idx, layer in enumerate(kept):
        # attention modules index the KV cache by their layer number
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent_path, _, attr = _layers_path(model).rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, kept)
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(indices))
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full)
        config.layer_types = [config.layer_types[i] for i in indices]
    return indices


def _layers_path(model: nn.Module) -> str:
    target = decoder_layers(model)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ModelError("decoder layers are not a registered submodule")


def save_student(model: nn.Module, tokenizer, output: Path, *, note: str = "") -> None:
    """Write a plain HF folder: safetensors weights, config, generation config and tokenizer."""
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    if note:
        (output / "README.md").write_text(note)


@torch.no_grad()
def parameter_count(model: nn.Module) -> int:
    """Parameters, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
