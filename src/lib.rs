//! llmroute: a Kubernetes operator that routes in-cluster LLM traffic across providers.
//!
//! - [`api`]: the LLMRoute API and its admission rules.
//! - [`catalog`]: what llmroute knows about each provider (data).
//! - [`validate`]: the CRD's schema and CEL rules, evaluated client-side.
//! - [`policy`]: which backends a route may use, in what order (pure).
//! - [`gateway`]: the translation core: routes → IR → Envoy files and Kubernetes objects (pure).
//! - [`agent`]: what runs in the gateway Pod beside Envoy: module install, drain, usage counting.
//! - [`render`]: offline rendering of route files (`llmroute render`).
//! - [`xds`]: the xDS server gateway replicas get their configuration from, and learn what each loaded.
//! - [`usage`]: token usage, pure: the usage log's format, ledgers and budgets arithmetic.
//! - [`status`]: the routes' conditions, computed from facts.
//! - [`probe`]: the prober (I/O to providers; results as facts).
//! - [`operator`]: the reconciler, observe → plan (pure) → act.
//! - [`metrics`]: the operator's metrics and the registry encoder.
pub mod agent;
pub mod api;
pub mod catalog;
pub mod gateway;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod probe;
pub mod render;
pub mod status;
pub mod usage;
pub mod validate;
pub mod xds;
