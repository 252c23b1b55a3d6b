//! The simulators' contracts, per provider, and every fault, over real HTTP.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llmroute_devkit::sim::{
    ALL_PROVIDERS, AuthStyle, Fault, OPENAI_REGION_BLOCKED, Sim, SimConfig, SimProvider,
};
use serde_json::{Value, json};

const KEY: &str = "sk-sim-test";

async fn start(provider: SimProvider) -> Sim {
    Sim::start(SimConfig::new(provider).key(KEY)).await.unwrap()
}

/// URL of chat completions for `model` on this simulator.
fn chat_url(sim: &Sim, model: &str) -> String {
    match sim.provider() {
        SimProvider::AzureOpenAI => format!(
            "{}/openai/deployments/{model}/chat/completions?api-version=2024-10-21",
            sim.base_url()
        ),
        _ => format!("{}/chat/completions", sim.base_url()),
    }
}

fn models_url(sim: &Sim) -> String {
    match sim.provider() {
        SimProvider::AzureOpenAI => {
            format!("{}/openai/models?api-version=2024-10-21", sim.base_url())
        }
        _ => format!("{}/models", sim.base_url()),
    }
}

/// Adds the provider's auth headers with `key` (none when `None`).
fn auth(
    rb: reqwest::RequestBuilder,
    provider: SimProvider,
    key: Option<&str>,
) -> reqwest::RequestBuilder {
    let rb = if provider == SimProvider::Anthropic {
        rb.header("anthropic-version", "2023-06-01")
    } else {
        rb
    };
    match (key, provider.auth()) {
        (None, _) => rb,
        (Some(k), AuthStyle::Bearer) => rb.bearer_auth(k),
        (Some(k), AuthStyle::ApiKey) => rb.header("api-key", k),
        (Some(k), AuthStyle::XApiKey) => rb.header("x-api-key", k),
    }
}

async fn chat_with(sim: &Sim, key: Option<&str>, model: &str, stream: bool) -> reqwest::Response {
    auth(
        llmroute_devkit::tls::http_client().post(chat_url(sim, model)),
        sim.provider(),
        key,
    )
    .json(&json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }], "stream": stream }))
    .send()
    .await
    .unwrap()
}

async fn chat(sim: &Sim) -> reqwest::Response {
    let model = sim.models()[0].clone();
    chat_with(sim, Some(KEY), &model, false).await
}

async fn status_body(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn every_provider_serves_its_contract() {
    for provider in ALL_PROVIDERS {
        let sim = start(provider).await;
        let id = provider.id();
        let model = provider.catalog_models()[0];
        assert_eq!(sim.models()[0], model);

        // A good request: 200, OpenAI shape, naming the model and the provider.
        let resp = chat(&sim).await;
        assert_eq!(resp.status(), 200, "{id}");
        assert_eq!(resp.headers()["x-sim-provider"], id);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion", "{id}");
        assert_eq!(body["model"], model, "{id}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("hello from {id}")
        );
        let got = sim.last_request().unwrap();
        assert_eq!(got.model.as_deref(), Some(model), "{id}");
        assert_eq!(got.method, "POST");
        assert!(!got.stream);
        assert_eq!(got.body["messages"][0]["content"], "hi");
        let expected_path = match provider {
            SimProvider::AzureOpenAI => {
                format!("/openai/deployments/{model}/chat/completions?api-version=2024-10-21")
            }
            _ => format!("{}/chat/completions", provider.base_path()),
        };
        assert_eq!(got.path, expected_path, "{id}");
        assert_eq!(
            sim.base_url(),
            format!("http://127.0.0.1:{}{}", sim.port(), provider.base_path())
        );

        // Wrong and missing keys: the provider's 401.
        let marker = match provider {
            SimProvider::OpenAI | SimProvider::DashScope => "invalid_api_key",
            SimProvider::AzureOpenAI => "Access denied due to invalid subscription key",
            SimProvider::Zhipu => "\"1000\"",
            SimProvider::Qianfan => "invalid_iam_token",
            SimProvider::DeepSeek => "Authentication Fails",
            SimProvider::Moonshot => "invalid_authentication_error",
            SimProvider::MiniMax => "1004",
            SimProvider::Anthropic => "authentication_error",
            SimProvider::OpenAICompatible => "Unauthorized",
            SimProvider::SenseNova | SimProvider::Hunyuan => "invalid_api_key",
        };
        let (status, body) =
            status_body(chat_with(&sim, Some("sk-wrong"), model, false).await).await;
        assert_eq!(status, 401, "{id}: {body}");
        assert!(body.contains(marker), "{id}: {body}");
        let (status, body) = status_body(chat_with(&sim, None, model, false).await).await;
        assert_eq!(status, 401, "{id}: {body}");
        if provider == SimProvider::Zhipu {
            assert!(body.contains("\"1001\""), "{body}");
        }

        // A key in another provider's header is no key.
        if provider.auth() != AuthStyle::Bearer {
            let resp = llmroute_devkit::tls::http_client()
                .post(chat_url(&sim, model))
                .bearer_auth(KEY)
                .header("anthropic-version", "2023-06-01")
                .json(&json!({ "model": model, "messages": [] }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{id}");
        }

        // Unknown model: the provider's not-found answer.
        let (status, body) = status_body(chat_with(&sim, Some(KEY), "gpt-nope", false).await).await;
        let expected = match provider {
            SimProvider::Zhipu | SimProvider::DeepSeek => 400,
            _ => 404,
        };
        assert_eq!(status, expected, "{id}: {body}");

        // Models list.
        let resp = auth(
            llmroute_devkit::tls::http_client().get(models_url(&sim)),
            provider,
            Some(KEY),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 200, "{id}");
        let list: Value = resp.json().await.unwrap();
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, provider.catalog_models(), "{id}");
        let resp = auth(
            llmroute_devkit::tls::http_client().get(models_url(&sim)),
            provider,
            Some("bad"),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 401, "{id}");

        // Another provider's path is not served.
        let resp = auth(
            llmroute_devkit::tls::http_client().post(format!(
                "http://127.0.0.1:{}/v9/chat/completions",
                sim.port()
            )),
            provider,
            Some(KEY),
        )
        .json(&json!({ "model": model }))
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 404, "{id}");
        assert_eq!(sim.request_count(), sim.requests().len() as u64);
    }
}

#[tokio::test]
async fn provider_specifics() {
    // Azure: api-version required (Azure's 404), deployment is the model, api-key header.
    let azure = start(SimProvider::AzureOpenAI).await;
    let resp = llmroute_devkit::tls::http_client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions",
            azure.base_url()
        ))
        .header("api-key", KEY)
        .json(&json!({ "messages": [] }))
        .send()
        .await
        .unwrap();
    let (status, body) = status_body(resp).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"error":{"code":"404","message":"Resource not found"}}"#
    );
    let resp = chat_with(&azure, Some(KEY), "gpt-4o-mini", false).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(azure.last_request().unwrap().header("api-key"), Some(KEY));
    let (status, body) =
        status_body(chat_with(&azure, Some(KEY), "my-deployment", false).await).await;
    assert_eq!(status, 404);
    assert!(body.contains("DeploymentNotFound"), "{body}");

    // DeepSeek: with and without /v1.
    let ds = start(SimProvider::DeepSeek).await;
    for path in ["/chat/completions", "/v1/chat/completions"] {
        let resp = llmroute_devkit::tls::http_client()
            .post(format!("http://127.0.0.1:{}{path}", ds.port()))
            .bearer_auth(KEY)
            .json(&json!({ "model": "deepseek-chat", "messages": [] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }

    // Anthropic: anthropic-version required.
    let an = start(SimProvider::Anthropic).await;
    let resp = llmroute_devkit::tls::http_client()
        .post(chat_url(&an, "claude-sonnet-4-5"))
        .header("x-api-key", KEY)
        .json(&json!({ "model": "claude-sonnet-4-5", "messages": [] }))
        .send()
        .await
        .unwrap();
    let (status, body) = status_body(resp).await;
    assert_eq!(status, 400);
    assert!(body.contains("anthropic-version"), "{body}");

    // Self-hosted: open without keys, closed with.
    let open = Sim::start(SimConfig::new(SimProvider::OpenAICompatible))
        .await
        .unwrap();
    assert_eq!(
        chat_with(&open, None, "qwen2.5:7b", false).await.status(),
        200
    );
    let closed = start(SimProvider::OpenAICompatible).await;
    assert_eq!(
        chat_with(&closed, None, "qwen2.5:7b", false).await.status(),
        401
    );

    // Configured models, any model, base path override, lenient paths.
    let sim = Sim::start(
        SimConfig::new(SimProvider::Zhipu)
            .key(KEY)
            .models(["glm-x"])
            .base_path("/custom/"),
    )
    .await
    .unwrap();
    assert_eq!(
        sim.base_url(),
        format!("http://127.0.0.1:{}/custom", sim.port())
    );
    assert_eq!(
        chat_with(&sim, Some(KEY), "glm-x", false).await.status(),
        200
    );
    assert_eq!(
        chat_with(&sim, Some(KEY), "glm-4-plus", false)
            .await
            .status(),
        400
    );
    let any = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .key(KEY)
            .any_model()
            .lenient_paths(),
    )
    .await
    .unwrap();
    let resp = llmroute_devkit::tls::http_client()
        .post(format!(
            "http://127.0.0.1:{}/api/paas/v4/chat/completions",
            any.port()
        ))
        .bearer_auth(KEY)
        .json(&json!({ "model": "whatever" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Key rotation, with overlap.
    let sim = start(SimProvider::Moonshot).await;
    sim.set_keys(vec![KEY.into(), "sk-new".into()]);
    assert_eq!(
        chat_with(&sim, Some("sk-new"), "kimi-k2", false)
            .await
            .status(),
        200
    );
    assert_eq!(
        chat_with(&sim, Some(KEY), "kimi-k2", false).await.status(),
        200
    );
    sim.set_key("sk-new");
    assert_eq!(
        chat_with(&sim, Some(KEY), "kimi-k2", false).await.status(),
        401
    );
}

/// Status and a body marker per provider and fault; the markers are those the catalog's error
/// classification matches on, where it has one.
#[tokio::test]
async fn faults_answer_with_each_providers_body() {
    use SimProvider::*;
    for provider in ALL_PROVIDERS {
        let sim = start(provider).await;
        let id = provider.id();
        let cases: [(Fault, u16, &str); 6] = [
            (
                Fault::RegionBlocked,
                403,
                match provider {
                    Anthropic => "not available in your region",
                    _ => "unsupported_country_region_territory",
                },
            ),
            (
                Fault::RateLimited {
                    retry_after_secs: 7,
                },
                429,
                match provider {
                    Moonshot => "rate_limit_reached_error",
                    Zhipu => "\"1302\"",
                    Qianfan => "rpm_rate_limit_exceeded",
                    DashScope => "Throttling",
                    AzureOpenAI => "RateLimitReached",
                    Anthropic => "rate_limit_error",
                    MiniMax => "1002",
                    DeepSeek => "Rate Limit Reached",
                    _ => "rate_limit_exceeded",
                },
            ),
            (
                Fault::QuotaExhausted,
                match provider {
                    DeepSeek | MiniMax => 402,
                    Anthropic | DashScope => 400,
                    Qianfan => 403,
                    _ => 429,
                },
                match provider {
                    DeepSeek => "Insufficient Balance",
                    Moonshot => "exceeded_current_quota_error",
                    Zhipu => "\"1113\"",
                    Qianfan => "insufficient_balance",
                    DashScope => "Arrearage",
                    MiniMax => "insufficient balance",
                    Anthropic => "credit balance is too low",
                    _ => "insufficient_quota",
                },
            ),
            (Fault::PermissionDenied, 403, ""),
            (Fault::ServerError, 500, ""),
            (
                Fault::Unavailable,
                if provider == Anthropic { 529 } else { 503 },
                "",
            ),
        ];
        for (fault, status, marker) in cases {
            sim.set_fault(fault.clone());
            let resp = chat(&sim).await;
            let retry_after = resp.headers().get("retry-after").cloned();
            let (got, body) = status_body(resp).await;
            assert_eq!(got, status, "{id} {fault:?}: {body}");
            assert!(body.contains(marker), "{id} {fault:?}: {body}");
            if fault == Fault::PermissionDenied {
                assert!(
                    !body.contains("unsupported_country_region_territory")
                        && !body.contains("region"),
                    "{body}"
                );
            }
            if matches!(fault, Fault::RateLimited { .. }) {
                assert_eq!(retry_after.unwrap(), "7", "{id}");
            }
            serde_json::from_str::<Value>(&body).unwrap();
        }
        sim.set_fault(Fault::None);
        assert_eq!(chat(&sim).await.status(), 200);
    }

    // OpenAI's region block, byte for byte.
    let sim = start(OpenAI).await;
    sim.set_fault(Fault::RegionBlocked);
    let (_, body) = status_body(chat(&sim).await).await;
    assert_eq!(body, OPENAI_REGION_BLOCKED);
    assert_eq!(
        body,
        r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#
    );
}

/// Reads an SSE response, returning each `data:` payload with its arrival time, and whether the
/// stream ended cleanly.
async fn read_sse(resp: reqwest::Response) -> (Vec<(String, Instant)>, bool) {
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    loop {
        match body.next().await {
            Some(Ok(bytes)) => {
                buf.push_str(std::str::from_utf8(&bytes).unwrap());
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let data = event.trim_end().strip_prefix("data: ").unwrap().to_string();
                    events.push((data, Instant::now()));
                }
            }
            Some(Err(_)) => return (events, false),
            None => return (events, true),
        }
    }
}

#[tokio::test]
async fn sse_is_incremental() {
    let sim = Sim::start(
        SimConfig::new(SimProvider::Zhipu)
            .key(KEY)
            .stream(5, Duration::from_millis(150)),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let resp = chat_with(&sim, Some(KEY), "glm-4-plus", true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (events, clean) = read_sse(resp).await;
    assert!(clean);
    assert_eq!(events.len(), 7, "5 content chunks, a finish chunk, [DONE]");
    assert_eq!(events.last().unwrap().0, "[DONE]");
    let first = events[0].1 - t0;
    let last = events[4].1 - t0;
    assert!(
        first < Duration::from_millis(120),
        "first chunk after {first:?}"
    );
    assert!(
        last >= Duration::from_millis(600),
        "last chunk after {last:?}"
    );
    let mut text = String::new();
    for (data, _) in &events[..6] {
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "glm-4-plus");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert!(text.starts_with("hello from zhipu"), "{text}");
    let finish: Value = serde_json::from_str(&events[5].0).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(sim.last_request().unwrap().stream);
}

/// OpenAI's legacy text completions stream too: `text_completion` chunks with the text in
/// `choices[].text`, and their usage in a last chunk only when asked, counted as sent.
#[tokio::test]
async fn text_completions_stream_with_usage_only_when_asked() {
    let sim = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .key(KEY)
            .stream(3, Duration::from_millis(5)),
    )
    .await
    .unwrap();
    for asked in [false, true] {
        let mut body = json!({ "model": "gpt-4o", "prompt": "two words", "stream": true });
        if asked {
            body["stream_options"] = json!({ "include_usage": true });
        }
        let before = sim.usage_sent();
        let resp = reqwest::Client::new()
            .post(format!("{}/completions", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (events, clean) = read_sse(resp).await;
        assert!(clean);
        assert_eq!(events.last().unwrap().0, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(d, _)| serde_json::from_str(d).unwrap())
            .collect();
        assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, "hello from openai");
        let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
        let after = sim.usage_sent();
        if asked {
            assert_eq!(usage.len(), 1, "{chunks:?}");
            assert_eq!(usage[0]["choices"], json!([]));
            assert_eq!(usage[0]["usage"]["prompt_tokens"], 2);
            assert_eq!(usage[0]["usage"]["completion_tokens"], 3);
            assert_eq!(after.prompt - before.prompt, 2);
        } else {
            assert!(usage.is_empty(), "{chunks:?}");
            assert_eq!(after.prompt, before.prompt, "usage counted but not sent");
        }
    }
}

#[tokio::test]
async fn stream_break_cuts_without_done() {
    let sim = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .key(KEY)
            .stream(5, Duration::from_millis(10)),
    )
    .await
    .unwrap();
    sim.set_fault(Fault::StreamBreak { after_chunks: 2 });
    let resp = chat_with(&sim, Some(KEY), "gpt-4o", true).await;
    assert_eq!(resp.status(), 200);
    let (events, clean) = read_sse(resp).await;
    assert!(!clean, "the stream must end in an error");
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|(d, _)| d != "[DONE]"));

    // A non-streaming answer is cut inside its JSON.
    let resp = chat_with(&sim, Some(KEY), "gpt-4o", false).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());

    sim.set_fault(Fault::None);
    let (events, clean) = read_sse(chat_with(&sim, Some(KEY), "gpt-4o", true).await).await;
    assert!(clean && events.last().unwrap().0 == "[DONE]");
}

#[tokio::test]
async fn hang_and_slow_first_byte() {
    let sim = start(SimProvider::DashScope).await;
    sim.set_fault(Fault::Hang);
    llmroute_devkit::tls::install_default_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let err = auth(
        client.post(chat_url(&sim, "qwen-plus")),
        sim.provider(),
        Some(KEY),
    )
    .json(&json!({ "model": "qwen-plus" }))
    .send()
    .await
    .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    sim.set_fault(Fault::SlowFirstByte(Duration::from_millis(300)));
    let t0 = Instant::now();
    assert_eq!(chat(&sim).await.status(), 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    sim.set_fault(Fault::None);
    let t0 = Instant::now();
    assert_eq!(chat(&sim).await.status(), 200);
    assert!(t0.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn connection_refused_then_recovery() {
    let sim = start(SimProvider::OpenAI).await;
    // One client with keep-alive: its pooled connection is reset too.
    let client = llmroute_devkit::tls::http_client();
    let send = || {
        client
            .post(chat_url(&sim, "gpt-4o"))
            .bearer_auth(KEY)
            .json(&json!({ "model": "gpt-4o" }))
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    let before = sim.request_count();
    sim.set_fault(Fault::ConnectionRefused);
    for _ in 0..3 {
        assert!(send().await.is_err());
    }
    assert!(
        llmroute_devkit::tls::http_client()
            .post(chat_url(&sim, "gpt-4o"))
            .send()
            .await
            .is_err()
    );
    assert_eq!(
        sim.request_count(),
        before,
        "reset connections are not requests"
    );

    // The admin API still answers, and lifts the fault.
    let admin = format!("http://127.0.0.1:{}/__sim/fault", sim.port());
    let resp = llmroute_devkit::tls::http_client()
        .put(&admin)
        .json(&json!({ "fault": "none" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.fault(), Fault::None);
    assert_eq!(send().await.unwrap().status(), 200);

    // Scripted: only the next request is refused.
    sim.fail_next(1, Fault::ConnectionRefused);
    assert!(send().await.is_err());
    assert_eq!(send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn flap_alternates() {
    let sim = start(SimProvider::OpenAI).await;
    sim.set_fault(Fault::flap(Duration::from_millis(200)));
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_millis(900) {
        let at = t0.elapsed();
        let status = chat(&sim).await.status().as_u16();
        let done = t0.elapsed();
        // Skip samples near a phase boundary, and those whose request crossed one (a slow machine).
        let within = at.as_millis() % 200;
        if (20..180).contains(&within) && at.as_millis() / 200 == done.as_millis() / 200 {
            let expected = if (at.as_millis() / 200).is_multiple_of(2) {
                200
            } else {
                403
            };
            assert_eq!(status, expected, "at {at:?}");
        }
        seen.push(status);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen.contains(&200) && seen.contains(&403), "{seen:?}");

    // Flap with another fault.
    sim.set_fault(Fault::Flap {
        period: Duration::from_millis(100),
        fault: Box::new(Fault::ServerError),
    });
    tokio::time::sleep(Duration::from_millis(130)).await;
    assert_eq!(chat(&sim).await.status(), 500);
}

#[tokio::test]
async fn scripts_fail_the_next_requests() {
    let sim = start(SimProvider::Qianfan).await;
    sim.fail_next(2, Fault::ServerError);
    sim.script([Fault::RateLimited {
        retry_after_secs: 2,
    }]);
    assert_eq!(chat(&sim).await.status(), 500);
    assert_eq!(chat(&sim).await.status(), 500);
    assert_eq!(chat(&sim).await.status(), 429);
    assert_eq!(chat(&sim).await.status(), 200);
    // A standing fault resumes after the script.
    sim.set_fault(Fault::QuotaExhausted);
    sim.fail_next(1, Fault::None);
    assert_eq!(chat(&sim).await.status(), 200);
    assert_eq!(chat(&sim).await.status(), 403);
}

#[tokio::test]
async fn admin_api_drives_the_simulator() {
    let sim = start(SimProvider::Zhipu).await;
    let admin = |p: &str| format!("http://127.0.0.1:{}/__sim/{p}", sim.port());
    let client = llmroute_devkit::tls::http_client();
    assert_eq!(chat(&sim).await.status(), 200);

    let requests: Value = client
        .get(admin("requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requests.as_array().unwrap().len(), 1);
    assert_eq!(requests[0]["model"], "glm-4-plus");
    assert_eq!(requests[0]["path"], "/api/paas/v4/chat/completions");
    assert_eq!(
        requests[0]["headers"]["authorization"],
        format!("Bearer {KEY}")
    );

    for (fault, status) in [
        (json!({ "fault": "quota-exhausted" }), 429),
        (
            json!({ "fault": "rate-limited", "retry_after_secs": 3 }),
            429,
        ),
        (json!({ "fault": "region-blocked" }), 403),
        (json!({ "fault": "none" }), 200),
    ] {
        let resp = client
            .put(admin("fault"))
            .json(&fault)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(chat(&sim).await.status(), status, "{fault}");
    }
    let resp = client
        .put(admin("fault"))
        .json(&json!({ "fault": "server-error", "next": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(chat(&sim).await.status(), 500);
    assert_eq!(chat(&sim).await.status(), 200);
    let bad = client
        .put(admin("fault"))
        .json(&json!({ "fault": "nope" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let resp = client
        .put(admin("keys"))
        .json(&json!({ "keys": ["k2"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(chat(&sim).await.status(), 401);
    assert_eq!(
        chat_with(&sim, Some("k2"), "glm-4-plus", false)
            .await
            .status(),
        200
    );

    let info: Value = client
        .get(admin("info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["provider"], "zhipu");
    assert_eq!(info["base_url"], sim.base_url());
    client.delete(admin("requests")).send().await.unwrap();
    assert!(sim.requests().is_empty());

    // Round trip of every fault through JSON.
    for fault in [
        Fault::None,
        Fault::RegionBlocked,
        Fault::RateLimited {
            retry_after_secs: 4,
        },
        Fault::QuotaExhausted,
        Fault::PermissionDenied,
        Fault::ServerError,
        Fault::Unavailable,
        Fault::Hang,
        Fault::SlowFirstByte(Duration::from_millis(250)),
        Fault::ConnectionRefused,
        Fault::StreamBreak { after_chunks: 3 },
        Fault::Flap {
            period: Duration::from_secs(2),
            fault: Box::new(Fault::Unavailable),
        },
    ] {
        assert_eq!(Fault::from_json(&fault.to_json()).unwrap(), fault);
    }
}

#[tokio::test]
async fn recording_can_be_turned_off() {
    let sim = Sim::start(SimConfig::new(SimProvider::OpenAI).key(KEY).record(false))
        .await
        .unwrap();
    for _ in 0..3 {
        let body: Value = chat(&sim).await.json().await.unwrap();
        assert_eq!(body["model"], "gpt-4o");
    }
    assert_eq!(sim.request_count(), 3);
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn fixed_port_and_stop_on_drop() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let sim = Sim::start(SimConfig::new(SimProvider::Hunyuan).key(KEY).port(port))
        .await
        .unwrap();
    assert_eq!(sim.port(), port);
    assert_eq!(chat(&sim).await.status(), 200);
    let clone = sim.clone();
    drop(sim);
    assert_eq!(chat(&clone).await.status(), 200, "a clone keeps it running");
    drop(clone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        llmroute_devkit::tls::http_client()
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .send()
            .await
            .is_err()
    );
}
