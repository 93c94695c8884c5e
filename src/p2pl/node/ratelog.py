"""Bounded logging of what neighbours do wrong: a flooding neighbour must not fill the disk.

Each key (e.g. sender and reason) logs its first ``first`` occurrences, then one line per
``every`` occurrences carrying the running count, so a log grows with the number of distinct
(sender, reason) pairs, not with the number of messages.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable

__all__ = ["LogBudget"]


class LogBudget:
    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.first = first
        self.every = every
        self._seen: Counter[Hashable] = Counter()
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> int:
        """Count one occurrence of ``key``; its running count if it should be logged, else 0."""
        with self._lock:
            self._seen[key] += 1
            n = self._seen[key]
        return n if n <= self.first or n % self.every == 0 else 0
