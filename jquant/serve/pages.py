"""Pages of the serving KV cache: who holds which, and which prompt prefixes they cache.

The device cache is a `jquant.models.cache.PagedCache` whose rows are pages of
``page_size`` positions, read through a `jquant.models.cache.PagedView`. This module is its
host-side bookkeeping:

- a sequence holds a **block table**, the pages of its positions in order, and grows it a
  page at a time, so the cache holds what requests use rather than a whole context per slot;
- **prefix caching**: a full page is known by a digest of every token up to its end (a
  chain: the previous page's digest and this page's tokens, BLAKE2b), so two prompts that
  begin alike find the same pages. `PagePool.admit` reuses the longest run of cached pages
  at the start of a prompt; the sequence then prefills only the rest. The chain starts from
  a sequence's *salt* (empty for the base model; a LoRA adapter's own,
  `jquant.serve.adapters`): under another adapter the same tokens have other keys and
  values;
- reference counts: a page is in use while a sequence lists it; a released page with a
  digest stays cached, evictable, and pages are evicted least recently used first when the
  free list runs out (a released page without one is free at once);
- pages being prefilled are *pending*: `PagePool.waits_for` tells the engine that a prompt's
  next pages are being computed by another sequence, so it can admit that prompt once they
  are committed and share them, rather than compute them a second time (32 requests with
  one system prompt arriving at once prefill it once).

Everything here is plain Python on the engine's thread; nothing touches a device.

>>> pool = PagePool(num_pages=8, page_size=4)
>>> a = pool.admit([1, 2, 3, 4, 5, 6, 7, 8, 9], reserve=3)  # 12 positions: 3 pages
>>> a.cached, len(a.pages), pool.free
(0, 3, 5)
>>> pool.commit(a, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # after its prefill: 2 full pages cached
>>> b = pool.admit([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], reserve=2)
>>> b.cached, b.pages[:2] == a.pages[:2]
(8, True)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["PagePool", "PagedSeq"]


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


@dataclasses.dataclass
class PagedSeq:
    """One sequence's pages.

    Attributes:
      pages: the block table: page ids in position order; None for a page released because
        every later query's window has passed it (`PagePool.release_before`).
      cached: positions at the start found in the prefix cache (not to be prefilled).
      digests: the digests of the leading full pages known so far (registered or not).
      salt: what the digest chain starts from (`PagePool.prompt_digests`).
    """

    pages: list[int | None] = dataclasses.field(default_factory=list)
    cached: int = 0
    digests: list[bytes] = dataclasses.field(default_factory=list)
    pending: list[bytes] = dataclasses.field(default_factory=list)  # announced, not committed
    salt: bytes = b""

    @property
    def capacity(self) -> int:
        """Pages held or released (positions = capacity x page_size)."""
        return len(self.pages)


class PagePool:
    """The pages of one cache: a free list, reference counts and the prefix table.

    Args:
      num_pages: pages in the device cache.
      page_size: positions per page.
      prefix_caching: keep released full pages findable by their prefix digest.
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages={num_pages} and page_size={page_size} "
                             "must be >= 1")  # fmt: skip
        self.num_pages, self.page_size = num_pages, page_size
        self.prefix_caching = prefix_caching
        self._free = collections.deque(range(num_pages))
        self._refs = [0] * num_pages
        self._table: dict[bytes, int] = {}  # digest -> page
        self._digest_of: dict[int, bytes] = {}  # page -> its registered digest
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._pending: set[bytes] = set()  # digests of pages some sequence is prefilling
        self.hit_tokens = self.queried_tokens = 0  # prefix cache statistics

    # ---- counts --------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Pages a new sequence can take: free ones and cached ones no sequence uses."""
        return len(self._free) + len(self._evictable)

    @property
    def cached_pages(self) -> int:
        """Pages kept for their prefix (in use or not)."""
        return len(self._digest_of)

    @property
    def used(self) -> int:
        """Pages some sequence lists."""
        return self.num_pages - self.free

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    # ---- sequences -----------------------------------------------------------------

    def prompt_digests(self, tokens: Sequence[int], *, salt: bytes = b"") -> list[bytes]:
        """The digests of the full pages of a prompt that a prefix may share: all but one
        token (a prefill must compute the last prompt token); the chain starts from ``salt``
        (pages of two salts are never shared)."""
        out, parent = [], salt
        for i in range((len(tokens) - 1) // self.page_size):
            parent = _digest(parent, tokens[i * self.page_size:(i + 1) * self.page_size])
            out.append(parent)
        return out

    def _match(self, digests: list[bytes]) -> list[int]:
        """The cached pages of the longest run of ``digests`` from the start."""
        pages = []
        for d in digests if self.prefix_caching else ():
            page = self._table.get(d)
            if page is None:
                break
            pages.append(page)
        return pages

    def waits_for(self, digests: list[bytes]) -> bool:
        """Whether the first of a prompt's ``digests`` (`prompt_digests`) not in the cache
        is a page another sequence is prefilling now: admitted once that page is committed,
        the prompt shares it instead of computing it again."""
        if not self.prefix_caching:
            return False
        d = next((d for d in digests if d not in self._table), None)
        return d is not None and d in self._pending

    def _take(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:  # evict the least recently used cached page
            page, _ = self._evictable.popitem(last=False)
            del self._table[self._digest_of.pop(page)]
        self._refs[page] = 1
        return page

    def _ref(self, page: int) -> None:
        if self._refs[page] == 0:
            self._evictable.pop(page)
        self._refs[page] += 1

    def admit(self, tokens: Sequence[int], *, reserve: int = 0,
              digests: list[bytes] | None = None,
              salt: bytes = b"") -> PagedSeq | None:  # fmt: skip
        """Pages for a prompt of ``tokens`` plus ``reserve`` more positions, or None (nothing
        taken) when the pool cannot hold them. Cached pages of the prompt's prefix are shared
        (``cached`` positions need no prefill); the prompt's other full pages are announced
        as pending until `commit` registers them. ``digests``: `prompt_digests(tokens,
        salt=salt)`, when the caller has them already."""
        need = self.pages_for(len(tokens) + reserve)
        if digests is None:
            digests = self.prompt_digests(tokens, salt=salt) if self.prefix_caching else []
        shared = self._match(digests)
        # Shared pages that sit evictable are counted in `free`: taking them uses them up.
        idle = sum(1 for p in shared if self._refs[p] == 0)
        if need - len(shared) > self.free - idle:
            return None
        for p in shared:
            self._ref(p)
        seq = PagedSeq(pages=list(shared), cached=len(shared) * self.page_size,
                       digests=digests[:len(shared)], salt=salt)  # fmt: skip
        seq.pages.extend(self._take() for _ in range(need - len(shared)))
        seq.pending = [d for d in digests[len(shared):]
                       if d not in self._pending and d not in self._table]  # fmt: skip
        self._pending.update(seq.pending)
        self.queried_tokens += len(tokens)
        self.hit_tokens += seq.cached
        return seq

    def extend(self, seq: PagedSeq, positions: int) -> bool:
        """Grows ``seq``'s block table to hold ``positions``; False (nothing taken) when the
        pool cannot."""
        more = self.pages_for(positions) - seq.capacity
        if more <= 0:
            return True
        if more > self.free:
            return False
        seq.pages.extend(self._take() for _ in range(more))
        return True

    def commit(self, seq: PagedSeq, tokens: Sequence[int]) -> None:
        """Registers ``seq``'s full pages holding ``tokens`` (its positions ``0 ..
        len(tokens) - 1``, written to the cache) in the prefix table. A page whose prefix
        another page already holds stays private."""
        if not self.prefix_caching:
            return
        full = min(len(tokens) // self.page_size, seq.capacity)
        parent = seq.digests[-1] if seq.digests else seq.salt
        for i in range(len(seq.digests), full):
            d = _digest(parent, tokens[i * self.page_size:(i + 1) * self.page_size])
            seq.digests.append(d)
            parent = d
            page = seq.pages[i]
            if page is not None and d not in self._table and page not in self._digest_of:
                self._table[d] = page
                self._digest_of[page] = d
            if d in seq.pending:
                seq.pending.remove(d)
            if d in self._table:  # computed: no one need wait for it any more
                self._pending.discard(d)

    def _drop(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._digest_of:
                self._evictable[page] = None  # most recently used last
            else:
                self._free.append(page)

    def release(self, seq: PagedSeq) -> None:
        """Gives back every page of ``seq`` (a cached page stays findable until evicted).
        The last pages go first, so a prompt's leading pages are evicted last."""
        for page in reversed(seq.pages):
            if page is not None:
                self._drop(page)
        seq.pages = []
        self._pending.difference_update(seq.pending)
        seq.pending = []

    def release_before(self, seq: PagedSeq, position: int) -> None:
        """Gives back ``seq``'s pages wholly before ``position`` (no later query reads them:
        every layer of the model attends within a window that has passed them)."""
        for i in range(min(position // self.page_size, seq.capacity)):
            if seq.pages[i] is not None:
                self._drop(seq.pages[i])
                seq.pages[i] = None

    def check(self) -> None:
        """Asserts the pool's invariants (for tests): every page is free, evictable or in
        use, exactly once, and the prefix table and its inverse agree."""
        free, idle = set(self._free), set(self._evictable)
        used = {p for p in range(self.num_pages) if self._refs[p] > 0}
        assert len(free) == len(self._free) and not (free & idle) and not (free & used)
        assert not (idle & used) and len(free | idle | used) == self.num_pages
        assert all(self._refs[p] == 0 for p in free | idle)
        assert idle <= set(self._digest_of)
        assert {v: k for k, v in self._table.items()} == self._digest_of
        assert not (self._pending & set(self._table))
