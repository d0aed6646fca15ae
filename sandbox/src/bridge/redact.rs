//! Scrubbing the host's credentials from what a peer answers, before a guest
//! reads it. A peer that echoes a request can hand a credential back in many
//! spellings; each [`Secret`] knows the ones worth looking for: the value
//! itself, its token after an auth scheme (`Bearer t` → `t`, and a Basic
//! pair's `user:pass` and password), each of those percent-encoded (any
//! mix of escaped bytes, `+` for space), JSON-escaped, base64 (standard and
//! URL-safe alphabets, at every alignment inside a longer encoding) and hex.

use std::ops::Range;

use base64::Engine as _;

/// What a redacted span becomes.
pub const REDACTED: &[u8] = b"[redacted]";

/// Encoded forms shorter than this are not searched: they would match by
/// chance far more often than they would leak anything.
const MIN_ENCODED: usize = 6;

/// One credential's value and every derived spelling to scrub.
#[derive(Clone, Debug)]
pub struct Secret {
    /// The plain forms (the value, its token, a Basic pair's parts), found
    /// as written and through percent and JSON unescaping.
    plain: Vec<Vec<u8>>,
    /// Encoded forms of the plain ones (base64 cores, hex), found as written.
    encoded: Vec<Vec<u8>>,
}

impl Secret {
    pub fn new(value: &str) -> Secret {
        let mut plain: Vec<Vec<u8>> = vec![value.as_bytes().to_vec()];
        if let Some((scheme, token)) = value.split_once(' ') {
            let token = token.trim();
            if token.len() >= MIN_ENCODED {
                plain.push(token.as_bytes().to_vec());
            }
            if scheme.eq_ignore_ascii_case("basic")
                && let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(token)
            {
                if let Some(colon) = pair.iter().position(|&b| b == b':')
                    && pair.len() - colon > MIN_ENCODED
                {
                    plain.push(pair[colon + 1..].to_vec());
                }
                plain.push(pair);
            }
        }
        plain.retain(|p| !p.is_empty());
        let mut encoded = Vec::new();
        for form in &plain {
            for engine in [
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                for offset in 0..3 {
                    encoded.push(base64_core(engine, form, offset));
                }
            }
            encoded.push(hex(form, b"0123456789abcdef"));
            encoded.push(hex(form, b"0123456789ABCDEF"));
        }
        encoded.retain(|e| e.len() >= MIN_ENCODED && !plain.contains(e));
        encoded.sort();
        encoded.dedup();
        Secret { plain, encoded }
    }
}

/// The characters of the base64 encoding of `secret` that do not depend on
/// the bytes around it when it starts `offset` bytes (mod 3) into a longer
/// text: the encoding of the secret there minus the characters shared with
/// its neighbours.
fn base64_core(engine: &impl base64::Engine, secret: &[u8], offset: usize) -> Vec<u8> {
    let mut framed = vec![0u8; offset];
    framed.extend_from_slice(secret);
    let text = engine.encode(&framed).into_bytes();
    // Characters 0..skip hold bits of the leading filler.
    let skip = match offset {
        0 => 0,
        1 => 2,
        _ => 3,
    };
    // A trailing partial group's last character also takes bits of what
    // follows the secret.
    let keep = match framed.len() % 3 {
        0 => text.len(),
        _ => text.len().saturating_sub(1),
    };
    text.get(skip..keep).map(<[u8]>::to_vec).unwrap_or_default()
}

fn hex(bytes: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    bytes
        .iter()
        .flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// `text` with every spelling of every secret replaced by [`REDACTED`];
/// `text` itself when nothing matched.
pub fn redact(text: Vec<u8>, secrets: &[Secret]) -> Vec<u8> {
    let mut spans: Vec<Range<usize>> = Vec::new();
    let views = [
        View::identity(&text),
        View::unescaped(&text, Unescape::Percent),
        View::unescaped(&text, Unescape::Form),
        View::unescaped(&text, Unescape::Json),
    ];
    for secret in secrets {
        for view in views.iter().flatten() {
            for form in &secret.plain {
                view.find(form, &mut spans);
            }
        }
        for form in &secret.encoded {
            find(&text, form, |at| spans.push(at..at + form.len()));
        }
    }
    if spans.is_empty() {
        return text;
    }
    spans.sort_by_key(|s| s.start);
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for span in spans {
        if span.start >= at {
            out.extend_from_slice(&text[at..span.start]);
            out.extend_from_slice(REDACTED);
            at = span.end;
        } else if span.end > at {
            // Overlaps the span just redacted: extend it.
            at = span.end;
        }
    }
    out.extend_from_slice(&text[at..]);
    out
}

/// [`redact`] for a header name or value the guest reads as text.
pub fn redact_str(text: &str, secrets: &[Secret]) -> String {
    match redact(text.as_bytes().to_vec(), secrets) {
        bytes if bytes == text.as_bytes() => text.to_owned(),
        bytes => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn find(haystack: &[u8], needle: &[u8], mut hit: impl FnMut(usize)) {
    if needle.is_empty() || haystack.len() < needle.len() {
        return;
    }
    let first = needle[0];
    let last = haystack.len() - needle.len();
    let mut i = 0;
    while i <= last {
        match haystack[i..=last].iter().position(|&b| b == first) {
            None => return,
            Some(skip) => i += skip,
        }
        if haystack[i..].starts_with(needle) {
            hit(i);
        }
        i += 1;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unescape {
    /// `%XX` of any byte.
    Percent,
    /// `%XX` and `+` for space (HTML forms, query strings).
    Form,
    /// JSON string escapes: `\/`, `\"`, `\uXXXX` (and surrogate pairs), …
    Json,
}

/// A text seen through one unescaping: its decoded bytes and, for each, the
/// range of the original text it came from.
struct View<'a> {
    decoded: std::borrow::Cow<'a, [u8]>,
    origin: Option<Vec<Range<usize>>>,
}

impl<'a> View<'a> {
    fn identity(text: &'a [u8]) -> Option<View<'a>> {
        Some(View {
            decoded: std::borrow::Cow::Borrowed(text),
            origin: None,
        })
    }

    /// `None` when the text has nothing this unescaping would change.
    fn unescaped(text: &[u8], how: Unescape) -> Option<View<'static>> {
        let marker = |b: &u8| match how {
            Unescape::Percent => *b == b'%',
            Unescape::Form => *b == b'%' || *b == b'+',
            Unescape::Json => *b == b'\\',
        };
        if !text.iter().any(marker) {
            return None;
        }
        let mut decoded = Vec::with_capacity(text.len());
        let mut origin = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let (bytes, used) = match (how, text[i]) {
                (Unescape::Percent | Unescape::Form, b'%') => {
                    match hex_byte(text.get(i + 1..i + 3)) {
                        Some(b) => (vec![b], 3),
                        None => (vec![b'%'], 1),
                    }
                }
                (Unescape::Form, b'+') => (vec![b' '], 1),
                (Unescape::Json, b'\\') => json_escape(&text[i..]),
                (_, b) => (vec![b], 1),
            };
            for b in bytes {
                decoded.push(b);
                origin.push(i..i + used);
            }
            i += used;
        }
        Some(View {
            decoded: std::borrow::Cow::Owned(decoded),
            origin: Some(origin),
        })
    }

    /// Adds the original range of every occurrence of `needle` to `spans`.
    fn find(&self, needle: &[u8], spans: &mut Vec<Range<usize>>) {
        find(&self.decoded, needle, |at| match &self.origin {
            None => spans.push(at..at + needle.len()),
            Some(origin) => spans.push(origin[at].start..origin[at + needle.len() - 1].end),
        });
    }
}

fn hex_byte(digits: Option<&[u8]>) -> Option<u8> {
    let digits = std::str::from_utf8(digits?).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(digits, 16).ok()
}

/// One JSON escape at the start of `text`: its bytes and its length; a
/// backslash starting no valid escape stands for itself.
fn json_escape(text: &[u8]) -> (Vec<u8>, usize) {
    let unit = |at: usize| {
        text.get(at..at + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u32::from_str_radix(d, 16).ok())
    };
    let simple = |b: u8| (vec![b], 2);
    match text.get(1) {
        Some(b'"') => simple(b'"'),
        Some(b'\\') => simple(b'\\'),
        Some(b'/') => simple(b'/'),
        Some(b'b') => simple(8),
        Some(b'f') => simple(12),
        Some(b'n') => simple(b'\n'),
        Some(b'r') => simple(b'\r'),
        Some(b't') => simple(b'\t'),
        Some(b'u') => {
            let (code, used) = match unit(2) {
                Some(high @ 0xD800..=0xDBFF)
                    if text.get(6..8) == Some(b"\\u")
                        && unit(8).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) =>
                {
                    let low = unit(8).unwrap_or(0xDC00);
                    (0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00), 12)
                }
                Some(code) => (code, 6),
                None => return (vec![b'\\'], 1),
            };
            match char::from_u32(code) {
                Some(c) => (c.to_string().into_bytes(), used),
                None => (vec![b'\\'], 1),
            }
        }
        _ => (vec![b'\\'], 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(text: &str, secret: &str) -> String {
        String::from_utf8_lossy(&redact(text.as_bytes().to_vec(), &[Secret::new(secret)]))
            .into_owned()
    }

    #[test]
    fn every_spelling_of_a_secret_is_redacted() {
        let secret = "Bearer s3cr3t/t0ken+x y";
        for spelling in [
            "Bearer s3cr3t/t0ken+x y".to_owned(),
            "s3cr3t/t0ken+x y".to_owned(),
            "Bearer%20s3cr3t%2Ft0ken%2Bx%20y".to_owned(),
            "bearer%20s3cr3t%2ft0ken%2bx%20y".replace("bearer", "Bearer"),
            // Only some bytes escaped, as a path or query encoder does.
            "Bearer%20s3cr3t/t0ken%2Bx%20y".to_owned(),
            "Bearer+s3cr3t%2Ft0ken%2Bx+y".to_owned(),
            r"Bearer s3cr3t\/t0ken+x y".to_owned(),
            r"Bearer\u0020s3cr3t\u002ft0ken+x y".to_owned(),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::URL_SAFE.encode(secret),
            hex(secret.as_bytes(), b"0123456789abcdef")
                .into_iter()
                .map(char::from)
                .collect(),
        ] {
            let out = scrub(&format!("<{spelling}>"), secret);
            assert!(out.contains("[redacted]"), "{spelling} -> {out}");
            assert!(!out.contains("s3cr3t"), "{spelling} -> {out}");
        }
    }

    #[test]
    fn base64_is_caught_at_every_alignment_inside_a_longer_encoding() {
        let secret = "Bearer 0123456789abcdef";
        for prefix in ["", "a", "ab", "abc", "abcd"] {
            for suffix in ["", "z", "zz"] {
                let whole = format!("{prefix}{secret}{suffix}");
                for engine in [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::URL_SAFE,
                ] {
                    let encoded = engine.encode(&whole);
                    let out = scrub(&encoded, secret);
                    assert!(out.contains("[redacted]"), "{whole:?} as {encoded}");
                    // What is left decodes to at most a few bits of the secret.
                    assert!(out.len() < encoded.len(), "{whole:?} as {encoded}");
                }
            }
        }
    }

    #[test]
    fn basic_credentials_are_redacted_as_a_pair_and_password() {
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("client:pa55word-xyz")
        );
        assert_eq!(
            scrub(r#"{"user":"client","password":"pa55word-xyz"}"#, &value),
            r#"{"user":"client","password":"[redacted]"}"#
        );
        assert_eq!(scrub("client:pa55word-xyz", &value), "[redacted]");
    }

    #[test]
    fn text_without_a_secret_is_unchanged() {
        let text = "no %zz secret + here \\u12 \\q";
        assert_eq!(scrub(text, "Bearer s3cr3t"), text);
        assert_eq!(
            scrub("x-s3cr3t!-y-s3cr3t!", "s3cr3t!"),
            "x-[redacted]-y-[redacted]"
        );
    }
}
