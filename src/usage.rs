//! Token usage reported by an OpenAI-compatible upstream, found while the body streams through.
//!
//! [`UsageScanner`] is fed the response body chunk by chunk and finds the `usage` object of a
//! JSON body (`{"usage":{"prompt_tokens":..}}`) or of the final chunk of an SSE stream
//! (`data: {..,"usage":{..}}`), whatever the chunk boundaries. It keeps at most a few KiB: the
//! body itself is never buffered.
//!
//! Only the **top-level** `usage` key of the JSON body, or of an SSE event's JSON, counts: a
//! `usage` nested deeper (`{"provider_extra":{"usage":{..}}}`), inside a string, or in a
//! top-level array is ignored, so an upstream's extra fields cannot change what is charged. A
//! usage object must carry at least one token count (`prompt_tokens`, `completion_tokens` or
//! `total_tokens`) as a non-negative integer: `"usage": null` (stream chunks without usage) and
//! `"usage": {}` are no evidence and are skipped. When several top-level usage objects appear
//! (one per SSE event) the last one wins. In an SSE stream each line is parsed on its own, so a
//! malformed event cannot hide the ones after it.
//!
//! # Example
//!
//! ```
//! use tollgate::usage::{Usage, UsageScanner};
//!
//! let mut scanner = UsageScanner::new();
//! scanner.feed(b"data: {\"choices\":[],\"usage\":nu");
//! scanner.feed(b"ll}\n\ndata: {\"choices\":[],\"usa");
//! scanner.feed(b"ge\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\ndata: [DONE]\n\n");
//! assert_eq!(
//!     scanner.usage(),
//!     Some(Usage { prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 })
//! );
//! ```

/// Token counts of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// All tokens (the sum when the upstream omits it).
    pub total_tokens: u64,
}

impl Usage {
    /// Parse an OpenAI `usage` object. Missing counts are zero; `total_tokens` defaults to the
    /// sum. `None` when it is not an object, has none of the three counts, or a count is not a
    /// non-negative integer.
    pub fn from_json(value: &serde_json::Value) -> Option<Usage> {
        let object = value.as_object()?;
        // OpenAI's names, or the `input_tokens` / `output_tokens` of Anthropic-style and
        // Responses-style usage.
        const COUNTS: [&str; 5] = [
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "input_tokens",
            "output_tokens",
        ];
        if !COUNTS
            .iter()
            .any(|k| object.get(*k).is_some_and(serde_json::Value::is_u64))
        {
            return None;
        }
        let count = |k: &str| match object.get(k) {
            None | Some(serde_json::Value::Null) => Some(0),
            Some(v) => v.as_u64(),
        };
        let prompt_tokens = count("prompt_tokens")?.max(count("input_tokens")?);
        let completion_tokens = count("completion_tokens")?.max(count("output_tokens")?);
        let total_tokens = match count("total_tokens")? {
            0 => prompt_tokens.saturating_add(completion_tokens),
            n => n,
        };
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        })
    }
}

/// The largest `usage` object kept while scanning.
const MAX_CAPTURE: usize = 4096;
const KEY: &[u8] = b"usage";

/// How the body is framed, decided by its first non-blank byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Nothing but whitespace seen yet.
    Unknown,
    /// One JSON document (`{` or `[` first): newlines are whitespace.
    Json,
    /// Server-sent events (`data:`, `event:`, `:` first): every line is parsed on its own, so
    /// one malformed event cannot hide the next ones.
    Sse,
}

/// Where the scanner stands inside the current top-level JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    /// Not at a key of the top-level object (or not inside one).
    None,
    /// Inside a string at depth 1: `len` bytes of it matched `usage` so far (`None`: no match).
    Reading(Option<usize>),
    /// The top-level key `"usage"` was read; waiting for its `:`.
    Read,
    /// After `"usage":`, before its value.
    Colon,
}

/// Finds the top-level `usage` object in a streamed JSON or SSE body. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct UsageScanner {
    framing: Framing,
    /// Nesting depth of objects and arrays (0: between values).
    depth: u32,
    /// Whether the outermost container is an object (keys only count there).
    top_object: bool,
    in_string: bool,
    escaped: bool,
    key: Key,
    /// `Some` while the value of a top-level `usage` key is captured.
    capture: Option<Vec<u8>>,
    found: Option<Usage>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageScanner {
    /// A scanner that has seen nothing.
    pub fn new() -> Self {
        UsageScanner {
            framing: Framing::Unknown,
            depth: 0,
            top_object: false,
            in_string: false,
            escaped: false,
            key: Key::None,
            capture: None,
            found: None,
        }
    }

    /// The last complete top-level usage object seen.
    pub fn usage(&self) -> Option<Usage> {
        self.found
    }

    /// Feed the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            self.byte(b);
        }
    }

    /// Back to "between values" (a new SSE line, or a value that could not be followed).
    fn reset_value(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.key = Key::None;
        self.capture = None;
    }

    fn byte(&mut self, b: u8) {
        if self.framing == Framing::Unknown {
            // Whitespace, or a UTF-8 byte order mark (EF BB BF), before the first value.
            if b.is_ascii_whitespace() || matches!(b, 0xEF | 0xBB | 0xBF) {
                return;
            }
            self.framing = if b == b'{' || b == b'[' {
                Framing::Json
            } else {
                Framing::Sse
            };
        }
        if self.framing == Framing::Sse && (b == b'\n' || b == b'\r') {
            // An event's JSON is on one line: whatever was left open is malformed.
            self.reset_value();
            return;
        }
        if let Some(capture) = &mut self.capture {
            if capture.len() >= MAX_CAPTURE {
                // Too large to be a usage object: skip it (the depth tracking goes on).
                self.capture = None;
            } else {
                capture.push(b);
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
                if let Key::Reading(matched) = &mut self.key {
                    *matched = None;
                }
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if let Key::Reading(matched) = self.key {
                    self.key = if matched == Some(KEY.len()) {
                        Key::Read
                    } else {
                        Key::None
                    };
                }
            } else if let Key::Reading(matched) = &mut self.key {
                *matched = match *matched {
                    Some(n) if n < KEY.len() && KEY[n] == b => Some(n + 1),
                    _ => None,
                };
            }
            return;
        }
        if b.is_ascii_whitespace() {
            return;
        }
        match self.key {
            Key::Read if b == b':' => {
                self.key = Key::Colon;
                return;
            }
            Key::Colon => {
                self.key = Key::None;
                if b == b'{' {
                    self.capture = Some(Vec::with_capacity(64));
                    if let Some(capture) = &mut self.capture {
                        capture.push(b);
                    }
                }
            }
            _ => self.key = Key::None,
        }
        match b {
            b'"' if self.depth > 0 => {
                self.in_string = true;
                if self.depth == 1 && self.top_object {
                    self.key = Key::Reading(Some(0));
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    self.top_object = b == b'{';
                }
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' if self.depth > 0 => {
                self.depth -= 1;
                if self.depth == 1 {
                    if let Some(capture) = self.capture.take() {
                        if let Ok(value) = serde_json::from_slice(&capture) {
                            if let Some(usage) = Usage::from_json(&value) {
                                self.found = Some(usage);
                            }
                        }
                    }
                }
                if self.depth == 0 {
                    self.capture = None;
                }
            }
            _ => {}
        }
    }
}

/// At most this many decoded bytes of a compressed body are scanned (a decompression bomb costs
/// no more than that).
const MAX_DECODED: u64 = 256 << 20;

/// Feeds decoded bytes to the scanner.
struct Sink {
    scanner: UsageScanner,
    seen: u64,
}

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.seen < MAX_DECODED {
            self.scanner.feed(buf);
            self.seen += buf.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Coded {
    Identity(UsageScanner),
    Gzip(Box<flate2::write::GzDecoder<Sink>>),
    Deflate(Box<flate2::write::ZlibDecoder<Sink>>),
    /// A coding that cannot be decoded here (`br`, `zstd`, a broken stream): what was found
    /// before stays.
    Opaque(Option<Usage>),
}

/// A [`UsageScanner`] behind the response's `content-encoding`: `gzip` and `deflate` bodies are
/// decoded for scanning (the client still gets the bytes as they came).
pub(crate) struct CodedScanner(Coded);

impl CodedScanner {
    /// For a body in this `content-encoding` (`None`: identity).
    pub(crate) fn new(encoding: Option<&[u8]>) -> Self {
        let sink = || Sink {
            scanner: UsageScanner::new(),
            seen: 0,
        };
        let trimmed = encoding.map(<[u8]>::trim_ascii);
        CodedScanner(match trimmed {
            None | Some(b"") => Coded::Identity(UsageScanner::new()),
            Some(e) if e.eq_ignore_ascii_case(b"identity") => Coded::Identity(UsageScanner::new()),
            Some(e) if e.eq_ignore_ascii_case(b"gzip") || e.eq_ignore_ascii_case(b"x-gzip") => {
                Coded::Gzip(Box::new(flate2::write::GzDecoder::new(sink())))
            }
            Some(e) if e.eq_ignore_ascii_case(b"deflate") => {
                Coded::Deflate(Box::new(flate2::write::ZlibDecoder::new(sink())))
            }
            Some(_) => {
                tracing::warn!(
                    "response in a content coding tollgate cannot decode: its usage is not read"
                );
                Coded::Opaque(None)
            }
        })
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        use std::io::Write;
        let failed = match &mut self.0 {
            Coded::Identity(scanner) => {
                scanner.feed(chunk);
                false
            }
            // Flushed each time: what the chunk decodes to is scanned now, not at the next one.
            Coded::Gzip(decoder) => decoder
                .write_all(chunk)
                .and_then(|()| decoder.flush())
                .is_err(),
            Coded::Deflate(decoder) => decoder
                .write_all(chunk)
                .and_then(|()| decoder.flush())
                .is_err(),
            Coded::Opaque(_) => false,
        };
        if failed {
            tracing::warn!(
                "compressed response could not be decoded: its usage is not read further"
            );
            self.0 = Coded::Opaque(self.usage());
        }
    }

    pub(crate) fn usage(&self) -> Option<Usage> {
        match &self.0 {
            Coded::Identity(scanner) => scanner.usage(),
            Coded::Gzip(decoder) => decoder.get_ref().scanner.usage(),
            Coded::Deflate(decoder) => decoder.get_ref().scanner.usage(),
            Coded::Opaque(found) => *found,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Option<Usage> {
        let mut s = UsageScanner::new();
        for c in body.chunks(piece) {
            s.feed(c);
        }
        s.usage()
    }

    #[test]
    fn json_body_any_split() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\" word {"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        for piece in 1..body.len() {
            assert_eq!(
                scan_in_pieces(body, piece),
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4,
                    total_tokens: 7
                }),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn null_usage_is_skipped_and_total_defaults_to_sum() {
        let body = b"data: {\"usage\": null}\n\ndata: {\"usage\": {\"prompt_tokens\": 2, \"completion_tokens\": 5}}\n\n";
        assert_eq!(
            scan_in_pieces(body, 3),
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 5,
                total_tokens: 7
            })
        );
    }

    #[test]
    fn only_the_top_level_usage_counts() {
        let three = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
        };
        let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"provider_extra":{"usage":{"prompt_tokens":9,"completion_tokens":12}},"choices":[{"usage":{"total_tokens":50}}],"note":"\"usage\":{\"total_tokens\":70}"}"#;
        for piece in 1..body.len() {
            assert_eq!(scan_in_pieces(body, piece), Some(three), "piece {piece}");
        }
        // A key that merely contains `usage`, a value that is the string "usage".
        let body = br#"{"model":"usage","xusage":{"total_tokens":5},"usages":{"total_tokens":6}}"#;
        assert_eq!(scan_in_pieces(body, 5), None);
        // A top-level array is not a usage report.
        assert_eq!(
            scan_in_pieces(br#"[{"usage":{"total_tokens":5}}]"#, 5),
            None
        );
        // Pretty-printed JSON (newlines are whitespace in a JSON body).
        let body = b"{\n  \"usage\" :\n {\"prompt_tokens\": 1,\n \"completion_tokens\": 2}\n}\n";
        assert_eq!(scan_in_pieces(body, 3), Some(three));
    }

    #[test]
    fn a_byte_order_mark_and_input_output_names_are_understood() {
        let body = b"\xEF\xBB\xBF{\n \"usage\": {\"input_tokens\": 3, \"output_tokens\": 4}\n}";
        assert_eq!(
            scan_in_pieces(body, 2),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7
            })
        );
    }

    #[test]
    fn an_empty_usage_object_is_no_evidence() {
        assert_eq!(scan_in_pieces(br#"{"usage":{}}"#, 4), None);
        assert_eq!(scan_in_pieces(br#"{"usage":{"cached":true}}"#, 4), None);
    }

    #[test]
    fn a_malformed_sse_event_does_not_hide_the_next() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"cut\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            scan_in_pieces(body, 7),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 5,
                total_tokens: 9
            })
        );
        // Nested usage inside an SSE event is ignored too.
        let body = b"data: {\"x\":{\"usage\":{\"total_tokens\":8}}}\n\n";
        assert_eq!(scan_in_pieces(body, 2), None);
    }

    #[test]
    fn gzip_and_deflate_bodies_are_decoded_for_scanning() {
        use std::io::Write;
        let body = br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(body).unwrap();
        let zl = zl.finish().unwrap();
        let five = Some(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
            total_tokens: 5,
        });
        for (coding, bytes) in [(&b"gzip"[..], &gz), (b"deflate", &zl)] {
            let mut scanner = CodedScanner::new(Some(coding));
            for piece in bytes.chunks(3) {
                scanner.feed(piece);
            }
            assert_eq!(scanner.usage(), five);
        }
        let mut broken = CodedScanner::new(Some(b"gzip"));
        broken.feed(b"not gzip at all");
        assert_eq!(broken.usage(), None);
        let mut br = CodedScanner::new(Some(b"br"));
        br.feed(body);
        assert_eq!(br.usage(), None);
    }

    #[test]
    fn garbage_finds_nothing() {
        assert_eq!(scan_in_pieces(b"<html>usage: {}</html>", 4), None);
        assert_eq!(
            scan_in_pieces(b"{\"usage\":{\"prompt_tokens\":-1}}", 4),
            None
        );
    }
}
