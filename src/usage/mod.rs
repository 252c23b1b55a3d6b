//! Token usage counted per answer, in the gateway Pod. Envoy reads every answer's usage (see
//! `gateway/lua/front.lua` for whole answers, `gateway::envoy::usage_from_sse` for streams) and
//! writes it into its access log, a file the Pod's sidecar follows ([`log`]), counts here and
//! serves at `/metrics` and `/usage`.
//!
//! The counters are the pure part: an access-log line reduced to [`Answer`], and what it feeds.
//! Counters are cumulative per Pod (Prometheus sums the replicas: `sum by (route)`); why they live
//! here and not in Envoy's own stats is in docs/design/usage.md.

pub mod lease;
pub mod ledger;
pub mod log;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

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
    /// What admission reserved for the request: the Envoy process's boot id and the tokens
    /// (`sse-usage/src/admission.rs`); settled when the answer is counted.
    pub reserved: Option<(String, u64)>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
