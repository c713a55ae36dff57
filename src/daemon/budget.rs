//! Per-uid shares of the server's two limits: connections (`--max-connections`) and bytes in
//! flight (`--max-inflight-bytes`: framed values being read, request lines beyond their free
//! first 4 KiB, and replies built but not yet written). A request that would overspend its
//! share is refused (`ERR busy`) before its bytes are read, so no number of clients can take
//! PID 1's memory past the budget plus the fixed per-connection buffers.
//!
//! Root and op-bridge's own uid may use the whole limit; an eighth of it is kept for them
//! alone. The rest is split evenly between the other allowed uids, so one uid (the app's)
//! can never starve another, nor the operator's health check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Shares {
    limit: usize,
    /// The most any one uid that is neither root nor op-bridge's own may hold.
    share: usize,
    /// What those uids may hold together: the limit less the part kept for root and ours.
    others_limit: usize,
    own_uid: u32,
    used: Mutex<Used>,
}

#[derive(Debug, Default)]
struct Used {
    total: usize,
    others: usize,
    by_uid: HashMap<u32, usize>,
}

/// The limit of bytes in flight.
pub type ByteBudget = Shares;
/// Bytes taken from a [`ByteBudget`].
pub type BytePermit = SharePermit;

impl Shares {
    /// `limit` shared by root, `own_uid` and the `others` (the other uids allowed to connect).
    pub fn new(limit: usize, own_uid: u32, others: &[u32]) -> Arc<Shares> {
        let mut distinct: Vec<u32> = others.iter().copied().filter(|&uid| uid != 0 && uid != own_uid).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let others_limit = limit - limit / 8;
        let share = others_limit / distinct.len().max(1);
        Arc::new(Shares { limit, share, others_limit, own_uid, used: Mutex::default() })
    }

    fn privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own_uid
    }

    /// Takes `amount` for `uid`, or nothing when that would exceed the limit or its share.
    pub fn try_take(self: &Arc<Self>, uid: u32, amount: usize) -> Option<SharePermit> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let total = used.total.checked_add(amount).filter(|&t| t <= self.limit)?;
        if self.privileged(uid) {
            used.total = total;
        } else {
            let mine = used.by_uid.get(&uid).copied().unwrap_or(0);
            let mine = mine.checked_add(amount).filter(|&m| m <= self.share)?;
            let others = used.others.checked_add(amount).filter(|&o| o <= self.others_limit)?;
            used.total = total;
            used.others = others;
            used.by_uid.insert(uid, mine);
        }
        Some(SharePermit { shares: self.clone(), uid, amount })
    }

    /// Takes `amount` into `held` (merged with what it already holds); false when there is
    /// no room, and then nothing is taken.
    pub fn take_into(self: &Arc<Self>, uid: u32, amount: usize, held: &mut Option<SharePermit>) -> bool {
        let Some(permit) = self.try_take(uid, amount) else { return false };
        match held {
            Some(held) => held.absorb(permit),
            None => *held = Some(permit),
        }
        true
    }

    /// Taken in all.
    pub fn used(&self) -> usize {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    fn give_back(&self, uid: u32, amount: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.total -= amount;
        if !self.privileged(uid) {
            used.others -= amount;
            if let Some(mine) = used.by_uid.get_mut(&uid) {
                *mine -= amount;
                if *mine == 0 {
                    used.by_uid.remove(&uid);
                }
            }
        }
    }
}

/// Part of a [`Shares`] limit held for one uid; given back on drop.
#[derive(Debug)]
pub struct SharePermit {
    shares: Arc<Shares>,
    uid: u32,
    amount: usize,
}

impl SharePermit {
    /// Merges `other` (taken for the same uid) into this permit; both are given back together.
    pub fn absorb(&mut self, mut other: SharePermit) {
        debug_assert_eq!(self.uid, other.uid);
        self.amount += std::mem::take(&mut other.amount);
    }
}

impl Drop for SharePermit {
    fn drop(&mut self) {
        if self.amount > 0 {
            self.shares.give_back(self.uid, self.amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_gives_back_on_drop() {
        let budget = Shares::new(100, 0, &[]);
        let mut a = budget.try_take(0, 60).unwrap();
        assert!(budget.try_take(0, 41).is_none());
        let b = budget.try_take(0, 40).unwrap();
        a.absorb(b);
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_take(0, usize::MAX).is_none());
    }

    #[test]
    fn each_other_uid_gets_its_share_and_root_keeps_room() {
        let shares = Shares::new(800, 500, &[1000, 1001, 0, 500, 1000]);
        // 700 for the others, 350 each.
        let app = shares.try_take(1000, 350).unwrap();
        assert!(shares.try_take(1000, 1).is_none());
        let other = shares.try_take(1001, 350).unwrap();
        assert!(shares.try_take(1001, 1).is_none());
        let root = shares.try_take(0, 50).unwrap();
        let ours = shares.try_take(500, 50).unwrap();
        assert!(shares.try_take(0, 1).is_none());
        drop((root, ours));
        drop(app);
        assert!(shares.try_take(1000, 350).is_some());
        drop(other);
        assert_eq!(shares.used(), 0);
    }

    #[test]
    fn root_may_use_what_the_others_leave() {
        let shares = Shares::new(80, 500, &[1000]);
        let root = shares.try_take(0, 75).unwrap();
        assert!(shares.try_take(1000, 6).is_none());
        assert!(shares.try_take(1000, 5).is_some());
        drop(root);
    }
}
