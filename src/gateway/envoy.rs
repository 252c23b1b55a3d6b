//! Gateway IR → Envoy 1.40 resources, delivered three ways from one description:
//!
//! - [`ads_config`]: what the operator's xDS server serves (delta ADS over mutual TLS), and
//!   [`ads_bootstrap`], the static bootstrap a gateway Pod starts from (it names the server);
//! - [`render_files`]: a bootstrap with file-based xDS and its files, for `llmroute render --out-dir`;
//! - [`render_static`]: the same gateway as one static bootstrap, for `envoy --mode validate`.
//!
//! Layout (see the README's architecture picture): the front listener `gateway` checks the route key and the
//! model, then routes `/<route>/v1/...` to a failover chain (an aggregate cluster retried with
//! `previous_priorities`). Each chain member is an internal listener per provider account (provider,
//! base URL, key) that injects the provider's key (`credential_injector`, the key an SDS secret),
//! maps the model for the route, rewrites path and Host, and classifies failures. Every attempt is a
//! fresh request into the next account's listener, so nothing of one provider leaks into another's
//! attempt.
//!
//! Keys: a provider key is a generic SDS secret (over the xDS stream; from a file offline) that
//! `credential_injector` sets in the provider's auth header; Envoy's config dumps redact secrets. A
//! route's key is in its front route's metadata, compared by the front Lua.
//!
//! Per-request cost (docs/benchmarks.md, "Where the gateway's time goes"): the front listener reads
//! the body once and passes the model on in `x-llmroute-model`, so an account listener buffers the
//! body only when it renames the model; the account route names the backend on answers and the Lua
//! code reads route metadata on responses only for failures. The hop into the internal listener
//! (a second HTTP/1 codec and HCM per attempt) is most of what the gateway adds over a plain Envoy;
//! per-account upstream HTTP filters on the chain's member clusters cannot replace it in Envoy 1.40:
//! behind an aggregate cluster, Envoy runs the aggregate cluster's upstream filters, not the
//! member's, and (as Envoy documents) local replies of upstream filters are not retried.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ir::{AccountIr, BackendIr, GatewayIr, RouteIr, UpstreamIr};
use super::keys::KeyMaterial;
use super::shapes;
use crate::catalog::{PathStyle, StreamUsage};
use crate::xds::api as xds_api;
use crate::xds::snapshot::{ResourceInput, RouteInput};

/// What the gateway listens on and trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyOptions {
    /// Port of the front listener.
    pub port: u16,
    /// Address of the front listener.
    pub address: String,
    /// Port of the admin interface (bound to 127.0.0.1 only).
    pub admin_port: u16,
    /// Port of the readiness/metrics listener (proxies `/ready` and `/stats/prometheus` of admin).
    pub health_port: u16,
    /// CA bundle (a file in the gateway's container) that providers' TLS certificates are verified
    /// against, unless the operator serves one (`--upstream-ca-file`).
    pub trusted_ca: String,
    /// File the access log goes to, which the Pod's sidecar follows to count token usage and
    /// prints to its stdout (`crate::usage::log`); empty: the access log goes to Envoy's stdout and
    /// no usage is counted.
    pub usage_log: String,
    /// File of llmroute's Envoy dynamic module that reads streamed answers' usage
    /// (`sse-usage/`, [`SSE_USAGE_MODULE_FILE`]); empty: streams' usage is not read.
    pub usage_module: String,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            port: 8080,
            address: "0.0.0.0".into(),
            admin_port: 9901,
            health_port: 19003,
            trusted_ca: "/etc/ssl/certs/ca-certificates.crt".into(),
            // The operator's `--gateway-usage-log` gives the Pod's file
            // (`objects::USAGE_LOG_FILE`); a gateway run elsewhere logs to stdout.
            usage_log: String::new(),
            // The operator's `--gateway-usage-module` gives the Pod's copy
            // (`objects::USAGE_MODULE_FILE`).
            usage_module: String::new(),
        }
    }
}

/// How a gateway reaches the operator's xDS server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsClient {
    /// `host:port` of the server (the operator's xDS Service).
    pub address: String,
    /// Directory of the gateway's client certificate (`tls.crt`, `tls.key`) and the CA (`ca.crt`)
    /// that signed the server's.
    pub cert_dir: String,
}

impl Default for XdsClient {
    fn default() -> Self {
        XdsClient {
            address: "llmroute-xds.llmroute-system.svc:18000".into(),
            cert_dir: "/etc/llmroute/xds".into(),
        }
    }
}

impl XdsClient {
    fn host_port(&self) -> (String, u16) {
        match self.address.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse().unwrap_or(18000),
            ),
            None => (self.address.clone(), 18000),
        }
    }

    /// The host name the server's certificate must carry.
    pub fn host(&self) -> String {
        self.host_port().0
    }
}

/// How a gateway gets the resources outside its bootstrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery<'a> {
    /// From the operator's xDS server.
    Ads,
    /// From files of `dir`; keys from files of `keys_dir`.
    Files { dir: &'a str, keys_dir: &'a str },
    /// Inline in one static bootstrap; keys from files of `keys_dir`.
    Static { keys_dir: &'a str },
}

/// File names of an offline gateway directory (`llmroute render --out-dir`), and of the bootstrap
/// in the gateway's ConfigMap.
pub const BOOTSTRAP: &str = "bootstrap.yaml";
// xDS files are JSON (which Envoy reads by extension).
pub const LISTENERS: &str = "listeners.json";
pub const CLUSTERS: &str = "clusters.json";
pub const ROUTES: &str = "routes.json";
/// Name of the front listener and its route configuration.
pub const FRONT: &str = "gateway";

/// Request header naming the route, set by the front route for the account listeners.
pub const ROUTE_HEADER: &str = "x-llmroute-route";
/// Request header with the model the front listener read from the body, for the account listeners
/// (which then read the body only to rename the model in it).
pub const MODEL_HEADER: &str = "x-llmroute-model";
/// Request header with what a request may cost in tokens, from the request module to the
/// admission filters (the front's, and each attempt's at a backend with rate limits).
const ESTIMATE_HEADER: &str = "x-llmroute-estimate";
/// Request header naming a backend with rate limits (`<route>/<backend>`), from the backend Lua
/// to the backend admission filter.
const RATE_HEADER: &str = "x-llmroute-rate";
/// Response header naming the backend that answered.
pub const BACKEND_HEADER: &str = "x-llmroute-backend";

/// Largest request body the gateway reads (the request module refuses a larger one, 413) and
/// buffers for retries.
pub const REQUEST_BUFFER_LIMIT: u64 = 8 * 1024 * 1024;

/// What the front route lets Envoy buffer: more than the request module reads, so that the
/// module, not Envoy's plain-text 413, answers a body over [`REQUEST_BUFFER_LIMIT`] (Envoy's
/// last read may take the buffer past the module's limit before the module sees it).
const FRONT_REQUEST_BUFFER_LIMIT: u64 = REQUEST_BUFFER_LIMIT + 1024 * 1024;

const LUA_COMMON: &str = include_str!("lua/common.lua");
const LUA_FRONT: &str = include_str!("lua/front.lua");
const LUA_BACKEND: &str = include_str!("lua/backend.lua");

/// RDS file of an account's listener.
pub fn account_routes_file(account: &AccountIr) -> String {
    format!("account.{}.{}.json", account.provider.id, account.id)
}

/// A route of the front listener: a route's entry, or the catch-all.
#[derive(serde::Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // one catch-all among the route entries
enum FrontEntry<'a> {
    Route(shapes::FrontRoute<'a>),
    Other(Value),
}

/// A cluster: a route's failover chain, or another one.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ClusterEntry<'a> {
    Chain(shapes::ChainCluster<'a>),
    Other(Value),
}

impl ClusterEntry<'_> {
    fn name(&self) -> &str {
        match self {
            ClusterEntry::Chain(c) => c.name,
            ClusterEntry::Other(v) => v["name"].as_str().unwrap_or_default(),
        }
    }
}

/// Name of the SDS secret with the CA bundle providers are verified against, when the operator
/// serves one.
pub const UPSTREAM_CA_SECRET: &str = "llmroute-upstream-ca";

/// Envoy resources of a gateway, before they are delivered.
struct Resources<'a> {
    listeners: Vec<Value>,
    clusters: Vec<ClusterEntry<'a>>,
    front: shapes::RouteConfig<'a, FrontEntry<'a>>,
    /// (file, RouteConfiguration) of each account listener.
    accounts: Vec<(String, shapes::RouteConfig<'a, shapes::AccountRoute<'a>>)>,
    /// Secret resources: provider keys (and the upstream CA bundle).
    secrets: Vec<Value>,
}

fn resources<'a>(
    gw: &'a GatewayIr,
    opts: &EnvoyOptions,
    delivery: Delivery,
    keys: &'a KeyMaterial,
    upstream_ca: Option<&str>,
) -> Resources<'a> {
    let mut listeners = vec![front_listener(opts, delivery)];
    let mut clusters: Vec<ClusterEntry> = Vec::new();
    // Which (route, backend) pairs each account serves.
    let mut served: BTreeMap<&str, Vec<(&RouteIr, &BackendIr)>> = BTreeMap::new();
    for route in &gw.routes {
        for backend in &route.backends {
            served
                .entry(backend.account.as_str())
                .or_default()
                .push((route, backend));
        }
    }
    let mut accounts = Vec::new();
    for account in &gw.accounts {
        listeners.push(account_listener(opts, account, delivery));
        clusters.push(ClusterEntry::Other(internal_cluster(&account.name)));
        let entries = served
            .get(account.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        accounts.push((
            account_routes_file(account),
            account_route_config(account, entries),
        ));
    }
    clusters.extend(
        gw.chains
            .iter()
            .map(|c| ClusterEntry::Chain(shapes::ChainCluster::new(&c.cluster, &c.accounts))),
    );
    let served_ca = upstream_ca.filter(|_| delivery == Delivery::Ads);
    clusters.extend(
        gw.upstreams
            .iter()
            .map(|u| ClusterEntry::Other(upstream_cluster(u, opts, served_ca.is_some()))),
    );
    clusters.sort_by(|a, b| a.name().cmp(b.name()));
    for c in &mut clusters {
        if let ClusterEntry::Other(v) = c {
            *v = typed("envoy.config.cluster.v3.Cluster", std::mem::take(v));
        }
    }
    let mut secrets: Vec<Value> = gw
        .provider_keys
        .iter()
        .map(|k| provider_secret(&k.entry, keys, delivery))
        .collect();
    if let Some(pem) = served_ca {
        secrets.push(typed(
            "envoy.extensions.transport_sockets.tls.v3.Secret",
            json!({ "name": UPSTREAM_CA_SECRET, "validation_context": { "trusted_ca": { "inline_string": pem } } }),
        ));
    }
    Resources {
        listeners: listeners
            .into_iter()
            .map(|l| typed("envoy.config.listener.v3.Listener", l))
            .collect(),
        clusters,
        front: front_route_config(gw, keys),
        accounts,
        secrets,
    }
}

/// A provider key as a generic secret: its value over xDS, or the file holding it offline.
fn provider_secret(entry: &str, keys: &KeyMaterial, delivery: Delivery) -> Value {
    let secret = match delivery {
        Delivery::Ads => {
            let value = keys
                .provider_keys
                .get(entry)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let value = super::keys::trim(value);
            json!({ "inline_bytes": base64::engine::general_purpose::STANDARD.encode(value) })
        }
        Delivery::Files { keys_dir, .. } | Delivery::Static { keys_dir } => {
            json!({ "filename": format!("{keys_dir}/{entry}") })
        }
    };
    typed(
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        json!({ "name": entry, "generic_secret": { "secret": secret } }),
    )
}

fn file_json<T: serde::Serialize>(resources: &[T]) -> String {
    #[derive(serde::Serialize)]
    struct Discovery<'a, T: serde::Serialize> {
        resources: &'a [T],
    }
    let mut s = serde_json::to_string(&Discovery { resources }).expect("resources serialize");
    s.push('\n');
    s
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("resources serialize")
}

/// A namespace's gateway as the xDS server serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdsConfig {
    pub resources: Vec<ResourceInput>,
    /// Per programmed route: what it lives in (`generation` is left for the caller to set).
    pub routes: Vec<RouteInput>,
}

/// The resources of `gw` for the xDS server, with the keys of `keys` and, when given, the CA bundle
/// providers are verified against. Deterministic.
pub fn ads_config(
    gw: &GatewayIr,
    opts: &EnvoyOptions,
    keys: &KeyMaterial,
    upstream_ca: Option<&str>,
) -> AdsConfig {
    let r = resources(gw, opts, Delivery::Ads, keys, upstream_ca);
    let mut resources = Vec::new();
    let mut add = |type_url: &'static str, mut v: Value| {
        // The type is the resource's (xDS carries it); the JSON is the message's fields.
        if let Value::Object(map) = &mut v {
            map.remove("@type");
        }
        let name = v["name"].as_str().unwrap_or_default().to_string();
        resources.push(ResourceInput {
            type_url,
            name,
            json: v,
        });
    };
    for l in r.listeners {
        add(xds_api::LISTENER, l);
    }
    for c in &r.clusters {
        add(xds_api::CLUSTER, to_value(c));
    }
    add(xds_api::ROUTE, to_value(&r.front));
    for (_, c) in &r.accounts {
        add(xds_api::ROUTE, to_value(c));
    }
    for s in r.secrets {
        add(xds_api::SECRET, s);
    }
    AdsConfig {
        resources,
        routes: gw
            .routes
            .iter()
            .map(|route| route_input(gw, route, keys))
            .collect(),
    }
}

/// What a route lives in, and a fingerprint of its own part of the configuration. The front
/// listener is every route's: a replica that rejects it (its port taken, say) serves none of them.
fn route_input(gw: &GatewayIr, route: &RouteIr, keys: &KeyMaterial) -> RouteInput {
    let mut deps: Vec<(&'static str, String)> = vec![
        (xds_api::LISTENER, FRONT.to_string()),
        (xds_api::ROUTE, FRONT.to_string()),
    ];
    let mut hash = Sha256::new();
    hash.update(format!("{route:?}"));
    hash.update(
        keys.route_keys
            .get(&route.name)
            .map(String::as_str)
            .unwrap_or_default(),
    );
    for (chain, _) in &route.chains {
        deps.push((xds_api::CLUSTER, chain.clone()));
    }
    for b in &route.backends {
        let Some(account) = gw.accounts.iter().find(|a| a.name == b.account) else {
            continue;
        };
        hash.update(format!("{account:?}"));
        deps.push((xds_api::LISTENER, account.name.clone()));
        deps.push((xds_api::CLUSTER, account.name.clone()));
        deps.push((xds_api::ROUTE, account.name.clone()));
        deps.push((xds_api::CLUSTER, account.upstream.clone()));
        if let Some(entry) = &account.key_entry {
            hash.update(
                keys.provider_keys
                    .get(entry)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
            deps.push((xds_api::SECRET, entry.clone()));
        }
    }
    deps.sort();
    deps.dedup();
    RouteInput {
        name: route.name.clone(),
        generation: None,
        fingerprint: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        deps,
    }
}

/// The files of an offline gateway in `dir` (bootstrap with file-based xDS, its resource files and
/// one SDS file per provider key); the keys are read from files of `keys_dir`. Deterministic.
pub fn render_files(
    gw: &GatewayIr,
    opts: &EnvoyOptions,
    dir: &str,
    keys_dir: &str,
    keys: &KeyMaterial,
) -> BTreeMap<String, String> {
    let delivery = Delivery::Files { dir, keys_dir };
    let r = resources(gw, opts, delivery, keys, None);
    let mut files = BTreeMap::new();
    files.insert(BOOTSTRAP.to_string(), to_yaml(&files_bootstrap(opts, dir)));
    files.insert(LISTENERS.to_string(), file_json(&r.listeners));
    files.insert(CLUSTERS.to_string(), file_json(&r.clusters));
    files.insert(
        ROUTES.to_string(),
        file_json(std::slice::from_ref(&r.front)),
    );
    for (file, config) in &r.accounts {
        files.insert(file.clone(), file_json(std::slice::from_ref(config)));
    }
    for secret in &r.secrets {
        let entry = secret["name"].as_str().unwrap_or_default();
        files.insert(secret_file(entry), file_json(std::slice::from_ref(secret)));
    }
    files
}

/// SDS file of a provider key in an offline gateway directory.
fn secret_file(entry: &str) -> String {
    format!("secret.{entry}.json")
}

/// The same gateway as one static bootstrap (route configurations and secrets inlined), for
/// `envoy --mode validate`, which checks a bootstrap but does not load dynamic resources.
pub fn render_static(
    gw: &GatewayIr,
    opts: &EnvoyOptions,
    keys_dir: &str,
    keys: &KeyMaterial,
) -> String {
    let r = resources(gw, opts, Delivery::Static { keys_dir }, keys, None);
    let mut routes: BTreeMap<String, Value> = BTreeMap::new();
    for c in std::iter::once(to_value(&r.front)).chain(r.accounts.iter().map(|(_, c)| to_value(c)))
    {
        routes.insert(c["name"].as_str().unwrap_or_default().to_string(), c);
    }
    let untyped = |mut v: Value| {
        v.as_object_mut()
            .expect("resources are objects")
            .remove("@type");
        v
    };
    let mut listeners: Vec<Value> = r.listeners.into_iter().map(untyped).collect();
    for listener in &mut listeners {
        inline_discovery(listener, &routes);
    }
    let mut boot = base_bootstrap(
        opts,
        json!({ "id": "llmroute-gateway", "cluster": "llmroute-gateway" }),
    );
    let statics = &mut boot["static_resources"];
    statics["listeners"]
        .as_array_mut()
        .expect("listeners")
        .extend(listeners);
    statics["clusters"]
        .as_array_mut()
        .expect("clusters")
        .extend(r.clusters.iter().map(|c| untyped(to_value(c))));
    statics["secrets"] = Value::Array(r.secrets.into_iter().map(untyped).collect());
    to_yaml(&boot)
}

/// Replaces `rds` by the inline route configuration.
fn inline_discovery(v: &mut Value, routes: &BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            if let Some(rds) = map.remove("rds") {
                let name = rds["route_config_name"].as_str().unwrap_or_default();
                let mut config = routes
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| json!({ "name": name }));
                config
                    .as_object_mut()
                    .expect("route config is an object")
                    .remove("@type");
                map.insert("route_config".into(), config);
            }
            for child in map.values_mut() {
                inline_discovery(child, routes);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| inline_discovery(i, routes)),
        _ => {}
    }
}

fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).expect("JSON values serialize to YAML")
}

fn ads_source() -> Value {
    json!({ "ads": {}, "resource_api_version": "V3" })
}

/// Where a resource delivered outside the bootstrap comes from.
fn config_source(delivery: Delivery, file: &str) -> Value {
    match delivery {
        Delivery::Ads | Delivery::Static { .. } => ads_source(),
        Delivery::Files { dir, .. } => json!({
            "path_config_source": {
                "path": format!("{dir}/{file}"),
                "watched_directory": { "path": dir },
            },
            "resource_api_version": "V3",
        }),
    }
}

fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

fn typed(type_name: &str, mut body: Value) -> Value {
    body["@type"] = json!(format!("type.googleapis.com/{type_name}"));
    body
}

fn lua_filter(source: &str) -> Value {
    json!({
        "name": "envoy.filters.http.lua",
        "typed_config": typed("envoy.extensions.filters.http.lua.v3.Lua", json!({
            "default_source_code": { "inline_string": format!("{LUA_COMMON}\n{source}") },
        })),
    })
}

fn router_filter() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", json!({
            "suppress_envoy_headers": true,
        })),
    })
}

/// What every bootstrap has: node, admin, the internal listener extension, the overload manager,
/// the health listener and the admin cluster.
fn base_bootstrap(opts: &EnvoyOptions, node: Value) -> Value {
    json!({
        "node": node,
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port } },
        },
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": typed("envoy.extensions.bootstrap.internal_listener.v3.InternalListener", json!({})),
        }],
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    json!({ "max_active_downstream_connections": 100000 }),
                ),
            }],
        },
        "static_resources": {
            "listeners": [health_listener(opts)],
            "clusters": [static_cluster("admin", "127.0.0.1", opts.admin_port)],
        },
    })
}

fn static_cluster(name: &str, host: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": if host.parse::<std::net::IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port },
            } } }] }],
        },
    })
}

fn files_bootstrap(opts: &EnvoyOptions, dir: &str) -> Value {
    let mut boot = base_bootstrap(
        opts,
        json!({ "id": "llmroute-gateway", "cluster": "llmroute-gateway" }),
    );
    boot["dynamic_resources"] = json!({
        "lds_config": config_source(Delivery::Files { dir, keys_dir: "" }, LISTENERS),
        "cds_config": config_source(Delivery::Files { dir, keys_dir: "" }, CLUSTERS),
    });
    boot
}

/// Name of the bootstrap's cluster of the xDS server.
pub const XDS_CLUSTER: &str = "llmroute-xds";

/// The bootstrap of a gateway Pod of `namespace`: everything comes from the operator's xDS server
/// (delta ADS, HTTP/2, mutual TLS with the namespace's client certificate). Envoy is not ready
/// until it has its first configuration (`initial_fetch_timeout: 0s`), and keeps serving the last
/// one it accepted while the server is away. The node id is the Pod's name (`--service-node`).
pub fn ads_bootstrap(opts: &EnvoyOptions, xds: &XdsClient, namespace: &str) -> String {
    let mut boot = base_bootstrap(
        opts,
        json!({
            "cluster": "llmroute-gateway",
            "metadata": { crate::xds::server::NAMESPACE_METADATA: namespace },
        }),
    );
    let mut initial = ads_source();
    initial["initial_fetch_timeout"] = json!("0s");
    boot["dynamic_resources"] = json!({
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }],
        },
        "lds_config": initial.clone(),
        "cds_config": initial,
    });
    let (host, port) = xds.host_port();
    let mut cluster = static_cluster(XDS_CLUSTER, &host, port);
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    cluster["connect_timeout"] = json!("5s");
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            json!({ "explicit_http_config": { "http2_protocol_options": {
                // A replaced or lost server is noticed within seconds, not at the next TCP timeout.
                "connection_keepalive": { "interval": "10s", "timeout": "5s" },
            } } }),
        ),
    });
    let dir = &xds.cert_dir;
    let mut tls = json!({
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{
                "certificate_chain": { "filename": format!("{dir}/tls.crt") },
                "private_key": { "filename": format!("{dir}/tls.key") },
            }],
            "validation_context": {
                "trusted_ca": { "filename": format!("{dir}/ca.crt") },
                "match_typed_subject_alt_names": [{
                    "san_type": if is_ip { "IP_ADDRESS" } else { "DNS" },
                    "matcher": { "exact": host },
                }],
            },
        },
    });
    if !is_ip {
        tls["sni"] = json!(host);
    }
    cluster["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", tls),
    });
    boot["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .push(cluster);
    to_yaml(&boot)
}

/// Exposes only `/ready` and `/stats/prometheus` of the admin interface, for kubelet probes and
/// Prometheus; admin itself stays on localhost.
fn health_listener(opts: &EnvoyOptions) -> Value {
    let route = |path: &str| json!({ "match": { "path": path }, "route": { "cluster": "admin" } });
    json!({
        "name": "health",
        "address": { "socket_address": { "address": opts.address, "port_value": opts.health_port } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", json!({
                "stat_prefix": "health",
                "route_config": {
                    "name": "health",
                    "virtual_hosts": [{
                        "name": "health",
                        "domains": ["*"],
                        "routes": [route("/ready"), route("/stats/prometheus")],
                    }],
                },
                "http_filters": [router_filter()],
            })),
        }] }],
    })
}

/// Access log of the front listener: one JSON line per request, no header that could carry a key
/// (`crate::usage::log::format`). With a usage log, the lines go to that file (with the route's
/// prices) instead of stdout: the Pod's sidecar counts their token usage and prints them to its own
/// stdout, so a request is logged once and counted from the same line.
fn access_log(opts: &EnvoyOptions) -> Value {
    if opts.usage_log.is_empty() {
        return json!([{
            "name": "envoy.access_loggers.stdout",
            "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", json!({
                "log_format": { "json_format": crate::usage::log::format() },
            })),
        }]);
    }
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": typed("envoy.extensions.access_loggers.file.v3.FileAccessLog", json!({
            "path": opts.usage_log,
            "log_format": { "json_format": crate::usage::log::format_with_backends() },
        })),
    }])
}

/// Where a streamed answer's usage object is (whole answers: `lua/front.lua`, same key):
/// OpenAI-shaped chunks carry `usage` at the top (the last chunk with
/// `stream_options.include_usage`; some providers in every chunk, as running totals: the last
/// wins); a streamed response of the Responses API carries it under `response` in its
/// `response.completed` event. It goes on whole, as the JSON text the provider sent, into the
/// `llmroute` dynamic metadata key `usage`: the sidecar reads the counts
/// (`crate::usage::Usage::of_provider`).
/// Nothing else is read from a stream, the model it names included: a value written from the first
/// event delays the stream's first byte (about 0.07 ms, docs/benchmarks.md), and the sidecar knows
/// the model the provider was asked for from the route's backends.
///
/// Usage of a streamed answer: the server-sent event that carries it (the last chunk with OpenAI's
/// `stream_options.include_usage`, the finish chunk with some providers), read as the events pass
/// by llmroute's Envoy dynamic module (`sse-usage/`, loaded from `opts.usage_module`), an event
/// split across reads included; nothing is held back, copied or changed. It reads the objects
/// named above (`sse-usage/src/scan.rs` and its tests) into [`crate::usage::log::METADATA_NAMESPACE`] key `usage`.
///
/// It replaced Envoy's `sse_to_metadata` filter with the JSON content parser, which built a JSON
/// object of every event: about 0.06 ms of each stream's first byte (docs/benchmarks.md, runs 10-12).
fn usage_from_sse(opts: &EnvoyOptions) -> Option<Value> {
    module_filter(opts, SSE_USAGE_FILTER, "")
}

/// The request checker (the same module's `request` filter, first on the front listener): the
/// body of each chat or text completion, embeddings or responses request parsed by a JSON parser,
/// refused when it is not one unambiguous JSON object with a string model, and passed on in one
/// canonical form, every stream asking for its usage (`sse-usage/src/request.rs`,
/// docs/design/request-checking.md). Its configuration is the largest body it reads, in bytes.
fn request_checker(opts: &EnvoyOptions) -> Option<Value> {
    module_filter(opts, REQUEST_FILTER, &REQUEST_BUFFER_LIMIT.to_string())
}

/// Admission against leased budgets (the same module's `admission` filter, after the front Lua:
/// only requests with their route's key reserve): a request of a route with a token budget is
/// forwarded only while this Envoy's reservations fit the grant the operator leased it, else
/// answered 429 (`sse-usage/src/admission.rs`, docs/design/usage.md). Its configuration is the
/// directory it shares with the sidecar (the usage log's); none without a usage log.
fn admission(opts: &EnvoyOptions) -> Option<Value> {
    module_filter(opts, ADMISSION_FILTER, usage_dir(opts)?)
}

/// The directory of the usage log, which the module's admission filters share with the sidecar.
fn usage_dir(opts: &EnvoyOptions) -> Option<&str> {
    let dir = std::path::Path::new(&opts.usage_log).parent()?.to_str()?;
    (!opts.usage_log.is_empty() && !dir.is_empty()).then_some(dir)
}

/// Admission of each attempt at a backend's rate limits (the module's `backend_admission` filter,
/// after the backend Lua, which names a backend with limits in [`RATE_HEADER`]): over the
/// replica's share of them, the attempt is answered 429 `RateLimited` and the front route moves
/// on to the next backend. Its configuration is the directory shared with the sidecar, as the
/// front's; none without a usage log.
fn backend_admission(opts: &EnvoyOptions) -> Option<Value> {
    module_filter(opts, BACKEND_ADMISSION_FILTER, usage_dir(opts)?)
}

/// A filter of llmroute's module; none without a module (`usage_module` empty).
fn module_filter(opts: &EnvoyOptions, name: &str, config: &str) -> Option<Value> {
    (!opts.usage_module.is_empty()).then(|| {
        let mut module = json!({
            "dynamic_module_config": {
                "module": { "local": { "filename": opts.usage_module } },
                // Loaded once for the process: listener updates do not reload it.
                "do_not_close": true,
            },
            "filter_name": name,
        });
        if !config.is_empty() {
            module["filter_config"] = typed("google.protobuf.StringValue", json!({ "value": config }));
        }
        json!({
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": typed("envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter", module),
        })
    })
}

/// The module's file name (`sse-usage/`'s library) and the names its filters are configured by.
pub const SSE_USAGE_MODULE_FILE: &str = "libllmroute_sse_usage.so";
const SSE_USAGE_FILTER: &str = "sse_usage";
const REQUEST_FILTER: &str = "request";
const ADMISSION_FILTER: &str = "admission";
const BACKEND_ADMISSION_FILTER: &str = "backend_admission";

/// How much of a request or an answer the front listener may hold: the request module reads
/// request bodies whole (up to [`REQUEST_BUFFER_LIMIT`]: this leaves room for Envoy's last read
/// past it, so that the module answers 413 in OpenAI's shape), the Lua filter holds whole JSON
/// answers (their usage).
const FRONT_BUFFER_LIMIT_BYTES: u32 = FRONT_REQUEST_BUFFER_LIMIT as u32;

/// The front Lua's constants: whether the request module checks requests (without it, none is
/// passed on to a provider), and what it answers then.
fn front_lua_prelude(opts: &EnvoyOptions) -> String {
    format!(
        "local REQUEST_MODULE = {}\nlocal MODULE_MISSING = {}\n",
        !opts.usage_module.is_empty(),
        lua_string(
            "This llmroute gateway runs without its request module (the operator's --gateway-usage-module is \
             empty): requests are refused rather than passed on unchecked."
        )
    )
}

/// The front listener's HTTP filters. The request checker runs first, before the Lua reads its
/// verdict. The encode path runs them in reverse: the stream usage reader sees the provider's
/// bytes (and hides the usage chunk the client did not ask for) before the Lua filter. The Lua
/// filter reads the usage of whole answers itself (lua/front.lua).
fn front_filters(opts: &EnvoyOptions) -> Vec<Value> {
    [
        request_checker(opts),
        Some(lua_filter(&format!(
            "{}{LUA_FRONT}",
            front_lua_prelude(opts)
        ))),
        admission(opts),
        usage_from_sse(opts),
        Some(router_filter()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn front_listener(opts: &EnvoyOptions, delivery: Delivery) -> Value {
    json!({
        "name": FRONT,
        "address": { "socket_address": { "address": opts.address, "port_value": opts.port } },
        "per_connection_buffer_limit_bytes": FRONT_BUFFER_LIMIT_BYTES,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", json!({
                "stat_prefix": FRONT,
                "codec_type": "AUTO",
                "rds": { "route_config_name": FRONT, "config_source": config_source(delivery, ROUTES) },
                "http_filters": front_filters(opts),
                "access_log": access_log(opts),
                // Paths are normalised before any filter or route reads them (RFC 3986 dot
                // segments, `%2e` included; `//`); an encoded slash or backslash is refused: no
                // path reaches another operation at the provider than the one checked.
                "normalize_path": true,
                "merge_slashes": true,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                // Route timeouts bound requests; streams may legitimately stay open for minutes.
                "stream_idle_timeout": "0s",
            })),
        }] }],
    })
}

/// A Lua string literal.
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\{}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether the gateway asks this account's provider for a stream's usage: where the catalog says
/// it reports it when asked, and on Azure only from api-version 2024-08-01 (2023-05-15 rejects
/// `stream_options`; src/catalog/providers.yaml).
fn asks_stream_usage(account: &AccountIr) -> bool {
    account.provider.stream_usage == StreamUsage::IncludeUsage
        && account
            .api_version
            .as_deref()
            .is_none_or(|v| v.get(..10).is_some_and(|date| date >= "2024-08-01"))
}

/// The account's constants for the backend Lua code: base path, path style and the provider's
/// classification rules from the catalog.
fn account_lua_prelude(account: &AccountIr) -> String {
    let rules: Vec<String> = account
        .provider
        .error_rules()
        .map(|r| {
            let matcher = r
                .body_contains
                .as_deref()
                .map(|m| format!(", match = {}", lua_string(m)))
                .unwrap_or_default();
            format!(
                "  {{ status = {}{matcher}, class = {} }},",
                r.status,
                lua_string(r.class.as_str())
            )
        })
        .collect();
    format!(
        "-- Provider account {} (catalog entry {}).\nlocal PROVIDER = {}\nlocal BASE_PATH = {}\nlocal AZURE = {}\nlocal API_VERSION = {}\nlocal STREAM_USAGE = {}\nlocal ENDPOINTS = {{ {} }}\nlocal RULES = {{\n{}\n}}\n",
        account.name,
        account.provider.id,
        lua_string(&account.provider.name),
        lua_string(&account.base_path),
        matches!(account.path_style, PathStyle::AzureDeployment),
        lua_string(account.api_version.as_deref().unwrap_or_default()),
        asks_stream_usage(account),
        account
            .provider
            .endpoints
            .iter()
            .map(|e| format!("[{}] = true", lua_string(e.path())))
            .collect::<Vec<_>>()
            .join(", "),
        rules.join("\n")
    )
}

/// Sets the account's provider key in the provider's auth header (replacing anything of that name):
/// a generic SDS secret named by the key's entry.
fn credential_filter(account: &AccountIr, entry: &str, delivery: Delivery) -> Value {
    let mut credential = json!({ "name": entry });
    match delivery {
        Delivery::Ads => credential["sds_config"] = ads_source(),
        Delivery::Files { dir, .. } => {
            credential["sds_config"] = json!({
                "path_config_source": {
                    "path": format!("{dir}/{}", secret_file(entry)),
                    "watched_directory": { "path": dir },
                },
                "resource_api_version": "V3",
            })
        }
        // A static secret of the bootstrap, by name.
        Delivery::Static { .. } => {}
    }
    let mut generic = json!({ "credential": credential, "header": account.provider.auth.header });
    if !account.provider.auth.prefix.is_empty() {
        generic["header_value_prefix"] = json!(account.provider.auth.prefix);
    }
    json!({
        "name": "envoy.filters.http.credential_injector",
        "typed_config": typed("envoy.extensions.filters.http.credential_injector.v3.CredentialInjector", json!({
            "overwrite": true,
            "credential": {
                "name": "envoy.http.injected_credentials.generic",
                "typed_config": typed("envoy.extensions.http.injected_credentials.generic.v3.Generic", generic),
            },
        })),
    })
}

fn account_listener(opts: &EnvoyOptions, account: &AccountIr, delivery: Delivery) -> Value {
    let mut filters = vec![lua_filter(&format!(
        "{}\n{LUA_BACKEND}",
        account_lua_prelude(account)
    ))];
    filters.extend(backend_admission(opts));
    if let Some(entry) = &account.key_entry {
        filters.push(credential_filter(account, entry, delivery));
    }
    filters.push(router_filter());
    json!({
        "name": account.name,
        "stat_prefix": shapes::stat_name(&account.name),
        "internal_listener": {},
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", json!({
                // One metric name for all accounts, the account in the prefix label.
                "stat_prefix": shapes::stat_name(&account.name),
                "rds": { "route_config_name": account.name, "config_source": config_source(delivery, &account_routes_file(account)) },
                "http_filters": filters,
                "stream_idle_timeout": "0s",
                // Local replies for failures that never reached the provider carry their class.
                "local_reply_config": { "mappers": [
                    local_failure(&["UF", "UH", "URX", "UC", "UR", "NR", "DF"], "Unreachable"),
                    local_failure(&["UT", "SI"], "Timeout"),
                ] },
            })),
        }] }],
    })
}

fn local_failure(flags: &[&str], class: &str) -> Value {
    json!({
        "filter": { "response_flag_filter": { "flags": flags } },
        "headers_to_add": [{ "header": { "key": "x-llmroute-failure", "value": class }, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD" }],
    })
}

/// ",RegionBlocked,Timeout," — a model a backend does not map always moves on to the next backend.
fn failover_classes(route: &RouteIr) -> String {
    let mut out = String::from(",");
    for c in &route.failover_on {
        out.push_str(c.as_str());
        out.push(',');
    }
    out.push_str("ModelNotMapped,");
    out
}

fn account_route_config<'a>(
    account: &'a AccountIr,
    served: &[(&'a RouteIr, &'a BackendIr)],
) -> shapes::RouteConfig<'a, shapes::AccountRoute<'a>> {
    let routes = served
        .iter()
        .map(|&(route, backend)| shapes::AccountRoute {
            name: format!("{}/{}", route.name, backend.name),
            match_: shapes::HeaderMatch {
                prefix: "/",
                headers: [shapes::NamedExact {
                    name: ROUTE_HEADER,
                    string_match: shapes::ExactMatch { exact: &route.name },
                }],
            },
            request_headers_to_remove: [ROUTE_HEADER, MODEL_HEADER, ESTIMATE_HEADER, RATE_HEADER],
            request_headers_to_add: account
                .provider
                .headers
                .iter()
                .map(|(k, v)| shapes::HeaderToAdd::overwrite(k, v))
                .collect(),
            response_headers_to_add: [shapes::HeaderToAdd::overwrite(
                BACKEND_HEADER,
                &backend.name,
            )],
            route: shapes::AccountAction {
                cluster: &account.upstream,
                host_rewrite_literal: &account.authority,
                timeout: "0s",
                retry_policy: shapes::IdleOnly {
                    num_retries: 0,
                    per_try_idle_timeout: seconds(route.idle_timeout_ms),
                },
            },
            metadata: shapes::LuaMetadata::new(shapes::AccountMetadata {
                route: &route.name,
                backend: &backend.name,
                models: &backend.models,
                passthrough: backend.passthrough,
                failover_on: failover_classes(route),
                embedding_family: &route.embedding_family,
                rate_limited: backend.rate_limited,
            }),
            request_body_buffer_limit: REQUEST_BUFFER_LIMIT,
        })
        .collect();
    shapes::RouteConfig::new(&account.name, routes)
}

fn front_route<'a>(route: &'a RouteIr, key: &'a str) -> shapes::FrontRoute<'a> {
    let (cluster, weighted_clusters) = if route.chains.len() == 1 {
        (Some(route.chains[0].0.as_str()), None)
    } else {
        let clusters = route
            .chains
            .iter()
            .map(|(name, weight)| shapes::WeightedCluster {
                name,
                weight: *weight,
            })
            .collect();
        (None, Some(shapes::WeightedClusters { clusters }))
    };
    shapes::FrontRoute {
        name: &route.name,
        match_: shapes::PrefixMatch {
            prefix: format!("/{}/v1/", route.name),
        },
        route: shapes::FrontAction {
            cluster,
            weighted_clusters,
            timeout: seconds(route.request_timeout_ms),
            retry_policy: shapes::RetryPolicy::failover(
                route.max_attempts.saturating_sub(1),
                "x-llmroute-retry",
            ),
        },
        metadata: shapes::LuaMetadata::new(shapes::FrontMetadata {
            route: &route.name,
            key,
            models: &route.models,
            passthrough: route.passthrough,
            chains: &route.chain_backends,
            backends: crate::usage::backends_tag(route.backends.iter().map(|b| {
                let facts = crate::usage::BackendFacts {
                    cost: b.cost.clone(),
                    models: b.models.clone(),
                    passthrough: b.passthrough,
                };
                (b.name.as_str(), facts)
            })),
            endpoints: &route.endpoints,
            operations: &route.operations,
            lease_required: route.lease_required,
        }),
        request_body_buffer_limit: FRONT_REQUEST_BUFFER_LIMIT,
        request_headers_to_add: [shapes::HeaderToAdd::overwrite(ROUTE_HEADER, &route.name)],
    }
}

/// A route whose budget is used up: the same match and metadata (the front Lua still checks the
/// route key and answers the models list), and an OpenAI-shaped 429 instead of the upstream.
/// `x-llmroute-failure: BudgetExhausted` tells it from a provider's rate limit.
fn over_budget_route(route: shapes::FrontRoute, why: &str) -> Value {
    let mut v = serde_json::to_value(route).expect("routes serialize");
    let o = v.as_object_mut().expect("a route is an object");
    o.remove("route");
    o.remove("request_headers_to_add");
    let message = format!("llmroute: this {why}.");
    o.insert(
        "direct_response".into(),
        json!({ "status": 429, "body": { "inline_string":
            json!({ "error": { "message": message, "type": "insufficient_quota", "param": null, "code": "budget_exceeded" } }).to_string()
        } }),
    );
    o.insert(
        "response_headers_to_add".into(),
        json!([
            { "header": { "key": "content-type", "value": "application/json" } },
            { "header": { "key": "x-llmroute-failure", "value": "BudgetExhausted" } },
        ]),
    );
    v
}

fn front_route_config<'a>(
    gw: &'a GatewayIr,
    keys: &'a KeyMaterial,
) -> shapes::RouteConfig<'a, FrontEntry<'a>> {
    // A route without a key (none given) admits no request: its key never matches a token.
    let mut routes: Vec<FrontEntry> = gw
        .routes
        .iter()
        .map(|r| {
            let key = keys
                .route_keys
                .get(&r.name)
                .map(String::as_str)
                .unwrap_or_default();
            match &r.over_budget {
                None => FrontEntry::Route(front_route(r, key)),
                Some(why) => FrontEntry::Other(over_budget_route(front_route(r, key), why)),
            }
        })
        .collect();
    // Names no route: a caller without a route's key learns nothing of the namespace's routes,
    // and the body stays far below Envoy's 4 KiB limit of a direct response, whatever their
    // number (listing them made a namespace of some 150 routes reject its whole configuration).
    let message = if gw.routes.is_empty() {
        "No llmroute route is programmed on this gateway."
    } else {
        "No llmroute route serves this path: a route serves /<route>/v1/..., with its base URL in the route's workload Secret (OPENAI_BASE_URL)."
    };
    routes.push(FrontEntry::Other(json!({
        "name": "not-found",
        "match": { "prefix": "/" },
        "direct_response": { "status": 404, "body": { "inline_string":
            json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": "route_not_found" } }).to_string()
        } },
        "response_headers_to_add": [{ "header": { "key": "content-type", "value": "application/json" } }],
    })));
    let mut config = shapes::RouteConfig::new(FRONT, routes);
    config.virtual_hosts[0].include_attempt_count_in_response = true;
    config
}

fn circuit_breakers() -> Value {
    serde_json::to_value(shapes::CircuitBreakers::generous()).expect("circuit breakers serialize")
}

fn internal_cluster(account: &str) -> Value {
    json!({
        "name": account,
        "alt_stat_name": shapes::stat_name(account),
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": circuit_breakers(),
        "load_assignment": {
            "cluster_name": account,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "envoy_internal_address": { "server_listener_name": account },
            } } }] }],
        },
    })
}

/// A provider host. Its certificate is verified against the CA bundle the operator serves
/// (`served_ca`, the SDS secret [`UPSTREAM_CA_SECRET`]) or else the gateway's own file, and must name
/// the host.
fn upstream_cluster(u: &UpstreamIr, opts: &EnvoyOptions, served_ca: bool) -> Value {
    let is_ip = u.host.parse::<std::net::IpAddr>().is_ok();
    let mut c = json!({
        "name": u.cluster,
        "alt_stat_name": shapes::stat_name(&u.cluster),
        "type": if is_ip { "STATIC" } else { "LOGICAL_DNS" },
        "connect_timeout": "5s",
        "circuit_breakers": circuit_breakers(),
        "load_assignment": {
            "cluster_name": u.cluster,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": u.host, "port_value": u.port },
            } } }] }],
        },
    });
    if !is_ip {
        c["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    if u.tls {
        let san = if is_ip { "IP_ADDRESS" } else { "DNS" };
        let names = json!([{ "san_type": san, "matcher": { "exact": u.host } }]);
        let context = if served_ca {
            json!({ "combined_validation_context": {
                "default_validation_context": { "match_typed_subject_alt_names": names },
                "validation_context_sds_secret_config": { "name": UPSTREAM_CA_SECRET, "sds_config": ads_source() },
            } })
        } else {
            json!({ "validation_context": {
                "trusted_ca": { "filename": opts.trusted_ca },
                "match_typed_subject_alt_names": names,
            } })
        };
        let mut tls = json!({ "common_tls_context": context });
        if !is_ip {
            tls["sni"] = json!(u.host);
        }
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", tls),
        });
    }
    c
}
