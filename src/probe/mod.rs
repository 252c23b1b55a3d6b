//! The prober: probes each backend account periodically (with jitter, a timeout and bounded
//! concurrency), classifies each answer from its status *and body* with the catalog's rules, and
//! keeps a [`HealthView`] per target. Routes sharing an account and probe share the target. When a
//! result changes what the policy could decide, the prober names the namespace on its channel so
//! the controller reconciles it. Inputs are plain data ([`ProbeTarget`]s from [`targets`]); the
//! prober knows nothing of Kubernetes.
//!
//! Scheduling: the next probe of a target is due one `interval` (±10 % jitter) after the last;
//! after `RateLimited` not before the provider's `retry-after`; after `QuotaExhausted`
//! [`QUOTA_COOLDOWN_FACTOR`] intervals later (a balance is not refilled in seconds, and every probe
//! of an empty account is wasted).

pub mod egress;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{debug, warn};

use crate::api::FailureClass;
use crate::catalog;
use crate::metrics::{Metrics, ProbeLabels, ProviderLabels};
use crate::policy::health::{HealthView, ProbeRecord};
pub use target::{ProbeTarget, targets};

/// After `QuotaExhausted`, the next probe waits this many intervals.
pub const QUOTA_COOLDOWN_FACTOR: u32 = 10;

/// How the prober runs.
#[derive(Clone, Debug)]
pub struct ProberOptions {
    /// Probes in flight at most.
    pub concurrency: usize,
    /// Extra CA certificates (PEM) trusted besides the system's, for private endpoints.
    pub extra_ca: Option<std::path::PathBuf>,
}

impl Default for ProberOptions {
    fn default() -> Self {
        ProberOptions {
            concurrency: 32,
            extra_ca: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading extra CA file {0}: {1}")]
    Ca(String, String),
    #[error("building the probe HTTP client: {0}")]
    Client(String),
}

struct Entry {
    target: ProbeTarget,
    due: Instant,
    running: bool,
    view: HealthView,
}

struct Inner {
    client: reqwest::Client,
    entries: Mutex<HashMap<(String, String), Entry>>,
    wake: Notify,
    changed: mpsc::UnboundedSender<String>,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// A running prober (cheap to clone).
#[derive(Clone)]
pub struct Prober {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    let spread = ms / 10;
    Duration::from_millis(ms - spread + rand::rng().random_range(0..=2 * spread))
}

impl Prober {
    /// A prober and the channel on which it names namespaces whose backends changed.
    pub fn new(
        opts: &ProberOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(Prober, mpsc::UnboundedReceiver<String>), Error> {
        // kube and the prober share rustls with the ring provider; install it as the process default
        // (a no-op when already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("llmroute-prober/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(egress::GuardedResolver);
        if let Some(path) = &opts.extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Ca(path.display().to_string(), e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Ca(path.display().to_string(), e.to_string()))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| Error::Client(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Prober {
                inner: Arc::new(Inner {
                    client,
                    entries: Mutex::default(),
                    wake: Notify::new(),
                    changed: tx,
                    permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
                    metrics,
                }),
            },
            rx,
        ))
    }

    /// Makes `targets` the namespace's probe set: new targets are probed soon (spread over a
    /// second), kept ones keep their history, others are dropped. A target whose request changed
    /// (a rotated key) is probed again at once.
    pub fn sync_namespace(&self, namespace: &str, targets: Vec<ProbeTarget>) {
        let mut entries = self.inner.entries.lock().expect("prober entries");
        let keep: std::collections::HashSet<(String, String)> = targets
            .iter()
            .map(|t| (namespace.to_string(), t.key.clone()))
            .collect();
        entries.retain(|k, _| k.0 != namespace || keep.contains(k));
        let now = Instant::now();
        for t in targets {
            let id = (namespace.to_string(), t.key.clone());
            match entries.get_mut(&id) {
                Some(e) => {
                    if e.target != t {
                        if e.target.headers != t.headers || e.target.url != t.url {
                            e.due = now;
                        }
                        e.target = t;
                    }
                }
                None => {
                    let spread = rand::rng().random_range(0..1000);
                    entries.insert(
                        id,
                        Entry {
                            target: t,
                            due: now + Duration::from_millis(spread),
                            running: false,
                            view: HealthView::default(),
                        },
                    );
                }
            }
        }
        self.inner.metrics.probe_targets.set(entries.len() as i64);
        drop(entries);
        self.inner.wake.notify_one();
    }

    /// Starts a target's history from what an earlier operator wrote in status, unless probing
    /// has seen it already: a new leader keeps the decisions of the last one.
    pub fn seed(&self, namespace: &str, key: &str, view: HealthView) {
        let mut entries = self.inner.entries.lock().expect("prober entries");
        if let Some(e) = entries.get_mut(&(namespace.to_string(), key.to_string()))
            && e.view.last.is_none()
        {
            e.view = view;
        }
    }

    /// What probing has seen in `namespace`, by probe key.
    pub fn health(&self, namespace: &str) -> BTreeMap<String, HealthView> {
        self.inner
            .entries
            .lock()
            .expect("prober entries")
            .iter()
            .filter(|(k, _)| k.0 == namespace)
            .map(|(k, e)| (k.1.clone(), e.view.clone()))
            .collect()
    }

    /// Probes until `shutdown` resolves.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let now = Instant::now();
            let mut next = now + Duration::from_secs(1);
            let mut due = Vec::new();
            {
                let mut entries = self.inner.entries.lock().expect("prober entries");
                for (id, e) in entries.iter_mut() {
                    if e.running {
                        continue;
                    }
                    if e.due <= now {
                        e.running = true;
                        due.push((id.clone(), e.target.clone()));
                    } else {
                        next = next.min(e.due);
                    }
                }
            }
            for (id, target) in due {
                let permit = tokio::select! {
                    p = self.inner.permits.clone().acquire_owned() => p.expect("semaphore open"),
                    _ = &mut shutdown => return,
                };
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let record = probe_once(&inner.client, &target).await;
                    drop(permit);
                    inner.finish(id, &target, record);
                });
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.inner.wake.notified() => {}
                _ = &mut shutdown => return,
            }
        }
    }
}

impl Inner {
    fn finish(&self, id: (String, String), target: &ProbeTarget, record: ProbeRecord) {
        let result = record
            .failure
            .map(FailureClass::as_str)
            .unwrap_or("Healthy");
        self.metrics
            .probes
            .get_or_create(&ProbeLabels {
                provider: target.provider.clone(),
                result,
            })
            .inc();
        self.metrics
            .probe_duration
            .get_or_create(&ProviderLabels {
                provider: target.provider.clone(),
            })
            .observe(record.latency_ms as f64 / 1000.0);
        let mut entries = self.entries.lock().expect("prober entries");
        let Some(e) = entries.get_mut(&id) else {
            return; // dropped while probing
        };
        e.running = false;
        let before = e.view.clone();
        let wait = match record.failure {
            Some(FailureClass::RateLimited) => target
                .interval
                .max(Duration::from_millis(record.retry_after_ms.unwrap_or(0))),
            Some(FailureClass::QuotaExhausted) => target.interval * QUOTA_COOLDOWN_FACTOR,
            _ => target.interval,
        };
        e.due = Instant::now() + jittered(wait);
        debug!(namespace = %id.0, provider = %target.provider, result, latency_ms = record.latency_ms, "probe");
        e.view.record(record);
        let v = &e.view;
        // Worth a reconcile: a new state, or a streak that may be crossing a route's threshold.
        let relevant = v.state() != before.state()
            || (v.failures > 0 && v.failures <= target.unhealthy_max)
            || (v.recovered_from.is_some()
                && v.successes.len() != before.successes.len()
                && v.successes.len() <= target.healthy_max as usize);
        if relevant {
            if v.state() != before.state() {
                match v.last.as_ref().and_then(|l| l.failure) {
                    Some(class) => {
                        warn!(namespace = %id.0, provider = %target.provider, class = %class,
                        message = %v.last.as_ref().map(|l| l.message.as_str()).unwrap_or(""), "backend probe failed")
                    }
                    None => {
                        tracing::info!(namespace = %id.0, provider = %target.provider, "backend probe healthy")
                    }
                }
            }
            let _ = self.changed.send(id.0);
        }
    }
}

/// Removes anything looking like an API key (and the target's own key) from a provider's text.
fn redact(text: &str, secret: Option<&str>) -> String {
    static KEYLIKE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = KEYLIKE.get_or_init(|| {
        regex::Regex::new(r"(sk|ak|bce-v3|key)[-_][A-Za-z0-9*._/+-]{6,}").expect("valid regex")
    });
    let mut out = text.to_string();
    if let Some(s) = secret.filter(|s| s.len() >= 4) {
        out = out.replace(s, "[redacted]");
    }
    let out = re.replace_all(&out, "[redacted]").to_string();
    out.chars().take(300).collect()
}

/// `retry-after` in seconds, or OpenAI's `x-ratelimit-reset-requests` (`1s`, `6m0s`).
fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    if let Some(s) = headers.get("retry-after").and_then(|v| v.to_str().ok())
        && let Ok(secs) = s.trim().parse::<f64>()
    {
        return Some((secs * 1000.0) as u64);
    }
    let reset = headers
        .get("x-ratelimit-reset-requests")
        .and_then(|v| v.to_str().ok())?;
    let d: kube::core::Duration = reset.trim().parse().ok()?;
    Some(Duration::from(d).as_millis() as u64)
}

/// The error code and message of an error body, in the OpenAI shape or a provider's own. Nothing
/// else of the body reaches status: an endpoint that is not a provider (a route may name any
/// address) gets its answer described, not copied; and per-request ids are taken out of the
/// message ([`without_request_ids`]), so that the same failure reads the same at every probe and
/// status is not written again for nothing.
fn error_summary(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return format!("a body of {} bytes that is not JSON", body.len());
    };
    let e = v.get("error").unwrap_or(&v);
    let code = e.get("code").or_else(|| e.get("type")).map(|c| {
        c.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| c.to_string())
    });
    let message = e
        .get("message")
        .or_else(|| v.get("message"))
        .and_then(|m| m.as_str())
        .map(without_request_ids);
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        (None, Some(m)) => m,
        (None, None) => "no error code or message in the JSON body".into(),
    }
}

/// `text` without what differs from one request to the next: UUIDs, `req_...` ids, long hex runs,
/// and the value after "request id".
fn without_request_ids(text: &str) -> String {
    static IDS: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = IDS.get_or_init(|| {
        regex::Regex::new(
            r"(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\breq_[a-z0-9]+|\b[0-9a-f]{16,}\b|(request[ _-]?id[\s:=]+)[A-Za-z0-9_-]+",
        )
        .expect("valid regex")
    });
    re.replace_all(text, |c: &regex::Captures| match c.get(1) {
        Some(prefix) => format!("{}…", prefix.as_str()),
        None => "…".to_string(),
    })
    .into_owned()
}

/// Sends one probe and classifies the answer.
pub async fn probe_once(client: &reqwest::Client, t: &ProbeTarget) -> ProbeRecord {
    let started = Instant::now();
    if let Err(why) = egress::check_url(&t.url) {
        return ProbeRecord {
            at_ms: now_ms(),
            latency_ms: 0,
            failure: Some(FailureClass::Unreachable),
            message: why,
            retry_after_ms: None,
        };
    }
    let mut req = match &t.body {
        Some(body) => client
            .post(&t.url)
            .header("content-type", "application/json")
            .body(body.clone()),
        None => client.get(&t.url),
    }
    .timeout(t.timeout);
    for (k, v) in &t.headers {
        req = req.header(k, v);
    }
    let outcome = async {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = retry_after_ms(resp.headers());
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, retry_after, body))
    }
    .await;
    let latency_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
    let at_ms = now_ms();
    let (failure, message, retry_after_ms) = match outcome {
        Ok((status, retry_after, body)) => {
            let class = catalog::provider(&t.provider).and_then(|p| p.classify(status, &body));
            let message = if status < 400 {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status} {}", error_summary(&body))
            };
            (class, message, retry_after)
        }
        Err(e) if e.is_timeout() => (
            Some(FailureClass::Timeout),
            format!("no answer within {} ms", t.timeout.as_millis()),
            None,
        ),
        Err(e) => {
            // reqwest's Display includes the URL (no secrets there) and the cause chain.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            (Some(FailureClass::Unreachable), msg, None)
        }
    };
    ProbeRecord {
        at_ms,
        latency_ms,
        failure,
        message: redact(&message, t.secret.as_deref()),
        retry_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_removes_keys_a_provider_echoes() {
        let s = redact(
            "Incorrect API key provided: sk-proj-abc****wxyz. Also mysecretvalue.",
            Some("mysecretvalue"),
        );
        assert!(!s.contains("sk-proj"), "{s}");
        assert!(!s.contains("mysecretvalue"), "{s}");
    }

    #[test]
    fn error_summaries_copy_no_body_and_no_request_id() {
        // An endpoint that is not a provider: described, not copied.
        let html = "<html><body>internal admin page, secret stuff</body></html>";
        let s = error_summary(html);
        assert_eq!(
            s,
            format!("a body of {} bytes that is not JSON", html.len())
        );
        assert_eq!(
            error_summary(r#"{"items":["private"]}"#),
            "no error code or message in the JSON body"
        );
        // The same failure reads the same whatever the request id.
        let a = error_summary(
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit reached (request id: req_8f3a9c2b71). Retry."}}"#,
        );
        let b = error_summary(
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit reached (request id: req_00aa11bb22). Retry."}}"#,
        );
        assert_eq!(a, b);
        assert!(!a.contains("8f3a9c2b71"), "{a}");
        let c = error_summary(
            r#"{"error":{"message":"overloaded, trace 3f2b1c0a-9d8e-4f7a-b6c5-d4e3f2a1b0c9 id 0123456789abcdef0123"}}"#,
        );
        assert_eq!(c, "overloaded, trace … id …");
    }

    #[test]
    fn error_summaries_read_openai_and_zhipu_shapes() {
        assert_eq!(
            error_summary(
                r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#
            ),
            "unsupported_country_region_territory: Country, region, or territory not supported"
        );
        assert_eq!(
            error_summary(r#"{"error":{"code":"1113","message":"余额不足"}}"#),
            "1113: 余额不足"
        );
    }
}
