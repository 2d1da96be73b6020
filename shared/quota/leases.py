"""Quota leases: each instance reserves a small share of a limit at once and spends it locally.

Reserving in the store on every request costs a store round trip before the upstream call (an
SQLite write; with Cosmos, one conditional patch per counter). While a counter is far from its
limit that round trip decides nothing, so a request that goes to the store also takes a lease: a
top-up of `share` × limit units, reserved in the same atomic call. The next requests of that
counter are charged against the lease in memory, until it runs out; then the store again.

What stays true:
- Never more than the limit: leased units are reserved in the store before any is spent.
- Exact near the limit: leases are only granted while the counter stays below half its limit
  after the grant, so the last half of every window is reserved request by request.
- Under-admission is bounded and short: units leased and not yet spent are counted in the store
  (other instances cannot take them) until they are spent or handed back — after `idle_seconds`
  without use, at the end of the window, or at shutdown. At most (instances × share × limit).
- Small limits are not leased: a lease must cover at least two requests' charges.

The book is plain state (no I/O); EnforceQuota does the store calls and hands back what
`sweep()` returns.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..store import CounterCharge

LEASE_CEILING = 0.5  # no lease once the counter would pass this share of its limit


@dataclass
class Lease:
    limit: int
    remaining: int  # units reserved in the store by this instance and not yet spent
    store_used: int  # the counter's value in the store after this instance's last call (leases included)
    window_end: float
    ttl: int
    last_used: float
    topping_up: bool = False  # a store call with a top-up is in flight: one at a time per counter


class LeaseBook:
    def __init__(self, share: float, idle_seconds: float = 1.0) -> None:
        self.share = share
        self.idle_seconds = idle_seconds
        self._leases: dict[tuple[str, str], Lease] = {}

    def size(self, charge: CounterCharge) -> int:
        """Units to lease for this counter; 0 when leasing would not save a store call."""
        if charge.limit is None or self.share <= 0:
            return 0
        size = int(charge.limit * self.share)
        return size if size >= 2 * max(1, charge.amount) else 0

    def take(self, charges: list[CounterCharge], now: float) -> list[bool]:
        """Spend from leases what they cover; says which charges were covered."""
        covered = []
        for charge in charges:
            lease = self._leases.get((charge.subject, charge.counter))
            ok = lease is not None and lease.limit == charge.limit and lease.remaining >= charge.amount and now < lease.window_end
            if ok:
                lease.remaining -= charge.amount
                lease.last_used = now
            covered.append(ok)
        return covered

    def give_back(self, charges: list[CounterCharge], covered: list[bool]) -> None:
        """Undo `take` for a request that was refused or failed before it reserved the rest."""
        for charge, was_covered in zip(charges, covered):
            lease = self._leases.get((charge.subject, charge.counter)) if was_covered else None
            if lease is not None:
                lease.remaining += charge.amount

    def top_up(self, charge: CounterCharge) -> int:
        """Units to add to this store charge as a lease, judged by the counter's last known value.
        The caller must call `top_up_done` once the store call is over, whatever its outcome."""
        size = self.size(charge)
        lease = self._leases.get((charge.subject, charge.counter))
        if not size or lease is None or lease.limit != charge.limit:
            return 0  # first call of a window: learn the counter's value first
        if lease.topping_up or lease.remaining >= size:
            return 0  # a burst of requests must not each take a lease
        if lease.store_used + charge.amount + size > charge.limit * LEASE_CEILING:
            return 0
        lease.topping_up = True
        return size

    def top_up_done(self, charge: CounterCharge) -> None:
        lease = self._leases.get((charge.subject, charge.counter))
        if lease is not None:
            lease.topping_up = False

    def record(self, charge: CounterCharge, used_after: int, leased: int, window_end: float, now: float) -> int:
        """A store reservation of `charge.amount + leased` succeeded; the counter is `used_after`.
        Returns the unspent units of a lease taken under another limit (the policy changed),
        which the caller hands back to the store."""
        key = (charge.subject, charge.counter)
        lease = self._leases.get(key)
        stale = 0
        if lease is None or lease.limit != charge.limit:
            stale = lease.remaining if lease is not None else 0
            lease = self._leases[key] = Lease(charge.limit, 0, 0, window_end, charge.ttl, now)
        lease.remaining += leased
        lease.store_used = used_after - stale
        lease.last_used = now
        return stale

    def learn(self, charge: CounterCharge, used_now: int, window_end: float, now: float) -> None:
        """Remember a counter's value seen in the store without a reservation (a refusal)."""
        lease = self._leases.get((charge.subject, charge.counter))
        if lease is None:
            self._leases[(charge.subject, charge.counter)] = Lease(charge.limit, 0, used_now, window_end, charge.ttl, now)
        else:
            lease.store_used = used_now

    def used(self, charge: CounterCharge) -> int:
        """The counter's use as this instance sees it: the store's value minus its unspent lease
        (every counter of a reservation has an entry once `take` or `record` has seen it)."""
        lease = self._leases[(charge.subject, charge.counter)]
        return lease.store_used - lease.remaining

    def sweep(self, now: float) -> list[CounterCharge]:
        """Hand back idle leases (as negative charges for the store); forget ended windows."""
        returned = []
        for key, lease in list(self._leases.items()):
            if now >= lease.window_end:
                del self._leases[key]  # the window's counter no longer limits anything
            elif lease.remaining and now - lease.last_used >= self.idle_seconds:
                returned.append(CounterCharge(key[0], key[1], -lease.remaining, None, lease.ttl))
                lease.store_used -= lease.remaining
                lease.remaining = 0
            elif not lease.remaining and now - lease.last_used >= 60:
                del self._leases[key]
        return returned

    def release_all(self, now: float) -> list[CounterCharge]:
        """Every unspent unit of a live window, handed back (shutdown)."""
        returned = [CounterCharge(subject, counter, -lease.remaining, None, lease.ttl)
                    for (subject, counter), lease in self._leases.items() if lease.remaining and now < lease.window_end]
        self._leases.clear()
        return returned

    def forget_subject(self, subject: str) -> None:
        """An admin reset the subject's counters: its leases were wiped with them."""
        for key in [k for k in self._leases if k[0] == subject]:
            del self._leases[key]

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def outstanding(self) -> int:
        return sum(1 for lease in self._leases.values() if lease.remaining)
