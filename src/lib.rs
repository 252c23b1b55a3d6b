//! llmroute: a Kubernetes operator that routes in-cluster LLM traffic across providers.
//!
//! - [`api`]: the LLMRoute API and its admission rules.
//! - [`catalog`]: what llmroute knows about each provider (data).
//! - [`validate`]: the CRD's schema and CEL rules, evaluated client-side.
//! - [`policy`]: which backends a route may use, in what order (pure).
//! - [`gateway`]: the translation core: routes → IR → Envoy files and Kubernetes objects (pure).
//! - [`gateway_shutdown`]: graceful termination of a gateway Pod (the shutdown-manager sidecar).
//! - [`render`]: offline rendering of route files (`llmroute render`).
//! - [`xds`]: the xDS server gateway replicas get their configuration from, and learn what each loaded.
pub mod api;
pub mod catalog;
pub mod gateway;
pub mod gateway_modules;
pub mod gateway_shutdown;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod probe;
pub mod render;
pub mod status;
pub mod usage;
pub mod validate;
pub mod xds;
