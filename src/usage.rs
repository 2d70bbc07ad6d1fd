//! Token usage reported by an OpenAI-compatible upstream, found while the body streams through.
//!
//! [`UsageScanner`] is fed the response body chunk by chunk and finds the `usage` object of a
//! JSON body (`{"usage":{"prompt_tokens":..}}`) or of the final chunk of an SSE stream
//! (`data: {..,"usage":{..}}`), whatever the chunk boundaries. It keeps at most a few KiB: the
//! body itself is never buffered. A `"usage": null` (stream chunks without usage) is skipped; when
//! several usage objects appear the last one wins.
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
    /// sum. `None` when it is not an object or a count is not a non-negative integer.
    pub fn from_json(value: &serde_json::Value) -> Option<Usage> {
        let object = value.as_object()?;
        let count = |k: &str| match object.get(k) {
            None | Some(serde_json::Value::Null) => Some(0),
            Some(v) => v.as_u64(),
        };
        let prompt_tokens = count("prompt_tokens")?;
        let completion_tokens = count("completion_tokens")?;
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
const KEY: &[u8] = b"\"usage\"";

#[derive(Clone, Debug)]
enum State {
    /// Looking for `"usage"`; `matched` bytes of the key seen so far.
    Searching { matched: usize },
    /// After the key, before the value.
    AfterKey { colon: bool },
    /// Inside the object.
    Capturing {
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// Finds the `usage` object in a streamed JSON or SSE body. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct UsageScanner {
    state: State,
    capture: Vec<u8>,
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
            state: State::Searching { matched: 0 },
            capture: Vec::new(),
            found: None,
        }
    }

    /// The last complete usage object seen.
    pub fn usage(&self) -> Option<Usage> {
        self.found
    }

    /// Feed the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match &mut self.state {
                State::Searching { matched } => {
                    if b == KEY[*matched] {
                        *matched += 1;
                        if *matched == KEY.len() {
                            self.state = State::AfterKey { colon: false };
                        }
                    } else {
                        *matched = usize::from(b == KEY[0]);
                    }
                }
                State::AfterKey { colon } => {
                    if b.is_ascii_whitespace() {
                    } else if b == b':' && !*colon {
                        *colon = true;
                    } else if b == b'{' && *colon {
                        self.capture.clear();
                        self.capture.push(b);
                        self.state = State::Capturing {
                            depth: 1,
                            in_string: false,
                            escaped: false,
                        };
                    } else {
                        // `null`, a number, or `"usage"` was a value, not a key: search again
                        // from this byte.
                        self.state = State::Searching { matched: 0 };
                        continue;
                    }
                }
                State::Capturing {
                    depth,
                    in_string,
                    escaped,
                } => {
                    if self.capture.len() >= MAX_CAPTURE {
                        self.capture.clear();
                        self.state = State::Searching { matched: 0 };
                        continue;
                    }
                    self.capture.push(b);
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else if b == b'"' {
                        *in_string = true;
                    } else if b == b'{' {
                        *depth += 1;
                    } else if b == b'}' {
                        *depth -= 1;
                        if *depth == 0 {
                            if let Ok(value) = serde_json::from_slice(&self.capture) {
                                if let Some(usage) = Usage::from_json(&value) {
                                    self.found = Some(usage);
                                }
                            }
                            self.capture.clear();
                            self.state = State::Searching { matched: 0 };
                        }
                    }
                }
            }
            i += 1;
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
    fn garbage_finds_nothing() {
        assert_eq!(scan_in_pieces(b"<html>usage: {}</html>", 4), None);
        assert_eq!(
            scan_in_pieces(b"{\"usage\":{\"prompt_tokens\":-1}}", 4),
            None
        );
    }
}
