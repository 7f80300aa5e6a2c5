//! A one-shot slot for one check's result: the loop fills it once; a blocking
//! waiter (`Pending::wait`) or a polling task (`Pending` as a `Future`) takes it.
//!
//! The loop never waits on the submitter: the mutex is held only to swap the
//! state (never while sleeping: a blocked waiter sleeps in the condvar, which
//! releases it), a task's waker is cloned and dropped outside it, and the
//! condvar is notified only when somebody sleeps on it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Where the slot stands.
enum State<T> {
    /// Nothing yet; the waker of the task that polled last, if any.
    Empty(Option<Waker>),
    /// Delivered, not taken yet.
    Full(T),
    /// Taken by the receiver.
    Taken,
    /// The sender was dropped without delivering.
    Abandoned,
}

/// Why a receiver gets no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// The value was already taken from this slot.
    Taken,
    /// The sender was dropped without delivering.
    Abandoned,
}

/// The state, and how many threads sleep on the condvar for it.
struct Inner<T> {
    state: State<T>,
    sleepers: usize,
}

/// What sender and receiver share.
struct Slot<T> {
    inner: Mutex<Inner<T>>,
    filled: Condvar,
}

impl<T> Slot<T> {
    /// The state (poison-tolerant: no critical section here can leave it half-written).
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Fills the slot once; dropped unfilled, it marks the slot abandoned.
pub(crate) struct Sender<T>(Arc<Slot<T>>);

/// Takes the value, blocking or polling.
pub(crate) struct Receiver<T>(Arc<Slot<T>>);

/// A new empty slot.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        inner: Mutex::new(Inner {
            state: State::Empty(None),
            sleepers: 0,
        }),
        filled: Condvar::new(),
    });
    (Sender(slot.clone()), Receiver(slot))
}

impl<T> Sender<T> {
    /// Deliver `value`, waking whoever waits for it.
    pub fn send(self, value: T) {
        self.settle(State::Full(value));
        // Drop finds the slot settled and does nothing.
    }

    /// Move an empty slot to `to`, then wake the sleepers and the task.
    fn settle(&self, to: State<T>) {
        let mut inner = self.0.lock();
        let State::Empty(waker) = &mut inner.state else {
            return;
        };
        let waker = waker.take();
        inner.state = to;
        let sleepers = inner.sleepers > 0;
        drop(inner);
        if sleepers {
            self.0.filled.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.settle(State::Abandoned);
    }
}

/// Take a settled slot's value (`None` while it is empty).
fn take<T>(state: &mut State<T>) -> Option<Result<T, Lost>> {
    match state {
        State::Empty(_) => None,
        State::Taken => Some(Err(Lost::Taken)),
        State::Abandoned => Some(Err(Lost::Abandoned)),
        State::Full(_) => match std::mem::replace(state, State::Taken) {
            State::Full(value) => Some(Ok(value)),
            _ => unreachable!("the slot was full"),
        },
    }
}

impl<T> Receiver<T> {
    /// The value if the slot is settled, without waiting.
    pub fn try_recv(&self) -> Option<Result<T, Lost>> {
        take(&mut self.0.lock().state)
    }

    /// Block until the slot is settled, or until `deadline` (then `None`).
    pub fn recv_until(&self, deadline: Option<Instant>) -> Option<Result<T, Lost>> {
        let mut inner = self.0.lock();
        inner.sleepers += 1;
        let got = loop {
            if let Some(got) = take(&mut inner.state) {
                break Some(got);
            }
            inner = match deadline {
                None => self
                    .0
                    .filled
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(end) => {
                    let now = Instant::now();
                    if now >= end {
                        break None;
                    }
                    self.0
                        .filled
                        .wait_timeout(inner, end - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        };
        inner.sleepers -= 1;
        got
    }

    /// Take the value if settled, else remember `cx`'s waker (replacing the
    /// last one unless it would wake the same task) and return `Pending`.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Result<T, Lost>> {
        let mut inner = self.0.lock();
        if let Some(got) = take(&mut inner.state) {
            return Poll::Ready(got);
        }
        if let State::Empty(Some(old)) = &inner.state
            && old.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        drop(inner);
        // Cloned outside the lock: the loop never waits on a waker's clone.
        let new = cx.waker().clone();
        let mut inner = self.0.lock();
        let State::Empty(waker) = &mut inner.state else {
            // Settled meanwhile.
            return Poll::Ready(take(&mut inner.state).expect("a settled slot"));
        };
        let old = waker.replace(new);
        drop(inner);
        drop(old);
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    /// Let go of a waiting task's waker now rather than at delivery.
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        let old = match &mut inner.state {
            State::Empty(waker) => waker.take(),
            _ => None,
        };
        drop(inner);
        drop(old);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.lock().state {
            State::Empty(_) => "empty",
            State::Full(_) => "full",
            State::Taken => "taken",
            State::Abandoned => "abandoned",
        };
        f.debug_tuple("Receiver").field(&state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn the_last_task_that_polled_is_woken_once_and_gets_the_value() {
        let (tx, rx) = channel::<u32>();
        let (first, first_waker) = counter();
        let (second, second_waker) = counter();
        assert!(
            rx.poll_recv(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        // The same waker again: kept, not cloned over (will_wake).
        assert!(
            rx.poll_recv(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        assert_eq!(Arc::strong_count(&first), 3, "stored once, not twice");
        // Moved to another task: the new waker replaces the old one.
        assert!(
            rx.poll_recv(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        assert_eq!(Arc::strong_count(&first), 2, "the old waker was dropped");
        tx.send(7);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        let mut cx = Context::from_waker(&second_waker);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Ok(7)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Err(Lost::Taken)));
        assert_eq!(rx.try_recv(), Some(Err(Lost::Taken)));
    }

    #[test]
    fn a_sender_dropped_unsent_wakes_the_waiters_with_abandoned() {
        let (tx, rx) = channel::<u32>();
        let (woken, waker) = counter();
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        let sleeper = std::thread::spawn(move || rx.recv_until(None));
        std::thread::sleep(Duration::from_millis(50));
        drop(tx);
        assert_eq!(sleeper.join().unwrap(), Some(Err(Lost::Abandoned)));
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_blocked_receiver_gets_the_value_or_times_out() {
        let (tx, rx) = channel::<u32>();
        assert_eq!(rx.try_recv(), None);
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(rx.recv_until(Some(soon)), None);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(3);
        });
        assert_eq!(rx.recv_until(None), Some(Ok(3)));
        sender.join().unwrap();
        assert_eq!(rx.0.lock().sleepers, 0);
    }

    #[test]
    fn a_dropped_receiver_lets_go_of_its_waker_and_the_send_still_succeeds() {
        let (tx, rx) = channel::<u32>();
        let (woken, waker) = counter();
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        drop(rx);
        assert_eq!(
            Arc::strong_count(&woken),
            2,
            "the waker was dropped with the receiver"
        );
        tx.send(1);
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    }
}
