//! The kubelet-style volume writer lives in the dev tooling crate (`llmroute_devkit::kubelet`).
#![allow(unused_imports)]

pub use llmroute_devkit::kubelet::*;
