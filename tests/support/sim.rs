//! A scriptable OpenAI-compatible provider for tests, on 127.0.0.1. It follows the OpenAI chat
//! completions contract (POST <base>/chat/completions, `Authorization: Bearer <key>`, JSON in the
//! OpenAI shape, OpenAI's error bodies) and records every request it receives. Provider-specific
//! simulators build on it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// How the simulator answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 with a completion naming the received model.
    Ok,
    /// OpenAI's region block: 403 `unsupported_country_region_territory`.
    RegionBlocked,
    /// 429 `rate_limit_exceeded`.
    RateLimited,
    /// 429 `insufficient_quota`.
    QuotaExhausted,
    /// A permission 403 that must not fail over.
    Forbidden,
    /// 500.
    ServerError,
}

/// One request as the provider saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

struct Inner {
    key: Mutex<String>,
    mode: Mutex<Mode>,
    received: Mutex<Vec<Received>>,
}

/// A running simulator.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
    pub port: u16,
}

impl Sim {
    /// Starts a simulator that accepts `key`.
    pub async fn start(key: &str) -> Sim {
        let inner = Arc::new(Inner {
            key: Mutex::new(key.to_string()),
            mode: Mutex::new(Mode::Ok),
            received: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind simulator");
        let port = listener.local_addr().expect("addr").port();
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.expect("simulator serves") });
        Sim { inner, port }
    }

    /// Accept another key from now on (rotation).
    pub fn set_key(&self, key: &str) {
        *self.inner.key.lock().unwrap() = key.to_string();
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap() = mode;
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, code: &str, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    inner.received.lock().unwrap().push(Received {
        path: uri.to_string(),
        headers: headers.clone(),
        body: json.clone(),
    });
    let expected = format!("Bearer {}", inner.key.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "invalid_request_error",
            "Incorrect API key provided.",
        );
    }
    let mode = inner.mode.lock().unwrap().clone();
    match mode {
        Mode::Ok => {
            let model = json.get("model").cloned().unwrap_or_default();
            let body = serde_json::json!({
                "id": "chatcmpl-sim", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": "hello" }, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 },
            });
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Mode::RegionBlocked => error(
            StatusCode::FORBIDDEN,
            "unsupported_country_region_territory",
            "request_forbidden",
            "Country, region, or territory not supported",
        ),
        Mode::RateLimited => error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "requests",
            "Rate limit reached.",
        ),
        Mode::QuotaExhausted => error(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        Mode::Forbidden => error(
            StatusCode::FORBIDDEN,
            "model_not_found",
            "invalid_request_error",
            "You are not allowed to sample from this model",
        ),
        Mode::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "server_error",
            "The server had an error.",
        ),
    }
}
