"""Append-only, fsynced JSONL files: the request cache, the row log and the dead-letter file.

`kill -9` may stop the process in the middle of a write, so the last line of a file can be torn.
`JsonlLog` repairs that on open (it cuts the file back to the last complete line) and then only
ever appends whole lines, each followed by an fsync. Nothing is rewritten in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional


def request_key(parts: dict[str, Any]) -> str:
    """Content address of one sample: sha256 of the canonical JSON of everything that decides its text
    (backend, model, teacher fingerprint, rendered prompt, sampling parameters, seed, sample index)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class JsonlLog:
    """An append-only JSONL file: `append` writes whole lines and fsyncs; `records` reads them back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = _cut_torn_tail(self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def records(self) -> Iterator[dict]:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def append(self, records: list[dict]) -> None:
        """Write `records` as one block of lines and fsync (one fsync per call, not per line)."""
        if not records:
            return
        self._fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _cut_torn_tail(path: Path) -> int:
    """Truncate `path` after its last complete, parseable line; returns the bytes removed (0 when intact)."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    size = path.stat().st_size
    with path.open("rb+") as fh:
        data = fh.read()
        keep = len(data)
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        else:
            last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[last_start:])
            except ValueError:
                keep = last_start
        if keep != len(data):
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return size - keep


def read_records(path: Path) -> list[dict]:
    """The complete records of a JSONL log (a torn last line, left by kill -9, is skipped); [] when absent."""
    out = []
    if Path(path).is_file():
        with Path(path).open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


class RequestCache:
    """Answered samples by request key, persisted in `<dir>/responses.jsonl`.

    A key present here is never sent again: a re-run, or a run restarted after kill -9, reads it
    back instead. Only successful answers are cached; failures go to the dead-letter file.
    """

    FILE = "responses.jsonl"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.log = JsonlLog(self.folder / self.FILE)
        self._answers: dict[str, dict] = {r["key"]: r["completion"] for r in self.log.records()}

    def __contains__(self, key: str) -> bool:
        return key in self._answers

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Optional[dict]:
        return self._answers.get(key)

    def put(self, items: list[tuple[str, dict]]) -> None:
        """Persist answers (one fsync for the group), then make them visible."""
        new = [(k, c) for k, c in items if k not in self._answers]
        self.log.append([{"key": k, "completion": c} for k, c in new])
        self._answers.update(new)

    def close(self) -> None:
        self.log.close()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file through a temporary name, fsync and rename (never a half-written file)."""
    from kdlm.training.checkpoint import atomic_write_text as write

    write(Path(path), text)
