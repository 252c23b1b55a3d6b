//! The request checker: what the gateway lets a workload send to a provider, decided on the
//! request body parsed by a real JSON parser (serde_json), never by patterns.
//!
//! A body of one of the operations the gateway reads ([`Operation`]) must be one JSON object,
//! valid UTF-8, with no key repeated at any depth (providers' parsers disagree on which copy
//! wins: the gateway would check one and the provider use the other), nested at most 128 deep
//! (serde_json's limit), with a top-level `model` that is a non-empty string without control
//! characters, a `stream` that is a boolean when present, and a `stream_options` that is an
//! object when present. Anything else is refused with the reason ([`Refusal`]).
//!
//! A body that passes is written again in one canonical form ([`Checked::body`]):
//!
//! ```text
//! {"model":"<model>"[,"stream_options":{"include_usage":true}][,<every other member as sent>]}
//! ```
//!
//! - the model first, as [`json_string`] writes it, so that the backend listener renames it by
//!   replacing exactly that prefix (`src/gateway/lua/backend.lua`), never by searching the body;
//! - `stream_options` replaced by the gateway's own on a streamed chat or text completion, so that
//!   every stream is asked for its usage whatever the client sent (`{}`, `include_usage: false`):
//!   [`Checked::stream`] says whether the client asked, and the gateway hides the usage event
//!   from a client that did not. Dropped on every other request;
//! - every other member's value byte for byte as the client sent it (numbers are not re-printed).
//!
//! The result is always one valid JSON object.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The operations whose request body the gateway reads (path below `/<route>/v1/`, `POST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Operation {
    /// The operation a path names (`/<route>/v1/<operation>`, query aside), if the gateway reads
    /// its body. Paths reach the gateway normalised by Envoy (dot segments, `//`).
    pub fn of_path(path: &[u8]) -> Option<Operation> {
        let path = path.split(|b| *b == b'?').next().unwrap_or_default();
        let mut parts = path.splitn(4, |b| *b == b'/');
        // "", route, "v1", operation
        let (Some(b""), Some(route), Some(b"v1"), Some(op)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if route.is_empty() {
            return None;
        }
        match op {
            b"chat/completions" => Some(Operation::ChatCompletions),
            b"completions" => Some(Operation::Completions),
            b"embeddings" => Some(Operation::Embeddings),
            b"responses" => Some(Operation::Responses),
            _ => None,
        }
    }

    /// Whether a stream of this operation reports usage only when asked with
    /// `stream_options.include_usage` (OpenAI's chat and text completions; the Responses API
    /// always sends it in `response.completed`, and rejects `include_usage`).
    fn asks_stream_usage(self) -> bool {
        matches!(self, Operation::ChatCompletions | Operation::Completions)
    }
}

/// What a streamed request's client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Not a stream whose usage the gateway asks for.
    No,
    /// A stream; the client did not ask for its usage: the gateway asks and hides the answer.
    Hide,
    /// A stream whose client asked for its usage itself.
    Asked,
}

/// A body that passed, in its canonical form.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub body: Vec<u8>,
    pub model: String,
    pub stream: Stream,
    /// The most completion tokens the request may cost, as it sets them (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`, times `n` or `best_of`) or as the gateway
    /// capped it; none for an uncapped request (and 0 for embeddings, which complete nothing).
    pub completion_limit: Option<u64>,
}

impl Checked {
    /// What admission reserves for the request (`crate::admission`): its body's bytes, an upper
    /// bound of its prompt tokens for text (a token is at least one byte of the text it stands
    /// for, and the body holds the text and more), plus its completion limit.
    pub fn estimate(&self) -> Option<u64> {
        Some((self.body.len() as u64).saturating_add(self.completion_limit?))
    }
}

/// Members that limit a request's completion tokens; the first is the one the gateway writes
/// (`max_output_tokens` for the Responses API).
const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];
/// Members that multiply it (choices per request).
const CHOICES: [&str; 2] = ["n", "best_of"];

/// Why a body is refused: the HTTP status, an OpenAI-style error code and a message for the
/// workload (no byte of the body in it beyond a key's name, cut short).
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            code: "invalid_request_body",
            message: message.into(),
        }
    }
}

/// Checks a request body of `operation` and writes it in its canonical form.
pub fn check(body: &[u8], operation: Operation) -> Result<Checked, Refusal> {
    check_capped(body, operation, None)
}

/// [`check`], and with `cap`, a request that sets no completion limit gets one: `cap` written as
/// `max_tokens` (`max_output_tokens` for the Responses API), a `null` limit replaced.
pub fn check_capped(
    body: &[u8],
    operation: Operation,
    cap: Option<u64>,
) -> Result<Checked, Refusal> {
    let members = parse_object(body)?;
    let mut model = None;
    let mut stream = false;
    let mut asked = false;
    let mut limit: Option<u64> = None;
    let mut choices = 1u64;
    for (key, value) in &members {
        let count = |value: &RawValue| -> Result<Option<u64>, Refusal> {
            match value.get() {
                "null" => Ok(None),
                v => v.parse::<u64>().map(Some).map_err(|_| {
                    Refusal::invalid(format!("'{key}' must be a non-negative integer."))
                }),
            }
        };
        match key.as_str() {
            k if LIMITS.contains(&k) => {
                if let Some(n) = count(value)? {
                    limit = Some(limit.unwrap_or(0).max(n));
                }
            }
            k if CHOICES.contains(&k) => choices = choices.max(count(value)?.unwrap_or(1)),
            "model" => model = Some(model_of(value)?),
            "stream" => {
                stream = match value.get() {
                    "true" => true,
                    "false" | "null" => false,
                    _ => return Err(Refusal::invalid("'stream' must be true or false.")),
                }
            }
            "stream_options" => asked = include_usage(value)?,
            _ => {}
        }
    }
    let Some(model) = model else {
        return Err(Refusal {
            status: 400,
            code: "missing_model",
            message: "The request body must name a 'model' (a string).".into(),
        });
    };
    let stream = match (stream && operation.asks_stream_usage(), asked) {
        (false, _) => Stream::No,
        (true, false) => Stream::Hide,
        (true, true) => Stream::Asked,
    };
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(b"{\"model\":");
    json_string(&model, &mut out);
    if stream != Stream::No {
        out.extend_from_slice(STREAM_OPTIONS);
    }
    let completes = operation != Operation::Embeddings;
    let capped = completes && limit.is_none() && cap.is_some();
    if let (true, Some(cap)) = (capped, cap) {
        let key = match operation {
            Operation::Responses => LIMITS[2],
            _ => LIMITS[0],
        };
        out.extend_from_slice(format!(",\"{key}\":{cap}").as_bytes());
        limit = Some(cap);
    }
    for (key, value) in &members {
        if key == "model" || key == "stream_options" || (capped && LIMITS.contains(&key.as_str())) {
            continue;
        }
        out.push(b',');
        json_string(key, &mut out);
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    let completion_limit = if completes {
        limit.map(|l| l.saturating_mul(choices))
    } else {
        Some(0)
    };
    Ok(Checked {
        body: out,
        model,
        stream,
        completion_limit,
    })
}

/// Request headers a workload may send on to a provider (pseudo-headers always pass, and the
/// gateway's own, which it sets after this list is applied): what an OpenAI or Anthropic SDK
/// sends that a provider needs, and `authorization` (the route key, which the front Lua checks
/// and removes; the provider's key is injected later), and Envoy's own `x-forwarded-proto`
/// (without it Envoy no longer finds the route once a header is removed). Everything else is
/// dropped: the account, organization and project selectors (`OpenAI-Organization`,
/// `OpenAI-Project`), cookies, forwarding headers, `accept-encoding` (an answer must stay readable
/// for its usage), SDK telemetry.
pub const REQUEST_HEADERS: &[&str] = &[
    "accept",
    "anthropic-beta",
    "anthropic-version",
    "authorization",
    "content-length",
    "content-type",
    "idempotency-key",
    "openai-beta",
    "user-agent",
    "x-forwarded-proto",
    "x-request-id",
];

/// Answer headers a workload gets (pseudo-headers always pass): the provider's request ids and
/// `retry-after`, the body's framing, and the gateway's own (`x-llmroute-backend`,
/// `x-llmroute-failure`, Envoy's attempt count). Dropped: cookies, organization, project,
/// version, processing-time and rate-limit headers of the provider's account, and anything else.
pub const RESPONSE_HEADERS: &[&str] = &[
    "cache-control",
    "content-length",
    "content-type",
    "date",
    "request-id",
    "retry-after",
    "server",
    "x-envoy-attempt-count",
    "x-llmroute-backend",
    "x-llmroute-failure",
    "x-request-id",
];

/// Whether a header of this name passes `allowed` (names are lower case, as Envoy keeps them).
pub fn passes(allowed: &[&str], name: &[u8]) -> bool {
    name.first() == Some(&b':') || allowed.iter().any(|a| a.as_bytes() == name)
}

/// The member the gateway writes after the model of a streamed chat or text completion. The
/// backend listener removes exactly these bytes for a provider that does not take
/// `stream_options` (`src/gateway/lua/backend.lua`).
pub const STREAM_OPTIONS: &[u8] = b",\"stream_options\":{\"include_usage\":true}";

fn model_of(value: &RawValue) -> Result<String, Refusal> {
    let model: String = serde_json::from_str(value.get())
        .map_err(|_| Refusal::invalid("'model' must be a string."))?;
    if model.is_empty() || model.chars().any(char::is_control) {
        return Err(Refusal::invalid(
            "'model' must be a non-empty string without control characters.",
        ));
    }
    Ok(model)
}

/// Whether `stream_options` asks for usage (`include_usage: true`); it must be an object or null.
fn include_usage(value: &RawValue) -> Result<bool, Refusal> {
    if value.get() == "null" {
        return Ok(false);
    }
    let options: Vec<(String, Box<RawValue>)> = parse_object(value.get().as_bytes())
        .map_err(|_| Refusal::invalid("'stream_options' must be an object."))?
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
    Ok(options
        .iter()
        .any(|(k, v)| k == "include_usage" && v.get() == "true"))
}

/// The members of a JSON object, in order, each value checked whole ([`Strict`]).
fn parse_object(body: &[u8]) -> Result<Vec<(String, &RawValue)>, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = TopLevel
        .deserialize(&mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(refusal_of)?;
    for (_, value) in &members {
        let mut de = serde_json::Deserializer::from_str(value.get());
        Strict.deserialize(&mut de).map_err(refusal_of)?;
    }
    Ok(members)
}

fn refusal_of(e: serde_json::Error) -> Refusal {
    let text = e.to_string();
    if text.starts_with(NOT_OBJECT) || text.starts_with(DUPLICATE) {
        return Refusal::invalid(text);
    }
    Refusal::invalid(format!("The request body is not valid JSON: {text}."))
}

const NOT_OBJECT: &str = "The request body must be one JSON object";
const DUPLICATE: &str = "The request body repeats the key";

/// A key as it may appear in a message: at most 64 characters, control characters escaped.
fn shown(key: &str) -> String {
    let mut s: String = key.chars().take(64).flat_map(char::escape_debug).collect();
    if key.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// The top level: an object, its members' values kept as the raw JSON text.
struct TopLevel;

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = Vec<(String, &'de RawValue)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Vec<(String, &'de RawValue)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(String, &'de RawValue)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom(format!("{DUPLICATE} '{}'.", shown(&key))));
            }
            let value = map.next_value::<&'de RawValue>()?;
            members.push((key, value));
        }
        Ok(members)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(not_object())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(not_object())
    }
}

fn not_object<E: de::Error>() -> E {
    E::custom(format!("{NOT_OBJECT} ({{...}})."))
}

/// Any JSON value, read whole (strings unescaped, so a lone surrogate or a bad escape is an
/// error), refusing a repeated key in any object.
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Strict)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if keys.contains(&key) {
                return Err(de::Error::custom(format!(
                    "{DUPLICATE} '{}' in a nested object.",
                    shown(&key)
                )));
            }
            map.next_value_seed(Strict)?;
            keys.insert(key);
        }
        Ok(())
    }
}

/// Writes `s` as a JSON string the way the gateway's Lua writes one (`json_escape` in
/// `src/gateway/lua/common.lua`): `"`, `\` and control characters (C `iscntrl`: U+0000-U+001F and
/// U+007F) as `\u00XX` with lowercase hex; every other character as its UTF-8 bytes.
pub fn json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in s.as_bytes() {
        if b < 0x20 || b == 0x7f || b == b'"' || b == b'\\' {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str, op: Operation) -> Checked {
        check(body.as_bytes(), op).unwrap_or_else(|r| panic!("{body}: refused: {r:?}"))
    }

    fn refused(body: &[u8]) -> Refusal {
        check(body, Operation::ChatCompletions).expect_err("refused")
    }

    fn text(c: &Checked) -> &str {
        std::str::from_utf8(&c.body).unwrap()
    }

    #[test]
    fn completion_limits_are_read_capped_and_multiplied_by_choices() {
        let c = ok(
            r#"{"model":"m","max_tokens":100,"n":3}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(c.completion_limit, Some(300));
        assert_eq!(c.estimate(), Some(c.body.len() as u64 + 300));
        let uncapped = ok(
            r#"{"model":"m","max_tokens":null}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(
            (uncapped.completion_limit, uncapped.estimate()),
            (None, None)
        );
        // A cap replaces a null limit and is written where each API reads it.
        let capped = check_capped(
            br#"{"model":"m","max_tokens":null,"messages":[]}"#,
            Operation::ChatCompletions,
            Some(64),
        )
        .unwrap();
        assert_eq!(
            text(&capped),
            r#"{"model":"m","max_tokens":64,"messages":[]}"#
        );
        assert_eq!(capped.completion_limit, Some(64));
        let responses = check_capped(
            br#"{"model":"m","input":"hi"}"#,
            Operation::Responses,
            Some(64),
        );
        assert_eq!(
            text(&responses.unwrap()),
            r#"{"model":"m","max_output_tokens":64,"input":"hi"}"#
        );
        // A limit the request sets is kept, the cap not applied; embeddings complete nothing.
        let own = check_capped(
            br#"{"model":"m","max_completion_tokens":5}"#,
            Operation::ChatCompletions,
            Some(64),
        )
        .unwrap();
        assert_eq!(
            (text(&own), own.completion_limit),
            (r#"{"model":"m","max_completion_tokens":5}"#, Some(5))
        );
        let emb = check_capped(
            br#"{"model":"m","input":"x"}"#,
            Operation::Embeddings,
            Some(64),
        )
        .unwrap();
        assert_eq!(
            (text(&emb), emb.completion_limit),
            (r#"{"model":"m","input":"x"}"#, Some(0))
        );
        // A limit that is not a count is refused (it could not be held to).
        for body in [
            r#"{"model":"m","max_tokens":"9"}"#,
            r#"{"model":"m","max_tokens":-1}"#,
            r#"{"model":"m","n":1.5}"#,
            r#"{"model":"m","max_output_tokens":1e9}"#,
        ] {
            assert_eq!(refused(body.as_bytes()).status, 400, "{body}");
        }
        // Huge values saturate, never wrap.
        let huge = ok(
            r#"{"model":"m","max_tokens":18446744073709551615,"n":2}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(huge.completion_limit, Some(u64::MAX));
        assert_eq!(huge.estimate(), Some(u64::MAX));
    }

    #[test]
    fn the_model_goes_first_and_the_rest_stays_byte_for_byte() {
        let c = ok(
            r#" {"messages":[{"role":"user","content":"hi \"model\":\"x\""}],"temperature":1.0000000000000001,"model":"gpt-4o"} "#,
            Operation::ChatCompletions,
        );
        assert_eq!(c.model, "gpt-4o");
        assert_eq!(c.stream, Stream::No);
        assert_eq!(
            text(&c),
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"model\":\"x\""}],"temperature":1.0000000000000001}"#
        );
    }

    #[test]
    fn the_top_level_model_is_the_one_after_unescaping_never_a_nested_one() {
        let c = ok(
            r#"{"metadata":{"model":"gpt-4o-mini"},"mod\u0065l":"o1-pro"}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(c.model, "o1-pro");
        assert_eq!(
            text(&c),
            r#"{"model":"o1-pro","metadata":{"model":"gpt-4o-mini"}}"#
        );
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth_also_when_written_differently() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"a","mod\u0065l":"b"}"#,
            r#"{"model":"a","stream_options":{"include_usage":true,"include_usage":false}}"#,
            r#"{"model":"a","messages":[{"role":"user","role":"system"}]}"#,
        ] {
            let r = refused(body.as_bytes());
            assert_eq!(r.status, 400, "{body}");
            assert!(r.message.contains("repeats the key"), "{body}: {r:?}");
        }
    }

    #[test]
    fn what_is_not_one_json_object_is_refused() {
        for body in [
            &b""[..],
            b"[]",
            b"\"model\"",
            b"null",
            b"{\"model\":\"a\"} {}",
            b"{\"model\":\"a\"",
            b"{\"model\":\"a\",}",
            b"\xef\xbb\xbf{\"model\":\"a\"}",
            b"{\"model\":\"a\xff\"}",
            b"{\"model\":\"a\",\"x\":\"\\ud800\"}",
            b"{\"model\":\"a\",\"x\":NaN}",
            b"{'model':'a'}",
            b"{\"model\":\"a\",\"x\":1e999}",
        ] {
            let r = refused(body);
            assert_eq!(
                (r.status, r.code),
                (400, "invalid_request_body"),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn model_stream_and_stream_options_must_have_their_types() {
        for body in [
            r#"{"model":1}"#,
            r#"{"model":["a"]}"#,
            r#"{"model":""}"#,
            r#"{"model":"a\nb"}"#,
            r#"{"model":"a\u0000"}"#,
            r#"{"model":"a","stream":"true"}"#,
            r#"{"model":"a","stream":1}"#,
            r#"{"model":"a","stream":true,"stream_options":"yes"}"#,
            r#"{"model":"a","stream":true,"stream_options":[]}"#,
        ] {
            assert_eq!(refused(body.as_bytes()).status, 400, "{body}");
        }
        assert_eq!(refused(br#"{"messages":[]}"#).code, "missing_model");
        assert_eq!(refused(br#"{"model":null}"#).status, 400);
    }

    #[test]
    fn every_stream_is_asked_for_its_usage_whatever_the_client_sent() {
        for (options, want) in [
            ("", Stream::Hide),
            (r#","stream_options":null"#, Stream::Hide),
            (r#","stream_options":{}"#, Stream::Hide),
            (r#","stream_options":{"include_usage":false}"#, Stream::Hide),
            (
                r#","stream_options":{"include_usage":"true"}"#,
                Stream::Hide,
            ),
            (
                r#","stream_options":{"include_obfuscation":false,"include_usage":true}"#,
                Stream::Asked,
            ),
        ] {
            for op in [Operation::ChatCompletions, Operation::Completions] {
                let body = format!(r#"{{"stream":true{options},"model":"m","n":1}}"#);
                let c = ok(&body, op);
                assert_eq!(c.stream, want, "{body}");
                assert_eq!(
                    text(&c),
                    r#"{"model":"m","stream_options":{"include_usage":true},"stream":true,"n":1}"#,
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn stream_options_go_only_with_streamed_chat_and_text_completions() {
        let c = ok(
            r#"{"model":"m","stream":false,"stream_options":{"include_usage":true}}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(
            (c.stream, text(&c)),
            (Stream::No, r#"{"model":"m","stream":false}"#)
        );
        let c = ok(r#"{"model":"m","stream":true}"#, Operation::Responses);
        assert_eq!(
            (c.stream, text(&c)),
            (Stream::No, r#"{"model":"m","stream":true}"#)
        );
        let c = ok(r#"{"model":"m","input":"x"}"#, Operation::Embeddings);
        assert_eq!(text(&c), r#"{"model":"m","input":"x"}"#);
    }

    #[test]
    fn keys_and_models_are_written_as_the_gateway_s_lua_writes_them() {
        let c = ok(
            r#"{"model":"a\"b\\c/é","k\"\u0001ey":1}"#,
            Operation::ChatCompletions,
        );
        assert_eq!(c.model, "a\"b\\c/é");
        assert_eq!(
            text(&c),
            "{\"model\":\"a\\u0022b\\u005cc/é\",\"k\\u0022\\u0001ey\":1}"
        );
        serde_json::from_slice::<serde_json::Value>(&c.body).unwrap();
    }

    #[test]
    fn nesting_deeper_than_the_parser_s_limit_is_refused_not_a_crash() {
        let deep = format!(
            r#"{{"model":"m","x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(refused(deep.as_bytes()).status, 400);
        let fine = format!(
            r#"{{"model":"m","x":{}1{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        ok(&fine, Operation::ChatCompletions);
    }

    #[test]
    fn operations_are_read_from_the_normalised_path() {
        let of = |p: &str| Operation::of_path(p.as_bytes());
        assert_eq!(
            of("/chat/v1/chat/completions"),
            Some(Operation::ChatCompletions)
        );
        assert_eq!(
            of("/chat/v1/chat/completions?x=1"),
            Some(Operation::ChatCompletions)
        );
        assert_eq!(of("/chat/v1/completions"), Some(Operation::Completions));
        assert_eq!(of("/chat/v1/embeddings"), Some(Operation::Embeddings));
        assert_eq!(of("/chat/v1/responses"), Some(Operation::Responses));
        assert_eq!(of("/chat/v1/responses/abc/cancel"), None);
        assert_eq!(of("/chat/v1/files"), None);
        assert_eq!(of("//v1/chat/completions"), None);
        assert_eq!(of("/chat/v2/chat/completions"), None);
        assert_eq!(of("/chat/v1/chat/completions/"), None);
    }

    /// The backend Lua removes the gateway's stream_options and replaces the model prefix by
    /// their exact bytes: both sides must write them the same way.
    #[test]
    fn the_backend_lua_knows_the_bytes_this_module_writes() {
        let backend = include_str!("../../src/gateway/lua/backend.lua");
        let stream_options = std::str::from_utf8(STREAM_OPTIONS).unwrap();
        assert!(
            backend.contains(&format!("local STREAM_OPTIONS = '{stream_options}'")),
            "backend.lua's STREAM_OPTIONS differs from {stream_options}"
        );
        let common = include_str!("../../src/gateway/lua/common.lua");
        assert!(
            common.contains(r#"gsub('[%c"\\]', function(c)"#)
                && common.contains(r#"string.format("\\u%04x", c:byte())"#),
            "common.lua's json_escape is not the one json_string mirrors"
        );
    }

    #[test]
    fn header_allowlists_keep_what_providers_and_workloads_need_and_nothing_else() {
        for h in [
            "content-type",
            "authorization",
            "openai-beta",
            ":path",
            ":authority",
        ] {
            assert!(passes(REQUEST_HEADERS, h.as_bytes()), "{h}");
        }
        for h in [
            "openai-organization",
            "openai-project",
            "cookie",
            "x-forwarded-for",
            "accept-encoding",
            "x-stainless-os",
            "x-llmroute-model",
            "x-api-key",
            "Content-Type",
        ] {
            assert!(!passes(REQUEST_HEADERS, h.as_bytes()), "{h}");
        }
        for h in [
            "x-request-id",
            "retry-after",
            "x-llmroute-backend",
            ":status",
        ] {
            assert!(passes(RESPONSE_HEADERS, h.as_bytes()), "{h}");
        }
        for h in [
            "set-cookie",
            "openai-organization",
            "openai-project",
            "openai-version",
            "openai-processing-ms",
            "x-ratelimit-limit-requests",
            "x-llmroute-retry",
            "x-llmroute-usage-added",
        ] {
            assert!(!passes(RESPONSE_HEADERS, h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn shown_keys_are_bounded_and_escaped() {
        let r = refused(
            format!(r#"{{"{}\n":1,"{}\n":2}}"#, "k".repeat(100), "k".repeat(100)).as_bytes(),
        );
        assert!(r.message.len() < 200, "{}", r.message);
        assert!(!r.message.contains('\n'));
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// Arbitrary JSON values, keys from a small set so that repeats happen.
        fn value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                "[a-z\"\\\\\u{0}-\u{1f}é💡]{0,8}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map("(model|stream|stream_options|x|y)", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any bytes: a verdict, never a panic; what passes is one JSON object whose model
            /// is the one reported and that passes the check again unchanged.
            #[test]
            fn any_bytes_get_a_verdict_and_what_passes_is_canonical(body in prop::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(c) = check(&body, Operation::ChatCompletions) {
                    let v: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
                    prop_assert_eq!(v["model"].as_str(), Some(c.model.as_str()));
                    let again = check(&c.body, Operation::ChatCompletions).unwrap();
                    prop_assert_eq!(again.body, c.body);
                }
            }

            /// Valid JSON objects: those with a string model pass and keep every member's value;
            /// the written body parses to the same object (stream_options aside).
            #[test]
            fn json_objects_keep_their_meaning(v in value(), model in "[a-zA-Z0-9._:/-]{1,20}", op in 0..4usize) {
                let op = [Operation::ChatCompletions, Operation::Completions, Operation::Embeddings, Operation::Responses][op];
                let mut obj = match v { serde_json::Value::Object(m) => m, other => {
                    let mut m = serde_json::Map::new(); m.insert("x".into(), other); m
                } };
                obj.insert("model".into(), model.clone().into());
                let stream_ok = obj.get("stream").is_none_or(|s| s.is_boolean() || s.is_null());
                let options_ok = obj.get("stream_options").is_none_or(|s| s.is_object() || s.is_null());
                let body = serde_json::to_vec(&serde_json::Value::Object(obj.clone())).unwrap();
                match check(&body, op) {
                    Ok(c) => {
                        prop_assert!(stream_ok && options_ok);
                        let mut got: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&c.body).unwrap();
                        prop_assert_eq!(got.get("model").and_then(|m| m.as_str()), Some(model.as_str()));
                        let streamed = obj.get("stream") == Some(&serde_json::Value::Bool(true))
                            && matches!(op, Operation::ChatCompletions | Operation::Completions);
                        prop_assert_eq!(got.remove("stream_options").is_some(), streamed);
                        obj.remove("stream_options");
                        prop_assert_eq!(got, obj);
                    }
                    Err(r) => prop_assert!(!stream_ok || !options_ok, "refused: {:?}", r),
                }
            }
        }
    }
}
