//! The shared state of the attached probes and the ring-buffer consumer: a
//! task reads the few events the programs send (a syscall outside a
//! policy's expected set, a slot whose tallies were full) every
//! [`DRAIN_EVERY`], and once a second closes the accounts of invocations
//! that never ended (their future was dropped). Accounts are folded and
//! reported on the evaluation path, not here.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};
use sandgate_probes_common::{Event, ExpectedSet, MAX_EXPECTED, event, stat};

use super::account::Account;
use super::slots::{Slots, UNCHECKED};
use super::{Counters, Expected};
use crate::fetch::error_chain;

/// How often the consumer reads the ring buffer. The programs never wake
/// it, and a normal decision sends nothing, so this only bounds how late
/// an unusual event is counted.
pub(super) const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// Open accounts are spread over this many locks, so that concurrent
/// invocations folding their stretches rarely wait for each other.
pub(super) const SHARDS: usize = 16;

/// State shared by the consumer task, the evaluation path and the reports.
pub(super) struct Shared {
    pub(super) accounts: [Mutex<HashMap<u64, Account>>; SHARDS],
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) slots: Slots,
    pub(super) expected: Mutex<ExpectedSets>,
    pub(super) received: AtomicU64,
    pub(super) watched: AtomicU64,
    pub(super) reported: AtomicU64,
    pub(super) incomplete: AtomicU64,
    pub(super) unexpected: AtomicU64,
    /// Syscalls counted in an invocation's totals but not by name: its
    /// slot's tallies were full.
    pub(super) untallied: AtomicU64,
    /// Operations the LSM programs refused, over all invocations.
    pub(super) denied: AtomicU64,
    /// The LSM programs' maps, when `[ebpf] enforce` attached them.
    pub(super) lsm: Option<super::enforce::Lsm>,
    /// Keeps the programs loaded and attached.
    pub(super) _ebpf: Mutex<Ebpf>,
}

impl Shared {
    pub(super) fn lock_accounts(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Account>> {
        self.accounts[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kernel_stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    pub(super) fn counters(&self) -> Counters {
        let open = self
            .accounts
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len() as u64
            })
            .sum();
        Counters {
            events_sent: self.kernel_stat(stat::SENT),
            events_received: self.received.load(Ordering::Relaxed),
            events_dropped: self.kernel_stat(stat::DROPPED),
            syscalls_untracked: self.kernel_stat(stat::UNTRACKED),
            syscalls_untallied: self.untallied.load(Ordering::Relaxed),
            stretches_unslotted: self.slots.unslotted.load(Ordering::Relaxed),
            slots_in_use: self.slots.in_use(),
            invocations_watched: self.watched.load(Ordering::Relaxed),
            invocations_reported: self.reported.load(Ordering::Relaxed),
            invocations_incomplete: self.incomplete.load(Ordering::Relaxed),
            invocations_open: open,
            unexpected_syscalls: self.unexpected.load(Ordering::Relaxed),
            kernel_denied: self.denied.load(Ordering::Relaxed),
        }
    }

    /// The index of `expected` in the kernel's `EXPECTED` map, writing it
    /// there the first time; [`UNCHECKED`] when the map is full.
    pub(super) fn expected_index(&self, expected: &Expected) -> u32 {
        if let Some(&index) = expected.kernel_index.get() {
            return index;
        }
        let index = self
            .expected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .index_of(expected.kernel_sets());
        *expected.kernel_index.get_or_init(|| index)
    }

    /// Counts every event waiting in the ring buffer.
    fn drain(&self, ring: &mut RingBuf<MapData>) {
        let mut received = 0;
        while let Some(item) = ring.next() {
            received += 1;
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the programs write whole `Event`s (plain integers);
            // the length was checked and the read does not assume alignment.
            let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            match record.kind {
                event::UNEXPECTED => tracing::debug!(
                    invocation = record.invocation,
                    syscall = %super::expected::name(record.nr),
                    phase = record.phase,
                    "the kernel saw a syscall outside the policy's expected set"
                ),
                event::OVERFLOW => tracing::debug!(
                    invocation = record.invocation,
                    "a slot's syscall tallies were full"
                ),
                _ => {}
            }
        }
        self.received.fetch_add(received, Ordering::Relaxed);
    }

    /// Closes the accounts whose invocation never ended (its future was
    /// dropped, e.g. the client went away).
    fn overdue(&self) -> Vec<Account> {
        let now = Instant::now();
        let mut closed = Vec::new();
        for shard in &self.accounts {
            let mut accounts = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ids: Vec<u64> = accounts
                .iter()
                .filter(|(_, a)| a.expires <= now)
                .map(|(id, _)| *id)
                .collect();
            closed.extend(ids.iter().filter_map(|id| accounts.remove(id)));
        }
        closed
    }

    pub(super) fn report(&self, account: Account, ended: bool) {
        let complete = ended && account.is_complete();
        let counter = if complete {
            &self.reported
        } else {
            &self.incomplete
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.untallied
            .fetch_add(account.untallied, Ordering::Relaxed);
        let summary = account.summarise();
        self.unexpected
            .fetch_add(summary.unexpected.len() as u64, Ordering::Relaxed);
        self.denied
            .fetch_add(account.refusals.len() as u64, Ordering::Relaxed);
        summary.emit(account, complete);
    }
}

/// The expected sets written to the kernel, two per policy index.
pub(super) struct ExpectedSets {
    map: Array<MapData, ExpectedSet>,
    written: Vec<[ExpectedSet; 2]>,
}

impl ExpectedSets {
    pub(super) fn new(map: Array<MapData, ExpectedSet>) -> ExpectedSets {
        ExpectedSets {
            map,
            written: Vec::new(),
        }
    }

    /// The policy index of `sets`, written to the map if new.
    fn index_of(&mut self, sets: [ExpectedSet; 2]) -> u32 {
        if let Some(index) = self.written.iter().position(|known| *known == sets) {
            return index as u32;
        }
        let index = self.written.len() as u32;
        if (index + 1) * 2 > MAX_EXPECTED {
            tracing::warn!(
                "the kernel's table of expected syscall sets is full: unexpected syscalls of \
                 a new policy are found by the daemon alone, without a kernel event"
            );
            return UNCHECKED;
        }
        for (class, set) in sets.iter().enumerate() {
            if let Err(e) = self.map.set(index * 2 + class as u32, set, 0) {
                tracing::warn!(
                    "cannot write an expected syscall set to the kernel: {}",
                    error_chain(&e)
                );
                return UNCHECKED;
            }
        }
        self.written.push(sets);
        index
    }
}

/// Reads the ring buffer every [`DRAIN_EVERY`] and once a second closes
/// the accounts whose invocation never ended.
pub(super) async fn consume(shared: Arc<Shared>, mut ring: RingBuf<MapData>) {
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    loop {
        tick.tick().await;
        shared.drain(&mut ring);
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            for account in shared.overdue() {
                shared.report(account, false);
            }
        }
    }
}
