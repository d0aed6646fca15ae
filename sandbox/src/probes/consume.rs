//! The ring-buffer consumer: a task reads the programs' events every
//! [`DRAIN_EVERY`], folds them into the open invocations' accounts and
//! reports each account when its end event arrives (or when it is overdue).
//! [`attach`](super::load::attach) starts it; `watch`/`end` open and close accounts.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use sandgate_probes_common::{Event, event, stat};

use super::Counters;
use super::account::Account;

/// How often the consumer reads the ring buffer. The programs never wake
/// it (a wakeup per invocation costs more than the rest of the probes), so
/// a decision's kernel span follows it by at most this much.
pub(super) const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// State shared by the consumer task, the evaluation path and the reports.
pub(super) struct Shared {
    pub(super) accounts: Mutex<HashMap<u64, Account>>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) received: AtomicU64,
    pub(super) watched: AtomicU64,
    pub(super) reported: AtomicU64,
    pub(super) incomplete: AtomicU64,
    pub(super) unexpected: AtomicU64,
    /// Keeps the programs loaded and attached.
    pub(super) _ebpf: Mutex<Ebpf>,
}

impl Shared {
    pub(super) fn lock_accounts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Account>> {
        self.accounts
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
        Counters {
            events_sent: self.kernel_stat(stat::SENT),
            events_received: self.received.load(Ordering::Relaxed),
            events_dropped: self.kernel_stat(stat::DROPPED),
            syscalls_untracked: self.kernel_stat(stat::UNTRACKED),
            invocations_watched: self.watched.load(Ordering::Relaxed),
            invocations_reported: self.reported.load(Ordering::Relaxed),
            invocations_incomplete: self.incomplete.load(Ordering::Relaxed),
            invocations_open: self.lock_accounts().len() as u64,
            unexpected_syscalls: self.unexpected.load(Ordering::Relaxed),
        }
    }

    /// Folds every event waiting in the ring buffer; returns the accounts
    /// whose invocations ended.
    fn drain(&self, ring: &mut RingBuf<MapData>) -> Vec<Account> {
        let mut ended = Vec::new();
        let mut received = 0;
        let mut accounts = self.lock_accounts();
        while let Some(item) = ring.next() {
            received += 1;
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the programs write whole `Event`s (plain integers);
            // the length was checked and the read does not assume alignment.
            let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            match record.kind {
                event::SYSCALL => {
                    if let Some(account) = accounts.get_mut(&record.invocation) {
                        let entry = account
                            .syscalls
                            .entry((record.nr, record.phase))
                            .or_default();
                        entry.0 += 1;
                        entry.1 += record.duration_ns;
                    }
                }
                event::WASI_DENIED => {
                    if let Some(account) = accounts.get_mut(&record.invocation) {
                        account.wasi_denied.push(record.nr);
                    }
                }
                event::END => {
                    if let Some(account) = accounts.remove(&record.invocation) {
                        ended.push(account);
                    }
                }
                _ => {}
            }
        }
        drop(accounts);
        self.received.fetch_add(received, Ordering::Relaxed);
        ended
    }

    /// Closes the accounts whose end event is overdue (it was dropped).
    fn overdue(&self) -> Vec<Account> {
        let now = Instant::now();
        let mut accounts = self.lock_accounts();
        let ids: Vec<u64> = accounts
            .iter()
            .filter(|(_, a)| a.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| accounts.remove(id)).collect()
    }

    fn report(&self, account: Account, complete: bool) {
        let counter = if complete {
            &self.reported
        } else {
            &self.incomplete
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let summary = account.summarise();
        self.unexpected
            .fetch_add(summary.unexpected.len() as u64, Ordering::Relaxed);
        summary.emit(&account, complete);
    }
}

/// Reads the ring buffer every [`DRAIN_EVERY`], reports the invocations
/// that ended, and once a second closes the accounts whose end never came.
pub(super) async fn consume(shared: Arc<Shared>, mut ring: RingBuf<MapData>) {
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    loop {
        tick.tick().await;
        for account in shared.drain(&mut ring) {
            shared.report(account, true);
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            for account in shared.overdue() {
                shared.report(account, false);
            }
        }
    }
}
