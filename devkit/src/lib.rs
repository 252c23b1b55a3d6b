//! llmroute's dev tooling, used by the tests, the benchmarks and the demo (it does not depend on
//! the `llmroute` crate):
//!
//! - [`sim`]: LLM provider simulators following each catalog provider's contract, with faults
//!   switchable at run time (binary `llmroute-sim`);
//! - [`tls`]: a run-time test CA and TLS fronts for the simulators.
//!
//! (The kubelet stand-in that materialised the gateway's ConfigMap and Secret went with the
//! file-based configuration: gateways get their configuration over xDS, and tests/realnode.rs runs
//! them on a real kubelet.)

pub mod sim;
pub mod tls;
