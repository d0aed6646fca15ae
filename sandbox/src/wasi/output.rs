//! The bounded output of one evaluation: what a guest writes to stdout and
//! stderr (through the WASI context's streams) and its `sandgate::log`
//! messages, kept up to a line and byte bound and counted past it. `wasi`
//! builds the streams; the `log` import and `telemetry::log` read it.

use std::sync::{Arc, Mutex};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use crate::telemetry::log::{GuestLine, MAX_GUEST_OUTPUT_BYTES, MAX_GUEST_OUTPUT_LINES, Source};

/// What a guest wrote to stdout, stderr and `log` during one evaluation,
/// bounded by `MAX_GUEST_OUTPUT_LINES` and `MAX_GUEST_OUTPUT_BYTES` together:
/// every write is accepted (a guest never blocks or retries on its output),
/// what exceeds the bound is counted, not kept. Clones share the buffer.
#[derive(Clone, Default)]
pub struct GuestOutput {
    collected: Arc<Mutex<Collected>>,
}

/// The bounded output of one evaluation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub lines: Vec<GuestLine>,
    /// Lines cut off by the bound (newlines written past it, `log` calls).
    pub dropped_lines: u64,
    /// Bytes cut off by the bound.
    pub dropped_bytes: u64,
    kept_bytes: usize,
    /// The unfinished last line of stdout and stderr.
    partial: [Vec<u8>; 2],
    /// Whether that unfinished line was already cut.
    partial_cut: [bool; 2],
}

impl Collected {
    fn full(&self) -> bool {
        self.lines.len() >= MAX_GUEST_OUTPUT_LINES
    }

    fn write(&mut self, stream: usize, bytes: &[u8]) {
        let mut offset = 0;
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            if self.full() {
                let rest = &bytes[offset..];
                self.dropped_bytes += rest.len() as u64;
                self.dropped_lines += rest.iter().filter(|b| **b == b'\n').count() as u64;
                return;
            }
            offset += piece.len();
            let complete = piece.ends_with(b"\n");
            let content = &piece[..piece.len() - usize::from(complete)];
            let room = MAX_GUEST_OUTPUT_BYTES.saturating_sub(self.kept_bytes);
            let take = content.len().min(room);
            self.partial[stream].extend_from_slice(&content[..take]);
            self.kept_bytes += take;
            if take < content.len() {
                self.dropped_bytes += (content.len() - take) as u64;
                self.partial_cut[stream] = true;
            }
            if complete {
                self.end_line(stream);
            }
        }
    }

    /// Ends the unfinished line of `stream` (a newline, or the evaluation's end).
    fn end_line(&mut self, stream: usize) {
        let bytes = std::mem::take(&mut self.partial[stream]);
        let cut = std::mem::take(&mut self.partial_cut[stream]);
        if cut && bytes.is_empty() {
            self.dropped_lines += 1;
            return;
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if cut {
            text.push('…');
        }
        let source = if stream == 0 {
            Source::Stdout
        } else {
            Source::Stderr
        };
        self.lines.push(GuestLine { source, text });
    }

    fn log(&mut self, level: i32, message: &str) -> bool {
        let room = MAX_GUEST_OUTPUT_BYTES.saturating_sub(self.kept_bytes);
        if self.full() || room == 0 {
            self.dropped_lines += 1;
            self.dropped_bytes += message.len() as u64;
            return false;
        }
        let mut take = message.len().min(room);
        while !message.is_char_boundary(take) {
            take -= 1;
        }
        let mut text = message[..take].to_owned();
        if take < message.len() {
            self.dropped_bytes += (message.len() - take) as u64;
            text.push('…');
        }
        self.kept_bytes += take;
        self.lines.push(GuestLine {
            source: Source::Log(level),
            text,
        });
        true
    }
}

impl GuestOutput {
    pub fn new() -> GuestOutput {
        GuestOutput::default()
    }

    /// Appends what the guest wrote to fd 1 (stdout) or 2 (stderr).
    pub fn write(&self, fd: i32, bytes: &[u8]) {
        if let Ok(mut collected) = self.collected.lock() {
            collected.write(usize::from(fd != 1), bytes);
        }
    }

    /// Records a guest `log` message; false when the bound dropped it.
    pub fn log(&self, level: i32, message: &str) -> bool {
        self.collected
            .lock()
            .map(|mut c| c.log(level, message))
            .unwrap_or(false)
    }

    /// The lines kept so far, left in place (a refused init quotes them).
    pub fn kept_lines(&self) -> Vec<GuestLine> {
        self.collected
            .lock()
            .map(|c| c.lines.clone())
            .unwrap_or_default()
    }

    /// Everything kept and counted, unfinished lines ended.
    pub fn finish(&self) -> Collected {
        let Ok(mut collected) = self.collected.lock() else {
            return Collected::default();
        };
        for stream in 0..2 {
            if !collected.partial[stream].is_empty() || collected.partial_cut[stream] {
                if collected.full() {
                    collected.dropped_lines += 1;
                } else {
                    collected.end_line(stream);
                }
            }
        }
        std::mem::take(&mut *collected)
    }

    /// The stdout (fd 1) or stderr (fd 2) to hand a WASI context.
    pub(super) fn sink(&self, fd: i32) -> StdioSink {
        StdioSink {
            output: self.clone(),
            fd,
        }
    }

    fn stream(&self, fd: i32) -> GuestStream {
        GuestStream {
            output: self.clone(),
            fd,
        }
    }
}

/// The guest's stdout or stderr as wasmtime-wasi sees it: always ready, every
/// write accepted into the evaluation's bounded [`GuestOutput`].
struct GuestStream {
    output: GuestOutput,
    fd: i32,
}

/// The most one `write` may be handed at a time (wasmtime-wasi copies in
/// chunks of at most 4 KiB anyway).
const STREAM_PERMIT: usize = 64 * 1024;

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.output.write(self.fd, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(STREAM_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.output.write(self.fd, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The stdout (fd 1) or stderr (fd 2) handed to the WASI context.
pub(super) struct StdioSink {
    output: GuestOutput,
    fd: i32,
}

impl IsTerminal for StdioSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StdioSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.output.stream(self.fd))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.output.stream(self.fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_output_is_bounded_in_lines_and_bytes_and_counts_the_rest() {
        let output = GuestOutput::new();
        output.write(1, &[b'\n'; 64 * 1024]);
        output.write(2, b"late\n");
        assert!(!output.log(2, "late too"));
        let collected = output.finish();
        assert_eq!(collected.lines.len(), MAX_GUEST_OUTPUT_LINES);
        assert_eq!(collected.dropped_lines, (64 * 1024 - 100) + 1 + 1);
        assert_eq!(collected.dropped_bytes, (64 * 1024 - 100) + 5 + 8);

        let output = GuestOutput::new();
        output.write(2, b"first ");
        output.write(2, &vec![b'x'; MAX_GUEST_OUTPUT_BYTES]);
        output.write(2, b"\nafter");
        let collected = output.finish();
        let texts: Vec<&str> = collected.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts.len(),
            1,
            "the line over the byte bound is cut, the next dropped"
        );
        assert!(texts[0].starts_with("first xxx") && texts[0].ends_with('…'));
        assert_eq!(collected.lines[0].source, Source::Stderr);
        assert_eq!(collected.dropped_lines, 1);
        assert_eq!(collected.dropped_bytes, 6 + 5);
    }
}
