"""Reading a teacher cache during training: `CachedTeacher(cache_dir, recipe, tokenizer).signal(sample_ids, labels)`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from kdlm.cache import format as fmt
from kdlm.cache.capture import current_identity, describe_mismatch
from kdlm.errors import ConfigError, DataError
from kdlm.losses.sparse import SparseTeacher

RERUN = "re-run `kdlm cache-teacher`"


class CachedTeacher:
    """The teacher's cached top-k signal, looked up by sample id (never by position in the data stream).

    The constructor checks that the cache fits `recipe` (teacher weights or name, tokenizer and chat
    template, max_length, k, temperature against teacher.cache_temperature AND every divergence term,
    data fields; `vocab` too when given) and raises ConfigError naming the first field that differs,
    with both values. It reads the shard indexes; the shard files are memory-mapped on first use.
    """

    def __init__(self, cache_dir: Union[str, Path], recipe, tokenizer, *, vocab: Optional[int] = None):
        self.folder = Path(cache_dir)
        where = f"teacher cache {self.folder}"
        manifest = fmt.read_manifest(self.folder)
        if manifest is None:
            raise ConfigError(f"{where}: no {fmt.MANIFEST} there; run `kdlm cache-teacher RECIPE` first")
        if manifest.get("format") != fmt.FORMAT_NAME:
            raise ConfigError(f"{where}: {fmt.MANIFEST} is not a kdlm teacher cache manifest")
        if manifest.get("format_version") != fmt.FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {manifest.get('format_version')} in the cache, "
                              f"{fmt.FORMAT_VERSION} in this kdlm; {RERUN}")
        if not manifest.get("complete"):
            raise ConfigError(f"{where}: the capture did not finish; {RERUN} to complete it")
        self.manifest = manifest
        self.k: int = manifest["k"]
        self.vocab: int = manifest["vocab"]
        self.temperature: float = manifest["temperature"]
        self._check(recipe, tokenizer, vocab, where)

        self._dtype = fmt.id_dtype(self.vocab)
        self._index: dict[str, tuple[int, int, int, str, list[list[int]]]] = {}  # id -> shard, first, rows, sha, ranges
        self._rows: list[int] = []
        for shard in range(manifest["layout"]["shards"]):
            path = self.folder / fmt.index_file(shard)
            try:
                index = json.loads(path.read_text())
            except (OSError, ValueError):
                raise ConfigError(f"{where}: {path.name} is missing or unreadable; {RERUN}") from None
            self._rows.append(index["rows"])
            for sample_id, first, rows, sha, ranges in index["samples"]:
                self._index[sample_id] = (shard, first, rows, sha, ranges)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ validation

    def _check(self, recipe, tokenizer, vocab: Optional[int], where: str) -> None:
        from kdlm.losses.objective import resolve_terms

        files = fmt.weight_files(recipe.teacher)
        weights = fmt.weights_sha_reusing(files, self.manifest) if files else None
        current = current_identity(recipe, tokenizer, vocab=vocab, weights_sha=weights)
        diff = fmt.first_mismatch(self.manifest["identity"], current)
        if diff is not None:
            raise ConfigError(f"{where}: {describe_mismatch(*diff)}; {RERUN}")
        for term in resolve_terms(recipe.loss):
            if term.needs_teacher and not math.isclose(term.temperature, self.temperature, rel_tol=1e-9):
                raise ConfigError(
                    f"{where}: temperature {self.temperature:g} in the cache, {term.temperature:g} for loss term "
                    f"{term.label} in the recipe; a cache holds one temperature: set the term's temperature to "
                    f"{self.temperature:g}, or set teacher.cache_temperature and {RERUN}")

    # ------------------------------------------------------------------ lookup

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def offsets(self, sample_id: str) -> list[int]:
        """The token offsets i (>= 1) whose predictions (from position i-1) the cache holds for this sample."""
        return [i for a, b in self._entry(sample_id)[4] for i in range(a, b)]

    def rows(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, k], uint16 codes [n, k]) of one sample, copied out of the shard files."""
        shard, first, n, _, _ = self._entry(sample_id)
        ids, nlp = self._map(shard)
        return np.array(ids[first:first + n]), np.array(nlp[first:first + n])

    def verify(self, examples: Sequence[Any]) -> None:
        """Check that every example is in the cache with the same tokens and counted offsets (DataError naming the
        first that is not). Cheap (no shard reads): call it once before training to fail early."""
        for ex in examples:
            for sample_id, input_ids, labels in _members(ex):
                self._check_example(sample_id, input_ids, labels)

    def signal(self, examples_or_sample_ids: Sequence[Any], labels: Tensor, *,
               device: Optional[Union[str, torch.device]] = None) -> SparseTeacher:
        """The cached signal at the batch's counted positions, in `counted_positions(labels)` row-major order.

        examples_or_sample_ids: per batch row a sample id or Example, or (packed rows) a list of them; or a flat
        list of sample ids in order of appearance (the collator's `sample_ids`). Each sample's cached rows are
        concatenated in that order; their number must equal the batch's counted positions (per row when the
        rows are known, else in total). Examples (not bare ids) are also checked against the cached token hash.
        Returns CPU tensors unless `device` is given.
        """
        per_row = (labels[:, 1:] != -100).sum(1).tolist()
        items = list(examples_or_sample_ids)
        # one entry per batch row (an id, an Example, or a packed row's list), or a flat list of ids in order
        grouped = not all(isinstance(x, str) for x in items) or len(items) == len(per_row)
        if grouped and len(items) != len(per_row):
            raise DataError(f"teacher cache: {len(items)} sample entries for a batch of {len(per_row)} rows")
        ids_parts, nlp_parts = [], []
        for r, item in enumerate(items if grouped else [items]):
            sample_ids: list[str] = []
            for x in (item if isinstance(item, (list, tuple)) else [item]):
                if isinstance(x, str):
                    sample_ids.append(x)
                    continue
                for sample_id, input_ids, ex_labels in _members(x):
                    self._check_example(sample_id, input_ids, ex_labels)
                    sample_ids.append(sample_id)
            got = 0
            for sample_id in sample_ids:
                ids, nlp = self.rows(sample_id)
                ids_parts.append(ids)
                nlp_parts.append(nlp)
                got += len(ids)
            want = per_row[r] if grouped else sum(per_row)
            if got != want:
                names = ", ".join(sample_ids[:4]) + (", ..." if len(sample_ids) > 4 else "")
                raise DataError(f"teacher cache {self.folder}: sample {names} has {got} cached positions, but the "
                                f"batch{' row' if grouped else ''} counts {want}; the data changed since the cache "
                                f"was made ({RERUN})")
        if ids_parts:
            ids = np.concatenate(ids_parts).astype(np.int64)
            logprobs = fmt.decode_logprobs(np.concatenate(nlp_parts))
        else:
            ids, logprobs = np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32)
        tail = fmt.tail_logprob(logprobs)
        out = SparseTeacher(torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail), self.temperature)
        return out.to(device) if device is not None else out

    # ------------------------------------------------------------------ internals

    def _entry(self, sample_id: str):
        try:
            return self._index[sample_id]
        except KeyError:
            raise DataError(f"teacher cache {self.folder}: sample {sample_id} is not in the cache (the data changed "
                            f"since it was made; {RERUN})") from None

    def _check_example(self, sample_id: str, input_ids, labels) -> None:
        _, _, _, sha, ranges = self._entry(sample_id)
        if input_ids is not None and fmt.ids_sha(list(input_ids)) != sha:
            raise DataError(f"teacher cache {self.folder}: sample {sample_id} has other tokens than when the cache "
                            f"was made; {RERUN}")
        if labels is not None and fmt.offsets_to_ranges(fmt.counted_offsets(list(labels))) != ranges:
            raise DataError(f"teacher cache {self.folder}: sample {sample_id} counts other positions than when the "
                            f"cache was made; {RERUN}")

    def _map(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._maps:
            rows = self._rows[shard]
            self._maps[shard] = (
                np.memmap(self.folder / fmt.ids_file(shard, self.vocab), dtype=self._dtype, mode="r", shape=(rows, self.k)),
                np.memmap(self.folder / fmt.nlp_file(shard), dtype=np.uint16, mode="r", shape=(rows, self.k)),
            )
        return self._maps[shard]


def _members(ex: Any) -> list[tuple[str, Any, Any]]:
    """(sample id, input_ids, labels) of an Example; a packed row's members are not checkable by tokens."""
    if getattr(ex, "members", None):
        return [(sid, None, None) for sid in ex.members]
    return [(ex.sample_id, ex.input_ids, ex.labels)]
