//! The secret store: every name op-bridge knows, where it comes from, and its value in locked
//! memory.
//!
//! A slot exists for every registered name (discovered from the environment, declared by
//! `--watch`, or written with SET). Its value is a [`LockedBytes`], zeroized when replaced,
//! removed, or when the store is cleared at exit. A failed refresh keeps the last good value
//! and records the failure, which STATUS shows as "stale".
//!
//! Every slot carries a generation, taken from one counter that only grows: each local write
//! (a captured file, a stored SET or write-back) gets a new one. A resolution pass notes the
//! generations before it asks 1Password and applies an answer only to a slot still at the
//! generation it noted ([`SecretStore::apply_resolved`]), so a refresh that read the old value
//! can never roll back a rotation that happened while it was running.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use secrecy::ExposeSecret;

use crate::locked::LockedBytes;
use crate::reference::SecretRef;

/// Where a name was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Env,
    Watch,
    Set,
    /// A broker-owned OAuth access token (`{prefix}NAME_OAUTH`, `--oauth`).
    #[serde(rename = "oauth")]
    OAuth,
}

/// A slot's health, as STATUS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Resolved by the last attempt.
    Ok,
    /// The last refresh failed; the previous value is still served.
    Stale,
    /// No value (never resolved, or dropped because 1Password no longer has it).
    Missing,
}

struct Slot {
    reference: Option<SecretRef>,
    source: Source,
    value: Option<LockedBytes>,
    updated: Option<SystemTime>,
    error: Option<String>,
    /// Generation of the value (0: never written).
    generation: u64,
}

/// What a resolution result did to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored; the value differs from the previous one.
    Changed,
    /// Stored; the same value as before.
    Unchanged,
    /// Not stored: the slot was written after the resolution began (or is gone).
    Superseded,
}

/// What STATUS shows of one slot: never the value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    pub name: String,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub source: Source,
    pub state: State,
    /// Seconds since the value was last resolved or written.
    pub age_s: Option<u64>,
    pub bytes: Option<usize>,
    pub locked: Option<bool>,
    pub error: Option<String>,
}

#[derive(Default)]
pub struct SecretStore {
    slots: RwLock<BTreeMap<String, Slot>>,
    generations: AtomicU64,
}

impl SecretStore {
    pub fn new() -> SecretStore {
        SecretStore::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Slot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares `name` (keeping any value it already has). Returns false when the name is
    /// already registered to a different reference.
    pub fn register(&self, name: &str, reference: Option<SecretRef>, source: Source) -> bool {
        let mut slots = self.write();
        match slots.get_mut(name) {
            Some(slot) if slot.reference.is_some() && reference.is_some() && slot.reference != reference => false,
            Some(slot) => {
                if slot.reference.is_none() {
                    slot.reference = reference;
                }
                true
            }
            None => {
                let slot = Slot { reference, source, value: None, updated: None, error: None, generation: 0 };
                slots.insert(name.to_string(), slot);
                true
            }
        }
    }

    pub fn reference(&self, name: &str) -> Option<SecretRef> {
        self.read().get(name).and_then(|s| s.reference.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Stores a value written locally (a captured file, a stored SET or write-back) under a
    /// new generation; returns whether it differs from the previous one. The old value is
    /// zeroized as it is dropped.
    pub fn set_value(&self, name: &str, value: &[u8]) -> bool {
        self.set_value_generation(name, value).0
    }

    /// [`set_value`](Self::set_value), also returning the new generation.
    pub fn set_value_generation(&self, name: &str, value: &[u8]) -> (bool, u64) {
        let mut slots = self.write();
        let generation = self.next_generation();
        let slot = slots.entry(name.to_string()).or_insert_with(|| Slot {
            reference: None,
            source: Source::Set,
            value: None,
            updated: None,
            error: None,
            generation: 0,
        });
        let changed = slot.value.as_ref().is_none_or(|old| old.expose_secret() != value);
        slot.value = Some(LockedBytes::new(value));
        slot.updated = Some(SystemTime::now());
        slot.error = None;
        slot.generation = generation;
        (changed, generation)
    }

    /// The generation of every slot, noted before a resolution pass asks the backend.
    pub fn generations(&self) -> BTreeMap<String, u64> {
        self.read().iter().map(|(name, slot)| (name.clone(), slot.generation)).collect()
    }

    /// The generation of `name`'s value (0 when it has none yet).
    pub fn generation(&self, name: &str) -> u64 {
        self.read().get(name).map_or(0, |s| s.generation)
    }

    /// Stores a value 1Password returned, if the slot is still at `seen` (the generation noted
    /// before the backend was asked): anything written since is newer and is kept.
    pub fn apply_resolved(&self, name: &str, value: &[u8], seen: u64) -> Applied {
        let mut slots = self.write();
        let Some(slot) = slots.get_mut(name) else { return Applied::Superseded };
        if slot.generation != seen {
            return Applied::Superseded;
        }
        let changed = slot.value.as_ref().is_none_or(|old| old.expose_secret() != value);
        if changed {
            slot.value = Some(LockedBytes::new(value));
            slot.generation = self.next_generation();
        }
        slot.updated = Some(SystemTime::now());
        slot.error = None;
        if changed { Applied::Changed } else { Applied::Unchanged }
    }

    /// Runs `f` on the value of `name` and its generation, under the read lock.
    pub fn with_value_generation<R>(&self, name: &str, f: impl FnOnce(&[u8], u64) -> R) -> Option<R> {
        let slots = self.read();
        let slot = slots.get(name)?;
        slot.value.as_ref().map(|v| f(v.expose_secret(), slot.generation))
    }

    /// Records a failed resolution; the value (if any) is kept and becomes stale.
    pub fn mark_failed(&self, name: &str, error: String) {
        if let Some(slot) = self.write().get_mut(name) {
            slot.error = Some(error);
        }
    }

    /// Drops a value whose item no longer exists (the name stays registered), unless it was
    /// written after `seen` (a local value on its way to 1Password is kept).
    pub fn drop_value(&self, name: &str, error: String, seen: u64) -> bool {
        match self.write().get_mut(name) {
            Some(slot) if slot.generation != seen => false,
            Some(slot) => {
                slot.error = Some(error);
                slot.value.take().is_some()
            }
            None => false,
        }
    }

    /// Forgets a name entirely. Returns false if it was unknown.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(name).is_some()
    }

    /// Runs `f` on the value of `name` under the read lock (no copy leaves the store unless
    /// `f` makes one).
    pub fn with_value<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.read().get(name).and_then(|s| s.value.as_ref()).map(|v| f(v.expose_secret()))
    }

    /// The name registered for a reference, if any.
    pub fn name_for_reference(&self, reference: &SecretRef) -> Option<String> {
        self.read().iter().find(|(_, s)| s.reference.as_ref() == Some(reference)).map(|(n, _)| n.clone())
    }

    /// Why `name` has no value, when it is registered without one.
    pub fn missing_reason(&self, name: &str) -> Option<String> {
        self.read()
            .get(name)
            .filter(|s| s.value.is_none())
            .map(|s| s.error.clone().unwrap_or_else(|| "not resolved yet".into()))
    }

    /// Names that currently have a value, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().iter().filter(|(_, s)| s.value.is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// Every registered name with its reference, sorted by name.
    pub fn references(&self) -> Vec<(String, SecretRef)> {
        self.read().iter().filter_map(|(n, s)| s.reference.clone().map(|r| (n.clone(), r))).collect()
    }

    pub fn status(&self) -> Vec<SlotStatus> {
        let now = SystemTime::now();
        self.read()
            .iter()
            .map(|(name, slot)| SlotStatus {
                name: name.clone(),
                reference: slot.reference.as_ref().map(ToString::to_string),
                source: slot.source,
                state: match (&slot.value, &slot.error) {
                    (None, _) => State::Missing,
                    (Some(_), Some(_)) => State::Stale,
                    (Some(_), None) => State::Ok,
                },
                age_s: slot.updated.and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs()),
                bytes: slot.value.as_ref().map(LockedBytes::len),
                locked: slot.value.as_ref().map(LockedBytes::is_locked),
                error: slot.error.clone(),
            })
            .collect()
    }

    /// Zeroizes and drops every value (at exit).
    pub fn clear(&self) {
        self.write().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolution_never_replaces_a_newer_local_value() {
        let store = SecretStore::new();
        store.register("A", Some(SecretRef::parse("op://v/i/a").unwrap()), Source::Watch);
        store.set_value("A", b"C0");
        let seen = store.generations()["A"];
        // A rotation is captured while the backend is being asked.
        store.set_value("A", b"C1");
        assert_eq!(store.apply_resolved("A", b"C0", seen), Applied::Superseded);
        assert!(!store.drop_value("A", "gone".into(), seen));
        assert_eq!(store.with_value("A", |v| v.to_vec()).unwrap(), b"C1");
        let seen = store.generation("A");
        assert_eq!(store.apply_resolved("A", b"C2", seen), Applied::Changed);
        assert!(store.generation("A") > seen);
    }

    #[test]
    fn values_replace_report_change_and_go_stale() {
        let store = SecretStore::new();
        assert!(store.register("A", Some(SecretRef::parse("op://v/i/a").unwrap()), Source::Env));
        assert!(!store.register("A", Some(SecretRef::parse("op://v/i/b").unwrap()), Source::Env));
        assert_eq!(store.names(), Vec::<String>::new());
        assert!(store.set_value("A", b"one"));
        assert!(!store.set_value("A", b"one"));
        assert!(store.set_value("A", b"s3cr3t-v2"));
        store.mark_failed("A", "network".into());
        let status = store.status();
        assert_eq!(status[0].state, State::Stale);
        assert_eq!(store.with_value("A", |v| v.to_vec()), Some(b"s3cr3t-v2".to_vec()));
        let seen = store.generation("A");
        assert_eq!(store.apply_resolved("A", b"s3cr3t-v2", seen), Applied::Unchanged);
        assert!(store.drop_value("A", "not found".into(), seen));
        assert_eq!(store.status()[0].state, State::Missing);
        assert!(format!("{status:?}").find("s3cr3t").is_none());
    }
}
