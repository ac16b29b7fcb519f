"""Offline teacher cache: run the teacher once, store its top-k log-probabilities, train from them.

    kdlm cache-teacher RECIPE.yaml            # capture_teacher(recipe)
    teacher: {source: cache}                   # training reads CachedTeacher(...).signal(sample_ids, labels)

Format (version 1) of a cache folder (`teacher.cache_dir`, default `<output.dir>/teacher_cache`):

    manifest.json              identity, sizes, layout, `complete`
    shard-00000.ids.u16        uint16 [rows, k] token ids (int32 `.ids.i32` when V > 65,536), sorted by
                               decreasing probability: column 0 is the teacher's argmax
    shard-00000.nlp.u16        uint16 [rows, k] q = round(-logp * 4096) clipped to [0, 65535]
    shard-00000.index.json     the shard's completion record: per sample id its first row, number of rows,
                               the counted token offsets (half-open runs) and a hash of its input_ids
    shard-00001.*              ...

Both data files are raw little-endian arrays without a header (numpy.memmap with the shape from the
index), so a position costs exactly k*(2+2) = 256 bytes at k = 64 for V <= 65,536 and k*(4+2) = 384
bytes above. Rows are keyed by SAMPLE ID and token offset, never by position in a (shuffled) stream:
row j of a sample holds the teacher's distribution at output position i-1 predicting token i, for the
j-th counted offset i (labels[i] != -100, i >= 1), which is exactly the order in which
`counted_positions(labels)` lists that sample's positions.

Precision. logp = log_softmax(logits / T) in fp32 over the shared vocabulary; q encodes -logp in steps
of 2^-12 nats over [0, 16) nats, so a decoded log-prob is within 2^-13 nats of the true one (each
probability within +-1.2e-4 relative); entries below -16 nats (p < 1.1e-7) clip to -16. The tail mass
is derived when reading: tail = max(0, 1 - sum(exp(decoded logp))), within about 1.2e-4 absolute.

Bias of a top-k cache. The tail's internal shape is lost. Comparing (k+1)-bucket distributions (the
tail as one bucket, `kdlm.losses.sparse` mode `tail_bucket`) gives a LOWER bound of the true divergence
(data-processing inequality); renormalising over the top-k (`renormalized`) ignores the tail entirely
and over-weights the head.

Identity. The manifest records the teacher (recipe name, and sha256 of its weight files in 1 MiB
blocks), the tokenizer (vocabulary + special tokens) and chat-template hashes, max_length, k,
temperature, vocabulary size, format version, the data fields that shape examples, a hash of all
samples, and the sample/position counts. Capture refuses a folder holding a different cache, is a
no-op on an identical complete one, and resumes an interrupted one (complete shards are kept).
"""

from kdlm.cache.capture import cache_dir_for, capture_teacher
from kdlm.cache.format import FORMAT_VERSION, MAX_DECODE_ERROR, bytes_per_position, decode_logprobs, encode_logprobs
from kdlm.cache.reader import CachedTeacher
from kdlm.losses.sparse import SparseTeacher

__all__ = [
    "FORMAT_VERSION",
    "MAX_DECODE_ERROR",
    "CachedTeacher",
    "SparseTeacher",
    "bytes_per_position",
    "cache_dir_for",
    "capture_teacher",
    "decode_logprobs",
    "encode_logprobs",
]
