"""Thread-safe inbox between the transport (which puts validated messages) and the node runtime.

The transport's connection threads call :meth:`Mailbox.put` with messages already validated by
:func:`p2pl.node.wire.decode` and authenticated by the transport. The runtime thread reads them
with :meth:`Mailbox.wait_for`, which blocks until every expected neighbour has delivered or a
deadline passes -- a neighbour that is down simply does not appear in the result, and the
consensus weights are renormalized over those that did.

Typical runtime use, for consensus step ``c`` of round ``k``::

    mailbox.set_round(k)                         # also drops everything older than round k
    ... client.send(...) to every neighbour ...
    got = mailbox.wait_for("params", k, c, set(neighbours), time.monotonic() + timeout)
    ... mix own parameters with got[m].tensors for m in got ...

Only what the runtime reads is stored (:meth:`Mailbox.admit` decides from the header alone, so
the transport asks it *before* decoding a payload). Each rejection is counted under its reason:

* ``unexpected-kind``: only ``params`` and ``sync-norm`` are stored (``hello`` and the sync
  fetches travel as Fetch calls and are answered, never stored);
* ``unknown-sender``: the sender is not in ``allowed_senders`` (when that is set);
* ``stale``: ``round`` < the receiver's current round (a late or replayed message);
* ``too-far-ahead``: ``round`` > current round + ``max_rounds_ahead``;
* ``bad-step``: a ``params`` step >= ``consensus_steps``; a ``sync-norm`` outside round 0, or
  for a step outside ``[sync step, sync step + sync_steps_ahead]`` (and not the final step);
* ``duplicate``: a message with the same ``(kind, sender, round, step)`` is already stored --
  the first one wins, so a replay cannot swap parameters that were already accepted;
* ``quota``: the sender already holds its share of keys or bytes.

**Memory bound.** Every sender has its own quota, so one neighbour can never fill the mailbox
for the others. With ``D`` allowed senders, ``R = max_rounds_ahead``, ``C = consensus_steps``,
``S = sync_steps_ahead`` and ``M`` the size of one parameters message (fixed by the model: the
transport refuses any other size before decoding), the stored messages hold at most::

    D * ((R + 1) * C * M  +  (S + 2) * H)        bytes,  H = 8 + 4096 (a payload-free message)

(:meth:`MailboxLimits.bytes_per_sender` is the bracket). The keys a sender can hold are bounded
the same way: ``(R + 1) * C`` parameters plus ``S + 2`` sync claims.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2pl.errors import P2PLError
from p2pl.node.ratelog import LogBudget
from p2pl.node.wire import MAX_HEADER_BYTES, PREFIX_SIZE, SYNC_DONE_STEP, Message, MessageHeader

__all__ = [
    "ACCEPTED",
    "BAD_STEP",
    "DUPLICATE",
    "QUOTA",
    "STALE",
    "STORED_KINDS",
    "TOO_FAR_AHEAD",
    "UNEXPECTED_KIND",
    "UNKNOWN_SENDER",
    "Mailbox",
    "MailboxLimits",
]

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
STALE = "stale"
DUPLICATE = "duplicate"
TOO_FAR_AHEAD = "too-far-ahead"
UNKNOWN_SENDER = "unknown-sender"
UNEXPECTED_KIND = "unexpected-kind"
BAD_STEP = "bad-step"
QUOTA = "quota"
#: Routine rejections (deadlines, restarts, retries): logged quietly.
ROUTINE = frozenset({STALE, TOO_FAR_AHEAD, DUPLICATE})

STORED_KINDS = frozenset({"params", "sync-norm"})
SMALL_MESSAGE_BYTES = PREFIX_SIZE + MAX_HEADER_BYTES

Key = tuple[str, str, int, int]  # (kind, sender, round, step)


def _cost(header: MessageHeader) -> int:
    """Bytes a message is charged to its sender: an upper bound known from the header alone
    (so the transport can refuse before decoding), at least the message's real size."""
    return PREFIX_SIZE + MAX_HEADER_BYTES + header.payload_size


@dataclass(frozen=True)
class MailboxLimits:
    """What a mailbox accepts, and hence how much memory it can hold (see the module docstring)."""

    max_rounds_ahead: int = 8
    consensus_steps: int = 1
    sync_steps_ahead: int = 8
    params_message_bytes: int = 256 * 1024 * 1024  # the largest parameters message (the runtime: exact)

    def __post_init__(self) -> None:
        if self.max_rounds_ahead < 0 or self.consensus_steps < 1 or self.sync_steps_ahead < 0:
            raise P2PLError("mailbox needs max_rounds_ahead >= 0, consensus_steps >= 1, sync_steps_ahead >= 0")
        if self.params_message_bytes < 1:
            raise P2PLError("mailbox needs params_message_bytes >= 1")

    @property
    def keys_per_sender(self) -> int:
        return (self.max_rounds_ahead + 1) * self.consensus_steps + self.sync_steps_ahead + 2

    @property
    def bytes_per_sender(self) -> int:
        params = (self.max_rounds_ahead + 1) * self.consensus_steps * self.params_message_bytes
        return params + (self.sync_steps_ahead + 2) * SMALL_MESSAGE_BYTES

    def bound(self, senders: int) -> int:
        """Most bytes ``senders`` senders can make the mailbox hold."""
        return senders * self.bytes_per_sender


class Mailbox:
    """Latest-per-key message store with blocking waits and per-sender quotas.

    The receiver's current round comes from ``current_round_fn`` if given (read on every
    :meth:`put`), otherwise from :meth:`set_round` (initially 0).
    """

    def __init__(
        self,
        current_round_fn: Callable[[], int] | None = None,
        *,
        max_rounds_ahead: int = 8,
        consensus_steps: int = 1,
        sync_steps_ahead: int = 8,
        params_message_bytes: int = 256 * 1024 * 1024,
        allowed_senders: Iterable[str] | None = None,
    ) -> None:
        self.limits = MailboxLimits(max_rounds_ahead, consensus_steps, sync_steps_ahead, params_message_bytes)
        self._round_fn = current_round_fn
        self._round = 0
        self._sync_step = 0
        self._allowed: frozenset[str] | None = frozenset(allowed_senders) if allowed_senders is not None else None
        self._messages: dict[Key, Message] = {}
        self._usage: dict[str, list[int]] = {}  # sender -> [keys, bytes] stored
        self._latest: dict[str, int] = {}  # highest round each allowed sender was heard at
        self._params_heard: dict[str, int] = {}  # highest round of a params message, even a late one
        self._cond = threading.Condition()
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._log_budget = LogBudget()

    # ------------------------------------------------------------------ round and senders

    @property
    def current_round(self) -> int:
        return int(self._round_fn()) if self._round_fn is not None else self._round

    def set_round(self, round: int) -> None:
        """Set the receiver's current round and drop what is older (ignored for the round check
        when current_round_fn is set)."""
        with self._cond:
            self._round = int(round)
            self._drop(lambda k: k[2] < self._round)

    def set_sync_step(self, step: int) -> None:
        """The max-norm sync step the runtime waits for now; older claims are dropped."""
        with self._cond:
            self._sync_step = int(step)
            self._drop(lambda k: k[0] == "sync-norm" and k[3] < self._sync_step)

    def set_allowed_senders(self, senders: Iterable[str] | None) -> None:
        """Accept messages only from these device ids (the neighbours); None accepts any sender."""
        with self._cond:
            self._allowed = frozenset(senders) if senders is not None else None

    # ------------------------------------------------------------------------------ writing

    def _verdict(self, header: MessageHeader, current: int) -> str | None:
        """Why a message with this header would be refused (None: it may be stored); lock held."""
        lim = self.limits
        if header.kind not in STORED_KINDS:
            return UNEXPECTED_KIND
        if self._allowed is not None and header.sender not in self._allowed:
            return UNKNOWN_SENDER
        if header.round < current:
            return STALE
        if header.round > current + lim.max_rounds_ahead:
            return TOO_FAR_AHEAD
        if header.kind == "params" and header.step >= lim.consensus_steps:
            return BAD_STEP
        if header.kind == "sync-norm":
            in_window = self._sync_step <= header.step <= self._sync_step + lim.sync_steps_ahead
            if header.round != 0 or not (in_window or header.step == SYNC_DONE_STEP):
                return BAD_STEP
        if (header.kind, header.sender, header.round, header.step) in self._messages:
            return DUPLICATE
        keys, nbytes = self._usage.get(header.sender, (0, 0))
        if keys + 1 > lim.keys_per_sender or nbytes + _cost(header) > lim.bytes_per_sender:
            return QUOTA
        return None

    def admit(self, header: MessageHeader) -> str | None:
        """Checked by the transport before a payload is decoded: None if a message with this
        header would be stored now, else the rejection reason (counted; the transport logs it)."""
        current = self.current_round
        with self._cond:
            reason = self._verdict(header, current)
            if reason is not None:
                self._reject(header, reason, current, quiet=True)
        return reason

    def put(self, msg: Message) -> str:
        """Store ``msg``; return ``ACCEPTED`` or the rejection reason (see the module docstring)."""
        key: Key = (msg.kind, msg.sender, msg.round, msg.step)
        current = self.current_round
        with self._cond:
            reason = self._verdict(msg.header, current)
            if reason is None:
                self._messages[key] = msg
                usage = self._usage.setdefault(msg.sender, [0, 0])
                usage[0] += 1
                usage[1] += _cost(msg.header)
                self._latest[msg.sender] = max(msg.round, self._latest.get(msg.sender, -1))
                self._heard(msg.header)
                self._accepted += 1
                self._cond.notify_all()
                return ACCEPTED
            self._reject(msg.header, reason, current)
        return reason

    def _heard(self, header: MessageHeader) -> None:
        if header.kind == "params":
            self._params_heard[header.sender] = max(header.round, self._params_heard.get(header.sender, -1))

    def _reject(self, header: MessageHeader, reason: str, current: int, *, quiet: bool = False) -> None:
        self._rejected[reason] += 1
        if reason in (STALE, DUPLICATE):  # late, but it is taking part
            self._heard(header)
        if reason == TOO_FAR_AHEAD and (self._allowed is None or header.sender in self._allowed):
            # Proof that the sender reached at least our horizon (only used to stop waiting for it).
            horizon = current + self.limits.max_rounds_ahead + 1
            self._latest[header.sender] = max(horizon, self._latest.get(header.sender, -1))
        if quiet or not (count := self._log_budget.allow((header.sender, reason))):
            return
        level = logging.DEBUG if reason == DUPLICATE else logging.INFO if reason in ROUTINE else logging.WARNING
        log.log(level, "mailbox dropped %s from %s (round %d step %d, our round %d): %s (#%d)",
                header.kind, header.sender, header.round, header.step, current, reason, count)  # fmt: skip

    def _drop(self, old: Callable[[Key], bool]) -> int:
        """Remove stored messages whose key matches ``old`` (lock held); returns how many."""
        gone = [k for k in self._messages if old(k)]
        for k in gone:
            msg = self._messages.pop(k)
            usage = self._usage[msg.sender]
            usage[0] -= 1
            usage[1] -= _cost(msg.header)
        return len(gone)

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
        return self.wait_for_any(kind, round, [step], senders, deadline)

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
        """Highest round ``sender`` was heard at (stored, or at least past our horizon); -1 if never."""
        with self._cond:
            return self._latest.get(sender, -1)

    def params_heard(self, sender: str) -> int:
        """Highest round of a ``params`` message from ``sender``, stored or late; -1 if never."""
        with self._cond:
            return self._params_heard.get(sender, -1)

    def prune(self, before_round: int) -> int:
        """Drop every stored message with ``round < before_round``; return how many were dropped."""
        with self._cond:
            return self._drop(lambda k: k[2] < before_round)

    def __len__(self) -> int:
        with self._cond:
            return len(self._messages)

    def stored_bytes(self, sender: str | None = None) -> int:
        """Bytes charged for the stored messages (of one sender, or of all): at least their size."""
        with self._cond:
            if sender is not None:
                return self._usage.get(sender, [0, 0])[1]
            return sum(u[1] for u in self._usage.values())

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
        """Flat counters for logs: ``accepted``, ``pending``, ``pending_bytes``, ``rejected.<reason>``."""
        with self._cond:
            out = {
                "accepted": self._accepted,
                "pending": len(self._messages),
                "pending_bytes": sum(u[1] for u in self._usage.values()),
            }
            out.update({f"rejected.{k}": v for k, v in sorted(self._rejected.items())})
            return out
