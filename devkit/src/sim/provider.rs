//! Each catalog provider's contract as the simulator plays it: where its API lives, how it
//! authenticates, which models it serves and how its error bodies look.
//!
//! Sources: `shared/notes/providers.md` (gathered from the providers' public docs and from other
//! gateways' source) and the `docs` URL of each entry in `src/catalog/providers.yaml`, quoted per
//! provider below. Where a provider documents no body of its own for a failure (e.g. SenseNova or
//! Hunyuan rate limits, any region block but OpenAI's and Anthropic's), the simulator answers in the
//! OpenAI shape, as these OpenAI-compatible endpoints do; such bodies are marked "generic".

use std::fmt;
use std::str::FromStr;

use axum::http::StatusCode;
use serde_json::{Value, json};

/// One provider of the llmroute catalog (same ids as `src/catalog/providers.yaml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SimProvider {
    /// Contract: https://platform.openai.com/docs/guides/error-codes, notes. Base `/v1`,
    /// `Authorization: Bearer`, errors `{"error":{"message","type","param","code"}}`.
    #[default]
    OpenAI,
    /// Contract: https://learn.microsoft.com/azure/ai-services/openai/reference, notes.
    /// `/openai/deployments/{deployment}/chat/completions?api-version=...`, header `api-key`, the
    /// deployment name is the model; errors `{"error":{"code","message"}}`.
    AzureOpenAI,
    /// Contract: https://open.bigmodel.cn/dev/api/error-code/service-error, notes. Base
    /// `/api/paas/v4`, Bearer; errors carry business codes `{"error":{"code":"1113","message":...}}`.
    Zhipu,
    /// Contract: https://cloud.baidu.com/doc/qianfan-api/s/3m7of64lb, notes. Base `/v2`, Bearer
    /// (bce-v3 keys); errors in the OpenAI shape with Qianfan's codes (`rpm_rate_limit_exceeded`, ...).
    Qianfan,
    /// Contract: https://platform.sensenova.cn/doc, notes. Base `/compatible-mode/v1`, Bearer;
    /// OpenAI-shaped errors (generic).
    SenseNova,
    /// Contract: https://cloud.tencent.com/document/product/1729/111007, notes. Base `/v1`, Bearer;
    /// OpenAI-shaped errors (generic).
    Hunyuan,
    /// Contract: https://api-docs.deepseek.com/quick_start/error_codes, notes. No base path: both
    /// `/chat/completions` and `/v1/chat/completions` answer; 402 `Insufficient Balance`, 429, 503.
    DeepSeek,
    /// Contract: https://platform.moonshot.cn/docs/api/chat, notes. Base `/v1`, Bearer; errors
    /// `{"error":{"message","type"}}` with types `rate_limit_reached_error`,
    /// `exceeded_current_quota_error`, `engine_overloaded_error`, ...
    Moonshot,
    /// Contract: https://help.aliyun.com/zh/model-studio/error-code, notes. Base
    /// `/compatible-mode/v1`, Bearer; OpenAI-shaped errors with DashScope codes (`Throttling...`,
    /// `Arrearage`).
    DashScope,
    /// Contract: https://platform.minimaxi.com/document/ChatCompletion%20v2, notes. Base `/v1`,
    /// Bearer; MiniMax reports errors in `base_resp {status_code, status_msg}` (1004 auth,
    /// 1002 rate limit, 1008 insufficient balance).
    MiniMax,
    /// Contract: https://docs.anthropic.com/en/api/openai-sdk, notes. OpenAI SDK compatibility
    /// layer: base `/v1`, `x-api-key` and a required `anthropic-version` header; errors in
    /// Anthropic's shape `{"type":"error","error":{"type","message"}}`; 529 when overloaded.
    Anthropic,
    /// Contract: https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html, notes. A
    /// self-hosted server (vLLM, Ollama, SGLang): base `/v1`, optional Bearer (required only when
    /// the simulator is given keys); vLLM's 401 `{"error":"Unauthorized"}` and 404 model error.
    OpenAICompatible,
}

/// All catalog providers, in catalog order.
pub const ALL_PROVIDERS: [SimProvider; 12] = [
    SimProvider::OpenAI,
    SimProvider::AzureOpenAI,
    SimProvider::Zhipu,
    SimProvider::Qianfan,
    SimProvider::SenseNova,
    SimProvider::Hunyuan,
    SimProvider::DeepSeek,
    SimProvider::Moonshot,
    SimProvider::DashScope,
    SimProvider::MiniMax,
    SimProvider::Anthropic,
    SimProvider::OpenAICompatible,
];

/// An OpenAI operation beyond chat completions and the models (list and `models/{model}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /embeddings`.
    Embeddings,
    /// `POST /completions` (legacy text completions).
    Completions,
    /// `POST /responses`.
    Responses,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Responses,
    ];

    /// The path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
        }
    }
}

/// How a provider expects its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`
    Bearer,
    /// `api-key: <key>` (Azure)
    ApiKey,
    /// `x-api-key: <key>` plus `anthropic-version` (Anthropic)
    XApiKey,
}

impl SimProvider {
    /// The catalog id (`openai`, `azure-openai`, `zhipu`, ...).
    pub fn id(self) -> &'static str {
        match self {
            SimProvider::OpenAI => "openai",
            SimProvider::AzureOpenAI => "azure-openai",
            SimProvider::Zhipu => "zhipu",
            SimProvider::Qianfan => "qianfan",
            SimProvider::SenseNova => "sensenova",
            SimProvider::Hunyuan => "hunyuan",
            SimProvider::DeepSeek => "deepseek",
            SimProvider::Moonshot => "moonshot",
            SimProvider::DashScope => "dashscope",
            SimProvider::MiniMax => "minimax",
            SimProvider::Anthropic => "anthropic",
            SimProvider::OpenAICompatible => "openai-compatible",
        }
    }

    /// The path of the base URL, as in the catalog's `baseUrl` (empty for Azure, whose base is the
    /// resource root, and for DeepSeek).
    pub fn base_path(self) -> &'static str {
        match self {
            SimProvider::AzureOpenAI | SimProvider::DeepSeek => "",
            SimProvider::Zhipu => "/api/paas/v4",
            SimProvider::Qianfan => "/v2",
            SimProvider::SenseNova | SimProvider::DashScope => "/compatible-mode/v1",
            _ => "/v1",
        }
    }

    /// Every path prefix under which the provider serves `chat/completions`, `models` and
    /// `models/{model}`.
    pub(crate) fn prefixes(self) -> &'static [&'static str] {
        match self {
            // DeepSeek serves both https://api.deepseek.com and https://api.deepseek.com/v1.
            SimProvider::DeepSeek => &["", "/v1"],
            SimProvider::Zhipu => &["/api/paas/v4"],
            SimProvider::Qianfan => &["/v2"],
            SimProvider::SenseNova | SimProvider::DashScope => &["/compatible-mode/v1"],
            SimProvider::AzureOpenAI => &[],
            _ => &["/v1"],
        }
    }

    pub fn auth(self) -> AuthStyle {
        match self {
            SimProvider::AzureOpenAI => AuthStyle::ApiKey,
            SimProvider::Anthropic => AuthStyle::XApiKey,
            _ => AuthStyle::Bearer,
        }
    }

    /// The catalog's example models, served by default.
    pub fn catalog_models(self) -> &'static [&'static str] {
        match self {
            SimProvider::OpenAI | SimProvider::AzureOpenAI => &["gpt-4o", "gpt-4o-mini"],
            SimProvider::Zhipu => &["glm-4-plus", "glm-4-air", "glm-4-flash"],
            SimProvider::Qianfan => &["ernie-4.0-8k", "ernie-3.5-8k", "ernie-speed-128k"],
            SimProvider::SenseNova => &["SenseChat-5", "SenseChat-Turbo"],
            SimProvider::Hunyuan => &["hunyuan-turbos-latest", "hunyuan-lite"],
            SimProvider::DeepSeek => &["deepseek-chat", "deepseek-reasoner"],
            SimProvider::Moonshot => &["moonshot-v1-8k", "kimi-k2"],
            SimProvider::DashScope => &["qwen-plus", "qwen-max", "qwen-turbo"],
            SimProvider::MiniMax => &["MiniMax-Text-01", "MiniMax-M1"],
            SimProvider::Anthropic => &["claude-sonnet-4-5", "claude-haiku-4-5"],
            SimProvider::OpenAICompatible => &["meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b"],
        }
    }

    /// Whether the provider's OpenAI-compatible API serves `endpoint` (as the catalog's
    /// `endpoints` says; chat completions always). A provider that does not answers its own 404
    /// for the path, as for any unknown path. Sources: OpenAI's API reference (all four); Azure
    /// OpenAI serves embeddings and completions per deployment (the Responses API lives at
    /// `/openai/v1/responses`, outside the deployment paths); Zhipu `/api/paas/v4/embeddings`;
    /// Qianfan `/v2/embeddings`; Hunyuan `/v1/embeddings`; DashScope
    /// `/compatible-mode/v1/embeddings`; vLLM serves all four; the others chat only.
    pub fn serves(self, endpoint: Endpoint) -> bool {
        use SimProvider::*;
        match endpoint {
            Endpoint::Embeddings => matches!(
                self,
                OpenAI | AzureOpenAI | Zhipu | Qianfan | Hunyuan | DashScope | OpenAICompatible
            ),
            Endpoint::Completions => matches!(self, OpenAI | AzureOpenAI | OpenAICompatible),
            Endpoint::Responses => matches!(self, OpenAI | OpenAICompatible),
        }
    }

    /// Embedding models the provider serves (any name for Azure deployments and self-hosted).
    pub fn embedding_models(self) -> &'static [&'static str] {
        match self {
            SimProvider::OpenAI => &["text-embedding-3-small", "text-embedding-3-large"],
            SimProvider::Zhipu => &["embedding-3", "embedding-2"],
            SimProvider::Qianfan => &["embedding-v1", "bge-large-zh"],
            SimProvider::Hunyuan => &["hunyuan-embedding"],
            SimProvider::DashScope => &["text-embedding-v3"],
            _ => &[],
        }
    }

    /// The docs URL the contract follows (the catalog's `docs`).
    pub fn docs(self) -> &'static str {
        match self {
            SimProvider::OpenAI => "https://platform.openai.com/docs/guides/error-codes",
            SimProvider::AzureOpenAI => {
                "https://learn.microsoft.com/azure/ai-services/openai/reference"
            }
            SimProvider::Zhipu => "https://open.bigmodel.cn/dev/api/error-code/service-error",
            SimProvider::Qianfan => "https://cloud.baidu.com/doc/qianfan-api/s/3m7of64lb",
            SimProvider::SenseNova => "https://platform.sensenova.cn/doc",
            SimProvider::Hunyuan => "https://cloud.tencent.com/document/product/1729/111007",
            SimProvider::DeepSeek => "https://api-docs.deepseek.com/quick_start/error_codes",
            SimProvider::Moonshot => "https://platform.moonshot.cn/docs/api/chat",
            SimProvider::DashScope => "https://help.aliyun.com/zh/model-studio/error-code",
            SimProvider::MiniMax => "https://platform.minimaxi.com/document/ChatCompletion%20v2",
            SimProvider::Anthropic => "https://docs.anthropic.com/en/api/openai-sdk",
            SimProvider::OpenAICompatible => {
                "https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html"
            }
        }
    }
}

impl fmt::Display for SimProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for SimProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL_PROVIDERS
            .into_iter()
            .find(|p| p.id() == s)
            .ok_or_else(|| {
                let ids: Vec<&str> = ALL_PROVIDERS.iter().map(|p| p.id()).collect();
                format!("unknown provider {s:?}; one of {}", ids.join(", "))
            })
    }
}

/// A failure the simulator answers with.
#[derive(Clone, Debug)]
pub(crate) enum Failure<'a> {
    /// No key, or a key not in the accepted set.
    BadKey {
        missing: bool,
    },
    UnknownModel(&'a str),
    UnknownPath {
        method: &'a str,
        path: &'a str,
    },
    /// A request parameter the operation does not have (OpenAI rejects those, unlike most
    /// OpenAI-compatible servers, which ignore them).
    UnknownParameter(&'a str),
    /// Azure without `?api-version=`.
    MissingApiVersion,
    /// Anthropic without `anthropic-version`.
    MissingAnthropicVersion,
    RegionBlocked,
    RateLimited,
    QuotaExhausted,
    PermissionDenied(&'a str),
    ServerError,
    Unavailable,
}

/// OpenAI's error envelope.
fn openai(message: &str, kind: &str, code: Value) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

/// Anthropic's error envelope.
fn anthropic(kind: &str, message: &str) -> Value {
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

/// Zhipu's error envelope: a business code as a string.
fn zhipu(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

/// Azure's error envelope.
fn azure(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

/// Moonshot's error envelope.
fn moonshot(kind: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind } })
}

/// OpenAI's region block, byte for byte as in the notes.
pub const OPENAI_REGION_BLOCKED: &str = r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#;

/// The OpenAI-shaped answer used by providers that document no body of their own (generic).
fn generic(f: &Failure<'_>) -> (StatusCode, Value) {
    use Failure::*;
    match f {
        BadKey { .. } => (
            StatusCode::UNAUTHORIZED,
            openai(
                "Incorrect API key provided.",
                "invalid_request_error",
                json!("invalid_api_key"),
            ),
        ),
        UnknownModel(m) => (
            StatusCode::NOT_FOUND,
            openai(
                &format!("The model `{m}` does not exist or you do not have access to it."),
                "invalid_request_error",
                json!("model_not_found"),
            ),
        ),
        UnknownPath { method, path } => (
            StatusCode::NOT_FOUND,
            openai(
                &format!("Invalid URL ({method} {path})"),
                "invalid_request_error",
                Value::Null,
            ),
        ),
        // OpenAI's answer to a parameter an operation does not take, e.g.
        // `stream_options.include_usage` on the Responses API: 400, `unknown_parameter`, the
        // parameter named in `param`.
        UnknownParameter(p) => (
            StatusCode::BAD_REQUEST,
            json!({ "error": {
                "message": format!("Unknown parameter: '{p}'."),
                "type": "invalid_request_error",
                "param": p,
                "code": "unknown_parameter",
            } }),
        ),
        MissingApiVersion | MissingAnthropicVersion => (
            StatusCode::BAD_REQUEST,
            openai(
                "Missing required parameter.",
                "invalid_request_error",
                Value::Null,
            ),
        ),
        RegionBlocked => (
            StatusCode::FORBIDDEN,
            serde_json::from_str(OPENAI_REGION_BLOCKED).expect("constant JSON"),
        ),
        RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            openai(
                "Rate limit reached for requests. Please try again later.",
                "requests",
                json!("rate_limit_exceeded"),
            ),
        ),
        QuotaExhausted => (
            StatusCode::TOO_MANY_REQUESTS,
            openai(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                json!("insufficient_quota"),
            ),
        ),
        PermissionDenied(m) => (
            StatusCode::FORBIDDEN,
            openai(
                &format!("Project `proj_sim` does not have access to model `{m}`"),
                "invalid_request_error",
                json!("model_not_found"),
            ),
        ),
        ServerError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            openai(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                json!("server_error"),
            ),
        ),
        Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            openai(
                "The engine is currently overloaded, please try again later.",
                "server_error",
                json!("service_unavailable"),
            ),
        ),
    }
}

impl SimProvider {
    /// Status and body of a failure, in this provider's own shape where it has one.
    pub(crate) fn failure(self, f: &Failure<'_>) -> (StatusCode, Value) {
        use Failure::*;
        use SimProvider::*;
        match (self, f) {
            // ---------------------------------------------------------------- OpenAI
            (OpenAI, BadKey { missing: true }) => (
                StatusCode::UNAUTHORIZED,
                openai(
                    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                    json!("invalid_api_key"),
                ),
            ),
            (OpenAI, BadKey { missing: false }) => (
                StatusCode::UNAUTHORIZED,
                openai(
                    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    json!("invalid_api_key"),
                ),
            ),

            // ---------------------------------------------------------------- Azure OpenAI
            (AzureOpenAI, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                azure(
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
                ),
            ),
            (AzureOpenAI, MissingApiVersion) => {
                (StatusCode::NOT_FOUND, azure("404", "Resource not found"))
            }
            (AzureOpenAI, UnknownPath { .. }) => {
                (StatusCode::NOT_FOUND, azure("404", "Resource not found"))
            }
            (AzureOpenAI, UnknownModel(_)) => (
                StatusCode::NOT_FOUND,
                azure(
                    "DeploymentNotFound",
                    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
                ),
            ),
            (AzureOpenAI, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                azure(
                    "RateLimitReached",
                    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after the time given in retry-after.",
                ),
            ),
            (AzureOpenAI, QuotaExhausted) => (
                StatusCode::TOO_MANY_REQUESTS,
                azure(
                    "insufficient_quota",
                    "You exceeded your current quota, please check your plan and billing details.",
                ),
            ),
            (AzureOpenAI, PermissionDenied(_)) => (
                StatusCode::FORBIDDEN,
                azure(
                    "PermissionDenied",
                    "Principal does not have access to API/Operation.",
                ),
            ),
            (AzureOpenAI, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                azure("InternalServerError", "Internal server error."),
            ),
            (AzureOpenAI, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                azure(
                    "ServiceUnavailable",
                    "The service is temporarily unavailable.",
                ),
            ),

            // ---------------------------------------------------------------- Zhipu
            (Zhipu, BadKey { missing: true }) => (
                StatusCode::UNAUTHORIZED,
                zhipu(
                    "1001",
                    "Header中未收到Authorization参数，无法进行身份验证。",
                ),
            ),
            (Zhipu, BadKey { missing: false }) => {
                (StatusCode::UNAUTHORIZED, zhipu("1000", "身份验证失败。"))
            }
            (Zhipu, UnknownModel(_)) => (
                StatusCode::BAD_REQUEST,
                zhipu("1211", "模型不存在，请检查模型代码。"),
            ),
            (Zhipu, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                zhipu(
                    "1302",
                    "您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。",
                ),
            ),
            (Zhipu, QuotaExhausted) => (
                StatusCode::TOO_MANY_REQUESTS,
                zhipu("1113", "您的账户已欠费，请充值后重试。"),
            ),
            (Zhipu, PermissionDenied(m)) => (
                StatusCode::FORBIDDEN,
                zhipu("1220", &format!("您无权访问{m}。")),
            ),
            (Zhipu, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                zhipu("500", "内部错误。"),
            ),
            (Zhipu, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                zhipu("1305", "当前API请求过多，请稍后重试。"),
            ),

            // ---------------------------------------------------------------- Qianfan v2
            (Qianfan, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                openai(
                    "IAM Certification failed",
                    "invalid_request_error",
                    json!("invalid_iam_token"),
                ),
            ),
            (Qianfan, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                openai(
                    &format!("model {m} not found"),
                    "invalid_request_error",
                    json!("no_such_model"),
                ),
            ),
            (Qianfan, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                openai(
                    "Rate limit reached for RPM",
                    "rate_limit_exceeded",
                    json!("rpm_rate_limit_exceeded"),
                ),
            ),
            (Qianfan, QuotaExhausted) => (
                StatusCode::FORBIDDEN,
                openai(
                    "Account balance is insufficient",
                    "access_denied",
                    json!("insufficient_balance"),
                ),
            ),
            (Qianfan, PermissionDenied(_)) => (
                StatusCode::FORBIDDEN,
                openai(
                    "No permission to access this model",
                    "access_denied",
                    json!("no_permission"),
                ),
            ),
            (Qianfan, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                openai("Internal error", "internal_error", json!("internal_error")),
            ),
            (Qianfan, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                openai(
                    "Server high load, please try again later",
                    "server_high_load",
                    json!("server_high_load"),
                ),
            ),

            // ---------------------------------------------------------------- DeepSeek
            (DeepSeek, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                openai(
                    "Authentication Fails (no such user)",
                    "authentication_error",
                    json!("invalid_request_error"),
                ),
            ),
            (DeepSeek, UnknownModel(_)) => (
                StatusCode::BAD_REQUEST,
                openai(
                    "Model Not Exist",
                    "invalid_request_error",
                    json!("invalid_request_error"),
                ),
            ),
            (DeepSeek, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                openai(
                    "Rate Limit Reached",
                    "rate_limit_error",
                    json!("rate_limit_exceeded"),
                ),
            ),
            (DeepSeek, QuotaExhausted) => (
                StatusCode::PAYMENT_REQUIRED,
                openai(
                    "Insufficient Balance",
                    "unknown_error",
                    json!("invalid_request_error"),
                ),
            ),
            (DeepSeek, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                openai("Server Error", "server_error", json!("server_error")),
            ),
            (DeepSeek, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                openai(
                    "Server Overloaded",
                    "server_error",
                    json!("server_overloaded"),
                ),
            ),

            // ---------------------------------------------------------------- Moonshot
            (Moonshot, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                moonshot("invalid_authentication_error", "Invalid Authentication"),
            ),
            (Moonshot, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                moonshot(
                    "resource_not_found_error",
                    &format!("Not found the model {m} or Permission denied"),
                ),
            ),
            (Moonshot, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                moonshot(
                    "rate_limit_reached_error",
                    "Your account org-sim request reached max request: 3, please try again after 1 seconds",
                ),
            ),
            (Moonshot, QuotaExhausted) => (
                StatusCode::TOO_MANY_REQUESTS,
                moonshot(
                    "exceeded_current_quota_error",
                    "Your account org-sim is suspended, please check your plan and billing details",
                ),
            ),
            (Moonshot, PermissionDenied(_)) => (
                StatusCode::FORBIDDEN,
                moonshot(
                    "permission_denied_error",
                    "The API you are accessing is not open",
                ),
            ),
            (Moonshot, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                moonshot("server_error", "Internal server error"),
            ),
            (Moonshot, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                moonshot(
                    "engine_overloaded_error",
                    "The engine is currently overloaded, please try again later",
                ),
            ),

            // ---------------------------------------------------------------- DashScope
            (DashScope, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                openai(
                    "Incorrect API key provided. ",
                    "invalid_request_error",
                    json!("invalid_api_key"),
                ),
            ),
            (DashScope, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                openai(
                    &format!("The model `{m}` does not exist or you do not have access to it."),
                    "invalid_request_error",
                    json!("model_not_found"),
                ),
            ),
            (DashScope, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                openai(
                    "Requests rate limit exceeded, please try again later.",
                    "Throttling.RateQuota",
                    json!("Throttling.RateQuota"),
                ),
            ),
            (DashScope, QuotaExhausted) => (
                StatusCode::BAD_REQUEST,
                openai(
                    "Access denied, please make sure your account is in good standing.",
                    "Arrearage",
                    json!("Arrearage"),
                ),
            ),
            (DashScope, PermissionDenied(_)) => (
                StatusCode::FORBIDDEN,
                openai("Access denied.", "AccessDenied", json!("AccessDenied")),
            ),
            (DashScope, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                openai(
                    "An internal error has occured, please try again later or contact service support.",
                    "InternalError",
                    json!("InternalError"),
                ),
            ),
            (DashScope, Unavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                openai(
                    "Model is unavailable, please try again later.",
                    "ModelUnavailable",
                    json!("ModelUnavailable"),
                ),
            ),

            // ---------------------------------------------------------------- MiniMax
            (MiniMax, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                json!({ "base_resp": { "status_code": 1004, "status_msg": "login fail: Please carry the API secret key in the 'Authorization' field of the request header" } }),
            ),
            (MiniMax, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "base_resp": { "status_code": 1002, "status_msg": "rate limit exceeded" } }),
            ),
            (MiniMax, QuotaExhausted) => (
                StatusCode::PAYMENT_REQUIRED,
                json!({ "base_resp": { "status_code": 1008, "status_msg": "insufficient balance" } }),
            ),
            (MiniMax, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                json!({ "base_resp": { "status_code": 2013, "status_msg": format!("invalid params, unknown model '{m}'") } }),
            ),
            (MiniMax, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "base_resp": { "status_code": 1000, "status_msg": "unknown error" } }),
            ),

            // ---------------------------------------------------------------- Anthropic
            (Anthropic, BadKey { .. }) => (
                StatusCode::UNAUTHORIZED,
                anthropic("authentication_error", "invalid x-api-key"),
            ),
            (Anthropic, MissingAnthropicVersion) => (
                StatusCode::BAD_REQUEST,
                anthropic(
                    "invalid_request_error",
                    "anthropic-version: header is required",
                ),
            ),
            (Anthropic, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                anthropic("not_found_error", &format!("model: {m}")),
            ),
            (Anthropic, UnknownPath { .. }) => (
                StatusCode::NOT_FOUND,
                anthropic("not_found_error", "Not Found"),
            ),
            (Anthropic, RegionBlocked) => (
                StatusCode::FORBIDDEN,
                anthropic(
                    "forbidden",
                    "Anthropic's API is not available in your region.",
                ),
            ),
            (Anthropic, RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                anthropic(
                    "rate_limit_error",
                    "Number of requests has exceeded your per-minute rate limit.",
                ),
            ),
            (Anthropic, QuotaExhausted) => (
                StatusCode::BAD_REQUEST,
                anthropic(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                ),
            ),
            (Anthropic, PermissionDenied(_)) => (
                StatusCode::FORBIDDEN,
                anthropic(
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.",
                ),
            ),
            (Anthropic, ServerError) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                anthropic("api_error", "Internal server error"),
            ),
            (Anthropic, Unavailable) => (
                StatusCode::from_u16(529).expect("529"),
                anthropic("overloaded_error", "Overloaded"),
            ),

            // ---------------------------------------------------------------- self-hosted (vLLM)
            (OpenAICompatible, BadKey { .. }) => {
                (StatusCode::UNAUTHORIZED, json!({ "error": "Unauthorized" }))
            }
            (OpenAICompatible, UnknownModel(m)) => (
                StatusCode::NOT_FOUND,
                json!({ "object": "error", "message": format!("The model `{m}` does not exist."), "type": "NotFoundError", "param": null, "code": 404 }),
            ),

            // Everything else: the OpenAI shape (OpenAI's own for OpenAI, generic for the rest).
            _ => generic(f),
        }
    }
}
