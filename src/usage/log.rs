//! The usage log: a second access log of Envoy's front listener, written to a file in an emptyDir
//! that the gateway Pod's two containers share, one JSON object per answer ([`format`]), and
//! followed by the gateway Pod's agent (`crate::agent::follow`), which counts each line.
//!
//! Why a file: Envoy formats a file log's line on the worker and writes it from its own flush
//! thread, so an answer costs a line of formatting. The gRPC access-log service this replaced built
//! a protobuf entry per answer (every common property, the metadata, a custom tag, 3 headers) and
//! cost 0.07 ms of each answer, measured in pairs (docs/benchmarks.md).
//!

use serde_json::{Value, json};

use super::{Answer, Usage};

/// Dynamic-metadata namespace of an answer's usage: the front listener's usage readers write it
/// (`gateway::envoy`), the access log reads it.
pub const METADATA_NAMESPACE: &str = "llmroute";
/// Request header the front Lua sets to the model the client asked for.
pub const MODEL_HEADER: &str = "x-llmroute-model";
/// Response headers naming the backend that answered and the failure class of a failed answer.
pub const BACKEND_HEADER: &str = "x-llmroute-backend";
pub const FAILURE_HEADER: &str = "x-llmroute-failure";
/// Key of the front route's metadata (under the Lua filter's namespace) holding what the sidecar
/// needs to know of the route's backends: their prices and model mappings
/// ([`super::backends_tag`]).
pub const BACKENDS_KEY: &str = "backends";

/// Key of [`METADATA_NAMESPACE`] (and of a line) holding the provider's usage object as the JSON
/// text it answered with: Envoy only finds it and hands it on, the sidecar reads it
/// ([`Usage::of_provider`]), off the answer's path.
pub const USAGE_KEY: &str = "usage";
/// Key of a printed line naming the model the gateway asked the provider for
/// ([`Answer::provider_model`]).
pub const PROVIDER_MODEL_KEY: &str = "provider_model";
/// Key of [`METADATA_NAMESPACE`] (and of a line) holding what admission reserved for the request:
/// `<boot> <tokens>` (`sse-usage/src/admission.rs`); settled when the line is counted.
pub const RESERVED_KEY: &str = "reserved";

/// The counts a printed line has in place of the usage object's text, by key.
const COUNT_KEYS: [&str; 4] = [
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
];

/// The front listener's access log line (`json_format`), also what the sidecar counts: JSON, so a
/// value (a header a client sent, a model name a provider returned) can never break a line or
/// shift a field. A value the answer lacks is `null`. No header that could carry a key.
pub fn format() -> Value {
    json!({
        "time": "%START_TIME%",
        "route": "%ROUTE_NAME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%",
        "model": format!("%REQ({MODEL_HEADER})%"),
        "backend": format!("%RESP({BACKEND_HEADER})%"),
        "failure": format!("%RESP({FAILURE_HEADER})%"),
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        "duration_ms": "%DURATION%",
        "flags": "%RESPONSE_FLAGS%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        // The bytes an estimate counts when the answer reports no usage ([`Usage::estimate`]).
        "request_bytes": "%BYTES_RECEIVED%",
        "answer_bytes": "%BYTES_SENT%",
        USAGE_KEY: format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:{USAGE_KEY})%"),
        RESERVED_KEY: format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:{RESERVED_KEY})%"),
    })
}

/// [`format`] with the route's backends (prices, model mappings), for the log the sidecar reads
/// (it takes them out of the lines it prints).
pub fn format_with_backends() -> Value {
    let mut line = format();
    line[BACKENDS_KEY] = json!(format!(
        "%METADATA(ROUTE:envoy.filters.http.lua:{BACKENDS_KEY})%"
    ));
    line
}

/// One line of the log as an [`Answer`].
pub fn answer(line: &[u8]) -> Result<Answer, serde_json::Error> {
    Ok(answer_of(&serde_json::from_slice(line)?))
}

/// The [`Answer`] of a line's fields.
pub fn answer_of(fields: &serde_json::Map<String, Value>) -> Answer {
    let text = |key: &str| {
        fields
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (backend, model) = (text("backend"), text("model"));
    let status = fields
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(0);
    let facts = fields
        .get(BACKENDS_KEY)
        .and_then(Value::as_str)
        .and_then(|tag| super::backend_facts(tag, &backend))
        .unwrap_or_default();
    Answer {
        route: text("route"),
        price: facts.price(),
        provider_model: facts.provider_model(&model).unwrap_or_default(),
        usage: usage_or_estimate(fields, status, &backend),
        model,
        status,
        failure: text("failure"),
        backend,
        reserved: reserved_of(&text(RESERVED_KEY)),
    }
}

/// A line's reservation, `<boot> <tokens>`.
fn reserved_of(text: &str) -> Option<(String, u64)> {
    let (boot, tokens) = text.split_once(' ')?;
    Some((boot.to_string(), tokens.parse().ok()?))
}

/// The usage of a line, or the gateway's estimate ([`Usage::estimate`]) of a successful answer of
/// a provider to an operation that costs tokens (chat and text completions, responses,
/// embeddings) when it reported none.
fn usage_or_estimate(fields: &serde_json::Map<String, Value>, status: u32, backend: &str) -> Usage {
    let usage = usage_of(fields);
    if usage.reported() || !(200..300).contains(&status) || backend.is_empty() {
        return usage;
    }
    let path = fields
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let op = path.split('?').next().unwrap_or_default();
    let op = op.splitn(4, '/').nth(3).unwrap_or_default();
    let completion = match op {
        "chat/completions" | "completions" | "responses" => true,
        "embeddings" => false,
        _ => return usage,
    };
    let bytes = |key: &str| match fields.get(key) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    };
    let mut estimate = Usage::estimate(bytes("request_bytes"), bytes("answer_bytes"), completion);
    // Admission reserved an upper bound of what the request can cost (its body's bytes and its
    // completion limit): a guess from bytes never counts more than that.
    let reserved = fields
        .get(RESERVED_KEY)
        .and_then(Value::as_str)
        .and_then(reserved_of);
    if let Some((_, reserved)) = reserved
        && estimate.budgeted() > reserved
    {
        let prompt = estimate.prompt.unwrap_or(0).min(reserved);
        estimate.prompt = Some(prompt);
        estimate.completion = Some(reserved - prompt);
        estimate.total = Some(reserved);
    }
    estimate
}

/// The usage of a line: the provider's usage object, as Envoy logged it (its text).
fn usage_of(fields: &serde_json::Map<String, Value>) -> Usage {
    fields
        .get(USAGE_KEY)
        .and_then(Value::as_str)
        .map(Usage::of_provider)
        .unwrap_or_default()
}

/// A line as the sidecar prints it: without the route's backends, with the provider's model
/// (`null` when no backend answered), and with the counts read from the usage object
/// (`prompt_tokens`, `completion_tokens`, `cached_tokens`, `total_tokens`, each `null` when the
/// answer did not report it) in place of its text.
pub fn printable(
    mut fields: serde_json::Map<String, Value>,
    answer: &Answer,
) -> serde_json::Map<String, Value> {
    fields.remove(BACKENDS_KEY);
    fields.remove(USAGE_KEY);
    let provider_model = Some(answer.provider_model.as_str()).filter(|m| !m.is_empty());
    fields.insert(PROVIDER_MODEL_KEY.to_string(), provider_model.into());
    let usage = &answer.usage;
    fields.insert("usage_estimated".to_string(), usage.estimated.into());
    for (key, count) in
        COUNT_KEYS
            .into_iter()
            .zip([usage.prompt, usage.completion, usage.cached, usage.total])
    {
        fields.insert(key.to_string(), count.into());
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_as_envoy_writes_it_is_read_back() {
        let a = answer(br#"{"backend":"deepseek","failure":"RateLimited","model":"chat","backends":"{\"zhipu\":{\"cost\":{\"input\":\"1\",\"output\":\"2\"}},\"deepseek\":{\"cost\":{\"input\":\"0.27\",\"output\":\"1.1\"},\"models\":{\"chat\":\"deepseek-chat\"}}}","route":"chat","status":429,"usage":"{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9,\"prompt_cache_hit_tokens\":1}"}"#).unwrap();
        assert_eq!(
            a,
            Answer {
                route: "chat".into(),
                backend: "deepseek".into(),
                model: "chat".into(),
                provider_model: "deepseek-chat".into(),
                status: 429,
                failure: "RateLimited".into(),
                usage: Usage {
                    prompt: Some(7),
                    completion: Some(2),
                    cached: Some(1),
                    total: Some(9),
                    estimated: false,
                },
                price: Some(super::super::Price {
                    input: 0.27,
                    output: 1.1
                }),
                reserved: None,
            }
        );
        let reserved = answer(br#"{"route":"chat","status":200,"reserved":"1f2e 4242"}"#).unwrap();
        assert_eq!(reserved.reserved, Some(("1f2e".into(), 4242)));
        // An estimate never counts more than the request's reservation.
        let line = |reserved: &str| {
            format!(
                r#"{{"route":"chat","backend":"b","path":"/chat/v1/chat/completions","status":200,"request_bytes":400,"answer_bytes":4000,"reserved":"{reserved}"}}"#
            )
        };
        let capped = answer(line("1f2e 300").as_bytes()).unwrap().usage;
        assert_eq!(
            (capped.prompt, capped.completion, capped.total),
            (Some(100), Some(200), Some(300))
        );
        let under = answer(line("1f2e 9000").as_bytes()).unwrap().usage;
        assert_eq!(under.total, Some(1100));
        // An answer of the gateway itself: nulls everywhere but the route and status.
        let own = answer(br#"{"backend":null,"failure":null,"model":null,"backends":null,"route":"chat","status":200,"usage":null}"#).unwrap();
        assert_eq!(own.backend, "");
        assert!(!own.usage.reported());
        assert!(answer(b"not json").is_err());
    }

    #[test]
    fn every_format_key_is_read() {
        let keys: Vec<String> = format().as_object().unwrap().keys().cloned().collect();
        let mut fields = serde_json::Map::new();
        for k in &keys {
            fields.insert(k.clone(), json!(null));
        }
        let read = answer(serde_json::to_string(&fields).unwrap().as_bytes()).unwrap();
        assert_eq!(read, Answer::default());
        for k in [USAGE_KEY, "route", "backend", "model", "status"] {
            assert!(keys.iter().any(|key| key == k), "{k}");
        }
    }

    /// A successful answer of a provider without usage is counted by the estimate, for the
    /// operations that cost tokens only; a failed one, the gateway's own, or one with usage, not.
    #[test]
    fn answers_without_usage_are_estimated_from_their_bytes() {
        let line = |path: &str, status: u32, backend: &str, usage: &str| {
            answer(
                json!({ "route": "chat", "backend": backend, "status": status, "path": path,
                    "request_bytes": 401, "answer_bytes": "1000", "usage": usage })
                .to_string()
                .as_bytes(),
            )
            .unwrap()
            .usage
        };
        let streamed = line("/chat/v1/chat/completions", 200, "zhipu", "");
        assert_eq!(
            streamed,
            Usage {
                prompt: Some(101),
                completion: Some(250),
                cached: None,
                total: Some(351),
                estimated: true,
            }
        );
        assert_eq!(streamed.budgeted(), 351);
        let q = line("/chat/v1/completions?x=1", 200, "zhipu", "");
        assert_eq!(
            (q.prompt, q.completion, q.estimated),
            (Some(101), Some(250), true)
        );
        let e = line("/chat/v1/embeddings", 200, "zhipu", "");
        assert_eq!((e.prompt, e.completion), (Some(101), Some(0)));
        assert!(line("/chat/v1/responses", 201, "x", "").estimated);
        for (path, status, backend) in [
            ("/chat/v1/chat/completions", 429, "zhipu"),
            ("/chat/v1/chat/completions", 200, ""),
            ("/chat/v1/models", 200, "zhipu"),
            ("/chat/v1/files", 200, "zhipu"),
        ] {
            assert_eq!(
                line(path, status, backend, ""),
                Usage::default(),
                "{path} {status}"
            );
        }
        let reported = line(
            "/chat/v1/chat/completions",
            200,
            "zhipu",
            r#"{"prompt_tokens":3,"completion_tokens":4}"#,
        );
        assert_eq!((reported.prompt, reported.estimated), (Some(3), false));
        // An opted-in operation's charge, as the front Lua hands it on.
        let charged = line(
            "/chat/v1/files",
            200,
            "zhipu",
            r#"{"prompt_tokens":7,"completion_tokens":0,"total_tokens":7,"llmroute_estimated":true}"#,
        );
        assert_eq!((charged.budgeted(), charged.estimated), (7, true));
    }
}
