//! Shared support of the integration tests. Each test crate uses the parts it needs.
#![allow(dead_code)]

pub mod envoy;
pub mod sim;
