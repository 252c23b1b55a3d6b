//! The gateway Pod's usage counters: every answer of the usage log counted into Prometheus
//! counters (served at `/metrics`) and into the cumulative counts per route and backend that
//! budgets are counted from (served at `/usage`, read by the operator's collector).
//!
//! Counters are cumulative per Pod (Prometheus sums the replicas: `sum by (route)`); why they live
//! here and not in Envoy's own stats is in docs/design/usage.md.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::usage::Answer;
use crate::usage::ledger::{self, Counts};

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

/// What a sidecar restarted in the same Pod resumes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The boot id the sidecar's counts are served under (kept across its restarts).
    pub boot: String,
    /// Cumulative counts per route and backend: every answer of the log before `offset`.
    pub counts: Counts,
    /// Bytes of the log counted (always the end of a line).
    pub offset: u64,
    /// The reservations the counted lines settled ([`Settled`]).
    #[serde(default)]
    pub settled: Settled,
}

/// The reservations settled by the counted lines of one Envoy process (its boot id), per route:
/// what the operator subtracts from that process's reservations to know what is still in flight
/// (docs/design/usage.md, "Admission control"). Lines of an earlier process are not kept: its
/// requests in flight ended with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settled {
    pub boot: String,
    pub routes: BTreeMap<String, u64>,
    /// What the answers did not use of their reservations (given back to tokens-per-minute
    /// buckets), per route and per `<route>/<backend>` that answered.
    #[serde(default)]
    pub refunded: BTreeMap<String, u64>,
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
    /// `recorded` when the reader last acknowledged the counts.
    read: u64,
    /// Bytes of the usage log counted into `report` ([`super::follow::Follower`]).
    offset: u64,
    settled: Settled,
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
                    seq: 0,
                    acked: 0,
                    boot: format!("{:016x}", rand::random::<u64>()),
                    counts: Default::default(),
                    leases: None,
                },
                recorded: 0,
                read: 0,
                offset: 0,
                settled: Settled::default(),
            }),
        }
    }

    /// Counters of a sidecar that restarted: its boot id and cumulative counts as checkpointed,
    /// not read by the operator yet as far as it knows.
    pub fn restored(namespace: &str, checkpoint: Checkpoint) -> Self {
        let counters = Self::new(namespace);
        {
            let mut r = counters.report.lock().expect("usage report");
            r.recorded = u64::from(!checkpoint.counts.is_empty());
            r.report = ledger::Report {
                seq: 0,
                acked: 0,
                boot: checkpoint.boot,
                counts: checkpoint.counts,
                leases: None,
            };
            r.offset = checkpoint.offset;
            r.settled = checkpoint.settled;
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
    /// if it succeeded, returned: no count leaves unless persisted. Reading acknowledges nothing.
    pub fn persist(
        &self,
        persist: impl FnOnce(&Checkpoint) -> std::io::Result<()>,
    ) -> std::io::Result<(ledger::Report, u64)> {
        let r = self.report.lock().expect("usage report");
        persist(&Checkpoint {
            boot: r.report.boot.clone(),
            counts: r.report.counts.clone(),
            offset: r.offset,
            settled: r.settled.clone(),
        })?;
        Ok((self.snapshot(&r), r.offset))
    }

    /// The cumulative counts per route and backend since this process started (`GET /usage`
    /// without a usage log), with how many answers they include.
    pub fn report(&self) -> ledger::Report {
        self.snapshot(&self.report.lock().expect("usage report"))
    }

    fn snapshot(&self, r: &Reported) -> ledger::Report {
        ledger::Report {
            seq: r.recorded,
            acked: r.read,
            ..r.report.clone()
        }
    }

    /// The reader stored the counts of `boot` up to `seq` answers (`POST /usage/ack`): those are
    /// handed over. False when `boot` is not this process's (nothing is acknowledged).
    pub fn acknowledge(&self, boot: &str, seq: u64) -> bool {
        let mut r = self.report.lock().expect("usage report");
        if r.report.boot != boot {
            return false;
        }
        r.read = r.read.max(seq.min(r.recorded));
        true
    }

    /// What the counted lines of Envoy process `boot` settled and gave back, per route (nothing
    /// for another process).
    pub fn settled(&self, boot: &str) -> Settled {
        let r = self.report.lock().expect("usage report");
        if r.settled.boot == boot {
            r.settled.clone()
        } else {
            Settled::default()
        }
    }

    /// Whether answers were counted since the counts were last acknowledged (or ever, when `ever`).
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
        crate::metrics::encode(&self.registry)
    }
}

/// The budgets' counts of one answer: an answer of a backend with usage.
fn add_to_report(reported: &mut Reported, answer: &Answer) {
    if let Some((boot, tokens)) = &answer.reserved {
        let settled = &mut reported.settled;
        if settled.boot != *boot {
            // A new Envoy process: the log is in order, the earlier one's lines are all counted.
            *settled = Settled {
                boot: boot.clone(),
                ..Settled::default()
            };
        }
        *settled.routes.entry(answer.route.clone()).or_default() += tokens;
        let used = if answer.backend.is_empty() {
            0
        } else {
            answer.usage.budgeted()
        };
        let unused = tokens.saturating_sub(used);
        *settled.refunded.entry(answer.route.clone()).or_default() += unused;
        // And to the backend that answered, for its own tokens-per-minute limit (the module's
        // key `<route>/<backend>`; ignored where the backend has none).
        if !answer.backend.is_empty() {
            let key = format!("{}/{}", answer.route, answer.backend);
            *settled.refunded.entry(key).or_default() += unused;
        }
    }
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
    use crate::usage::{BackendFacts, Price, Usage, backend_facts, backends_tag};

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
            reserved: None,
        }
    }

    fn line<'a>(text: &'a str, starts: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(starts))
    }

    /// Reading the counts (a scraper, or the operator before it stored them) hands nothing over:
    /// only an acknowledgement of this boot does, up to what it names.
    #[test]
    fn only_an_acknowledgement_hands_counts_over() {
        let c = UsageCounters::new("ns");
        let usage = Usage {
            prompt: Some(3),
            completion: Some(1),
            ..Default::default()
        };
        c.record(&answer(200, usage));
        c.record(&answer(200, usage));
        let read = c.report();
        assert_eq!(read.seq, 2);
        let _ = c.report();
        assert!(c.unread(false), "a read is no acknowledgement");
        assert!(!c.acknowledge("another-boot", read.seq));
        assert!(c.unread(false));
        assert_eq!(c.report().acked, 0);
        c.record(&answer(200, usage));
        assert!(c.acknowledge(&read.boot, read.seq));
        assert!(
            c.unread(false),
            "the third answer was not in what was acknowledged"
        );
        // A read says how far the counts are acknowledged: the reader acknowledges what is behind.
        let after = c.report();
        assert_eq!((after.seq, after.acked), (3, 2));
        assert!(c.acknowledge(&read.boot, 99));
        assert!(!c.unread(false));
        assert_eq!(c.report().acked, 3, "never past what was counted");
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
        assert!(c.acknowledge(&report.boot, report.seq));
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
