//! `AlignedBuf`: the one type that knows `O_DIRECT`'s alignment rules. Every
//! buffer handed to a device is one of these, so no caller does arithmetic on
//! addresses.
//!
//! Buffers are recycled: a freed buffer of up to [`POOL_MAX`] bytes goes
//! back to a pool per power-of-two size (at most [`POOL_BUDGET`] bytes idle
//! in all) and the next one of that size reuses it: zeroed again by
//! [`AlignedBuf::zeroed`], as it is by [`AlignedBuf::for_overwrite`], whose
//! caller fills every byte before reading any (a device read, a request's
//! payload, a copy). Fresh allocations and clearing cost more CPU than the
//! I/O itself (measured on bench nbd's 1 MiB first-touch write: page faults
//! and page clearing were a fifth of the worker's CPU before the pool; then
//! clearing buffers about to be overwritten was another third).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Memory alignment of every buffer: the page size, which satisfies any
/// device's logical block size.
pub const BUF_ALIGN: usize = 4096;

/// Largest buffer that is recycled; larger ones are freed.
pub const POOL_MAX: usize = 4 << 20;

/// Size classes: `BUF_ALIGN << i` bytes.
const CLASSES: usize = (POOL_MAX / BUF_ALIGN).trailing_zeros() as usize + 1;

/// Most bytes kept idle in the pool, all classes together: room for what
/// the write-back path of a volume cycles through (its held writes, the
/// copies of a batch), so a first-touch storm reuses buffers instead of
/// faulting in fresh pages.
pub const POOL_BUDGET: usize = 64 << 20;

/// Most idle buffers kept per class.
const POOL_COUNT: usize = 256;

/// Idle buffers by class, as addresses (each `BUF_ALIGN << class` bytes,
/// allocated with that layout).
static POOL: [Mutex<Vec<usize>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

/// Bytes of the buffers idle in [`POOL`].
static POOL_IDLE: AtomicUsize = AtomicUsize::new(0);

/// A buffer of class `class` from the pool, if one is idle.
fn pooled(class: usize) -> Option<NonNull<u8>> {
    let addr = POOL[class].lock().expect("buffer pool").pop()?;
    POOL_IDLE.fetch_sub(BUF_ALIGN << class, Ordering::Relaxed);
    Some(NonNull::new(addr as *mut u8).expect("pooled buffers are non-null"))
}

/// The class whose buffers hold `len` bytes, when such buffers are pooled.
fn class_of(len: usize) -> Option<usize> {
    let size = len.max(1).checked_next_power_of_two()?.max(BUF_ALIGN);
    (size <= POOL_MAX).then(|| (size / BUF_ALIGN).trailing_zeros() as usize)
}

/// An [`AlignedBuf`] could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError {
    /// The length asked for.
    pub len: usize,
    /// What the allocator refused; `None` when the size cannot be a layout.
    layout: Option<Layout>,
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot allocate a buffer of {} bytes", self.len)
    }
}

impl std::error::Error for AllocError {}

impl From<AllocError> for std::io::Error {
    /// `ENOMEM`, which block clients understand.
    fn from(_: AllocError) -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOMEM)
    }
}

/// A heap buffer aligned to [`BUF_ALIGN`], owned, zero-initialised, and
/// passed by value through the I/O backends (io_uring needs the memory to
/// live until the kernel is done with it).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// Taken from the pool: its bytes are those of its last use.
    reused: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through &self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes. Aborts the process when memory runs
    /// out, like `Vec`; where a request from outside decides the size, use
    /// [`try_zeroed`](AlignedBuf::try_zeroed).
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf::try_zeroed(len).unwrap_or_else(|e| match e.layout {
            Some(layout) => std::alloc::handle_alloc_error(layout),
            None => panic!("{e}"),
        })
    }

    /// A zeroed buffer of `len` bytes, or an error when the allocator cannot
    /// give that much (address space or memory limit reached).
    pub fn try_zeroed(len: usize) -> Result<AlignedBuf, AllocError> {
        let mut b = AlignedBuf::try_for_overwrite(len)?;
        if b.reused {
            b.fill(0);
        }
        Ok(b)
    }

    /// A buffer of `len` bytes for the caller to fill whole before it reads
    /// any: a recycled one keeps the bytes of its last use (nothing is
    /// cleared twice), a fresh one is zero. Aborts when memory runs out,
    /// like [`zeroed`](AlignedBuf::zeroed).
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        AlignedBuf::try_for_overwrite(len).unwrap_or_else(|e| match e.layout {
            Some(layout) => std::alloc::handle_alloc_error(layout),
            None => panic!("{e}"),
        })
    }

    /// [`for_overwrite`](AlignedBuf::for_overwrite), or an error when the
    /// allocator cannot give that much.
    pub fn try_for_overwrite(len: usize) -> Result<AlignedBuf, AllocError> {
        if let Some(class) = class_of(len) {
            let cap = BUF_ALIGN << class;
            if let Some(ptr) = pooled(class) {
                return Ok(AlignedBuf {
                    ptr,
                    len,
                    cap,
                    reused: true,
                });
            }
            return AlignedBuf::fresh(len, cap);
        }
        let cap = len
            .checked_next_multiple_of(BUF_ALIGN)
            .ok_or(AllocError { len, layout: None })?;
        AlignedBuf::fresh(len, cap)
    }

    fn fresh(len: usize, cap: usize) -> Result<AlignedBuf, AllocError> {
        let layout = Layout::from_size_align(cap, BUF_ALIGN)
            .map_err(|_| AllocError { len, layout: None })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(AllocError {
            len,
            layout: Some(layout),
        })?;
        Ok(AlignedBuf {
            ptr,
            len,
            cap,
            reused: false,
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::for_overwrite(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Shortens or lengthens the buffer within its capacity; new bytes are
    /// zero.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        if len > self.len {
            let old = self.len;
            self.len = len;
            self[old..].fill(0);
        } else {
            self.len = len;
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, all initialised (zeroed
        // when allocated, only written since).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap.is_power_of_two()
            && let Some(class) = class_of(self.cap)
            && BUF_ALIGN << class == self.cap
        {
            let mut idle = POOL[class].lock().expect("buffer pool");
            if idle.len() < POOL_COUNT
                && POOL_IDLE
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n + self.cap <= POOL_BUDGET).then_some(n + self.cap)
                    })
                    .is_ok()
            {
                idle.push(self.ptr.as_ptr() as usize);
                return;
            }
        }
        let layout = Layout::from_size_align(self.cap, BUF_ALIGN).expect("layout was valid");
        // SAFETY: allocated in `fresh` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn recycled_buffers_come_back_zeroed() {
        for len in [4096, 16384, 100_000, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            b.fill(0xee);
            let cap = b.capacity();
            drop(b);
            // Whether or not this one is the recycled buffer (other tests
            // run beside), it is aligned, zeroed and of the same class.
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.capacity(), cap);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0), "{len}");
        }
        // Beyond the pool: exact page multiples, freed on drop.
        let b = AlignedBuf::zeroed(POOL_MAX + 1);
        assert_eq!(b.capacity(), POOL_MAX + BUF_ALIGN);
    }

    #[test]
    fn zeroed_buffers_are_zero_after_dirty_ones_went_back_to_the_pool() {
        // Buffers for overwrite go back to the pool with their bytes; a
        // zeroed one taken after them (recycled or not) is still all zero.
        let dirty: Vec<AlignedBuf> = (0..32)
            .map(|_| {
                let mut b = AlignedBuf::for_overwrite(16384);
                assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
                assert_eq!(b.len(), 16384);
                b.fill(0xab);
                b
            })
            .collect();
        drop(dirty);
        for _ in 0..32 {
            let b = AlignedBuf::zeroed(16384);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_budget_idle() {
        let n = POOL_BUDGET / (1 << 20) + 16;
        let bufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::for_overwrite(1 << 20)).collect();
        drop(bufs);
        let idle = POOL_IDLE.load(Ordering::Relaxed);
        assert!(idle <= POOL_BUDGET, "{idle} bytes idle");
        let counted: usize = POOL
            .iter()
            .enumerate()
            .map(|(c, p)| p.lock().unwrap().len() * (BUF_ALIGN << c))
            .sum();
        assert!(counted <= POOL_BUDGET, "{counted} bytes pooled");
    }

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        // More than any address space holds: the allocator says no.
        let e = AlignedBuf::try_zeroed(1 << 62).unwrap_err();
        assert_eq!(e.len, 1 << 62);
        assert_eq!(std::io::Error::from(e).raw_os_error(), Some(libc::ENOMEM));
        // Not even a layout.
        assert!(AlignedBuf::try_zeroed(usize::MAX).is_err());
        assert!(AlignedBuf::try_zeroed(usize::MAX - BUF_ALIGN).is_err());
        // And the allocator still works afterwards.
        assert_eq!(AlignedBuf::try_zeroed(8192).unwrap().len(), 8192);
    }

    #[test]
    fn set_len_zeroes_regrown_bytes() {
        let mut b = AlignedBuf::from_slice(&[7u8; 4096]);
        b.set_len(100);
        b.set_len(4096);
        assert!(b[..100].iter().all(|&x| x == 7));
        assert!(b[100..].iter().all(|&x| x == 0));
    }
}
