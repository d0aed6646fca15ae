//! The marker functions the eBPF uprobes attach to, and the future wrapper
//! that calls them around every poll of an invocation.
//!
//! On tokio an invocation moves between worker threads at every await, so
//! "which invocation is this thread running" is only true for the length of
//! one poll: [`Marked`] says so at the start and the end of each poll of the
//! future that drives the guest (and of each host call it makes), and the
//! programs charge the syscalls a thread makes in between to that
//! invocation. Nothing is spawned on a guest's behalf: file operations run on
//! the polling thread (WASI blocking is allowed on the current thread) and
//! the HTTP bridge drives its connections inside the call, so every syscall
//! a guest causes happens inside one of these polls.
//!
//! Each marker is a real, distinct function: `#[no_mangle]` so the loader
//! finds it by name, never inlined, and with a body that differs from the
//! others so no two are merged into one address.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// Defines the marker functions. On x86-64 each is a naked function whose
/// first instruction is a 5-byte `nop`: the kernel (6.18 and later) turns a
/// uprobe on such an instruction into a call to a trampoline, several times
/// cheaper than the breakpoint trap it uses elsewhere. The byte after `ret`
/// is never executed; it keeps the markers' bodies distinct.
macro_rules! markers {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) = $tag:literal;)*) => {$(
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub extern "C" fn $name($($arg: $ty),*) {
            core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                "ret",
                concat!(".byte ", $tag),
            )
        }

        $(#[$doc])*
        #[cfg(not(target_arch = "x86_64"))]
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name($($arg: $ty),*) {
            std::hint::black_box(($($arg,)* $tag));
        }
    )*};
}

markers! {
    /// This thread starts a stretch (one poll) of `invocation`.
    sandgate_probe_guest_enter(invocation: u64) = 1;
    /// The stretch ends.
    sandgate_probe_guest_exit(invocation: u64) = 2;
    /// Inside a stretch, the host starts work of `phase` for the guest.
    sandgate_probe_hostcall_enter(invocation: u64, phase: u32) = 3;
    /// That work ends.
    sandgate_probe_hostcall_exit(invocation: u64, phase: u32) = 4;
    /// A WASI call (index `call` in `wasi::PREVIEW1`) was refused.
    sandgate_probe_wasi_denied(invocation: u64, call: u32) = 5;
    /// The invocation is over.
    sandgate_probe_invocation_end(invocation: u64) = 6;
}

/// The probe id of one invocation; `Probe::NONE` when probes are not
/// attached, and then every marker call is skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe(pub(crate) u64);

impl Probe {
    pub const NONE: Probe = Probe(0);

    pub fn is_watched(self) -> bool {
        self.0 != 0
    }

    /// Runs `work` (synchronous host work for the guest) marked as `phase`.
    pub fn phase<T>(self, phase: u32, work: impl FnOnce() -> T) -> T {
        if !self.is_watched() {
            return work();
        }
        sandgate_probe_hostcall_enter(self.0, phase);
        let out = work();
        sandgate_probe_hostcall_exit(self.0, phase);
        out
    }

    /// Starts host work of `phase` that lasts until [`Probe::exit`] or the
    /// end of the current poll, whichever is first (one marker call fewer
    /// than [`Probe::phase`] when a phase spans two steps).
    pub fn enter(self, phase: u32) {
        if self.is_watched() {
            sandgate_probe_hostcall_enter(self.0, phase);
        }
    }

    /// Ends the phase [`Probe::enter`] started: back to the guest's.
    pub fn exit(self, phase: u32) {
        if self.is_watched() {
            sandgate_probe_hostcall_exit(self.0, phase);
        }
    }

    /// Notes a refused WASI call (its index in `wasi::PREVIEW1`).
    pub fn wasi_denied(self, call: usize) {
        if self.is_watched() {
            sandgate_probe_wasi_denied(self.0, call as u32);
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
        let id = this.probe.0;
        if id == 0 {
            return this.inner.poll(cx);
        }
        match *this.phase {
            None => {
                sandgate_probe_guest_enter(id);
                let out = this.inner.poll(cx);
                sandgate_probe_guest_exit(id);
                out
            }
            Some(phase) => {
                sandgate_probe_hostcall_enter(id, phase);
                let out = this.inner.poll(cx);
                sandgate_probe_hostcall_exit(id, phase);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_has_its_own_address() {
        let addresses = [
            sandgate_probe_guest_enter as *const () as usize,
            sandgate_probe_guest_exit as *const () as usize,
            sandgate_probe_hostcall_enter as *const () as usize,
            sandgate_probe_hostcall_exit as *const () as usize,
            sandgate_probe_wasi_denied as *const () as usize,
            sandgate_probe_invocation_end as *const () as usize,
        ];
        let mut unique = addresses.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), addresses.len(), "{addresses:x?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_marker_starts_with_the_nop_the_kernel_optimizes() {
        for marker in [
            sandgate_probe_guest_enter as *const u8,
            sandgate_probe_hostcall_exit as *const u8,
            sandgate_probe_invocation_end as *const u8,
        ] {
            // SAFETY: reads the first bytes of a function's machine code.
            let code = unsafe { std::slice::from_raw_parts(marker, 6) };
            assert_eq!(code, [0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
        }
    }
}
