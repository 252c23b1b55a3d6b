//! The gateway Pod's agent: everything llmroute runs inside the gateway Pod beside Envoy, none of
//! it linked to the operator's reconciler.
//!
//! - [`modules`]: the init container copies llmroute's Envoy dynamic module into a volume Envoy
//!   mounts (`llmroute gateway install-modules`).
//! - [`server`]: the sidecar (`llmroute gateway shutdown-manager`): Envoy's preStop wait, the usage
//!   counters at `/metrics`, the counts budgets read at `/usage`.
//! - [`follow`]: the sidecar's reader of Envoy's usage log, with its checkpoints (exactly once).
//! - [`counters`]: the Pod's usage counters it counts into.
//! - [`drain`]: the sidecar's preStop command (`llmroute gateway shutdown`).
//!
//! Graceful termination of a gateway Pod, the sidecar and its preStop command together:
//!
//! When a gateway Pod terminates, the kubelet runs every container's preStop hook, then sends SIGTERM.
//! Envoy exits at once on SIGTERM and cuts the streams in flight, so Envoy must be drained first:
//!
//! 1. The sidecar's preStop (`shutdown`) asks Envoy's admin interface to drain its listeners
//!    gracefully: responses get `connection: close` (HTTP/1) or a GOAWAY (HTTP/2), so clients take
//!    their next requests elsewhere, while the requests in flight continue.
//! 2. It waits a minimum drain time, so the Pod's removal from the Service's endpoints reaches
//!    kube-proxy and the clients (requests still sent here meanwhile are answered), then until no
//!    request is active on the front listener, at most a maximum drain time.
//! 3. It writes [`DRAINED_FILE`] into a directory the manager reads (an emptyDir of the sidecar:
//!    the preStop exec runs in the sidecar's own container), and exits.
//! 4. Envoy's own preStop is an HTTP GET of the manager's [`READY_PATH`], which answers only once that
//!    file exists (or after a timeout): the kubelet sends Envoy its SIGTERM after the drain.
//!
//! Nothing the manager serves starts a drain: a caller on the Pod network can only wait. A file
//! (not an HTTP call) marks the drain done so that no network caller can end the wait early either.

pub mod counters;
pub mod drain;
pub mod follow;
pub mod leases;
pub mod modules;
pub mod server;
pub mod tls;
