"""Load teacher and student models and their tokenizers.

A model is named by a Hugging Face hub id, a local HF folder, a `.gguf` file
(dequantised to float by transformers' GGUF support) or a bundled alias
(`kdlm.models.bundled`). The teacher is returned in eval mode with gradients off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdlm.errors import ModelError
from kdlm.models import bundled

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads a model: a folder or hub id, and a GGUF file name inside it if any."""

    path: str
    gguf_file: Optional[str] = None
    revision: Optional[str] = None

    @property
    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.revision:
            out["revision"] = self.revision
        return out


def resolve_source(name: str, gguf_file: Optional[str] = None, revision: Optional[str] = None) -> ModelSource:
    """Turn a recipe's model name into a ModelSource. Bundled aliases are converted (once) to a cached HF folder."""
    if name in bundled.ALIASES:
        return ModelSource(str(bundled.materialize(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{name}: GGUF file not found")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{name}: expected a model folder, a .gguf file or a hub id")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            else:
                what = f"holds several GGUF files ({', '.join(ggufs)}); set gguf_file" if ggufs else "has no config.json"
                raise ModelError(f"{name}: not a Hugging Face model folder: it {what}")
        return ModelSource(str(path), gguf_file)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: model folder not found (and it does not look like a hub id 'org/name')")
    return ModelSource(name, gguf_file, revision)  # a hub id: from_pretrained fetches it when online


def resolve_device(device: str, default: Optional[torch.device] = None) -> torch.device:
    """`auto` means the process's accelerator device (given by the caller), else CUDA if present, else CPU."""
    if device == "auto":
        if default is not None:
            return default
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, *, trainable: bool) -> torch.dtype:
    """`auto`: bf16 for a frozen model on a GPU that supports it; fp32 otherwise (master weights stay fp32)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if not trainable and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"{source.path}: cannot load tokenizer ({_first_line(err)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    frozen: bool = False,
) -> nn.Module:
    """Load a causal LM. A frozen model (the teacher) is put in eval mode with requires_grad off."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, trust_remote_code=trust_remote_code, **source.kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"{source.path}: cannot load model ({_first_line(err)})") from None
    drop_gguf_quantization_marker(model)
    model.to(device)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def drop_gguf_quantization_marker(model: nn.Module) -> None:
    """A model loaded from GGUF is dequantised to float but still flagged as quantized, which blocks
    save_pretrained and training. Its weights are ordinary float tensors, so the flag is removed."""
    config = getattr(model.config, "quantization_config", None)
    if config is None or "gguf" not in str(getattr(config, "quant_method", "")).lower():
        return
    del model.config.quantization_config
    model.hf_quantizer = None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
