//! Per-source wakers of a session: each of its sources (cancellation, the
//! inbound acks, appends, the progress tick) is polled with its own waker,
//! which records that it fired and wakes the stream's task, so that a
//! wake-up polls only the sources that have something.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Wake, Waker};

use futures::task::AtomicWaker;

/// One bit per source a session polls.
pub(super) const CANCEL: u8 = 1;
pub(super) const INBOUND: u8 = 2;
pub(super) const APPENDED: u8 = 4;
pub(super) const TICK: u8 = 8;

/// Per-source wakers of a session: each records that its source fired,
/// then wakes the stream's task, so that a wake-up polls only the sources
/// that have something (a frame's wake-up does not poll the inbound
/// stream, an ack's does not look at the watch or the timer).
pub(super) struct SourceWakers {
    flags: Arc<Flags>,
    wakers: [Waker; 4],
}

/// What fired since the session last looked, and the task to wake.
struct Flags {
    fired: AtomicU8,
    task: AtomicWaker,
}

struct SourceWaker {
    flags: Arc<Flags>,
    bit: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flags.fired.fetch_or(self.bit, Ordering::AcqRel);
        self.flags.task.wake();
    }
}

impl SourceWakers {
    pub(super) fn new() -> Self {
        let flags = Arc::new(Flags {
            // Every source is polled once at the start.
            fired: AtomicU8::new(CANCEL | INBOUND | APPENDED | TICK),
            task: AtomicWaker::new(),
        });
        let waker = |bit| {
            Waker::from(Arc::new(SourceWaker {
                flags: flags.clone(),
                bit,
            }))
        };
        let wakers = [waker(CANCEL), waker(INBOUND), waker(APPENDED), waker(TICK)];
        Self { flags, wakers }
    }

    /// Registers the task to wake and takes the sources that fired. The
    /// task is registered first, so a source that fires after the take
    /// wakes it again.
    pub(super) fn fired(&self, cx: &Context<'_>) -> u8 {
        self.flags.task.register(cx.waker());
        self.flags.fired.swap(0, Ordering::AcqRel)
    }

    /// The waker to poll one source with.
    pub(super) fn waker(&self, bit: u8) -> &Waker {
        &self.wakers[bit.trailing_zeros() as usize]
    }
}
