//! Locked, zeroize-on-drop byte buffers: where every secret value lives.
//!
//! Each [`LockedBytes`] owns its own anonymous mapping, so locking and unlocking never
//! touches a page shared with another value (`munlock` is not reference counted). The pages
//! are `mlock`ed (best effort: failures are counted and reported, never fatal), marked
//! `MADV_DONTDUMP`, and overwritten with zeros before they are unmapped.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use secrecy::ExposeSecret;
use zeroize::Zeroize;

/// Bytes currently held in locked pages, for STATUS and the start-up memlock report.
static LOCKED_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Bytes that were wanted in locked pages but could not be locked (RLIMIT_MEMLOCK).
static UNLOCKED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Memory-locking totals of the whole process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockStats {
    pub locked_bytes: usize,
    pub unlocked_bytes: usize,
}

pub fn lock_stats() -> LockStats {
    LockStats {
        locked_bytes: LOCKED_BYTES.load(Ordering::Relaxed),
        unlocked_bytes: UNLOCKED_BYTES.load(Ordering::Relaxed),
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

/// A secret value in its own locked, non-dumpable mapping. Never printed by `Debug`.
pub struct LockedBytes {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    locked: bool,
}

// SAFETY: LockedBytes exclusively owns its mapping; access goes through &self/&mut self.
unsafe impl Send for LockedBytes {}
// SAFETY: shared access is read-only.
unsafe impl Sync for LockedBytes {}

impl LockedBytes {
    /// Copies `value` into a fresh locked mapping. The caller zeroizes its own copy.
    pub fn new(value: &[u8]) -> LockedBytes {
        if value.is_empty() {
            return LockedBytes { ptr: NonNull::dangling(), len: 0, map_len: 0, locked: false };
        }
        let page = page_size();
        let map_len = value.len().div_ceil(page) * page;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            // Out of address space: nothing sensible is left to do for a secret store.
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(map_len, page).expect("page layout"));
        }
        // SAFETY: raw is a valid mapping of map_len bytes owned by us.
        let locked = unsafe {
            // Keep secrets out of core dumps even when dumps are somehow re-enabled.
            libc::madvise(raw, map_len, libc::MADV_DONTDUMP);
            libc::mlock(raw, map_len) == 0
        };
        if locked {
            LOCKED_BYTES.fetch_add(map_len, Ordering::Relaxed);
        } else {
            UNLOCKED_BYTES.fetch_add(map_len, Ordering::Relaxed);
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap never returns null on success");
        // SAFETY: the mapping is at least value.len() bytes and does not overlap value.
        unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), ptr.as_ptr(), value.len()) };
        LockedBytes { ptr, len: value.len(), map_len, locked }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this value's pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl ExposeSecret<[u8]> for LockedBytes {
    fn expose_secret(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for as long as self lives (dangling only when len == 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Zeroize for LockedBytes {
    fn zeroize(&mut self) {
        if self.map_len > 0 {
            // SAFETY: ptr is valid for map_len writable bytes.
            let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.map_len) };
            all.zeroize();
        }
    }
}

impl Drop for LockedBytes {
    fn drop(&mut self) {
        if self.map_len == 0 {
            return;
        }
        self.zeroize();
        // SAFETY: the mapping is ours and no reference to it outlives self.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.map_len);
                LOCKED_BYTES.fetch_sub(self.map_len, Ordering::Relaxed);
            } else {
                UNLOCKED_BYTES.fetch_sub(self.map_len, Ordering::Relaxed);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.map_len);
        }
    }
}

impl std::fmt::Debug for LockedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedBytes([REDACTED; {} bytes])", self.len)
    }
}

/// Appends to a buffer that may hold secret bytes without leaving copies behind: when the
/// buffer must grow, the old allocation is zeroized (a plain `Vec` growth frees it as is).
pub fn extend_zeroizing(buf: &mut zeroize::Zeroizing<Vec<u8>>, data: &[u8]) {
    append_wiping(buf, &[data]);
}

/// Appends `parts` to a buffer that may hold secret bytes, growing it at most once and wiping
/// the allocation it leaves (the one implementation behind [`extend_zeroizing`] and the
/// protocol's reply encoding).
pub fn append_wiping(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    let wanted = buf.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    if wanted > buf.capacity() {
        let mut grown = Vec::with_capacity(wanted.next_power_of_two().max(256));
        grown.extend_from_slice(buf);
        // `Vec::zeroize` wipes the whole capacity, then the old allocation is freed.
        zeroize::Zeroize::zeroize(buf);
        *buf = grown;
    }
    for part in parts {
        buf.extend_from_slice(part);
    }
}

/// An `io::Write` into a zeroizing buffer that wipes every allocation it outgrows (through
/// [`extend_zeroizing`]): what a serializer writing a secret (item JSON, the sealed cache's
/// plaintext, a reply) writes into, so no half-grown copy is freed as it is.
#[derive(Default)]
pub struct ZeroizingWriter(pub zeroize::Zeroizing<Vec<u8>>);

impl ZeroizingWriter {
    pub fn with_capacity(capacity: usize) -> ZeroizingWriter {
        ZeroizingWriter(zeroize::Zeroizing::new(Vec::with_capacity(capacity)))
    }
}

impl std::io::Write for ZeroizingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        extend_zeroizing(&mut self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exact_bytes_and_redacts_debug() {
        let value = b"line one\nline two\0\xff";
        let secret = LockedBytes::new(value);
        assert_eq!(secret.expose_secret(), value);
        assert_eq!(format!("{secret:?}"), "LockedBytes([REDACTED; 19 bytes])");
    }

    #[test]
    fn empty_value_needs_no_mapping() {
        let secret = LockedBytes::new(b"");
        assert!(secret.is_empty());
        assert_eq!(secret.expose_secret(), b"");
    }

    #[test]
    fn large_values_span_pages() {
        let value = vec![0xabu8; 3 * 4096 + 17];
        let secret = LockedBytes::new(&value);
        assert_eq!(secret.expose_secret(), &value[..]);
    }
}
