//! Marking the stretches of an invocation: the future wrapper that, around
//! every poll of the future driving a guest, publishes the invocation in
//! the polling thread's slot, and the phase changes inside it.
//!
//! On tokio an invocation moves between worker threads at every await, so
//! "which invocation is this thread running" is only true for the length of
//! one poll: [`Marked`] says so at the start of each poll of the future that
//! drives the guest, and at its end takes what the programs tallied in the
//! thread's slot and adds it to the invocation's account. Nothing is spawned
//! on a guest's behalf: file operations run on the polling thread (WASI
//! blocking is allowed on the current thread) and the HTTP bridge drives its
//! connections inside the call, so every syscall a guest causes happens
//! inside one of these polls.
//!
//! Each mark is a plain store into memory the kernel's programs read: no
//! system call, no uprobe.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use super::{ATTACHED, slots};

/// The probe id of one invocation; `Probe::NONE` when probes are not
/// attached, and then every mark is skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub(crate) id: u64,
    /// The policy's expected set in the kernel (`slots::UNCHECKED` if none).
    pub(crate) policy: u32,
    /// The policy's grants in the enforcement maps (`NO_GRANTS` if none).
    pub(crate) grants: u32,
}

impl Probe {
    pub const NONE: Probe = Probe {
        id: 0,
        policy: 0,
        grants: 0,
    };

    pub fn is_watched(self) -> bool {
        self.id != 0
    }

    /// Runs `work` (synchronous host work for the guest) marked as `phase`.
    pub fn phase<T>(self, phase: u32, work: impl FnOnce() -> T) -> T {
        if !self.is_watched() {
            return work();
        }
        slots::set_phase(phase);
        let out = work();
        slots::set_phase(super::phase::GUEST);
        out
    }

    /// Starts host work of `phase` that lasts until [`Probe::exit`] or the
    /// end of the current poll, whichever is first.
    pub fn enter(self, phase: u32) {
        if self.is_watched() {
            slots::set_phase(phase);
        }
    }

    /// Ends the phase [`Probe::enter`] started: back to the guest's.
    pub fn exit(self, _phase: u32) {
        if self.is_watched() {
            slots::set_phase(super::phase::GUEST);
        }
    }

    /// Notes a refused WASI call (its index in `wasi::PREVIEW1`).
    pub fn wasi_denied(self, call: usize) {
        if let Some(shared) = ATTACHED.get()
            && let Some(account) = shared.lock_accounts(self.id).get_mut(&self.id)
        {
            account.wasi_denied.push(call as u32);
        }
    }

    /// Wraps the future that drives the guest: every poll is a stretch of
    /// this invocation.
    pub fn guest<F: Future>(self, inner: F) -> Marked<F> {
        Marked {
            probe: self,
            phase: None,
            inner,
        }
    }

    /// Wraps the future of a host call made for the guest.
    pub fn hostcall<F: Future>(self, phase: u32, inner: F) -> Marked<F> {
        Marked {
            probe: self,
            phase: Some(phase),
            inner,
        }
    }

    /// Operations the kernel refused this invocation so far.
    pub(super) fn denied_count(self) -> usize {
        ATTACHED
            .get()
            .and_then(|shared| {
                shared
                    .lock_accounts(self.id)
                    .get(&self.id)
                    .map(|account| account.refusals.len())
            })
            .unwrap_or(0)
    }

    /// One poll of the guest's future, as a stretch of this invocation.
    pub(super) fn stretch<T>(self, poll: impl FnOnce() -> T) -> T {
        let Some(stretch) = slots::Stretch::begin(self.id, self.policy, self.grants) else {
            let out = poll();
            self.unslotted();
            return out;
        };
        let out = poll();
        if let Some(taken) = stretch.finish()
            && let Some(shared) = ATTACHED.get()
            && let Some(account) = shared.lock_accounts(self.id).get_mut(&self.id)
        {
            account.add(&taken);
        }
        out
    }

    /// This poll ran on a thread without a slot: its syscalls are unknown.
    #[cold]
    fn unslotted(self) {
        if let Some(shared) = ATTACHED.get() {
            shared.slots.unslotted.fetch_add(1, Ordering::Relaxed);
            if let Some(account) = shared.lock_accounts(self.id).get_mut(&self.id) {
                account.unslotted = true;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A future whose every poll is announced to the probes.
    pub struct Marked<F> {
        probe: Probe,
        phase: Option<u32>,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Marked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let probe = *this.probe;
        if !probe.is_watched() {
            return this.inner.poll(cx);
        }
        match *this.phase {
            None => probe.stretch(|| this.inner.poll(cx)),
            Some(phase) => probe.phase(phase, || this.inner.poll(cx)),
        }
    }
}
