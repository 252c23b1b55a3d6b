//! Gateway IR → Envoy 1.40 files: a bootstrap with file-based LDS/CDS, one RDS file for the front
//! listener and one per backend listener. Keys are never written here: the Lua of the front and of
//! each account listener reads them from the mounted keys Secret (at most once a second).
//!
//! Layout (see the README's architecture picture): the front listener `gateway` checks the route key and the
//! model, then routes `/<route>/v1/...` to a failover chain (an aggregate cluster retried with
//! `previous_priorities`). Each chain member is an internal listener per provider account (provider,
//! base URL, key) that injects the provider's key, maps the model for the route, rewrites path and
//! Host, and classifies failures. Every attempt is a fresh request into the next account's
//! listener, so nothing of one provider leaks into another's attempt.
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

use serde_json::{Value, json};

use super::ir::{AccountIr, BackendIr, GatewayIr, RouteIr, UpstreamIr};
use super::xds;
use crate::catalog::PathStyle;

/// Where the gateway finds its files and what it listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyOptions {
    /// Directory the configuration files are mounted at (the ConfigMap).
    pub config_dir: String,
    /// Directory the keys are mounted at (the keys Secret).
    pub keys_dir: String,
    /// Port of the front listener.
    pub port: u16,
    /// Address of the front listener.
    pub address: String,
    /// Port of the admin interface (bound to 127.0.0.1 only).
    pub admin_port: u16,
    /// Port of the readiness/metrics listener (proxies `/ready` and `/stats/prometheus` of admin).
    pub health_port: u16,
    /// CA bundle that upstream TLS certificates are verified against.
    pub trusted_ca: String,
    /// How the two directories are written, which decides the paths the gateway reads.
    pub layout: VolumeLayout,
}

/// How the configuration and keys directories are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VolumeLayout {
    /// ConfigMap and Secret volumes: the kubelet writes a new timestamped directory, renames the
    /// `..data` symlink onto it, and only then creates the visible symlink of a key that is new.
    /// The gateway reads every file through `..data`: a listener update naming a route file added in
    /// the same ConfigMap update would otherwise race that last step and be rejected ("paths must
    /// refer to an existing path"), and each read sees one version of all files.
    #[default]
    Kubelet,
    /// Plain files written in place (`llmroute render --out-dir`).
    Plain,
}

/// A file of a volume: through `..data` for a kubelet volume (one version of all files), plainly
/// otherwise.
fn volume_path(dir: &str, file: &str, layout: VolumeLayout) -> String {
    match layout {
        VolumeLayout::Kubelet => format!("{dir}/..data/{file}"),
        VolumeLayout::Plain => format!("{dir}/{file}"),
    }
}

impl EnvoyOptions {
    /// The path Envoy reads `file` of the configuration directory at.
    pub fn config_path(&self, file: &str) -> String {
        volume_path(&self.config_dir, file, self.layout)
    }

    /// The path the gateway's Lua reads `entry` of the keys directory at (at most once a second per
    /// worker, so a rotated key, or one that arrives after the configuration naming it, is used
    /// within about a second of the volume's update, without any file watch).
    pub fn key_path(&self, entry: &str) -> String {
        volume_path(&self.keys_dir, entry, self.layout)
    }
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            config_dir: "/etc/llmroute/config".into(),
            keys_dir: "/etc/llmroute/keys".into(),
            port: 8080,
            address: "0.0.0.0".into(),
            admin_port: 9901,
            health_port: 19003,
            trusted_ca: "/etc/ssl/certs/ca-certificates.crt".into(),
            layout: VolumeLayout::Kubelet,
        }
    }
}

/// File names inside the configuration directory.
pub const BOOTSTRAP: &str = "bootstrap.yaml";
// xDS files are JSON (which Envoy reads by extension): several times faster to produce than YAML
// and smaller in the ConfigMap, where size is bounded (1 MiB).
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
/// Response header naming the backend that answered.
pub const BACKEND_HEADER: &str = "x-llmroute-backend";

/// Largest request body buffered for model checks and retries.
pub const REQUEST_BUFFER_LIMIT: u64 = 8 * 1024 * 1024;

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
    Route(xds::FrontRoute<'a>),
    Other(Value),
}

/// A cluster: a route's failover chain, or another one.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ClusterEntry<'a> {
    Chain(xds::ChainCluster<'a>),
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

/// Envoy resources of a gateway, before they are laid out in files.
struct Resources<'a> {
    listeners: Vec<Value>,
    clusters: Vec<ClusterEntry<'a>>,
    front: xds::RouteConfig<'a, FrontEntry<'a>>,
    /// (file, RouteConfiguration) of each account listener.
    accounts: Vec<(String, xds::RouteConfig<'a, xds::AccountRoute<'a>>)>,
}

fn resources<'a>(gw: &'a GatewayIr, opts: &EnvoyOptions) -> Resources<'a> {
    let mut listeners = vec![front_listener(opts)];
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
        listeners.push(account_listener(account, opts));
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
            .map(|c| ClusterEntry::Chain(xds::ChainCluster::new(&c.cluster, &c.accounts))),
    );
    clusters.extend(
        gw.upstreams
            .iter()
            .map(|u| ClusterEntry::Other(upstream_cluster(u, opts))),
    );
    clusters.sort_by(|a, b| a.name().cmp(b.name()));
    for c in &mut clusters {
        if let ClusterEntry::Other(v) = c {
            *v = typed("envoy.config.cluster.v3.Cluster", std::mem::take(v));
        }
    }
    Resources {
        listeners: listeners
            .into_iter()
            .map(|l| typed("envoy.config.listener.v3.Listener", l))
            .collect(),
        clusters,
        front: front_route_config(gw, opts),
        accounts,
    }
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

/// Envoy's files for a gateway: file name → content. Deterministic: the same IR gives the same bytes.
pub fn render(gw: &GatewayIr, opts: &EnvoyOptions) -> BTreeMap<String, String> {
    let r = resources(gw, opts);
    let mut files = BTreeMap::new();
    files.insert(BOOTSTRAP.to_string(), to_yaml(&bootstrap(opts)));
    files.insert(LISTENERS.to_string(), file_json(&r.listeners));
    files.insert(CLUSTERS.to_string(), file_json(&r.clusters));
    files.insert(
        ROUTES.to_string(),
        file_json(std::slice::from_ref(&r.front)),
    );
    for (file, config) in &r.accounts {
        files.insert(file.clone(), file_json(std::slice::from_ref(config)));
    }
    files
}

/// The same gateway as one static bootstrap (route configurations inlined),
/// for `envoy --mode validate`, which checks the bootstrap but does not load file-based xDS.
pub fn render_static(gw: &GatewayIr, opts: &EnvoyOptions) -> String {
    let r = resources(gw, opts);
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
    let mut boot = bootstrap(opts);
    boot.as_object_mut()
        .expect("bootstrap is an object")
        .remove("dynamic_resources");
    let statics = &mut boot["static_resources"];
    statics["listeners"]
        .as_array_mut()
        .expect("listeners")
        .extend(listeners);
    statics["clusters"]
        .as_array_mut()
        .expect("clusters")
        .extend(r.clusters.iter().map(|c| untyped(to_value(c))));
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

fn file_source(opts: &EnvoyOptions, file: &str) -> Value {
    json!({
        "path_config_source": {
            "path": opts.config_path(file),
            "watched_directory": { "path": opts.config_dir },
        },
        "resource_api_version": "V3",
    })
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

fn bootstrap(opts: &EnvoyOptions) -> Value {
    json!({
        "node": { "id": "llmroute-gateway", "cluster": "llmroute-gateway" },
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port } },
        },
        "dynamic_resources": {
            "lds_config": file_source(opts, LISTENERS),
            "cds_config": file_source(opts, CLUSTERS),
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
            "clusters": [{
                "name": "admin",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "admin",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port },
                    } } }] }],
                },
            }],
        },
    })
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

/// Access log of the front listener: no request or response headers that could carry keys.
fn access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", json!({
            "log_format": { "json_format": {
                "time": "%START_TIME%",
                "route": "%ROUTE_NAME%",
                "method": "%REQ(:METHOD)%",
                "path": "%REQ(:PATH)%",
                "status": "%RESPONSE_CODE%",
                "backend": "%RESP(X-LLMROUTE-BACKEND)%",
                "failure": "%RESP(X-LLMROUTE-FAILURE)%",
                "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
                "duration_ms": "%DURATION%",
                "flags": "%RESPONSE_FLAGS%",
                "request_id": "%REQ(X-REQUEST-ID)%",
            } },
        })),
    }])
}

fn front_listener(opts: &EnvoyOptions) -> Value {
    json!({
        "name": FRONT,
        "address": { "socket_address": { "address": opts.address, "port_value": opts.port } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", json!({
                "stat_prefix": FRONT,
                "codec_type": "AUTO",
                "rds": { "route_config_name": FRONT, "config_source": file_source(opts, ROUTES) },
                "http_filters": [lua_filter(LUA_FRONT), router_filter()],
                "access_log": access_log(),
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

/// The account's constants for the backend Lua code: base path, path style and the provider's
/// classification rules from the catalog.
fn account_lua_prelude(account: &AccountIr, opts: &EnvoyOptions) -> String {
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
    // The key is read from the mounted keys Secret (never from this file): KEY_FILE names it.
    let key_file = account.key_entry.as_deref().map_or_else(
        || "nil".to_string(),
        |entry| lua_string(&opts.key_path(entry)),
    );
    format!(
        "-- Provider account {} (catalog entry {}).\nlocal BASE_PATH = {}\nlocal AZURE = {}\nlocal API_VERSION = {}\nlocal KEY_FILE = {key_file}\nlocal AUTH_HEADER = {}\nlocal AUTH_PREFIX = {}\nlocal RULES = {{\n{}\n}}\n",
        account.name,
        account.provider.id,
        lua_string(&account.base_path),
        matches!(account.path_style, PathStyle::AzureDeployment),
        lua_string(account.api_version.as_deref().unwrap_or_default()),
        lua_string(&account.provider.auth.header),
        lua_string(&account.provider.auth.prefix),
        rules.join("\n")
    )
}

fn account_listener(account: &AccountIr, opts: &EnvoyOptions) -> Value {
    let mut filters = vec![lua_filter(&format!(
        "{}\n{LUA_BACKEND}",
        account_lua_prelude(account, opts)
    ))];
    filters.push(router_filter());
    json!({
        "name": account.name,
        "stat_prefix": xds::stat_name(&account.name),
        "internal_listener": {},
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", json!({
                // One metric name for all accounts, the account in the prefix label.
                "stat_prefix": xds::stat_name(&account.name),
                "rds": { "route_config_name": account.name, "config_source": file_source(opts, &account_routes_file(account)) },
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
) -> xds::RouteConfig<'a, xds::AccountRoute<'a>> {
    let routes = served
        .iter()
        .map(|&(route, backend)| xds::AccountRoute {
            name: format!("{}/{}", route.name, backend.name),
            match_: xds::HeaderMatch {
                prefix: "/",
                headers: [xds::NamedExact {
                    name: ROUTE_HEADER,
                    string_match: xds::ExactMatch { exact: &route.name },
                }],
            },
            request_headers_to_remove: [ROUTE_HEADER, MODEL_HEADER],
            request_headers_to_add: account
                .provider
                .headers
                .iter()
                .map(|(k, v)| xds::HeaderToAdd::overwrite(k, v))
                .collect(),
            response_headers_to_add: [xds::HeaderToAdd::overwrite(BACKEND_HEADER, &backend.name)],
            route: xds::AccountAction {
                cluster: &account.upstream,
                host_rewrite_literal: &account.authority,
                timeout: "0s",
                retry_policy: xds::IdleOnly {
                    num_retries: 0,
                    per_try_idle_timeout: seconds(route.idle_timeout_ms),
                },
            },
            metadata: xds::LuaMetadata::new(xds::AccountMetadata {
                route: &route.name,
                backend: &backend.name,
                models: &backend.models,
                passthrough: backend.passthrough,
                failover_on: failover_classes(route),
            }),
            request_body_buffer_limit: REQUEST_BUFFER_LIMIT,
        })
        .collect();
    xds::RouteConfig::new(&account.name, routes)
}

fn front_route<'a>(route: &'a RouteIr, opts: &EnvoyOptions) -> xds::FrontRoute<'a> {
    let (cluster, weighted_clusters) = if route.chains.len() == 1 {
        (Some(route.chains[0].0.as_str()), None)
    } else {
        let clusters = route
            .chains
            .iter()
            .map(|(name, weight)| xds::WeightedCluster {
                name,
                weight: *weight,
            })
            .collect();
        (None, Some(xds::WeightedClusters { clusters }))
    };
    xds::FrontRoute {
        name: &route.name,
        match_: xds::PrefixMatch {
            prefix: format!("/{}/v1/", route.name),
        },
        route: xds::FrontAction {
            cluster,
            weighted_clusters,
            timeout: seconds(route.request_timeout_ms),
            retry_policy: xds::RetryPolicy::failover(
                route.max_attempts.saturating_sub(1),
                "x-llmroute-retry",
            ),
        },
        metadata: xds::LuaMetadata::new(xds::FrontMetadata {
            route: &route.name,
            key_file: opts.key_path(&route.key_entry),
            models: &route.models,
            passthrough: route.passthrough,
            chains: &route.chain_backends,
        }),
        request_body_buffer_limit: REQUEST_BUFFER_LIMIT,
        request_headers_to_add: [xds::HeaderToAdd::overwrite(ROUTE_HEADER, &route.name)],
    }
}

fn front_route_config<'a>(
    gw: &'a GatewayIr,
    opts: &EnvoyOptions,
) -> xds::RouteConfig<'a, FrontEntry<'a>> {
    let mut routes: Vec<FrontEntry> = gw
        .routes
        .iter()
        .map(|r| FrontEntry::Route(front_route(r, opts)))
        .collect();
    let names: Vec<&str> = gw.routes.iter().map(|r| r.name.as_str()).collect();
    let message = if names.is_empty() {
        "No llmroute route is programmed on this gateway.".to_string()
    } else {
        format!(
            "No llmroute route serves this path. Routes: /{}/v1.",
            names.join("/v1, /")
        )
    };
    routes.push(FrontEntry::Other(json!({
        "name": "not-found",
        "match": { "prefix": "/" },
        "direct_response": { "status": 404, "body": { "inline_string":
            json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": "route_not_found" } }).to_string()
        } },
        "response_headers_to_add": [{ "header": { "key": "content-type", "value": "application/json" } }],
    })));
    let mut config = xds::RouteConfig::new(FRONT, routes);
    config.virtual_hosts[0].include_attempt_count_in_response = true;
    config
}

fn circuit_breakers() -> Value {
    serde_json::to_value(xds::CircuitBreakers::generous()).expect("circuit breakers serialize")
}

fn internal_cluster(account: &str) -> Value {
    json!({
        "name": account,
        "alt_stat_name": xds::stat_name(account),
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

fn upstream_cluster(u: &UpstreamIr, opts: &EnvoyOptions) -> Value {
    let is_ip = u.host.parse::<std::net::IpAddr>().is_ok();
    let mut c = json!({
        "name": u.cluster,
        "alt_stat_name": xds::stat_name(&u.cluster),
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
        let mut tls = json!({
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": { "filename": opts.trusted_ca },
                    "match_typed_subject_alt_names": [{ "san_type": san, "matcher": { "exact": u.host } }],
                },
            },
        });
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
