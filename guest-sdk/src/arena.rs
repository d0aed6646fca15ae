//! [`DecisionArena`]: the allocator for a policy whose instances each serve one evaluation.
//!
//! A policy with an init function is snapshotted after `sandgate_init`, and every evaluation
//! starts a fresh instance from that snapshot and is thrown away after one decision. The
//! system allocator (wasi-libc's dlmalloc) keeps that short life from paying off: its
//! bookkeeping for blocks nobody will free costs time, and it places new blocks in the holes
//! init left, all over the heap, so one decision dirties pages scattered over the memory, each
//! of which the host restores before the slot's next instance (and past a few dozen separate
//! runs of dirty pages, the host's reset gives the rest back to the kernel, to be faulted in
//! again by the next decision).
//!
//! `DecisionArena` is a region of the module's own static memory (`.bss`, below the heap, so
//! a decision's first dirty pages are the stack, the statics and then this one run) with a
//! pointer bump through it. It delegates to the system allocator while init runs; when init
//! has succeeded, `sandgate_init` begins it, so the snapshot holds it unused and
//! every evaluation starts with it empty. Freeing the most recent block gives it back (a
//! growing `Vec` or `String` is extended in place); other frees are no-ops, as the instance
//! is discarded whole. When the region is full, allocations go to the system allocator again,
//! so a decision that allocates more than the region holds is slower, never refused for it.
//! A policy without an init function never begins the arena and allocates from the system
//! allocator throughout.
//!
//! It pays where decisions allocate much (the built-in Rego guest decides a fifth faster); a
//! policy whose decisions allocate a few hundred bytes in a small heap is better off without
//! it, as the region only adds to the memory the host resets. Measure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The region of [`DecisionArena`] without a size parameter: 256 KiB.
pub const DEFAULT_BYTES: usize = 256 << 10;

/// Set by [`begin`]: from then on an installed arena serves allocations from its region.
static BEGUN: AtomicBool = AtomicBool::new(false);

/// A global allocator for policies with an init function, with a region of `BYTES`:
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: sandgate_guest::DecisionArena = sandgate_guest::DecisionArena::new();
/// ```
///
/// or `DecisionArena<{ 1 << 20 }>` for a 1 MiB region. Every evaluation allocates by bumping
/// a pointer through the region. The region is part of the module's memory from the start
/// (it counts towards `memory_limit_mb`); pages no evaluation touches cost nothing else. See
/// the module documentation and the SDK guide.
pub struct DecisionArena<const BYTES: usize = DEFAULT_BYTES> {
    /// The offset in `region` of the first free byte.
    next: AtomicUsize,
    region: UnsafeCell<[u8; BYTES]>,
}

// SAFETY: the region's bytes are only reached through blocks handed out by `bump`, which never
// hands out overlapping blocks (its offset moves by compare-and-exchange).
unsafe impl<const BYTES: usize> Sync for DecisionArena<BYTES> {}

impl<const BYTES: usize> DecisionArena<BYTES> {
    /// An arena with an empty region (all zeros, so the static lives in `.bss`).
    pub const fn new() -> DecisionArena<BYTES> {
        DecisionArena {
            next: AtomicUsize::new(0),
            region: UnsafeCell::new([0; BYTES]),
        }
    }

    /// The bytes of the region handed out so far (0 until `sandgate_init` has begun the arena).
    pub fn used(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// The size of the region.
    pub const fn capacity(&self) -> usize {
        BYTES
    }

    fn base(&self) -> usize {
        self.region.get().expose_provenance()
    }

    /// A block of `layout` from the region, or `None` when the arena has not begun or the
    /// region cannot hold it.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if !BEGUN.load(Ordering::Relaxed) {
            return None;
        }
        let base = self.base();
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + next).checked_next_multiple_of(layout.align())? - base;
            let after = start.checked_add(layout.size())?;
            if after > BYTES {
                return None;
            }
            // A guest has one thread and takes the first exchange; host tests may race.
            match self
                .next
                .compare_exchange_weak(next, after, Ordering::Relaxed, Ordering::Relaxed)
            {
                // SAFETY: `start + layout.size() <= BYTES`: the block lies inside the region.
                Ok(_) => return Some(unsafe { self.region.get().cast::<u8>().add(start) }),
                Err(now) => next = now,
            }
        }
    }

    /// The offset in the region of `ptr`, when the region holds it.
    fn offset(&self, ptr: *mut u8) -> Option<usize> {
        let offset = ptr.addr().checked_sub(self.base())?;
        (offset < BYTES).then_some(offset)
    }
}

impl Default for DecisionArena {
    fn default() -> DecisionArena {
        DecisionArena::new()
    }
}

// SAFETY: blocks from the region do not overlap (`next` only moves past a block handed out,
// and back only over the most recent block when it is freed), lie inside the region, which
// nothing else uses, and are aligned as asked; every other block is the system allocator's and
// goes back to it.
unsafe impl<const BYTES: usize> GlobalAlloc for DecisionArena<BYTES> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(ptr) => ptr,
            // SAFETY: the caller's contract is `System.alloc`'s.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(ptr) => {
                // SAFETY: `ptr` is a fresh block of `layout.size()` writable bytes; a block
                // given back and handed out again may hold old bytes, so it is cleared.
                unsafe { ptr.write_bytes(0, layout.size()) };
                ptr
            }
            // SAFETY: the caller's contract is `System.alloc_zeroed`'s.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match self.offset(ptr) {
            // The most recent block goes back; any other stays until the instance ends.
            Some(offset) => {
                let _ = self.next.compare_exchange(
                    offset + layout.size(),
                    offset,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            // SAFETY: a block outside the region came from `System` with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match self.offset(ptr) {
            Some(offset) => {
                // The most recent block grows or shrinks in place when the region holds it.
                let fits = offset
                    .checked_add(new_size)
                    .is_some_and(|after| after <= BYTES);
                if fits
                    && self
                        .next
                        .compare_exchange(
                            offset + layout.size(),
                            offset + new_size,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    return ptr;
                }
                if new_size <= layout.size() {
                    return ptr;
                }
            }
            None if !BEGUN.load(Ordering::Relaxed) => {
                // SAFETY: the caller's contract is `System.realloc`'s; the block is `System`'s.
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            None => {}
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, fits `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size, as the caller guarantees for `new_size`.
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap (`moved` is
            // a fresh block); `ptr` was allocated here with `layout`.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }
}

/// Begins the arena, when `sandgate_init` has succeeded: from now on an installed
/// [`DecisionArena`] serves allocations from its region.
pub(crate) fn begin() {
    BEGUN.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region small enough for a test's stack.
    const BYTES: usize = 16 << 10;

    fn begun() -> DecisionArena<BYTES> {
        begin();
        DecisionArena::new()
    }

    fn alloc(arena: &DecisionArena<BYTES>, size: usize, align: usize) -> (*mut u8, Layout) {
        let layout = Layout::from_size_align(size, align).expect("layout");
        // SAFETY: every test layout has a non-zero size.
        let ptr = unsafe { arena.alloc(layout) };
        assert!(!ptr.is_null());
        (ptr, layout)
    }

    #[test]
    fn blocks_follow_each_other_aligned_in_one_region() {
        let arena = begun();
        let (a, _) = alloc(&arena, 3, 1);
        let (b, _) = alloc(&arena, 8, 8);
        let (c, _) = alloc(&arena, 1, 1);
        assert_eq!(arena.offset(a), Some(0));
        assert!(arena.offset(b).is_some() && arena.offset(c).is_some());
        assert_eq!(b.addr() % 8, 0);
        assert_eq!(b.addr(), (a.addr() + 3).next_multiple_of(8));
        assert_eq!(c.addr(), b.addr() + 8);
        assert_eq!(arena.used(), c.addr() + 1 - a.addr());
    }

    #[test]
    fn the_most_recent_block_is_given_back_and_others_stay() {
        let arena = begun();
        let (a, layout_a) = alloc(&arena, 64, 8);
        let (b, layout_b) = alloc(&arena, 64, 8);
        let used = arena.used();
        // SAFETY: `a` is not the most recent block: freeing it changes nothing.
        unsafe { arena.dealloc(a, layout_a) };
        assert_eq!(arena.used(), used);
        // SAFETY: `b` is the most recent block: the next allocation takes its place.
        unsafe { arena.dealloc(b, layout_b) };
        assert_eq!(arena.used(), used - 64);
        let (again, _) = alloc(&arena, 32, 8);
        assert_eq!(again, b);
    }

    #[test]
    fn the_most_recent_block_grows_in_place_and_others_move_with_their_bytes() {
        let arena = begun();
        let (a, layout) = alloc(&arena, 4, 1);
        // SAFETY: `a` has 4 writable bytes; it is the most recent block.
        let grown = unsafe {
            a.copy_from_nonoverlapping(b"abcd".as_ptr(), 4);
            arena.realloc(a, layout, 1024)
        };
        assert_eq!(grown, a);
        let grown_layout = Layout::from_size_align(1024, 1).expect("layout");
        let (_, _) = alloc(&arena, 1, 1);
        // SAFETY: `grown` holds 1024 bytes, the first four written above; it is no longer the
        // most recent block, so growing it moves it.
        let moved = unsafe { arena.realloc(grown, grown_layout, 2048) };
        assert_ne!(moved, grown);
        assert!(arena.offset(moved).is_some());
        // SAFETY: `moved` holds at least 4 initialised bytes copied from `grown`.
        assert_eq!(unsafe { std::slice::from_raw_parts(moved, 4) }, b"abcd");
    }

    #[test]
    fn a_full_region_hands_over_to_the_system_allocator() {
        let arena = begun();
        let (inside, _) = alloc(&arena, BYTES - 16, 1);
        assert!(arena.offset(inside).is_some());
        let (outside, layout) = alloc(&arena, 64, 8);
        assert_eq!(arena.offset(outside), None);
        // SAFETY: `outside` came from `System` through the arena with `layout`.
        unsafe {
            outside.write_bytes(7, 64);
            arena.dealloc(outside, layout);
        }
    }

    #[test]
    fn a_zeroed_block_is_zero_even_where_a_freed_block_was() {
        let arena = begun();
        let (a, layout) = alloc(&arena, 128, 8);
        // SAFETY: `a` is the most recent block, 128 writable bytes.
        let zeroed = unsafe {
            a.write_bytes(0xAB, 128);
            arena.dealloc(a, layout);
            arena.alloc_zeroed(layout)
        };
        assert_eq!(zeroed, a);
        // SAFETY: `zeroed` holds 128 initialised bytes.
        assert!(
            unsafe { std::slice::from_raw_parts(zeroed, 128) }
                .iter()
                .all(|&b| b == 0)
        );
    }
}
