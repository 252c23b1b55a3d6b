//! llmroute: a Kubernetes operator that routes in-cluster LLM traffic across providers.
pub mod api;
pub mod catalog;
pub mod validate;
