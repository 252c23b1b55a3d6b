//! LLM provider simulators on 127.0.0.1: one HTTP server per simulated provider, following that
//! provider's contract (base path, auth header, models, error bodies; see [`provider`]), answering
//! OpenAI-shaped chat completions (JSON or incrementally flushed SSE), the models list and one
//! model (`GET /models/{model}`) and, where the provider serves them ([`SimProvider::serves`]),
//! embeddings, text completions and responses, with faults switchable at run time ([`Fault`]),
//! per-request fault scripts, request recording, and an admin API under `/__sim/` on the same port
//! for other processes.
//!
//! The answers follow OpenAI's API reference (https://platform.openai.com/docs/api-reference), as
//! strictly as the official SDKs read it: every field the reference lists (and the openai-python
//! SDK's models require), the streams' events in their order (a streamed response is the Responses
//! API's whole event sequence, see `response_events`). devkit/tests/sdk_contract.rs checks every
//! operation with the openai-python SDK's own parsers and stream accumulators.
//!
//! | method and path | body / answer |
//! |---|---|
//! | `GET /__sim/info` | `{"provider","port","base_url","request_count","fault"}` |
//! | `GET /__sim/fault`, `PUT /__sim/fault` | a fault as JSON (see [`Fault::from_json`]); with `"next": N` it applies to the next N requests only |
//! | `GET /__sim/requests`, `DELETE /__sim/requests` | the recorded requests (`at_ms` since start) / clear them |
//! | `PUT /__sim/keys` | `{"keys":["k1","k2"]}` |

pub mod provider;

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use provider::Failure;
pub use provider::{ALL_PROVIDERS, AuthStyle, Endpoint, OPENAI_REGION_BLOCKED, SimProvider};

/// A failure mode of the simulated provider, switchable at run time ([`Sim::set_fault`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Normal answers.
    #[default]
    None,
    /// The provider refuses the caller's region: OpenAI's 403 `unsupported_country_region_territory`,
    /// Anthropic's 403 "not available in your region"; the OpenAI body for the others.
    RegionBlocked,
    /// 429 with a `retry-after` header and the provider's rate-limit body.
    RateLimited { retry_after_secs: u64 },
    /// No balance / quota: the provider's own status and body (429, 402, 400, 403...).
    QuotaExhausted,
    /// A 403 that is not a region block (no access to the model / operation).
    PermissionDenied,
    /// 500 with the provider's body.
    ServerError,
    /// 503 (Anthropic: 529 `overloaded_error`).
    Unavailable,
    /// Reads the request and never answers (until the simulator stops).
    Hang,
    /// Waits this long before the status line, then answers normally.
    SlowFirstByte(Duration),
    /// Connections are reset (RST) when a request arrives on them, new and kept-alive ones alike;
    /// the port stays bound so `set_fault(Fault::None)` restores service. Admin requests pass.
    ConnectionRefused,
    /// Streams send `after_chunks` chunks then the connection is cut, without `[DONE]`; a
    /// non-streaming answer is cut in the middle of its JSON body.
    StreamBreak { after_chunks: usize },
    /// Alternates every `period`: healthy first, then `fault`, then healthy... (counted from the
    /// moment the fault is set).
    Flap { period: Duration, fault: Box<Fault> },
}

impl Fault {
    /// `Flap` between healthy and a region block.
    pub fn flap(period: Duration) -> Fault {
        Fault::Flap {
            period,
            fault: Box::new(Fault::RegionBlocked),
        }
    }

    /// Parses the admin API's JSON: `{"fault":"none"|"region-blocked"|"quota-exhausted"|
    /// "permission-denied"|"server-error"|"unavailable"|"hang"|"connection-refused"}`,
    /// `{"fault":"rate-limited","retry_after_secs":N}` (default 1),
    /// `{"fault":"slow-first-byte","ms":N}`, `{"fault":"stream-break","after_chunks":N}`,
    /// `{"fault":"flap","period_ms":N,"inner":{...}}` (inner default region-blocked).
    pub fn from_json(v: &Value) -> Result<Fault, String> {
        let name = v
            .get("fault")
            .and_then(Value::as_str)
            .ok_or("expected {\"fault\": \"<name>\", ...}")?;
        let num = |k: &str| v.get(k).and_then(Value::as_u64);
        Ok(match name {
            "none" | "ok" => Fault::None,
            "region-blocked" => Fault::RegionBlocked,
            "rate-limited" => Fault::RateLimited {
                retry_after_secs: num("retry_after_secs").unwrap_or(1),
            },
            "quota-exhausted" => Fault::QuotaExhausted,
            "permission-denied" => Fault::PermissionDenied,
            "server-error" => Fault::ServerError,
            "unavailable" => Fault::Unavailable,
            "hang" => Fault::Hang,
            "slow-first-byte" => Fault::SlowFirstByte(Duration::from_millis(
                num("ms").ok_or("slow-first-byte needs \"ms\"")?,
            )),
            "connection-refused" => Fault::ConnectionRefused,
            "stream-break" => Fault::StreamBreak {
                after_chunks: num("after_chunks").unwrap_or(1) as usize,
            },
            "flap" => Fault::Flap {
                period: Duration::from_millis(num("period_ms").ok_or("flap needs \"period_ms\"")?),
                fault: Box::new(match v.get("inner") {
                    Some(inner) => Fault::from_json(inner)?,
                    None => Fault::RegionBlocked,
                }),
            },
            other => return Err(format!("unknown fault {other:?}")),
        })
    }

    /// The admin API's JSON for this fault (inverse of [`Fault::from_json`]).
    pub fn to_json(&self) -> Value {
        match self {
            Fault::None => json!({ "fault": "none" }),
            Fault::RegionBlocked => json!({ "fault": "region-blocked" }),
            Fault::RateLimited { retry_after_secs } => {
                json!({ "fault": "rate-limited", "retry_after_secs": retry_after_secs })
            }
            Fault::QuotaExhausted => json!({ "fault": "quota-exhausted" }),
            Fault::PermissionDenied => json!({ "fault": "permission-denied" }),
            Fault::ServerError => json!({ "fault": "server-error" }),
            Fault::Unavailable => json!({ "fault": "unavailable" }),
            Fault::Hang => json!({ "fault": "hang" }),
            Fault::SlowFirstByte(d) => {
                json!({ "fault": "slow-first-byte", "ms": d.as_millis() as u64 })
            }
            Fault::ConnectionRefused => json!({ "fault": "connection-refused" }),
            Fault::StreamBreak { after_chunks } => {
                json!({ "fault": "stream-break", "after_chunks": after_chunks })
            }
            Fault::Flap { period, fault } => json!({
                "fault": "flap", "period_ms": period.as_millis() as u64, "inner": fault.to_json()
            }),
        }
    }

    fn involves_connection(&self) -> bool {
        match self {
            Fault::ConnectionRefused => true,
            Fault::Flap { fault, .. } => fault.involves_connection(),
            _ => false,
        }
    }

    /// The fault in force at `elapsed` since it was set (resolves `Flap`).
    fn resolve(&self, elapsed: Duration) -> &Fault {
        match self {
            Fault::Flap { period, fault } => {
                let phase = elapsed.as_nanos() / period.as_nanos().max(1);
                if phase.is_multiple_of(2) {
                    &Fault::None
                } else {
                    fault.resolve(elapsed)
                }
            }
            f => f,
        }
    }
}

/// How to run a simulator. `SimConfig::new(provider)` gives the defaults; the builder methods set
/// single fields.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub provider: SimProvider,
    /// Accepted keys (any of them). Empty: `openai-compatible` needs no key; every other provider
    /// then rejects every request, as a provider does without a valid key.
    pub keys: Vec<String>,
    /// Served models; `None`: the provider's catalog models.
    pub models: Option<Vec<String>>,
    /// Accept any model name (the response names the model received).
    pub any_model: bool,
    /// Port on `address`; 0 picks a free one.
    pub port: u16,
    /// Address to listen on: 127.0.0.1, except in a Pod (tests/realnode.rs), where it is 0.0.0.0
    /// of the Pod's own network.
    pub address: std::net::IpAddr,
    /// With TLS: the port of the plain-HTTP simulator behind the TLS front (its `/__sim/` admin
    /// API is there); 0 picks a free one.
    pub admin_port: u16,
    /// Serve under this base path instead of the provider's (e.g. a self-hosted server at `/api`).
    pub base_path: Option<String>,
    /// `false`: any path ending in `/chat/completions` or `/models` is served.
    pub strict_paths: bool,
    /// Content chunks of a streamed answer (then a finish chunk and `[DONE]`).
    pub stream_chunks: usize,
    /// Pause before each streamed chunk after the first.
    pub stream_interval: Duration,
    /// Record requests (turn off for benchmarks).
    pub record: bool,
    /// Text appended to a whole completion's content (JSON-escaped in the answer): spaces make an
    /// answer larger (the gateway's limit on answers it reads whole is tested with it); text that
    /// looks like JSON tests that the gateway reads the answer's own fields, not its content's.
    pub content_suffix: String,
}

impl SimConfig {
    pub fn new(provider: SimProvider) -> SimConfig {
        SimConfig {
            provider,
            keys: Vec::new(),
            models: None,
            any_model: false,
            port: 0,
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            admin_port: 0,
            base_path: None,
            strict_paths: true,
            stream_chunks: 3,
            stream_interval: Duration::from_millis(10),
            record: true,
            content_suffix: String::new(),
        }
    }
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys = vec![key.into()];
        self
    }
    pub fn keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.keys = keys.into_iter().map(Into::into).collect();
        self
    }
    pub fn models(mut self, models: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }
    pub fn any_model(mut self) -> Self {
        self.any_model = true;
        self
    }
    pub fn address(mut self, address: std::net::IpAddr) -> Self {
        self.address = address;
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    pub fn base_path(mut self, path: impl Into<String>) -> Self {
        self.base_path = Some(path.into().trim_end_matches('/').to_string());
        self
    }
    pub fn lenient_paths(mut self) -> Self {
        self.strict_paths = false;
        self
    }
    pub fn stream(mut self, chunks: usize, interval: Duration) -> Self {
        self.stream_chunks = chunks;
        self.stream_interval = interval;
        self
    }
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }
    /// Whole completions `bytes` larger (spaces at the end of the content).
    pub fn padding(mut self, bytes: usize) -> Self {
        self.content_suffix = " ".repeat(bytes);
        self
    }
    /// `text` at the end of whole completions' content.
    pub fn content_suffix(mut self, text: impl Into<String>) -> Self {
        self.content_suffix = text.into();
        self
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::new(SimProvider::OpenAI)
    }
}

/// One request as the simulated provider saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query, as received.
    pub path: String,
    /// Lowercase header name → value (repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Null` when empty or not JSON).
    pub body: Value,
    /// The model asked for: the body's `model`, or Azure's deployment.
    pub model: Option<String>,
    pub stream: bool,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    fn to_json(&self, start: Instant) -> Value {
        json!({
            "method": self.method, "path": self.path, "headers": self.headers, "body": self.body,
            "model": self.model, "stream": self.stream,
            "at_ms": self.at.saturating_duration_since(start).as_secs_f64() * 1000.0,
        })
    }
}

struct FaultState {
    fault: Fault,
    since: Instant,
    script: VecDeque<Fault>,
}

struct Shared {
    provider: SimProvider,
    prefixes: Vec<String>,
    strict_paths: bool,
    models: Vec<String>,
    any_model: bool,
    stream_chunks: usize,
    stream_interval: Duration,
    record: bool,
    content_suffix: String,
    port: u16,
    base_url: String,
    started: Instant,
    keys: RwLock<Vec<String>>,
    fault: Mutex<FaultState>,
    /// Set when the fault or the script may reset connections (checked on every read).
    conn_faults: AtomicBool,
    records: Mutex<Vec<Received>>,
    count: AtomicU64,
    /// The usage of every answer sent whole (a completion, a stream's usage chunk).
    usage_sent: Arc<Mutex<Usage>>,
    stop: watch::Receiver<bool>,
}

impl Shared {
    /// The fault for the next request: the script's head if any, else the standing fault.
    fn take_fault(&self) -> Fault {
        let mut st = self.fault.lock().unwrap();
        let fault = match st.script.pop_front() {
            Some(f) => f.resolve(st.since.elapsed()).clone(),
            None => st.fault.resolve(st.since.elapsed()).clone(),
        };
        self.update_conn_faults(&st);
        fault
    }

    /// Whether a request arriving now must have its connection reset (consumes a scripted
    /// `ConnectionRefused`). Admin requests are never refused.
    fn refuse_connection(&self) -> bool {
        if !self.conn_faults.load(Ordering::Relaxed) {
            return false;
        }
        let mut st = self.fault.lock().unwrap();
        let elapsed = st.since.elapsed();
        let refuse = match st.script.front() {
            Some(f) if *f.resolve(elapsed) == Fault::ConnectionRefused => {
                st.script.pop_front();
                true
            }
            Some(_) => false,
            None => *st.fault.resolve(elapsed) == Fault::ConnectionRefused,
        };
        self.update_conn_faults(&st);
        refuse
    }

    fn update_conn_faults(&self, st: &FaultState) {
        let any =
            st.fault.involves_connection() || st.script.iter().any(Fault::involves_connection);
        self.conn_faults.store(any, Ordering::Relaxed);
    }
}

/// Stops the server when the last [`Sim`] clone is dropped.
struct StopGuard(watch::Sender<bool>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// A running simulator. Clones share it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
    _guard: Arc<StopGuard>,
    /// With [`Sim::start_tls`]: the HTTPS front and its base URL.
    tls: Option<(Arc<crate::tls::TlsFront>, String)>,
}

impl Sim {
    /// Binds `config.address`:`config.port` (0: any free port) and serves until dropped.
    pub async fn start(config: SimConfig) -> io::Result<Sim> {
        let listener = TcpListener::bind((config.address, config.port)).await?;
        let port = listener.local_addr()?.port();
        let provider = config.provider;
        let prefixes: Vec<String> = match &config.base_path {
            Some(p) => vec![p.clone()],
            None => provider.prefixes().iter().map(|p| p.to_string()).collect(),
        };
        let base_path = config
            .base_path
            .clone()
            .unwrap_or_else(|| provider.base_path().to_string());
        let models = config.models.clone().unwrap_or_else(|| {
            provider
                .catalog_models()
                .iter()
                .map(|m| m.to_string())
                .collect()
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            provider,
            prefixes,
            strict_paths: config.strict_paths,
            models,
            any_model: config.any_model,
            stream_chunks: config.stream_chunks,
            stream_interval: config.stream_interval,
            record: config.record,
            content_suffix: config.content_suffix.clone(),
            port,
            base_url: format!("http://127.0.0.1:{port}{base_path}"),
            started: Instant::now(),
            keys: RwLock::new(config.keys.clone()),
            fault: Mutex::new(FaultState {
                fault: Fault::None,
                since: Instant::now(),
                script: VecDeque::new(),
            }),
            conn_faults: AtomicBool::new(false),
            records: Mutex::new(Vec::new()),
            count: AtomicU64::new(0),
            usage_sent: Arc::default(),
            stop: stop_rx.clone(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = SimListener { inner: listener };
        let mut stop = stop_rx;
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<ConnHandle>();
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(Sim {
            shared,
            _guard: Arc::new(StopGuard(stop_tx)),
            tls: None,
        })
    }

    /// Like [`Sim::start`], reached over HTTPS: a TLS front with `ca`'s server certificate
    /// (`config.port` is the front's port; the simulator itself listens on a free port).
    /// [`Sim::base_url`] is then `https://127.0.0.1:<front>/<base path>`.
    pub async fn start_tls(config: SimConfig, ca: &crate::tls::TestCa) -> io::Result<Sim> {
        Sim::start_tls_with(config, ca.acceptor()).await
    }

    /// Like [`Sim::start_tls`], with the server certificate of `acceptor` (e.g. one issued for the
    /// simulator's Service name, see [`crate::tls::acceptor_from_pem`]).
    pub async fn start_tls_with(
        config: SimConfig,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> io::Result<Sim> {
        let (front_port, address) = (config.port, config.address);
        let admin_port = config.admin_port;
        let mut sim = Sim::start(SimConfig {
            port: admin_port,
            ..config
        })
        .await?;
        let front =
            crate::tls::TlsFront::start_with(acceptor, address, sim.port(), front_port).await?;
        let path = sim
            .shared
            .base_url
            .trim_start_matches("http://")
            .split_once('/')
            .map(|(_, p)| format!("/{p}"))
            .unwrap_or_default();
        let url = format!("https://127.0.0.1:{}{path}", front.port);
        sim.tls = Some((Arc::new(front), url));
        Ok(sim)
    }

    pub fn provider(&self) -> SimProvider {
        self.shared.provider
    }
    pub fn port(&self) -> u16 {
        self.shared.port
    }
    /// `http://127.0.0.1:PORT` + the provider's base path (e.g. `/api/paas/v4`; nothing for Azure
    /// and DeepSeek), as a backend's `endpoint` would be written.
    pub fn base_url(&self) -> &str {
        match &self.tls {
            Some((_, url)) => url,
            None => &self.shared.base_url,
        }
    }
    /// The port clients connect to: the TLS front's with [`Sim::start_tls`], else the simulator's.
    pub fn public_port(&self) -> u16 {
        match &self.tls {
            Some((front, _)) => front.port,
            None => self.shared.port,
        }
    }
    /// The models served (empty meaning nothing with `any_model`).
    pub fn models(&self) -> &[String] {
        &self.shared.models
    }
    /// Accept only `key` from now on (rotation).
    pub fn set_key(&self, key: &str) {
        *self.shared.keys.write().unwrap() = vec![key.to_string()];
    }
    /// Accept any of `keys` from now on (rotation with overlap).
    pub fn set_keys(&self, keys: Vec<String>) {
        *self.shared.keys.write().unwrap() = keys;
    }
    /// The standing fault; also clears the script.
    pub fn set_fault(&self, fault: Fault) {
        let mut st = self.shared.fault.lock().unwrap();
        st.fault = fault;
        st.since = Instant::now();
        st.script.clear();
        self.shared.update_conn_faults(&st);
    }
    pub fn fault(&self) -> Fault {
        self.shared.fault.lock().unwrap().fault.clone()
    }
    /// The next requests get these faults, one each, in order; then the standing fault again.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        let mut st = self.shared.fault.lock().unwrap();
        st.script.extend(faults);
        self.shared.update_conn_faults(&st);
    }
    /// The next `n` requests get `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.script(std::iter::repeat_n(fault, n));
    }
    /// The recorded requests, oldest first (admin requests excluded).
    pub fn requests(&self) -> Vec<Received> {
        self.shared.records.lock().unwrap().clone()
    }
    /// The most recent recorded request.
    pub fn last_request(&self) -> Option<Received> {
        self.shared.records.lock().unwrap().last().cloned()
    }
    pub fn clear_requests(&self) {
        self.shared.records.lock().unwrap().clear();
    }
    /// Requests answered or failed at the HTTP level since start (counted even when not recorded;
    /// connections reset by `ConnectionRefused` are not requests).
    pub fn request_count(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }
    /// The usage reported in every answer sent whole since start (see [`Usage`]).
    pub fn usage_sent(&self) -> Usage {
        *self.shared.usage_sent.lock().unwrap()
    }
}

/// The listener: accepted connections are wrapped so `ConnectionRefused` can reset them.
struct SimListener {
    inner: TcpListener,
}

impl axum::serve::Listener for SimListener {
    type Io = SimIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (SimIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        SimIo {
                            inner: stream,
                            kill: Arc::new(AtomicBool::new(false)),
                        },
                        addr,
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection the handler can order reset (`ConnectionRefused`): its next read or write fails
/// and the socket is closed with SO_LINGER 0, so the peer sees a reset.
struct SimIo {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl SimIo {
    fn killed(&self) -> Option<io::Error> {
        if !self.kill.load(Ordering::Relaxed) {
            return None;
        }
        let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
        Some(io::Error::from(io::ErrorKind::ConnectionReset))
    }
}

/// The handler's handle on its connection.
#[derive(Clone)]
struct ConnHandle(Arc<AtomicBool>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, SimListener>>
    for ConnHandle
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, SimListener>) -> Self {
        ConnHandle(stream.io().kill.clone())
    }
}

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a request asks the provider for.
enum Op<'a> {
    Chat {
        deployment: Option<&'a str>,
    },
    Models,
    /// `GET /models/{model}`: the model's id as in the path (percent-encoded).
    Model(&'a str),
    /// Embeddings, completions or a response (Azure: of a deployment).
    Other {
        endpoint: Endpoint,
        deployment: Option<&'a str>,
    },
}

impl<'a> Op<'a> {
    fn deployment(&self) -> Option<&'a str> {
        match self {
            Op::Chat { deployment } | Op::Other { deployment, .. } => *deployment,
            Op::Models | Op::Model(_) => None,
        }
    }
}

/// The operation `rest` (a path below the base) names, if the provider serves it.
fn op_of<'a>(provider: SimProvider, rest: &str, deployment: Option<&'a str>) -> Option<Op<'a>> {
    if rest == "chat/completions" {
        return Some(Op::Chat { deployment });
    }
    Endpoint::ALL
        .into_iter()
        .find(|e| e.path() == rest && provider.serves(*e))
        .map(|endpoint| Op::Other {
            endpoint,
            deployment,
        })
}

fn route<'a>(shared: &Shared, path: &'a str, query: Option<&str>) -> Result<Op<'a>, Failure<'a>> {
    if shared.provider == SimProvider::AzureOpenAI && shared.strict_paths {
        let has_version = query
            .unwrap_or_default()
            .split('&')
            .any(|kv| kv.starts_with("api-version=") && kv.len() > "api-version=".len());
        let rest = path.strip_prefix(shared.prefixes.first().map_or("", |p| p.as_str()));
        let op = match rest {
            Some("/openai/models") => Some(Op::Models),
            Some(rest) if rest.starts_with("/openai/models/") => rest
                .strip_prefix("/openai/models/")
                .filter(|id| !id.is_empty())
                .map(Op::Model),
            Some(rest) => rest
                .strip_prefix("/openai/deployments/")
                .and_then(|r| r.split_once('/'))
                .filter(|(d, _)| !d.is_empty())
                .and_then(|(d, op)| op_of(shared.provider, op, Some(d))),
            None => None,
        };
        return match op {
            Some(_) if !has_version => Err(Failure::MissingApiVersion),
            Some(op) => Ok(op),
            None => Err(Failure::UnknownPath { method: "", path }),
        };
    }
    if !shared.strict_paths {
        if path.ends_with("/chat/completions") {
            return Ok(Op::Chat { deployment: None });
        }
        if path.ends_with("/models") {
            return Ok(Op::Models);
        }
        if let Some((_, id)) = path.split_once("/models/").filter(|(_, id)| !id.is_empty()) {
            return Ok(Op::Model(id));
        }
        if let Some(op) = path
            .rsplit_once('/')
            .and_then(|(_, last)| op_of(shared.provider, last, None))
        {
            return Ok(op);
        }
    }
    for prefix in &shared.prefixes {
        match path.strip_prefix(prefix.as_str()) {
            Some("/models") => return Ok(Op::Models),
            Some(rest) if rest.starts_with("/models/") && rest.len() > "/models/".len() => {
                return Ok(Op::Model(&rest["/models/".len()..]));
            }
            Some(rest) => {
                if let Some(op) = rest
                    .strip_prefix('/')
                    .and_then(|r| op_of(shared.provider, r, None))
                {
                    return Ok(op);
                }
            }
            None => {}
        }
    }
    Err(Failure::UnknownPath { method: "", path })
}

/// The key the request carries, in the provider's header. `None`: no key at all.
fn presented_key(provider: SimProvider, headers: &HeaderMap) -> Option<&str> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match provider.auth() {
        AuthStyle::Bearer => value("authorization").map(|v| v.strip_prefix("Bearer ").unwrap_or(v)),
        AuthStyle::ApiKey => value("api-key"),
        AuthStyle::XApiKey => value("x-api-key"),
    }
    .filter(|k| !k.is_empty())
}

#[derive(serde::Deserialize, Default)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    messages: Vec<PeekMessage>,
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(serde::Deserialize)]
struct PeekMessage {
    #[serde(default)]
    content: Value,
}

/// Token usage as the simulator reports it. The rule is the simulator's own, deterministic so that
/// tests can predict it: one prompt token per whitespace-separated word of the messages' text, one
/// completion token per word or streamed piece of the answer, a quarter of the prompt (rounded
/// down) reported as cached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl Usage {
    fn of(messages: &[PeekMessage], completion: u64) -> Usage {
        let words = |s: &str| s.split_whitespace().count() as u64;
        let prompt = messages
            .iter()
            .map(|m| match &m.content {
                Value::String(s) => words(s),
                // Content parts: [{"type": "text", "text": "..."}, ...].
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(words)
                    .sum(),
                _ => 0,
            })
            .sum();
        Usage {
            prompt,
            completion,
            cached: prompt / 4,
        }
    }

    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }

    /// OpenAI's `usage` object of chat completions (API reference, "The chat completion object"),
    /// with its token details.
    fn json(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            self.prompt,
            self.completion,
            self.total(),
            self.cached
        )
    }

    fn add(&mut self, other: &Usage) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.cached += other.cached;
    }
}

fn json_response(status: StatusCode, provider: SimProvider, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("x-sim-provider", HeaderValue::from_static(provider.id()));
    resp
}

fn failure(shared: &Shared, f: Failure<'_>) -> Response {
    let (status, body) = shared.provider.failure(&f);
    json_response(status, shared.provider, body.to_string())
}

/// Every answer of OpenAI's API carries its account's headers (OpenAI API reference, "Debugging
/// requests" and "Rate limits": `openai-organization`, `openai-project`, `openai-processing-ms`,
/// `openai-version`, `x-request-id`, `x-ratelimit-*`) and Cloudflare's cookie (`__cf_bm`): the
/// simulator sends them too, so that a test sees what the gateway passes on to a workload.
async fn handle(
    state: State<Arc<Shared>>,
    conn: ConnectInfo<ConnHandle>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let openai = state.provider == SimProvider::OpenAI && !uri.path().starts_with("/__sim/");
    let mut resp = serve(state, conn, method, uri, headers, body).await;
    if openai {
        let h = resp.headers_mut();
        for (name, value) in [
            ("openai-organization", "org-sim-account"),
            ("openai-project", "proj_sim_account"),
            ("openai-processing-ms", "12"),
            ("openai-version", "2020-10-01"),
            ("x-request-id", "req_sim0001"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-tokens", "29999000"),
            (
                "set-cookie",
                "__cf_bm=sim; path=/; HttpOnly; Secure; SameSite=None",
            ),
        ] {
            h.insert(name, HeaderValue::from_static(value));
        }
    }
    resp
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    if path.starts_with("/__sim/") {
        return admin(&shared, &method, path, &body);
    }
    if shared.refuse_connection() {
        // The response is never written: the connection is reset instead.
        conn.0.store(true, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let n = shared.count.fetch_add(1, Ordering::Relaxed) + 1;

    let peek: Peek<'_> = serde_json::from_slice(&body).unwrap_or_default();
    if shared.record {
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut hs = BTreeMap::new();
        for (name, value) in &headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            hs.entry(name.as_str().to_string())
                .and_modify(|v: &mut String| {
                    v.push_str(", ");
                    v.push_str(&value)
                })
                .or_insert_with(|| value.into_owned());
        }
        let deployment = route(&shared, path, uri.query())
            .ok()
            .and_then(|op| op.deployment())
            .map(str::to_string);
        let received_model = deployment.or(peek.model.as_deref().map(str::to_string));
        shared.records.lock().unwrap().push(Received {
            method: method.to_string(),
            path: uri
                .path_and_query()
                .map_or(path, |p| p.as_str())
                .to_string(),
            headers: hs,
            body: json,
            model: received_model,
            stream: peek.stream.unwrap_or(false),
            at: Instant::now(),
        });
    }
    let stream = peek.stream.unwrap_or(false);
    // OpenAI sends usage in a stream only when asked (`stream_options.include_usage`).
    let stream_usage = peek
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let model = peek.model;

    let op = match route(&shared, path, uri.query()) {
        Ok(op) => op,
        Err(Failure::UnknownPath { path, .. }) => {
            return failure(
                &shared,
                Failure::UnknownPath {
                    method: method.as_str(),
                    path,
                },
            );
        }
        Err(f) => return failure(&shared, f),
    };

    // Authentication.
    {
        let keys = shared.keys.read().unwrap();
        let open = keys.is_empty() && shared.provider == SimProvider::OpenAICompatible;
        if !open {
            match presented_key(shared.provider, &headers) {
                None => return failure(&shared, Failure::BadKey { missing: true }),
                Some(k) if !keys.iter().any(|ok| ok == k) => {
                    return failure(&shared, Failure::BadKey { missing: false });
                }
                Some(_) => {}
            }
        }
    }
    if shared.provider == SimProvider::Anthropic && !headers.contains_key("anthropic-version") {
        return failure(&shared, Failure::MissingAnthropicVersion);
    }

    let model: Cow<'_, str> = match (&op, op.deployment()) {
        (Op::Models, _) => Cow::Borrowed(""),
        (Op::Model(id), _) => percent_decode(id),
        (_, Some(d)) => Cow::Borrowed(d),
        (_, None) => model.unwrap_or_default(),
    };

    // Faults.
    let fault = shared.take_fault();
    let mut break_after = None;
    match fault {
        Fault::None | Fault::ConnectionRefused => {}
        Fault::RegionBlocked => return failure(&shared, Failure::RegionBlocked),
        Fault::RateLimited { retry_after_secs } => {
            let mut resp = failure(&shared, Failure::RateLimited);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return resp;
        }
        Fault::QuotaExhausted => return failure(&shared, Failure::QuotaExhausted),
        Fault::PermissionDenied => return failure(&shared, Failure::PermissionDenied(&model)),
        Fault::ServerError => return failure(&shared, Failure::ServerError),
        Fault::Unavailable => return failure(&shared, Failure::Unavailable),
        Fault::Hang => {
            let mut stop = shared.stop.clone();
            let _ = stop.wait_for(|s| *s).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Fault::SlowFirstByte(d) => tokio::time::sleep(d).await,
        Fault::StreamBreak { after_chunks } => break_after = Some(after_chunks),
        Fault::Flap { .. } => unreachable!("resolved"),
    }

    match op {
        Op::Models => models_list(&shared),
        Op::Model(_) => {
            if !shared.any_model && !shared.models.iter().any(|m| **m == *model) {
                return failure(&shared, Failure::UnknownModel(&model));
            }
            json_response(
                StatusCode::OK,
                shared.provider,
                model_object(&shared, &model).to_string(),
            )
        }
        Op::Other { endpoint, .. } => {
            // The Responses API has no `stream_options.include_usage` (it always sends a stream's
            // usage, in `response.completed`); OpenAI rejects parameters an operation lacks.
            if endpoint == Endpoint::Responses
                && shared.provider == SimProvider::OpenAI
                && peek
                    .stream_options
                    .is_some_and(|o| o.include_usage.is_some())
            {
                return failure(
                    &shared,
                    Failure::UnknownParameter("stream_options.include_usage"),
                );
            }
            let known = match endpoint {
                // Azure: a deployment of the user's; self-hosted: whatever the server loaded.
                Endpoint::Embeddings => {
                    shared.provider.embedding_models().contains(&&*model)
                        || matches!(
                            shared.provider,
                            SimProvider::AzureOpenAI | SimProvider::OpenAICompatible
                        )
                }
                _ => shared.models.iter().any(|m| **m == *model),
            };
            if !shared.any_model && !known {
                return failure(&shared, Failure::UnknownModel(&model));
            }
            if stream && endpoint == Endpoint::Completions {
                // A text completion streams as chat does, in `text_completion` chunks.
                let prompt = serde_json::from_slice::<Value>(&body)
                    .map(|r| words_of(&r["prompt"]))
                    .unwrap_or(0);
                let usage = Usage {
                    prompt,
                    completion: shared.stream_chunks as u64,
                    cached: 0,
                };
                let usage = stream_usage.then_some(usage);
                return sse(&shared, n, &model, Chunks::Text, break_after, usage);
            }
            other(&shared, n, endpoint, &model, stream, &body)
        }
        Op::Chat { .. } => {
            if !shared.any_model && !shared.models.iter().any(|m| **m == *model) {
                return failure(&shared, Failure::UnknownModel(&model));
            }
            if stream {
                let usage = Usage::of(&peek.messages, shared.stream_chunks as u64);
                sse(
                    &shared,
                    n,
                    &model,
                    Chunks::Chat,
                    break_after,
                    stream_usage.then_some(usage),
                )
            } else {
                let usage = Usage::of(&peek.messages, 3);
                completion(&shared, n, &model, break_after, usage)
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// OpenAI's model object (API reference, "Models": `id`, `object: "model"`, `created`, `owned_by`),
/// an entry of the models list and the answer of `GET /models/{model}`.
fn model_object(shared: &Shared, id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": shared.provider.id() })
}

/// `GET /models` (API reference, "List models"): `{"object": "list", "data": [model, ...]}`.
fn models_list(shared: &Shared) -> Response {
    let data: Vec<Value> = shared
        .models
        .iter()
        .map(|m| model_object(shared, m))
        .collect();
    json_response(
        StatusCode::OK,
        shared.provider,
        json!({ "object": "list", "data": data }).to_string(),
    )
}

/// A path segment with its `%XX` escapes decoded (the SDKs percent-encode a model id in
/// `/models/{model}`; ids like `meta-llama/Llama-3.1-8B-Instruct` have a `/`).
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Whitespace-separated words of a string, or of the strings of a list (the `input` of embeddings
/// and responses, the `prompt` of completions; a response's input items count their text parts);
/// a number is one token (a prompt given as token ids).
fn words_of(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().map(words_of).sum(),
        Value::Object(o) => o
            .get("content")
            .or_else(|| o.get("text"))
            .map(words_of)
            .unwrap_or(0),
        _ => 0,
    }
}

/// Standard base64 (RFC 4648, with padding).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Embeddings, a text completion or a response (OpenAI's shapes, which the providers that serve
/// them follow): usage counts the input's words as prompt tokens and 3 completion tokens ("hello
/// from <provider>"); a streamed response is the Responses API's whole event sequence, its
/// `response.completed` carrying usage.
fn other(
    shared: &Shared,
    n: u64,
    endpoint: Endpoint,
    model: &str,
    stream: bool,
    body: &[u8],
) -> Response {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (json, usage) = match endpoint {
        Endpoint::Embeddings => embeddings(&request, model),
        Endpoint::Completions => text_completion(shared, n, &request, model),
        Endpoint::Responses => response_object(shared, n, &request, model),
    };
    shared.usage_sent.lock().unwrap().add(&usage);
    if stream && endpoint == Endpoint::Responses {
        // Each event as `event: <type>` and the event as JSON data, sent at once.
        let pieces: Vec<String> = (0..3).map(|i| piece(shared.provider.id(), i, 3)).collect();
        let text: String = response_events(&json, &pieces)
            .into_iter()
            .map(|event| {
                format!(
                    "event: {}\ndata: {event}\n\n",
                    event["type"].as_str().unwrap_or("")
                )
            })
            .collect();
        let mut resp = Response::new(Body::from(text));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            "x-sim-provider",
            HeaderValue::from_static(shared.provider.id()),
        );
        return resp;
    }
    json_response(StatusCode::OK, shared.provider, json.to_string())
}

/// `POST /embeddings` (OpenAI API reference, "Create embeddings" and "The embedding object"):
/// `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
/// "usage": {"prompt_tokens", "total_tokens"}}`, one embedding per input (4 numbers, or the
/// request's `dimensions`). With `"encoding_format": "base64"` (what the openai-python SDK asks
/// for when its caller names no format; its `lib/_parsing/_embeddings.py` decodes it) each
/// embedding is the base64 of its little-endian float32 values instead of a list of numbers.
fn embeddings(request: &Value, model: &str) -> (Value, Usage) {
    let inputs = match &request["input"] {
        // A list of strings, or of token-id lists; one list of token ids is one input.
        Value::Array(a) if a.iter().any(|v| !v.is_number()) => a.len().max(1),
        _ => 1,
    };
    let dims = request["dimensions"]
        .as_u64()
        .filter(|d| (1..=4096).contains(d))
        .unwrap_or(4) as usize;
    let base64_wanted = request["encoding_format"] == "base64";
    let usage = Usage {
        prompt: words_of(&request["input"]),
        completion: 0,
        cached: 0,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let values: Vec<f32> = [0.0125, -0.25, 0.5, i as f32 / 10.0]
                .into_iter()
                .cycle()
                .take(dims)
                .collect();
            let embedding = if base64_wanted {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Value::from(base64(&bytes))
            } else {
                json!(values)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let body = json!({
        "object": "list", "data": data, "model": model,
        "usage": { "prompt_tokens": usage.prompt, "total_tokens": usage.prompt },
    });
    (body, usage)
}

/// `POST /completions`, not streamed (OpenAI API reference, "The completion object"): `id`,
/// `object: "text_completion"`, `created`, `model`, `system_fingerprint`, `choices[]` with `text`,
/// `index`, `logprobs`, `finish_reason`, and `usage`.
fn text_completion(shared: &Shared, n: u64, request: &Value, model: &str) -> (Value, Usage) {
    let usage = Usage {
        prompt: words_of(&request["prompt"]),
        completion: 3,
        cached: 0,
    };
    let body = json!({
        "id": format!("cmpl-sim-{n}"), "object": "text_completion", "created": unix_now(),
        "model": model, "system_fingerprint": "fp_sim",
        "choices": [{ "text": format!("hello from {}", shared.provider.id()), "index": 0,
            "logprobs": null, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": usage.prompt, "completion_tokens": 3, "total_tokens": usage.prompt + 3 },
    });
    (body, usage)
}

/// `POST /responses`, completed (OpenAI API reference, "Responses" / "The response object"):
/// one assistant `message` output item (`msg_...`) holding one `output_text` part, `usage` with
/// `input_tokens`, `output_tokens`, `total_tokens` and their details; the request's `instructions`,
/// `max_output_tokens`, `previous_response_id`, `metadata`, `temperature`, `top_p`, `store` and
/// `user` echoed as OpenAI does, the other settings at OpenAI's defaults.
fn response_object(shared: &Shared, n: u64, request: &Value, model: &str) -> (Value, Usage) {
    let usage = Usage {
        prompt: words_of(&request["input"]),
        completion: 3,
        cached: 0,
    };
    let t = unix_now();
    let echo = |key: &str, default: Value| match &request[key] {
        Value::Null => default,
        v => v.clone(),
    };
    let text = format!("hello from {}", shared.provider.id());
    let body = json!({
        "id": format!("resp_sim{n}"), "object": "response", "created_at": t, "status": "completed",
        "background": false, "completed_at": t, "error": null, "incomplete_details": null,
        "instructions": echo("instructions", Value::Null),
        "max_output_tokens": echo("max_output_tokens", Value::Null), "max_tool_calls": null,
        "model": model,
        "output": [{ "type": "message", "id": format!("msg_sim{n}"), "status": "completed", "role": "assistant",
            "content": [{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }] }],
        "parallel_tool_calls": true,
        "previous_response_id": echo("previous_response_id", Value::Null),
        "reasoning": { "effort": null, "summary": null }, "service_tier": "default",
        "store": echo("store", Value::Bool(true)),
        "temperature": echo("temperature", json!(1.0)),
        "text": { "format": { "type": "text" }, "verbosity": "medium" },
        "tool_choice": "auto", "tools": [], "top_logprobs": 0,
        "top_p": echo("top_p", json!(1.0)), "truncation": "disabled",
        "usage": {
            "input_tokens": usage.prompt, "input_tokens_details": { "cached_tokens": 0, "cache_write_tokens": 0 },
            "output_tokens": 3, "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": usage.prompt + 3,
        },
        "user": echo("user", Value::Null), "metadata": echo("metadata", json!({})),
    });
    (body, usage)
}

/// The events of a streamed response whose completed form is `done` (one message output item with
/// one text part, its text sent as `pieces`), in the order and shapes of OpenAI's API reference,
/// "Streaming events" of the Responses API: `response.created`, `response.in_progress` (the
/// response with status `in_progress`, no output, no usage), `response.output_item.added` (the
/// message, `in_progress`, no content), `response.content_part.added` (an empty `output_text`),
/// one `response.output_text.delta` per piece, `response.output_text.done` (the whole text),
/// `response.content_part.done`, `response.output_item.done` (the message, completed) and
/// `response.completed` (the response with its usage); every event with its `sequence_number`
/// (0, 1, 2...) and the content events with `item_id`, `output_index` and `content_index`. The
/// order is a contract: the openai-python SDK's accumulator
/// (`lib/streaming/responses/_responses.py`, behind `client.responses.stream()`) rejects a content
/// event for an output item it has not seen added ("Received a content event for output index 0
/// before receiving its output item") and a stream that does not start with `response.created`.
fn response_events(done: &Value, pieces: &[String]) -> Vec<Value> {
    let mut started = done.clone();
    started["status"] = json!("in_progress");
    started["completed_at"] = Value::Null;
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    let item = &done["output"][0];
    let part = &item["content"][0];
    let mut item_started = item.clone();
    item_started["status"] = json!("in_progress");
    item_started["content"] = json!([]);
    let mut part_started = part.clone();
    part_started["text"] = json!("");
    let at = |kind: &str| json!({ "type": kind, "item_id": item["id"], "output_index": 0, "content_index": 0 });
    let mut events = vec![
        json!({ "type": "response.created", "response": started }),
        json!({ "type": "response.in_progress", "response": started }),
        json!({ "type": "response.output_item.added", "output_index": 0, "item": item_started }),
    ];
    let mut e = at("response.content_part.added");
    e["part"] = part_started;
    events.push(e);
    for p in pieces {
        let mut e = at("response.output_text.delta");
        e["delta"] = json!(p);
        e["logprobs"] = json!([]);
        events.push(e);
    }
    let mut e = at("response.output_text.done");
    e["text"] = part["text"].clone();
    e["logprobs"] = json!([]);
    events.push(e);
    let mut e = at("response.content_part.done");
    e["part"] = part.clone();
    events.push(e);
    events.push(json!({ "type": "response.output_item.done", "output_index": 0, "item": item }));
    events.push(json!({ "type": "response.completed", "response": done }));
    for (i, e) in events.iter_mut().enumerate() {
        e["sequence_number"] = json!(i);
    }
    events
}

/// A chat completion: "hello from <provider>" (three completion tokens), with its usage, in the
/// shape of OpenAI's API reference, "The chat completion object": `id`, `object`, `created`,
/// `model`, `choices[]` (`index`, `message` with `role`, `content`, `refusal`, `annotations`,
/// `logprobs`, `finish_reason`), `usage`, `service_tier`, `system_fingerprint`.
fn completion(
    shared: &Shared,
    n: u64,
    model: &str,
    break_after: Option<usize>,
    usage: Usage,
) -> Response {
    let p = shared.provider.id();
    let body = format!(
        r#"{{"id":"chatcmpl-sim-{n}","object":"chat.completion","created":{t},"model":{m},"choices":[{{"index":0,"message":{{"role":"assistant","content":{c},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{u},"service_tier":"default","system_fingerprint":"fp_sim"}}"#,
        t = unix_now(),
        m = Value::from(model),
        u = usage.json(),
        c = Value::from(format!("hello from {p}{}", shared.content_suffix)),
    );
    if break_after.is_some() {
        // Half the body, then the connection is cut (no content-length, chunked, never finished).
        let half = Bytes::from(body).slice(..40);
        let stream = futures::stream::unfold(Some(half), |half| async move {
            match half {
                Some(half) => Some((Ok(half), None)),
                None => {
                    // Let the half body reach the client before the cut.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "sim: stream break",
                        )),
                        None,
                    ))
                }
            }
        });
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut().insert(
            "x-sim-provider",
            HeaderValue::from_static(shared.provider.id()),
        );
        return resp;
    }
    shared.usage_sent.lock().unwrap().add(&usage);
    json_response(StatusCode::OK, shared.provider, body)
}

/// The content of streamed chunk `i` of `total`: together "hello from <provider>", then " ." each.
fn piece(provider: &str, i: usize, total: usize) -> String {
    let words = [
        "hello".to_string(),
        " from".to_string(),
        format!(" {provider}"),
    ];
    if total <= words.len() && i + 1 == total {
        return words[i..].concat();
    }
    words.get(i).cloned().unwrap_or_else(|| " .".to_string())
}

/// What a stream's chunks are: OpenAI's chat completion chunks (`chat.completion.chunk`, the text
/// in `choices[].delta.content`) or its legacy text completion's (`text_completion`, the text in
/// `choices[].text`; https://platform.openai.com/docs/api-reference/completions/object).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chunks {
    Chat,
    Text,
}

/// A streamed completion, as OpenAI's API reference describes it ("The chat completion chunk
/// object"; a text completion streams "completion objects"): `data: <chunk>` events, each chunk
/// with the completion's `id`, `object`, `created`, `model` (chat: `service_tier`,
/// `system_fingerprint`; its choice `index`, `delta`, `logprobs`, `finish_reason`, the first delta
/// with `role`), the text in pieces, a last choice with `finish_reason: "stop"`, then `[DONE]`.
/// With `usage` (the request asked with `stream_options.include_usage`), as OpenAI does: every
/// chunk carries `"usage": null` and a last chunk with no choices carries the usage, before
/// `[DONE]`.
fn sse(
    shared: &Shared,
    n: u64,
    model: &str,
    chunks: Chunks,
    break_after: Option<usize>,
    usage: Option<Usage>,
) -> Response {
    let total = shared.stream_chunks;
    let interval = shared.stream_interval;
    let provider = shared.provider.id();
    let sent = shared.usage_sent.clone();
    let (id, object) = match chunks {
        Chunks::Chat => ("chatcmpl-sim", "chat.completion.chunk"),
        Chunks::Text => ("cmpl-sim", "text_completion"),
    };
    let extra = match chunks {
        Chunks::Chat => r#""service_tier":"default","system_fingerprint":"fp_sim","#,
        Chunks::Text => "",
    };
    let prefix = format!(
        r#"{{"id":"{id}-{n}","object":"{object}","created":{t},"model":{m},{extra}"#,
        t = unix_now(),
        m = Value::from(model),
    );
    let tail = if usage.is_some() {
        r#"}],"usage":null}"#
    } else {
        "}]}"
    };
    // Events: content chunks 0..total, the finish chunk, the usage chunk when asked, [DONE].
    let last = total + 1 + usize::from(usage.is_some());
    let stream = futures::stream::unfold(0usize, move |i| {
        let (prefix, sent) = (prefix.clone(), sent.clone());
        async move {
            if i > last {
                return None;
            }
            if break_after.is_some_and(|b| i >= b.min(total)) {
                // Let the chunks sent so far reach the client before the cut.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "sim: stream break",
                    )),
                    usize::MAX,
                ));
            }
            if i > 0 && i < total {
                tokio::time::sleep(interval).await;
            }
            let head = format!(r#"{prefix}"choices":[{{"index":0,"#);
            let event = if i < total && chunks == Chunks::Text {
                let text = Value::from(piece(provider, i, total));
                format!(
                    "data: {head}\"text\":{text},\"logprobs\":null,\"finish_reason\":null{tail}\n\n"
                )
            } else if i < total {
                let delta = if i == 0 {
                    json!({ "role": "assistant", "content": piece(provider, i, total), "refusal": null })
                } else {
                    json!({ "content": piece(provider, i, total) })
                };
                format!(
                    "data: {head}\"delta\":{delta},\"logprobs\":null,\"finish_reason\":null{tail}\n\n"
                )
            } else if i == total && chunks == Chunks::Text {
                format!(
                    "data: {head}\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"stop\"{tail}\n\n"
                )
            } else if i == total {
                format!(
                    "data: {head}\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"{tail}\n\n"
                )
            } else if i < last {
                let usage = usage.unwrap_or_default();
                sent.lock().unwrap().add(&usage);
                format!(
                    "data: {prefix}\"choices\":[],\"usage\":{}}}\n\n",
                    usage.json()
                )
            } else {
                "data: [DONE]\n\n".to_string()
            };
            Some((Ok::<_, io::Error>(Bytes::from(event)), i + 1))
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-sim-provider", HeaderValue::from_static(provider));
    resp
}

fn admin(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response {
    let ok = |v: Value| json_response(StatusCode::OK, shared.provider, v.to_string());
    let bad = |m: String| {
        json_response(
            StatusCode::BAD_REQUEST,
            shared.provider,
            json!({ "error": m }).to_string(),
        )
    };
    let parsed = || serde_json::from_slice::<Value>(body).map_err(|e| e.to_string());
    match (method.as_str(), path) {
        ("GET", "/__sim/info") => ok(json!({
            "provider": shared.provider.id(), "port": shared.port, "base_url": shared.base_url,
            "request_count": shared.count.load(Ordering::Relaxed),
            "fault": shared.fault.lock().unwrap().fault.to_json(),
        })),
        ("GET", "/__sim/fault") => ok(shared.fault.lock().unwrap().fault.to_json()),
        ("PUT" | "POST", "/__sim/fault") => {
            let v = match parsed() {
                Ok(v) => v,
                Err(e) => return bad(e),
            };
            let fault = match Fault::from_json(&v) {
                Ok(f) => f,
                Err(e) => return bad(e),
            };
            let mut st = shared.fault.lock().unwrap();
            match v.get("next").and_then(Value::as_u64) {
                Some(n) => st.script.extend(std::iter::repeat_n(fault, n as usize)),
                None => {
                    st.fault = fault;
                    st.since = Instant::now();
                    st.script.clear();
                }
            }
            shared.update_conn_faults(&st);
            ok(st.fault.to_json())
        }
        ("GET", "/__sim/requests") => {
            let records = shared.records.lock().unwrap();
            ok(Value::Array(
                records.iter().map(|r| r.to_json(shared.started)).collect(),
            ))
        }
        ("DELETE", "/__sim/requests") => {
            shared.records.lock().unwrap().clear();
            ok(json!({}))
        }
        ("PUT" | "POST", "/__sim/keys") => {
            let keys = parsed().and_then(|v| {
                serde_json::from_value::<Vec<String>>(v.get("keys").cloned().unwrap_or_default())
                    .map_err(|e| format!("expected {{\"keys\": [..]}}: {e}"))
            });
            match keys {
                Ok(keys) => {
                    *shared.keys.write().unwrap() = keys;
                    ok(json!({}))
                }
                Err(e) => bad(e),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            shared.provider,
            json!({ "error": format!("no admin endpoint {method} {path}") }).to_string(),
        ),
    }
}
