//! The xDS server: Envoy's delta Aggregated Discovery Service over gRPC with mutual TLS.
//!
//! The reconciler publishes one [`Snapshot`] per namespace; every gateway replica of that namespace
//! holds a stream and gets what changed as soon as it is published. Each replica's answers (ACK or
//! NACK) are kept, so the reconciler can tell, per route, how many replicas serve its current
//! configuration and what Envoy said when it rejected some. A change of that picture (a replica
//! connecting, disconnecting, acknowledging, rejecting) is sent on the events channel as the
//! namespace's name, for the controller to reconcile the namespace.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tonic::codegen::{BoxFuture, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::api::{self, DeltaDiscoveryRequest, DeltaDiscoveryResponse, SemanticVersion};
use super::delta::{Acks, Answer, Serving, TypeState};
use super::snapshot::Snapshot;
use super::tls;
use crate::metrics::{Metrics, NamespaceLabels, XdsPushLabels};

/// gRPC path of the delta ADS method.
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// How long after it starts serving this replica gives gateways to reconnect before it reports, from
/// their absence, that a namespace's gateway serves nothing (a restart or a new leader must not
/// flip every route's status).
pub const RECONNECT_GRACE: Duration = Duration::from_secs(30);

/// Node metadata key naming the gateway's namespace (the bootstrap sets it).
pub const NAMESPACE_METADATA: &str = "llmroute.io/namespace";

/// Node metadata key giving where the replica's sidecar serves its usage counts (`IP:port`; the
/// gateway Deployment passes `$(POD_IP)` on Envoy's command line).
pub const USAGE_ADDRESS_METADATA: &str = "llmroute.io/usage-address";

/// `IP:port` of [`USAGE_ADDRESS_METADATA`]; an IPv6 address may come without brackets (the
/// kubelet expands `$(POD_IP):port` as is).
pub fn parse_usage_address(text: &str) -> Option<std::net::SocketAddr> {
    text.parse().ok().or_else(|| {
        let (ip, port) = text.rsplit_once(':')?;
        Some(std::net::SocketAddr::new(
            ip.parse().ok()?,
            port.parse().ok()?,
        ))
    })
}

/// One connected gateway replica.
struct Gateway {
    namespace: String,
    /// Envoy's node id: the gateway Pod's name.
    node: String,
    /// Why this replica gets no configuration ([`refusal`]): it counts as rejecting every route.
    refused: Option<String>,
    /// Where its sidecar serves its usage counts, if its node metadata says.
    usage: Option<std::net::SocketAddr>,
    acks: Acks,
    connected_at: Instant,
}

struct Inner {
    snapshots: Mutex<HashMap<String, watch::Sender<Option<Arc<Snapshot>>>>>,
    gateways: Mutex<HashMap<u64, Gateway>>,
    next_stream: AtomicU64,
    next_nonce: AtomicU64,
    /// Subscribers to the namespaces whose gateways' state changed.
    events: Mutex<Vec<mpsc::UnboundedSender<String>>>,
    /// Woken on every answer of any gateway.
    answered: Notify,
    /// Whether this replica serves streams (it leads, or leader election is off).
    serving: watch::Receiver<bool>,
    /// Set when the server shuts down: every stream ends.
    closing: watch::Sender<bool>,
    /// Since when this replica serves (it became the leader, or started without leader election).
    serving_since: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// The server's shared state; cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

/// How one replica of a namespace's gateway stands with one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaServing {
    /// Envoy's node id (the Pod's name).
    pub node: String,
    pub serving: Serving,
    /// Connected less than [`FRESH`] ago: it may still be (re)subscribing.
    pub fresh: bool,
}

/// The Envoy release llmroute's gateway configuration is built and checked for: its Lua API, its
/// filters, and the C ABI of llmroute's Envoy module (`sse-usage/src/ffi.rs`), which is declared
/// by hand against that binary and which Envoy loads even when the ABI differs (it only warns).
pub const CHECKED_ENVOY: (u32, u32) = (1, 40);

/// Why a replica that says it runs `version` gets no configuration, if it does not run the checked
/// release. A replica of another Envoy could load the module against an ABI it was not built for,
/// or without it pass request bodies unchecked: it is refused, visibly (its routes'
/// `Programmed` condition says `ConfigurationRejected` with this text), rather than served.
pub fn refusal(version: Option<SemanticVersion>) -> Option<String> {
    let (major, minor) = CHECKED_ENVOY;
    match version {
        Some(v) if (v.major_number, v.minor_number) == (major, minor) => None,
        Some(v) => Some(format!(
            "Envoy {}.{}.{} is not the release llmroute's gateway is checked against \
             ({major}.{minor}.x: its configuration and module); this replica gets no configuration \
             (use the Envoy image of --envoy-image's default)",
            v.major_number, v.minor_number, v.patch
        )),
        None => Some(format!(
            "the replica does not say which Envoy it runs (node.user_agent_build_version); \
             llmroute's gateway is checked against Envoy {major}.{minor}.x only: it gets no configuration"
        )),
    }
}

/// How long a replica's stream counts as fresh: a reconnecting Envoy sends its subscriptions (and
/// the versions it has) type by type in its first moments.
pub const FRESH: Duration = Duration::from_secs(2);

impl XdsServer {
    /// A server that serves streams while `serving` is true.
    pub fn new(serving: watch::Receiver<bool>, metrics: Arc<Metrics>) -> XdsServer {
        let server = XdsServer {
            inner: Arc::new(Inner {
                snapshots: Mutex::default(),
                gateways: Mutex::default(),
                next_stream: AtomicU64::new(1),
                next_nonce: AtomicU64::new(1),
                events: Mutex::default(),
                answered: Notify::new(),
                serving: serving.clone(),
                closing: watch::Sender::new(false),
                serving_since: Mutex::new(None),
                metrics,
            }),
        };
        let weak = Arc::downgrade(&server.inner);
        let mut serving = serving;
        tokio::spawn(async move {
            loop {
                let now_serving = *serving.borrow_and_update();
                {
                    let Some(inner) = weak.upgrade() else { return };
                    let mut since = inner.serving_since.lock().expect("serving since");
                    match (now_serving, since.is_some()) {
                        (true, false) => *since = Some(Instant::now()),
                        (false, true) => *since = None,
                        _ => {}
                    }
                }
                if serving.changed().await.is_err() {
                    return;
                }
            }
        });
        server
    }

    /// Whether this replica started serving less than [`RECONNECT_GRACE`] ago (or does not serve):
    /// gateways that were connected to the previous leader or process may not have reconnected yet,
    /// so a namespace without connected replicas says nothing about them.
    pub fn settling(&self) -> bool {
        self.inner
            .serving_since
            .lock()
            .expect("serving since")
            .is_none_or(|t| t.elapsed() < RECONNECT_GRACE)
    }

    /// The namespace of every change of its gateways' state (a replica connected, disconnected,
    /// acknowledged or rejected something), from now on.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.events.lock().expect("subscribers").push(tx);
        rx
    }

    fn channel(&self, ns: &str) -> watch::Sender<Option<Arc<Snapshot>>> {
        self.inner
            .snapshots
            .lock()
            .expect("snapshots")
            .entry(ns.to_string())
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    /// The snapshot currently served to `ns`'s gateways.
    pub fn current(&self, ns: &str) -> Option<Arc<Snapshot>> {
        self.inner
            .snapshots
            .lock()
            .expect("snapshots")
            .get(ns)
            .and_then(|tx| tx.borrow().clone())
    }

    /// Serves `snapshot` to `ns`'s gateways. Returns whether it differs from what they were served.
    pub fn publish(&self, ns: &str, snapshot: Snapshot) -> bool {
        let tx = self.channel(ns);
        let changed = tx.borrow().as_deref() != Some(&snapshot);
        if changed {
            debug!(
                namespace = ns,
                number = snapshot.number,
                resources = snapshot.len(),
                "xDS snapshot published"
            );
            tx.send_replace(Some(Arc::new(snapshot)));
        }
        changed
    }

    /// Forgets a namespace without routes (its gateway is being removed).
    pub fn remove(&self, ns: &str) {
        if let Some(tx) = self.inner.snapshots.lock().expect("snapshots").remove(ns) {
            tx.send_replace(None);
        }
    }

    /// Per route of `ns`'s current snapshot, how each connected replica stands with it.
    pub fn route_serving(&self, ns: &str) -> BTreeMap<String, Vec<ReplicaServing>> {
        let Some(snapshot) = self.current(ns) else {
            return BTreeMap::new();
        };
        let gateways = self.inner.gateways.lock().expect("gateways");
        let mut replicas: Vec<&Gateway> = gateways.values().filter(|g| g.namespace == ns).collect();
        replicas.sort_by(|a, b| a.node.cmp(&b.node));
        snapshot
            .routes
            .iter()
            .map(|(name, route)| {
                let states = replicas
                    .iter()
                    .map(|g| ReplicaServing {
                        node: g.node.clone(),
                        serving: match &g.refused {
                            Some(why) => Serving::Rejected(why.clone()),
                            None => g.acks.serving(route, &snapshot),
                        },
                        fresh: g.connected_at.elapsed() < FRESH,
                    })
                    .collect();
                (name.clone(), states)
            })
            .collect()
    }

    /// The connected replicas (of every namespace) whose sidecar serves usage counts: (namespace,
    /// node id, address).
    pub fn usage_sources(&self) -> Vec<(String, String, std::net::SocketAddr)> {
        let gateways = self.inner.gateways.lock().expect("gateways");
        let mut sources: Vec<_> = gateways
            .values()
            .filter(|g| g.refused.is_none())
            .filter_map(|g| Some((g.namespace.clone(), g.node.clone(), g.usage?)))
            .collect();
        sources.sort();
        sources.dedup();
        sources
    }

    /// Node ids of the replicas of `ns` connected now.
    pub fn connected(&self, ns: &str) -> Vec<String> {
        let gateways = self.inner.gateways.lock().expect("gateways");
        let mut nodes: Vec<String> = gateways
            .values()
            .filter(|g| g.namespace == ns)
            .map(|g| g.node.clone())
            .collect();
        nodes.sort();
        nodes
    }

    /// Whether every connected replica of `ns` has acknowledged all of its current snapshot.
    pub fn all_current(&self, ns: &str) -> bool {
        let Some(snapshot) = self.current(ns) else {
            return false;
        };
        let gateways = self.inner.gateways.lock().expect("gateways");
        gateways
            .values()
            .filter(|g| g.namespace == ns)
            .all(|g| g.acks.has_all(&snapshot))
    }

    /// Waits, at most `limit`, until every connected replica of `ns` answered what it was sent.
    pub async fn settled(&self, ns: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.answered.notified();
            let busy = {
                let gateways = self.inner.gateways.lock().expect("gateways");
                let snapshot = self.current(ns);
                gateways.values().filter(|g| g.namespace == ns).any(|g| {
                    g.acks.in_flight() || snapshot.as_ref().is_some_and(|s| !g.acks.has_all(s))
                })
            };
            if !busy {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn event(&self, ns: &str) {
        self.inner
            .events
            .lock()
            .expect("subscribers")
            .retain(|tx| tx.send(ns.to_string()).is_ok());
    }

    fn update_connected_metric(&self, ns: &str) {
        let n = self.connected(ns).len() as i64;
        self.inner
            .metrics
            .xds_connected
            .get_or_create(&NamespaceLabels {
                namespace: ns.to_string(),
            })
            .set(n);
    }

    /// The gRPC service to mount on a tonic server.
    pub fn service(&self) -> AdsService {
        AdsService {
            server: self.clone(),
        }
    }

    async fn stream(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<mpsc::Receiver<Result<DeltaDiscoveryResponse, Status>>, Status> {
        if !*self.inner.serving.borrow() {
            return Err(Status::unavailable(
                "this llmroute operator replica does not lead; retry (the xDS Service points at the leader)",
            ));
        }
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned());
        let mut incoming = request.into_inner();
        let first = match incoming.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(e),
            None => return Err(Status::cancelled("stream closed before its first request")),
        };
        let node = first.node.clone().unwrap_or_default();
        let Some(ns) = node.metadata_str(NAMESPACE_METADATA).map(str::to_string) else {
            return Err(Status::invalid_argument(format!(
                "node {:?} has no {NAMESPACE_METADATA} metadata: not an llmroute gateway bootstrap",
                node.id
            )));
        };
        // Mutual TLS verified the certificate's chain; it must also name the namespace asked for.
        if !peer
            .as_ref()
            .is_some_and(|c| tls::certifies_namespace(c, &ns))
        {
            warn!(namespace = %ns, node = %node.id, "xDS client certificate does not name the namespace it asks for");
            return Err(Status::permission_denied(format!(
                "the client certificate is not the gateway certificate of namespace {ns:?}"
            )));
        }
        let usage = node.metadata_str(USAGE_ADDRESS_METADATA).and_then(|a| {
            parse_usage_address(a)
                .ok_or(())
                .map_err(|_| warn!(namespace = %ns, node = %node.id, address = %a, "unusable usage address in node metadata: its usage is not counted for budgets"))
                .ok()
        });
        let version = node.envoy_version();
        let refused = refusal(version);
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner.gateways.lock().expect("gateways").insert(
            id,
            Gateway {
                namespace: ns.clone(),
                node: node.id.clone(),
                refused: refused.clone(),
                usage,
                acks: Acks::default(),
                connected_at: Instant::now(),
            },
        );
        // A replica that does not say is refused just below, with the reason.
        let envoy = version.map_or_else(
            || "unknown (node.user_agent_build_version absent)".to_string(),
            |v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch),
        );
        info!(namespace = %ns, node = %node.id, %envoy, "gateway connected");
        self.update_connected_metric(&ns);
        self.event(&ns);
        let (tx, rx) = mpsc::channel(16);
        let server = self.clone();
        if let Some(why) = refused {
            warn!(namespace = %ns, node = %node.id, %envoy, "gateway refused: {why}");
            // The stream stays open with nothing on it (the replica stays unready) until the
            // replica goes away.
            tokio::spawn(async move {
                while let Some(Ok(_)) = incoming.next().await {}
                drop(tx);
                server.inner.gateways.lock().expect("gateways").remove(&id);
                server.update_connected_metric(&ns);
                server.event(&ns);
                server.inner.answered.notify_waiters();
            });
            return Ok(rx);
        }
        tokio::spawn(async move {
            let mut stream = GatewayStream {
                server: server.clone(),
                id,
                ns: ns.clone(),
                node: node.id.clone(),
                types: HashMap::new(),
                snapshot: server.channel(&ns).subscribe(),
                tx,
            };
            let reason = stream.run(first, incoming).await;
            server.inner.gateways.lock().expect("gateways").remove(&id);
            info!(namespace = %ns, node = %node.id, reason = %reason, "gateway disconnected");
            server.update_connected_metric(&ns);
            server.event(&ns);
            server.inner.answered.notify_waiters();
        });
        Ok(rx)
    }
}

/// One gateway replica's stream.
struct GatewayStream {
    server: XdsServer,
    id: u64,
    ns: String,
    node: String,
    types: HashMap<&'static str, TypeState>,
    snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

fn known_type(t: &str) -> Option<&'static str> {
    api::TYPES.iter().copied().find(|k| *k == t)
}

impl GatewayStream {
    /// Serves the stream until the gateway goes away or this replica stops leading; says why.
    async fn run(
        &mut self,
        first: DeltaDiscoveryRequest,
        mut incoming: Streaming<DeltaDiscoveryRequest>,
    ) -> String {
        let mut serving = self.server.inner.serving.clone();
        let mut closing = self.server.inner.closing.subscribe();
        if let Err(e) = self.request(first).await {
            return e;
        }
        loop {
            tokio::select! {
                message = incoming.next() => match message {
                    Some(Ok(m)) => if let Err(e) = self.request(m).await { return e },
                    Some(Err(e)) => return format!("stream error: {e}"),
                    None => return "stream closed by the gateway".into(),
                },
                changed = self.snapshot.changed() => {
                    if changed.is_err() { return "server stopped".into() }
                    for t in api::TYPES {
                        if let Err(e) = self.push(t).await { return e }
                    }
                }
                // A dropped sender never changes again.
                _ = async { if serving.wait_for(|s| !*s).await.is_err() { std::future::pending::<()>().await } } => {
                    let _ = self.tx.send(Err(Status::unavailable("this llmroute operator replica stopped leading"))).await;
                    return "stopped leading".into();
                }
                _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                    let _ = self.tx.send(Err(Status::unavailable("the llmroute operator is shutting down"))).await;
                    return "server shutting down".into();
                }
            }
        }
    }

    fn with_acks<T>(&self, f: impl FnOnce(&mut Acks) -> T) -> T {
        let mut gateways = self.server.inner.gateways.lock().expect("gateways");
        let gateway = gateways.get_mut(&self.id).expect("registered stream");
        f(&mut gateway.acks)
    }

    async fn request(&mut self, m: DeltaDiscoveryRequest) -> Result<(), String> {
        let Some(t) = known_type(&m.type_url) else {
            debug!(namespace = %self.ns, node = %self.node, type_url = %m.type_url, "subscription to a type llmroute does not serve");
            return Ok(());
        };
        if !m.response_nonce.is_empty() {
            let error = m.error_detail.as_ref().map(|e| e.message.as_str());
            let answer = self.with_acks(|a| a.answer(&m.response_nonce, error));
            let kind = api::message_name(t)
                .rsplit('.')
                .next()
                .unwrap_or(t)
                .to_string();
            match &answer {
                Answer::Ack => {
                    debug!(namespace = %self.ns, node = %self.node, type_url = t, nonce = %m.response_nonce, "ACK")
                }
                Answer::Nack(e) => {
                    warn!(namespace = %self.ns, node = %self.node, type_url = t, error = %e, "gateway rejected the configuration (NACK)");
                    self.server
                        .inner
                        .metrics
                        .xds_rejections
                        .get_or_create(&XdsPushLabels {
                            namespace: self.ns.clone(),
                            kind: kind.clone(),
                        })
                        .inc();
                }
                Answer::Unknown => {}
            }
            if answer != Answer::Unknown {
                self.server.event(&self.ns);
                self.server.inner.answered.notify_waiters();
            }
        }
        let first = !self.types.contains_key(t);
        let state = self.types.entry(t).or_default();
        state.subscribe(
            t,
            first,
            &m.resource_names_subscribe,
            &m.resource_names_unsubscribe,
        );
        if !m.initial_resource_versions.is_empty() {
            state.initial_versions(&m.initial_resource_versions);
            self.with_acks(|a| a.initial(t, &m.initial_resource_versions));
            self.server.event(&self.ns);
        }
        self.push(t).await
    }

    /// Sends what the gateway lacks of type `t`, if it subscribed to it.
    async fn push(&mut self, t: &'static str) -> Result<(), String> {
        // `borrow`, not `borrow_and_update`: a push for one type (answering the gateway's
        // request) must not mark a snapshot that arrived meanwhile as seen, or its other types
        // would wait for the next snapshot (`run` pushes every type when it sees one).
        let Some(snapshot) = self.snapshot.borrow().clone() else {
            return Ok(());
        };
        let Some(state) = self.types.get_mut(t) else {
            return Ok(());
        };
        let update = state.diff(snapshot.resources.get(t));
        if update.is_empty() {
            return Ok(());
        }
        state.mark_sent(&update);
        let nonce = self
            .server
            .inner
            .next_nonce
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.number.to_string(),
            type_url: t.to_string(),
            nonce: nonce.clone(),
            removed_resources: update.removed.clone(),
            resources: update
                .resources
                .iter()
                .map(|(name, e)| api::Resource {
                    name: name.clone(),
                    version: e.version.clone(),
                    resource: Some(prost_types::Any {
                        type_url: t.to_string(),
                        value: e.bytes.as_ref().clone(),
                    }),
                })
                .collect(),
        };
        self.with_acks(|a| a.sent(&nonce, t, &update));
        let kind = api::message_name(t)
            .rsplit('.')
            .next()
            .unwrap_or(t)
            .to_string();
        self.server
            .inner
            .metrics
            .xds_pushes
            .get_or_create(&XdsPushLabels {
                namespace: self.ns.clone(),
                kind,
            })
            .inc();
        debug!(namespace = %self.ns, node = %self.node, type_url = t, nonce = %nonce, updated = update.resources.len(), removed = update.removed.len(), snapshot = snapshot.number, "push");
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| "the gateway's stream is gone".to_string())
    }
}

/// The `envoy.service.discovery.v3.AggregatedDiscoveryService` gRPC service (delta only: the
/// bootstrap llmroute writes asks for `DELTA_GRPC`).
#[derive(Clone)]
pub struct AdsService {
    server: XdsServer,
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct DeltaMethod(XdsServer);

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl tonic::server::StreamingService<DeltaDiscoveryRequest> for DeltaMethod {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            let rx = server.stream(request).await?;
            let stream: ResponseStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for AdsService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        Box::pin(async move {
            if req.uri().path() == DELTA_PATH {
                let codec = tonic_prost::ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.streaming(DeltaMethod(server), req).await)
            } else {
                Ok(Status::unimplemented(format!(
                    "{} is not served: llmroute serves delta ADS only",
                    req.uri().path()
                ))
                .into_http())
            }
        })
    }
}

/// The rustls configuration the server accepts connections with; replaced when the serving
/// certificate is renewed.
pub type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Resolves when `rx` holds `want`; never, if its sender is gone and it does not.
async fn until(rx: &mut watch::Receiver<bool>, want: bool) {
    if rx.wait_for(|v| *v == want).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves xDS on `addr` with mutual TLS while this replica serves (it leads, or leader election is
/// off), until `shutdown`. The address is bound for each term of leadership and released when the
/// term ends: a standby accepts no connection at all, so gateways only ever reach the leader.
pub async fn serve(
    addr: std::net::SocketAddr,
    tls: TlsConfig,
    server: XdsServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut serving = server.inner.serving.clone();
    loop {
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = until(&mut serving, true) => {}
            _ = until(&mut stop, true) => break,
        }
        // The previous holder of the address (this replica's last term, or a process just
        // stopped) may take a moment to release it.
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break Some(l),
                Err(e) => {
                    warn!(%addr, error = %e, "cannot listen for xDS yet; retrying");
                    let mut stop = stop_rx.clone();
                    let mut serving = serving.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = until(&mut stop, true) => break None,
                        _ = until(&mut serving, false) => break None,
                    }
                }
            }
        };
        let Some(listener) = listener else {
            if *stop_rx.borrow() {
                break;
            }
            continue;
        };
        info!(%addr, "serving xDS");
        let term_end = {
            let (mut stop, mut serving) = (stop_rx.clone(), serving.clone());
            async move {
                tokio::select! {
                    _ = until(&mut stop, true) => {}
                    _ = until(&mut serving, false) => {}
                }
            }
        };
        if let Err(e) = serve_term(listener, tls.clone(), server.clone(), term_end).await {
            warn!(error = %e, "the xDS server failed");
        }
        info!(%addr, "stopped serving xDS");
        if *stop_rx.borrow() {
            break;
        }
    }
    // Streams still open end now: their gateways reconnect to whoever serves next.
    server.inner.closing.send_replace(true);
}

/// One term: accepts on `listener` until `end`.
async fn serve_term(
    listener: tokio::net::TcpListener,
    tls: TlsConfig,
    server: XdsServer,
    end: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Handshakes run side by side: a slow or silent client never holds up the next accept.
    let (conns, incoming) = mpsc::channel(64);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "xDS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let config = tls.read().expect("TLS config").clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conns.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "xDS TLS handshake failed"),
                    Err(_) => debug!(%peer, "xDS TLS handshake timed out"),
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);
    // At the end of the term: stop listening, end every stream, then stop.
    let closing = server.inner.closing.clone();
    let end = async move {
        end.await;
        accept.abort();
        closing.send_replace(true);
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(server.service())
        .serve_with_incoming_shutdown(incoming, end)
        .await;
    // A new term starts with streams open again.
    server.inner.closing.send_replace(false);
    result
}

#[cfg(test)]
mod version_tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> Option<SemanticVersion> {
        Some(SemanticVersion {
            major_number: major,
            minor_number: minor,
            patch,
        })
    }

    #[test]
    fn only_the_checked_envoy_release_gets_configuration() {
        assert_eq!(refusal(v(1, 40, 0)), None);
        assert_eq!(refusal(v(1, 40, 3)), None);
        for other in [v(1, 39, 2), v(1, 41, 0), v(2, 40, 0), None] {
            let why = refusal(other).expect("refused");
            assert!(why.contains("1.40.x"), "{why}");
        }
        assert!(refusal(v(1, 41, 0)).unwrap().starts_with("Envoy 1.41.0 "));
    }
}
