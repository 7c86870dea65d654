"""N-gram prompt lookup: propose the continuation of the latest earlier match of the context's tail.

No model: the request's own tokens are the draft source, which pays on copy-heavy work
(summaries quoting the prompt, code edits, repeated structure). The proposal copies on from the
match: when the copy reaches the end of the context it goes on copying what it just proposed, so a
repeating span (a loop of period p, whose latest match is p tokens back) still yields k tokens.
"""
from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens (n from
    `max_n` down to `min_n`); [] when nothing matches."""
    length = len(token_ids)
    if k <= 0 or length < 2:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = arr[length - n:]
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)  # starts 0..length-1-n
        hits = np.flatnonzero((windows == tail).all(axis=1))
        hits = hits[hits + n < length]  # a continuation must exist
        if hits.size:
            start = int(hits[-1]) + n
            out = arr[start:start + k].tolist()
            period = length - start  # the copy's offset: proposal i repeats token length + i - period
            while len(out) < k:
                out.append(out[len(out) - period])
            return out
    return []
