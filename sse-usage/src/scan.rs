//! The usage object of a server-sent event stream, found as the stream's bytes pass: no copy of
//! the stream, no JSON tree, one pass over each byte with a few flags of state.
//!
//! What is read is what the gateway's earlier `sse_to_metadata` rules read: in each event's data
//! (the `data:` lines of one event, joined), a JSON object whose top-level key `usage` (OpenAI's
//! chat and text completions, and the OpenAI-compatible providers) or `response.usage` (the
//! Responses API's `response.completed` event) is an object. That object's JSON text, as the
//! provider sent it, is the result; a later event's replaces it (some providers send running
//! totals in every chunk: the last is the stream's). `null` (OpenAI's content chunks with
//! `include_usage`), other types and events that are not JSON objects (`[DONE]`) give nothing.
//!
//! A key is compared as its raw bytes: a key written with escapes (`"us\u0061ge"`) is not
//! recognised (no provider writes one). A string value that reads `usage` is a value, not a key,
//! and quotes inside strings are escaped, so text in an answer can never look like a key.

/// Longest usage object kept (bytes). `sse_to_metadata` was configured with 64 KiB events; usage
/// objects are a few hundred bytes.
pub const MAX_USAGE_BYTES: usize = 65536;

/// Longest event [`UsageScanner::feed_hiding`] holds back: a usage-only event is a usage object
/// and a few ids. A longer event goes on as it arrives (it is not the one to hide).
pub const MAX_HELD_EVENT: usize = 2 * MAX_USAGE_BYTES;

/// Deepest nesting tracked; an event nested deeper is not read (no usage object is there).
const MAX_DEPTH: u32 = 64;

/// The bytes of `data:` that open a data line.
const DATA_FIELD: &[u8] = b"data:";

/// Where the reader is in the SSE framing (the WHATWG `text/event-stream` format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// At the start of a line, or inside `data:` with this many of its bytes matched.
    Field(usize),
    /// Just after `data:`: one optional space follows.
    AfterColon,
    /// In a data line's value: the JSON.
    Data,
    /// In a line that is not a data line (`event:`, `id:`, a `:` comment...).
    Other,
}

/// A key of interest, once read: which value comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Pending {
    #[default]
    None,
    /// The value of a `usage` key where one is read.
    Usage,
    /// The value of the top-level `response` key.
    Response,
    /// The value of the top-level `choices` key.
    Choices,
}

/// The scanner of one stream.
#[derive(Debug)]
pub struct UsageScanner {
    line: Line,
    /// The previous byte was a `\r` ending a line (a `\n` right after it ends the same line).
    after_cr: bool,
    /// The stream is not server-sent events (its body starts as JSON): nothing is read.
    off: bool,
    /// Bytes seen so far (only whether any were, for `off`).
    started: bool,
    json: Json,
    /// The usage object being read.
    capture: Vec<u8>,
    /// The last whole usage object.
    found: Vec<u8>,
    /// When hiding ([`UsageScanner::feed_hiding`]): the bytes of the current event so far.
    event: Vec<u8>,
    /// An event just ended (set by the blank line, taken by `feed_hiding`).
    event_ended: bool,
    /// The event that just ended was a usage-only event: `choices` empty and a `usage` object.
    usage_only: bool,
    /// An event ended at a `\r`: a `\n` right after it is part of its end, kept or dropped with it.
    lf_of_event: Option<bool>,
    /// The current event grew past [`MAX_HELD_EVENT`]: its bytes go on as they arrive.
    spilling: bool,
}

/// JSON state of the current event.
#[derive(Debug, Default)]
struct Json {
    /// Open containers.
    depth: u32,
    /// Bit `d` set: the container at depth `d + 1` is an object (else an array).
    objects: u64,
    in_string: bool,
    escape: bool,
    /// In an object, before a key.
    expect_key: bool,
    /// Reading a key of a container whose keys matter (depth 1, or the `response` object).
    reading_key: bool,
    key: [u8; 8],
    key_len: usize,
    pending: Pending,
    /// The object at depth 2 is the top-level `response` value.
    response_open: bool,
    /// Capturing a usage object that opened at this depth (0: not capturing).
    capture_depth: u32,
    /// The event cannot be read (too deep, usage object too long): skip to its end.
    broken: bool,
    /// The top-level `choices` array just opened: its next byte says whether it is empty.
    choices_opened: bool,
    /// The event's top-level `choices` is `[]`.
    choices_empty: bool,
    /// The event had a top-level usage object.
    has_usage: bool,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageScanner {
    pub fn new() -> Self {
        UsageScanner {
            line: Line::Field(0),
            after_cr: false,
            off: false,
            started: false,
            json: Json::default(),
            capture: Vec::new(),
            found: Vec::new(),
            event: Vec::new(),
            event_ended: false,
            usage_only: false,
            lf_of_event: None,
            spilling: false,
        }
    }

    /// Reads the next bytes of the stream. True when a usage object was completed in them: the
    /// last one is [`UsageScanner::usage`].
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        if bytes.is_empty() || !self.is_stream(bytes) {
            return false;
        }
        let mut completed = false;
        for &b in bytes {
            completed |= self.byte(b);
        }
        completed
    }

    /// As [`UsageScanner::feed`], and writes the stream to `out` without its usage-only events
    /// (no `choices`, a `usage` object: the chunk OpenAI sends last with
    /// `stream_options.include_usage`), for the streams whose client did not ask for it. Complete
    /// events go on as they are; a partial one waits for its end (one the stream ends in the middle
    /// of is never written, as an SSE client drops it). [`UsageScanner::holding`] says how many
    /// bytes wait.
    pub fn feed_hiding(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> bool {
        if bytes.is_empty() {
            return false;
        }
        if !self.is_stream(bytes) {
            out.extend_from_slice(bytes);
            return false;
        }
        let mut completed = false;
        for &b in bytes {
            if let Some(kept) = self.lf_of_event.take()
                && b == b'\n'
            {
                if kept {
                    out.push(b);
                }
                self.byte(b);
                continue;
            }
            if self.spilling {
                out.push(b);
                completed |= self.byte(b);
                if std::mem::take(&mut self.event_ended) {
                    self.spilling = false;
                    if b == b'\r' {
                        self.lf_of_event = Some(true);
                    }
                }
                continue;
            }
            self.event.push(b);
            completed |= self.byte(b);
            if !self.event_ended && self.event.len() > MAX_HELD_EVENT {
                out.extend_from_slice(&self.event);
                self.event.clear();
                self.spilling = true;
            }
            if std::mem::take(&mut self.event_ended) {
                let kept = !self.usage_only;
                if kept {
                    out.extend_from_slice(&self.event);
                }
                self.event.clear();
                if b == b'\r' {
                    self.lf_of_event = Some(kept);
                }
            }
        }
        completed
    }

    /// Whether the answer is read, decided by its first byte: a whole JSON answer (the front Lua
    /// reads those) is not read twice. `bytes` is not empty.
    fn is_stream(&mut self, bytes: &[u8]) -> bool {
        if !self.started {
            self.started = true;
            self.off = matches!(bytes[0], b'{' | b'[');
        }
        !self.off
    }

    /// Bytes of a partial event [`UsageScanner::feed_hiding`] holds back.
    pub fn holding(&self) -> usize {
        self.event.len()
    }

    /// The last usage object read, as the provider wrote it (empty before any).
    pub fn usage(&self) -> &[u8] {
        &self.found
    }

    fn byte(&mut self, b: u8) -> bool {
        let after_cr = std::mem::replace(&mut self.after_cr, false);
        if b == b'\n' && after_cr {
            return false;
        }
        if b == b'\r' || b == b'\n' {
            self.after_cr = b == b'\r';
            return self.end_of_line();
        }
        match self.line {
            Line::Field(n) => {
                if b == DATA_FIELD[n] {
                    self.line = if n + 1 == DATA_FIELD.len() {
                        Line::AfterColon
                    } else {
                        Line::Field(n + 1)
                    };
                } else {
                    self.line = Line::Other;
                }
                false
            }
            Line::AfterColon => {
                self.line = Line::Data;
                if b == b' ' { false } else { self.json_byte(b) }
            }
            Line::Data => self.json_byte(b),
            Line::Other => false,
        }
    }

    fn end_of_line(&mut self) -> bool {
        let completed = match self.line {
            // A blank line ends the event.
            Line::Field(0) => {
                self.end_of_event();
                false
            }
            // Data lines of one event are joined with a line feed.
            Line::Data | Line::AfterColon => self.json_byte(b'\n'),
            _ => false,
        };
        self.line = Line::Field(0);
        completed
    }

    fn end_of_event(&mut self) {
        self.usage_only = self.json.choices_empty && self.json.has_usage;
        self.event_ended = true;
        self.json = Json::default();
        self.capture.clear();
    }

    /// One byte of an event's JSON. True when it closed a usage object.
    fn json_byte(&mut self, b: u8) -> bool {
        let j = &mut self.json;
        if j.broken {
            return false;
        }
        if j.capture_depth > 0 {
            if self.capture.len() >= MAX_USAGE_BYTES {
                j.broken = true;
                self.capture.clear();
                return false;
            }
            self.capture.push(b);
        }
        if j.in_string {
            if j.escape {
                j.escape = false;
            } else if b == b'\\' {
                j.escape = true;
                // A key with escapes is not one of ours.
                if j.reading_key {
                    j.key_len = usize::MAX;
                }
            } else if b == b'"' {
                j.in_string = false;
                if j.reading_key {
                    j.reading_key = false;
                    j.pending = j.key_of_interest();
                }
            } else if j.reading_key && j.key_len < j.key.len() {
                j.key[j.key_len] = b;
                j.key_len += 1;
            } else if j.reading_key {
                j.key_len = usize::MAX;
            }
            return false;
        }
        if j.choices_opened && !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            j.choices_opened = false;
            j.choices_empty = b == b']';
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => false,
            b'"' => {
                j.in_string = true;
                if j.expect_key {
                    j.expect_key = false;
                    j.reading_key = j.depth == 1 || (j.depth == 2 && j.response_open);
                    j.key_len = 0;
                } else {
                    self.value_start(b);
                }
                false
            }
            b'{' | b'[' => {
                self.value_start(b);
                let j = &mut self.json;
                if j.depth >= MAX_DEPTH {
                    j.broken = true;
                    return false;
                }
                if b == b'{' {
                    j.objects |= 1 << j.depth;
                } else {
                    j.objects &= !(1 << j.depth);
                }
                j.depth += 1;
                j.expect_key = b == b'{';
                false
            }
            b'}' | b']' => {
                if j.depth == 0 {
                    j.broken = true;
                    return false;
                }
                j.depth -= 1;
                j.expect_key = false;
                if j.depth < 2 {
                    j.response_open = false;
                }
                if j.capture_depth > 0 && j.depth < j.capture_depth {
                    j.capture_depth = 0;
                    j.has_usage = true;
                    std::mem::swap(&mut self.found, &mut self.capture);
                    self.capture.clear();
                    return true;
                }
                false
            }
            b',' => {
                j.expect_key = j.depth > 0 && j.objects & (1 << (j.depth - 1)) != 0;
                false
            }
            b':' => false,
            _ => {
                self.value_start(b);
                false
            }
        }
    }

    /// The first byte of a value (or any byte of a number or literal: only the first matters).
    fn value_start(&mut self, b: u8) {
        let j = &mut self.json;
        match std::mem::replace(&mut j.pending, Pending::None) {
            Pending::Usage if b == b'{' && j.capture_depth == 0 => {
                j.capture_depth = j.depth + 1;
                self.capture.clear();
                self.capture.push(b'{');
            }
            Pending::Response if b == b'{' => j.response_open = true,
            Pending::Choices if b == b'[' && j.depth == 1 => j.choices_opened = true,
            _ => {}
        }
    }
}

impl Json {
    fn key_of_interest(&self) -> Pending {
        let key = if self.key_len <= self.key.len() {
            &self.key[..self.key_len]
        } else {
            return Pending::None;
        };
        match (self.depth, key) {
            (1, b"usage") => Pending::Usage,
            (1, b"response") => Pending::Response,
            (1, b"choices") => Pending::Choices,
            (2, b"usage") if self.response_open => Pending::Usage,
            _ => Pending::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every usage object completed while feeding `chunks`, in order.
    fn read(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = UsageScanner::new();
        let mut out = Vec::new();
        for c in chunks {
            if s.feed(c) {
                out.push(String::from_utf8(s.usage().to_vec()).unwrap());
            }
        }
        out
    }

    const USAGE: &str = r#"{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}"#;

    fn openai_stream() -> String {
        [
            r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}"#,
            r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"the \"usage\": {\"a\":1} is"}}],"usage":null}"#,
            &format!(r#"data: {{"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{USAGE}}}"#),
            "data: [DONE]",
            "",
        ]
        .join("\n\n")
    }

    #[test]
    fn reads_the_usage_chunk_of_an_openai_stream_and_nothing_else() {
        assert_eq!(read(&[openai_stream().as_bytes()]), vec![USAGE.to_string()]);
    }

    #[test]
    fn every_cut_of_the_stream_gives_the_same_usage() {
        let s = openai_stream();
        let b = s.as_bytes();
        for i in 1..b.len() {
            assert_eq!(
                read(&[&b[..i], &b[i..]]),
                vec![USAGE.to_string()],
                "cut at {i}"
            );
        }
        // And byte by byte.
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(read(&bytes), vec![USAGE.to_string()]);
    }

    #[test]
    fn crlf_and_cr_line_ends_and_no_space_after_the_colon() {
        for end in ["\r\n", "\r"] {
            let s = format!(
                "event: chunk{end}data:{{\"choices\":[]}}{end}{end}data:{{\"usage\":{USAGE}}}{end}{end}data:[DONE]{end}{end}"
            );
            let b = s.as_bytes();
            for i in 1..b.len() {
                assert_eq!(
                    read(&[&b[..i], &b[i..]]),
                    vec![USAGE.to_string()],
                    "{end:?} cut at {i}"
                );
            }
        }
    }

    #[test]
    fn the_last_of_running_totals_wins() {
        let s =
            "data: {\"usage\":{\"total_tokens\":1}}\n\ndata: {\"usage\":{\"total_tokens\":2}}\n\n";
        let mut sc = UsageScanner::new();
        assert!(sc.feed(s.as_bytes()));
        assert_eq!(sc.usage(), br#"{"total_tokens":2}"#);
    }

    #[test]
    fn responses_api_usage_is_under_response() {
        let s = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[{\"usage\":{\"no\":1}}],\"usage\":{\"input_tokens\":5,\"output_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":0}}}}\n\n",
        );
        assert_eq!(
            read(&[s.as_bytes()]),
            vec![
                r#"{"input_tokens":5,"output_tokens":7,"input_tokens_details":{"cached_tokens":0}}"#
            ]
        );
    }

    #[test]
    fn usage_keys_that_are_not_top_level_are_not_read() {
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"usage\":{\"x\":1}}}],\"meta\":{\"usage\":{\"y\":2}}}\n\n",
            "data: {\"usage\":\"text\",\"u\":{\"response\":{\"usage\":{\"z\":3}}}}\n\n",
            "data: [{\"usage\":{\"w\":4}}]\n\n",
        );
        assert!(read(&[s.as_bytes()]).is_empty());
    }

    #[test]
    fn a_usage_object_with_strings_braces_and_escapes_is_taken_whole() {
        let u = r#"{"note":"a } and a \" and { ","n":[1,{"k":"}"}],"total_tokens":3}"#;
        let s = format!("data: {{\"usage\":{u},\"after\":1}}\n\n");
        assert_eq!(read(&[s.as_bytes()]), vec![u.to_string()]);
    }

    #[test]
    fn data_split_over_lines_of_one_event_is_joined() {
        let s = "data: {\"usage\":\ndata: {\"total_tokens\":3}}\n\n";
        assert_eq!(
            read(&[s.as_bytes()]),
            vec!["{\"total_tokens\":3}".to_string()]
        );
    }

    #[test]
    fn an_event_cut_off_before_its_end_gives_nothing_and_the_next_is_read() {
        let s =
            "data: {\"usage\":{\"total_tokens\":3\n\ndata: {\"usage\":{\"total_tokens\":4}}\n\n";
        assert_eq!(
            read(&[s.as_bytes()]),
            vec!["{\"total_tokens\":4}".to_string()]
        );
    }

    #[test]
    fn whole_json_answers_are_not_read() {
        let s = format!(
            "{{\"object\":\"chat.completion\",\"usage\":{USAGE}}}\ndata: {{\"usage\":{{}}}}\n\n"
        );
        assert!(read(&[s.as_bytes()]).is_empty());
    }

    #[test]
    fn too_long_or_too_deep_events_are_skipped_without_harm() {
        let long = format!(
            "data: {{\"usage\":{{\"pad\":\"{}\"}}}}\n\ndata: {{\"usage\":{{\"total_tokens\":5}}}}\n\n",
            "x".repeat(MAX_USAGE_BYTES)
        );
        assert_eq!(
            read(&[long.as_bytes()]),
            vec!["{\"total_tokens\":5}".to_string()]
        );
        let deep = format!(
            "data: {{\"a\":{}{}}}\n\ndata: {{\"usage\":{{\"total_tokens\":6}}}}\n\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(
            read(&[deep.as_bytes()]),
            vec!["{\"total_tokens\":6}".to_string()]
        );
    }

    /// Hides while reading; the written stream, the usage objects completed and what is held.
    fn hide(chunks: &[&[u8]]) -> (String, Vec<String>, usize) {
        let mut s = UsageScanner::new();
        let (mut out, mut usage) = (Vec::new(), Vec::new());
        for c in chunks {
            if s.feed_hiding(c, &mut out) {
                usage.push(String::from_utf8(s.usage().to_vec()).unwrap());
            }
        }
        (String::from_utf8(out).unwrap(), usage, s.holding())
    }

    #[test]
    fn the_usage_only_event_is_taken_out_at_every_cut_and_still_read() {
        let events: Vec<String> = openai_stream()
            .split_inclusive("\n\n")
            .map(String::from)
            .collect();
        // The content chunk's text imitates usage; the first and second chunks have "usage": null.
        let expected: String = [&events[0], &events[1], &events[3]]
            .map(|e| e.as_str())
            .concat();
        let stream = openai_stream();
        let b = stream.as_bytes();
        for i in 1..b.len() {
            let (out, usage, held) = hide(&[&b[..i], &b[i..]]);
            assert_eq!(out, expected, "cut at {i}");
            assert_eq!(usage, vec![USAGE.to_string()], "cut at {i}");
            assert_eq!(held, 0);
        }
        // CRLF line ends, byte by byte.
        let crlf = stream.replace('\n', "\r\n");
        let bytes: Vec<&[u8]> = crlf.as_bytes().chunks(1).collect();
        let (out, usage, _) = hide(&bytes);
        assert_eq!(out, expected.replace('\n', "\r\n"));
        assert_eq!(usage, vec![USAGE.to_string()]);
        // A partial event is held until its end; one the stream ends in is never written.
        let (out, _, held) = hide(&[format!("{}data: {{\"choi", events[0]).as_bytes()]);
        assert_eq!((out.as_str(), held), (events[0].as_str(), 12));
    }

    #[test]
    fn hiding_keeps_every_event_that_is_not_usage_only() {
        let s = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0}],\"usage\":{\"total_tokens\":3}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"choices\": [ ],\"note\":\"usage\"}\n\n",
            "data: [DONE]\n\n",
        );
        let (out, usage, _) = hide(&[s.as_bytes()]);
        assert_eq!(out, s);
        assert_eq!(usage, vec!["{\"total_tokens\":3}".to_string()]);
        let whole = r#"{"choices":[],"usage":{"total_tokens":1}}"#;
        assert_eq!(hide(&[whole.as_bytes()]).0, whole);
    }

    #[test]
    fn a_long_event_is_not_held_back_and_the_usage_event_after_it_still_hidden() {
        let long = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(3 * MAX_HELD_EVENT)
        );
        let usage_only = format!("data: {{\"choices\":[],\"usage\":{USAGE}}}\n\n");
        let stream = format!("{long}{usage_only}data: [DONE]\n\n");
        for size in [1000, 65536, stream.len()] {
            let mut scanner = UsageScanner::new();
            let mut out = Vec::new();
            let mut most_held = 0;
            for chunk in stream.as_bytes().chunks(size) {
                scanner.feed_hiding(chunk, &mut out);
                most_held = most_held.max(scanner.holding());
            }
            assert!(most_held <= MAX_HELD_EVENT, "held {most_held} bytes");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{long}data: [DONE]\n\n")
            );
            assert_eq!(scanner.usage(), USAGE.as_bytes());
        }
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        let s = ": keep-alive\nid: 7\nevent: x\ndata: {\"usage\":{\"t\":1}}\nretry: 10\n\n";
        assert_eq!(read(&[s.as_bytes()]), vec!["{\"t\":1}".to_string()]);
    }
}
