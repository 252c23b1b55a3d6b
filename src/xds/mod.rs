//! The operator's xDS server: how gateway replicas get their configuration, and how the operator
//! learns what each of them loaded.
//!
//! - [`api`]: Envoy's API descriptors, JSON → protobuf, the delta ADS messages.
//! - [`snapshot`]: a namespace's configuration, encoded and versioned (pure).
//! - [`delta`]: subscriptions, what was sent, ACK/NACK, whether a replica serves a route (pure).
//! - [`tls`]: the CA, the gateways' client certificates and the server's (pure).
//! - [`server`]: the gRPC service and the streams.
//!
//! Why xDS instead of files in a ConfigMap and a Secret: see docs/design/config-delivery.md.
pub mod api;
pub mod delta;
pub mod server;
pub mod snapshot;
pub mod tls;

pub use server::{ReplicaServing, XdsServer};
