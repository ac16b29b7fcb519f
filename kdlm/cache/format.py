"""On-disk format of the teacher cache: encoding, file names, manifest, identity hashes.

See `kdlm/cache/__init__.py` for the layout. Everything that decides whether a cache fits a
recipe lives here, so that capture (no-op / refuse) and reading (CachedTeacher) compare the
same fields in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdlm.errors import ModelError

FORMAT_NAME = "kdlm-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCALE = 4096.0  # fixed point: q = round(-logp * SCALE), 2^-12 nats per step
Q_MAX = 65535  # largest code: -logp up to 65535/4096 = 16.0 nats (p >= 1.1e-7); smaller probabilities clip
MAX_DECODE_ERROR = 0.5 / SCALE  # 2^-13 nats for every entry that did not clip
DEFAULT_SHARD_ROWS = 1 << 20  # positions per shard: 256 MiB per shard at k = 64, V <= 65,536

# data-section fields that change which tokens an example has (and so what the cache holds)
DATA_FIELDS = ("train", "train_split", "validation", "validation_split", "max_samples", "format", "text_field",
               "prompt_field", "completion_field", "messages_field", "chat_template", "completion_only")


# ----------------------------------------------------------------------------- values


def id_dtype(vocab: int) -> np.dtype:
    """uint16 ids when every id fits (V <= 65,536), else int32."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def bytes_per_position(k: int, vocab: int) -> int:
    return k * (id_dtype(vocab).itemsize + 2)


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """fp32 log-probs (<= 0) -> uint16 codes of -logp in steps of 2^-12 nats, clipped to [0, 65535]."""
    q = np.rint(-logprobs.astype(np.float64) * SCALE)
    return np.clip(np.nan_to_num(q, nan=Q_MAX, posinf=Q_MAX), 0, Q_MAX).astype(np.uint16)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint16 codes -> fp32 log-probs (exact: every code/4096 is a float32)."""
    return codes.astype(np.float32) * np.float32(-1.0 / SCALE)


def tail_logprob(logprobs: np.ndarray) -> np.ndarray:
    """log of the mass outside the top-k, derived from decoded log-probs [N, k]: log(max(0, 1 - sum exp)).
    -inf where the decoded head already sums to >= 1 (quantisation; a true tail is never exactly 0)."""
    head = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - head, 0.0, None)).astype(np.float32)


def ids_file(shard: int, vocab: int) -> str:
    return f"shard-{shard:05d}.ids.{'u16' if id_dtype(vocab) == np.uint16 else 'i32'}"


def nlp_file(shard: int) -> str:
    return f"shard-{shard:05d}.nlp.u16"


def index_file(shard: int) -> str:
    return f"shard-{shard:05d}.index.json"


# ----------------------------------------------------------------------------- hashes


def sha256_file(path: Path, digest: Optional[Any] = None, block: int = 1 << 20) -> Any:
    digest = digest if digest is not None else hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest


def ids_sha(input_ids: list[int]) -> str:
    """Hash of one example's token ids (detects a changed data row with the same sample id)."""
    return hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def tokenizer_sha(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, sorted) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {"map": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
               "all": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))}
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def chat_template_sha(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def offsets_to_ranges(offsets: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 10] -> [[3, 6], [9, 11]] (half-open runs; completions are usually one or a few runs)."""
    ranges: list[list[int]] = []
    for i in offsets:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def ranges_count(ranges: list[list[int]]) -> int:
    return sum(b - a for a, b in ranges)


def counted_offsets(labels: list[int]) -> list[int]:
    """Token offsets i >= 1 whose label is counted (the cached row i-1 -> i predicts token i)."""
    return [i for i in range(1, len(labels)) if labels[i] != -100]


# ----------------------------------------------------------------------------- teacher weights


def weight_files(teacher_cfg, *, resolved_path: Optional[str] = None) -> Optional[list[Path]]:
    """The teacher's weight files on this machine, found without loading the model; None when not available.

    A bundled alias: its GGUF file. A .gguf path: that file. A folder (or a hub id's locally cached
    snapshot): the GGUF named by gguf_file, else *.safetensors, else pytorch_model*.bin.
    `resolved_path` (the folder the model was loaded from) is used first when given.
    """
    from kdlm.models import bundled

    name = teacher_cfg.model
    if name in bundled.ALIASES:
        try:
            return [bundled.gguf_path(name)]
        except ModelError:
            return None
    folder: Optional[Path] = None
    gguf = teacher_cfg.gguf_file
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return [path] if path.is_file() else None
    if resolved_path is not None and Path(resolved_path).is_dir():
        folder = Path(resolved_path)
    elif path.is_dir():
        folder = path
    elif not path.exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1:
        folder = _hub_snapshot(name, teacher_cfg.revision)
    if folder is None:
        return None
    if gguf is None and not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        return ggufs[:1] if len(ggufs) == 1 else None
    if gguf is not None:
        return [folder / gguf] if (folder / gguf).is_file() else None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return files or None


def _hub_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, offline, no hub library: the hash check is skipped
        return None


def file_stats(files: list[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()  # follows hub-cache symlinks to the blobs
        out.append({"path": str(f.resolve()), "name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def weights_sha(files: list[Path]) -> str:
    """sha256 over the weight files in name order (each: its name, a NUL, then its bytes in 1 MiB blocks)."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f.name.encode() + b"\0")
        sha256_file(f, digest)
    return digest.hexdigest()


def weights_sha_reusing(files: list[Path], manifest: Optional[dict]) -> str:
    """weights_sha(files), or the hash a manifest recorded when the files still have the paths, sizes and
    modification times they had then (re-reading a 100 GB teacher at every start would take minutes)."""
    if manifest:
        recorded = manifest.get("teacher_files")
        cached_sha = manifest.get("identity", {}).get("teacher.weights_sha256")
        if cached_sha and recorded and recorded == file_stats(files):
            return cached_sha
    return weights_sha(files)


# ----------------------------------------------------------------------------- identity


def data_identity(data_cfg) -> dict[str, Any]:
    return {f: getattr(data_cfg, f) for f in DATA_FIELDS}


def first_mismatch(cached: dict[str, Any], current: dict[str, Any]) -> Optional[tuple[str, Any, Any]]:
    """First differing field of two flat identity dicts (cached order): (field, cached value, current value).

    The teacher is identified by its weights hash when both sides have one (a renamed or moved copy of
    the same weights matches); by its name, gguf file and revision otherwise."""
    hashes = cached.get("teacher.weights_sha256") and current.get("teacher.weights_sha256")
    for key, value in cached.items():
        if key not in current:
            continue
        if hashes and key in ("teacher.model", "teacher.gguf_file", "teacher.revision"):
            continue
        if not hashes and key == "teacher.weights_sha256":
            continue
        other = current[key]
        if isinstance(value, float) or isinstance(other, float):
            same = value is not None and other is not None and math.isclose(float(value), float(other), rel_tol=1e-9)
        else:
            same = value == other
        if not same:
            return key, value, other
    return None


def read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
