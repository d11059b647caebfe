"""The encode stage's embeddings in memory: each kept only while a later unit of the process needs it.

Encode writes one artifact per unit (prompt, negative prompt); texts recur across units (a shared
negative prompt, one prompt with several negatives), so each text is encoded once per process and
its embedding kept until the last unit using it is written. Nothing else is kept, so the process's
memory follows the texts in use at once, not the queue's length (issue 21). The memory plan counts
the most it holds (`most_held`, orchestrator/planning/memory.py).
"""

from __future__ import annotations


class EmbeddingCache:
    """The embeddings this process still needs (issue 21): a text's embedding is kept from when it
    is encoded until the last unit that uses it is written, then dropped, so host memory follows
    the texts in use at once (a shared negative prompt, a stream batch), not the queue's length.
    `most` is the largest number held at once; the memory plan predicts it with `most_held`."""

    def __init__(self, units_texts: list[list[str]]) -> None:
        self.uses: dict[str, int] = {}  # text -> units still to write that use it; first-use order
        for texts in units_texts:
            for text in dict.fromkeys(texts):
                self.uses[text] = self.uses.get(text, 0) + 1
        self.order = list(self.uses)
        self.next = 0  # every text before it in `order` was encoded already
        self.held: dict[str, tuple] = {}
        self.most = 0

    def missing(self, texts: list[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if t not in self.held]

    def batch(self, missing: list[str], batch_size: int) -> list[str]:
        """Stream: the missing texts, then the next texts in job order, up to `batch_size`."""
        batch = list(missing)
        for text in self.order[self.next:self.next + batch_size + len(missing)]:
            if len(batch) >= batch_size:
                break
            if text not in self.held and text not in batch:
                batch.append(text)
        return batch

    def put(self, text: str, value: tuple) -> None:
        self.held[text] = value
        self.most = max(self.most, len(self.held))
        while self.next < len(self.order) and (self.order[self.next] in self.held or self.uses[self.order[self.next]] == 0):
            self.next += 1

    def done(self, texts: list[str]) -> None:
        """A unit using `texts` was written: drop what no later unit needs."""
        for text in dict.fromkeys(texts):
            self.uses[text] -= 1
            if self.uses[text] == 0:
                self.held.pop(text, None)


def most_held(units_texts: list[list[str]], batch_size: int, stream: bool) -> int:
    """The most embeddings `make_units` holds at once for units needing `units_texts` (in order):
    the same cache, driven without a model. The memory plan counts them (orchestrator/planning/memory.py)."""
    cache = EmbeddingCache(units_texts)
    for texts in units_texts:
        missing = cache.missing(texts)
        for text in (cache.batch(missing, batch_size) if stream and missing else missing):
            cache.put(text, ())
        cache.done(texts)
    return cache.most
