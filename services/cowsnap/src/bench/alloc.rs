//! The counting global allocator: every heap byte the process requests is
//! counted while it is live, so the store benchmark can tell how much RAM
//! the engine keeps per loaded exception. `main.rs` installs it.
//!
//! Counts are of requested bytes (`Layout::size`), not of what the system
//! allocator rounds them up to. The peak is tracked only inside a
//! [`PeakWindow`], so the rest of the process pays one relaxed atomic add per
//! allocation and nothing more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, counting live bytes.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TRACK_PEAK: AtomicBool = AtomicBool::new(false);
/// Set by the first allocation through [`CountingAlloc`]: tells whether it is
/// the global allocator at all.
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    if TRACK_PEAK.load(Ordering::Relaxed) {
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters have no
// effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Heap bytes allocated and not yet freed, over the whole process; `None`
/// when [`CountingAlloc`] is not the global allocator.
pub fn live_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}

/// Tracks the highest live byte count from its creation until
/// [`PeakWindow::finish`]. One window at a time.
pub struct PeakWindow {
    _private: (),
}

impl PeakWindow {
    pub fn start() -> PeakWindow {
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        TRACK_PEAK.store(true, Ordering::Relaxed);
        PeakWindow { _private: () }
    }

    /// The highest live byte count seen in the window.
    pub fn finish(self) -> usize {
        TRACK_PEAK.store(false, Ordering::Relaxed);
        PEAK.load(Ordering::Relaxed)
            .max(LIVE.load(Ordering::Relaxed))
    }
}

impl Drop for PeakWindow {
    fn drop(&mut self) {
        TRACK_PEAK.store(false, Ordering::Relaxed);
    }
}
