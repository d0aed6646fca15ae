//! How `sandgate trace` prints what it received: each trace as an indented
//! span tree with durations, attributes, events and errors, a `kernel`
//! span's per-syscall attributes one line each. The receiver calls [`render`].

use std::fmt::Write as _;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status};
use prost::Message as _;

use super::Received;

/// The span trees of `traces`: each span with its duration and attributes,
/// its events (`•`) and, on error, its status (`✗`).
pub(super) fn render(traces: &[Received<'_>]) -> Result<String, prost::DecodeError> {
    let decoded = traces
        .iter()
        .map(|trace| {
            trace
                .spans
                .iter()
                .map(|raw| Span::decode((*raw).clone()))
                .collect::<Result<Vec<Span>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = String::with_capacity(decoded.iter().map(Vec::len).sum::<usize>() * 160);
    let mut tree = Tree::default();
    for (trace, spans) in traces.iter().zip(&decoded) {
        out.push_str("trace ");
        hex(&mut out, &trace.id);
        let _ = writeln!(
            out,
            " ({}, {})",
            trace.service,
            count(spans.len() as u64, "span")
        );
        tree.build(spans.iter());
        for &root in &tree.roots {
            let mut note = String::new();
            if !root.parent_span_id.is_empty() {
                note.push_str(" (child of remote span ");
                hex(&mut note, &root.parent_span_id);
                note.push(')');
            }
            write_span(&mut out, root, &tree, 1, &note);
        }
        out.push('\n');
    }
    Ok(out)
}

/// The parent links of one trace's spans, in buffers reused from trace to
/// trace: no hashing, O(n log n) in the trace's spans.
#[derive(Default)]
struct Tree<'a> {
    /// The trace's span ids, sorted, to tell local parents from remote ones.
    ids: Vec<&'a [u8]>,
    /// Spans with a parent in the trace, by parent id, then start time.
    children: Vec<&'a Span>,
    /// Spans without one, by start time.
    roots: Vec<&'a Span>,
}

impl<'a> Tree<'a> {
    fn build(&mut self, spans: impl Iterator<Item = &'a Span> + Clone) {
        self.ids.clear();
        self.children.clear();
        self.roots.clear();
        self.ids.extend(spans.clone().map(|s| s.span_id.as_slice()));
        self.ids.sort_unstable();
        for span in spans {
            if self
                .ids
                .binary_search(&span.parent_span_id.as_slice())
                .is_ok()
            {
                self.children.push(span);
            } else {
                self.roots.push(span);
            }
        }
        self.children
            .sort_by_key(|s| (s.parent_span_id.as_slice(), s.start_time_unix_nano));
        self.roots.sort_by_key(|s| s.start_time_unix_nano);
    }

    fn children_of(&self, span: &Span) -> &[&'a Span] {
        let id = span.span_id.as_slice();
        let from = self
            .children
            .partition_point(|c| c.parent_span_id.as_slice() < id);
        let to = self
            .children
            .partition_point(|c| c.parent_span_id.as_slice() <= id);
        &self.children[from..to]
    }
}

fn write_span(out: &mut String, span: &Span, tree: &Tree<'_>, depth: usize, note: &str) {
    let indent = |out: &mut String| (0..depth).for_each(|_| out.push_str("  "));
    let micros = span
        .end_time_unix_nano
        .saturating_sub(span.start_time_unix_nano)
        / 1_000;
    indent(out);
    let _ = write!(out, "{} {micros}µs{note}", span.name);
    let (mut plain, mut syscalls) = (Vec::new(), Vec::new());
    for kv in &span.attributes {
        match syscall_attribute(&kv.key) {
            Some((group, field)) => syscalls.push((group, field, kv)),
            None => plain.push(kv),
        }
    }
    attributes(out, plain);
    // A `kernel` span's `syscall.<name>.<phase>.{count,time_ns}`,
    // a line per syscall and phase.
    for row in syscalls.chunk_by(|a, b| a.0 == b.0) {
        indent(out);
        out.push_str("  · ");
        out.push_str(row[0].0);
        for (_, field, kv) in row {
            out.push(' ');
            out.push_str(field);
            out.push('=');
            value(out, kv.value.as_ref());
        }
        out.push('\n');
    }
    if let Some(status) = &span.status
        && status.code == status::StatusCode::Error as i32
    {
        indent(out);
        out.push_str("  ✗ ");
        out.push_str(&status.message);
        out.push('\n');
    }
    for event in &span.events {
        indent(out);
        out.push_str("  • ");
        out.push_str(&event.name);
        attributes(out, &event.attributes);
    }
    for child in tree.children_of(span) {
        write_span(out, child, tree, depth + 1, "");
    }
}

/// `syscall.<name>.<phase>` and `count` or `time_ns`, for an attribute of
/// a `kernel` span's syscalls.
fn syscall_attribute(key: &str) -> Option<(&str, &str)> {
    let (group, field) = key.rsplit_once('.')?;
    let named = group.starts_with("syscall.") && group.matches('.').count() == 2;
    (named && matches!(field, "count" | "time_ns")).then_some((group, field))
}

/// ` key=value` for each attribute, then the end of the line.
fn attributes<'a>(out: &mut String, list: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in list {
        out.push(' ');
        out.push_str(&kv.key);
        out.push('=');
        value(out, kv.value.as_ref());
    }
    out.push('\n');
}

fn value(out: &mut String, v: Option<&AnyValue>) {
    let _ = match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => {
            out.push_str(s);
            Ok(())
        }
        Some(any_value::Value::BoolValue(b)) => write!(out, "{b}"),
        Some(any_value::Value::IntValue(i)) => write!(out, "{i}"),
        Some(any_value::Value::DoubleValue(d)) => write!(out, "{d}"),
        Some(other) => write!(out, "{other:?}"),
        None => Ok(()),
    };
}

/// `n thing` or `n things`.
pub(super) fn count(n: u64, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}
