//! The one reader of caller input: every entry point (the JSON API, the OPA
//! data API, forward-auth and ext_authz documents, `sandgate eval`) hands its
//! input here before a guest sees it. Strict RFC 8259 JSON, and stricter than
//! serde_json where a guest and the host could read one document two ways:
//! invalid UTF-8, lone surrogates (raw or escaped) and duplicate object keys
//! are refused with the byte offset and the path of the fault. The canonical
//! form it writes is what the decision cache keys on.
//!
//! Hand-written rather than serde_json, which keeps the last of duplicate
//! keys without saying so and re-encodes numbers; over 600 lines with the
//! JSON grammar, the canonical writer and their tests.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

/// Nesting deeper than this is refused (serde_json's own recursion limit),
/// so hostile input cannot exhaust the stack.
pub const MAX_DEPTH: usize = 128;

/// Why an input was refused: what is wrong, at which byte, under which path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    pub what: String,
    /// Offset of the fault from the start of the input.
    pub offset: usize,
    /// Where the fault is, as `$`, `$.user.roles[2]`.
    pub path: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at byte {} (at {})",
            self.what, self.offset, self.path
        )
    }
}

impl std::error::Error for InputError {}

/// Checks that `bytes` is one JSON document sandgate accepts.
pub fn validate(bytes: &[u8]) -> Result<(), InputError> {
    Reader::new(bytes).document(None, None)
}

/// The document in canonical form: object members in key byte order, no
/// whitespace, strings with one escaping, numbers exactly as written. Two
/// inputs have the same canonical form exactly when every JSON reader sees
/// the same document in them (duplicate keys, the one thing readers disagree
/// on, are refused).
pub fn canonical(bytes: &[u8]) -> Result<Vec<u8>, InputError> {
    let mut out = Vec::with_capacity(bytes.len());
    Reader::new(bytes).document(Some(&mut out), None)?;
    Ok(out)
}

/// The members of a top-level object: each name and the byte range of its value.
pub type Members = Vec<(String, Range<usize>)>;

/// Validates `bytes` and, when it is an object, returns its members' names
/// and the byte ranges of their values; `None` for any other JSON value.
pub fn members(bytes: &[u8]) -> Result<Option<Members>, InputError> {
    let mut top = Some(Vec::new());
    Reader::new(bytes).document(None, Some(&mut top))?;
    Ok(top)
}

enum Segment {
    Key(String),
    Index(usize),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: Vec<Segment>,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader {
            bytes,
            pos: 0,
            path: Vec::new(),
        }
    }

    fn document(
        &mut self,
        out: Option<&mut Vec<u8>>,
        top: Option<&mut Option<Members>>,
    ) -> Result<(), InputError> {
        self.skip_whitespace();
        if self.pos == self.bytes.len() {
            return Err(self.fail("input is empty; expected a JSON value"));
        }
        match top {
            Some(top) if self.peek() == Some(b'{') => {
                let mut members = Vec::new();
                self.object(out, Some(&mut members))?;
                *top = Some(members);
            }
            Some(top) => {
                *top = None;
                self.value(out)?;
            }
            None => self.value(out)?,
        }
        self.skip_whitespace();
        if self.pos != self.bytes.len() {
            return Err(self.fail("trailing characters after the JSON value"));
        }
        Ok(())
    }

    fn fail(&self, what: impl Into<String>) -> InputError {
        self.fail_at(self.pos, what)
    }

    fn fail_at(&self, offset: usize, what: impl Into<String>) -> InputError {
        let mut path = String::from("$");
        for segment in &self.path {
            match segment {
                Segment::Key(key) => {
                    let simple = !key.is_empty()
                        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if simple {
                        path.push('.');
                        path.push_str(key);
                    } else {
                        path.push('[');
                        path.push_str(&quoted(key));
                        path.push(']');
                    }
                }
                Segment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        InputError {
            what: what.into(),
            offset,
            path,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), InputError> {
        self.skip_whitespace();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&self, expected: &str) -> InputError {
        match self.peek() {
            None => self.fail(format!("input ends early; expected {expected}")),
            Some(b) if b.is_ascii_graphic() => {
                self.fail(format!("unexpected `{}`; expected {expected}", b as char))
            }
            Some(b) => self.fail(format!("unexpected byte 0x{b:02x}; expected {expected}")),
        }
    }

    fn value(&mut self, out: Option<&mut Vec<u8>>) -> Result<(), InputError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(out, None),
            Some(b'[') => self.array(out),
            Some(b'"') => {
                let text = self.string()?;
                if let Some(out) = out {
                    write_string(&text, out);
                }
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => {
                let number = self.number()?;
                if let Some(out) = out {
                    out.extend_from_slice(number);
                }
                Ok(())
            }
            Some(b't') => self.literal(b"true", out),
            Some(b'f') => self.literal(b"false", out),
            Some(b'n') => self.literal(b"null", out),
            _ => Err(self.unexpected("a JSON value")),
        }
    }

    fn enter(&mut self) -> Result<(), InputError> {
        if self.path.len() >= MAX_DEPTH {
            return Err(self.fail(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn object(
        &mut self,
        out: Option<&mut Vec<u8>>,
        mut spans: Option<&mut Members>,
    ) -> Result<(), InputError> {
        self.enter()?;
        self.pos += 1; // `{`
        let mut seen: HashSet<String> = HashSet::new();
        // Canonical members, sorted once the object is read.
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_whitespace();
                if self.peek() != Some(b'"') {
                    return Err(self.unexpected("an object key (a string)"));
                }
                let key_at = self.pos;
                let key = self.string()?;
                if seen.contains(&key) {
                    return Err(self.fail_at(key_at, format!("duplicate key {}", quoted(&key))));
                }
                self.expect(b':', "`:` after an object key")?;
                self.path.push(Segment::Key(key));
                self.skip_whitespace();
                let start = self.pos;
                let mut value = Vec::new();
                self.value(out.is_some().then_some(&mut value))?;
                let Some(Segment::Key(key)) = self.path.pop() else {
                    unreachable!("the path holds the key pushed above")
                };
                if let Some(spans) = spans.as_deref_mut() {
                    spans.push((key.clone(), start..self.pos));
                }
                if out.is_some() {
                    members.push((key.clone(), value));
                }
                seen.insert(key);
                self.skip_whitespace();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.unexpected("`,` or `}` in an object")),
                }
            }
        }
        if let Some(out) = out {
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                out.extend_from_slice(value);
            }
            out.push(b'}');
        }
        Ok(())
    }

    fn array(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<(), InputError> {
        self.enter()?;
        self.pos += 1; // `[`
        if let Some(out) = out.as_deref_mut() {
            out.push(b'[');
        }
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            let mut index = 0;
            loop {
                if index > 0
                    && let Some(out) = out.as_deref_mut()
                {
                    out.push(b',');
                }
                self.path.push(Segment::Index(index));
                self.value(out.as_deref_mut())?;
                self.path.pop();
                index += 1;
                self.skip_whitespace();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b']') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.unexpected("`,` or `]` in an array")),
                }
            }
        }
        if let Some(out) = out {
            out.push(b']');
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8], out: Option<&mut Vec<u8>>) -> Result<(), InputError> {
        if !self.bytes[self.pos..].starts_with(word) {
            return Err(self.unexpected("a JSON value"));
        }
        self.pos += word.len();
        if let Some(out) = out {
            out.extend_from_slice(word);
        }
        Ok(())
    }

    /// A number as RFC 8259 spells it; the text itself is returned.
    fn number(&mut self) -> Result<&'a [u8], InputError> {
        let start = self.pos;
        let bytes = self.bytes;
        let digits = |pos: &mut usize| {
            let from = *pos;
            while bytes.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            *pos - from
        };
        let mut pos = self.pos;
        if bytes.get(pos) == Some(&b'-') {
            pos += 1;
        }
        match bytes.get(pos) {
            Some(b'0') => pos += 1,
            Some(b'1'..=b'9') => {
                digits(&mut pos);
            }
            _ => {
                self.pos = pos;
                return Err(self.unexpected("a digit"));
            }
        }
        if bytes.get(pos) == Some(&b'.') {
            pos += 1;
            if digits(&mut pos) == 0 {
                self.pos = pos;
                return Err(self.unexpected("a digit after the decimal point"));
            }
        }
        if matches!(bytes.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            if matches!(bytes.get(pos), Some(b'+' | b'-')) {
                pos += 1;
            }
            if digits(&mut pos) == 0 {
                self.pos = pos;
                return Err(self.unexpected("a digit in the exponent"));
            }
        }
        if bytes.get(pos).is_some_and(u8::is_ascii_digit) {
            return Err(self.fail_at(start, "a number with a leading zero"));
        }
        self.pos = pos;
        Ok(&bytes[start..pos])
    }

    /// A string, decoded. Refuses control characters, invalid UTF-8, unknown
    /// escapes and surrogates that do not form a pair.
    fn string(&mut self) -> Result<String, InputError> {
        self.pos += 1; // `"`
        let mut text = String::new();
        loop {
            let run = self.pos;
            while let Some(b) = self.peek()
                && b != b'"'
                && b != b'\\'
                && b >= 0x20
            {
                self.pos += 1;
            }
            match std::str::from_utf8(&self.bytes[run..self.pos]) {
                Ok(s) => text.push_str(s),
                Err(e) => {
                    return Err(self.fail_at(
                        run + e.valid_up_to(),
                        "invalid UTF-8 in a string (JSON text must be UTF-8)",
                    ));
                }
            }
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(text);
                }
                Some(b'\\') => text.push(self.escape()?),
                Some(b) => {
                    return Err(self.fail(format!(
                        "control character 0x{b:02x} in a string (escape it as \\u{b:04x})"
                    )));
                }
                None => return Err(self.fail("input ends inside a string")),
            }
        }
    }

    fn escape(&mut self) -> Result<char, InputError> {
        let at = self.pos;
        self.pos += 1; // `\`
        let Some(b) = self.peek() else {
            return Err(self.fail("input ends inside an escape"));
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4(at)?;
                match first {
                    0xD800..=0xDBFF => {
                        if !self.bytes[self.pos..].starts_with(b"\\u") {
                            return Err(self.fail_at(
                                at,
                                format!("lone surrogate \\u{first:04x}: a high surrogate must be followed by a low one"),
                            ));
                        }
                        self.pos += 2;
                        let second = self.hex4(at)?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.fail_at(
                                at,
                                format!("lone surrogate \\u{first:04x}: followed by \\u{second:04x}, not a low surrogate"),
                            ));
                        }
                        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                        char::from_u32(code).ok_or_else(|| self.fail_at(at, "invalid escape"))?
                    }
                    0xDC00..=0xDFFF => {
                        return Err(self.fail_at(
                            at,
                            format!(
                                "lone surrogate \\u{first:04x}: a low surrogate without a high one"
                            ),
                        ));
                    }
                    code => {
                        char::from_u32(code).ok_or_else(|| self.fail_at(at, "invalid escape"))?
                    }
                }
            }
            _ => {
                return Err(self.fail_at(at, "unknown escape in a string"));
            }
        };
        Ok(c)
    }

    fn hex4(&mut self, escape_at: usize) -> Result<u32, InputError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u32::from_str_radix(d, 16).ok());
        let Some(code) = digits else {
            return Err(self.fail_at(escape_at, "\\u must be followed by four hex digits"));
        };
        self.pos += 4;
        Ok(code)
    }
}

/// `text` as a JSON string (serde_json's escaping: the one canonical form).
fn write_string(text: &str, out: &mut Vec<u8>) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A key as it appears in a message: JSON-quoted, at most 64 characters.
fn quoted(key: &str) -> String {
    let short: String = key.chars().take(64).collect();
    let mut q = serde_json::to_string(&short).unwrap_or_default();
    if short.len() < key.len() {
        q.push('…');
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(input: &[u8]) -> InputError {
        match validate(input) {
            Ok(()) => panic!("{:?} must be refused", String::from_utf8_lossy(input)),
            Err(e) => e,
        }
    }

    #[test]
    fn accepts_what_rfc_8259_allows() {
        for doc in [
            &br#"{"a":[1,-0.5e+3,true,false,null,"x\"\\\/\b\f\n\r\tA\u00e9\ud83d\ude00"],"b":{}}"#
                [..],
            b" [ ] ",
            b"0",
            b"\"\xc3\xa9\xf0\x9f\x98\x80\"",
            b"{\"a\":{\"a\":1},\"b\":{\"a\":1}}",
        ] {
            validate(doc).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(doc)));
            // serde_json, which the guests use, reads them too.
            serde_json::from_slice::<serde_json::Value>(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(doc)));
        }
    }

    #[test]
    fn refuses_what_readers_could_see_differently_naming_where() {
        let e = refused(b"{\"a\":\"\xff\"}");
        assert_eq!((e.offset, e.path.as_str()), (6, "$.a"), "{e}");
        assert!(e.what.contains("invalid UTF-8"), "{e}");
        // Overlong encodings and encoded surrogates are invalid UTF-8 too.
        assert!(refused(b"\"\xc0\xaf\"").what.contains("UTF-8"));
        assert!(refused(b"\"\xed\xa0\x80\"").what.contains("UTF-8"));

        let e = refused(br#"{"a":["x","\ud800"]}"#);
        assert_eq!((e.offset, e.path.as_str()), (11, "$.a[1]"), "{e}");
        assert!(e.what.contains("lone surrogate \\ud800"), "{e}");
        assert!(refused(br#""\udc00""#).what.contains("lone surrogate"));
        assert!(
            refused(br#""\ud800\u0041""#)
                .what
                .contains("lone surrogate")
        );

        let e = refused(br#"{"u":{"role":"viewer","role":"admin"}}"#);
        assert_eq!((e.offset, e.path.as_str()), (22, "$.u"), "{e}");
        assert_eq!(e.what, "duplicate key \"role\"");
        // The same key spelled with an escape is the same key.
        assert!(refused(br#"{"a":1,"\u0061":2}"#).what.contains("duplicate"));
        assert!(
            refused(b"{\"x y\":[{\"k\":1,\"k\":1}]}")
                .to_string()
                .ends_with("(at $[\"x y\"][0])")
        );
    }

    #[test]
    fn refuses_malformed_json_with_a_message() {
        for (doc, needle) in [
            (&b""[..], "empty"),
            (b"  ", "empty"),
            (b"{\"a\":1,}", "object key"),
            (b"[1,]", "JSON value"),
            (b"01", "leading zero"),
            (b"1.", "decimal point"),
            (b"1e", "exponent"),
            (b"tru", "JSON value"),
            (b"\"a", "ends inside a string"),
            (b"\"\x01\"", "control character 0x01"),
            (br#""\x""#, "unknown escape"),
            (br#""\u12""#, "four hex digits"),
            (b"{} {}", "trailing"),
            (b"NaN", "JSON value"),
        ] {
            let e = refused(doc);
            assert!(e.to_string().contains(needle), "{e} should say {needle:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(
            refused(deep.as_bytes())
                .what
                .contains("nesting deeper than 128")
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(validate(ok.as_bytes()).is_ok());
    }

    #[test]
    fn canonical_form_sorts_keys_and_keeps_numbers_as_written() {
        let canon = |s: &str| canonical(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            canon(" { \"b\" : [1.0, 1e0, 1] , \"a\":\"\\u0041\\/\" } "),
            br#"{"a":"A/","b":[1.0,1e0,1]}"#.to_vec()
        );
        // Different numbers stay different even where an f64 cannot tell them apart.
        assert_ne!(
            canon("12345678901234567890123"),
            canon("12345678901234567890124")
        );
    }

    #[test]
    fn members_gives_the_raw_value_of_each_top_level_key() {
        let doc = br#"{"input": {"b": 1, "a": [2]}, "x": null}"#;
        let members = members(doc).ok().flatten().unwrap_or_default();
        let found: Vec<(&str, &[u8])> = members
            .iter()
            .map(|(k, r)| (k.as_str(), &doc[r.clone()]))
            .collect();
        assert_eq!(
            found,
            [
                ("input", &br#"{"b": 1, "a": [2]}"#[..]),
                ("x", &b"null"[..])
            ]
        );
        assert_eq!(super::members(b"[1]"), Ok(None));
        assert!(super::members(br#"{"input":1,"input":2}"#).is_err());
    }
}
