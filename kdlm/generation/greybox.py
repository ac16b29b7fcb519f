"""Grey-box KD: an API teacher's top-k log-probs become kdlm's offline teacher cache.

`kdlm generate` with `generate.logprobs: K` keeps, per generated token, the server's top-K log-probs in the
row's `teacher_logprobs`. `kdlm cache-teacher RECIPE --from-logprobs` then writes them into the same cache
format the live teacher writes (top-k + the tail bucket, keyed by sample id, manifest-checked), so
`teacher.source: cache` trains from an API teacher's probabilities.

Alignment. The cache holds one row per counted position of the student's encoding of the row. For the
assistant answer those targets must be exactly the tokens the teacher generated, mapped to the student's
ids; a difference (another tokenizer, a re-tokenisation that splits differently) is a clear error naming
the row and position, never a silent shift. vLLM lists the end-of-turn token it stopped on, so the
student's end-of-turn position is covered; servers that do not list it cannot fill that position.

Token spelling. vLLM with `return_tokens_as_token_ids: true` (in teacher.extra_body) spells tokens as
`token_id:N`, which is exact. Otherwise tokens are strings and are looked up in the student's vocabulary,
first as vocabulary entries, then as decoded text.

What the numbers are. vLLM's log-probs are the model's raw distribution (T = 1, before sampling
processors); OpenAI's are the served model's. llama.cpp's server returns the probabilities before its
sampling chain (`n_probs`), also T = 1, but over the candidates it kept: its top-k is exact only while k is
within the candidates its sampler considers. Hosted APIs cap top_logprobs at 20.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from kdlm.cache import format as fmt
from kdlm.errors import DataError, ModelError


class TokenMapper:
    """Teacher token spellings -> student ids: `token_id:N`, a vocabulary entry, or a decoded piece of text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        self._decoded: Optional[dict[str, int]] = None

    def __call__(self, token) -> Optional[int]:
        if isinstance(token, int):
            return token
        if not isinstance(token, str):
            return None
        if token.startswith("token_id:"):
            try:
                return int(token[9:])
            except ValueError:
                return None
        if token in self.vocab:
            return self.vocab[token]
        if self._decoded is None:  # built once, on the first string the vocabulary does not spell
            table: dict[str, int] = {}
            for i in sorted(self.vocab.values(), reverse=True):  # lower ids win collisions
                table[self.tokenizer.decode([i])] = i
            self._decoded = table
        return self._decoded.get(token)


class LogprobSource:
    """The `compute(entries)` of kdlm.cache.capture.write_shard for rows carrying `teacher_logprobs`."""

    def __init__(self, recipe, tokenizer, *, vocab: int, k: int):
        from kdlm.data import read_rows

        d = recipe.data
        self.rows: dict[str, dict] = {}
        for source, split, limit in ((d.train, d.train_split, d.max_samples), (d.validation, d.validation_split, None)):
            if source:
                raw = read_rows(source, split, skip_bad_rows=d.skip_bad_rows, limit=limit)
                self.rows.update(zip(raw.locations, raw.rows))
        self.map = TokenMapper(tokenizer)
        self.vocab = vocab
        self.k = k

    def compute(self, entries) -> tuple[np.ndarray, np.ndarray]:
        ids_out, codes_out = [], []
        for e in entries:
            ids, logprobs = self.sample(e)
            ids_out.append(ids)
            codes_out.append(fmt.encode_logprobs(logprobs))
        if not ids_out:
            return np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.uint16)
        return np.concatenate(ids_out), np.concatenate(codes_out)

    def sample(self, e) -> tuple[np.ndarray, np.ndarray]:
        """(ids [rows, k], log-probs [rows, k] sorted decreasing) of one example, aligned to its counted positions."""
        row = self.rows.get(e.sample_id)
        lp = row.get("teacher_logprobs") if row is not None else None
        if not lp or not lp.get("top"):
            raise DataError(f"{e.sample_id}: the row has no teacher_logprobs; generate it with generate.logprobs > 0 "
                            "from a backend that returns log-probs")
        offsets = [i for a, b in e.ranges for i in range(a, b)]
        targets = [e.input_ids[i] for i in offsets]
        generated = [self.map(t) for t in lp["tokens"]]
        if len(generated) < len(targets) and (row.get("provenance") or {}).get("finish_reason") == "length":
            raise DataError(f"{e.sample_id}: finish_reason=length: the teacher stopped at max_new_tokens before its "
                            "end-of-turn token, which the student's chat template adds, so that position has no teacher "
                            "log-probs; drop such rows (generate.filters: [{name: drop_truncated}])")
        if len(generated) < len(targets):
            raise DataError(f"{e.sample_id}: the student counts {len(targets)} answer tokens, the teacher's log-probs "
                            f"cover {len(generated)}; the server did not list its end-of-turn token, or the row holds "
                            "more than one assistant turn")
        for j, (want, got) in enumerate(zip(targets, generated)):
            if want != got:
                raise ModelError(
                    f"{e.sample_id}: answer token {j} is {self._show(want)} in the student's encoding but the teacher "
                    f"generated {lp['tokens'][j]!r}: a split of the text the tokenizer does not write (sampling can "
                    "produce one; drop such rows with generate.filters: [{name: same_tokens}]), or teacher and "
                    "student tokenizers disagree (grey-box KD needs the same tokenizer; with vLLM set "
                    "teacher.extra_body: {return_tokens_as_token_ids: true})")
        ids = np.zeros((len(targets), self.k), np.int64)
        logprobs = np.zeros((len(targets), self.k), np.float32)
        for j in range(len(targets)):
            top = sorted(((self.map(t), float(v)) for t, v in lp["top"][j]), key=lambda tv: -tv[1])
            if len(top) < self.k:
                raise DataError(f"{e.sample_id}: {len(top)} top log-probs at answer token {j}, teacher.cache_top_k = "
                                f"{self.k}; set teacher.cache_top_k to at most generate.logprobs")
            for rank, (tid, v) in enumerate(top[: self.k]):
                if tid is None or not 0 <= tid < self.vocab:
                    raise ModelError(f"{e.sample_id}: teacher token {lp['top'][j][rank][0]!r} is not in the student's "
                                     f"vocabulary ({self.vocab} tokens): the tokenizers differ")
                ids[j, rank] = tid
                logprobs[j, rank] = v
        return ids, logprobs

    def _show(self, token_id: int) -> str:
        return f"{self.map.tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"
