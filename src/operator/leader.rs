//! Leader election with a `coordination.k8s.io/v1` Lease: only the holder runs the controller (and so
//! only the leader writes). Acquire when the Lease is free or expired, renew well within its
//! duration, step down (stop the controller) as soon as a renewal cannot be confirmed in time, and
//! release the Lease on shutdown so that a standby takes over at once.
//! Updates use the Lease's resourceVersion, so two candidates can never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// Lease parameters.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
}

/// Outcome of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    HeldByOther(String),
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let duration_s = cfg.duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther("?".into())),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = match &spec.renew_time {
        Some(MicroTime(t)) => {
            let valid =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_s) as i64);
            Timestamp::now() > t.checked_add(valid).unwrap_or(*t)
        }
        None => true,
    };
    if holder != cfg.identity && !holder.is_empty() && !expired {
        return Ok(Attempt::HeldByOther(holder));
    }
    if holder != cfg.identity {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(duration_s);
    // replace() sends the resourceVersion we read: a concurrent change makes this a 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther(holder)),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
            warn!(error = %e, "could not release the leader Lease");
        } else {
            info!(lease = %cfg.name, "released leadership");
        }
    }
}

/// Waits for leadership, then runs `work` (given a future that resolves when leadership is lost or
/// `shutdown` fires) while renewing. Returns Ok when stopped by `shutdown`, Err when leadership was
/// lost (the caller exits so that the process restarts as a follower).
pub async fn lead<F, Fut>(
    client: Client,
    cfg: LeaseConfig,
    shutdown: impl std::future::Future<Output = ()>,
    work: F,
) -> Result<(), String>
where
    F: FnOnce(tokio::sync::oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    tokio::pin!(shutdown);
    // Follower: retry until the Lease is ours.
    let mut last_holder = String::new();
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(Attempt::Held) => break,
            Ok(Attempt::HeldByOther(holder)) => {
                if holder != last_holder {
                    info!(%holder, "waiting for leadership");
                    last_holder = holder;
                }
            }
            Err(e) => warn!(error = %e, "leader election"),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(cfg.renew_every) => {}
        }
    }
    info!(identity = %cfg.identity, lease = %cfg.name, "acquired leadership");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let work = work(stop_rx);
    tokio::pin!(work);
    let mut last_renewal = tokio::time::Instant::now();
    let mut stop_tx = Some(stop_tx);
    let result = loop {
        tokio::select! {
            _ = &mut work => break Ok(()),
            _ = &mut shutdown => {
                if let Some(tx) = stop_tx.take() { let _ = tx.send(()); }
                (&mut work).await;
                break Ok(());
            }
            _ = tokio::time::sleep(cfg.renew_every) => {
                match try_acquire(&api, &cfg).await {
                    Ok(Attempt::Held) => last_renewal = tokio::time::Instant::now(),
                    Ok(Attempt::HeldByOther(holder)) => {
                        warn!(%holder, "leadership lost");
                        if let Some(tx) = stop_tx.take() { let _ = tx.send(()); }
                        (&mut work).await;
                        break Err(format!("leadership lost to {holder}"));
                    }
                    Err(e) => {
                        warn!(error = %e, "renewing the leader Lease failed");
                        // Step down before the Lease could expire under us.
                        if last_renewal.elapsed() + cfg.renew_every >= cfg.duration {
                            if let Some(tx) = stop_tx.take() { let _ = tx.send(()); }
                            (&mut work).await;
                            break Err("could not renew the leader Lease in time".into());
                        }
                    }
                }
            }
        }
    };
    if result.is_ok() {
        release(&api, &cfg).await;
    }
    result
}
