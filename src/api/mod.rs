//! The `LLMRoute` API (`llmroute.io/v1alpha1`): the types users write in Git, their schema, and the
//! admission rules (OpenAPI + CEL) the API server enforces.
//!
//! Everything that can be checked without the cluster's state is expressed in the schema, so the API
//! server rejects it at admission. The same schema is evaluated client-side by [`crate::validate`] for
//! `llmroute render` and by the operator for objects stored before a rule existed.

mod rules;
mod schema;

/// Failure classes are the catalog's vocabulary (it classifies provider answers); the API names them.
pub use crate::catalog::FailureClass;
pub use rules::spec_rules;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every llmroute kind.
pub const GROUP: &str = "llmroute.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// An LLMRoute declares which LLM providers the workloads of its namespace may use, in what order, and
/// how they consume them. The operator turns it into a gateway route (an OpenAI-compatible endpoint
/// at `http://llmroute-gateway.<namespace>.svc:8080/<route>/v1`) and a Secret the workloads mount.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmroute.io",
    version = "v1alpha1",
    kind = "LLMRoute",
    plural = "llmroutes",
    singular = "llmroute",
    shortname = "llmr",
    category = "llmroute",
    namespaced,
    status = "LLMRouteStatus",
    doc = "An LLMRoute declares which LLM providers the workloads of its namespace may use, in what order and how they consume them: the operator publishes it on the namespace's llmroute gateway and writes a Secret for workloads to mount.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activeBackend"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.policy.strategy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","priority":1,"jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::spec_rules_transform)]
pub struct LLMRouteSpec {
    /// Jurisdiction the workloads using this route run in, as a lower-case ISO 3166-1 alpha-2 code
    /// (for example `cn`, `hk`, `us`). Backends whose provider does not serve this region are never
    /// used. When unset, the operator's `--default-region` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}$"), length(max = 2))]
    pub region: Option<String>,

    /// Logical model name workloads get as `OPENAI_MODEL` in the workload Secret. Must be a key of at
    /// least one backend's `models` map (or be passed through by a backend mapping `"*"`). Required
    /// in `Direct` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub default_model: Option<String>,

    /// The providers this route may use: 1 to 16 backends with unique names. Which one serves a
    /// request is decided by `policy`.
    #[schemars(length(min = 1, max = 16), schema_with = "schema::backend_list")]
    pub backends: Vec<Backend>,

    /// How the route chooses between its backends, when it fails over and how it checks health.
    #[serde(default)]
    pub policy: Policy,

    /// The Secret the operator writes for workloads to mount (`OPENAI_BASE_URL`, `OPENAI_API_KEY`,
    /// `OPENAI_MODEL`), so any OpenAI SDK works unchanged.
    #[serde(default)]
    pub workload_secret: WorkloadSecret,

    /// Deployments to restart (through a pod-template annotation) when the workload Secret's content
    /// changes in `Direct` mode, so that workloads reading it as environment variables pick it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,

    /// OpenAI operations beyond the default set that this route lets through, at most 16 with
    /// unique names. The default set (`chat/completions`, `completions`, `embeddings`, `responses`,
    /// `models`) needs no opt-in; the gateway answers any other operation with 404
    /// `unsupported_endpoint` unless it is listed here. An opted-in operation's requests are not
    /// model-checked and report no usage: `tokensPerRequest` is required on every listed operation
    /// when the route (`spec.policy.budget`) or one of its backends (`spec.backends[].budget`) has a
    /// budget, and is then counted as the estimated usage of each request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::operation_list")]
    pub operations: Vec<Operation>,
}

/// An OpenAI operation a route opts in to (`spec.operations[]`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The first path segment below `/v1/` of the OpenAI API (`/v1/fine_tuning/jobs` is
    /// `fine_tuning`): every method and sub-path below it is let through.
    pub name: OperationName,
    /// Tokens the route's budgets (and its backends' budgets) are charged per request of this
    /// operation, as estimated usage, since these requests report none. Required when the route or
    /// one of its backends has a budget; when not given, such requests count 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tokens_per_request: Option<u64>,
}

/// An OpenAI operation outside the default set, by the first path segment below `/v1/`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OperationName {
    /// `/v1/files`
    Files,
    /// `/v1/uploads`
    Uploads,
    /// `/v1/batches`
    Batches,
    /// `/v1/images`
    Images,
    /// `/v1/audio`
    Audio,
    /// `/v1/moderations`
    Moderations,
    /// `/v1/fine_tuning`
    FineTuning,
    /// `/v1/assistants`
    Assistants,
    /// `/v1/threads`
    Threads,
    /// `/v1/vector_stores`
    VectorStores,
}

impl OperationName {
    /// Every operation, in declaration order.
    pub const ALL: [OperationName; 10] = [
        OperationName::Files,
        OperationName::Uploads,
        OperationName::Batches,
        OperationName::Images,
        OperationName::Audio,
        OperationName::Moderations,
        OperationName::FineTuning,
        OperationName::Assistants,
        OperationName::Threads,
        OperationName::VectorStores,
    ];

    /// The name used in the API: the path segment below `/v1/`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationName::Files => "files",
            OperationName::Uploads => "uploads",
            OperationName::Batches => "batches",
            OperationName::Images => "images",
            OperationName::Audio => "audio",
            OperationName::Moderations => "moderations",
            OperationName::FineTuning => "fine_tuning",
            OperationName::Assistants => "assistants",
            OperationName::Threads => "threads",
            OperationName::VectorStores => "vector_stores",
        }
    }
}

impl std::fmt::Display for OperationName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One provider account the route may send requests to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::backend_rules_transform)]
pub struct Backend {
    /// Name of the backend, unique within the route (a DNS label: lower-case letters, digits and
    /// `-`, at most 63 characters). It names the backend in status, Events, metrics and logs.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,

    /// Provider id from the llmroute provider catalog (see docs/providers.md), for example `openai`,
    /// `azure-openai`, `zhipu`, `qianfan`, `deepseek` or `openai-compatible` for self-hosted
    /// OpenAI-compatible servers (vLLM, Ollama, SGLang).
    #[schemars(schema_with = "schema::provider_id")]
    pub provider: String,

    /// Base URL of the provider's OpenAI-compatible API, overriding the catalog's (for example a
    /// proxy, a private endpoint or a regional host). Required for providers the catalog has no base
    /// URL for (`azure-openai`: `https://<resource>.openai.azure.com`; `openai-compatible`). Must use
    /// `https://`; `http://` is accepted only for `openai-compatible`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(
            pattern = r"^https?://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[^?#\s]*)?$"
        ),
        length(min = 8, max = 2048)
    )]
    pub endpoint: Option<String>,

    /// The Secret (in the route's namespace) and key holding this backend's API key. Optional only
    /// for `openai-compatible` backends that need no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,

    /// Logical model name (what workloads send as `model`) mapped to this provider's model name (for
    /// `azure-openai`, the deployment name). The key `"*"` passes any requested model through unchanged.
    /// At least one entry.
    #[schemars(schema_with = "schema::model_map")]
    pub models: BTreeMap<String, String>,

    /// Preference order: lower is preferred. Backends of equal priority share traffic by `weight`
    /// under the `Weighted` strategy. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,

    /// Relative share of traffic among backends of the best priority under the `Weighted` strategy.
    /// At least 1. Default 1.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,

    /// Region codes (lower-case ISO 3166-1 alpha-2) where this backend may be used, overriding the
    /// catalog's availability for the provider (for example for a private deployment of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), schema_with = "schema::region_list")]
    pub regions: Option<Vec<String>>,

    /// Price per million tokens, used by the `LowestCost` strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,

    /// Settings that only apply to `azure-openai` backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureOptions>,

    /// What this backend may use per period. When it is used up the backend is taken out of
    /// rotation like an exhausted quota until the period ends, and the next backend serves (for
    /// example a provider's free tier first, then a paid account). A `cost` budget needs `cost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,

    /// This backend's rate limits (for example the provider account's own limits), across every
    /// gateway replica. An attempt over them is answered 429 `RateLimited` by the gateway without
    /// calling the provider, which moves the request on to the next backend like the provider's
    /// own 429 (when the route's `failoverOn` has `RateLimited`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<BackendRateLimit>,
}

/// A backend's rate limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRateLimit {
    /// Requests per minute (attempts sent to this backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt plus completion) per minute, reserved at what each attempt may cost (its
    /// body's bytes plus its completion limit: a request that sets none gets the route's
    /// `maxCompletionTokens`) and given back as answers report what they used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

fn default_weight() -> u32 {
    1
}

/// A key of a Secret in the route's namespace.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the LLMRoute.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// Key within the Secret's data whose value is the API key.
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub key: String,
}

/// Price per million tokens, as decimal strings in the currency the platform team chooses (use the
/// same currency for every backend of a route).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Cost {
    /// Price per million input (prompt) tokens, for example `"2.50"`.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"), length(max = 19))]
    pub input: String,
    /// Price per million output (completion) tokens, for example `"10.00"`.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"), length(max = 19))]
    pub output: String,
}

/// A limit on the tokens or the cost used per period, counted from the usage the providers report
/// in their answers, across every gateway replica. A route's `tokens` budget is held at admission:
/// a request is forwarded only while what it may cost fits what the operator leased the replica
/// (docs/design/usage.md, "Admission control"); a `cost` budget, and a backend's, stop traffic once
/// the counted usage reaches them (within a few seconds, the operator's `--usage-interval`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::budget_rules_transform)]
pub struct Budget {
    /// `Month` (default) or `Day`: calendar periods in `timeZone`. Counts start again at 0 when one
    /// begins.
    #[serde(default)]
    pub period: BudgetPeriod,
    /// The time zone whose calendar the periods follow, as an IANA name (`Asia/Shanghai`,
    /// `Europe/Berlin`); default `UTC`. A day in `Asia/Shanghai` starts at local midnight (16:00 UTC
    /// the day before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::time_zone")]
    pub time_zone: Option<String>,
    /// What the gateway does while the usage this budget counts is unknown (a gateway replica's
    /// counts could not be read, or the ledger not stored, twice in a row (within two `--usage-interval`s of the fault); the route's
    /// `UsageStale` condition says which and why): `Allow` (default) keeps serving, `Deny` answers
    /// 429 as if the budget were used up, until the usage is known again.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_unknown_usage: UnknownUsage,
    /// Tokens (prompt plus completion, as the providers report them) per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
    /// For a route's `tokens` budget: the completion tokens a request may ask for when it sets
    /// no `max_tokens`, `max_completion_tokens` or `max_output_tokens`. The gateway writes it into
    /// such a request as its limit, so that what it reserves at admission holds (requests are
    /// admitted only while what they may cost fits what is left). Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_completion_tokens: Option<u64>,
    /// Cost per period at the backends' `cost` prices, as a decimal string in their currency (for
    /// example `"50.00"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"), length(max = 19))]
    pub cost: Option<String>,
}

/// A route's rate limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt plus completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// The completion tokens written into a request that sets no limit, as the budget's
    /// `maxCompletionTokens` (which wins when both are given). Default 4096: a request that may
    /// cost more than a replica's share of `tokensPerMinute` is refused, so keep it well below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_completion_tokens: Option<u64>,
}

/// What a budget does while its usage is unknown.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UnknownUsage {
    /// Keep serving (the budget may be overshot by what is not counted).
    #[default]
    Allow,
    /// Refuse as if the budget were used up (429), until the usage is known again.
    Deny,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A budget's period.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BudgetPeriod {
    /// A calendar day (in the budget's `timeZone`, UTC by default).
    Day,
    /// A calendar month (in the budget's `timeZone`, UTC by default).
    #[default]
    Month,
}

/// Options of `azure-openai` backends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureOptions {
    /// The `api-version` query parameter sent to Azure OpenAI. Default `2024-10-21`.
    #[serde(default = "default_azure_api_version")]
    #[schemars(
        regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?$"),
        length(max = 32)
    )]
    pub api_version: String,
}

/// The Azure OpenAI GA API version used when a backend does not say.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

fn default_azure_api_version() -> String {
    DEFAULT_AZURE_API_VERSION.to_string()
}

/// How the route chooses between backends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `Failover` (default): the preferred backend by priority serves, the next takes over when it fails.
    /// `Weighted`: backends of the best priority share traffic by weight, the others are fallbacks.
    /// `LowestCost`: the cheapest eligible backend by `cost` serves, the next cheapest is the fallback
    /// (every backend needs `cost`).
    #[serde(default)]
    pub strategy: Strategy,

    /// Failure classes that make a request move on to the next backend (and, with health checking,
    /// take a backend out of rotation). A failure of a class not listed is returned to the client.
    /// A permission 403 or a client error (400, 404, 413...) is never failed over. Default: all.
    #[serde(default = "FailureClass::all")]
    #[schemars(schema_with = "schema::failure_class_set")]
    pub failover_on: Vec<FailureClass>,

    /// Time limits for requests through the gateway.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// Active health checking of the backends.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// When to move traffic back to a preferred backend that recovered.
    #[serde(default)]
    pub failback: Failback,

    /// Jurisdictions (lower-case ISO 3166-1 alpha-2 codes) where request data may be processed. When
    /// set, a backend whose provider hosts its service outside all of them is never used (data
    /// residency). Unset: no restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), schema_with = "schema::region_list")]
    pub data_residency: Option<Vec<String>>,

    /// What the whole route may use per period. When it is used up the gateway answers the
    /// route's requests with an OpenAI-shaped 429 (`code: budget_exceeded`) until the period ends.
    /// A `cost` budget needs `cost` on every backend. Without a budget, usage is still counted per
    /// calendar month (`status.usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,

    /// Requests and tokens per minute the whole route may use, across the gateway's replicas
    /// (each holds a share the operator leases by demand, as a token bucket of a minute's share).
    /// Over it, requests are answered 429 (`code: rate_limit_exceeded`) with `Retry-After`.
    /// Tokens are counted as the budget admits them: what a request may cost when admitted (its
    /// body's bytes plus its completion limit, the budget's `maxCompletionTokens` written into a
    /// request that sets none), what the answer did not use given back once it is counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Which backends may answer an embeddings request. `SameModel` (default): only backends that
    /// map the requested model to the same provider model as the most preferred backend serving
    /// embeddings (the same embedding model at another account or region), because vectors of
    /// different embedding models do not mix in one index; another backend answers 404
    /// `embedding_model_mismatch` and the request moves on. `AnyModel`: any backend serving
    /// embeddings, like chat.
    #[serde(default)]
    pub embedding_failover: EmbeddingFailover,
}

/// Which backends may answer an embeddings request (`spec.policy.embeddingFailover`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EmbeddingFailover {
    /// Only backends embedding with the same provider model.
    #[default]
    SameModel,
    /// Any backend that serves embeddings.
    AnyModel,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            strategy: Strategy::default(),
            failover_on: FailureClass::all(),
            timeouts: Timeouts::default(),
            health_check: HealthCheck::default(),
            failback: Failback::default(),
            data_residency: None,
            budget: None,
            rate_limit: None,
            embedding_failover: EmbeddingFailover::default(),
        }
    }
}

/// Traffic strategy of a route.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Strategy {
    /// Priority order; the next backend takes over on failure.
    #[default]
    Failover,
    /// Weights within the best priority; lower priorities are fallbacks.
    Weighted,
    /// Cheapest eligible backend first, by `cost`.
    LowestCost,
}

/// Parses a Go-style duration already checked by the schema, in milliseconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok(std::time::Duration::from(d).as_millis() as u64)
}

/// Time limits, as Go-style durations (`30s`, `2m`, `1m30s`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Upper bound for a whole request, across every backend tried, including the full streamed
    /// response. Default `300s`.
    #[serde(default = "default_request_timeout")]
    #[schemars(schema_with = "schema::duration")]
    pub request: String,
    /// Longest silence from one backend: before its first byte and between streamed chunks. When it
    /// passes before the backend's answer begins, the attempt counts as `Timeout` and the next
    /// backend is tried; once an answer streams, a silence this long ends the stream where it is
    /// (Envoy retries only before an answer's headers). Default `60s`.
    #[serde(default = "default_idle_timeout")]
    #[schemars(schema_with = "schema::duration")]
    pub idle: String,
}

fn default_request_timeout() -> String {
    "300s".into()
}
fn default_idle_timeout() -> String {
    "60s".into()
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: default_request_timeout(),
            idle: default_idle_timeout(),
        }
    }
}

/// Active health checking: the operator probes each backend and moves traffic away from failing
/// ones before requests pay for a failed attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Whether the operator probes the backends. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Time between probes of a backend (jitter is added). Default `30s`.
    #[serde(default = "default_probe_interval")]
    #[schemars(schema_with = "schema::duration")]
    pub interval: String,
    /// Time a probe may take before it counts as `Timeout`. Default `10s`.
    #[serde(default = "default_probe_timeout")]
    #[schemars(schema_with = "schema::duration")]
    pub timeout: String,
    /// `ChatCompletion` (default): a minimal chat completion (`max_tokens: 1`) that reveals region
    /// blocks and empty balances at a small cost. `ModelsList`: the free models-list call, which only
    /// proves the key is valid.
    #[serde(default)]
    pub probe: ProbeKind,
    /// Model (logical name) the chat-completion probe uses. Default: the backend's cheapest mapped model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub model: Option<String>,
    /// Consecutive failed probes before a backend is taken out of rotation. Default 1 (a region
    /// block or an empty balance is certain after one answer).
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: u32,
    /// Consecutive successful probes before a backend counts as healthy again. Default 2.
    #[serde(default = "default_two")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: u32,
}

fn default_true() -> bool {
    true
}
fn default_probe_interval() -> String {
    "30s".into()
}
fn default_probe_timeout() -> String {
    "10s".into()
}
fn default_one() -> u32 {
    1
}
fn default_two() -> u32 {
    2
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            enabled: true,
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            probe: ProbeKind::default(),
            model: None,
            unhealthy_threshold: 1,
            healthy_threshold: 2,
        }
    }
}

/// What a health probe sends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProbeKind {
    /// A chat completion with `max_tokens: 1`.
    #[default]
    ChatCompletion,
    /// The models-list call.
    ModelsList,
}

/// Failing back to a preferred backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failback {
    /// How long a recovered preferred backend must stay healthy before traffic moves back to it.
    /// Default `60s`; `0s` fails back as soon as the healthy threshold is met.
    #[serde(default = "default_failback_delay")]
    #[schemars(schema_with = "schema::duration_or_zero")]
    pub delay: String,
}

fn default_failback_delay() -> String {
    "60s".into()
}

impl Default for Failback {
    fn default() -> Self {
        Failback {
            delay: default_failback_delay(),
        }
    }
}

/// The Secret workloads mount to reach the route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSecret {
    /// Name of the Secret. Default `<route>-llm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub name: Option<String>,
    /// `Gateway` (default): workloads talk to the namespace's llmroute gateway with a route key; the
    /// provider keys never leave the gateway and failover is per request. `Direct`: the Secret holds
    /// the active backend's own base URL and key (no gateway hop; failover only when the operator
    /// switches the Secret, see `rollout`). `Direct` needs `defaultModel`.
    #[serde(default)]
    pub mode: WorkloadMode,
}

/// How workloads reach the provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WorkloadMode {
    /// Through the namespace's gateway.
    #[default]
    Gateway,
    /// Straight to the active backend.
    Direct,
}

/// Which workloads to restart when the workload Secret changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Label selector of Deployments in the route's namespace.
    pub selector: LabelSelector,
}

/// Observed state of an LLMRoute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LLMRouteStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (the spec is valid), `ResolvedRefs` (every referenced Secret key exists),
    /// `Programmed` (the gateway configuration is published), `Ready` (workloads can use the route),
    /// `Degraded` (serving from other than the preferred backend).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::condition_list")]
    pub conditions: Vec<Condition>,
    /// The backend that serves requests now (first in the failover chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_backend: Option<String>,
    /// The base URL workloads use (`OPENAI_BASE_URL` of the workload Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// State of each backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::backend_status_list")]
    pub backends: Vec<BackendStatus>,
    /// Tokens and cost of the current period across every gateway replica, and what is left of
    /// the budgets. Updated at most every `--usage-interval`, and only when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
}

/// Usage of a route in its current period.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// The period counted: `2026-12` (month) or `2026-12-01` (day), in the budget's time zone.
    pub period: String,
    /// When the period ends and the counts start again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Time>,
    /// Tokens (prompt plus completion) the route's answers reported this period.
    pub tokens: u64,
    /// Their cost at the backends' prices (backends without `cost` count nothing), as a decimal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    /// What is left of `spec.policy.budget` (0 once it is used up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Remaining>,
    /// The same per backend that answered or has a budget, each in its own budget's period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::backend_usage_list")]
    pub backends: Vec<BackendUsage>,
}

/// Usage of one backend in its current period.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendUsage {
    pub name: String,
    /// `2026-12` or `2026-12-01`: the backend's budget period, else the route's.
    pub period: String,
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    /// What is left of `spec.backends[].budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Remaining>,
}

/// What is left of a budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Remaining {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
}

/// Observed state of one backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// The backend's name.
    pub name: String,
    /// `Healthy`, `Unknown` (not probed yet), `Excluded` (not allowed in this region, by data
    /// residency, or missing its key) or a failure class.
    pub state: String,
    /// CamelCase reason for the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the backend was last probed, as of the status's last change: a probe that changes
    /// nothing does not rewrite status (the llmroute_probes_total metric counts every probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// Latency of that probe, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_latency_ms: Option<u32>,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl LLMRoute {
    /// The name of the workload Secret (`spec.workloadSecret.name`, default `<route>-llm`).
    pub fn workload_secret_name(&self) -> String {
        self.spec
            .workload_secret
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-llm", kube::ResourceExt::name_any(self)))
    }
}

/// Every CRD the operator serves, as applied by `kubectl apply -f crds/`.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![LLMRoute::crd()]
}

/// Every CRD as one YAML stream (documents separated by `---`), byte-stable.
///
/// Plain scalars that YAML 1.1 parsers (Go's yaml.v2 in kustomize, Flux, Argo CD) would read as
/// timestamps (`default: 2024-10-21`) are quoted: they are strings in the schema, and a timestamp
/// there breaks the CRD's own pattern when applied through kustomize.
pub fn crds_yaml() -> String {
    static DATE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let date = DATE.get_or_init(|| {
        regex::Regex::new(r"(?m)^(\s*(?:- )?[A-Za-z0-9_-]+: |\s*- )(\d{4}-\d{2}-\d{2})$")
            .expect("valid regex")
    });
    crds()
        .iter()
        .map(|crd| serde_yaml_ng::to_string(crd).expect("a CRD serializes to YAML"))
        .map(|yaml| date.replace_all(&yaml, "$1'$2'").into_owned())
        .collect::<Vec<_>>()
        .join("---\n")
}
