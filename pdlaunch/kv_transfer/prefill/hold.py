"""One held request (`Hold`): blocks the prefill keeps for a remote decode until it has them, and the
rules that end it; the table of holds and its lease clock are holds.py.

A request that finished prefill with do_remote_decode keeps its blocks ("hold") until
- pull: the decode agent's READ completes and its notification ("read_done") arrives (from each of
  the `readers` decode ranks the notification names, when decode reshards between TP sizes), or
- push: a sender thread WROTE the last chunk into decode's blocks and notified decode, or a decode
  cancelled its push ("cancel_push") or its push failed, or
- a decode load ended before its transfer started (aborted or timed out during its handshake, its handshake
  failed, or it could not plan or check the blocks named: it sends "cancel_push" whatever its mode; a resharding
  load sends its rank's "release", below, since the hold waits for one word from each decode rank), or
- decode says it gave up ("release": a NIXL notification, or on the side channel from a decode rank that has not
  shaken hands with this one, its handshake failed or never tried; one sent again counts once),
  each only once no other decode that took the hold is still at it (below), or
- the proxy says the decode leg will not run (`HoldTable.release`; a claimed READ, or staged pull, that has not
  ended keeps it), or
- the lease (kv_transfer.kv_lease_seconds) expires: decode died or the client went away.
Pull: decode sends its claim of the hold ("claim_read" on the side channel) right after it posts its
READ, and counts the READ only once the claim was answered; a claimed hold lives until the
read_done/release notification or a hard cap (decode's remaining transfer time plus
holds.READ_GRACE_SECONDS), whichever comes first, even past its lease, a proxy's release, a cancelled push or
another decode's push: its blocks are never reused mid-read. One freed at its cap is counted as such
(KV_CLAIM_CAP_FREES: the claiming READ's notification never came), not as a lease expiry.
A claim that arrives after the READ's read_done (a small READ ends before the claim is served) is
answered as claimed: the hold lived until that notification, so the READ saw its blocks. A claim of a
hold that expired fails, and so does the load, whatever its READ read.
Staged pull (decode READs the prefill's staging slots, chunk after chunk: staging_server.py): each stage
request claims the hold for its load the same way (its copy takes the blocks only while the hold is servable,
and the claim keeps them until that load's read_done/release after its last chunk, or the cap), so no other
load's end, proxy release or lease ends the hold between two of its chunks. A staging copy, like a push
WRITE, also keeps the blocks while it reads them (`busy`): no hold is freed under a copy.
Claims, stage requests and notifications name their reader (the decode engine) and its load (a `Reader`: both
shared by the TP ranks of one decode, decode/load.py `Load.load_id`), and count per load; pushes and cancels name
their decode load (`owner`). pdlaunch's proxy retries a decode leg on another decode with the same params only after
the first refused the connection (it never got the leg); after a dropped connection or a shutting_down answer, as in a
migration, the leg goes without them and the hold is released (proxy/retry.py). But a client may send its params
again, a proxy of another make retry a leg with them, or a leg be retried, to the same decode or another: so several
loads may take one hold, reading or pushing (decodes may load in different transfer modes). Every load that took the
hold keeps it until it is through (`through`): a READ (or staged pull) that claimed it until all its notifications
are in, a push the side channel accepted until its last chunk landed or it failed or was cancelled. The hold ends
when a load is through with it (a reader's notifications all in, a push's last chunk landed, a cancelled or failed
push) and no other that took it is still at it; so one load's release never frees blocks another load of the same
decode still READs, a read_done never ends a hold another decode pushes from (between two chunks of a staged push)
or pulls through staging slots (between two chunks), and a push's last chunk never ends one under a claimed READ.
A load waits for the notifications its decode's plan gives this rank (each of its ranks sends one when resharding:
reader_plans.py, which settles the count from the layout the decode's handshake stated, not from the `readers` a word
names; without a handshake here, from its first counted word; waiting for the largest count any word named, one
inflated word kept the hold to its cap), and one whose notifications are all in counts no more (a release sent again,
or more than `readers`): a load's release nonces are at most its `readers`, and a hold takes at most
MAX_LOADS_PER_HOLD loads.
A load that comes after the hold ended fails (its decode computes the prompt, or the request fails:
kv_transfer.load_failure_policy): a late claim (its READ must neither see
blocks freed after another load's read_done nor be told "held throughout" of a hold another load read), a stage
request, or a push. A decode that died without a word (between two chunks of its push, or during its claimed READ
or staged pull) is through once the prefill is told it ended (`drop_engine`: its launcher asks,
HoldTable.forget_engine): its claims and notifications count no more, its pushes are given up (a WRITE of one still
running keeps the blocks until it ends), a claim or push of its still on its way is refused (`engine_ended`), and
the hold ends unless another decode is still at it. Untold (a decode of another deployment, or the ask lost), such
a hold lives until its lease, or a claimed READ's cap if later. A hold no decode took stays: the proxy may still
send its decode leg.
A cancel ends the cancelling decode load's interest only: another decode's push goes on.
Each of these reports the request in `finished_sending` exactly once, so the engine frees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.errors import KVTransferError

Reader = tuple[str, str]  # a decode load that READs a hold: (its decode engine id, its load id)
# Loads whose claims and notifications one hold counts: a few decodes (the proxy retried a leg), a client's replays.
# Bounds what a peer can make a hold keep: with `readers` (at most 1024, settled per load), its release nonces too.
MAX_LOADS_PER_HOLD = 64


@dataclass
class Hold:
    request_id: str
    block_ids: list[list[int]]
    deadline: float  # time.monotonic() when the lease expires
    busy: int = 0  # pushes/stagings reading these blocks now: neither expire nor free them yet
    # Of them push WRITEs (not staging copies), by owner (the nonce of the decode load that asked): a cancelled
    # push's WRITE may still land. A count per owner: a staged push's chunk nonces do not name its load.
    pushing: dict[str, int] = field(default_factory=dict)
    # Loads whose push from the hold is under way: accepted, and neither its last chunk landed nor it failed or
    # was cancelled (`through`).
    push_owners: set[str] = field(default_factory=set)
    push_readers: dict[str, str] = field(default_factory=dict)  # load (owner) -> its decode engine id
    pushed: bool = False  # a push's last chunk landed
    cancelled_by: set[str] = field(default_factory=set)  # loads that cancelled their push: post no WRITE of theirs
    done: bool = False  # may be freed
    # Per load (`Reader`): read_done/release notifications received, of them read_done, and how many to wait for
    # (its ranks each send one when resharding: the count reader_plans.py settled).
    notified: dict[Reader, int] = field(default_factory=dict)
    read: dict[Reader, int] = field(default_factory=dict)
    readers: dict[Reader, int] = field(default_factory=dict)
    # Per load, the releases sent on the side channel that counted (each counts once): at most its `readers`.
    release_nonces: dict[Reader, set[str]] = field(default_factory=dict)
    claimed_by: set[Reader] = field(default_factory=set)  # loads whose READ claimed the hold
    # Decode engines that ended while at the hold (`drop_engine`): through with it, their pushes given up.
    ended_engines: set[str] = field(default_factory=set)
    expired: bool = False
    unended_claims: list[str] = field(default_factory=list)  # freed at the claim's cap: loads that never notified
    cancelled: bool = False  # the proxy released it (`release`): post no WRITE for it any more
    read_claimed: bool = False  # a decode READ runs: the deadline is the read's hard cap, not the lease
    prompt_digest: str | None = None  # push_params.prompt_digest of its prompt ("held_blocks" matches it)

    @property
    def servable(self) -> bool:
        return not (self.done or self.cancelled)

    def push_cancelled(self, owner: str) -> bool:
        """No WRITE of the push of load `owner` is posted any more."""
        return self.cancelled or owner in self.cancelled_by or self.push_readers.get(owner) in self.ended_engines


def reader_name(reader: Reader) -> str:
    return f"load {reader[1]} of {reader[0]}"


def reader_done(hold: Hold, reader: Reader) -> bool:
    """Load `reader` sent every notification it will send (or its engine ended: it sends none any more)."""
    return reader[0] in hold.ended_engines or hold.notified.get(reader, 0) >= hold.readers.get(reader, 1)


def takes(hold: Hold, reader: Reader) -> bool:
    """Whether the hold counts a claim or notification of load `reader`: one it counts already, or a new one while
    fewer than MAX_LOADS_PER_HOLD loads claimed or notified it."""
    known = hold.claimed_by | hold.notified.keys()
    return reader in known or len(known) < MAX_LOADS_PER_HOLD


def read_running(hold: Hold) -> bool:
    """A load whose READ claimed the hold has not sent all its notifications: the claim keeps the blocks until
    then, or until its cap (`read_claimed` stays set once a READ claimed the hold, after it ended too)."""
    return not all(reader_done(hold, r) for r in hold.claimed_by)


def claim_for_read(hold: Hold, reader: Reader, cap: float) -> None:
    """Load `reader` READs the blocks (a claim_read, or a staged pull's stage request): the hold lives until that
    load's notifications are all in, or until `cap` (time.monotonic()), even past its lease. The caller checked
    that the hold `takes` it."""
    hold.read_claimed = True
    hold.claimed_by.add(reader)
    hold.deadline = max(hold.deadline, cap)


def through(hold: Hold) -> bool:
    """No decode that took the hold is still at it: no push from it is under way (accepted, and neither its last
    chunk landed nor it failed or was cancelled), and no READ that claimed it runs (`read_running`)."""
    return not (hold.push_owners or hold.pushing or read_running(hold))


def given_up(hold: Hold) -> bool:
    """A decode cancelled its push (or its push failed), or a decode at the hold ended, and no other wants the
    blocks (`through`)."""
    return bool(hold.cancelled_by or hold.ended_engines) and through(hold)


def take_notification(hold: Hold, reader: Reader, read: bool, readers: int) -> bool:
    """A read_done (`read`) or release notification from one of the `readers` ranks of load `reader` (the count the
    caller settled: reader_plans.py): the hold ends once that load's notifications are all in and no other is at it
    (`through`). False: not counted, since that load's notifications are all in (or its engine ended), or the hold
    `takes` no more loads."""
    if reader_done(hold, reader) or not takes(hold, reader):
        return False
    hold.readers[reader] = readers
    hold.notified[reader] = hold.notified.get(reader, 0) + 1
    hold.read[reader] = hold.read.get(reader, 0) + read
    hold.done = hold.done or (reader_done(hold, reader) and through(hold))
    return True


def cancel_push(hold: Hold, owner: str) -> bool:
    """Decode load `owner` cancelled its push: no WRITE of its is posted any more, and the hold ends once no decode
    wants it (`given_up`). True when a WRITE of that load may still land in its blocks (in flight)."""
    hold.cancelled_by.add(owner)
    hold.push_owners.discard(owner)
    hold.done = hold.done or given_up(hold)
    return owner in hold.pushing


def end_claim(hold: Hold, done: bool, push_owner: str | None, failed: bool) -> None:
    """A push WRITE (of load `push_owner`) or staging copy reading the blocks ended (HoldTable.unclaim); done: the
    last chunk of that push landed (or the copy asked to end the hold); failed: that push failed or was cancelled,
    which ends its load's interest, as its cancel would."""
    hold.busy -= 1
    if push_owner is not None:
        left = hold.pushing.pop(push_owner) - 1
        if left:
            hold.pushing[push_owner] = left
        if failed:
            hold.cancelled_by.add(push_owner)
        if failed or done:
            hold.push_owners.discard(push_owner)
        hold.pushed = hold.pushed or done
    hold.done = hold.done or (done and through(hold)) or given_up(hold)


def drop_engine(hold: Hold, engine_id: str) -> bool:
    """Decode engine `engine_id` ended (died: its launcher told the prefill to forget it): its READ claims and
    notifications count no more, and its pushes are given up, as if it had cancelled them (a WRITE of one still
    running keeps the blocks until it ends: `pushing`). The hold ends once no other decode is at it (`through`).
    True when that engine was at the hold: a push of its under way, a claimed READ or staged pull, or some of its
    ranks' notifications in and not all."""
    if hold.done:
        return False
    owners = {owner for owner, engine in hold.push_readers.items()
              if engine == engine_id and (owner in hold.push_owners or owner in hold.pushing)}
    reading = any(r[0] == engine_id and not reader_done(hold, r) for r in hold.claimed_by | hold.notified.keys())
    if not (owners or reading):
        return False
    hold.ended_engines.add(engine_id)
    hold.push_owners -= owners
    hold.done = through(hold)
    return True


LEASE_EXPIRED = "its lease expired"
CLAIM_CAPPED = "freed at the hard cap of the READ claim of "
ENGINE_ENDED = "the decode engine that took it ended: "


def how_it_ended(hold: Hold, read_by: frozenset[Reader]) -> str:
    if hold.expired:
        return LEASE_EXPIRED
    if read_by:
        return "read by " + ", ".join(map(reader_name, sorted(read_by)))
    if hold.unended_claims:
        return (CLAIM_CAPPED + ", ".join(hold.unended_claims)
                + ", whose read_done/release never came")
    if hold.cancelled:
        return "released: its decode leg will not run"
    if hold.pushed:
        return "pushed to a decode"
    if hold.ended_engines:
        return ENGINE_ENDED + ", ".join(sorted(hold.ended_engines))
    if given_up(hold):
        return "its decode cancelled its push"
    return "released by " + (", ".join(map(reader_name, sorted(hold.notified))) or "its reader")


def readers_that_read(hold: Hold) -> frozenset[Reader]:
    """Loads each of whose ranks READ the blocks while they were held (read_done, no release, no expiry):
    a claimed READ's hold outlives a proxy's release (`HoldTable.release`)."""
    if hold.expired:
        return frozenset()
    return frozenset(r for r, n in hold.read.items()
                     if n >= hold.readers.get(r, 1) and (not hold.cancelled or r in hold.claimed_by))


def engine_ended(request_id: str, engine_id: str) -> KVTransferError:
    """A claim or push of `request_id` that decode engine `engine_id` sent before it ended (`drop_engine`), served
    after: it takes the hold no more."""
    return KVTransferError(f"request {request_id}: decode engine {engine_id} ended (this prefill was told to forget "
                           "it) before its message was served", hint="nothing to load")


# What a refused load's decode does; the prefill that refuses it does not know the decode's policy.
REFUSED_LOAD = ("this load fails, and by its decode's kv_transfer.load_failure_policy, recompute: the decode computes "
                "the prompt itself; fail: the request fails")


def too_many_loads(request_id: str) -> KVTransferError:
    """A claim of `request_id` by a load beyond the MAX_LOADS_PER_HOLD that took its hold."""
    return KVTransferError(f"request {request_id}: {MAX_LOADS_PER_HOLD} decode loads took its hold already",
                           hint=f"its params were sent to decodes again and again; {REFUSED_LOAD}")


def not_held(request_id: str, lease_seconds: float, how: str | None = None) -> KVTransferError:
    """Why a claim of `request_id` finds no hold: how it ended (`how_it_ended`), else its lease, or its KV was
    sent."""
    if how is not None and how != LEASE_EXPIRED:
        why = ("a decode that claimed its READ died or timed out" if how.startswith(CLAIM_CAPPED)
               else "a decode that took it died" if how.startswith(ENGINE_ENDED)
               else "its client left or its decode leg was given up")
        return KVTransferError(f"request {request_id} is not held here any more: {how}",
                               hint=f"{why}; nothing to load")
    return KVTransferError(
        f"request {request_id} is not held here any more: its lease ({lease_seconds:g}s) expired "
        "or its KV was already sent", field="kv_transfer.kv_lease_seconds",
        hint="raise the lease if decode queues requests longer than that")
