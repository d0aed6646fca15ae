//! The per-thread slots: the `SLOTS` array map, memory-mapped into the
//! daemon, one [`Slot`] per worker thread that runs guest invocations.
//!
//! A thread registers once, the first time it runs a stretch of an
//! invocation: it takes a free slot and writes its thread id → slot index
//! into `THREADS` (the only map update it ever makes), and gives the slot
//! back when it exits. From then on it publishes the invocation it runs,
//! and the phase, with plain stores into its slot, and reads the tallies
//! the programs kept there with plain loads: no kernel crossing per
//! decision.
//!
//! aya 0.14 has no way to map an array map's memory, so the map's file
//! descriptor is mapped here with `mmap(2)` (the kernel allows it for an
//! array created with `BPF_F_MMAPABLE`, from Linux 5.5).

use std::{
    cell::RefCell,
    ptr::{self, NonNull, addr_of, addr_of_mut},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering, compiler_fence},
    },
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use sandgate_probes_common::{
    Denial, MAX_DENIALS, MAX_SLOTS, NO_POLICY, Slot, TALLIES, Tally, phase, tally_pair,
};

use super::ATTACHED;
use crate::fetch::error_chain;

/// The mapped `SLOTS` array and the bookkeeping of who holds which slot.
pub(super) struct Slots {
    base: NonNull<Slot>,
    len: usize,
    threads: Mutex<BpfHashMap<MapData, u32, u32>>,
    free: Mutex<Vec<u32>>,
    in_use: AtomicU64,
    /// Stretches run on a thread that could not get a slot.
    pub(super) unslotted: AtomicU64,
    /// Keeps the map alive for as long as it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is shared memory; each slot is only touched by the
// thread holding it (and by the programs, in that thread's syscalls).
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

impl Slots {
    /// Maps `map` (the `SLOTS` array) and takes `threads` (`THREADS`).
    pub(super) fn map(map: MapData, threads: aya::maps::Map) -> Result<Slots, String> {
        let len = std::mem::size_of::<Slot>()
            .checked_mul(MAX_SLOTS as usize)
            .ok_or("the slot array's size overflows")?;
        // SAFETY: a new shared mapping of the map's memory; nothing else in
        // the process refers to it yet.
        let base = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                map.fd(),
                0,
            )
        }
        .map_err(|e| {
            format!(
                "cannot map the SLOTS array into memory ({e}); the kernel needs \
                 BPF_F_MMAPABLE array maps (Linux 5.5 or later)"
            )
        })?;
        let base = NonNull::new(base.cast::<Slot>()).ok_or("mmap returned a null pointer")?;
        let threads = BpfHashMap::try_from(threads)
            .map_err(|e| format!("map THREADS: {}", error_chain(&e)))?;
        let slots = Slots {
            base,
            len: MAX_SLOTS as usize,
            threads: Mutex::new(threads),
            free: Mutex::new((0..MAX_SLOTS).rev().collect()),
            in_use: AtomicU64::new(0),
            unslotted: AtomicU64::new(0),
            _map: map,
        };
        for index in 0..slots.len {
            // SAFETY: in bounds of the mapping; no thread holds a slot yet.
            unsafe {
                slots
                    .base
                    .as_ptr()
                    .add(index)
                    .write_volatile(Slot::default())
            };
        }
        Ok(slots)
    }

    pub(super) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// A free slot for thread `tid`, registered in `THREADS`.
    fn register(&self, tid: u32) -> Option<Registration> {
        let index = self.lock_free().pop()?;
        let inserted = self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tid, index, 0);
        if let Err(e) = inserted {
            tracing::warn!(
                tid,
                "an eBPF slot could not be registered for a worker thread; its stretches \
                 of invocations are not traced: {}",
                error_chain(&e)
            );
            self.lock_free().push(index);
            return None;
        }
        self.in_use.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `index` < MAX_SLOTS, inside the mapping.
        let slot = unsafe { self.base.as_ptr().add(index as usize) };
        Some(Registration { tid, index, slot })
    }

    fn release(&self, registration: &Registration) {
        let removed = self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&registration.tid);
        if removed.is_ok() {
            // SAFETY: the thread giving it back no longer runs stretches,
            // and no other thread id maps to the slot any more.
            unsafe { registration.slot.write_volatile(Slot::default()) };
            self.lock_free().push(registration.index);
        }
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length.
        let _ = unsafe {
            rustix::mm::munmap(
                self.base.as_ptr().cast(),
                self.len * std::mem::size_of::<Slot>(),
            )
        };
    }
}

/// This thread's hold on a slot; given back when the thread exits.
struct Registration {
    tid: u32,
    index: u32,
    slot: *mut Slot,
}

enum Held {
    /// Not asked yet.
    Unasked,
    Holding(Registration),
    /// No slot was free (or probes are off): this thread runs untraced.
    Refused,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::Holding(registration) = self
            && let Some(shared) = ATTACHED.get()
        {
            shared.slots.release(registration);
        }
    }
}

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held::Unasked) };
}

/// The calling thread's slot, registering one the first time.
fn current() -> Option<*mut Slot> {
    HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        match &*held {
            Held::Holding(registration) => Some(registration.slot),
            Held::Refused => None,
            Held::Unasked => {
                let registration = ATTACHED.get().and_then(|shared| {
                    shared
                        .slots
                        .register(rustix::thread::gettid().as_raw_nonzero().get() as u32)
                });
                match registration {
                    Some(registration) => {
                        let slot = registration.slot;
                        *held = Held::Holding(registration);
                        Some(slot)
                    }
                    None => {
                        *held = Held::Refused;
                        None
                    }
                }
            }
        }
    })
    .ok()
    .flatten()
}

/// A stretch of an invocation running on this thread: from [`Stretch::begin`]
/// until it is dropped, the programs charge the thread's syscalls to it.
pub(super) struct Stretch {
    slot: *mut Slot,
}

impl Stretch {
    /// Publishes `invocation` (of the policy whose expected set is at
    /// `policy`, and whose grants are at `grants` in the enforcement maps)
    /// in this thread's slot; `None` when the thread has no slot.
    pub(super) fn begin(invocation: u64, policy: u32, grants: u32) -> Option<Stretch> {
        let slot = current()?;
        // SAFETY: the slot is this thread's; the programs only write it in
        // this thread's syscalls, and none is in progress.
        unsafe {
            addr_of_mut!((*slot).phase).write_volatile(phase::GUEST);
            addr_of_mut!((*slot).policy).write_volatile(policy);
            addr_of_mut!((*slot).grants).write_volatile(grants);
            compiler_fence(Ordering::SeqCst);
            addr_of_mut!((*slot).invocation).write_volatile(invocation);
        }
        compiler_fence(Ordering::SeqCst);
        Some(Stretch { slot })
    }

    /// Ends the stretch and takes what the programs tallied during it.
    pub(super) fn finish(self) -> Option<Taken> {
        let slot = self.slot;
        std::mem::forget(self);
        // SAFETY: as in `begin`.
        unsafe { end(slot) }
    }
}

impl Drop for Stretch {
    /// A stretch left by unwinding: stop charging the thread's syscalls.
    fn drop(&mut self) {
        // SAFETY: as in `begin`; what was tallied is cleared with it.
        let _ = unsafe { end(self.slot) };
    }
}

/// Clears the slot's invocation and takes its tallies.
///
/// # Safety
/// `slot` is the calling thread's.
unsafe fn end(slot: *mut Slot) -> Option<Taken> {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller's promise: this thread's slot, no syscall in
    // progress, so the programs are not writing it.
    unsafe {
        addr_of_mut!((*slot).invocation).write_volatile(0);
        compiler_fence(Ordering::SeqCst);
        let total = addr_of!((*slot).total).read_volatile();
        let denied = addr_of!((*slot).denied).read_volatile();
        if total == 0 && denied == 0 {
            return None;
        }
        let taken = Taken {
            total,
            total_ns: addr_of!((*slot).total_ns).read_volatile(),
            overflow: addr_of!((*slot).overflow).read_volatile(),
            tallies: addr_of!((*slot).tallies).read_volatile(),
            denied,
            denials: if denied == 0 {
                [Denial::default(); MAX_DENIALS]
            } else {
                addr_of!((*slot).denials).read_volatile()
            },
        };
        if denied != 0 {
            addr_of_mut!((*slot).denied).write_volatile(0);
        }
        addr_of_mut!((*slot).total).write_volatile(0);
        addr_of_mut!((*slot).total_ns).write_volatile(0);
        addr_of_mut!((*slot).overflow).write_volatile(0);
        for (index, tally) in taken.tallies.iter().enumerate() {
            if tally.key != 0 {
                addr_of_mut!((*slot).tallies[index]).write_volatile(Tally::default());
            }
        }
        Some(taken)
    }
}

/// Runs `work` (the daemon's own bookkeeping, such as a map update) with
/// this thread's slot showing no invocation, so that the programs neither
/// charge nor refuse what it does; the invocation is restored after.
pub(super) fn outside<T>(work: impl FnOnce() -> T) -> T {
    let slot = HELD
        .try_with(|held| match &*held.borrow() {
            Held::Holding(registration) => Some(registration.slot),
            _ => None,
        })
        .ok()
        .flatten();
    let Some(slot) = slot else {
        return work();
    };
    compiler_fence(Ordering::SeqCst);
    // SAFETY: this thread's slot; no syscall in progress.
    let invocation = unsafe { addr_of!((*slot).invocation).read_volatile() };
    // SAFETY: as above.
    unsafe { addr_of_mut!((*slot).invocation).write_volatile(0) };
    compiler_fence(Ordering::SeqCst);
    let out = work();
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { addr_of_mut!((*slot).invocation).write_volatile(invocation) };
    compiler_fence(Ordering::SeqCst);
    out
}

/// Sets the phase this thread's current stretch is in, if it has a slot.
pub(super) fn set_phase(value: u32) {
    let Ok(Some(slot)) = HELD.try_with(|held| match &*held.borrow() {
        Held::Holding(registration) => Some(registration.slot),
        _ => None,
    }) else {
        return;
    };
    compiler_fence(Ordering::SeqCst);
    // SAFETY: this thread's slot; no syscall in progress.
    unsafe { addr_of_mut!((*slot).phase).write_volatile(value) };
    compiler_fence(Ordering::SeqCst);
}

/// What the programs tallied in one stretch.
pub(super) struct Taken {
    pub(super) total: u64,
    pub(super) total_ns: u64,
    /// Syscalls counted in `total` but in no tally (the table was full).
    pub(super) overflow: u64,
    tallies: [Tally; TALLIES],
    /// Operations the LSM programs refused; the first few described.
    pub(super) denied: u32,
    denials: [Denial; MAX_DENIALS],
}

impl Taken {
    /// (syscall nr, phase, count, ns) of each tally.
    pub(super) fn tallies(&self) -> impl Iterator<Item = (u32, u32, u64, u64)> + '_ {
        self.tallies.iter().filter(|t| t.key != 0).map(|t| {
            let (nr, phase) = tally_pair(t.key);
            (nr, phase, u64::from(t.count), t.ns)
        })
    }

    /// The refusals described, in order.
    pub(super) fn denials(&self) -> &[Denial] {
        &self.denials[..(self.denied as usize).min(MAX_DENIALS)]
    }
}

/// The index a policy is given when its expected set is not in the kernel.
pub(super) const UNCHECKED: u32 = NO_POLICY;

#[cfg(test)]
mod tests {
    use sandgate_probes_common::{tally_home, tally_key};

    use super::*;

    #[test]
    fn ending_a_stretch_takes_the_tallies_and_leaves_the_slot_clear() {
        let mut slot = Box::new(Slot::default());
        slot.invocation = 7;
        // What the programs leave after three syscalls in two pairs.
        for (nr, phase, count, ns) in [(202, phase::GUEST, 2, 300), (16, phase::TEARDOWN, 1, 50)] {
            let key = tally_key(nr, phase);
            slot.tallies[tally_home(key)] = Tally { key, count, ns };
        }
        slot.total = 3;
        slot.total_ns = 350;
        slot.overflow = 0;
        let pointer: *mut Slot = &mut *slot;
        // SAFETY: a slot only this test touches.
        let taken = unsafe { end(pointer) }.expect("tallies");
        assert_eq!((taken.total, taken.total_ns, taken.overflow), (3, 350, 0));
        let mut pairs: Vec<_> = taken.tallies().collect();
        pairs.sort_unstable();
        assert_eq!(
            pairs,
            [(16, phase::TEARDOWN, 1, 50), (202, phase::GUEST, 2, 300)]
        );
        let cleared = Slot {
            policy: slot.policy,
            phase: slot.phase,
            ..Slot::default()
        };
        assert_eq!(*slot, cleared, "invocation, totals and tallies are cleared");
        // SAFETY: as above.
        assert!(unsafe { end(pointer) }.is_none(), "nothing twice");
    }
}
