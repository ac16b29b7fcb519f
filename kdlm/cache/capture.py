"""`kdlm cache-teacher`: run the teacher once over the recipe's data and store its top-k log-probabilities.

The teacher is loaded as `kdlm distill` loads it (resolve_source / load_tokenizer / load_model, frozen,
dtype resolve_dtype(trainable=False)) and runs under no_grad in batches, without autocast (in its own
dtype). Samples are sorted by sample id and cut into shards of at most `shard_rows` positions; inside a
shard they are batched longest first (less padding), but every sample's rows land at the place the plan
gives it, so the files do not depend on batching. A shard is written to temporary names, fsynced and
renamed; its index file, written last, is its completion record. A re-run skips complete shards.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from kdlm.cache import format as fmt
from kdlm.errors import ConfigError, DataError, ModelError, OutputError

CHUNK_BYTES = 256 << 20  # at most this many bytes of fp32 logits at once ([rows, V] chunks of a batch)


@dataclass
class Entry:
    """One sample's place in the cache."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    ranges: list[list[int]]  # counted token offsets i >= 1, as half-open runs
    sha: str
    rows: int
    first_row: int = 0

    def record(self) -> list[Any]:
        return [self.sample_id, self.first_row, self.rows, self.sha, self.ranges]


def cache_dir_for(recipe) -> Path:
    """`teacher.cache_dir`, else `<output.dir>/teacher_cache`."""
    return Path(recipe.teacher.cache_dir).expanduser() if recipe.teacher.cache_dir else Path(recipe.output.dir) / "teacher_cache"


def capture_teacher(recipe, *, show_progress: bool = True, batch_size: Optional[int] = None,
                    shard_rows: Optional[int] = None, from_logprobs: bool = False) -> Path:
    """Write (or finish, or confirm) the teacher cache of `recipe`; return its folder.

    batch_size: examples per teacher forward (default train.batch_size). shard_rows: positions per shard
    for a NEW cache (default 2^20); resuming keeps the layout the cache was started with.
    from_logprobs: take the top-k from the data rows' `teacher_logprobs` (written by `kdlm generate` with
    generate.logprobs from an API teacher: grey-box KD) instead of running the teacher; the teacher model is
    then never loaded, only its tokenizer and config (kdlm.generation.greybox).
    """
    from kdlm.data import prepare_data
    from kdlm.models.compat import shared_vocab_size
    from kdlm.models.loading import load_tokenizer, resolve_source

    from kdlm.losses.objective import resolve_terms

    if not any(term.needs_teacher for term in resolve_terms(recipe.loss)):
        raise ConfigError("loss.terms: no term uses the teacher (ce / redi only), so there is nothing to cache: "
                          "`kdlm distill` trains this recipe without loading the teacher")
    if recipe.data.teacher_messages_field is not None:
        raise ConfigError("data.teacher_messages_field: context distillation needs the live teacher (a cache holds "
                          "its signal on the student's input); train with teacher.source: live")
    folder = cache_dir_for(recipe)
    tcfg = recipe.teacher
    batch_size = batch_size or recipe.train.batch_size
    if batch_size < 1 or (shard_rows is not None and shard_rows < 1):
        raise ConfigError("cache-teacher: batch size and shard rows must be >= 1")

    # 1. tokenizers and the shared vocabulary, without loading weights
    teacher_src = resolve_source(tcfg.model, tcfg.gguf_file, tcfg.revision)
    student_src = resolve_source(recipe.student.model, recipe.student.gguf_file, recipe.student.revision)
    teacher_tok = load_tokenizer(teacher_src, trust_remote_code=tcfg.trust_remote_code)
    tokenizer = load_tokenizer(student_src, trust_remote_code=recipe.student.trust_remote_code)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        shared_vocab_size(teacher_tok, tokenizer, 0, 0)  # raises, naming the differing tokens
    model = None
    teacher_rows = _output_rows(teacher_src, tcfg.trust_remote_code)
    student_rows = _output_rows(student_src, recipe.student.trust_remote_code)
    if teacher_rows is None and from_logprobs:
        raise ModelError(f"{tcfg.model}: cannot read the teacher's vocabulary size from its config")
    if teacher_rows is None:
        model = _load_teacher(recipe, teacher_src)
        teacher_rows = model.get_output_embeddings().weight.shape[0]
    vocab = shared_vocab_size(teacher_tok, tokenizer, teacher_rows, student_rows or teacher_rows)
    k = tcfg.cache_top_k
    if k > vocab:
        raise ConfigError(f"teacher.cache_top_k: {k} is more than the shared vocabulary ({vocab} tokens)")

    # 2. the data, in a fixed order, and the shard plan
    train, validation, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    entries = _entries(train + validation)
    data_sha = hashlib.sha256(json.dumps([[e.sample_id, e.sha, e.ranges] for e in entries]).encode()).hexdigest()

    # 3. identity: what this cache is a cache of
    files = fmt.weight_files(tcfg, resolved_path=teacher_src.path)
    if files is None and not from_logprobs:  # e.g. a hub id not downloaded yet: loading fetches it
        model = model or _load_teacher(recipe, teacher_src)
        files = fmt.weight_files(tcfg, resolved_path=teacher_src.path)
    existing = fmt.read_manifest(folder)
    if files is None:
        print(f"kdlm: warning: the weight files of {tcfg.model} were not found; the cache identifies the teacher "
              "by its name only", flush=True)
    identity = current_identity(recipe, tokenizer, vocab=vocab,
                                weights_sha=fmt.weights_sha_reusing(files, existing) if files else None)
    identity["data_sha256"] = data_sha
    if from_logprobs:
        if tcfg.cache_temperature != 1.0:
            raise ConfigError("teacher.cache_temperature: API log-probs are the teacher's distribution at T = 1; "
                              "a cache from them holds T = 1 only")
        identity["teacher.signal"] = "api-logprobs"  # not the local weights' own forward: never mistaken for it

    # 4. an existing cache: identical (no-op or resume) or different (refuse)
    if existing is None and folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
        raise OutputError(f"teacher cache {folder}: the folder holds files but no {fmt.MANIFEST}; "
                          "choose another teacher.cache_dir or empty it")
    if existing is not None:
        diff = _identity_mismatch(existing, identity)
        if diff:
            raise OutputError(f"teacher cache {folder} holds a different cache ({diff}); delete the folder "
                              "or set teacher.cache_dir to another folder")
        shard_rows = existing["layout"]["shard_rows"]
    shard_rows = shard_rows or fmt.DEFAULT_SHARD_ROWS
    shards = _plan(entries, shard_rows)
    manifest = _manifest(identity, recipe, vocab=vocab, k=k, shard_rows=shard_rows, shards=shards,
                         files=files)
    done = [s for s, members in enumerate(shards) if shard_complete(folder, s, members, k, vocab)]
    if existing is not None and existing.get("complete") and len(done) == len(shards):
        print(f"kdlm: teacher cache {folder} is complete and matches the recipe "
              f"({manifest['samples']} samples, {manifest['positions']} positions); nothing to do", flush=True)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, manifest, complete=False)
    if len(done) == len(shards):  # every shard was written before a crash; only the manifest was left
        _write_manifest(folder, manifest, complete=True)
        print(f"kdlm: teacher cache {folder}: every shard was already complete; marked complete", flush=True)
        return folder
    if done:
        print(f"kdlm: resuming teacher cache {folder}: {len(done)} of {len(shards)} shards already complete", flush=True)

    # 5. the teacher (or the rows' API log-probs), once, over every shard still missing
    if from_logprobs:
        from kdlm.generation.greybox import LogprobSource

        source = LogprobSource(recipe, tokenizer, vocab=vocab, k=k)

        def shard_batches(s: int, members: list[Entry]):
            return write_shard(folder, s, members, source.compute, k=k, vocab=vocab, batch_size=256)
    else:
        from kdlm.training.step import Teacher

        model = model or _load_teacher(recipe, teacher_src)
        if model.get_output_embeddings().weight.shape[0] < vocab:
            raise ModelError(f"{tcfg.model}: the loaded model has fewer output rows than its config says")
        teacher = Teacher(model, vocab)
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def shard_batches(s: int, members: list[Entry]):
            return _capture_shard(folder, s, members, teacher, device=device, k=k, vocab=vocab,
                                  temperature=tcfg.cache_temperature, batch_size=batch_size, pad=pad)
    done_set = set(done)
    bar = tqdm(total=len(entries), initial=sum(len(shards[s]) for s in done), unit="ex", desc="cache-teacher",
               disable=not show_progress, dynamic_ncols=True)
    started, tokens = time.perf_counter(), 0
    for s, members in enumerate(shards):
        if s in done_set:
            continue
        for n_examples, n_tokens in shard_batches(s, members):
            tokens += n_tokens
            bar.update(n_examples)
            bar.set_postfix({"shard": f"{s + 1}/{len(shards)}",
                             "tok/s": f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}"})
    bar.close()
    _write_manifest(folder, manifest, complete=True)
    print(f"kdlm: teacher cache {folder}: {manifest['samples']} samples, {manifest['positions']} positions in "
          f"{len(shards)} shards, {manifest['bytes_per_position']} bytes/position "
          f"(top-{k} at T={tcfg.cache_temperature:g})", flush=True)
    return folder


def current_identity(recipe, tokenizer, *, vocab: Optional[int], weights_sha: Optional[str]) -> dict[str, Any]:
    """The flat identity fields of a cache made from `recipe` (the order is the order mismatches are reported in)."""
    t = recipe.teacher
    out: dict[str, Any] = {
        "format_version": fmt.FORMAT_VERSION,
        "teacher.model": t.model,
        "teacher.gguf_file": t.gguf_file,
        "teacher.revision": t.revision,
        "teacher.weights_sha256": weights_sha,
        "tokenizer.vocab_sha256": fmt.tokenizer_sha(tokenizer),
        "tokenizer.chat_template_sha256": fmt.chat_template_sha(tokenizer),
        "data.max_length": recipe.data.max_length,
        "teacher.cache_top_k": t.cache_top_k,
        "teacher.cache_temperature": t.cache_temperature,
    }
    if vocab is not None:
        out["vocab"] = vocab
    out.update({f"data.{k}": v for k, v in fmt.data_identity(recipe.data).items()})
    return out


def describe_mismatch(key: str, cached: Any, current: Any, where: str = "the recipe") -> str:
    def show(v: Any) -> str:
        if isinstance(v, str) and key.endswith("sha256"):
            return v[:12]
        if isinstance(v, bool) or v is None:
            return json.dumps(v)  # true / false / null, as a recipe writes them
        return str(v)

    return f"{key} {show(cached)} in the cache, {show(current)} in {where}"


def _identity_mismatch(manifest: dict, identity: dict) -> Optional[str]:
    if manifest.get("format") != fmt.FORMAT_NAME:
        return f"{fmt.MANIFEST} is not a kdlm teacher cache manifest"
    signal = manifest.get("identity", {}).get("teacher.signal", "model")
    if signal != identity.get("teacher.signal", "model"):
        return f"teacher.signal {signal} in the cache, {identity.get('teacher.signal', 'model')} now"
    diff = fmt.first_mismatch(manifest.get("identity", {}), identity)
    if diff is None:
        missing = [k for k in identity if k not in manifest.get("identity", {})]
        return f"{missing[0]} missing in the cache" if missing else None
    return describe_mismatch(*diff, where="the recipe and data now")


def _entries(examples) -> list[Entry]:
    by_id: dict[str, Entry] = {}
    for ex in examples:
        offsets = fmt.counted_offsets(ex.labels)
        entry = Entry(ex.sample_id, list(ex.input_ids), list(ex.labels), fmt.offsets_to_ranges(offsets),
                      fmt.ids_sha(ex.input_ids), len(offsets))
        old = by_id.get(ex.sample_id)
        if old is not None and (old.sha != entry.sha or old.ranges != entry.ranges):
            raise DataError(f"{ex.sample_id}: two different examples share this sample id")
        by_id[ex.sample_id] = entry
    return [by_id[sid] for sid in sorted(by_id)]


def _plan(entries: list[Entry], shard_rows: int) -> list[list[Entry]]:
    """Consecutive samples (sample-id order) into shards of at most shard_rows rows (a longer sample: alone)."""
    shards: list[list[Entry]] = []
    rows = 0
    for e in entries:
        if not shards or (rows + e.rows > shard_rows and shards[-1]):
            shards.append([])
            rows = 0
        e.first_row = rows
        shards[-1].append(e)
        rows += e.rows
    return shards


def _manifest(identity: dict, recipe, *, vocab: int, k: int, shard_rows: int, shards: list[list[Entry]],
              files: Optional[list[Path]]) -> dict[str, Any]:
    from kdlm import __version__

    positions = sum(e.rows for members in shards for e in members)
    dtype = fmt.id_dtype(vocab)
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "complete": False,
        "identity": identity,
        "teacher_files": fmt.file_stats(files) if files else None,
        "samples": sum(len(m) for m in shards),
        "positions": positions,
        "k": k,
        "vocab": vocab,
        "temperature": recipe.teacher.cache_temperature,
        "max_length": recipe.data.max_length,
        "bytes_per_position": fmt.bytes_per_position(k, vocab),
        "layout": {
            "shard_rows": shard_rows,
            "shards": len(shards),
            "ids": f"{dtype.name} [rows, k], little-endian, sorted by decreasing probability",
            "logprobs": f"uint16 [rows, k]: q = round(-logp * {fmt.SCALE:g}) clipped to [0, {fmt.Q_MAX}]",
            "tail": "derived: max(0, 1 - sum(exp(-q / 4096)))",
        },
        "kdlm_version": __version__,
    }


def _write_manifest(folder: Path, manifest: dict, *, complete: bool) -> None:
    from kdlm.training.checkpoint import atomic_write_text

    manifest = dict(manifest, complete=complete,
                    written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(folder / fmt.MANIFEST, json.dumps(manifest, indent=1) + "\n")


def shard_complete(folder: Path, shard: int, members: list[Entry], k: int, vocab: int) -> bool:
    """A shard counts as done when its index (the completion record) matches the plan and both files have their size."""
    path = folder / fmt.index_file(shard)
    if not path.is_file():
        return False
    try:
        index = json.loads(path.read_text())
    except ValueError:
        return False
    if index.get("samples") != [e.record() for e in members] or index.get("k") != k:
        return False
    rows = sum(e.rows for e in members)
    sizes = {fmt.ids_file(shard, vocab): rows * k * fmt.id_dtype(vocab).itemsize, fmt.nlp_file(shard): rows * k * 2}
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())


def _capture_shard(folder: Path, shard: int, members: list[Entry], teacher, *, device, k: int, vocab: int,
                   temperature: float, batch_size: int, pad: int):
    """Compute one shard with the live teacher into temporary files, then rename them and write its index.
    Yields (examples, tokens) after every batch (for the progress bar)."""
    from kdlm.data.dataset import Collator, Example

    collate = Collator(pad)

    def compute(batch_entries: list[Entry]) -> tuple[np.ndarray, np.ndarray]:
        batch = collate([Example(e.sample_id, e.input_ids, e.labels) for e in batch_entries])
        return _topk_codes(teacher, batch, device=device, k=k, temperature=temperature)

    yield from write_shard(folder, shard, members, compute, k=k, vocab=vocab, batch_size=batch_size)


def write_shard(folder: Path, shard: int, members: list[Entry], compute, *, k: int, vocab: int, batch_size: int):
    """Write one shard: `compute(entries) -> (ids [rows, k], uint16 codes [rows, k])` for a batch of entries, their
    counted positions row-major. Temporary files, fsync, rename, then the index (the completion record) last.
    Shared by the live teacher and by API log-probs (kdlm.generation.greybox). Yields (examples, tokens) per batch."""
    from kdlm.training.checkpoint import atomic_write_text

    rows = sum(e.rows for e in members)
    names = (fmt.ids_file(shard, vocab), fmt.nlp_file(shard))
    tmps = [folder / f".{name}.tmp" for name in names]
    ids_map = np.memmap(tmps[0], dtype=fmt.id_dtype(vocab), mode="w+", shape=(rows, k))
    nlp_map = np.memmap(tmps[1], dtype=np.uint16, mode="w+", shape=(rows, k))
    order = sorted(members, key=lambda e: (-len(e.input_ids), e.sample_id))  # longest first: little padding
    for start in range(0, len(order), batch_size):
        batch_entries = order[start:start + batch_size]
        ids, codes = compute(batch_entries)
        row = 0
        for e in batch_entries:  # counted positions come out row-major: example by example
            _store_rows(ids_map, nlp_map, e.first_row, ids[row:row + e.rows], codes[row:row + e.rows])
            row += e.rows
        if row != ids.shape[0]:
            raise DataError(f"{batch_entries[0].sample_id}: {ids.shape[0]} counted positions in the batch, "
                            f"{row} expected")
        yield len(batch_entries), sum(len(e.input_ids) for e in batch_entries)
    for mm in (ids_map, nlp_map):
        mm.flush()
    del ids_map, nlp_map
    for tmp, name in zip(tmps, names):
        fmt.fsync_file(tmp)
        os.replace(tmp, folder / name)
    index = {"shard": shard, "rows": rows, "k": k, "vocab": vocab, "files": list(names),
             "samples": [e.record() for e in members]}
    atomic_write_text(folder / fmt.index_file(shard), json.dumps(index) + "\n")  # the completion record, last


def _store_rows(ids_map: np.ndarray, nlp_map: np.ndarray, first: int, ids: np.ndarray, codes: np.ndarray) -> None:
    ids_map[first:first + len(ids)] = ids
    nlp_map[first:first + len(codes)] = codes


@torch.no_grad()
def _topk_codes(teacher, batch: dict, *, device, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and uint16 codes of the teacher's log_softmax(logits / T) at the batch's counted positions."""
    from kdlm.training.step import counted_positions, last_hidden, model_inputs

    inputs = {name: t.to(device) for name, t in model_inputs(batch).items()}
    mask, _ = counted_positions(batch["labels"].to(device))
    hidden = last_hidden(teacher.model, inputs)[:, :-1][mask]  # [N, H], as Teacher.logits
    vocab = teacher.head.vocab
    chunk = max(1, CHUNK_BYTES // (4 * vocab))
    out_ids, out_codes = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = teacher.head.logits(hidden[start:start + chunk])  # [n, V] fp32 over the shared vocabulary
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        top, ids = logprobs.topk(k, dim=-1)  # sorted: ids[:, 0] is the argmax
        out_ids.append(ids.cpu().numpy())
        out_codes.append(fmt.encode_logprobs(top.cpu().numpy()))
    if not out_ids:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.uint16)
    return np.concatenate(out_ids), np.concatenate(out_codes)


def _load_teacher(recipe, source):
    from kdlm.models.loading import load_model, resolve_device, resolve_dtype

    device = resolve_device(recipe.teacher.device)
    return load_model(source, dtype=resolve_dtype(recipe.teacher.dtype, device, trainable=False), device=device,
                      trust_remote_code=recipe.teacher.trust_remote_code, frozen=True)


def _output_rows(source, trust_remote_code: bool) -> Optional[int]:
    """The model's logit width from its config (no weights loaded); None when the config cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs)
    except Exception:
        return None
    text = getattr(config, "text_config", None) or config
    rows = getattr(text, "vocab_size", None)
    return int(rows) if rows else None
