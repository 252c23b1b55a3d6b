//! The provider catalog: what llmroute knows about each LLM provider, as data
//! (`providers.yaml`, embedded at build time). Everything provider-specific — the CRD's provider enum,
//! admission rules, gateway rewrites, error classification, docs — is derived from it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a provider lays out its request paths.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathStyle {
    /// `<base path>/<operation>`, as OpenAI.
    OpenAI,
    /// `<base path>/openai/deployments/<deployment>/<operation>?api-version=<v>`, as Azure OpenAI.
    AzureDeployment,
}

/// Whether a backend of this provider needs a key.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    Required,
    Optional,
}

/// How a provider reports token usage in a streamed answer.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamUsage {
    /// Only when the request asks with `stream_options.include_usage` (OpenAI's contract): the
    /// gateway asks for a client that did not, and hides the extra usage chunk from it.
    IncludeUsage,
    /// Not verified: the gateway sends the request as it is, and counts a stream's usage only when
    /// the provider sends it unasked.
    #[default]
    Unverified,
}

/// An OpenAI API operation, below a provider's base URL.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `POST /chat/completions`.
    ChatCompletions,
    /// `POST /embeddings`.
    Embeddings,
    /// `POST /completions` (legacy text completions).
    Completions,
    /// `POST /responses` (and `/responses/...`).
    Responses,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Responses,
    ];

    fn chat_only() -> Vec<Endpoint> {
        vec![Endpoint::ChatCompletions]
    }

    /// The path below the base URL (`chat/completions`, `embeddings`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
        }
    }
}

/// The header that carries the key.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    pub header: String,
    pub prefix: String,
}

/// One error-classification rule: a response with this status (0: any) whose body contains `match`
/// (absent: any body) is a failure of `class`.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorRule {
    pub status: u16,
    #[serde(default, rename = "match")]
    pub body_contains: Option<String>,
    pub class: FailureClass,
}

impl ErrorRule {
    fn matches(&self, status: u16, body: &str) -> bool {
        (self.status == 0 || self.status == status)
            && self
                .body_contains
                .as_deref()
                .is_none_or(|needle| body.contains(needle))
    }
}

/// A catalog entry.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub base_url: Option<String>,
    pub path_style: PathStyle,
    pub chat_path: String,
    pub models_path: String,
    pub auth: Auth,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub credentials: Credentials,
    /// Whether a user-given endpoint may use plain `http://` (in-cluster self-hosted servers).
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub unavailable_in: Vec<String>,
    #[serde(default)]
    pub available_in: Option<Vec<String>>,
    pub hosted_in: Vec<String>,
    pub models: Vec<String>,
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
    #[serde(default)]
    pub stream_usage: StreamUsage,
    /// The OpenAI operations the provider serves (chat completions always).
    #[serde(default = "Endpoint::chat_only")]
    pub endpoints: Vec<Endpoint>,
    pub docs: String,
}

impl Provider {
    /// Whether the provider serves API traffic from `region` (a lower-case ISO 3166-1 code).
    pub fn serves_region(&self, region: &str) -> bool {
        if self.unavailable_in.iter().any(|r| r == region) {
            return false;
        }
        match &self.available_in {
            Some(list) => list.iter().any(|r| r == region),
            None => true,
        }
    }

    /// Whether the provider processes data inside one of `allowed` jurisdictions. A provider hosted
    /// wherever the user runs it (`*`) is allowed anywhere.
    pub fn hosted_within(&self, allowed: &[String]) -> bool {
        self.hosted_in
            .iter()
            .any(|h| h == "*" || allowed.contains(h))
    }

    /// The rules that classify this provider's error responses: its own first, then the common ones.
    pub fn error_rules(&self) -> impl Iterator<Item = &ErrorRule> {
        self.errors.iter().chain(catalog().common_errors.iter())
    }

    /// Classifies an error response. `None`: not a failure llmroute fails over on (a client error
    /// such as 400, 404, 413 or a permission 403), returned to the client as it is.
    pub fn classify(&self, status: u16, body: &str) -> Option<FailureClass> {
        if status < 400 {
            return None;
        }
        self.error_rules()
            .find(|rule| rule.matches(status, body))
            .map(|rule| rule.class)
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Catalog {
    common_errors: Vec<ErrorRule>,
    providers: Vec<Provider>,
}

const CATALOG_YAML: &str = include_str!("providers.yaml");

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        // The file is part of the binary and covered by tests; failing here is a build defect.
        serde_yaml_ng::from_str(CATALOG_YAML).expect("src/catalog/providers.yaml is valid")
    })
}

/// Every provider, in catalog order.
pub fn providers() -> &'static [Provider] {
    &catalog().providers
}

/// The provider with this id.
pub fn provider(id: &str) -> Option<&'static Provider> {
    providers().iter().find(|p| p.id == id)
}

/// The common classification rules, applied after each provider's own.
pub fn common_errors() -> &'static [ErrorRule] {
    &catalog().common_errors
}

/// Why a backend failed, as llmroute classifies provider responses (status code *and* body).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum FailureClass {
    /// The provider refuses the caller's country or region (OpenAI 403
    /// `unsupported_country_region_territory`).
    RegionBlocked,
    /// The account's balance or quota is used up (OpenAI 429 `insufficient_quota`, DeepSeek 402,
    /// Moonshot `exceeded_current_quota_error`, Zhipu 1113).
    QuotaExhausted,
    /// Temporary rate limiting (429 `rate_limit_exceeded` and the like).
    RateLimited,
    /// The key is missing, wrong or revoked (401, or 403 with an auth error).
    AuthFailed,
    /// The provider failed (5xx).
    ServerError,
    /// The provider could not be reached (connection refused or reset, DNS, TLS).
    Unreachable,
    /// No response, or no first byte, within the configured time.
    Timeout,
}

impl FailureClass {
    /// Every class, in declaration order.
    pub const ALL: [FailureClass; 7] = [
        FailureClass::RegionBlocked,
        FailureClass::QuotaExhausted,
        FailureClass::RateLimited,
        FailureClass::AuthFailed,
        FailureClass::ServerError,
        FailureClass::Unreachable,
        FailureClass::Timeout,
    ];

    /// Every class, as the default of `failoverOn`.
    pub fn all() -> Vec<FailureClass> {
        Self::ALL.to_vec()
    }

    /// The CamelCase name used in the API, status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::RegionBlocked => "RegionBlocked",
            FailureClass::QuotaExhausted => "QuotaExhausted",
            FailureClass::RateLimited => "RateLimited",
            FailureClass::AuthFailed => "AuthFailed",
            FailureClass::ServerError => "ServerError",
            FailureClass::Unreachable => "Unreachable",
            FailureClass::Timeout => "Timeout",
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: [&str; 12] = [
        "openai",
        "azure-openai",
        "zhipu",
        "qianfan",
        "sensenova",
        "hunyuan",
        "deepseek",
        "moonshot",
        "dashscope",
        "minimax",
        "anthropic",
        "openai-compatible",
    ];

    #[test]
    fn catalog_has_every_required_provider_with_unique_ids() {
        for id in REQUIRED {
            assert!(provider(id).is_some(), "catalog lacks {id}");
        }
        let mut ids: Vec<_> = providers().iter().map(|p| &p.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), providers().len(), "duplicate ids");
    }

    #[test]
    fn base_urls_are_https_and_paths_absolute() {
        for p in providers() {
            if let Some(url) = &p.base_url {
                assert!(url.starts_with("https://"), "{}: {url}", p.id);
                assert!(!url.ends_with('/'), "{}: trailing slash", p.id);
            }
            assert!(
                p.chat_path.starts_with('/') && p.models_path.starts_with('/'),
                "{}",
                p.id
            );
            for r in p
                .unavailable_in
                .iter()
                .chain(p.hosted_in.iter().filter(|h| *h != "*"))
            {
                assert!(
                    r.len() == 2 && r.chars().all(|c| c.is_ascii_lowercase()),
                    "{}: {r}",
                    p.id
                );
            }
        }
    }

    #[test]
    fn openai_is_unavailable_in_cn_and_hk_but_zhipu_serves_cn() {
        let openai = provider("openai").unwrap();
        assert!(!openai.serves_region("cn") && !openai.serves_region("hk"));
        assert!(openai.serves_region("us"));
        assert!(provider("zhipu").unwrap().serves_region("cn"));
        assert!(provider("azure-openai").unwrap().serves_region("hk"));
    }

    #[test]
    fn classification_tells_region_block_from_permission_and_quota_from_rate_limit() {
        let openai = provider("openai").unwrap();
        let region = r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#;
        assert_eq!(
            openai.classify(403, region),
            Some(FailureClass::RegionBlocked)
        );
        let permission = r#"{"error":{"message":"You are not allowed to access this model","type":"invalid_request_error","code":"model_not_found"}}"#;
        assert_eq!(openai.classify(403, permission), None);
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(
            openai.classify(429, quota),
            Some(FailureClass::QuotaExhausted)
        );
        let rate = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(openai.classify(429, rate), Some(FailureClass::RateLimited));
        assert_eq!(openai.classify(401, "{}"), Some(FailureClass::AuthFailed));
        assert_eq!(openai.classify(500, ""), Some(FailureClass::ServerError));
        assert_eq!(openai.classify(400, "{}"), None);
        assert_eq!(openai.classify(200, "{}"), None);
    }

    #[test]
    fn provider_specific_bodies() {
        let deepseek = provider("deepseek").unwrap();
        assert_eq!(
            deepseek.classify(402, r#"{"error":{"message":"Insufficient Balance"}}"#),
            Some(FailureClass::QuotaExhausted)
        );
        let moonshot = provider("moonshot").unwrap();
        let no_money = r#"{"error":{"message":"quota","type":"exceeded_current_quota_error"}}"#;
        assert_eq!(
            moonshot.classify(429, no_money),
            Some(FailureClass::QuotaExhausted)
        );
        let busy = r#"{"error":{"message":"busy","type":"engine_overloaded_error"}}"#;
        assert_eq!(
            moonshot.classify(429, busy),
            Some(FailureClass::ServerError)
        );
        let zhipu = provider("zhipu").unwrap();
        let arrears = r#"{"error":{"code":"1113","message":"您的账户已欠费"}}"#;
        assert_eq!(
            zhipu.classify(429, arrears),
            Some(FailureClass::QuotaExhausted)
        );
        let concurrency = r#"{"error":{"code":"1302","message":"并发数过高"}}"#;
        assert_eq!(
            zhipu.classify(429, concurrency),
            Some(FailureClass::RateLimited)
        );
    }
}
