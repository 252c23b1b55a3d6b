//! Typed shapes of the Envoy resources that grow with the number of routes (front routes, account
//! routes, chain clusters). Serialized straight from borrowed IR data: building `serde_json::Value`
//! trees for thousands of routes was most of the translation time. Field names are Envoy's
//! (proto JSON names, as in the files `envoy` reads).

use std::collections::BTreeMap;

use serde::Serialize;

pub const ROUTE_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A RouteConfiguration with one virtual host matching every domain.
#[derive(Serialize)]
pub struct RouteConfig<'a, R: Serialize> {
    #[serde(rename = "@type")]
    pub type_: &'static str,
    pub name: &'a str,
    /// Clusters may arrive after routes within one update; never reject a route for that.
    pub validate_clusters: bool,
    pub virtual_hosts: [VirtualHost<'a, R>; 1],
}

#[derive(Serialize)]
pub struct VirtualHost<'a, R: Serialize> {
    pub name: &'a str,
    pub domains: [&'static str; 1],
    pub routes: Vec<R>,
    /// `x-envoy-attempt-count` on responses: the front listener's Lua reads it to say which
    /// backends a failed request tried.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub include_attempt_count_in_response: bool,
}

impl<'a, R: Serialize> RouteConfig<'a, R> {
    pub fn new(name: &'a str, routes: Vec<R>) -> Self {
        RouteConfig {
            type_: ROUTE_CONFIG_TYPE,
            name,
            validate_clusters: false,
            virtual_hosts: [VirtualHost {
                name,
                domains: ["*"],
                routes,
                include_attempt_count_in_response: false,
            }],
        }
    }
}

#[derive(Serialize)]
pub struct LuaMetadata<M: Serialize> {
    pub filter_metadata: LuaNamespace<M>,
}

#[derive(Serialize)]
pub struct LuaNamespace<M: Serialize> {
    #[serde(rename = "envoy.filters.http.lua")]
    pub lua: M,
}

impl<M: Serialize> LuaMetadata<M> {
    pub fn new(lua: M) -> Self {
        LuaMetadata {
            filter_metadata: LuaNamespace { lua },
        }
    }
}

#[derive(Serialize)]
pub struct HeaderValue<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

#[derive(Serialize)]
pub struct HeaderToAdd<'a> {
    pub header: HeaderValue<'a>,
    pub append_action: &'static str,
}

impl<'a> HeaderToAdd<'a> {
    pub fn overwrite(key: &'a str, value: &'a str) -> Self {
        HeaderToAdd {
            header: HeaderValue { key, value },
            append_action: "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    }
}

// ---- front listener routes ----

#[derive(Serialize)]
pub struct FrontRoute<'a> {
    pub name: &'a str,
    #[serde(rename = "match")]
    pub match_: PrefixMatch,
    pub route: FrontAction<'a>,
    pub metadata: LuaMetadata<FrontMetadata<'a>>,
    pub request_body_buffer_limit: u64,
    pub request_headers_to_add: [HeaderToAdd<'a>; 1],
}

#[derive(Serialize)]
pub struct PrefixMatch {
    pub prefix: String,
}

#[derive(Serialize)]
pub struct FrontAction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weighted_clusters: Option<WeightedClusters<'a>>,
    pub timeout: String,
    pub retry_policy: RetryPolicy,
}

#[derive(Serialize)]
pub struct WeightedClusters<'a> {
    pub clusters: Vec<WeightedCluster<'a>>,
}

#[derive(Serialize)]
pub struct WeightedCluster<'a> {
    pub name: &'a str,
    pub weight: u32,
}

/// Retries within one client request: on the classified-failure marker header and on failures to
/// reach a backend listener; `previous_priorities` moves each retry to the next chain member.
#[derive(Serialize)]
pub struct RetryPolicy {
    pub retry_on: &'static str,
    pub num_retries: usize,
    pub per_try_timeout: &'static str,
    pub retriable_headers: [RetriableHeader; 1],
    pub retry_priority: RetryPriority,
    pub retry_back_off: BackOff,
}

#[derive(Serialize)]
pub struct RetriableHeader {
    pub name: &'static str,
    pub string_match: ExactMatch<'static>,
}

#[derive(Serialize)]
pub struct ExactMatch<'a> {
    pub exact: &'a str,
}

#[derive(Serialize)]
pub struct RetryPriority {
    pub name: &'static str,
    pub typed_config: PreviousPriorities,
}

#[derive(Serialize)]
pub struct PreviousPriorities {
    #[serde(rename = "@type")]
    pub type_: &'static str,
    pub update_frequency: u32,
}

#[derive(Serialize)]
pub struct BackOff {
    pub base_interval: &'static str,
    pub max_interval: &'static str,
}

impl RetryPolicy {
    pub fn failover(num_retries: usize, marker: &'static str) -> Self {
        RetryPolicy {
            retry_on: "retriable-headers,reset,connect-failure,refused-stream",
            num_retries,
            per_try_timeout: "0s",
            retriable_headers: [RetriableHeader {
                name: marker,
                string_match: ExactMatch { exact: "1" },
            }],
            retry_priority: RetryPriority {
                name: "envoy.retry_priorities.previous_priorities",
                typed_config: PreviousPriorities {
                    type_: "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    update_frequency: 1,
                },
            },
            retry_back_off: BackOff {
                base_interval: "0.001s",
                max_interval: "0.002s",
            },
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontMetadata<'a> {
    pub route: &'a str,
    /// The route's key, which the front Lua compares with the client's bearer token. It reaches the
    /// gateway only inside its xDS stream (mutual TLS) and Envoy's memory; nothing llmroute writes
    /// (ConfigMaps, logs, status, events) carries it.
    pub key: &'a str,
    pub models: &'a [String],
    pub passthrough: bool,
    /// Backend names of each failover chain, first tried first.
    pub chains: &'a [Vec<String>],
    /// The backends' prices and model mappings (`crate::usage::backends_tag`, JSON text): the
    /// usage log carries this value (and only this one of the route's metadata) to the sidecar,
    /// which counts cost and names the provider's model.
    pub backends: String,
    /// The OpenAI operations some backend of the route serves: the front answers the others.
    pub endpoints: &'a [&'static str],
    /// The operations the route opts in to beyond the default set, as `{ "files": 0, "images":
    /// 1000 }`: name (path segment below `/v1/`) → tokens charged per request. Left out when the
    /// route opts in to none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub operations: &'a BTreeMap<&'static str, u64>,
    /// Present (true) when a replica without a lease of the route's token budget refuses its
    /// requests (`onUnknownUsage: Deny`): the front Lua tells the admission filter.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lease_required: bool,
}

// ---- account listener routes ----

#[derive(Serialize)]
pub struct AccountRoute<'a> {
    pub name: String,
    /// Matched by the route header the front route sets, not by path: the Lua filter rewrites the
    /// path to the provider's, which makes Envoy match the route again.
    #[serde(rename = "match")]
    pub match_: HeaderMatch<'a>,
    pub request_headers_to_remove: [&'static str; 4],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_headers_to_add: Vec<HeaderToAdd<'a>>,
    /// Names the backend on the provider's answers (the Lua code names it on failures).
    pub response_headers_to_add: [HeaderToAdd<'a>; 1],
    pub route: AccountAction<'a>,
    pub metadata: LuaMetadata<AccountMetadata<'a>>,
    pub request_body_buffer_limit: u64,
}

#[derive(Serialize)]
pub struct HeaderMatch<'a> {
    pub prefix: &'static str,
    pub headers: [NamedExact<'a>; 1],
}

#[derive(Serialize)]
pub struct NamedExact<'a> {
    pub name: &'static str,
    pub string_match: ExactMatch<'a>,
}

#[derive(Serialize)]
pub struct AccountAction<'a> {
    pub cluster: &'a str,
    pub host_rewrite_literal: &'a str,
    /// The front route bounds the whole request; this bounds silence from this provider.
    pub timeout: &'static str,
    pub retry_policy: IdleOnly,
}

#[derive(Serialize)]
pub struct IdleOnly {
    pub num_retries: u32,
    pub per_try_idle_timeout: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountMetadata<'a> {
    pub route: &'a str,
    pub backend: &'a str,
    pub models: &'a BTreeMap<String, String>,
    pub passthrough: bool,
    /// ",Class,Class," (Lua finds ",<class>,").
    pub failover_on: String,
    /// Logical model → the provider model embeddings must be made with (see
    /// `RouteIr::embedding_family`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub embedding_family: &'a BTreeMap<String, String>,
    /// The backend has rate limits: the Lua names it for the backend admission filter.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub rate_limited: bool,
}

// ---- chain clusters ----

#[derive(Serialize)]
pub struct ChainCluster<'a> {
    #[serde(rename = "@type")]
    pub type_: &'static str,
    pub name: &'a str,
    pub alt_stat_name: String,
    pub connect_timeout: &'static str,
    pub lb_policy: &'static str,
    pub circuit_breakers: CircuitBreakers,
    pub cluster_type: AggregateType<'a>,
}

#[derive(Serialize)]
pub struct AggregateType<'a> {
    pub name: &'static str,
    pub typed_config: AggregateConfig<'a>,
}

#[derive(Serialize)]
pub struct AggregateConfig<'a> {
    #[serde(rename = "@type")]
    pub type_: &'static str,
    pub clusters: &'a [String],
}

/// Envoy's defaults (1024 requests, 3 concurrent retries) would turn failover under load into
/// overflow errors; the gateway is bounded by its clients' concurrency instead.
#[derive(Serialize)]
pub struct CircuitBreakers {
    pub thresholds: [Thresholds; 1],
}

#[derive(Serialize)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl CircuitBreakers {
    pub fn generous() -> Self {
        CircuitBreakers {
            thresholds: [Thresholds {
                max_connections: 100_000,
                max_pending_requests: 100_000,
                max_requests: 100_000,
                max_retries: 100_000,
            }],
        }
    }
}

impl<'a> ChainCluster<'a> {
    pub fn new(name: &'a str, accounts: &'a [String]) -> Self {
        ChainCluster {
            type_: CLUSTER_TYPE,
            name,
            alt_stat_name: stat_name(name),
            connect_timeout: "1s",
            lb_policy: "CLUSTER_PROVIDED",
            circuit_breakers: CircuitBreakers::generous(),
            cluster_type: AggregateType {
                name: "envoy.clusters.aggregate",
                typed_config: AggregateConfig {
                    type_: "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                    clusters: accounts,
                },
            },
        }
    }
}

/// The name a resource's stats carry: its name with the characters Envoy's stat names and tag
/// extraction treat as separators (`.`, `:`, `/`) replaced by `_`, so that Prometheus sees one metric
/// name with the resource in a label (`envoy_cluster_upstream_rq_retry{envoy_cluster_name=
/// "chain_chat"}`), not a metric name per resource.
pub fn stat_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for part in name.split("://") {
        if !out.is_empty() {
            out.push('_');
        }
        out.extend(
            part.chars()
                .map(|c| if matches!(c, '.' | ':' | '/') { '_' } else { c }),
        );
    }
    out.trim_end_matches('_').to_string()
}

#[cfg(test)]
mod front_metadata_tests {
    use std::collections::BTreeMap;

    fn metadata(operations: &BTreeMap<&'static str, u64>) -> serde_json::Value {
        serde_json::to_value(super::FrontMetadata {
            route: "r",
            key: "k",
            models: &[],
            passthrough: false,
            chains: &[],
            backends: String::new(),
            endpoints: &["chat/completions"],
            operations,
            lease_required: false,
        })
        .unwrap()
    }

    #[test]
    fn operations_are_an_object_of_charges_and_absent_when_none() {
        let ops = BTreeMap::from([("images", 1000), ("files", 0)]);
        assert_eq!(
            metadata(&ops)["operations"],
            serde_json::json!({ "files": 0, "images": 1000 })
        );
        assert!(
            metadata(&ops)
                .to_string()
                .contains(r#""operations":{"files":0,"images":1000}"#)
        );
        let none = metadata(&BTreeMap::new());
        assert!(none.get("operations").is_none(), "{none}");
    }
}

#[cfg(test)]
mod stat_name_tests {
    #[test]
    fn stat_names_have_no_separators() {
        assert_eq!(
            super::stat_name("account:openai:https://api.openai.com/v1:provider_k_api-key"),
            "account_openai_https_api_openai_com_v1_provider_k_api-key"
        );
        assert_eq!(super::stat_name("chain:chat.v2:a"), "chain_chat_v2_a");
        assert_eq!(
            super::stat_name("upstream:https:api.openai.com:443"),
            "upstream_https_api_openai_com_443"
        );
    }
}
