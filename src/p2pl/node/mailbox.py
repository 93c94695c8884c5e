"""Thread-safe inbox between the transport (which puts validated messages) and the node runtime.

The gRPC server threads call :meth:`Mailbox.put` with messages already validated by
:func:`p2pl.node.wire.decode` and authenticated by the transport. The runtime thread reads them
with :meth:`Mailbox.wait_for`, which blocks until every expected neighbour has delivered or a
deadline passes -- a neighbour that is down simply does not appear in the result, and the
consensus weights are renormalized over those that did (docs/design.md, "The algorithm").

Typical runtime use, for consensus step ``c`` of round ``k``::

    mailbox.set_round(k)                         # or Mailbox(current_round_fn=lambda: state.round)
    ... client.send(...) to every neighbour ...
    got = mailbox.wait_for("params", k, c, set(neighbours), time.monotonic() + timeout)
    ... mix own parameters with got[m].tensors for m in got ...
    mailbox.prune(k)                             # when moving on: drop everything older than k

Rules applied by :meth:`Mailbox.put` (each rejection is counted under its reason and logged):

* ``stale``: ``round`` < the receiver's current round (a late or replayed message);
* ``too-far-ahead``: ``round`` > current round + ``max_rounds_ahead`` (bounds memory);
* ``unknown-sender``: the sender is not in ``allowed_senders`` (when that is set);
* ``duplicate``: a message with the same ``(kind, sender, round, step)`` is already stored --
  the first one wins, so a replay cannot swap parameters that were already accepted;
* ``full``: more than ``max_pending`` messages are stored (the runtime is not pruning).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from p2pl.errors import P2PLError
from p2pl.node.wire import Message

__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "FULL",
    "STALE",
    "TOO_FAR_AHEAD",
    "UNKNOWN_SENDER",
    "Mailbox",
]

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
STALE = "stale"
DUPLICATE = "duplicate"
TOO_FAR_AHEAD = "too-far-ahead"
UNKNOWN_SENDER = "unknown-sender"
FULL = "full"

Key = tuple[str, str, int, int]  # (kind, sender, round, step)


class Mailbox:
    """Latest-per-key message store with blocking waits.

    The receiver's current round comes from ``current_round_fn`` if given (read on every
    :meth:`put`), otherwise from :meth:`set_round` (initially 0).
    """

    def __init__(
        self,
        current_round_fn: Callable[[], int] | None = None,
        *,
        max_rounds_ahead: int = 8,
        max_pending: int = 4096,
        allowed_senders: Iterable[str] | None = None,
    ) -> None:
        if max_rounds_ahead < 0 or max_pending < 1:
            raise P2PLError("mailbox needs max_rounds_ahead >= 0 and max_pending >= 1")
        self._round_fn = current_round_fn
        self._round = 0
        self._max_ahead = max_rounds_ahead
        self._max_pending = max_pending
        self._allowed: frozenset[str] | None = frozenset(allowed_senders) if allowed_senders is not None else None
        self._messages: dict[Key, Message] = {}
        self._latest: dict[str, int] = {}  # highest round each sender was heard at (catch-up)
        self._cond = threading.Condition()
        self._accepted = 0
        self._rejected: Counter[str] = Counter()

    # ------------------------------------------------------------------ round and senders

    @property
    def current_round(self) -> int:
        return int(self._round_fn()) if self._round_fn is not None else self._round

    def set_round(self, round: int) -> None:
        """Set the receiver's current round (ignored for the check when current_round_fn is set)."""
        with self._cond:
            self._round = int(round)

    def set_allowed_senders(self, senders: Iterable[str] | None) -> None:
        """Accept messages only from these device ids (the neighbours); None accepts any sender."""
        with self._cond:
            self._allowed = frozenset(senders) if senders is not None else None

    # ------------------------------------------------------------------------------ writing

    def put(self, msg: Message) -> str:
        """Store ``msg``; return ``ACCEPTED`` or the rejection reason (see the module docstring)."""
        key: Key = (msg.kind, msg.sender, msg.round, msg.step)
        current = self.current_round
        with self._cond:
            if self._allowed is None or msg.sender in self._allowed:
                # Even a too-far-ahead message proves the sender reached that round.
                self._latest[msg.sender] = max(msg.round, self._latest.get(msg.sender, -1))
            if msg.round < current:
                reason = STALE
            elif msg.round > current + self._max_ahead:
                reason = TOO_FAR_AHEAD
            elif self._allowed is not None and msg.sender not in self._allowed:
                reason = UNKNOWN_SENDER
            elif key in self._messages:
                reason = DUPLICATE
            elif len(self._messages) >= self._max_pending:
                reason = FULL
            else:
                self._messages[key] = msg
                self._accepted += 1
                self._cond.notify_all()
                return ACCEPTED
            self._rejected[reason] += 1
        level = logging.DEBUG if reason == DUPLICATE else logging.INFO
        log.log(
            level,
            "mailbox dropped %s from %s (round %d step %d, our round %d): %s",
            msg.kind,
            msg.sender,
            msg.round,
            msg.step,
            current,
            reason,
        )
        return reason

    # ------------------------------------------------------------------------------ reading

    def get(self, kind: str, round: int, step: int, sender: str) -> Message | None:
        """The stored message for this key, or None (non-blocking)."""
        with self._cond:
            return self._messages.get((kind, sender, round, step))

    def wait_for(self, kind: str, round: int, step: int, senders: Iterable[str], deadline: float) -> dict[str, Message]:
        """Block until every sender's ``(kind, round, step)`` message is stored or the deadline passes.

        ``deadline`` is an absolute ``time.monotonic()`` value. Returns ``{sender: message}`` for
        those that arrived (possibly partial, possibly empty); messages stay stored until pruned.
        """
        wanted = set(senders)
        with self._cond:
            while True:
                got = {s: m for s in wanted if (m := self._messages.get((kind, s, round, step))) is not None}
                remaining = deadline - time.monotonic()
                if len(got) == len(wanted) or remaining <= 0:
                    return got
                self._cond.wait(timeout=remaining)

    def wait_for_any(
        self, kind: str, round: int, steps: Iterable[int], senders: Iterable[str], deadline: float
    ) -> dict[str, Message]:
        """Like :meth:`wait_for`, but a sender is satisfied by a message at *any* of ``steps``
        (the first one stored, in the given order) -- e.g. "this sync step, or its final value"."""
        wanted, order = set(senders), list(steps)
        with self._cond:
            while True:
                got: dict[str, Message] = {}
                for s in wanted:
                    for step in order:
                        m = self._messages.get((kind, s, round, step))
                        if m is not None:
                            got[s] = m
                            break
                remaining = deadline - time.monotonic()
                if len(got) == len(wanted) or remaining <= 0:
                    return got
                self._cond.wait(timeout=remaining)

    def latest_round(self, sender: str) -> int:
        """Highest round ``sender`` was heard at (stored or too far ahead); -1 if never."""
        with self._cond:
            return self._latest.get(sender, -1)

    def prune(self, before_round: int) -> int:
        """Drop every stored message with ``round < before_round``; return how many were dropped."""
        with self._cond:
            old = [k for k in self._messages if k[2] < before_round]
            for k in old:
                del self._messages[k]
            return len(old)

    def __len__(self) -> int:
        with self._cond:
            return len(self._messages)

    # ------------------------------------------------------------------------------- counters

    @property
    def accepted(self) -> int:
        with self._cond:
            return self._accepted

    @property
    def rejected(self) -> dict[str, int]:
        """Rejections so far by reason, e.g. ``{"stale": 2, "duplicate": 1}``."""
        with self._cond:
            return dict(self._rejected)

    def stats(self) -> dict[str, int]:
        """Flat counters for logs: ``accepted``, ``pending`` and ``rejected.<reason>``."""
        with self._cond:
            out = {"accepted": self._accepted, "pending": len(self._messages)}
            out.update({f"rejected.{k}": v for k, v in sorted(self._rejected.items())})
            return out
