//! The intermediate model of one namespace's gateway: what each route serves, which backends it may
//! try in what order, and which upstream hosts and keys that needs. Built from validated LLMRoutes and
//! resolved inputs; rendered to Envoy files ([`super::envoy`]) and Kubernetes objects ([`super::objects`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{Backend, FailureClass, LLMRoute, SecretKeyRef, Strategy, duration_ms};
use crate::catalog::{self, PathStyle, Provider};
use crate::policy::order::RoutePlan;

/// The gateway of one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayIr {
    pub namespace: String,
    /// Programmed routes, sorted by name.
    pub routes: Vec<RouteIr>,
    /// Provider accounts (provider, base URL, key): one internal listener each, sorted by name.
    pub accounts: Vec<AccountIr>,
    /// Failover chains, deduplicated across routes, sorted by cluster name.
    pub chains: Vec<ChainIr>,
    /// Upstream provider hosts, deduplicated and sorted by cluster name.
    pub upstreams: Vec<UpstreamIr>,
    /// Provider keys the configuration references, sorted by entry.
    pub provider_keys: Vec<ProviderKeyIr>,
}

/// One route on the gateway (`/<route>/v1/...`).
#[derive(Clone, Debug, PartialEq)]
pub struct RouteIr {
    pub name: String,
    /// Entry of the route key in the gateway keys Secret.
    pub key_entry: String,
    /// Logical models the route serves (keys of every programmed backend's map, without `*`).
    pub models: Vec<String>,
    /// Whether some backend passes any model through (`*`).
    pub passthrough: bool,
    /// Backends the gateway may send to, sorted by name.
    pub backends: Vec<BackendIr>,
    /// The route's failover chains as (chain cluster, weight); one unless the strategy is Weighted.
    pub chains: Vec<(String, u32)>,
    /// The backend names of each chain, in `chains` order, first tried first.
    pub chain_backends: Vec<Vec<String>>,
    /// The number of backends one request may try: every programmed backend (the longest chain,
    /// plus backends parked by probe results).
    pub max_attempts: usize,
    pub request_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub failover_on: BTreeSet<FailureClass>,
    /// Why the route's budget admits no request now: the gateway answers 429 with it.
    pub over_budget: Option<String>,
    /// The route has a token budget with `onUnknownUsage: Deny`: a replica that holds no lease of
    /// it yet refuses its requests (with `Allow`, it admits them until its first lease).
    pub lease_required: bool,
    /// The OpenAI operations some programmed backend serves (`chat/completions`, `embeddings`...).
    pub endpoints: Vec<&'static str>,
    /// Per logical model, the provider model every embeddings request must be answered with
    /// (`spec.policy.embeddingFailover: SameModel`); empty with `AnyModel`.
    pub embedding_family: BTreeMap<String, String>,
    /// The OpenAI operations the route opts in to beyond the default set (`spec.operations`), by
    /// name (the path segment below `/v1/`, sorted), with the tokens each request is charged
    /// (`tokensPerRequest`, 0 when not given).
    pub operations: BTreeMap<&'static str, u64>,
}

/// An ordered list of provider accounts tried one after the other within one client request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChainIr {
    /// Envoy cluster name of the chain.
    pub cluster: String,
    /// Account names, first tried first.
    pub accounts: Vec<String>,
}

/// A backend of a route as the gateway programs it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendIr {
    pub name: String,
    /// The account (internal listener) serving it.
    pub account: String,
    /// Logical model → provider model (`spec.backends[].models` without `*`: see `passthrough`).
    pub models: BTreeMap<String, String>,
    pub passthrough: bool,
    /// Price per million input and output tokens (`spec.backends[].cost`), for the usage metrics.
    pub cost: Option<crate::api::Cost>,
    /// The backend has rate limits (`spec.backends[].rateLimit`): each attempt at it is admitted
    /// at the gateway replica's share of them.
    pub rate_limited: bool,
}

/// A provider account: one provider at one base URL with one key. It is one internal listener (and
/// the cluster pointing at it) shared by every route that uses it; what differs per route (model
/// map, failover classes) is in the per-route entries of its route configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountIr {
    /// Internal listener and cluster name.
    pub name: String,
    /// Short stable id, used in file names.
    pub id: String,
    pub provider: &'static Provider,
    /// Upstream cluster name.
    pub upstream: String,
    /// `Host` sent to the provider (with the port when not the scheme's default).
    pub authority: String,
    /// Path prefix of the provider's API, without trailing slash (e.g. `/v1`, `/api/paas/v4`, ``).
    pub base_path: String,
    pub path_style: PathStyle,
    pub api_version: Option<String>,
    /// Entry of the provider key in the gateway keys Secret (None: no key).
    pub key_entry: Option<String>,
}

/// An upstream host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UpstreamIr {
    pub cluster: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// A provider key: where it comes from and where the gateway finds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProviderKeyIr {
    pub entry: String,
    pub source: SecretKeyRef,
}

/// Entry name of a provider key in the gateway keys Secret. Secret names cannot contain `_`, so
/// `provider_<secret>_<key>` is unambiguous; overlong names are hashed.
pub fn provider_key_entry(source: &SecretKeyRef) -> String {
    let entry = format!("provider_{}_{}", source.name, source.key);
    if entry.len() <= 200 {
        entry
    } else {
        format!("provider_h{}", short_hash(&entry))
    }
}

/// Entry name of a route's key in the gateway keys Secret.
pub fn route_key_entry(route: &str) -> String {
    format!("route_{route}")
}

fn short_hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// A parsed base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl BaseUrl {
    /// Parses `http(s)://host[:port][/path]`; the schema has already checked the shape.
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} must start with http:// or https://"));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?} has an invalid port"))?,
            ),
            None => (hostport, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok(BaseUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }

    /// `Host` header value.
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Envoy cluster name of this upstream.
    pub fn cluster(&self) -> String {
        format!(
            "upstream:{}:{}:{}",
            if self.tls { "https" } else { "http" },
            self.host,
            self.port
        )
    }

    /// The URL again, normalised.
    pub fn to_url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.tls { "https" } else { "http" },
            self.authority(),
            self.path
        )
    }
}

/// The base URL a backend uses: its `endpoint`, else the catalog's.
pub fn backend_base_url(backend: &Backend, provider: &Provider) -> Result<BaseUrl, String> {
    let url = backend
        .endpoint
        .as_deref()
        .or(provider.base_url.as_deref())
        .ok_or_else(|| {
            format!(
                "provider {} has no catalog base URL: set endpoint",
                provider.id
            )
        })?;
    BaseUrl::parse(url)
}

/// The identity of an account: provider, base URL, key, API version, and an index that keeps two
/// backends of one route apart when they share the rest.
fn account_for(
    backend: &Backend,
    provider: &'static Provider,
    dup: usize,
) -> Result<AccountIr, String> {
    let base = backend_base_url(backend, provider)?;
    let key_entry = backend
        .credentials_secret_ref
        .as_ref()
        .map(provider_key_entry);
    let api_version = match provider.path_style {
        PathStyle::AzureDeployment => Some(
            backend
                .azure
                .as_ref()
                .map(|a| a.api_version.clone())
                .unwrap_or_else(|| crate::api::DEFAULT_AZURE_API_VERSION.to_string()),
        ),
        PathStyle::OpenAI => None,
    };
    let mut name = format!(
        "account:{}:{}:{}",
        provider.id,
        base.to_url(),
        key_entry.as_deref().unwrap_or("-")
    );
    if let Some(v) = &api_version {
        name.push_str(&format!(":{v}"));
    }
    if dup > 0 {
        name.push_str(&format!(":{dup}"));
    }
    Ok(AccountIr {
        id: short_hash(&name),
        name,
        provider,
        upstream: base.cluster(),
        authority: base.authority(),
        base_path: base.path.clone(),
        path_style: provider.path_style,
        api_version,
        key_entry,
    })
}

/// Name of a route's chain cluster. It is stable (the route, and for Weighted routes the backend
/// heading the chain, however many chains there are), so that reordering backends updates an
/// existing cluster in place and the route configuration does not change: a running Envoy never
/// sees a route naming a cluster it has not loaded yet.
fn chain_cluster(route: &str, head: Option<&str>) -> String {
    match head {
        None => format!("chain:{route}"),
        Some(head) => format!("chain:{route}:{head}"),
    }
}

/// A route's IR plus what it needs from the namespace: accounts, chains, keys and upstreams.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltRoute {
    pub route: RouteIr,
    pub accounts: Vec<AccountIr>,
    pub chains: Vec<ChainIr>,
    pub keys: Vec<ProviderKeyIr>,
    pub upstreams: Vec<UpstreamIr>,
}

/// The provider model each logical model's embeddings must come from: the mapping of the first
/// backend serving embeddings in `order` (the route's preference, by design) that maps it by name.
/// Empty when the route allows any model (`embeddingFailover: AnyModel`).
pub fn embedding_family(route: &LLMRoute, order: &[usize]) -> BTreeMap<String, String> {
    let mut family = BTreeMap::new();
    if route.spec.policy.embedding_failover == crate::api::EmbeddingFailover::AnyModel {
        return family;
    }
    for &i in order {
        let b = &route.spec.backends[i];
        let serves = catalog::provider(&b.provider)
            .is_some_and(|p| p.endpoints.contains(&crate::catalog::Endpoint::Embeddings));
        if !serves {
            continue;
        }
        for (logical, provider_model) in b.models.iter().filter(|(k, _)| k.as_str() != "*") {
            family
                .entry(logical.clone())
                .or_insert_with(|| provider_model.clone());
        }
    }
    family
}

/// The route's opted-in operations (`spec.operations`): name → tokens charged per request.
pub fn operations(route: &LLMRoute) -> BTreeMap<&'static str, u64> {
    route
        .spec
        .operations
        .iter()
        .map(|o| (o.name.as_str(), o.tokens_per_request.unwrap_or(0)))
        .collect()
}

/// Builds a route's IR from its plan. Backends not in any chain are not programmed.
pub fn build_route(route: &LLMRoute, plan: &RoutePlan) -> Result<BuiltRoute, String> {
    let name = kube::ResourceExt::name_any(route);
    let mut programmed: BTreeSet<usize> = plan.parked.iter().copied().collect();
    for (_, members) in &plan.chains {
        programmed.extend(members.iter().copied());
    }
    let mut backends = Vec::new();
    let mut accounts: BTreeMap<usize, AccountIr> = BTreeMap::new();
    let mut keys = Vec::new();
    let mut upstreams = Vec::new();
    for &i in &programmed {
        let b = &route.spec.backends[i];
        let provider = catalog::provider(&b.provider)
            .ok_or_else(|| format!("unknown provider {:?}", b.provider))?;
        let mut dup = 0;
        let account = loop {
            let candidate = account_for(b, provider, dup)?;
            if accounts.values().all(|a| a.name != candidate.name) {
                break candidate;
            }
            dup += 1;
        };
        if let Some(source) = &b.credentials_secret_ref {
            keys.push(ProviderKeyIr {
                entry: provider_key_entry(source),
                source: source.clone(),
            });
        }
        let base = backend_base_url(b, provider)?;
        upstreams.push(UpstreamIr {
            cluster: base.cluster(),
            host: base.host,
            port: base.port,
            tls: base.tls,
        });
        backends.push(BackendIr {
            name: b.name.clone(),
            account: account.name.clone(),
            models: b
                .models
                .iter()
                .filter(|(k, _)| k.as_str() != "*")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            passthrough: b.models.contains_key("*"),
            cost: b.cost.clone(),
            rate_limited: b
                .rate_limit
                .as_ref()
                .is_some_and(|l| l.requests_per_minute.is_some() || l.tokens_per_minute.is_some()),
        });
        accounts.insert(i, account);
    }
    backends.sort_by(|a, b| a.name.cmp(&b.name));
    let mut chains = Vec::new();
    let mut route_chains = Vec::new();
    let mut chain_backends = Vec::new();
    let weighted = route.spec.policy.strategy == Strategy::Weighted;
    let chain_of = |members: &[usize]| {
        let head = members.first().filter(|_| weighted);
        ChainIr {
            cluster: chain_cluster(&name, head.map(|&i| route.spec.backends[i].name.as_str())),
            accounts: members.iter().map(|i| accounts[i].name.clone()).collect(),
        }
    };
    for (weight, members) in &plan.chains {
        chain_backends.push(
            members
                .iter()
                .map(|&i| route.spec.backends[i].name.clone())
                .collect(),
        );
        let chain = chain_of(members);
        route_chains.push((chain.cluster.clone(), *weight));
        chains.push(chain);
    }
    if weighted && let Some((_, first)) = plan.chains.first() {
        // Every programmed backend of a Weighted route keeps a chain cluster headed by it, even
        // when it heads no chain now: a probe result that demotes or restores a head changes which
        // chains the route (RDS) names, and Envoy may load RDS before or after CDS; the clusters
        // named by either version must exist in both.
        for &i in &programmed {
            if plan.chains.iter().any(|(_, m)| m.first() == Some(&i)) {
                continue;
            }
            let mut members = vec![i];
            members.extend(first.iter().copied().filter(|&j| j != i));
            chains.push(chain_of(&members));
        }
    }
    let models: BTreeSet<String> = backends
        .iter()
        .flat_map(|b| b.models.keys().cloned())
        .collect();
    let timeouts = &route.spec.policy.timeouts;
    let route_ir = RouteIr {
        key_entry: route_key_entry(&name),
        models: models.into_iter().collect(),
        passthrough: backends.iter().any(|b| b.passthrough),
        backends,
        // Every programmed backend, parked ones included: the retry budget (in the route, RDS) must
        // not shrink when a probe takes a backend out of the chain (CDS), since Envoy may apply the
        // two files of one update in either order.
        max_attempts: programmed.len(),
        chains: route_chains,
        chain_backends,
        request_timeout_ms: duration_ms(&timeouts.request)?,
        idle_timeout_ms: duration_ms(&timeouts.idle)?,
        failover_on: route.spec.policy.failover_on.iter().copied().collect(),
        over_budget: None,
        lease_required: route.spec.policy.budget.as_ref().is_some_and(|b| {
            b.tokens.is_some() && b.on_unknown_usage == crate::api::UnknownUsage::Deny
        }),
        endpoints: {
            let served: BTreeSet<crate::catalog::Endpoint> = accounts
                .values()
                .flat_map(|a| a.provider.endpoints.iter().copied())
                .collect();
            served.into_iter().map(|e| e.path()).collect()
        },
        embedding_family: BTreeMap::new(),
        operations: operations(route),
        name,
    };
    Ok(BuiltRoute {
        route: route_ir,
        accounts: accounts.into_values().collect(),
        chains,
        keys,
        upstreams,
    })
}

/// Assembles the namespace's gateway from its programmed routes, deduplicating what they share.
pub fn build_gateway(namespace: &str, built: Vec<BuiltRoute>) -> GatewayIr {
    let mut upstreams = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut chains = BTreeSet::new();
    let mut accounts: BTreeMap<String, AccountIr> = BTreeMap::new();
    let mut routes = Vec::new();
    for b in built {
        upstreams.extend(b.upstreams);
        keys.extend(b.keys);
        chains.extend(b.chains);
        for a in b.accounts {
            accounts.entry(a.name.clone()).or_insert(a);
        }
        routes.push(b.route);
    }
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    GatewayIr {
        namespace: namespace.to_string(),
        routes,
        accounts: accounts.into_values().collect(),
        chains: chains.into_iter().collect(),
        upstreams: upstreams.into_iter().collect(),
        provider_keys: keys.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::order::order_by_strategy;

    #[test]
    fn base_urls_parse_and_normalise() {
        let u = BaseUrl::parse("https://open.bigmodel.cn/api/paas/v4/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "open.bigmodel.cn", 443, "/api/paas/v4")
        );
        assert_eq!(u.authority(), "open.bigmodel.cn");
        let u = BaseUrl::parse("http://127.0.0.1:8000/v1").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:8000");
        assert_eq!(u.cluster(), "upstream:http:127.0.0.1:8000");
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://h:99999").is_err());
    }

    #[test]
    fn key_entries_are_unambiguous() {
        let a = provider_key_entry(&SecretKeyRef {
            name: "a.b".into(),
            key: "c".into(),
        });
        let b = provider_key_entry(&SecretKeyRef {
            name: "a".into(),
            key: "b.c".into(),
        });
        assert_ne!(a, b);
        let long = provider_key_entry(&SecretKeyRef {
            name: "n".repeat(200),
            key: "k".into(),
        });
        assert!(long.len() < 64 && long.starts_with("provider_h"));
    }

    #[test]
    fn opted_in_operations_are_in_the_route_ir_sorted_with_their_charge() {
        let route = |operations: &str| -> LLMRoute {
            serde_yaml_ng::from_str(&format!(
                "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: r }}\n\
                 spec:\n  backends:\n    - {{ name: a, provider: openai, \
                 credentialsSecretRef: {{ name: k, key: x }}, models: {{ m: m }} }}\n{operations}"
            ))
            .unwrap()
        };
        let built = |r: &LLMRoute| build_route(r, &order_by_strategy(r, &[0])).unwrap().route;
        let r = route(
            "  operations:\n    - { name: vector_stores }\n    - { name: images, tokensPerRequest: 1000 }\n    - { name: files, tokensPerRequest: 0 }\n",
        );
        let ops = built(&r).operations;
        assert_eq!(
            ops.into_iter().collect::<Vec<_>>(),
            vec![("files", 0), ("images", 1000), ("vector_stores", 0)]
        );
        assert!(built(&route("")).operations.is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("1m30s").unwrap(), 90_000);
        assert_eq!(duration_ms("250ms").unwrap(), 250);
    }
}
