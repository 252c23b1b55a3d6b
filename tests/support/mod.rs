//! Shared support of the integration tests. Each test crate uses the parts it needs.
#![allow(dead_code)]

pub mod alerts;
pub mod cluster;
pub mod e2e;
pub mod envoy;
pub mod gateway;
pub mod gitops;
pub mod node;
pub mod realnode;
pub mod sim;
pub mod tools;
pub mod xds;
