//! The hand-off between the streaming thread and the worker.
//!
//! Live sources must never wait on the model, so when the worker is behind the oldest pending
//! frame makes room for the newest. Files (non-live) are never dropped from: the streaming
//! thread waits for room instead, which is the backpressure that makes every frame count.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// What to do when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Live: drop the oldest droppable item.
    DropOldest,
    /// Non-live: wait for room.
    Block,
}

/// Items that may be dropped under `DropOldest` (frames) and those that may not (EOS, resets).
pub trait Droppable {
    fn droppable(&self) -> bool;
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T> {
    Queued,
    /// Queued, and this older item was dropped to make room.
    Replaced(T),
    /// The queue is flushing or closed; the item comes back.
    Refused(T),
}

struct State<T> {
    items: VecDeque<T>,
    flushing: bool,
    closed: bool,
}

pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    capacity: usize,
}

impl<T: Droppable> JobQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                flushing: false,
                closed: false,
            }),
            changed: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the deque inconsistent.
        lock(&self.state)
    }

    pub fn push(&self, item: T, policy: QueuePolicy) -> Pushed<T> {
        let mut state = self.lock();
        loop {
            if state.flushing || state.closed {
                return Pushed::Refused(item);
            }
            let frames = state.items.iter().filter(|i| i.droppable()).count();
            if !item.droppable() || frames < self.capacity {
                state.items.push_back(item);
                self.changed.notify_all();
                return Pushed::Queued;
            }
            match policy {
                QueuePolicy::DropOldest => {
                    let oldest = state
                        .items
                        .iter()
                        .position(|i| i.droppable())
                        .expect("a frame is queued");
                    let dropped = state.items.remove(oldest).expect("index in range");
                    state.items.push_back(item);
                    self.changed.notify_all();
                    return Pushed::Replaced(dropped);
                }
                QueuePolicy::Block => {
                    state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Waits for the next item; `None` once the queue is closed.
    pub fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(item) = state.items.pop_front() {
                self.changed.notify_all();
                return Some(item);
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// While flushing, pending items are discarded and pushes are refused (a blocked pusher
    /// returns at once).
    pub fn set_flushing(&self, flushing: bool) {
        let mut state = self.lock();
        state.flushing = flushing;
        if flushing {
            state.items.clear();
        }
        self.changed.notify_all();
    }

    /// Ends the queue: pushers are refused and the worker's `pop` returns `None`.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.items.clear();
        self.changed.notify_all();
    }

    /// The next item without waiting, if any (`None` also once closed).
    pub fn try_pop(&self) -> Option<T> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let item = state.items.pop_front();
        if item.is_some() {
            self.changed.notify_all();
        }
        item
    }

    /// Looks at the next item without taking it.
    pub fn peek<R>(&self, look: impl FnOnce(Option<&T>) -> R) -> R {
        let state = self.lock();
        look(state.items.front())
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Debug, PartialEq, Eq)]
    enum Item {
        Frame(u32),
        End,
    }

    impl Droppable for Item {
        fn droppable(&self) -> bool {
            matches!(self, Item::Frame(_))
        }
    }

    #[test]
    fn live_policy_keeps_the_newest_frames_and_never_drops_end() {
        let q = JobQueue::new(2);
        assert_eq!(
            q.push(Item::Frame(1), QueuePolicy::DropOldest),
            Pushed::Queued
        );
        assert_eq!(q.push(Item::End, QueuePolicy::DropOldest), Pushed::Queued);
        assert_eq!(
            q.push(Item::Frame(2), QueuePolicy::DropOldest),
            Pushed::Queued
        );
        assert_eq!(
            q.push(Item::Frame(3), QueuePolicy::DropOldest),
            Pushed::Replaced(Item::Frame(1))
        );
        assert_eq!(q.pop(), Some(Item::End));
        assert_eq!(q.pop(), Some(Item::Frame(2)));
        assert_eq!(q.pop(), Some(Item::Frame(3)));
    }

    #[test]
    fn blocking_policy_waits_for_room() {
        let q = Arc::new(JobQueue::new(1));
        q.push(Item::Frame(1), QueuePolicy::Block);
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || q.push(Item::Frame(2), QueuePolicy::Block))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !pusher.is_finished(),
            "the second push must wait while the queue is full"
        );
        assert_eq!(q.pop(), Some(Item::Frame(1)));
        assert_eq!(pusher.join().unwrap(), Pushed::Queued);
        assert_eq!(q.pop(), Some(Item::Frame(2)));
    }

    #[test]
    fn flushing_releases_a_blocked_pusher_and_discards_items() {
        let q = Arc::new(JobQueue::new(1));
        q.push(Item::Frame(1), QueuePolicy::Block);
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || q.push(Item::Frame(2), QueuePolicy::Block))
        };
        std::thread::sleep(Duration::from_millis(20));
        q.set_flushing(true);
        assert_eq!(pusher.join().unwrap(), Pushed::Refused(Item::Frame(2)));
        assert!(q.is_empty());
        q.set_flushing(false);
        assert_eq!(q.push(Item::Frame(3), QueuePolicy::Block), Pushed::Queued);
    }

    #[test]
    fn close_wakes_the_consumer() {
        let q: Arc<JobQueue<Item>> = Arc::new(JobQueue::new(1));
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || q.pop())
        };
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(consumer.join().unwrap(), None);
    }
}
