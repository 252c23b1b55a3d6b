//! The hostile-request corpus (issue 29): what a workload holding its route's key can send, through
//! the real Envoy running exactly what `llmroute run` serves, and what it gets: each case's status
//! and what the provider received (or that nothing reached it). The request module's parser is
//! property-tested on its own (`sse-usage/src/request.rs`); this is the gateway as a whole:
//! Envoy's path normalisation and framing, the module, the front and backend Lua, the routes.
//! docs/design/request-checking.md says what passes and why.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use llmroute_devkit::sim::{Received, SimConfig, SimProvider};
use serde_json::{Value, json};
use support::e2e::{Stack, Workload, backend, backend_models, metric as sum, route};

/// What the provider must have seen of a case.
enum Seen {
    /// Nothing reached it.
    Nothing,
    /// One request, checked by the function (the provider's model is checked by it too).
    One(fn(&Received)),
}

/// One case: a request and its expected status.
struct Case {
    name: &'static str,
    send: Send,
    status: u16,
    /// The OpenAI error code the answer must carry (when it is the gateway's refusal).
    code: Option<&'static str>,
    seen: Seen,
}

/// How a case's request is sent.
enum Send {
    /// A body to `chat/completions` (POST, JSON content type, the route's key).
    Chat(Vec<u8>),
    /// Method, path below the route's `/v1/`, extra headers, body.
    Http(
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        Vec<u8>,
    ),
    /// Raw HTTP/1.1 bytes after the request line's path: the path as written (may hold `..`,
    /// `%2e`, `//`, which an HTTP client library would normalise), then headers and body as
    /// written (`{key}` is replaced by the route's key, `{route}` by its name).
    Raw(&'static str, String),
    /// HTTP/2 (prior knowledge) to `chat/completions`.
    H2(Vec<u8>),
}

fn chat(body: &str) -> Send {
    Send::Chat(body.as_bytes().to_vec())
}

fn refused(name: &'static str, send: Send, status: u16, code: &'static str) -> Case {
    Case {
        name,
        send,
        status,
        code: Some(code),
        seen: Seen::Nothing,
    }
}

fn passes(name: &'static str, send: Send, check: fn(&Received)) -> Case {
    Case {
        name,
        send,
        status: 200,
        code: None,
        seen: Seen::One(check),
    }
}

fn mapped(r: &Received) {
    assert_eq!(r.body["model"], "gpt-4o-mini", "{:?}", r.body);
}

fn stream_usage_asked(r: &Received) {
    mapped(r);
    assert_eq!(r.body["stream_options"], json!({ "include_usage": true }));
}

fn no_stream_options(r: &Received) {
    assert!(r.body.get("stream_options").is_none(), "{:?}", r.body);
}

fn msg(extra: &str) -> String {
    format!(r#"{{"model":"chat","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

fn cases() -> Vec<Case> {
    let deep = format!(
        r#"{{"model":"chat","x":{}1{}}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    let big = format!(
        r#"{{"model":"chat","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(1 << 20)
    );
    let huge = format!(
        r#"{{"model":"chat","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(9 << 20)
    );
    let body = msg("");
    let raw_post = |path: &'static str, body: &str| -> Send {
        Send::Raw(
            path,
            format!(
                "Authorization: Bearer {{key}}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    vec![
        // --- the model: only the top-level one, after unescaping, decides ---
        passes("a chat the route serves", chat(&body), mapped),
        refused(
            "a nested model first, another at the top",
            chat(r#"{"metadata":{"model":"chat"},"model":"o1-pro","messages":[]}"#),
            404,
            "model_not_found",
        ),
        refused(
            "an allowed model only nested",
            chat(r#"{"messages":[{"role":"user","content":"x","model":"chat"}]}"#),
            400,
            "missing_model",
        ),
        refused(
            "the model twice, allowed first",
            chat(r#"{"model":"chat","model":"o1-pro"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "the model twice, allowed last",
            chat(r#"{"model":"o1-pro","model":"chat"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "the model twice, once with escapes",
            chat(r#"{"model":"chat","mod\u0065l":"o1-pro"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a key with escapes naming a model the route does not serve",
            chat(r#"{"mod\u0065l":"o1-pro","messages":[]}"#),
            404,
            "model_not_found",
        ),
        passes(
            "a key with escapes naming the route's model",
            chat(r#"{"mod\u0065l":"chat","messages":[{"role":"user","content":"hi"}]}"#),
            mapped,
        ),
        passes(
            "a model value with escapes",
            chat(r#"{"model":"ch\u0061t","messages":[{"role":"user","content":"hi"}]}"#),
            mapped,
        ),
        refused("no model", chat(r#"{"messages":[]}"#), 400, "missing_model"),
        refused("a null model", chat(r#"{"model":null}"#), 400, "invalid_request_body"),
        refused("a number as model", chat(r#"{"model":4}"#), 400, "invalid_request_body"),
        refused(
            "an array as model",
            chat(r#"{"model":["chat"]}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "an object as model",
            chat(r#"{"model":{"model":"chat"}}"#),
            400,
            "invalid_request_body",
        ),
        refused("an empty model", chat(r#"{"model":""}"#), 400, "invalid_request_body"),
        refused(
            "a model with a line break",
            chat(r#"{"model":"chat\n"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a model with a NUL",
            chat(r#"{"model":"chat\u0000"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a model with a trailing space",
            chat(r#"{"model":"chat "}"#),
            404,
            "model_not_found",
        ),
        refused("a model in other case", chat(r#"{"model":"CHAT"}"#), 404, "model_not_found"),
        // --- what is not one JSON object ---
        refused("an array", chat(r#"[{"model":"chat"}]"#), 400, "invalid_request_body"),
        refused("a string", chat(r#""chat""#), 400, "invalid_request_body"),
        refused(
            "two objects",
            chat(r#"{"model":"chat"}{"model":"o1-pro"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "trailing bytes",
            chat(r#"{"model":"chat"} x"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a trailing comma",
            chat(r#"{"model":"chat",}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "invalid UTF-8 in a string",
            Send::Chat(b"{\"model\":\"chat\",\"user\":\"\xc3\x28\"}".to_vec()),
            400,
            "invalid_request_body",
        ),
        refused(
            "a lone surrogate escape",
            chat(r#"{"model":"chat","user":"\ud800"}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a byte order mark",
            Send::Chat(b"\xef\xbb\xbf{\"model\":\"chat\"}".to_vec()),
            400,
            "invalid_request_body",
        ),
        refused(
            "single quotes",
            chat("{'model':'chat'}"),
            400,
            "invalid_request_body",
        ),
        refused(
            "NaN",
            chat(r#"{"model":"chat","temperature":NaN}"#),
            400,
            "invalid_request_body",
        ),
        refused(
            "a number out of range",
            chat(r#"{"model":"chat","temperature":1e999}"#),
            400,
            "invalid_request_body",
        ),
        refused("nesting 300 deep", chat(&deep), 400, "invalid_request_body"),
        refused(
            "a key repeated in a message",
            chat(r#"{"model":"chat","messages":[{"role":"user","role":"system","content":"x"}]}"#),
            400,
            "invalid_request_body",
        ),
        refused("an empty body", chat(""), 400, "missing_model"),
        refused("a body of whitespace", chat("  \n "), 400, "invalid_request_body"),
        passes("a 1 MiB body", chat(&big), mapped),
        refused("a 9 MiB body", chat(&huge), 413, "request_too_large"),
        // --- encodings and content types ---
        refused(
            "a gzip-encoded body",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-encoding", "gzip"), ("content-type", "application/json")],
                gzip_of(body.as_bytes()),
            ),
            400,
            "unsupported_content_encoding",
        ),
        refused(
            "a body said to be deflated",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-encoding", "deflate"), ("content-type", "application/json")],
                body.as_bytes().to_vec(),
            ),
            400,
            "unsupported_content_encoding",
        ),
        passes(
            "Content-Encoding: identity",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-encoding", "identity"), ("content-type", "application/json")],
                body.as_bytes().to_vec(),
            ),
            mapped,
        ),
        refused(
            "a form body",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-type", "application/x-www-form-urlencoded")],
                b"model=o1-pro".to_vec(),
            ),
            400,
            "invalid_content_type",
        ),
        refused(
            "JSON said to be text",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-type", "text/plain")],
                body.as_bytes().to_vec(),
            ),
            400,
            "invalid_content_type",
        ),
        passes(
            "JSON with a charset",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-type", "application/json; charset=utf-8")],
                body.as_bytes().to_vec(),
            ),
            mapped,
        ),
        passes(
            "JSON without a content type",
            Send::Http("POST", "chat/completions", vec![], body.as_bytes().to_vec()),
            mapped,
        ),
        // --- streams: every stream is asked for its usage ---
        passes(
            "a stream without stream_options",
            chat(&msg(r#","stream":true"#)),
            stream_usage_asked,
        ),
        passes(
            "a stream with stream_options {}",
            chat(&msg(r#","stream":true,"stream_options":{}"#)),
            stream_usage_asked,
        ),
        passes(
            "a stream with include_usage false",
            chat(&msg(r#","stream":true,"stream_options":{"include_usage":false}"#)),
            stream_usage_asked,
        ),
        passes(
            "a stream with include_usage \"true\" (a string)",
            chat(&msg(r#","stream":true,"stream_options":{"include_usage":"true"}"#)),
            stream_usage_asked,
        ),
        passes(
            "a stream with stream_options null",
            chat(&msg(r#","stream":true,"stream_options":null"#)),
            stream_usage_asked,
        ),
        passes(
            "a stream whose client asks for usage",
            chat(&msg(r#","stream":true,"stream_options":{"include_usage":true}"#)),
            stream_usage_asked,
        ),
        passes(
            "stream_options before stream, other options",
            chat(
                r#"{"stream_options":{"include_obfuscation":true},"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            stream_usage_asked,
        ),
        refused(
            "stream as a string",
            chat(&msg(r#","stream":"true""#)),
            400,
            "invalid_request_body",
        ),
        refused(
            "stream as a number",
            chat(&msg(r#","stream":1"#)),
            400,
            "invalid_request_body",
        ),
        refused(
            "stream_options as an array",
            chat(&msg(r#","stream":true,"stream_options":[]"#)),
            400,
            "invalid_request_body",
        ),
        refused(
            "include_usage twice",
            chat(&msg(
                r#","stream":true,"stream_options":{"include_usage":true,"include_usage":false}"#,
            )),
            400,
            "invalid_request_body",
        ),
        passes(
            "stream_options without a stream are dropped",
            chat(&msg(r#","stream":false,"stream_options":{"include_usage":true}"#)),
            |r| {
                mapped(r);
                no_stream_options(r);
            },
        ),
        passes(
            "a streamed text completion",
            Send::Http(
                "POST",
                "completions",
                vec![("content-type", "application/json")],
                br#"{"model":"chat","prompt":"hi","stream":true,"stream_options":{"include_usage":false}}"#.to_vec(),
            ),
            stream_usage_asked,
        ),
        passes(
            "a streamed response (Responses API: no stream_options)",
            Send::Http(
                "POST",
                "responses",
                vec![("content-type", "application/json")],
                br#"{"model":"chat","input":"hi","stream":true,"stream_options":{"include_usage":true}}"#.to_vec(),
            ),
            |r| {
                mapped(r);
                no_stream_options(r);
            },
        ),
        passes(
            "embeddings of the route's model",
            Send::Http(
                "POST",
                "embeddings",
                vec![("content-type", "application/json")],
                br#"{"model":"embed","input":"hi"}"#.to_vec(),
            ),
            |r| assert_eq!(r.body["model"], "text-embedding-3-small"),
        ),
        refused(
            "embeddings of another model",
            Send::Http(
                "POST",
                "embeddings",
                vec![("content-type", "application/json")],
                br#"{"model":"text-embedding-3-large","input":"hi"}"#.to_vec(),
            ),
            404,
            "model_not_found",
        ),
        // --- operations: only the route's ---
        refused(
            "listing the account's files",
            Send::Http("GET", "files", vec![], vec![]),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "uploading a file",
            Send::Http(
                "POST",
                "files",
                vec![("content-type", "multipart/form-data; boundary=x")],
                b"--x\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--x--\r\n".to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "deleting a file",
            Send::Http("DELETE", "files/file-abc", vec![], vec![]),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "a batch",
            Send::Http(
                "POST",
                "batches",
                vec![("content-type", "application/json")],
                br#"{"input_file_id":"file-abc","endpoint":"/v1/chat/completions","completion_window":"24h"}"#.to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "an image",
            Send::Http(
                "POST",
                "images/generations",
                vec![("content-type", "application/json")],
                br#"{"model":"dall-e-3","prompt":"x"}"#.to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "speech",
            Send::Http(
                "POST",
                "audio/speech",
                vec![("content-type", "application/json")],
                br#"{"model":"tts-1","input":"x","voice":"alloy"}"#.to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "a fine-tuning job",
            Send::Http(
                "POST",
                "fine_tuning/jobs",
                vec![("content-type", "application/json")],
                br#"{"model":"gpt-4o-mini","training_file":"file-abc"}"#.to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "a vector store",
            Send::Http("GET", "vector_stores", vec![], vec![]),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "listing stored chat completions (GET)",
            Send::Http("GET", "chat/completions", vec![], vec![]),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "deleting a stored chat completion",
            Send::Http("DELETE", "chat/completions/chatcmpl-abc", vec![], vec![]),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "PUT on chat completions",
            Send::Http(
                "PUT",
                "chat/completions",
                vec![("content-type", "application/json")],
                body.as_bytes().to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "a sub-path of chat completions",
            Send::Http(
                "POST",
                "chat/completions/x",
                vec![("content-type", "application/json")],
                body.as_bytes().to_vec(),
            ),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "a model id with a slash that the route does not serve",
            Send::Http("GET", "models/meta-llama/Llama-3.1-8B-Instruct", vec![], vec![]),
            404,
            "model_not_found",
        ),
        // --- paths: normalised before anything reads them ---
        refused(
            "dot segments out of chat completions",
            raw_post("/{route}/v1/chat/completions/../../files", &body),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "percent-encoded dot segments",
            raw_post("/{route}/v1/chat/completions/%2e%2e/%2E%2E/files", &body),
            404,
            "unsupported_endpoint",
        ),
        refused(
            "an encoded slash",
            raw_post("/{route}/v1/files%2Fabc", &body),
            400,
            "",
        ),
        refused(
            "an encoded slash inside chat/completions",
            raw_post("/{route}/v1/chat%2Fcompletions", &body),
            400,
            "",
        ),
        refused(
            "an encoded backslash",
            raw_post("/{route}/v1/chat%5Ccompletions", &body),
            400,
            "",
        ),
        refused(
            "doubled slashes before files",
            raw_post("/{route}/v1//files", &body),
            404,
            "unsupported_endpoint",
        ),
        passes(
            "doubled slashes before chat completions",
            raw_post("/{route}/v1//chat//completions", &body),
            mapped,
        ),
        refused(
            "dot segments out of the route",
            raw_post("/{route}/v1/../../other/v1/chat/completions", &body),
            404,
            "",
        ),
        passes(
            "a query on a chat is not passed on",
            raw_post("/{route}/v1/chat/completions?api-version=2023-05-15&x=1", &body),
            |r| {
                mapped(r);
                assert!(!r.path.contains('?'), "{}", r.path);
            },
        ),
        // --- framing ---
        passes(
            "a chunked body",
            Send::Raw(
                "/{route}/v1/chat/completions",
                chunked(&body, ""),
            ),
            mapped,
        ),
        // Envoy's HTTP/1 codec drops request trailers (`enable_trailers` is off); over HTTP/2 the
        // request module refuses a body that ends with trailers.
        passes(
            "a chunked body with trailers (dropped)",
            Send::Raw(
                "/{route}/v1/chat/completions",
                chunked(&body, "X-Model: o1-pro\r\n"),
            ),
            |r| {
                mapped(r);
                assert!(r.header("x-model").is_none(), "{:?}", r.headers);
            },
        ),
        refused(
            "Content-Length and Transfer-Encoding together",
            Send::Raw(
                "/{route}/v1/chat/completions",
                chunked(&body, "").replacen(
                    "Transfer-Encoding",
                    "Content-Length: 5\r\nTransfer-Encoding",
                    1,
                ),
            ),
            400,
            "",
        ),
        refused(
            "two different Content-Lengths",
            Send::Raw(
                "/{route}/v1/chat/completions",
                format!(
                    "Authorization: Bearer {{key}}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nContent-Length: 2\r\n\r\n{body}",
                    body.len()
                ),
            ),
            400,
            "",
        ),
        passes("HTTP/2, a chat", Send::H2(body.as_bytes().to_vec()), mapped),
        refused(
            "HTTP/2, the model twice",
            Send::H2(br#"{"model":"chat","model":"o1-pro"}"#.to_vec()),
            400,
            "invalid_request_body",
        ),
        // --- headers: the gateway's own cannot be spoofed, the account's cannot be chosen ---
        passes(
            "the gateway's model header sent by the client",
            Send::Http(
                "POST",
                "chat/completions",
                vec![
                    ("content-type", "application/json"),
                    ("x-llmroute-model", "o1-pro"),
                    ("x-llmroute-request", "ok"),
                    // Admission's: a lease the route does not require, an estimate of nothing.
                    ("x-llmroute-lease", "required"),
                    ("x-llmroute-estimate", "0"),
                    // A backend's rate key: another route's backend's limits to spend.
                    ("x-llmroute-rate", "other/free"),
                ],
                body.as_bytes().to_vec(),
            ),
            |r| {
                mapped(r);
                assert!(r.headers.keys().all(|h| !h.starts_with("x-llmroute")), "{:?}", r.headers);
            },
        ),
        refused(
            "a completion limit that is not a count (it could not be held to)",
            Send::Http(
                "POST",
                "chat/completions",
                vec![("content-type", "application/json")],
                br#"{"model":"chat","max_tokens":"100"}"#.to_vec(),
            ),
            400,
            "invalid_request_body",
        ),
        refused(
            "a verdict header sent with a refused model",
            Send::Http(
                "POST",
                "chat/completions",
                vec![
                    ("content-type", "application/json"),
                    ("x-llmroute-request", "ok"),
                    ("x-llmroute-model", "chat"),
                ],
                br#"{"model":"o1-pro"}"#.to_vec(),
            ),
            404,
            "model_not_found",
        ),
        passes(
            "organization, project, cookies and forwarding headers are not passed on",
            Send::Http(
                "POST",
                "chat/completions",
                vec![
                    ("content-type", "application/json"),
                    ("openai-organization", "org-other"),
                    ("openai-project", "proj-other"),
                    ("cookie", "session=x"),
                    ("x-forwarded-for", "10.9.9.9"),
                    ("accept-encoding", "gzip, br"),
                    ("x-stainless-os", "Linux"),
                    ("openai-beta", "assistants=v2"),
                ],
                body.as_bytes().to_vec(),
            ),
            |r| {
                mapped(r);
                for h in [
                    "openai-organization",
                    "openai-project",
                    "cookie",
                    "x-forwarded-for",
                    "accept-encoding",
                    "x-stainless-os",
                ] {
                    assert!(r.header(h).is_none(), "{h} reached the provider: {:?}", r.headers);
                }
                assert_eq!(r.header("openai-beta"), Some("assistants=v2"));
                assert_eq!(r.header("content-type"), Some("application/json"));
            },
        ),
        // --- the key ---
        refused(
            "no key",
            Send::Raw(
                "/{route}/v1/chat/completions",
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            ),
            401,
            "invalid_api_key",
        ),
        refused(
            "another key",
            Send::Raw(
                "/{route}/v1/chat/completions",
                format!(
                    "Authorization: Bearer sk-other\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            ),
            401,
            "invalid_api_key",
        ),
    ]
}

/// `body` in two chunks, with `trailers` (header lines) after the last.
fn chunked(body: &str, trailers: &str) -> String {
    let (a, b) = body.split_at(body.len() / 2);
    format!(
        "Authorization: Bearer {{key}}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n{trailers}\r\n",
        a.len(),
        b.len()
    )
}

/// A gzip member holding `data` (stored blocks: no compression library needed for a test).
fn gzip_of(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let n = c.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(c);
    }
    let crc = crc32(data);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One HTTP/1.1 exchange over a new connection, as written: (status, body).
fn raw_exchange(port: u16, request: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn send(w: &Workload, port: u16, route: &str, send: &Send) -> (u16, String) {
    let url = |op: &str| format!("{}/{op}", w.base);
    match send {
        Send::Chat(body) => {
            let r = w
                .client
                .post(url("chat/completions"))
                .bearer_auth(&w.key)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
        Send::Http(method, op, headers, body) => {
            let mut req = w
                .client
                .request(method.parse().unwrap(), url(op))
                .bearer_auth(&w.key)
                .body(body.clone());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
        Send::Raw(path, rest) => {
            let request = format!(
                "POST {} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{}",
                path.replace("{route}", route),
                rest.replace("{key}", &w.key)
            );
            tokio::task::spawn_blocking(move || raw_exchange(port, &request))
                .await
                .unwrap()
        }
        Send::H2(body) => {
            let client = reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap();
            let r = client
                .post(url("chat/completions"))
                .bearer_auth(&w.key)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    }
}

/// The usage objects of a stream's events that carry one.
fn usage_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|e| e["usage"].is_object())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_workload_gets_only_what_its_route_allows() {
    let mut s = Stack::start("hostile", "us").await;
    let openai = s
        .provider_with(
            "openai",
            SimConfig::new(SimProvider::OpenAI)
                .key("openai-key-0001")
                .any_model(),
        )
        .await;
    s.apply_route(
        "corpus",
        "",
        &[backend_models(
            "openai",
            &openai,
            "{ chat: gpt-4o-mini, embed: text-embedding-3-small }",
            "",
        )],
    );
    // The same account, with the files API opted in and charged 7 tokens a request.
    s.ns.apply(
        &route(
            "files-ok",
            "",
            &[backend("openai", &openai, "gpt-4o-mini", "")],
        )
        .replace(
            "  policy:\n",
            "  operations: [{ name: files, tokensPerRequest: 7 }]\n  policy:\n",
        ),
    );
    let counts = s.usage_log().await;
    let w = s.serve("corpus").await;
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        openai.clear_requests();
        let (status, body) = send(&w, s.port, "corpus", &case.send).await;
        let got = openai.requests();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_eq!(
                status,
                case.status,
                "status; body {}",
                &body[..body.len().min(400)]
            );
            if let Some(code) = case.code.filter(|c| !c.is_empty()) {
                let v: Value =
                    serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
                assert_eq!(v["error"]["code"], code, "{body}");
            }
            match &case.seen {
                Seen::Nothing => assert!(got.is_empty(), "reached the provider: {:?}", got.first()),
                Seen::One(check) => {
                    assert_eq!(got.len(), 1, "requests at the provider");
                    check(&got[0]);
                }
            }
        }));
        if let Err(e) = outcome {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {why}", case.name));
        } else {
            println!("ok  {:>3}  {}", status, case.name);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nEnvoy log:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        s.envoy_log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("{} hostile cases, all as expected", cases.len());

    // What a provider's answer carries back: its request id and the gateway's headers, not the
    // account's organization, project, version, rate limits or cookies.
    let r = w.chat("chat").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h.get("x-request-id").unwrap(), "req_sim0001");
    assert_eq!(h.get("x-llmroute-backend").unwrap(), "openai");
    for name in [
        "openai-organization",
        "openai-project",
        "openai-processing-ms",
        "openai-version",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "set-cookie",
        "x-sim-provider",
    ] {
        assert!(h.get(name).is_none(), "{name} reached the workload: {h:?}");
    }

    // An opted-in operation passes, any method, with the account's key, and is charged its
    // tokensPerRequest as estimated usage; the route that did not opt in still refuses it.
    let files = s.serve("files-ok").await;
    openai.clear_requests();
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let r = files
            .client
            .request(method.clone(), format!("{}/files/file-abc", files.base))
            .bearer_auth(&files.key)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 401, "{method}");
    }
    let got = openai.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter().all(|r| r.path == "/v1/files/file-abc"),
        "{got:?}"
    );
    assert_eq!(
        got[0].header("authorization"),
        Some("Bearer openai-key-0001")
    );
    let charged =
        support::cluster::eventually(Duration::from_secs(10), "the charge counted", || {
            let n = sum(
                &counts.encode(),
                "llmroute_gateway_estimated_tokens_total",
                &["route=\"files-ok\"", "kind=\"prompt\""],
            );
            async move { (n == 14).then_some(n) }
        })
        .await;
    assert_eq!(charged, 14);
    let (status, _) = send(
        &w,
        s.port,
        "corpus",
        &Send::Http("GET", "files/file-abc", vec![], vec![]),
    )
    .await;
    assert_eq!(status, 404);
}

/// A stream's usage event reaches the client only when it asked for it, whatever else it sent;
/// the provider is asked either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_is_asked_for_always_and_shown_only_to_clients_that_asked() {
    let mut s = Stack::start("hostile-streams", "us").await;
    let openai = s
        .provider_with(
            "openai",
            SimConfig::new(SimProvider::OpenAI)
                .key("openai-key-0001")
                .any_model(),
        )
        .await;
    // Zhipu's catalog entry does not say it reports a stream's usage when asked: the gateway
    // does not add stream_options there, and passes on a client's own request for it.
    let zhipu = s
        .provider_with(
            "zhipu",
            SimConfig::new(SimProvider::Zhipu)
                .key("zhipu-key-0001")
                .any_model(),
        )
        .await;
    s.apply_route("ask", "", &[backend("openai", &openai, "gpt-4o-mini", "")]);
    s.apply_route("plain", "", &[backend("zhipu", &zhipu, "glm-4-flash", "")]);
    let ask = s.serve("ask").await;
    let plain = s.serve("plain").await;
    let counts = s.usage_log().await;
    let variants = [
        (r#""stream":true"#, false),
        (r#""stream":true,"stream_options":{}"#, false),
        (
            r#""stream":true,"stream_options":{"include_usage":false}"#,
            false,
        ),
        (r#""stream":true,"stream_options":null"#, false),
        (
            r#""stream":true,"stream_options":{"include_usage":"yes"}"#,
            false,
        ),
        (
            r#""stream":true,"stream_options":{"include_obfuscation":false}"#,
            false,
        ),
        (
            r#""stream":true,"stream_options":{"include_usage":true}"#,
            true,
        ),
        (
            r#""stream_options":{"include_usage":true},"stream":true"#,
            true,
        ),
    ];
    for (options, asked) in variants {
        let body: Value = serde_json::from_str(&format!(
            r#"{{"model":"chat","messages":[{{"role":"user","content":"hi"}}],{options}}}"#
        ))
        .unwrap();
        // The provider that reports usage when asked is always asked; the client sees the
        // usage event only if it asked.
        openai.clear_requests();
        let r = ask.chat_json(&body).await.unwrap();
        assert_eq!(r.status(), 200, "{options}");
        let text = r.text().await.unwrap();
        let got = openai.requests();
        assert_eq!(
            got[0].body["stream_options"],
            json!({ "include_usage": true }),
            "{options}"
        );
        assert_eq!(
            usage_events(&text).len(),
            usize::from(asked),
            "{options}: {text}"
        );
        // The other gets stream_options only when the client asked.
        zhipu.clear_requests();
        let r = plain.chat_json(&body).await.unwrap();
        assert_eq!(r.status(), 200, "{options}");
        let _ = r.text().await.unwrap();
        let got = zhipu.requests();
        assert_eq!(
            got[0].body.get("stream_options").cloned(),
            asked.then(|| json!({ "include_usage": true })),
            "{options}"
        );
    }
    // Every stream is counted: OpenAI's as it reported them; Zhipu's that reported no usage (its
    // client did not ask) by the gateway's estimate, marked as estimated.
    let estimated = variants.iter().filter(|(_, asked)| !asked).count() as u64;
    let text =
        support::cluster::eventually(Duration::from_secs(10), "every answer counted", || {
            let text = counts.encode();
            let n = sum(&text, "llmroute_gateway_requests_total", &[]);
            // (The models list each route answered when it became ready counts too.)
            async move { (n >= 2 * variants.len() as u64 + 2).then_some(text) }
        })
        .await;
    let unreported = |route: &str| {
        sum(
            &text,
            "llmroute_gateway_usage_unreported_total",
            &[&format!("route=\"{route}\"")],
        )
    };
    assert_eq!(
        (unreported("ask"), unreported("plain")),
        (0, estimated),
        "{text}"
    );
    let est = |text: &str, route: &str, kind: &str| {
        sum(
            text,
            "llmroute_gateway_estimated_tokens_total",
            &[&format!("route=\"{route}\""), &format!("kind=\"{kind}\"")],
        )
    };
    assert_eq!(
        est(&text, "ask", "prompt") + est(&text, "ask", "completion"),
        0,
        "{text}"
    );
    assert!(
        est(&text, "plain", "prompt") > 0 && est(&text, "plain", "completion") > 0,
        "{text}"
    );
    let all = |route: &str| {
        sum(
            &text,
            "llmroute_gateway_tokens_total",
            &[&format!("route=\"{route}\""), "kind=\"completion\""],
        )
    };
    assert!(
        all("plain") >= est(&text, "plain", "completion") && all("ask") > 0,
        "{text}"
    );

    // A stream cut off before its usage event (the provider breaks the connection after one
    // chunk) is counted for what the client received, by the estimate.
    openai.set_fault(llmroute_devkit::sim::Fault::StreamBreak { after_chunks: 1 });
    let body = json!({ "model": "chat", "stream": true,
        "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "hi" }] });
    if let Ok(r) = ask.chat_json(&body).await {
        let _ = r.bytes().await;
    }
    openai.set_fault(llmroute_devkit::sim::Fault::None);
    let (prompt, completion) = support::cluster::eventually(
        Duration::from_secs(10),
        "the cut-off stream counted",
        || {
            let text = counts.encode();
            let got = (est(&text, "ask", "prompt"), est(&text, "ask", "completion"));
            async move { (got.0 > 0).then_some(got) }
        },
    )
    .await;
    assert!(prompt > 0 && completion > 0, "{prompt} {completion}");
}
