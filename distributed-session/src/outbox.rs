//! The bounded outbox between `save` and the database writer.
//!
//! One slot per session with an unwritten change: a new save of a session that already has a
//! slot replaces its value (the higher version wins), so the writer only ever writes the
//! latest. A slot leaves the outbox when the version it holds is in the database, when a
//! newer version was written through around it, when the session is deleted, or when it is
//! given up as dead; never otherwise.
//!
//! Every accepted change gets a sequence number; a slot remembers the oldest one it holds
//! that is not yet durable, which is what `flush` waits on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::SessionId;
use crate::record::Encoded;

/// What a slot will write.
#[derive(Clone)]
pub(crate) enum Change {
    /// The session's data.
    Live(Encoded),
    /// A tombstone, kept until `expires_at`.
    Deleted { expires_at: SystemTime },
}

/// A change taken by the writer.
pub(crate) struct Item {
    pub(crate) id: SessionId,
    pub(crate) version: u64,
    pub(crate) change: Change,
}

/// A change given up on.
pub(crate) struct Dead {
    pub(crate) id: SessionId,
    pub(crate) version: u64,
    pub(crate) attempts: u32,
}

struct Slot {
    version: u64,
    change: Change,
    /// Sequence number and time of the oldest accepted change not yet in the database.
    since: (u64, Instant),
    /// The same for the first change accepted after the writer took the slot.
    next_since: Option<(u64, Instant)>,
    /// The current version still has to be taken by the writer.
    queued: bool,
    /// The writer is writing some version of this slot.
    in_flight: bool,
    in_queue: bool,
    attempts: u32,
}

#[derive(Default)]
struct State {
    slots: HashMap<SessionId, Slot>,
    queue: VecDeque<SessionId>,
    reserved: usize,
    last_seq: u64,
    closed: bool,
    dead_total: u64,
}

impl State {
    fn enqueue(&mut self, id: SessionId, front: bool) {
        if let Some(slot) = self.slots.get_mut(&id)
            && !slot.in_queue
        {
            slot.in_queue = true;
            if front {
                self.queue.push_front(id);
            } else {
                self.queue.push_back(id);
            }
        }
    }
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    capacity: usize,
    /// Wakes the writer: there is something to take, or the outbox closed.
    pub(crate) work: Notify,
    /// Wakes `flush` and savers waiting for space: slots left, reservations were returned.
    pub(crate) progress: Notify,
}

/// Room for one session's change, held from before the cache write until the change is
/// accepted. Dropping it unused gives the room back.
pub(crate) struct Reservation<'a> {
    outbox: &'a Outbox,
    /// Whether it took room (a session that already has a slot needs none).
    counted: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.outbox.lock().reserved -= 1;
            self.outbox.progress.notify_waiters();
        }
    }
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            capacity,
            work: Notify::new(),
            progress: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything that can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest unwritten change of `id`, if any.
    pub(crate) fn peek(&self, id: &SessionId) -> Option<(u64, Change)> {
        let state = self.lock();
        state
            .slots
            .get(id)
            .map(|slot| (slot.version, slot.change.clone()))
    }

    pub(crate) fn is_deleted(&self, id: &SessionId) -> bool {
        matches!(
            self.lock().slots.get(id).map(|s| &s.change),
            Some(Change::Deleted { .. })
        )
    }

    /// Room for a change of `id`, if there is some now.
    pub(crate) fn try_reserve(&self, id: &SessionId) -> Option<Reservation<'_>> {
        let mut state = self.lock();
        if state.slots.contains_key(id) {
            return Some(Reservation {
                outbox: self,
                counted: false,
            });
        }
        if state.slots.len() + state.reserved < self.capacity {
            state.reserved += 1;
            return Some(Reservation {
                outbox: self,
                counted: true,
            });
        }
        None
    }

    /// Room for a change of `id`, waiting up to `timeout` for the writer to make some.
    pub(crate) async fn reserve(
        &self,
        id: &SessionId,
        timeout: Duration,
    ) -> Option<Reservation<'_>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reservation) = self.try_reserve(id) {
                return Some(reservation);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Accepts `change` of `id` at `version` into the room `reservation` holds (`None`: a
    /// tombstone, which is taken whatever the room). `false` once the outbox is closed.
    #[must_use]
    pub(crate) fn accept(
        &self,
        reservation: Option<Reservation<'_>>,
        id: SessionId,
        version: u64,
        change: Change,
    ) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(mut reservation) = reservation {
            if reservation.counted {
                state.reserved -= 1;
            }
            reservation.counted = false;
        }
        if state.closed {
            drop(state);
            self.progress.notify_waiters();
            return false;
        }
        state.last_seq += 1;
        let seq = state.last_seq;
        let mut enqueue = true;
        match state.slots.get_mut(&id) {
            Some(slot) if slot.version >= version => enqueue = false,
            Some(slot) => {
                slot.version = version;
                slot.change = change;
                if !slot.queued {
                    slot.queued = true;
                    if slot.in_flight && slot.next_since.is_none() {
                        slot.next_since = Some((seq, now));
                    }
                }
            }
            None => {
                state.slots.insert(
                    id,
                    Slot {
                        version,
                        change,
                        since: (seq, now),
                        next_since: None,
                        queued: true,
                        in_flight: false,
                        in_queue: false,
                        attempts: 0,
                    },
                );
            }
        }
        if enqueue {
            state.enqueue(id, false);
        }
        drop(state);
        self.work.notify_one();
        true
    }

    /// `version` of `id` is in the database (written through): an older slot is done.
    pub(crate) fn supersede(&self, id: &SessionId, version: u64) {
        let mut state = self.lock();
        if state.slots.get(id).is_some_and(|s| s.version <= version) {
            state.slots.remove(id);
            drop(state);
            self.progress.notify_waiters();
        }
    }

    /// Drops whatever `id` had pending (it is being deleted).
    pub(crate) fn cancel(&self, id: &SessionId) {
        if self.lock().slots.remove(id).is_some() {
            self.progress.notify_waiters();
        }
    }

    /// Puts back in the queue, first, every change the writer took and never reported on (a
    /// writer that panicked mid-batch): the next run writes them again.
    pub(crate) fn requeue_in_flight(&self) {
        let mut state = self.lock();
        let taken: Vec<SessionId> = state
            .slots
            .iter_mut()
            .filter(|(_, slot)| slot.in_flight)
            .map(|(id, slot)| {
                slot.in_flight = false;
                slot.queued = true;
                *id
            })
            .collect();
        for id in taken {
            state.enqueue(id, true);
        }
        drop(state);
        self.work.notify_one();
    }

    /// Up to `max` changes to write, oldest first.
    pub(crate) fn take(&self, max: usize) -> Vec<Item> {
        let mut state = self.lock();
        let mut items = Vec::new();
        while items.len() < max {
            let Some(id) = state.queue.pop_front() else {
                break;
            };
            let Some(slot) = state.slots.get_mut(&id) else {
                continue;
            };
            slot.in_queue = false;
            if !slot.queued {
                continue;
            }
            slot.queued = false;
            slot.in_flight = true;
            slot.next_since = None;
            items.push(Item {
                id,
                version: slot.version,
                change: slot.change.clone(),
            });
        }
        items
    }

    /// `items` are in the database (or lost to a newer version there, which is as good).
    pub(crate) fn complete(&self, items: &[Item]) {
        let mut state = self.lock();
        for item in items {
            let Some(slot) = state.slots.get_mut(&item.id) else {
                continue;
            };
            if !slot.in_flight {
                // Replaced (deleted, or written through) while in flight: not ours any more.
                continue;
            }
            slot.in_flight = false;
            slot.attempts = 0;
            if slot.version == item.version {
                state.slots.remove(&item.id);
            } else if let Some(next) = slot.next_since.take() {
                slot.since = next;
            }
        }
        drop(state);
        self.progress.notify_waiters();
    }

    /// Writing `items` failed: they go back to the front of the queue, and every change
    /// accepted longer than `give_up_after` ago is given up.
    pub(crate) fn fail(&self, items: &[Item], give_up_after: Duration) -> Vec<Dead> {
        let now = Instant::now();
        let mut state = self.lock();
        for item in items.iter().rev() {
            let Some(slot) = state.slots.get_mut(&item.id) else {
                continue;
            };
            if !slot.in_flight {
                continue;
            }
            slot.in_flight = false;
            slot.attempts += 1;
            slot.queued = true;
            state.enqueue(item.id, true);
        }
        // While the database fails, every slot waiting too long is dead, tried or not.
        let expired: Vec<SessionId> = state
            .slots
            .iter()
            .filter(|(_, slot)| {
                !slot.in_flight && now.duration_since(slot.since.1) >= give_up_after
            })
            .map(|(id, _)| *id)
            .collect();
        let mut dead = Vec::with_capacity(expired.len());
        for id in expired {
            if let Some(slot) = state.slots.remove(&id) {
                dead.push(Dead {
                    id,
                    version: slot.version,
                    attempts: slot.attempts,
                });
            }
        }
        state.dead_total += dead.len() as u64;
        drop(state);
        if !dead.is_empty() {
            self.progress.notify_waiters();
        }
        dead
    }

    /// The sequence number of the last accepted change.
    pub(crate) fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Whether every change up to `seq` is in the database (or was given up).
    pub(crate) fn flushed_through(&self, seq: u64) -> bool {
        self.lock().slots.values().all(|slot| slot.since.0 > seq)
    }

    pub(crate) fn dead_total(&self) -> u64 {
        self.lock().dead_total
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_one();
        self.progress.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Closed, and nothing left to write: the writer may stop.
    pub(crate) fn is_finished(&self) -> bool {
        let state = self.lock();
        state.closed && state.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionRecord;

    fn live(tag: &str) -> Change {
        let mut record = SessionRecord::new(Duration::from_secs(60));
        record.data.insert("tag".into(), tag.into());
        Change::Live(Encoded::new(&record, 1 << 20).unwrap())
    }

    fn tag(change: &Change) -> String {
        match change {
            Change::Live(e) => e.decode(SessionId::generate()).unwrap().data["tag"]
                .as_str()
                .unwrap()
                .to_owned(),
            Change::Deleted { .. } => "deleted".into(),
        }
    }

    fn put(outbox: &Outbox, id: SessionId, version: u64, t: &str) {
        let r = outbox.try_reserve(&id).unwrap();
        assert!(outbox.accept(Some(r), id, version, live(t)));
    }

    #[test]
    fn coalesces_and_the_higher_version_wins() {
        let outbox = Outbox::new(10);
        let id = SessionId::generate();
        put(&outbox, id, 2, "two");
        put(&outbox, id, 3, "three");
        put(&outbox, id, 1, "one (late)");
        assert_eq!(outbox.len(), 1);
        let items = outbox.take(10);
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].version, tag(&items[0].change)),
            (3, "three".into())
        );
        outbox.complete(&items);
        assert_eq!(outbox.len(), 0);
        assert!(outbox.flushed_through(outbox.last_seq()));
    }

    #[test]
    fn a_save_during_the_write_stays_pending_and_flush_waits_for_it() {
        let outbox = Outbox::new(10);
        let id = SessionId::generate();
        put(&outbox, id, 1, "one");
        let items = outbox.take(10);
        let before = outbox.last_seq();
        put(&outbox, id, 2, "two");
        outbox.complete(&items);
        assert!(outbox.flushed_through(before));
        assert!(!outbox.flushed_through(outbox.last_seq()));
        assert_eq!(tag(&outbox.peek(&id).unwrap().1), "two");
        let items = outbox.take(10);
        assert_eq!(items[0].version, 2);
        outbox.complete(&items);
        assert!(outbox.peek(&id).is_none());
    }

    #[test]
    fn capacity_counts_sessions_and_reservations() {
        let outbox = Outbox::new(2);
        let (a, b, c) = (
            SessionId::generate(),
            SessionId::generate(),
            SessionId::generate(),
        );
        put(&outbox, a, 1, "a");
        let held = outbox.try_reserve(&b).unwrap();
        assert!(outbox.try_reserve(&c).is_none());
        // A session already in the outbox needs no room.
        assert!(outbox.try_reserve(&a).is_some());
        drop(held);
        assert!(outbox.try_reserve(&c).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_requeue_first_and_give_up_after_the_bound() {
        let outbox = Outbox::new(10);
        let (a, b) = (SessionId::generate(), SessionId::generate());
        put(&outbox, a, 1, "a");
        put(&outbox, b, 1, "b");
        let items = outbox.take(1);
        assert_eq!(items[0].id, a);
        assert!(outbox.fail(&items, Duration::from_secs(10)).is_empty());
        // Retried first.
        let items = outbox.take(1);
        assert_eq!(items[0].id, a);
        tokio::time::advance(Duration::from_secs(10)).await;
        let dead = outbox.fail(&items, Duration::from_secs(10));
        // Both are dead: `b` waited as long, untried.
        assert_eq!(dead.len(), 2);
        assert_eq!(dead.iter().find(|d| d.id == a).unwrap().attempts, 2);
        assert_eq!(outbox.dead_total(), 2);
        assert_eq!(outbox.len(), 0);
    }

    #[test]
    fn a_closed_outbox_refuses_and_finishes_when_drained() {
        let outbox = Outbox::new(2);
        let id = SessionId::generate();
        put(&outbox, id, 1, "one");
        outbox.close();
        let r = outbox.try_reserve(&SessionId::generate()).unwrap();
        assert!(!outbox.accept(Some(r), SessionId::generate(), 2, live("late")));
        assert!(!outbox.is_finished());
        let items = outbox.take(10);
        outbox.complete(&items);
        assert!(outbox.is_finished());
        // The refused save's room was given back: both places are free.
        let (a, b) = (SessionId::generate(), SessionId::generate());
        let _held = outbox.try_reserve(&a).unwrap();
        assert!(outbox.try_reserve(&b).is_some());
    }

    #[test]
    fn cancel_and_supersede_drop_older_pending_changes() {
        let outbox = Outbox::new(10);
        let id = SessionId::generate();
        put(&outbox, id, 5, "five");
        let items = outbox.take(10);
        outbox.cancel(&id);
        // A completion for a slot that was replaced in flight changes nothing.
        let tombstone = Change::Deleted {
            expires_at: SystemTime::now(),
        };
        assert!(outbox.accept(None, id, 6, tombstone));
        outbox.complete(&items);
        assert!(outbox.is_deleted(&id));
        outbox.supersede(&id, 5);
        assert!(outbox.is_deleted(&id));
        outbox.supersede(&id, 6);
        assert!(outbox.peek(&id).is_none());
    }
}
