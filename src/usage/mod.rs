//! Token usage counted per answer, in the gateway Pod. Envoy reads every answer's usage (see
//! `gateway/lua/front.lua` for whole answers, `gateway::envoy::usage_from_sse` for streams) and
//! writes it into its access log, a file the Pod's sidecar follows ([`log`]), counts here and
//! serves at `/metrics` and `/usage`.
//!
//! The counters are the pure part: an access-log line reduced to [`Answer`], and what it feeds.
//! Counters are cumulative per Pod (Prometheus sums the replicas: `sum by (route)`); why they live
//! here and not in Envoy's own stats is in docs/design/usage.md.

pub mod ledger;
pub mod log;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

/// What the sidecar learns of one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// The LLMRoute (the front route's name).
    pub route: String,
    /// The backend that answered (`x-llmroute-backend`), empty when none did (no route, no key...).
    pub backend: String,
    /// The model the client asked for (the logical model), empty when it named none.
    pub model: String,
    /// The model the gateway asked the backend's provider for: the backend's mapping of `model`
    /// (`model` itself on a `*` backend). Not the `model` a provider's answer names (often a dated
    /// version of it): one label value per configured model, streamed or not.
    pub provider_model: String,
    /// HTTP status the client got.
    pub status: u32,
    /// The failure class the gateway gave a failed answer (`x-llmroute-failure`).
    pub failure: String,
    /// The usage the answer reported; None for each count the answer did not carry.
    pub usage: Usage,
    /// The answering backend's price, when its route gives one (`spec.backends[].cost`).
    pub price: Option<Price>,
}

/// Price per million input (prompt) and output (completion) tokens, in the route's currency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

impl Price {
    /// What `usage` costs: prompt tokens at the input price, completion tokens at the output price
    /// (cached prompt tokens at the full input price: providers' discounts for them differ and the
    /// spec has no field for them, so cost is an upper bound there).
    pub fn of(&self, usage: &Usage) -> f64 {
        (usage.prompt.unwrap_or(0) as f64 * self.input
            + usage.completion.unwrap_or(0) as f64 * self.output)
            / 1e6
    }
}

/// What the sidecar needs to know of one backend of a route to count its answers. The sidecar knows
/// nothing of the routes but what the usage log's lines say: every line carries its route's
/// [`backends_tag`] (the front route's metadata, JSON text), read by [`backend_facts`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendFacts {
    /// `spec.backends[].cost`, as written there (per million tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::api::Cost>,
    /// Logical model → the provider's model (`spec.backends[].models`, without `*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    /// `*` is among the models: any other model goes to the provider as the client named it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

impl BackendFacts {
    /// The model the gateway asks this backend's provider for when a client asks for `model`.
    pub fn provider_model(&self, model: &str) -> Option<String> {
        match self.models.get(model) {
            Some(m) => Some(m.clone()),
            None => (self.passthrough && !model.is_empty()).then(|| model.to_string()),
        }
    }

    /// The price, when the backend has a cost that reads as two numbers.
    pub fn price(&self) -> Option<Price> {
        let cost = self.cost.as_ref()?;
        Some(Price {
            input: cost.input.parse().ok()?,
            output: cost.output.parse().ok()?,
        })
    }
}

/// A route's backends as the tag its usage log lines carry: a JSON object, backend name →
/// [`BackendFacts`].
pub fn backends_tag<'a>(backends: impl IntoIterator<Item = (&'a str, BackendFacts)>) -> String {
    let map: BTreeMap<&str, BackendFacts> = backends.into_iter().collect();
    serde_json::to_string(&map).expect("a map of strings serializes")
}

/// What a line's tag (written by [`backends_tag`]) says of `backend`; None when it names no such
/// backend or is not such a tag.
pub fn backend_facts(tag: &str, backend: &str) -> Option<BackendFacts> {
    let mut map: BTreeMap<String, BackendFacts> = serde_json::from_str(tag).ok()?;
    map.remove(backend)
}

/// Token counts of one answer, as the provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub cached: Option<u64>,
    pub total: Option<u64>,
    /// The counts are the gateway's estimate, not the provider's ([`Usage::estimate`], or an
    /// opted-in operation's `tokensPerRequest`, which the front Lua hands on marked
    /// `"llmroute_estimated": true`).
    pub estimated: bool,
}

/// Bytes counted as one token by [`Usage::estimate`]: OpenAI's rule of thumb for English text
/// ("one token is about 4 characters"); Chinese text runs about 1.5 characters (4.5 bytes of
/// UTF-8) a token, so bytes over 4 stays at or above the real count for both.
pub const ESTIMATE_BYTES_PER_TOKEN: u64 = 4;

impl Usage {
    /// The counts of a provider's usage object (`usage` of an answer, or of the Responses API's
    /// `response`), as Envoy hands it over: its JSON text, unchanged. One reader for every shape
    /// in the catalog:
    /// - prompt: `prompt_tokens` (Chat Completions and every OpenAI-shaped provider) or
    ///   `input_tokens` (Responses API);
    /// - completion: `completion_tokens` or `output_tokens` (embeddings have none);
    /// - total: `total_tokens`;
    /// - cached prompt tokens: DeepSeek's `prompt_cache_hit_tokens`, else
    ///   `prompt_tokens_details.cached_tokens` (OpenAI, Qwen), `input_tokens_details.cached_tokens`
    ///   (Responses API), or a top-level `cached_tokens` (Moonshot).
    ///
    /// A count that is not a non-negative number is absent. Text that is not a JSON object is no
    /// usage at all.
    pub fn of_provider(text: &str) -> Usage {
        let Ok(Value::Object(usage)) = serde_json::from_str::<Value>(text) else {
            return Usage::default();
        };
        let count = |v: Option<&Value>| match v? {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.is_finite())
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        let first = |keys: &[&str]| keys.iter().find_map(|k| count(usage.get(*k)));
        let cached = |details: &str| count(usage.get(details)?.get("cached_tokens"));
        Usage {
            estimated: usage.get("llmroute_estimated") == Some(&Value::Bool(true)),
            prompt: first(&["prompt_tokens", "input_tokens"]),
            completion: first(&["completion_tokens", "output_tokens"]),
            total: first(&["total_tokens"]),
            cached: first(&["prompt_cache_hit_tokens"])
                .or_else(|| cached("prompt_tokens_details"))
                .or_else(|| cached("input_tokens_details"))
                .or_else(|| first(&["cached_tokens"])),
        }
    }

    /// The gateway's estimate of an answer that reported no usage (a provider that sends none in
    /// streams, a stream cut off before its usage event): one token per
    /// [`ESTIMATE_BYTES_PER_TOKEN`] bytes of the request body (prompt) and of the answer body the
    /// client received (completion; none for embeddings), rounded up. The JSON around the text
    /// counts too, so the estimate errs high: a budget is charged at least what was used.
    pub fn estimate(request_bytes: u64, answer_bytes: u64, completion: bool) -> Usage {
        let tokens = |bytes: u64| bytes.div_ceil(ESTIMATE_BYTES_PER_TOKEN);
        let prompt = tokens(request_bytes);
        let completion = if completion { tokens(answer_bytes) } else { 0 };
        Usage {
            prompt: Some(prompt),
            completion: Some(completion),
            cached: None,
            total: Some(prompt + completion),
            estimated: true,
        }
    }

    /// True when the answer carried any count.
    pub fn reported(&self) -> bool {
        self.prompt.is_some() || self.completion.is_some() || self.total.is_some()
    }

    /// The tokens a budget counts: prompt plus completion, or the total when the answer gave
    /// neither part.
    pub fn budgeted(&self) -> u64 {
        match (self.prompt, self.completion) {
            (None, None) => self.total.unwrap_or(0),
            (p, c) => p.unwrap_or(0) + c.unwrap_or(0),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    namespace: String,
    route: String,
    backend: String,
    model: String,
    /// `success`, or the failure class (`RateLimited`, `RegionBlocked`...), or `error` for a
    /// failed answer without one.
    outcome: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    namespace: String,
    route: String,
    backend: String,
    model: String,
    provider_model: String,
    /// `prompt`, `completion` or `cached` (cached tokens are part of the prompt tokens).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    namespace: String,
    route: String,
    backend: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnreportedLabels {
    namespace: String,
    route: String,
    backend: String,
    model: String,
}

/// The gateway Pod's usage counters.
pub struct UsageCounters {
    namespace: String,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    unreported: Family<UnreportedLabels, Counter>,
    estimated: Family<TokenLabels, Counter>,
    /// The cumulative counts per route and backend that budgets are counted from (see [`ledger`]).
    report: std::sync::Mutex<Reported>,
}

/// The counts budgets read, and whether their last changes were read.
struct Reported {
    report: ledger::Report,
    /// Answers counted into `report`.
    recorded: u64,
    /// `recorded` when `report` was last read.
    read: u64,
    /// Bytes of the usage log counted into `report` ([`log::Follower`]).
    offset: u64,
}

impl UsageCounters {
    /// Counters of the gateway of `namespace` (a label on every series, so sums across namespaces
    /// need no relabelling).
    pub fn new(namespace: &str) -> Self {
        let mut registry = Registry::with_prefix("llmroute_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Answers the gateway gave, by route, backend, requested model, outcome and status code",
            requests.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens the providers reported in their answers (prompt, completion; cached tokens are part of prompt)",
            tokens.clone(),
        );
        let cost = Family::<CostLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "cost",
            "Cost of the reported tokens at the backends' prices (spec.backends[].cost, per million tokens; in the route's currency)",
            cost.clone(),
        );
        let unreported = Family::<UnreportedLabels, Counter>::default();
        registry.register(
            "usage_unreported",
            "Successful answers that carried no token usage (a provider that reports none in streams)",
            unreported.clone(),
        );
        let estimated = Family::<TokenLabels, Counter>::default();
        registry.register(
            "estimated_tokens",
            "Tokens the gateway estimated (part of llmroute_gateway_tokens_total): answers that reported no usage, at one token per 4 bytes of request and answer, and opted-in operations' tokensPerRequest",
            estimated.clone(),
        );
        UsageCounters {
            namespace: namespace.to_string(),
            registry,
            requests,
            tokens,
            cost,
            unreported,
            estimated,
            report: std::sync::Mutex::new(Reported {
                report: ledger::Report {
                    boot: format!("{:016x}", rand::random::<u64>()),
                    counts: Default::default(),
                },
                recorded: 0,
                read: 0,
                offset: 0,
            }),
        }
    }

    /// Counters of a sidecar that restarted: its boot id and cumulative counts as checkpointed,
    /// not read by the operator yet as far as it knows.
    pub fn restored(namespace: &str, checkpoint: log::Checkpoint) -> Self {
        let counters = Self::new(namespace);
        {
            let mut r = counters.report.lock().expect("usage report");
            r.recorded = u64::from(!checkpoint.counts.is_empty());
            r.report = ledger::Report {
                boot: checkpoint.boot,
                counts: checkpoint.counts,
            };
            r.offset = checkpoint.offset;
        }
        counters
    }

    /// Bytes of the usage log counted.
    pub fn offset(&self) -> u64 {
        self.report.lock().expect("usage report").offset
    }

    /// Goes on counting the usage log at `offset` (a log replaced, a checkpoint lost).
    pub fn skip_to(&self, offset: u64) {
        self.report.lock().expect("usage report").offset = offset;
    }

    /// Counts the answers of the usage log's lines up to `offset`, at once: a checkpoint or a read
    /// of the counts sees all of them with their offset, or none.
    pub fn record_lines(&self, answers: &[Answer], offset: u64) {
        let mut reported = self.report.lock().expect("usage report");
        for answer in answers {
            self.record_metrics(answer);
            add_to_report(&mut reported, answer);
        }
        reported.offset = offset;
    }

    /// The counts and the log offset they include, first handed to `persist` (a checkpoint), then,
    /// if it succeeded, returned (marked read when `read`): no count leaves unless persisted.
    pub fn persist(
        &self,
        read: bool,
        persist: impl FnOnce(&log::Checkpoint) -> std::io::Result<()>,
    ) -> std::io::Result<(ledger::Report, u64)> {
        let mut r = self.report.lock().expect("usage report");
        persist(&log::Checkpoint {
            boot: r.report.boot.clone(),
            counts: r.report.counts.clone(),
            offset: r.offset,
        })?;
        if read {
            r.read = r.recorded;
        }
        Ok((r.report.clone(), r.offset))
    }

    /// The cumulative counts per route and backend since this process started (`GET /usage`),
    /// marked as read.
    pub fn report(&self) -> ledger::Report {
        let mut r = self.report.lock().expect("usage report");
        r.read = r.recorded;
        r.report.clone()
    }

    /// Whether answers were counted since the counts were last read (or ever, when `ever`).
    pub fn unread(&self, ever: bool) -> bool {
        let r = self.report.lock().expect("usage report");
        if ever {
            r.recorded > 0
        } else {
            r.recorded > r.read
        }
    }

    /// Counts one answer.
    pub fn record(&self, answer: &Answer) {
        self.record_metrics(answer);
        add_to_report(&mut self.report.lock().expect("usage report"), answer);
    }

    /// The Prometheus counters of one answer.
    fn record_metrics(&self, answer: &Answer) {
        let success = (200..300).contains(&answer.status);
        let outcome = if success {
            "success".to_string()
        } else if answer.failure.is_empty() {
            "error".to_string()
        } else {
            answer.failure.clone()
        };
        self.requests
            .get_or_create(&RequestLabels {
                namespace: self.namespace.clone(),
                route: answer.route.clone(),
                backend: answer.backend.clone(),
                model: answer.model.clone(),
                outcome,
                code: answer.status.to_string(),
            })
            .inc();
        let u = &answer.usage;
        // An answer of the gateway itself (the models list) has no usage to report.
        if success && (!u.reported() || u.estimated) && !answer.backend.is_empty() {
            self.unreported
                .get_or_create(&UnreportedLabels {
                    namespace: self.namespace.clone(),
                    route: answer.route.clone(),
                    backend: answer.backend.clone(),
                    model: answer.model.clone(),
                })
                .inc();
        }
        // A total without its parts (some providers) counts as completion only when nothing says
        // otherwise; here the parts are what is counted, and a missing part is not guessed.
        for (kind, count) in [
            ("prompt", u.prompt),
            ("completion", u.completion),
            ("cached", u.cached),
        ] {
            let Some(count) = count else { continue };
            let labels = TokenLabels {
                namespace: self.namespace.clone(),
                route: answer.route.clone(),
                backend: answer.backend.clone(),
                model: answer.model.clone(),
                provider_model: answer.provider_model.clone(),
                kind,
            };
            if u.estimated {
                self.estimated.get_or_create(&labels).inc_by(count);
            }
            self.tokens.get_or_create(&labels).inc_by(count);
        }
        if let Some(price) = answer.price.filter(|_| u.reported()) {
            self.cost
                .get_or_create(&CostLabels {
                    namespace: self.namespace.clone(),
                    route: answer.route.clone(),
                    backend: answer.backend.clone(),
                    model: answer.model.clone(),
                })
                .inc_by(price.of(u));
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The budgets' counts of one answer: an answer of a backend with usage.
fn add_to_report(reported: &mut Reported, answer: &Answer) {
    let u = &answer.usage;
    if u.reported() && !answer.backend.is_empty() {
        reported.recorded += 1;
        let totals = reported
            .report
            .counts
            .entry(answer.route.clone())
            .or_default()
            .entry(answer.backend.clone())
            .or_default();
        totals.tokens += u.budgeted();
        totals.cost += answer.price.map_or(0.0, |p| p.of(u));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u32, usage: Usage) -> Answer {
        Answer {
            route: "chat".into(),
            backend: "zhipu".into(),
            model: "fast".into(),
            provider_model: "glm-4-flash".into(),
            status,
            failure: String::new(),
            usage,
            price: None,
        }
    }

    fn counts(prompt: u64, completion: Option<u64>, cached: Option<u64>, total: u64) -> Usage {
        Usage {
            prompt: Some(prompt),
            completion,
            cached,
            total: Some(total),
            estimated: false,
        }
    }

    /// Each provider shape of the catalog, as its documentation shows it.
    #[test]
    fn every_usage_shape_is_read() {
        for (text, want) in [
            // OpenAI Chat Completions (also Qwen, Zhipu, Baidu's v2 API...).
            (
                r#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}"#,
                counts(19, Some(10), Some(4), 29),
            ),
            // DeepSeek: its own cache counts win over the OpenAI-shaped details.
            (
                r#"{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_cache_hit_tokens":8,"prompt_cache_miss_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}"#,
                counts(9, Some(2), Some(8), 11),
            ),
            // The Responses API.
            (
                r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":5},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}"#,
                counts(36, Some(87), Some(5), 123),
            ),
            // Moonshot: cached tokens at the top.
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"cached_tokens":2}"#,
                counts(3, Some(1), Some(2), 4),
            ),
            // Embeddings: no completion.
            (
                r#"{"prompt_tokens":8,"total_tokens":8}"#,
                counts(8, None, None, 8),
            ),
        ] {
            assert_eq!(Usage::of_provider(text), want, "{text}");
        }
    }

    #[test]
    fn what_is_not_a_usage_object_counts_nothing() {
        for text in [
            "",
            "null",
            "[1]",
            "{",
            r#""text""#,
            r#"{"prompt_tokens":-1,"total_tokens":"x"}"#,
        ] {
            let usage = Usage::of_provider(text);
            assert!(!usage.reported(), "{text}: {usage:?}");
        }
    }

    fn line<'a>(text: &'a str, starts: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(starts))
    }

    #[test]
    fn answers_add_up_by_kind_and_outcome() {
        let c = UsageCounters::new("team-a");
        let full = Usage {
            prompt: Some(10),
            completion: Some(3),
            cached: Some(2),
            total: Some(13),
            estimated: false,
        };
        c.record(&answer(200, full));
        c.record(&answer(200, full));
        c.record(&answer(200, Usage::default()));
        let mut limited = answer(429, Usage::default());
        limited.failure = "RateLimited".into();
        c.record(&limited);
        let text = c.encode();
        let labels = r#"namespace="team-a",route="chat",backend="zhipu",model="fast",provider_model="glm-4-flash""#;
        assert_eq!(
            line(
                &text,
                &format!("llmroute_gateway_tokens_total{{{labels},kind=\"prompt\"}}")
            ),
            Some(format!("llmroute_gateway_tokens_total{{{labels},kind=\"prompt\"}} 20").as_str())
        );
        assert!(text.contains(&format!(
            "llmroute_gateway_tokens_total{{{labels},kind=\"completion\"}} 6"
        )));
        assert!(text.contains(&format!(
            "llmroute_gateway_tokens_total{{{labels},kind=\"cached\"}} 4"
        )));
        assert!(text.contains(r#"llmroute_gateway_requests_total{namespace="team-a",route="chat",backend="zhipu",model="fast",outcome="success",code="200"} 3"#));
        assert!(text.contains(r#"llmroute_gateway_requests_total{namespace="team-a",route="chat",backend="zhipu",model="fast",outcome="RateLimited",code="429"} 1"#));
        assert!(text.contains(r#"llmroute_gateway_usage_unreported_total{namespace="team-a",route="chat",backend="zhipu",model="fast"} 1"#));
        // What budgets count: prompt + completion of the two answers with usage.
        assert!(c.unread(false));
        let report = c.report();
        assert_eq!(report.counts["chat"]["zhipu"].tokens, 26);
        assert_eq!(report.boot.len(), 16);
        assert!(!c.unread(false) && c.unread(true));
        c.record(&answer(200, full));
        assert!(c.unread(false));
        let only_total = Usage {
            total: Some(9),
            ..Usage::default()
        };
        assert_eq!(only_total.budgeted(), 9);
    }

    #[test]
    fn a_failed_answer_or_the_gateway_s_own_is_not_unreported_usage() {
        let c = UsageCounters::new("ns");
        c.record(&answer(503, Usage::default()));
        let mut models_list = answer(200, Usage::default());
        models_list.backend.clear();
        c.record(&models_list);
        let text = c.encode();
        assert!(
            !text.contains("llmroute_gateway_usage_unreported_total{"),
            "{text}"
        );
        assert!(text.contains(r#"outcome="error",code="503"} 1"#));
    }

    #[test]
    fn cost_is_counted_at_the_backend_s_price() {
        let cost = |input: &str, output: &str| crate::api::Cost {
            input: input.into(),
            output: output.into(),
        };
        let facts =
            |c: Option<crate::api::Cost>, models: &[(&str, &str)], passthrough| BackendFacts {
                cost: c,
                models: models
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                passthrough,
            };
        let tag = backends_tag([
            (
                "zhipu",
                facts(Some(cost("0.5", "1.5")), &[("fast", "glm-4-flash")], false),
            ),
            ("deepseek", facts(Some(cost("2", "8.25")), &[], true)),
            ("local", facts(None, &[("fast", "qwen2.5:7b")], false)),
        ]);
        let deepseek = backend_facts(&tag, "deepseek").unwrap();
        assert_eq!(
            deepseek.price(),
            Some(Price {
                input: 2.0,
                output: 8.25
            })
        );
        assert_eq!(
            deepseek.provider_model("deepseek-chat").as_deref(),
            Some("deepseek-chat")
        );
        let zhipu = backend_facts(&tag, "zhipu").unwrap();
        assert_eq!(zhipu.provider_model("fast").as_deref(), Some("glm-4-flash"));
        assert_eq!(zhipu.provider_model("other"), None);
        let local = backend_facts(&tag, "local").unwrap();
        assert_eq!(local.price(), None);
        assert_eq!(local.provider_model("fast").as_deref(), Some("qwen2.5:7b"));
        assert_eq!(backend_facts(&tag, "zhi"), None);
        assert_eq!(backend_facts("", "zhipu"), None);
        assert_eq!(backend_facts("zhipu=0.5/1.5", "zhipu"), None);

        let c = UsageCounters::new("ns");
        let mut a = answer(
            200,
            Usage {
                prompt: Some(1_000_000),
                completion: Some(2_000_000),
                cached: None,
                total: Some(3_000_000),
                estimated: false,
            },
        );
        a.price = zhipu.price();
        c.record(&a);
        c.record(&a);
        let text = c.encode();
        // 2 x (1 M x 0.5 + 2 M x 1.5) per million = 7.
        assert!(
            text.contains(r#"llmroute_gateway_cost_total{namespace="ns",route="chat",backend="zhipu",model="fast"} 7.0"#),
            "{text}"
        );
    }
}
