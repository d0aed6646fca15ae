//! The daemon log's defences against what guests and clients put into it:
//! [`Escaped`] renders a guest- or client-chosen string with every control
//! character escaped (the fmt formatter escapes ANSI but not `\n` or `\r`),
//! and [`hand_off`] takes the bounded output of one evaluation to a writer
//! thread, so no request waits on the log. `policy` hands off at teardown.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// A string from outside the daemon (a guest, a client), shown in a log line
/// with control characters, line and paragraph separators, bidirectional
/// overrides and the backslash escaped, so it can never start a line of its
/// own or rewrite the terminal.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut clean = 0;
        for (i, c) in self.0.char_indices() {
            let escape = match c {
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                c if needs_escape(c) => None,
                _ => continue,
            };
            f.write_str(&self.0[clean..i])?;
            match escape {
                Some(text) => f.write_str(text)?,
                None => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
            clean = i + c.len_utf8();
        }
        f.write_str(&self.0[clean..])
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        fmt::Display::fmt(self, f)?;
        f.write_char('"')
    }
}

/// Bytes of guest output (stdout, stderr and `log` messages together) kept
/// per evaluation for the daemon log; the rest is counted and dropped.
pub const MAX_GUEST_OUTPUT_BYTES: usize = 16 * 1024;
/// Lines of guest output kept per evaluation; the rest are counted and dropped.
pub const MAX_GUEST_OUTPUT_LINES: usize = 100;

/// Where a line of guest output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    /// The `sandgate::log` import, with its level (0 trace … 4 error).
    Log(i32),
}

/// One line a guest wrote, without its newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLine {
    pub source: Source,
    pub text: String,
}

/// What one evaluation's guest wrote, already bounded, on its way to the log.
pub struct GuestBatch {
    pub policy: String,
    pub version: String,
    pub decision_id: String,
    /// The evaluation's deadline: a batch the writer reaches later is dropped.
    pub deadline: Instant,
    pub lines: Vec<GuestLine>,
    /// Lines and bytes the per-evaluation bound cut off.
    pub dropped_lines: u64,
    pub dropped_bytes: u64,
}

enum Item {
    Batch(GuestBatch),
    /// Answered once every item queued before it is written.
    Flush(SyncSender<()>),
}

/// Batches waiting for the writer; beyond that, batches are dropped (counted).
const QUEUE_BATCHES: usize = 1024;

/// How often at most the writer reports batches it could not write.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Lines never written because the queue was full or the writer reached
/// them after their evaluation's deadline, since the daemon started.
static UNWRITTEN_LINES: AtomicU64 = AtomicU64::new(0);
/// Evaluations whose output was not written, for the next report.
static UNWRITTEN_PENDING: AtomicU64 = AtomicU64::new(0);

/// Guest output lines the log writer could not write (queue full, or
/// reached after the evaluation's deadline).
pub fn unwritten_lines() -> u64 {
    UNWRITTEN_LINES.load(Ordering::Relaxed)
}

/// The writer thread's queue. The log subscriber is process-wide, and so is
/// the one thread writing guest output into it.
fn queue() -> Option<&'static SyncSender<Item>> {
    static QUEUE: OnceLock<Option<SyncSender<Item>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_BATCHES);
            let spawned = std::thread::Builder::new()
                .name("sandgate-guest-log".into())
                .spawn(move || write_batches(rx));
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the guest log writer; guest output is not logged");
                    None
                }
            }
        })
        .as_ref()
}

/// Queues one evaluation's guest output for the log without waiting: when
/// the writer is behind, the batch is dropped and counted instead.
pub fn hand_off(batch: GuestBatch) {
    if batch.lines.is_empty() && batch.dropped_lines == 0 && batch.dropped_bytes == 0 {
        return;
    }
    let Some(tx) = queue() else {
        unwritten(&batch);
        return;
    };
    match tx.try_send(Item::Batch(batch)) {
        Ok(()) => {}
        Err(
            TrySendError::Full(Item::Batch(batch)) | TrySendError::Disconnected(Item::Batch(batch)),
        ) => unwritten(&batch),
        Err(_) => {}
    }
}

/// Waits until every batch handed off so far is written (for the CLI,
/// before it exits). Gives up after `within`.
pub fn flush(within: Duration) {
    let Some(tx) = queue() else {
        return;
    };
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if tx.try_send(Item::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(within);
    }
}

fn unwritten(batch: &GuestBatch) {
    UNWRITTEN_LINES.fetch_add(batch.lines.len() as u64, Ordering::Relaxed);
    UNWRITTEN_PENDING.fetch_add(1, Ordering::Relaxed);
}

fn write_batches(rx: Receiver<Item>) {
    let mut reported = Instant::now();
    loop {
        match rx.recv_timeout(REPORT_EVERY) {
            Ok(Item::Batch(batch)) if Instant::now() > batch.deadline => unwritten(&batch),
            Ok(Item::Batch(batch)) => write(&batch),
            Ok(Item::Flush(done)) => {
                report_unwritten();
                let _ = done.try_send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if reported.elapsed() >= REPORT_EVERY {
            report_unwritten();
            reported = Instant::now();
        }
    }
}

fn report_unwritten() {
    let evaluations = UNWRITTEN_PENDING.swap(0, Ordering::Relaxed);
    if evaluations > 0 {
        tracing::warn!(
            evaluations,
            unwritten_lines_total = unwritten_lines(),
            "guest output not logged: the log writer reached it after the evaluation's deadline, or its queue was full"
        );
    }
}

fn write(batch: &GuestBatch) {
    let (policy, version, decision_id) = (
        Escaped(&batch.policy),
        Escaped(&batch.version),
        Escaped(&batch.decision_id),
    );
    for line in &batch.lines {
        let message = Escaped(&line.text);
        macro_rules! emit {
            ($level:expr, $($stream:tt)*) => {
                tracing::event!(target: "sandgate::guest", $level, policy = %policy, version = %version, decision_id = %decision_id, $($stream)* message = %message)
            };
        }
        use tracing::Level;
        match line.source {
            Source::Stdout => emit!(Level::INFO, stream = "stdout",),
            Source::Stderr => emit!(Level::INFO, stream = "stderr",),
            Source::Log(i32::MIN..=0) => emit!(Level::TRACE,),
            Source::Log(1) => emit!(Level::DEBUG,),
            Source::Log(2) => emit!(Level::INFO,),
            Source::Log(3) => emit!(Level::WARN,),
            Source::Log(_) => emit!(Level::ERROR,),
        }
    }
    if batch.dropped_lines > 0 || batch.dropped_bytes > 0 {
        tracing::warn!(
            policy = %policy,
            version = %version,
            decision_id = %decision_id,
            kept_lines = batch.lines.len(),
            dropped_lines = batch.dropped_lines,
            dropped_bytes = batch.dropped_bytes,
            max_lines = MAX_GUEST_OUTPUT_LINES,
            max_bytes = MAX_GUEST_OUTPUT_BYTES,
            "guest output truncated"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_start_a_line_or_reach_the_terminal() {
        let forged =
            "ok\n2026-12-06T00:00:00Z  INFO forged\r\x1b[2J\u{9b}\u{2028}\u{202e}tab\there\\n";
        let shown = Escaped(forged).to_string();
        assert_eq!(
            shown,
            "ok\\n2026-12-06T00:00:00Z  INFO forged\\r\\u{1b}[2J\\u{9b}\\u{2028}\\u{202e}tab\\there\\\\n"
        );
        assert!(!shown.chars().any(needs_escape));
        assert_eq!(Escaped("plain ünïcode").to_string(), "plain ünïcode");
    }
}
