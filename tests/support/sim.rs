//! The tests' original simulator API, over `llmroute_devkit::sim`: an OpenAI simulator that serves
//! any model under any base path (`.../chat/completions`), so one simulator can stand for any
//! OpenAI-compatible backend. Provider-specific simulators: use `llmroute_devkit::sim` directly.

use llmroute_devkit::sim::{Fault, SimConfig, SimProvider};

/// How the simulator answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 with a completion naming the received model.
    Ok,
    /// OpenAI's region block: 403 `unsupported_country_region_territory`.
    RegionBlocked,
    /// 429 `rate_limit_exceeded`.
    RateLimited,
    /// 429 `insufficient_quota`.
    QuotaExhausted,
    /// A permission 403 that must not fail over (code `model_not_found`).
    Forbidden,
    /// 500.
    ServerError,
}

/// One request as the provider saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: serde_json::Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).cloned()
    }
}

/// A running simulator.
#[derive(Clone)]
pub struct Sim {
    pub sim: llmroute_devkit::sim::Sim,
    pub port: u16,
}

impl Sim {
    /// Starts a simulator that accepts `key`.
    pub async fn start(key: &str) -> Sim {
        let sim = llmroute_devkit::sim::Sim::start(
            SimConfig::new(SimProvider::OpenAI)
                .key(key)
                .any_model()
                .lenient_paths(),
        )
        .await
        .expect("start simulator");
        Sim {
            port: sim.port(),
            sim,
        }
    }

    /// Accept another key from now on (rotation).
    pub fn set_key(&self, key: &str) {
        self.sim.set_key(key);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.sim.set_fault(match mode {
            Mode::Ok => Fault::None,
            Mode::RegionBlocked => Fault::RegionBlocked,
            Mode::RateLimited => Fault::RateLimited {
                retry_after_secs: 1,
            },
            Mode::QuotaExhausted => Fault::QuotaExhausted,
            Mode::Forbidden => Fault::PermissionDenied,
            Mode::ServerError => Fault::ServerError,
        });
    }

    pub fn received(&self) -> Vec<Received> {
        self.sim
            .requests()
            .into_iter()
            .map(|r| Received {
                path: r.path,
                headers: r.headers,
                body: r.body,
            })
            .collect()
    }
}
