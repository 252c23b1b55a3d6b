//! The leader's usage collector: every `--usage-interval` it reads each connected gateway
//! replica's cumulative counts (`GET /usage` on its sidecar over mutual TLS, [`super::usage_read`],
//! at the address the replica gave in its xDS node metadata), adds what is new to its namespace's ledger (`usage::ledger`), stores
//! the ledger's changed shards in the operator's own namespace (ConfigMaps
//! `llmroute-usage-<namespace>-<shard>`, out of tenants' reach) and asks for the namespace to be
//! reconciled (status usage, budgets). Why the counts live there: docs/design/usage.md.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::context::{Context, now_ms, stored_ledger};
use super::leases::Known;
use crate::api::LLMRoute;
use crate::gateway::objects::{self, USAGE_OF_LABEL, USAGE_SHARD_LABEL};
use crate::usage::ledger::{Ledger, Period, Periods, Report, RouteTotals};

/// Default of `--usage-interval`.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(10);

/// Replicas not read for this long are dropped from a ledger (their Pods are gone).
const WATERMARK_TTL_MS: u64 = 24 * 3600 * 1000;

/// A replica that disconnected is read this many more times (its last counts), then forgotten.
const LAST_READS: u32 = 3;

/// The budget periods of a namespace's routes, from their specs.
struct RoutePeriods(HashMap<String, Arc<LLMRoute>>);

impl Periods for RoutePeriods {
    /// The route's budget's period, else a calendar month in UTC.
    fn route(&self, route: &str) -> Period {
        let budget = self
            .0
            .get(route)
            .and_then(|r| r.spec.policy.budget.as_ref());
        Period::of(budget)
    }
    /// The backend's own budget's period, else the route's.
    fn backend(&self, route: &str, backend: &str) -> Period {
        let r = self.0.get(route);
        match r
            .and_then(|r| r.spec.backends.iter().find(|b| b.name == backend))
            .and_then(|b| b.budget.as_ref())
        {
            Some(own) => Period::of(Some(own)),
            None => self.route(route),
        }
    }
}

/// One shard of a namespace's ledger as this leader holds it.
#[derive(Default)]
struct Held {
    ledger: Ledger,
    /// The stored ConfigMap's resourceVersion (None: not stored yet).
    version: Option<String>,
    /// Changed since the last successful write.
    dirty: bool,
}

/// A namespace's ledger, by shard.
type Shards = BTreeMap<u32, Held>;

/// Reads replicas and keeps the ledgers until `stop`; sends a namespace on `changed` after each
/// stored change of its ledger.
pub async fn collect(
    ctx: Arc<Context>,
    changed: mpsc::UnboundedSender<String>,
    stop: impl std::future::Future<Output = ()>,
) {
    let interval = ctx.opts.usage_interval;
    if interval.is_zero() {
        return;
    }
    let reader = match super::usage_read::UsageReader::new(ctx.xds.authority.clone()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            warn!(error = %e, "cannot issue the usage reader's client certificate: budgets are not enforced");
            return;
        }
    };
    ctx.caches_synced().await;
    let mut held: HashMap<String, Shards> = HashMap::new();
    // Replicas seen connected, and those gone that still get their last reads.
    let mut connected: HashSet<(String, String, SocketAddr)> = HashSet::new();
    let mut leaving: HashMap<(String, String, SocketAddr), u32> = HashMap::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first failure of each thing usage depends on, while it lasts: reading a connected
    // replica (namespace, node) or storing a namespace's ledger (namespace, "").
    let mut failing: HashMap<(String, String), Failure> = HashMap::new();
    // What each replica's admission last reported, by namespace and node (leases).
    let mut admission: HashMap<String, BTreeMap<String, Known>> = HashMap::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        let scope = ctx.opts.namespace.as_deref();
        let now: HashSet<_> = ctx
            .xds
            .server
            .usage_sources()
            .into_iter()
            .filter(|(ns, _, _)| scope.is_none_or(|s| s == ns))
            .collect();
        for gone in connected.difference(&now) {
            leaving.insert(gone.clone(), 0);
        }
        for back in &now {
            leaving.remove(back);
        }
        connected = now;
        let sources: Vec<_> = connected.iter().chain(leaving.keys()).cloned().collect();
        let reads = futures::future::join_all(sources.into_iter().map(|source| {
            let reader = reader.clone();
            async move {
                let report = reader.read(&source.0, source.2).await;
                (source, report)
            }
        }))
        .await;
        let mut reports: BTreeMap<String, Vec<(String, Report)>> = BTreeMap::new();
        let mut readers: BTreeMap<String, Vec<(SocketAddr, String, u64)>> = BTreeMap::new();
        for (source, report) in reads {
            match report {
                Ok(r) => {
                    leaving.remove(&source);
                    failing.remove(&(source.0.clone(), source.1.clone()));
                    if r.acked < r.seq {
                        let ack = (source.2, r.boot.clone(), r.seq);
                        readers.entry(source.0.clone()).or_default().push(ack);
                    }
                    if let Some(holding) = r.leases.clone() {
                        let nodes = admission.entry(source.0.clone()).or_default();
                        let known = nodes.entry(source.1.clone()).or_insert_with(|| Known {
                            addr: source.2,
                            holding: holding.clone(),
                            asked: BTreeMap::new(),
                        });
                        if known.holding.boot != holding.boot {
                            known.asked.clear();
                        }
                        known.addr = source.2;
                        known.holding = holding;
                    }
                    reports.entry(source.0).or_default().push((source.1, r));
                }
                Err(e) => {
                    debug!(namespace = %source.0, node = %source.1, error = %e, "usage not read");
                    if connected.contains(&source) {
                        let key = (source.0.clone(), source.1.clone());
                        let what = format!(
                            "the counts of gateway Pod {} ({}) cannot be read: {}",
                            source.1, source.2, e
                        );
                        Failure::again(failing.entry(key), what);
                        ctx.opts.metrics.usage_read_errors(&source.0);
                    }
                    if let Some(tries) = leaving.get_mut(&source) {
                        *tries += 1;
                        if *tries >= LAST_READS {
                            warn!(namespace = %source.0, node = %source.1, "a gateway replica left before its last usage counts were read");
                            leaving.remove(&source);
                        }
                    }
                }
            }
        }
        let namespaces: HashSet<String> = reports
            .keys()
            .cloned()
            .chain(admission.keys().cloned())
            .chain(
                held.iter()
                    .filter(|(_, shards)| shards.values().any(|h| h.dirty))
                    .map(|(ns, _)| ns.clone()),
            )
            .collect();
        for ns in namespaces {
            let list = reports.remove(&ns).unwrap_or_default();
            let updated = update(&ctx, &mut held, &ns, &list).await;
            if let Some(nodes) = admission.get_mut(&ns) {
                lease(&ctx, &reader, &held, &ns, nodes, interval).await;
            }
            let stored = match updated {
                Ok(stored) => {
                    failing.remove(&(ns.clone(), String::new()));
                    stored
                }
                Err(e) => {
                    let what = format!("the usage ledger cannot be stored: {e}");
                    Failure::again(failing.entry((ns.clone(), String::new())), what);
                    continue;
                }
            };
            // Stored (or nothing new): the replicas may let go of what they counted. Only those
            // that do not know it yet are told, all at once.
            let acks = readers.remove(&ns).unwrap_or_default();
            futures::future::join_all(acks.iter().map(|(addr, boot, seq)| {
                let (reader, ns) = (reader.clone(), ns.as_str());
                async move {
                    if let Err(e) = reader.acknowledge(ns, *addr, boot, *seq).await {
                        debug!(%addr, error = %e, "usage counts stored but not acknowledged; again next round");
                    }
                }
            }))
            .await;
            if let Some(stored) = stored {
                ctx.usage.set(&ns, Some(stored));
                let _ = changed.send(ns);
            }
        }
        sweep(&ctx, &mut held).await;
        // Replicas gone and not read any more: their admission is forgotten (what they held
        // counted until then).
        super::leases::keep_only(&mut admission, &|ns, node| {
            connected
                .iter()
                .chain(leaving.keys())
                .any(|(n, d, _)| n == ns && d == node)
        });
        // Replicas gone: what they did not answer no longer makes anything stale.
        failing.retain(|(ns, node), _| {
            node.is_empty() || connected.iter().any(|(n, d, _)| n == ns && d == node)
        });
        report_unknown(&ctx, &failing, &changed);
    }
}

/// Sends the namespace's replicas their leases (docs/design/usage.md, "Admission control"),
/// computed from the ledger as this leader holds it (stored or not: the counts it has read).
async fn lease(
    ctx: &Context,
    reader: &super::usage_read::UsageReader,
    held: &HashMap<String, Shards>,
    ns: &str,
    nodes: &mut BTreeMap<String, Known>,
    interval: Duration,
) {
    let routes: Vec<Arc<LLMRoute>> = ctx
        .caches
        .routes
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns))
        .collect();
    // Without the ledger (not read yet), nothing is known to be left: replicas keep their leases.
    let Some(shards) = held.get(ns) else {
        return;
    };
    let totals = |route: &str| -> Option<RouteTotals> {
        let shard = shards.get(&crate::usage::ledger::shard_of(route))?;
        shard.ledger.routes.get(route).cloned()
    };
    let leases = super::leases::plan(&routes, &totals, nodes, ctx.opts.clock.now_ms(), interval);
    futures::future::join_all(leases.iter().map(|(addr, lease)| async move {
        if let Err(e) = reader.lease(ns, *addr, lease).await {
            debug!(namespace = %ns, %addr, error = %e, "lease not delivered; the replica keeps its last one");
        }
    }))
    .await;
}

/// Something usage depends on that failed: since when, how many times in a row, the last error.
struct Failure {
    since_ms: u64,
    times: u32,
    what: String,
}

impl Failure {
    /// One more failure in a row (the first starts the count).
    fn again(
        entry: std::collections::hash_map::Entry<'_, (String, String), Failure>,
        what: String,
    ) {
        let f = entry.or_insert_with(|| Failure {
            since_ms: now_ms(),
            times: 0,
            what: String::new(),
        });
        f.times += 1;
        f.what = what;
    }
}

/// Marks each namespace's usage unknown while something it depends on has failed twice in a row
/// (two reads or stores an interval apart: so within two intervals of the fault), and known again
/// once nothing has, asking for a reconcile when that changes.
fn report_unknown(
    ctx: &Context,
    failing: &HashMap<(String, String), Failure>,
    changed: &mpsc::UnboundedSender<String>,
) {
    let mut unknown: BTreeMap<&str, &Failure> = BTreeMap::new();
    for ((ns, _), f) in failing {
        if f.times >= 2 {
            let first = unknown.entry(ns.as_str()).or_insert(f);
            if f.since_ms < first.since_ms {
                *first = f;
            }
        }
    }
    let namespaces: BTreeSet<String> = failing
        .keys()
        .map(|(ns, _)| ns.clone())
        .chain(ctx.usage.unknown_namespaces())
        .collect();
    for ns in namespaces {
        let why = unknown.get(ns.as_str()).map(|f| {
            let since = k8s_openapi::jiff::Timestamp::from_millisecond(f.since_ms as i64)
                .map(|t| t.to_string())
                .unwrap_or_default();
            format!("{} (since {since})", f.what)
        });
        ctx.opts.metrics.set_usage_unknown(&ns, why.is_some());
        if ctx.usage.set_unknown(&ns, why.clone()) {
            match &why {
                Some(w) => warn!(namespace = %ns, "usage unknown: {w}"),
                None => info!(namespace = %ns, "usage known again"),
            }
            let _ = changed.send(ns);
        }
    }
}

/// The ledger API: ConfigMaps of the operator's namespace.
fn ledger_api(ctx: &Context) -> Api<ConfigMap> {
    Api::namespaced(ctx.client.clone(), &ctx.opts.ledger_namespace)
}

/// Reads `ns`'s stored shards from the API server (not the cache: a new leader must start from the
/// last write).
async fn load(ctx: &Context, ns: &str) -> Result<Shards, kube::Error> {
    let selector = format!("{USAGE_OF_LABEL}={ns}");
    let list = ledger_api(ctx)
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    let mut shards = Shards::new();
    for cm in list.items {
        let Some(shard) = cm
            .labels()
            .get(USAGE_SHARD_LABEL)
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        shards.insert(
            shard,
            Held {
                ledger: stored_ledger(&cm).unwrap_or_default(),
                version: cm.resource_version(),
                dirty: false,
            },
        );
    }
    Ok(shards)
}

/// Deletes the stored ledgers of namespaces left without routes (in this collector's scope).
async fn sweep(ctx: &Context, held: &mut HashMap<String, Shards>) {
    let scope = ctx.opts.namespace.as_deref();
    let live: BTreeSet<String> = ctx
        .caches
        .routes
        .state()
        .iter()
        .filter_map(|r| r.namespace())
        .collect();
    for cm in ctx.caches.ledgers.state() {
        let Some(ns) = cm.labels().get(USAGE_OF_LABEL) else {
            continue;
        };
        if live.contains(ns) || scope.is_some_and(|s| s != ns) {
            continue;
        }
        match ledger_api(ctx)
            .delete(&cm.name_any(), &Default::default())
            .await
        {
            Ok(_) => {
                ctx.writes.add();
                debug!(namespace = %ns, ledger = %cm.name_any(), "deleted the usage ledger of a namespace without routes");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                warn!(namespace = %ns, error = %e, "cannot delete the usage ledger of a namespace without routes")
            }
        }
        held.remove(ns);
        ctx.usage.set(ns, None);
    }
}

/// Adds `reports` to `ns`'s ledger and stores the shards that changed. Returns the route totals
/// once stored (None: nothing changed); Err (why) when the ledger could not be read or stored.
async fn update(
    ctx: &Context,
    held: &mut HashMap<String, Shards>,
    ns: &str,
    reports: &[(String, Report)],
) -> Result<Option<BTreeMap<String, RouteTotals>>, String> {
    if !held.contains_key(ns) {
        match load(ctx, ns).await {
            Ok(shards) => held.insert(ns.to_string(), shards),
            Err(e) => {
                warn!(namespace = %ns, error = %e, "cannot read the usage ledger; trying again next time");
                return Err(format!("reading it: {e}"));
            }
        };
    }
    let shards = held.get_mut(ns).expect("held");
    let routes: HashMap<String, Arc<LLMRoute>> = ctx
        .caches
        .routes
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns))
        .map(|r| (r.name_any(), r))
        .collect();
    if routes.is_empty() {
        // No route left: the sweep deletes the stored ledger.
        return Ok(None);
    }
    let now = ctx.opts.clock.now_ms();
    let periods = RoutePeriods(routes);
    for (node, report) in reports {
        for (shard, part) in report.by_shard() {
            let h = shards.entry(shard).or_default();
            h.dirty |= h.ledger.apply(node, &part, now, &periods);
        }
    }
    let names: Vec<&str> = periods.0.keys().map(String::as_str).collect();
    for h in shards.values_mut() {
        h.dirty |= h.ledger.prune(now, WATERMARK_TTL_MS, names.iter().copied());
    }
    if !shards.values().any(|h| h.dirty) {
        return Ok(None);
    }
    let api = ledger_api(ctx);
    for (shard, h) in shards.iter_mut().filter(|(_, h)| h.dirty) {
        let json = serde_json::to_string(&h.ledger).expect("a ledger serializes");
        let desired = objects::usage_ledger(
            &ctx.opts.ledger_namespace,
            ns,
            *shard,
            json,
            h.version.clone(),
        );
        match super::apply::apply_exactly(&api, &desired, &ctx.writes).await {
            Ok(written) => {
                h.version = written.resource_version();
                h.dirty = false;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Someone else wrote it (a previous leader still finishing): start again from
                // theirs; the replicas' counts are cumulative, so the next read adds exactly what
                // is missing.
                warn!(namespace = %ns, shard, "the usage ledger changed under this leader; reading it again");
                held.remove(ns);
                return Err("another writer changed it".into());
            }
            Err(e) => {
                warn!(namespace = %ns, shard, error = %e, "cannot store the usage ledger; trying again next time");
                return Err(e.to_string());
            }
        }
    }
    let mut totals = BTreeMap::new();
    for h in shards.values() {
        totals.extend(h.ledger.routes.iter().map(|(r, t)| (r.clone(), t.clone())));
    }
    Ok(Some(totals))
}
