//! llmroute's dev tooling, used by the tests, the benchmarks and the demo (it does not depend on
//! the `llmroute` crate):
//!
//! - [`sim`]: LLM provider simulators following each catalog provider's contract, with faults
//!   switchable at run time (binary `llmroute-sim`);
//! - [`kubelet`]: ConfigMap and Secret volumes materialised in directories as a kubelet does it
//!   (binary `llmroute-kubelet`).

pub mod kubelet;
pub mod sim;
pub mod tls;
