//! End to end through the real Envoy running exactly what `llmroute run` stored in the API server
//! (see tests/support/e2e.rs): per-provider routing and model mapping, the failover matrix, SSE,
//! weights, the all-backends-failed error, route keys, route edits under load, and no key in any
//! log. Health probing is off in these routes so that only in-request failover is under test
//! (tests/policy_e2e.rs covers probing).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmroute_devkit::sim::{Fault, Sim, SimConfig, SimProvider};
use support::e2e::{Stack, backend, backend_models, backend_of, metric, route};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_gets_its_own_key_path_host_and_model() {
    let mut s = Stack::start("dp-providers", "us").await;
    // (provider, backend name, its model)
    let cases = [
        (SimProvider::OpenAI, "openai", "gpt-4o-mini"),
        (SimProvider::AzureOpenAI, "azure", "gpt-4o"),
        (SimProvider::Zhipu, "zhipu", "glm-4-flash"),
        (SimProvider::Qianfan, "qianfan", "ernie-speed-128k"),
        (SimProvider::DashScope, "dashscope", "qwen-turbo"),
    ];
    let mut sims = Vec::new();
    for (provider, name, model) in cases {
        let key = format!("{name}-secret-key-0001");
        let sim = s.provider(name, provider, &key).await;
        s.apply_route(name, "", &[backend(name, &sim, model, "")]);
        sims.push((name, model, key, sim));
    }
    // Self-hosted (vLLM-like) over plain HTTP, without a key.
    let vllm = Sim::start(SimConfig::new(SimProvider::OpenAICompatible).models(["llama-3"]))
        .await
        .unwrap();
    s.ns.apply(&format!(
        "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: vllm }}\nspec:\n  policy: {{ healthCheck: {{ enabled: false }} }}\n  backends:\n    - name: vllm\n      provider: openai-compatible\n      endpoint: {}\n      models: {{ chat: llama-3 }}\n",
        vllm.base_url()
    ));

    for (name, model, key, sim) in &sims {
        let w = s.serve(name).await;
        let r = w.chat("chat").await.unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
        assert_eq!(backend_of(&r), *name);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["model"], *model, "{name}");
        let got = sim.last_request().expect("the provider saw the request");
        assert_eq!(got.model.as_deref(), Some(*model), "{name}: model mapped");
        // Its own auth header with its own key, nothing of the route key or another provider's.
        let (auth_header, expected) = if *name == "azure" {
            ("api-key", key.clone())
        } else {
            ("authorization", format!("Bearer {key}"))
        };
        assert_eq!(got.header(auth_header), Some(expected.as_str()), "{name}");
        if *name == "azure" {
            assert_eq!(
                got.header("authorization"),
                None,
                "azure gets no bearer token"
            );
            assert_eq!(
                got.path,
                format!("/openai/deployments/{model}/chat/completions?api-version=2024-10-21")
            );
        } else {
            let base_path = sim.provider().base_path();
            assert_eq!(got.path, format!("{base_path}/chat/completions"), "{name}");
        }
        assert_eq!(
            got.header("host"),
            Some(format!("127.0.0.1:{}", sim.public_port()).as_str()),
            "{name}: Host is the provider's"
        );
        let all_headers = format!("{:?}", got.headers);
        assert!(!all_headers.contains(&w.key), "{name} saw the route key");
        for (other, _, other_key, _) in &sims {
            if other != name {
                assert!(
                    !all_headers.contains(other_key.as_str()),
                    "{name} saw {other}'s key"
                );
            }
        }
        assert!(
            !got.headers.keys().any(|h| h.starts_with("x-llmroute")),
            "{name}: internal headers leak: {all_headers}"
        );
    }
    let w = s.serve("vllm").await;
    let r = w.chat("chat").await.unwrap();
    assert_eq!(r.status(), 200);
    let got = vllm.last_request().unwrap();
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.model.as_deref(), Some("llama-3"));
    assert_eq!(
        got.header("authorization"),
        None,
        "no key configured, none sent"
    );

    // Route keys: none or a wrong one → 401; an unknown model → 404 listing the route's models.
    let w = s.workload("openai").await;
    let no_key = w
        .client
        .post(format!("{}/chat/completions", w.base))
        .json(&serde_json::json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let wrong = support::e2e::Workload {
        key: "sk-wrong".into(),
        ..w.clone()
    };
    let r = wrong.chat("chat").await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let r = w.chat("gpt-5").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Models: chat"),
        "{body}"
    );
    leak_check(&s, sims.iter().map(|(_, _, k, _)| k.as_str()));
}

/// No provider key and no route key in Envoy's or the operator's log.
fn leak_check<'a>(s: &Stack, keys: impl IntoIterator<Item = &'a str>) {
    let envoy = s.envoy_log();
    let operator = s.operator_log();
    assert!(!envoy.is_empty() && !operator.is_empty());
    for key in keys {
        assert!(!envoy.contains(key), "a key is in Envoy's log");
        assert!(!operator.contains(key), "a key is in the operator's log");
    }
}

const FAILOVER_POLICY: &str = "    timeouts: { idle: 2s }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failover_trigger_moves_on_and_the_rest_reach_the_client_unchanged() {
    let mut s = Stack::start("dp-failover", "us").await;
    let primary = s
        .provider("primary", SimProvider::OpenAI, "primary-key-0001")
        .await;
    let backup = s
        .provider("backup", SimProvider::Zhipu, "backup-key-0001")
        .await;
    let backends = [
        backend("primary", &primary, "gpt-4o-mini", ""),
        backend("backup", &backup, "glm-4-flash", "      priority: 1\n"),
    ];
    s.apply_route("all", FAILOVER_POLICY, &backends);
    s.apply_route(
        "regiononly",
        &format!("{FAILOVER_POLICY}    failoverOn: [RegionBlocked]\n"),
        &backends,
    );
    let all = s.serve("all").await;
    let region_only = s.serve("regiononly").await;

    let r = all.chat("chat").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), backend_of(&r)),
        (200, "primary".into())
    );

    // Each class in failoverOn: the client gets 200 from the next backend.
    let triggers = [
        ("RegionBlocked", Fault::RegionBlocked),
        ("QuotaExhausted", Fault::QuotaExhausted),
        (
            "RateLimited",
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        ),
        ("ServerError", Fault::ServerError),
        ("ServerError (503)", Fault::Unavailable),
        ("Unreachable", Fault::ConnectionRefused),
        ("Timeout", Fault::Hang),
    ];
    for (class, fault) in triggers {
        primary.set_fault(fault);
        let started = Instant::now();
        let r = all.chat("chat").await.unwrap();
        let status = r.status();
        let from = backend_of(&r);
        let text = r.text().await.unwrap();
        assert_eq!(
            (status.as_u16(), from.as_str()),
            (200, "backup"),
            "{class}: {text}"
        );
        assert!(text.contains("hello from zhipu"), "{class}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{class} took {:?}",
            started.elapsed()
        );
    }
    // AuthFailed: the primary stops accepting its key.
    primary.set_fault(Fault::None);
    primary.set_key("another-key");
    let r = all.chat("chat").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), backend_of(&r)),
        (200, "backup".into()),
        "AuthFailed"
    );
    primary.set_key("primary-key-0001");

    // A permission 403 is never failed over: the client gets the provider's answer unchanged.
    primary.set_fault(Fault::PermissionDenied);
    let r = all.chat("chat").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(backend_of(&r), "primary");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");

    // A class left out of failoverOn reaches the client unchanged (with its retry-after).
    primary.set_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });
    let r = region_only.chat("chat").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "7");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // ...while a listed one still moves on.
    primary.set_fault(Fault::RegionBlocked);
    let r = region_only.chat("chat").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), backend_of(&r)),
        (200, "backup".into())
    );

    // Every backend failing: one OpenAI-shaped error naming each backend tried and why, promptly.
    backup.set_fault(Fault::QuotaExhausted);
    let started = Instant::now();
    let r = all.chat("chat").await.unwrap();
    let took = started.elapsed();
    let status = r.status();
    assert!(
        r.headers().get("x-llmroute-retry").is_none(),
        "internal marker leaked"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 429, "the last backend's status: {body}");
    assert_eq!(body["error"]["code"], "all_backends_failed", "{body}");
    assert_eq!(body["error"]["type"], "llmroute_backends_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("primary") && message.contains("backup (QuotaExhausted, HTTP 429)"),
        "{message}"
    );
    assert_eq!(body["error"]["backends"][0]["backend"], "primary");
    assert_eq!(body["error"]["backends"][1]["failure"], "QuotaExhausted");
    assert!(
        took < Duration::from_secs(2),
        "all-failed answer took {took:?}"
    );
    leak_check(&s, ["primary-key-0001", "backup-key-0001"]);
}

/// The JSON `data:` events of an SSE body, in order (`[DONE]` and other non-JSON data left out).
fn sse_events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// Reads an SSE body, returning (time of the first chunk, time of the last, chunk count).
async fn read_stream(
    r: reqwest::Response,
    started: Instant,
) -> (Duration, Duration, usize, String) {
    let mut first = None;
    let mut last = Duration::ZERO;
    let mut n = 0;
    let mut text = String::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("stream chunk");
        let at = started.elapsed();
        first.get_or_insert(at);
        last = at;
        n += 1;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (first.unwrap_or_default(), last, n, text)
}

/// The usage event the gateway asked for is taken out by the stream usage module and counted; a
/// gateway run without llmroute's module (`--gateway-usage-module=`) has nothing to check request
/// bodies with, and refuses every request with one (503) rather than pass it unchecked, while the
/// models list is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_event_the_client_did_not_ask_for_is_hidden_and_without_the_module_bodies_are_refused()
 {
    let mut s = Stack::start("dp-hide", "us").await;
    // Its lines with the counts read, as the Pod's sidecar prints them.
    let _counts = s.usage_log().await;
    let openai = s
        .provider_with(
            "openai",
            SimConfig::new(SimProvider::OpenAI)
                .key("o-key-0001")
                .record(true)
                .stream(3, Duration::from_millis(5)),
        )
        .await;
    s.apply_route("hide", "", &[backend("openai", &openai, "gpt-4o-mini", "")]);
    let body = serde_json::json!({
        "model": "chat",
        "stream": true,
        "messages": [{ "role": "user", "content": "a few words" }],
    });
    for with_module in [true, false] {
        if !with_module {
            s.without_usage_module();
        }
        s.serve("hide").await;
        // The gateway's front listener has the module exactly when the operator gives it.
        support::cluster::eventually(
            Duration::from_secs(30),
            "the front listener as the operator configures it",
            || {
                // (A listener being replaced drains on beside the new one: only active ones.)
                let has = s.loaded("dynamic_listeners")["configs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|l| {
                        l["active_state"]
                            .to_string()
                            .contains("envoy.filters.http.dynamic_modules")
                    });
                async move { (has == with_module).then_some(()) }
            },
        )
        .await;
        // A new connection: one opened before the update goes on with the filters it had.
        let w = s.workload("hide").await;
        openai.clear_requests();
        let r = w.chat_json(&body).await.unwrap();
        if !with_module {
            assert_eq!(r.status(), 503);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "request_checking_unavailable", "{v}");
            assert!(
                openai.requests().is_empty(),
                "an unchecked body reached OpenAI"
            );
            assert_eq!(w.get("/models").await.unwrap().status(), 200);
            continue;
        }
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-llmroute-usage-added").is_none());
        let text = r.text().await.unwrap();
        let asked = openai.last_request().unwrap().body["stream_options"]["include_usage"] == true;
        assert!(asked, "OpenAI was not asked for the usage");
        let events = sse_events(&text);
        assert!(
            events
                .iter()
                .all(|v| v.get("usage").is_none_or(|u| u.is_null())),
            "{text}"
        );
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let lines = support::cluster::eventually(
            Duration::from_secs(10),
            "the stream's access log line",
            || {
                let lines = access_log_of(&s.envoy_log(), "hide");
                async move { (lines.len() == 1).then_some(lines) }
            },
        )
        .await;
        let last = lines.last().unwrap();
        assert!(tokens(last, "total_tokens").is_some(), "{last}");
        assert_eq!(last["usage_estimated"], false, "{last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_arrive_incrementally_from_the_primary_and_from_a_fallback() {
    let mut s = Stack::start("dp-sse", "us").await;
    let interval = Duration::from_millis(200);
    let primary = s
        .provider_with(
            "primary",
            SimConfig::new(SimProvider::OpenAI)
                .key("p-key-0001")
                .stream(6, interval),
        )
        .await;
    let backup = s
        .provider_with(
            "backup",
            SimConfig::new(SimProvider::Qianfan)
                .key("b-key-0001")
                .stream(6, interval),
        )
        .await;
    s.apply_route(
        "chat",
        "",
        &[
            backend("primary", &primary, "gpt-4o-mini", ""),
            backend("backup", &backup, "ernie-speed-128k", "      priority: 1\n"),
        ],
    );
    let w = s.serve("chat").await;
    // The gateway reads every stream's usage as it passes, and asks OpenAI for it when the client
    // did not (hiding that event again): none of it may hold a stream back.
    for (case, expect) in [
        ("primary", "hello from openai"),
        ("primary, usage asked by the client", "hello from openai"),
        ("fallback", "hello from qianfan"),
    ] {
        if case == "fallback" {
            primary.set_fault(Fault::RegionBlocked);
        }
        let mut body = serde_json::json!({ "model": "chat", "stream": true,
            "messages": [{ "role": "user", "content": "hi" }] });
        if case.contains("usage asked") {
            body["stream_options"] = serde_json::json!({ "include_usage": true });
        }
        let started = Instant::now();
        let r = w.chat_json(&body).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let (first, last, n, text) = read_stream(r, started).await;
        // The simulator sends its first event at once and each next one an interval later: the
        // first event reaches the client before the provider has sent its second, and the last
        // about 5 intervals after the first.
        assert!(n >= 3, "{case}: the stream arrived in {n} piece(s)");
        assert!(
            first < interval,
            "{case}: first chunk at {first:?}, after the provider's second ({interval:?})"
        );
        assert!(
            first + interval * 3 < last,
            "{case}: first chunk at {first:?}, last at {last:?}"
        );
        if case.contains("usage asked") {
            assert!(text.contains(r#""choices":[],"usage":{"#), "{case}: {text}");
        }
        assert!(text.contains("data: [DONE]"), "{case}: {text}");
        let content: String = sse_events(&text)
            .into_iter()
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert!(content.contains(expect), "{case}: {content}");
    }
}

/// The front listener's access-log lines of `route`'s chat completions.
fn access_log_of(log: &str, route: &str) -> Vec<serde_json::Value> {
    let prefix = format!("/{route}/v1/chat/completions");
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v["path"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .collect()
}

fn tokens(line: &serde_json::Value, kind: &str) -> Option<u64> {
    line[kind].as_f64().map(|n| n as u64)
}

/// Token usage of every answer, whole or streamed, reaches the access log exactly as the provider
/// reported it. A stream whose client asked for no usage is asked for it where the provider takes
/// `stream_options` (OpenAI), and the extra chunk is hidden from that client; a client that asked
/// gets it; a provider not known to take `stream_options` (Zhipu here) gets the request unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_s_token_usage_is_read_streamed_or_not() {
    let mut s = Stack::start("dp-usage", "us").await;
    // What the gateway Pod's sidecar runs: the receiver of Envoy's gRPC usage log.
    let usage = s.usage_log().await;
    let mut sims = Vec::new();
    for (provider, key) in [
        (SimProvider::OpenAI, "o-key-0001"),
        (SimProvider::Zhipu, "z-key-0001"),
    ] {
        let mut config = SimConfig::new(provider).key(key).record(true);
        if provider == SimProvider::Zhipu {
            // Zhipu's whole answers say, in their text, what looks like usage: the gateway reads the
            // answer's own usage, not its content's.
            config = config.content_suffix(
                r#" {"usage": {"prompt_tokens": 1000000, "completion_tokens": 1000000, "total_tokens": 2000000, "prompt_tokens_details": {"cached_tokens": 7}}, "model": "decoy"}"#,
            );
        }
        let config = config.stream(4, Duration::from_millis(5));
        sims.push(s.provider_with(provider.id(), config).await);
    }
    let (openai, zhipu) = (sims[0].clone(), sims[1].clone());
    s.apply_route(
        "metered",
        "",
        &[backend(
            "openai",
            &openai,
            "gpt-4o-mini",
            "      cost: { input: \"2.5\", output: \"10\" }\n",
        )],
    );
    s.apply_route("glm", "", &[backend("zhipu", &zhipu, "glm-4-flash", "")]);
    let w = s.serve("metered").await;
    let g = s.serve("glm").await;

    const REQUESTS: usize = 30;
    let send = |w: &support::e2e::Workload, i: usize| {
        let (w, words) = (w.clone(), vec!["word"; i % 7 + 1].join(" "));
        async move {
            let mut body = serde_json::json!({
                "model": "chat",
                "messages": [
                    { "role": "system", "content": "be brief" },
                    { "role": "user", "content": words },
                ],
            });
            match i % 3 {
                0 => {}
                1 => body["stream"] = true.into(),
                _ => {
                    body["stream"] = true.into();
                    body["stream_options"] = serde_json::json!({ "include_usage": true });
                }
            }
            let r = w.chat_json(&body).await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let usage_events = |text: &str| {
        sse_events(text)
            .into_iter()
            .filter(|v| v["choices"] == serde_json::json!([]) && v["usage"].is_object())
            .count()
    };
    for i in 0..REQUESTS {
        let text = send(&w, i).await;
        let asked = openai.last_request().unwrap().body["stream_options"]["include_usage"] == true;
        match i % 3 {
            0 => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{text}");
                assert!(!asked);
            }
            1 => {
                // Asked for the client, hidden from it; the rest of the stream is intact.
                assert!(asked, "OpenAI was not asked for the stream's usage");
                assert_eq!(usage_events(&text), 0, "{text}");
                assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
                assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
            }
            _ => assert_eq!(usage_events(&text), 1, "the client asked: {text}"),
        }
        // Zhipu is not known to take stream_options: its requests go as the client sent them.
        let text = send(&g, i).await;
        let body = zhipu.last_request().unwrap().body;
        assert_eq!(
            body.get("stream_options").is_some(),
            i % 3 == 2,
            "{body}: {text}"
        );
    }

    // The stream reader (llmroute's Envoy module) read the usage of every stream that carried one,
    // once: the OpenAI route's streams (a third asked by the gateway, a third by the client) and
    // the Zhipu route's streams whose client asked (a third); the front Lua only hides the usage
    // event it asked for. Shown below, per answer and in sum, from the access log.
    // Every answer is in the access log with the usage the provider sent, summed exactly.
    let sent = openai.usage_sent();
    assert!(
        sent.prompt > 0 && sent.completion > 0 && sent.cached > 0,
        "{sent:?}"
    );
    let lines = support::cluster::eventually(
        Duration::from_secs(10),
        "every request of the route in the access log",
        || {
            let lines = access_log_of(&s.envoy_log(), "metered");
            async move { (lines.len() == REQUESTS).then_some(lines) }
        },
    )
    .await;
    assert!(
        lines.iter().all(|l| tokens(l, "total_tokens").is_some()),
        "an answer without usage in the log: {lines:?}"
    );
    assert_eq!(sum_of(&lines, "prompt_tokens"), sent.prompt);
    assert_eq!(sum_of(&lines, "completion_tokens"), sent.completion);
    assert_eq!(sum_of(&lines, "cached_tokens"), sent.cached);
    assert_eq!(sum_of(&lines, "total_tokens"), sent.total());
    assert!(
        lines.iter().all(|l| l["provider_model"] == "gpt-4o-mini"),
        "{lines:?}"
    );

    // Zhipu: whole answers and the streams whose client asked are counted as reported; the others
    // had no usage (Zhipu is not asked: its catalog entry does not say it reports it when asked) and
    // are counted by the gateway's estimate, marked as such.
    let sent = zhipu.usage_sent();
    let lines = access_log_of(&s.envoy_log(), "glm");
    assert_eq!(lines.len(), REQUESTS);
    let (estimated, reported): (Vec<_>, Vec<_>) = lines
        .iter()
        .cloned()
        .partition(|l| l["usage_estimated"] == true);
    assert_eq!(reported.len(), REQUESTS - REQUESTS / 3, "{lines:?}");
    assert!(
        estimated
            .iter()
            .all(|l| tokens(l, "completion_tokens").is_some_and(|n| n > 0)),
        "{estimated:?}"
    );
    assert_eq!(sum_of(&reported, "total_tokens"), sent.total());

    // The same answers, counted by the usage-log receiver (the metrics the Pod serves).
    let metrics = support::cluster::eventually(
        Duration::from_secs(10),
        "every answer in the usage metrics",
        || {
            let text = usage.encode();
            async move {
                // (`serve` asked each route for its models list too: the gateway answers that.)
                let answered = metric(
                    &text,
                    "llmroute_gateway_requests_total",
                    &[r#"outcome="success""#, r#"model="chat""#],
                );
                (answered == 2 * REQUESTS as u64).then_some(text)
            }
        },
    )
    .await;
    let ns = format!(r#"namespace="{}""#, s.ns.name);
    let (openai_sent, zhipu_sent) = (openai.usage_sent(), zhipu.usage_sent());
    for (route, backend, provider_model, sent) in [
        ("metered", "openai", "gpt-4o-mini", openai_sent),
        ("glm", "zhipu", "glm-4-flash", zhipu_sent),
    ] {
        let labels = |kind: &'static str| {
            [
                ns.clone(),
                format!(r#"route="{route}""#),
                format!(r#"backend="{backend}""#),
                r#"model="chat""#.to_string(),
                format!(r#"provider_model="{provider_model}""#),
                format!(r#"kind="{kind}""#),
            ]
        };
        // What the providers reported: the counted tokens less the gateway's estimates.
        let count = |kind| {
            let l = labels(kind);
            let l = l.iter().map(String::as_str).collect::<Vec<_>>();
            metric(&metrics, "llmroute_gateway_tokens_total", &l)
                - metric(&metrics, "llmroute_gateway_estimated_tokens_total", &l)
        };
        assert_eq!(count("prompt"), sent.prompt, "{route}: {metrics}");
        assert_eq!(count("completion"), sent.completion, "{route}: {metrics}");
        assert_eq!(count("cached"), sent.cached, "{route}: {metrics}");
    }
    // Cost at the backend's price (per million tokens); a backend without one has no cost series.
    let cost = metrics
        .lines()
        .find(|l| l.starts_with("llmroute_gateway_cost_total{") && l.contains(r#"route="metered""#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no cost of route metered: {metrics}"));
    let expected = (openai_sent.prompt as f64 * 2.5 + openai_sent.completion as f64 * 10.0) / 1e6;
    assert!(
        (cost - expected).abs() < 1e-9,
        "cost {cost}, expected {expected}"
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("llmroute_gateway_cost_total{") && l.contains(r#"route="glm""#)),
        "{metrics}"
    );
    // The chart's dashboard queries only series the gateway exports.
    support::alerts::assert_all_exported(
        &support::alerts::dashboard_metrics("llmroute_gateway_"),
        &metrics,
        3,
        "the dashboard",
    );
    // Zhipu's streams whose client asked for no usage had none to count, and say so (they are
    // counted by the estimate).
    assert_eq!(
        metric(
            &metrics,
            "llmroute_gateway_usage_unreported_total",
            &[r#"route="glm""#]
        ),
        (REQUESTS / 3) as u64,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "llmroute_gateway_usage_unreported_total",
            &[r#"route="metered""#]
        ),
        0,
        "{metrics}"
    );
}

fn sum_of(lines: &[serde_json::Value], kind: &str) -> u64 {
    lines.iter().map(|l| tokens(l, kind).unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_90_10() {
    let mut s = Stack::start("dp-weights", "us").await;
    let stable = s
        .provider("stable", SimProvider::OpenAI, "s-key-0001")
        .await;
    let canary = s
        .provider("canary", SimProvider::DeepSeek, "c-key-0001")
        .await;
    s.apply_route(
        "chat",
        "    strategy: Weighted\n",
        &[
            backend("stable", &stable, "gpt-4o-mini", "      weight: 90\n"),
            backend("canary", &canary, "deepseek-chat", "      weight: 10\n"),
        ],
    );
    let w = s.serve("chat").await;
    let n = 400;
    let results = futures::stream::iter(0..n)
        .map(|_| {
            let w = w.clone();
            async move {
                let r = w.chat("chat").await.unwrap();
                assert_eq!(r.status(), 200);
                backend_of(&r)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<String>>()
        .await;
    let canary_n = results.iter().filter(|b| *b == "canary").count();
    let stable_n = results.iter().filter(|b| *b == "stable").count();
    assert_eq!(canary_n + stable_n, n);
    // Binomial(400, 0.1): mean 40, sd 6; ±3.5 sd.
    assert!(
        (19..=61).contains(&canary_n),
        "canary got {canary_n} of {n}"
    );
    println!("weighted 90/10 over {n} requests: stable {stable_n}, canary {canary_n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_edits_under_continuous_load_fail_no_request() {
    let mut s = Stack::start("dp-edits", "us").await;
    let a = s.provider("a", SimProvider::OpenAI, "a-key-0001").await;
    let b = s.provider("b", SimProvider::Zhipu, "b-key-0001").await;
    let c = s.provider("c", SimProvider::Moonshot, "c-key-0001").await;
    let ba = |p: u32| backend("a", &a, "gpt-4o-mini", &format!("      priority: {p}\n"));
    let bb = |p: u32| backend("b", &b, "glm-4-flash", &format!("      priority: {p}\n"));
    let bc = |p: u32| backend("c", &c, "moonshot-v1-8k", &format!("      priority: {p}\n"));
    s.apply_route("chat", "", &[ba(0), bb(1)]);
    let w = s.serve("chat").await;

    // Continuous load: 4 workers until told to stop (bounded to 90 s).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (w, stop, ok, failed) = (w.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match w.chat("chat").await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let line = format!("{} {}", r.status(), r.text().await.unwrap_or_default());
                        failed.lock().unwrap().push(line);
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    let served_by = |sim: &Sim| sim.request_count();
    let log_file = s.dir.path().join("operator.log");
    let envoy_log = s.dir.path().join("envoy.log");
    let admin = s.envoy.as_ref().map(|e| e.admin_port).unwrap_or(0);
    let wait_for = |what: &'static str, sim: Sim| {
        let log_file = log_file.clone();
        let envoy_log = envoy_log.clone();
        async move {
            let before = sim.request_count();
            let deadline = Instant::now() + Duration::from_secs(45);
            while sim.request_count() <= before + 20 {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    let elog = std::fs::read_to_string(&envoy_log).unwrap_or_default();
                    let etail: Vec<&str> = elog.lines().rev().take(10).collect();
                    // Envoy's own messages (warnings: rejected updates and why), not access logs.
                    let messages: Vec<&str> =
                        elog.lines().filter(|l| !l.starts_with('{')).collect();
                    let get =
                        |path: &str| support::envoy::http_get(admin, path).unwrap_or_default();
                    let clusters: Vec<String> = get("/clusters")
                        .lines()
                        .filter(|l| l.contains("::added_via_api"))
                        .map(str::to_string)
                        .collect();
                    panic!(
                        "timed out waiting for {what}; operator log, newest first:\n{}\nEnvoy messages:\n{}\nEnvoy access log, newest first:\n{}\nlisteners:\n{}\nclusters:\n{}\nstats:\n{}",
                        tail.join("\n"),
                        messages.join("\n"),
                        etail.join("\n"),
                        get("/listeners"),
                        clusters.join("\n"),
                        get("/stats?filter=update_|warming|rejected|lds|cds")
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 1. Reorder: b first.
    s.apply_route("chat", "", &[ba(1), bb(0)]);
    wait_for("traffic moved to b", b.clone()).await;
    let a_before = served_by(&a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        served_by(&a) - a_before < 5,
        "a still serves after the reorder"
    );
    // 2. Add c first.
    s.apply_route("chat", "", &[ba(2), bb(1), bc(0)]);
    wait_for("traffic moved to the new backend c", c.clone()).await;
    // 3. Remove c (the active one): traffic returns to b.
    s.apply_route("chat", "", &[ba(1), bb(0)]);
    wait_for("traffic back on b", b.clone()).await;
    // 4. A second route on the same gateway.
    s.apply_route("second", "", &[bb(0)]);
    let w2 = s.serve("second").await;
    assert_eq!(w2.chat("chat").await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in workers {
        t.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "route edits under load: {ok} requests succeeded, {} failed",
        failed.len()
    );
    assert!(ok > 200, "too little load to show anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed requests, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let envoy = s.envoy.as_ref().unwrap();
    let rejected: u64 = envoy
        .stats_matching("update_rejected")
        .iter()
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(rejected, 0, "Envoy rejected an update");
    leak_check(&s, ["a-key-0001", "b-key-0001", "c-key-0001"]);
}

/// A budget whose usage cannot be counted says so: with the gateway replica's sidecar killed (its
/// counts unreadable), the route's `UsageStale` condition names the replica and the error within
/// two usage intervals (1 s here), `onUnknownUsage: Deny` refuses with 429 meanwhile, and once the
/// counts are read again the condition clears and the route serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_usage_is_a_condition_and_deny_refuses_until_it_is_counted() {
    let mut s = Stack::start("dp-stale", "us").await;
    s.start_sidecar();
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    let policy = "    budget: { tokens: 1000000, onUnknownUsage: Deny }\n";
    let backends = [backend("zhipu", &zhipu, "glm-4-flash", "")];
    s.ns.apply(&route("metered", policy, &backends));
    let w = s.serve("metered").await;
    let body =
        serde_json::json!({ "model": "chat", "messages": [{ "role": "user", "content": "hi" }] });
    let status_of = || {
        let (w, body) = (w.clone(), body.clone());
        async move {
            let r = w.chat_json(&body).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(status_of().await.0, 200);
    let routes = s.routes();
    let usage_stale = |want: &'static str| {
        let routes = routes.clone();
        async move {
            support::cluster::eventually(
                Duration::from_secs(30),
                &format!("UsageStale={want}"),
                || {
                    let routes = routes.clone();
                    async move {
                        let status = routes.get("metered").await.ok()?.status?;
                        let c = status.conditions.iter().find(|c| c.type_ == "UsageStale")?;
                        (c.status == want).then(|| (c.reason.clone(), c.message.clone()))
                    }
                },
            )
            .await
        }
    };
    assert_eq!(usage_stale("False").await.0, "UsageCounted");

    s.kill_sidecar();
    let killed = Instant::now();
    let (reason, message) = usage_stale("True").await;
    println!(
        "UsageStale=True {:.1} s after the sidecar was killed: {message}",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(reason, "UsageUnknown");
    assert!(
        message.contains("cannot be read") && message.contains("since"),
        "{message}"
    );
    let (status, text) = support::cluster::eventually(
        Duration::from_secs(20),
        "429 while the usage is unknown",
        || async move { Some(status_of().await).filter(|(status, _)| *status == 429) },
    )
    .await;
    assert!(text.contains("usage is unknown"), "{status}: {text}");

    s.start_sidecar();
    assert_eq!(usage_stale("False").await.0, "UsageCounted");
    support::cluster::eventually(Duration::from_secs(20), "served again", || async move {
        Some(status_of().await).filter(|(status, _)| *status == 200)
    })
    .await;
}

/// A daily budget in `Asia/Shanghai` ends at Shanghai's midnight (16:00 UTC), not UTC's: with the
/// operator's budget calendar started 30 s before that midnight (`--test-clock-start`), the spent
/// route answers 429 naming the reset instant, `status.usage` says `period: 2026-12-07` and
/// `resetsAt: 2026-12-07T16:00:00Z`; once the calendar passes midnight the route serves again with
/// the next day's period and counts from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shanghai_day_budget_resets_at_local_midnight() {
    let mut s = Stack::start("dp-tz", "us").await;
    s.restart_operator_at("2026-12-07T15:59:30Z");
    let started = Instant::now();
    let midnight = started + Duration::from_secs(30);
    s.start_sidecar();
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    // One request fits: it reserves about 460 tokens (its body's bytes and 8 completion tokens)
    // and costs 203 (200 words and 3 completion tokens); what is left after it fits no other.
    let policy = "    budget: { tokens: 600, maxCompletionTokens: 8, period: Day, timeZone: Asia/Shanghai }\n";
    let backends = [backend("zhipu", &zhipu, "glm-4-flash", "")];
    s.ns.apply(&route("daily", policy, &backends));
    let w = s.serve("daily").await;
    s.leased("daily").await;
    let body = serde_json::json!({
        "model": "chat",
        "messages": [{ "role": "user", "content": vec!["a"; 200].join(" ") }],
    });
    let send = || {
        let (w, body) = (w.clone(), body.clone());
        async move {
            let r = w.chat_json(&body).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let routes = s.routes();
    let usage = || {
        let routes = routes.clone();
        async move { routes.get("daily").await.ok()?.status?.usage }
    };

    // Spend the day's budget.
    let mut refusal = None;
    for _ in 0..200 {
        let (status, text) = send().await;
        if status == 429 {
            refusal = Some(text);
            break;
        }
        assert_eq!(status, 200, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refusal = refusal.expect("the daily budget never stopped the route");
    assert!(
        Instant::now() < midnight,
        "the budget was spent only after Shanghai's midnight: start the calendar earlier"
    );
    assert!(
        refusal.contains("resets at 2026-12-07T16:00:00Z"),
        "{refusal}"
    );
    // Counted, and refused for good: what is left fits no request like it.
    support::cluster::eventually(Duration::from_secs(10), "the answer counted", || async {
        usage().await.filter(|u| u.tokens > 0)
    })
    .await;
    let before = usage().await.expect("status.usage");
    assert_eq!(before.period, "2026-12-07");
    assert_eq!(
        before
            .resets_at
            .as_ref()
            .map(|t| t.0.to_string())
            .as_deref(),
        Some("2026-12-07T16:00:00Z")
    );
    assert_eq!(before.tokens, 203, "{before:?}");
    println!(
        "spent {} tokens of 600 by {:.1} s before Shanghai's midnight",
        before.tokens,
        midnight
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    );

    // Still refused until the calendar reaches Shanghai's midnight, served after it.
    let (status, _) = send().await;
    assert_eq!(status, 429);
    tokio::time::sleep_until(midnight.into()).await;
    let served = support::cluster::eventually(
        Duration::from_secs(20),
        "served again after Shanghai's midnight",
        || async move { Some(send().await).filter(|(status, _)| *status == 200) },
    )
    .await;
    println!(
        "served again {:.1} s after Shanghai's midnight",
        Instant::now().duration_since(midnight).as_secs_f64()
    );
    assert!(served.1.contains("chat.completion"), "{}", served.1);
    let after = support::cluster::eventually(
        Duration::from_secs(20),
        "the next day's usage",
        || async move { usage().await.filter(|u| u.period == "2026-12-08") },
    )
    .await;
    assert_eq!(
        after.resets_at.as_ref().map(|t| t.0.to_string()).as_deref(),
        Some("2026-12-08T16:00:00Z")
    );
    assert!(after.tokens < 600, "counts started again: {after:?}");
}

/// Admission holds a route's token budget under concurrency: 8 clients stream at once against a
/// budget of 4,000 tokens. A request is forwarded only while what it may cost (its body's bytes
/// plus its completion limit: the route's `maxCompletionTokens`, written into every request that
/// sets none) fits what the replica was leased of what is left, so the tokens the provider
/// reported never pass the budget, however many streams are in flight. Refusals are 429 in
/// OpenAI's shape with `Retry-After`, saying when the budget resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_holds_a_budget_under_concurrent_streams() {
    let mut s = Stack::start("dp-admit", "us").await;
    s.start_sidecar();
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    const BUDGET: u64 = 4000;
    const CLIENTS: usize = 8;
    let policy = format!("    budget: {{ tokens: {BUDGET}, maxCompletionTokens: 16 }}\n");
    let backends = [backend("zhipu", &zhipu, "glm-4-flash", "")];
    s.ns.apply(&route("admitted", &policy, &backends));
    let w = s.serve("admitted").await;
    // The replica holds a lease of the route before the traffic starts.
    s.leased("admitted").await;
    let body = serde_json::json!({
        "model": "chat",
        "stream": true,
        "messages": [{ "role": "user", "content": vec!["a"; 60].join(" ") }],
    });
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|i| {
        let (w, mut body) = (w.clone(), body.clone());
        if i % 2 == 0 {
            // Half the clients ask for the stream's usage; the provider reports the others' only
            // when asked (the gateway estimates them, never past their reservation).
            body["stream_options"] = serde_json::json!({ "include_usage": true });
        }
        tokio::spawn(async move {
            let (mut served, mut refusals, mut refused_in_a_row) = (0u32, Vec::new(), 0);
            while refused_in_a_row < 10 && started.elapsed() < Duration::from_secs(40) {
                let r = w.chat_json(&body).await.unwrap();
                let status = r.status().as_u16();
                let header = |name: &str| {
                    r.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let (retry, failure) = (header("retry-after"), header("x-llmroute-failure"));
                let text = r.text().await.unwrap();
                if status == 429 {
                    refused_in_a_row += 1;
                    refusals.push((retry, failure, text));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    assert_eq!(status, 200, "{text}");
                    assert!(text.contains("data: [DONE]"), "{text}");
                    served += 1;
                    refused_in_a_row = 0;
                }
            }
            (served, refusals)
        })
    });
    let mut served = 0;
    let mut refusals = Vec::new();
    for c in futures::future::join_all(clients).await {
        let (n, r) = c.unwrap();
        served += n;
        refusals.extend(r);
    }
    let (retry, failure, text) = refusals.first().cloned().expect("no request was refused");
    assert_eq!(failure.as_deref(), Some("BudgetExhausted"));
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s >= 1)));
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "budget_exceeded", "{text}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("The budget resets at 20"), "{message}");
    // The route's cap was written into each request that set none.
    let sent = zhipu.last_request().unwrap();
    assert_eq!(sent.body["max_tokens"], 16, "{:?}", sent.body);
    // Counted: what the provider reported and the gateway's estimates of streams it did not
    // report, all answers counted (the sidecar's counts in status), never past the budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = s.sidecar_usage().await;
    let counted: u64 = report.counts["admitted"].values().map(|t| t.tokens).sum();
    let reported = zhipu.usage_sent().total();
    let routes = s.routes();
    let usage = support::cluster::eventually(
        Duration::from_secs(20),
        "status.usage counts every answer",
        || {
            let routes = routes.clone();
            async move {
                let u = routes.get("admitted").await.ok()?.status?.usage?;
                (u.tokens == counted).then_some(u)
            }
        },
    )
    .await;
    let held = report.leases.unwrap().routes["admitted"];
    println!(
        "admission: {CLIENTS} streaming clients, {served} answers served, {} refused in {:.1} s; \
         {counted} tokens counted ({reported} reported by the provider, the rest estimated) of a \
         budget of {BUDGET}: overshoot {}, stated bound 0 (every answer's usage within its \
         reservation); reserved {} in all, refused {}",
        refusals.len(),
        started.elapsed().as_secs_f64(),
        counted.saturating_sub(BUDGET),
        held.reserved,
        held.refused,
    );
    assert!(counted <= BUDGET, "{counted} tokens served of {BUDGET}");
    assert!(reported > 0 && reported < counted);
    assert!(served > 0);
    assert_eq!(
        usage.remaining.and_then(|r| r.tokens),
        Some(BUDGET - counted)
    );
}

/// Rate limits per route: with `requestsPerMinute: 6` the gateway's replica (holding the whole
/// limit as its share) serves 6 requests at once and answers the next 429 in OpenAI's shape
/// (`type: requests`, `code: rate_limit_exceeded`) with `Retry-After` (a request per 10 s), without
/// a call to the provider. With `tokensPerMinute`, each request takes what it may cost and gets
/// back what its answer did not use once counted: refused while the minute's share is taken, served
/// again a second or two later without waiting for the minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_give_back_unused_tokens() {
    let mut s = Stack::start("dp-rate", "us").await;
    s.start_sidecar();
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    let backends = [backend("zhipu", &zhipu, "glm-4-flash", "")];
    s.ns.apply(&route(
        "paced",
        "    rateLimit: { requestsPerMinute: 6 }\n",
        &backends,
    ));
    s.ns.apply(&route(
        "tokened",
        "    rateLimit: { tokensPerMinute: 600, maxCompletionTokens: 16 }\n",
        &backends,
    ));
    let paced = s.serve("paced").await;
    let tokened = s.serve("tokened").await;
    s.rate_leased("paced").await;
    s.rate_leased("tokened").await;
    let body =
        serde_json::json!({ "model": "chat", "messages": [{ "role": "user", "content": "hi" }] });
    let send = |w: &support::e2e::Workload| {
        let (w, body) = (w.clone(), body.clone());
        async move {
            let r = w.chat_json(&body).await.unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.text().await.unwrap())
        }
    };

    let before = zhipu.request_count();
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(send(&paced).await);
    }
    let served = answers
        .iter()
        .filter(|(status, _, _)| *status == 200)
        .count();
    assert_eq!(served, 6, "{answers:?}");
    assert_eq!(
        zhipu.request_count() - before,
        6,
        "refused requests reached the provider"
    );
    let (status, retry, text) = answers.last().unwrap();
    assert_eq!(*status, 429);
    let paced_retry: u64 = retry.as_deref().unwrap().parse().unwrap();
    assert!((1..=10).contains(&paced_retry), "Retry-After {paced_retry}");
    let error: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{text}");
    assert_eq!(error["error"]["type"], "requests", "{text}");

    // Tokens: each request may cost about 110 (its body and 16 completion tokens) and costs 4.
    let mut refused = None;
    let mut served = 0;
    for _ in 0..40 {
        let (status, retry, text) = send(&tokened).await;
        if status == 429 {
            refused = Some((retry, text));
            break;
        }
        assert_eq!(status, 200, "{text}");
        served += 1;
    }
    let (retry, text) = refused.expect("the tokens per minute never refused");
    assert!(retry.is_some(), "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["type"], "tokens", "{text}");
    // What the answers did not use comes back within seconds (the minute's refill of one request
    // would take 11 s).
    let refused_at = Instant::now();
    support::cluster::eventually(
        Duration::from_secs(10),
        "served again once unused tokens were given back",
        || async { (send(&tokened).await.0 == 200).then_some(()) },
    )
    .await;
    println!(
        "rate limits: 6 of 10 requests served at 6/min (Retry-After {paced_retry}); {served} requests \
         at 600 tokens/min before a 429, served again {:.1} s later",
        refused_at.elapsed().as_secs_f64()
    );
    assert!(refused_at.elapsed() < Duration::from_secs(6));
}

/// A backend's own rate limit (`backends[].rateLimit`) moves requests on to the next backend
/// like a 429 from the provider, without calling it: a free tier of 3 requests per minute serves
/// the first 3, the paid backend the rest, and the free provider sees exactly 3. A route whose
/// only backend is over its tokens per minute answers the client 429 naming the backend's
/// `RateLimited` attempt, with `Retry-After`, and serves again as the sidecar gives back what the
/// answers did not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_s_rate_limit_moves_requests_to_the_next_backend() {
    let mut s = Stack::start("dp-brate", "us").await;
    s.start_sidecar();
    let free = s
        .provider("free", SimProvider::Zhipu, "free-key-0001")
        .await;
    let paid = s
        .provider("paid", SimProvider::OpenAI, "paid-key-0001")
        .await;
    let tiers = [
        backend(
            "free",
            &free,
            "glm-4-flash",
            "      rateLimit: { requestsPerMinute: 3 }\n",
        ),
        backend("paid", &paid, "gpt-4o-mini", "      priority: 1\n"),
    ];
    s.ns.apply(&route("tiered", "", &tiers));
    let solo = [backend(
        "free",
        &free,
        "glm-4-flash",
        "      rateLimit: { tokensPerMinute: 400 }\n",
    )];
    s.ns.apply(&route(
        "solo",
        "    rateLimit: { maxCompletionTokens: 16 }\n",
        &solo,
    ));
    let tiered = s.serve("tiered").await;
    let single = s.serve("solo").await;
    s.rate_leased("tiered/free").await;
    s.rate_leased("solo/free").await;

    let before = (free.request_count(), paid.request_count());
    let mut served_by = Vec::new();
    for _ in 0..6 {
        let r = tiered.chat("chat").await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        served_by.push(backend_of(&r));
    }
    assert_eq!(
        served_by,
        ["free", "free", "free", "paid", "paid", "paid"],
        "{served_by:?}"
    );
    assert_eq!(
        (
            free.request_count() - before.0,
            paid.request_count() - before.1
        ),
        (3, 3),
        "an attempt over the free tier's limit reached its provider"
    );

    // Tokens: each request may cost about 110 (its body and 16 completion tokens) and costs 4.
    let body =
        serde_json::json!({ "model": "chat", "messages": [{ "role": "user", "content": "hi" }] });
    let before = free.request_count();
    let mut refused = None;
    let mut served = 0;
    for _ in 0..20 {
        let r = single.chat_json(&body).await.unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        if status == 429 {
            refused = Some((retry, text));
            break;
        }
        assert_eq!(status, 200, "{text}");
        served += 1;
    }
    let (retry, text) = refused.expect("the backend's tokens per minute never refused");
    assert!((1..=60).contains(&retry.unwrap().parse::<u64>().unwrap()));
    assert_eq!(
        free.request_count() - before,
        served,
        "a refused attempt reached the provider"
    );
    // As when every backend failed at the provider: the route's summary names each attempt.
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "all_backends_failed", "{text}");
    assert_eq!(error["error"]["backends"][0]["backend"], "free", "{text}");
    assert_eq!(
        error["error"]["backends"][0]["failure"], "RateLimited",
        "{text}"
    );
    assert_eq!(error["error"]["backends"][0]["status"], 429, "{text}");
    let refused_at = Instant::now();
    support::cluster::eventually(
        Duration::from_secs(10),
        "served again once unused tokens were given back",
        || async { (single.chat_json(&body).await.unwrap().status() == 200).then_some(()) },
    )
    .await;
    println!(
        "backend rate limits: 3 of 6 requests by the free tier at 3/min, the rest by paid; {served} \
         requests at 400 tokens/min before a 429, served again {:.1} s later",
        refused_at.elapsed().as_secs_f64()
    );
}

/// A gateway Pod killed outright (Envoy and its sidecar SIGKILLed, its emptyDir gone: no drain, no
/// last read) loses from the ledger only what it served after the leader's last read of it: at most
/// one usage interval (1 s here), the access log's 1 s flush and the sidecar's 0.2 s poll of it. Traffic runs until the kill; the
/// test prints what was lost and checks it against the tokens served in that window before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_outright_loses_at_most_its_last_interval() {
    let mut s = Stack::start("dp-kill", "us").await;
    s.start_sidecar();
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    let backends = [backend("zhipu", &zhipu, "glm-4-flash", "")];
    s.ns.apply(&route("counted", "", &backends));
    let w = s.serve("counted").await;
    let body = serde_json::json!({
        "model": "chat",
        "messages": [{ "role": "user", "content": vec!["word"; 20].join(" ") }],
    });
    // Traffic for 4 s, every answer's completion time and the tokens served by then.
    let mut served: Vec<(Instant, u64)> = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = w.chat_json(&body).await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
        served.push((Instant::now(), zhipu.usage_sent().total()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill_gateway_pod();
    let killed = Instant::now();
    let total = zhipu.usage_sent().total();

    // The leader reads a replica that left a few more times, then the ledger stays as it is.
    let routes = s.routes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counted = routes
        .get("counted")
        .await
        .unwrap()
        .status
        .and_then(|st| st.usage)
        .map_or(0, |u| u.tokens);
    let lost = total - counted;
    // The bound: what was served in the last interval, the access log's flush and the sidecar's
    // poll of the log before the kill, and a margin for the read itself (on a loaded machine).
    let window = Duration::from_millis(1000 + 1000 + 200 + 800);
    let before_window = served
        .iter()
        .rev()
        .find(|(at, _)| killed.duration_since(*at) > window)
        .map_or(0, |(_, tokens)| *tokens);
    let bound = total - before_window;
    println!(
        "served {total} tokens in {} answers; counted {counted}; lost {lost} (bound: the {bound} \
         tokens served in the {:.1} s before the kill)",
        served.len(),
        window.as_secs_f64()
    );
    assert!(counted > 0, "nothing was counted before the kill");
    assert!(
        lost <= bound,
        "lost {lost} tokens, more than the {bound} served in the last interval and flush"
    );
}

/// Budgets, counted across operator and sidecar restarts. A free-tier backend serves until its own
/// budget is used, then the paid one serves; the counts in status equal what the providers
/// reported, exactly, after a new leader and a restarted sidecar; once the route's own budget is
/// used, the gateway answers 429 in OpenAI's shape and the route says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_move_traffic_off_a_spent_backend_and_stop_a_spent_route() {
    let mut s = Stack::start("dp-budget", "us").await;
    s.start_sidecar();
    let free = s
        .provider("free", SimProvider::OpenAI, "free-key-0001")
        .await;
    let paid = s
        .provider("paid", SimProvider::Zhipu, "paid-key-0001")
        .await;
    const FREE_BUDGET: u64 = 150;
    let spec = |route_budget: Option<String>| {
        let policy = route_budget
            .map(|b| format!("    budget: {{ {b} }}\n"))
            .unwrap_or_default();
        route(
            "metered",
            &policy,
            &[
                backend(
                    "free",
                    &free,
                    "gpt-4o-mini",
                    &format!(
                        "      budget: {{ tokens: {FREE_BUDGET}, period: Day }}\n      cost: {{ input: \"0\", output: \"0\" }}\n"
                    ),
                ),
                backend(
                    "paid",
                    &paid,
                    "glm-4-flash",
                    "      priority: 1\n      cost: { input: \"1\", output: \"2\" }\n",
                ),
            ],
        )
    };
    s.ns.apply(&spec(None));
    let w = s.serve("metered").await;
    // 20 prompt words, non-streamed or streamed with usage: every answer reports its usage.
    let send = |i: usize| {
        let w = w.clone();
        async move {
            let mut body = serde_json::json!({
                "model": "chat",
                "messages": [{ "role": "user", "content": vec!["word"; 20].join(" ") }],
            });
            if i % 2 == 1 {
                body["stream"] = true.into();
                body["stream_options"] = serde_json::json!({ "include_usage": true });
            }
            let r = w.chat_json(&body).await.unwrap();
            let (status, backend) = (r.status().as_u16(), backend_of(&r));
            let failure = r
                .headers()
                .get("x-llmroute-failure")
                .map(|v| v.to_str().unwrap().to_string());
            (status, backend, failure, r.text().await.unwrap())
        }
    };
    let sent = || free.usage_sent().total() + paid.usage_sent().total();
    let routes = s.routes();
    let usage_is = |tokens: u64, what: &str| {
        let routes = routes.clone();
        let what = what.to_string();
        async move {
            support::cluster::eventually(Duration::from_secs(20), &what, || {
                let routes = routes.clone();
                async move {
                    let u = routes.get("metered").await.ok()?.status?.usage?;
                    (u.tokens == tokens).then_some(u)
                }
            })
            .await
        }
    };

    // The free backend serves until its budget is counted as used (at most a second late).
    let started = Instant::now();
    let mut i = 0;
    loop {
        let (status, backend, _, text) = send(i).await;
        assert_eq!(status, 200, "{text}");
        i += 1;
        if backend == "paid" {
            break;
        }
        assert_eq!(backend, "free");
        assert!(
            i < 300 && started.elapsed() < Duration::from_secs(60),
            "the free backend still serves after {i} requests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let free_used = free.usage_sent().total();
    assert!(free_used >= FREE_BUDGET, "{free_used}");
    println!(
        "free tier: budget {FREE_BUDGET} tokens, used {free_used} before traffic moved ({i} requests)"
    );
    let u = usage_is(sent(), "status usage to equal what the providers reported").await;
    let free_usage = u.backends.iter().find(|b| b.name == "free").unwrap();
    assert_eq!(free_usage.tokens, free_used);
    assert_eq!(free_usage.remaining.as_ref().unwrap().tokens, Some(0));
    assert_eq!(free_usage.period.len(), "2026-12-01".len());
    let paid_usage = u.backends.iter().find(|b| b.name == "paid").unwrap();
    assert_eq!(paid_usage.tokens, paid.usage_sent().total());
    // Cost at paid's prices (1 and 2 per million): prompt + 2 x completion, per million.
    let p = paid.usage_sent();
    let cost: f64 = paid_usage.cost.as_deref().unwrap().parse().unwrap();
    assert!(
        (cost - (p.prompt + 2 * p.completion) as f64 / 1e6).abs() < 1e-6,
        "{cost} {p:?}"
    );
    let status = routes.get("metered").await.unwrap().status.unwrap();
    let free_status = status.backends.iter().find(|b| b.name == "free").unwrap();
    assert_eq!(
        free_status.reason.as_deref(),
        Some("BudgetExhausted"),
        "{free_status:?}"
    );
    assert_eq!(status.active_backend.as_deref(), Some("paid"));

    // A new leader resumes from the stored ledger: nothing counted twice, nothing lost.
    s.restart_operator();
    for _ in 0..3 {
        let (status, backend, _, _) = send(i).await;
        i += 1;
        assert_eq!((status, backend.as_str()), (200, "paid"));
    }
    usage_is(sent(), "exact counts after an operator restart").await;

    // A sidecar stopped just after answers: it waits for the leader to read them before it exits.
    // The restarted one resumes from its checkpoint under the same boot id, and counts the answers
    // given while no sidecar ran (they wait in the log): not lost, not doubled.
    let boot = s.sidecar_usage().await.boot;
    for _ in 0..3 {
        assert_eq!(send(i).await.0, 200);
        i += 1;
    }
    // Once the sidecar has them (its metrics, which do not count as the leader's read), it stops.
    let total = sent();
    support::cluster::eventually(
        Duration::from_secs(10),
        "the sidecar counted the answers",
        || {
            let metrics = s.sidecar_metrics();
            async move {
                let text = metrics.await;
                let counted = metric(
                    &text,
                    "llmroute_gateway_tokens_total",
                    &[r#"kind="prompt""#],
                ) + metric(
                    &text,
                    "llmroute_gateway_tokens_total",
                    &[r#"kind="completion""#],
                );
                (counted == total).then_some(())
            }
        },
    )
    .await;
    s.stop_sidecar();
    for _ in 0..3 {
        assert_eq!(send(i).await.0, 200);
        i += 1;
    }
    s.start_sidecar();
    assert_eq!(s.sidecar_usage().await.boot, boot);
    for _ in 0..3 {
        assert_eq!(send(i).await.0, 200);
        i += 1;
    }
    usage_is(
        sent(),
        "exact counts after a sidecar restart, with the answers given while it was down",
    )
    .await;
    // Killed: no last read, no last checkpoint. What it counted after its last checkpoint was never
    // served, and the next one counts it again, once.
    for _ in 0..3 {
        assert_eq!(send(i).await.0, 200);
        i += 1;
    }
    s.kill_sidecar();
    for _ in 0..3 {
        assert_eq!(send(i).await.0, 200);
        i += 1;
    }
    s.start_sidecar();
    assert_eq!(s.sidecar_usage().await.boot, boot);
    let total = sent();
    usage_is(total, "exact counts after the sidecar was killed").await;

    // The route's own token budget, 60 tokens left: every request may cost more than that (its
    // body's bytes plus the 4096 completion tokens written into it), so admission refuses it.
    s.ns.apply(&spec(Some(format!("tokens: {}", total + 60))));
    s.leased("metered").await;
    let (status, _, failure, text) = send(i).await;
    i += 1;
    assert_eq!(
        (status, failure.as_deref()),
        (429, Some("BudgetExhausted")),
        "{text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{text}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no budget left for this request"),
        "{message}"
    );
    let u = usage_is(total, "nothing counted for a refused request").await;
    assert_eq!(u.remaining.unwrap().tokens, Some(60));

    // The route's own cost budget (not admitted by estimate: counted after the answers): room
    // for a few more requests, then 429s that say why.
    let spent: f64 = u.cost.as_deref().unwrap().parse().unwrap();
    s.ns.apply(&spec(Some(format!("cost: \"{:.6}\"", spent + 0.0001))));
    s.not_leased("metered").await;
    let mut refused = None;
    for _ in 0..100 {
        let (status, backend, failure, text) = send(i).await;
        i += 1;
        if status == 429 {
            refused = Some((failure, text));
            break;
        }
        assert_eq!((status, backend.as_str()), (200, "paid"), "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (failure, text) = refused.expect("the route's budget never stopped it");
    assert_eq!(failure.as_deref(), Some("BudgetExhausted"));
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{text}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("of its cost budget"),
        "{text}"
    );
    usage_is(sent(), "exact counts with the route over its budget").await;
    let ready = routes
        .get("metered")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "BudgetExhausted"),
        "{ready:?}"
    );
    // Every backend spent, the route's own budget lifted: the route stays on the gateway and says
    // so with a 429 (it does not vanish into a 404 for an unknown route).
    s.ns.apply(&spec(None).replace(
        "      priority: 1\n",
        "      priority: 1\n      budget: { tokens: 1 }\n",
    ));
    support::cluster::eventually(
        Duration::from_secs(20),
        "a 429 for a route whose backends all used their budgets",
        || {
            let send = send(i);
            async move {
                let (status, _, _, text) = send.await;
                (status == 429 && text.contains("no backend left within its budget")).then_some(())
            }
        },
    )
    .await;
    // The route key still guards the route: no key, no 429 with budget details.
    let r = w
        .client
        .post(format!("{}/chat/completions", w.base))
        .json(&serde_json::json!({ "model": "chat", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Embeddings, text completions and responses, for every provider of the catalog: a provider that
/// serves the operation gets it at its own path (Azure: under the deployment) and its usage is
/// counted, streamed responses included; a route whose providers do not serve it gets a 404 that
/// says so, without a request to any provider. One model of the list answers `/models/{id}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_serves_the_operations_it_has_and_the_others_are_refused_clearly() {
    use llmroute::catalog::Endpoint;
    use llmroute_devkit::sim::ALL_PROVIDERS;
    let mut s = Stack::start("dp-endpoints", "us").await;
    let usage = s.usage_log().await;
    let mut cases = Vec::new();
    for provider in ALL_PROVIDERS {
        let name = provider.id();
        let key = format!("{name}-key-0001");
        let sim = s.provider(name, provider, &key).await;
        let chat = provider.catalog_models()[0];
        let emb = provider
            .embedding_models()
            .first()
            .copied()
            .unwrap_or("text-embedding-3-small");
        s.apply_route(
            name,
            "",
            &[backend_models(
                name,
                &sim,
                &format!("{{ chat: \"{chat}\", emb: \"{emb}\" }}"),
                "",
            )],
        );
        cases.push((provider, sim, chat, emb));
    }
    let post = |w: &support::e2e::Workload, op: &str, body: serde_json::Value| {
        let (w, op) = (w.clone(), op.to_string());
        async move {
            let r = w
                .client
                .post(format!("{}/{op}", w.base))
                .bearer_auth(&w.key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    for (provider, sim, chat, emb) in &cases {
        let name = provider.id();
        let served = &llmroute::catalog::provider(name).unwrap().endpoints;
        let w = s.serve(name).await;
        for (endpoint, op, body) in [
            (
                Endpoint::Embeddings,
                "embeddings",
                serde_json::json!({ "model": "emb", "input": ["one two", "three"] }),
            ),
            (
                Endpoint::Completions,
                "completions",
                serde_json::json!({ "model": "chat", "prompt": "say hi now" }),
            ),
            (
                Endpoint::Responses,
                "responses",
                serde_json::json!({ "model": "chat", "input": "say hi" }),
            ),
        ] {
            // The simulator follows the provider's contract on its own: both sides must agree.
            let sim_serves = llmroute_devkit::sim::Endpoint::ALL
                .into_iter()
                .find(|e| e.path() == op)
                .is_some_and(|e| provider.serves(e));
            assert_eq!(
                served.contains(&endpoint),
                sim_serves,
                "{name} {op}: catalog and simulator disagree"
            );
            sim.clear_requests();
            let (status, text) = post(&w, op, body).await;
            if served.contains(&endpoint) {
                assert_eq!(status, 200, "{name} {op}: {text}");
                let got = sim.last_request().expect("the provider got it");
                let model = if op == "embeddings" { *emb } else { *chat };
                let path = if *provider == SimProvider::AzureOpenAI {
                    format!("/openai/deployments/{model}/{op}?api-version=2024-10-21")
                } else {
                    format!("{}/{op}", provider.base_path())
                };
                assert_eq!(got.path, path, "{name} {op}");
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let object = match op {
                    "embeddings" => "list",
                    "completions" => "text_completion",
                    _ => "response",
                };
                assert_eq!(v["object"], object, "{name} {op}: {text}");
            } else {
                assert_eq!(status, 404, "{name} {op}: {text}");
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "unsupported_endpoint", "{text}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("serves /v1/{op}")),
                    "{text}"
                );
                assert!(
                    sim.requests().is_empty(),
                    "{name} {op} reached the provider"
                );
            }
        }
        if served.contains(&Endpoint::Responses) {
            // A streamed response: its usage is in the `response.completed` event.
            let (status, text) = post(
                &w,
                "responses",
                serde_json::json!({ "model": "chat", "input": "stream this please", "stream": true }),
            )
            .await;
            // (Not asked for with `stream_options`, which the Responses API does not take.)
            assert_eq!(status, 200, "{name} streamed response: {text}");
            assert!(text.contains("event: response.completed"), "{text}");
        }
        if served.contains(&Endpoint::Completions) {
            // A streamed text completion: the gateway asks the providers that take
            // `stream_options` for its usage and hides that chunk again (the client asked for
            // none); its usage is counted below with the rest.
            sim.clear_requests();
            let (status, text) = post(
                &w,
                "completions",
                serde_json::json!({ "model": "chat", "prompt": "stream a text", "stream": true }),
            )
            .await;
            assert_eq!(status, 200, "{name} streamed completion: {text}");
            let chunks = sse_events(&text);
            let said: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["text"].as_str())
                .collect();
            assert_eq!(said, format!("hello from {name}"), "{text}");
            assert!(
                chunks.iter().all(|c| c["object"] == "text_completion"),
                "{text}"
            );
            assert!(
                chunks.iter().all(|c| !c["usage"].is_object()),
                "{name}: a usage chunk the client did not ask for: {text}"
            );
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            let asks = llmroute::catalog::provider(name).unwrap().stream_usage
                == llmroute::catalog::StreamUsage::IncludeUsage;
            let got = sim.last_request().expect("the provider got it");
            assert_eq!(
                got.body["stream_options"]["include_usage"] == true,
                asks,
                "{name}: asked for a text stream's usage: {}",
                got.body
            );
        }
        // One model of the list.
        let r = w.get("/models/chat").await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["id"], "chat");
        let r = w.get("/models/gpt-9").await.unwrap();
        assert_eq!(r.status(), 404);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
    }
    // Every token the providers reported, counted per route (prompt and completion).
    let ns = format!(r#"namespace="{}""#, s.ns.name);
    support::cluster::eventually(
        Duration::from_secs(15),
        "every operation's usage counted",
        || {
            let text = usage.encode();
            let ok = cases.iter().all(|(provider, sim, _, _)| {
                let route = format!(r#"route="{}""#, provider.id());
                let sent = sim.usage_sent();
                let count = |kind: &str| {
                    let kind = format!(r#"kind="{kind}""#);
                    metric(
                        &text,
                        "llmroute_gateway_tokens_total",
                        &[ns.as_str(), route.as_str(), kind.as_str()],
                    )
                };
                count("prompt") == sent.prompt && count("completion") == sent.completion
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// Embeddings move on past a backend whose provider has no embeddings, but not to a backend that
/// would embed with another model (its vectors would not match the index), unless the route allows
/// any model. Chat fails over as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_never_change_model_unless_the_route_allows_it() {
    let mut s = Stack::start("dp-embed", "us").await;
    let moonshot = s
        .provider("moonshot", SimProvider::Moonshot, "moon-key-0001")
        .await;
    let zhipu = s
        .provider("zhipu", SimProvider::Zhipu, "zhipu-key-0001")
        .await;
    let openai = s
        .provider("openai", SimProvider::OpenAI, "openai-key-0001")
        .await;
    let spec = |policy: &str| {
        route(
            "mixed",
            policy,
            &[
                backend("moonshot", &moonshot, "moonshot-v1-8k", ""),
                backend_models(
                    "zhipu",
                    &zhipu,
                    "{ chat: glm-4-flash, emb: embedding-3 }",
                    "      priority: 1\n",
                ),
                backend_models(
                    "openai",
                    &openai,
                    "{ chat: gpt-4o-mini, emb: text-embedding-3-small }",
                    "      priority: 2\n",
                ),
            ],
        )
    };
    s.ns.apply(&spec(""));
    let w = s.serve("mixed").await;
    let embed = || {
        let w = w.clone();
        async move {
            let r = w
                .client
                .post(format!("{}/embeddings", w.base))
                .bearer_auth(&w.key)
                .json(&serde_json::json!({ "model": "emb", "input": "hello there" }))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), backend_of(&r), r.text().await.unwrap())
        }
    };
    // Moonshot has no embeddings: Zhipu, the first that has, answers.
    let (status, backend, text) = embed().await;
    assert_eq!((status, backend.as_str()), (200, "zhipu"), "{text}");
    assert!(moonshot.requests().is_empty());
    // Zhipu fails: OpenAI would embed with another model, so the request fails and says why.
    zhipu.set_fault(Fault::ServerError);
    let (status, _, text) = embed().await;
    assert_ne!(status, 200, "{text}");
    assert!(text.contains("EmbeddingModelMismatch"), "{text}");
    assert!(
        openai.requests().is_empty(),
        "OpenAI embedded with another model"
    );
    // Chat fails over as always (Moonshot serves first anyway).
    let r = w.chat("chat").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), backend_of(&r).as_str()),
        (200, "moonshot")
    );
    // Declared: any model will do.
    s.ns.apply(&spec("    embeddingFailover: AnyModel\n"));
    support::cluster::eventually(
        Duration::from_secs(20),
        "OpenAI embeds once allowed",
        || {
            let embed = embed();
            async move {
                let (status, backend, _) = embed.await;
                (status == 200 && backend == "openai").then_some(())
            }
        },
    )
    .await;
}

/// Whole (non-streamed) answers are read for their usage up to the front listener's 8 MiB buffer:
/// a 7 MiB answer is served whole with its usage counted; a 9 MiB one fails plainly with a 500
/// rather than arriving truncated (streamed answers have no such limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_answers_up_to_8_mib_are_served_and_larger_ones_fail_plainly() {
    let mut s = Stack::start("dp-large", "us").await;
    let usage = s.usage_log().await;
    let seven = s
        .provider_with(
            "seven",
            SimConfig::new(SimProvider::OpenAI)
                .key("seven-key-0001")
                .padding(7 << 20),
        )
        .await;
    let nine = s
        .provider_with(
            "nine",
            SimConfig::new(SimProvider::Zhipu)
                .key("nine-key-0001")
                .padding(9 << 20),
        )
        .await;
    s.apply_route("seven", "", &[backend("seven", &seven, "gpt-4o-mini", "")]);
    s.apply_route("nine", "", &[backend("nine", &nine, "glm-4-flash", "")]);
    let w = s.serve("seven").await;
    let r = w.chat("chat").await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(body.len() > 7 << 20, "{}", body.len());
    let v: serde_json::Value = serde_json::from_slice(&body).expect("the whole answer");
    assert!(v["usage"]["prompt_tokens"].as_u64().is_some());
    let w = s.serve("nine").await;
    let r = w.chat("chat").await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 500, "{}", &text[..text.len().min(300)]);
    assert!(
        text.len() < 1 << 20,
        "a 500, not the answer: {} bytes",
        text.len()
    );
    // The 7 MiB answer's usage is counted; the failed one is counted as a 500.
    let ns = format!(r#"namespace="{}""#, s.ns.name);
    let prompt_sent = seven.usage_sent().prompt;
    support::cluster::eventually(Duration::from_secs(10), "the answers counted", || {
        let text = usage.encode();
        let (ns, prompt_sent) = (ns.clone(), prompt_sent);
        async move {
            let prompt = metric(
                &text,
                "llmroute_gateway_tokens_total",
                &[ns.as_str(), r#"route="seven""#, r#"kind="prompt""#],
            );
            let failed = metric(
                &text,
                "llmroute_gateway_requests_total",
                &[ns.as_str(), r#"route="nine""#, r#"code="500""#],
            );
            (prompt == prompt_sent && failed == 1).then_some(())
        }
    })
    .await;
}
