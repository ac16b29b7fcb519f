"""Read raw rows from local files, saved datasets or the hub, keeping where each row came from.

JSONL is parsed here line by line so that a malformed line is reported as
`file:line`; every other source goes through the `datasets` library
(CSV, Parquet, JSON arrays, `save_to_disk` folders, hub ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdlm.errors import DataError

FILE_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".json": "json"}

# A dataset folder written by `kdlm generate`: JSONL shards listed in a manifest (kdlm.generation.dataset).
DATASET_MANIFEST = "manifest.json"
DATASET_FORMAT = "kdlm-dataset"


@dataclass
class RawRows:
    """Rows as dicts, with a human-readable location (`file:line`, `file row N`) and a stable sample id per row."""

    rows: list[dict] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    skipped: int = 0  # malformed rows skipped under skip_bad_rows


def read_rows(source: str, split: str, *, skip_bad_rows: bool = False, limit: int | None = None) -> RawRows:
    """Read `source` (file, saved dataset folder or hub id) into RawRows."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        return _read_jsonl(path, skip_bad_rows=skip_bad_rows, limit=limit)
    if path.suffix in FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        dataset = _load_file(path)
        first_line = 2 if path.suffix == ".csv" else None  # CSV row 0 sits on line 2, after the header
    elif path.is_dir() and _is_kdlm_dataset(path):
        return _read_kdlm_dataset(path, skip_bad_rows=skip_bad_rows, limit=limit)
    elif path.is_dir():
        dataset = _load_saved(path, split)
        first_line = None
    elif source.startswith((".", "/", "~")) or path.suffix:
        raise DataError(f"{source}: data file or folder not found")
    else:
        dataset = _load_hub(source, split)
        first_line = None
    out = RawRows()
    for i, row in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        out.rows.append(dict(row))
        out.locations.append(f"{source}:{i + first_line}" if first_line else f"{source} row {i}")
    return out


def _read_jsonl(path: Path, *, skip_bad_rows: bool, limit: int | None) -> RawRows:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    out = RawRows()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and len(out.rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as err:
                if skip_bad_rows:
                    out.skipped += 1
                    continue
                raise DataError(f"{path}:{lineno}: invalid JSON line ({err}); set data.skip_bad_rows to skip such rows") from None
            out.rows.append(row)
            out.locations.append(f"{path}:{lineno}")
    return out


def _is_kdlm_dataset(path: Path) -> bool:
    manifest = path / DATASET_MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == DATASET_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_kdlm_dataset(path: Path, *, skip_bad_rows: bool, limit: int | None) -> RawRows:
    """The rows of a `kdlm generate` folder: its JSONL shards in manifest order, each row located as `shard:line`."""
    manifest = json.loads((path / DATASET_MANIFEST).read_text())
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{path / DATASET_MANIFEST}: lists no data shards (is the generation finished?)")
    bad = next((name for name in shards if not isinstance(name, str) or not name or Path(name).is_absolute()), None)
    if bad is not None:
        raise DataError(f"{path / DATASET_MANIFEST}: shard {bad!r} is not a file name inside the folder")
    out = RawRows()
    for name in shards:
        left = None if limit is None else limit - len(out.rows)
        if left is not None and left <= 0:
            break
        part = _read_jsonl(path / name, skip_bad_rows=skip_bad_rows, limit=left)
        out.rows += part.rows
        out.locations += part.locations
        out.skipped += part.skipped
    return out


def _load_file(path: Path):
    from datasets import load_dataset

    try:
        return load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as {FILE_BUILDERS[path.suffix]} ({str(err).splitlines()[0]})") from None


def _load_saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({str(err).splitlines()[0]})") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{path}: has no split {split!r} (splits: {', '.join(data)})")
        return data[split]
    return data


def _load_hub(name: str, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as err:
        raise DataError(f"{name}: cannot load from the hub, split {split!r} ({str(err).splitlines()[0]})") from None
