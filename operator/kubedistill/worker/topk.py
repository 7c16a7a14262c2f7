"""Compact teacher distributions: the top-k logprobs of every answer token, in ~1 byte per alternative.

What a teacher with ``logprobs: k`` returns per answer token is the token it chose, that token's
logprob, and its k most likely tokens with their logprobs. As JSON that is ~40 bytes per
alternative (a token string, a float printed in full); a million answers of 200 tokens at k=20
would be ~160 GB. Stored here instead:

    base85( zlib( header | token table | chosen ids | top ids | chosen logprobs | top logprobs ) )

- token ids as uint16 when every id is below 65536 (most vocabularies up to 64k), else uint32;
- logprobs as float16 (3 significant digits: a probability's relative error below 0.1%,
  far below what distillation can tell apart); a missing alternative is -inf;
- multi-byte arrays byte-shuffled (all low bytes, then all high bytes, as blosc does), so
  zlib finds the long runs of near-identical high bytes;
- base85 keeps the blob a JSON string (25% over binary; base64 would be 33%).

Tokens are either ids (vLLM teachers: ids of the teacher's vocabulary, whose tokenizer the
generate worker saves beside the dataset) or strings (OpenAI-compatible APIs return token
text, not ids): then ids index a per-answer table of the distinct strings. bench/objectives.py
prints the measured bytes per answer token for k = 5 and 20.

Why not a library: safetensors/npz headers cost 100-300 bytes per answer, more than a short
answer's payload, and Arrow/Parquet would need the whole dataset in one file; this is 40 lines
of numpy around zlib, versioned by its first byte.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1
_WIDE = 1  # flag: ids are uint32
_STRINGS = 2  # flag: ids index the string table
_HEADER = struct.Struct("<BBIB")  # version, flags, positions, k
MISSING = float("-inf")


class TopKError(ValueError):
    """A blob that is not a compact distribution of a known version."""


@dataclass(frozen=True)
class TopK:
    """A teacher's distribution over one answer: per position, the chosen token and its top k.

    ``ids`` [n] and ``top_ids`` [n, k] are token ids, or indices into ``table`` when the
    teacher named its tokens by string. ``top_logprobs`` is -inf where it named fewer than k.
    """

    ids: np.ndarray  # int64 [n]
    logprobs: np.ndarray  # float32 [n]
    top_ids: np.ndarray  # int64 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]
    table: tuple[str, ...] | None = None

    @property
    def positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def tokens(self) -> list[int] | list[str]:
        """The chosen tokens: ids, or strings for a string-named teacher."""
        if self.table is None:
            return [int(i) for i in self.ids]
        return [self.table[i] for i in self.ids]


def from_ids(chosen: Sequence[tuple[int, float]], tops: Sequence[Sequence[tuple[int, float]]], k: int) -> TopK:
    """Per position (chosen id, logprob) and the alternatives [(id, logprob)], most likely first."""
    top_ids, top_lps = _pad(tops, k, fill_id=0)
    return TopK(
        ids=np.array([i for i, _ in chosen], dtype=np.int64),
        logprobs=np.array([_finite(lp) for _, lp in chosen], dtype=np.float32),
        top_ids=top_ids,
        top_logprobs=top_lps,
    )


def from_strings(chosen: Sequence[tuple[str, float]], tops: Sequence[Sequence[tuple[str, float]]], k: int) -> TopK:
    """As ``from_ids`` for a teacher that names tokens by their text (OpenAI's ``logprobs.content``)."""
    index: dict[str, int] = {}

    def ident(token: str) -> int:
        return index.setdefault(token, len(index))

    ids = [ident(token) for token, _ in chosen]
    top_ids, top_lps = _pad([[(ident(t), lp) for t, lp in alts] for alts in tops], k, fill_id=0)
    return TopK(
        ids=np.array(ids, dtype=np.int64),
        logprobs=np.array([_finite(lp) for _, lp in chosen], dtype=np.float32),
        top_ids=top_ids,
        top_logprobs=top_lps,
        table=tuple(index),
    )


def from_verbose(entries: Sequence[dict[str, Any]]) -> TopK:
    """The JSON form stored before this format: [{token, logprob, top: {token: logprob}}]."""
    k = max((len(e.get("top") or {}) for e in entries), default=0)
    return from_strings(
        [(e["token"], float(e["logprob"])) for e in entries],
        [sorted((e.get("top") or {}).items(), key=lambda item: -item[1]) for e in entries],
        k,
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MISSING


def _pad(tops: Sequence[Sequence[tuple[int, float]]], k: int, fill_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(tops), k), fill_id, dtype=np.int64)
    lps = np.full((len(tops), k), MISSING, dtype=np.float32)
    for row, alternatives in enumerate(tops):
        for col, (token, lp) in enumerate(alternatives[:k]):
            ids[row, col] = token
            lps[row, col] = _finite(lp)
    return ids, lps


# --------------------------------------------------------------------------- bytes


def _shuffle(array: np.ndarray) -> bytes:
    width = array.dtype.itemsize
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(data: bytes, dtype: np.dtype[Any], count: int) -> np.ndarray:
    width = dtype.itemsize
    planes = np.frombuffer(data, dtype=np.uint8, count=count * width).reshape(width, count)
    return planes.T.copy().view(dtype).reshape(count)


def encode(dist: TopK) -> str:
    """The compact, JSON-safe text of a distribution (deterministic: same input, same text)."""
    n, k = dist.positions, dist.k
    biggest = int(max(dist.ids.max(initial=0), dist.top_ids.max(initial=0)))
    wide = biggest >= 1 << 16
    id_type = np.dtype("<u4") if wide else np.dtype("<u2")
    flags = (_WIDE if wide else 0) | (_STRINGS if dist.table is not None else 0)
    parts = [_HEADER.pack(FORMAT_VERSION, flags, n, k)]
    if dist.table is not None:
        parts.append(struct.pack("<I", len(dist.table)))
        for token in dist.table:
            raw = token.encode("utf-8", "surrogatepass")
            parts.append(struct.pack("<H", len(raw)) + raw)
    parts += [
        _shuffle(dist.ids.astype(id_type)),
        _shuffle(dist.top_ids.reshape(-1).astype(id_type)),
        _shuffle(dist.logprobs.astype("<f2")),
        _shuffle(dist.top_logprobs.reshape(-1).astype("<f2")),
    ]
    return base64.b85encode(zlib.compress(b"".join(parts), 9)).decode("ascii")


def decode(text: str) -> TopK:
    try:
        blob = zlib.decompress(base64.b85decode(text))
        version, flags, n, k = _HEADER.unpack_from(blob)
    except (ValueError, zlib.error, struct.error) as err:
        raise TopKError(f"not a compact top-k distribution: {err}") from err
    if version != FORMAT_VERSION:
        raise TopKError(f"top-k distribution format {version} is newer than this worker's {FORMAT_VERSION}")
    offset = _HEADER.size
    table: tuple[str, ...] | None = None
    if flags & _STRINGS:
        (count,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        tokens = []
        for _ in range(count):
            (size,) = struct.unpack_from("<H", blob, offset)
            tokens.append(blob[offset + 2 : offset + 2 + size].decode("utf-8", "surrogatepass"))
            offset += 2 + size
        table = tuple(tokens)
    id_type = np.dtype("<u4") if flags & _WIDE else np.dtype("<u2")
    arrays = []
    for dtype, count in ((id_type, n), (id_type, n * k), (np.dtype("<f2"), n), (np.dtype("<f2"), n * k)):
        size = dtype.itemsize * count
        arrays.append(_unshuffle(blob[offset : offset + size], dtype, count))
        offset += size
    ids, top_ids, lps, top_lps = arrays
    return TopK(
        ids=ids.astype(np.int64),
        logprobs=lps.astype(np.float32),
        top_ids=top_ids.astype(np.int64).reshape(n, k),
        top_logprobs=top_lps.astype(np.float32).reshape(n, k),
        table=table,
    )
