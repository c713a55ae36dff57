//! The global budget of bytes in flight: framed values being read, request lines beyond
//! their free first 4 KiB, and replies built but not yet written, across every connection. A request that would overspend it is refused (`ERR busy`) before
//! its bytes are read, so no number of clients can take PID 1's memory past the budget plus
//! the fixed per-connection buffers (bounded by `--max-connections`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget { limit, used: AtomicUsize::new(0) })
    }

    /// Takes `bytes` from the budget, or nothing when that would exceed it.
    pub fn try_take(self: &Arc<Self>, bytes: usize) -> Option<BytePermit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()?;
        Some(BytePermit { budget: self.clone(), bytes })
    }

    /// Bytes currently taken.
    /// Takes `bytes` into `held` (merged with what it already holds); false when the budget
    /// has no room, and then nothing is taken.
    pub fn take_into(self: &Arc<Self>, bytes: usize, held: &mut Option<BytePermit>) -> bool {
        let Some(permit) = self.try_take(bytes) else { return false };
        match held {
            Some(held) => held.absorb(permit),
            None => *held = Some(permit),
        }
        true
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes taken from a [`ByteBudget`]; given back on drop.
#[derive(Debug)]
pub struct BytePermit {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl BytePermit {
    /// Merges `other` into this permit (both are given back together).
    pub fn absorb(&mut self, mut other: BytePermit) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for BytePermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_gives_back_on_drop() {
        let budget = ByteBudget::new(100);
        let mut a = budget.try_take(60).unwrap();
        assert!(budget.try_take(41).is_none());
        let b = budget.try_take(40).unwrap();
        a.absorb(b);
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_take(usize::MAX).is_none());
    }
}
