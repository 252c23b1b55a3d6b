//! The simulators against the official OpenAI Python SDK (`openai`, the version pinned in
//! scripts/lib/images.sh, installed by scripts/install-openai-sdk into .tools/python/): every
//! simulated operation (chat and text completions, streamed or not, with and without
//! `stream_options.include_usage`; the stream helpers; embeddings; responses, streamed or not;
//! models list and retrieve) is made by the SDK and parsed by its own models and stream
//! accumulators, each object validated again against its model (devkit/tests/sdk_contract.py).
//! A simulator thinner than the providers' contract fails here before a gateway is tested on it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llmroute_devkit::sim::{ALL_PROVIDERS, Endpoint, Sim, SimConfig, SimProvider};
use serde_json::{Value, json};

const KEY: &str = "sk-sdk-contract";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs scripts/install-openai-sdk (idempotent; pip on the first run) and returns the directory
/// to put on PYTHONPATH and the SDK version it holds (`.tools/python/openai-<version>`).
async fn openai_sdk() -> (PathBuf, String) {
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts/install-openai-sdk"))
        .output()
        .await
        .expect("run scripts/install-openai-sdk");
    assert!(
        out.status.success(),
        "scripts/install-openai-sdk failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let version = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("openai-"))
        .unwrap_or_else(|| panic!("unexpected SDK directory {}", dir.display()))
        .to_string();
    (dir, version)
}

/// The script's description of a simulator to check (see devkit/tests/sdk_contract.py).
fn target(provider: SimProvider, sim: &Sim) -> Value {
    let serves: Vec<&str> = Endpoint::ALL
        .into_iter()
        .filter(|e| provider.serves(*e))
        .map(Endpoint::path)
        .collect();
    let embedding_model = provider
        .embedding_models()
        .first()
        .copied()
        // Azure: a deployment of the user's; self-hosted: whatever the server loaded.
        .unwrap_or("text-embedding-sim");
    let mut t = json!({
        "name": provider.id(),
        "base_url": sim.base_url(),
        "key": KEY,
        "chat_model": sim.models()[0],
        "embedding_model": embedding_model,
        "serves": serves,
    });
    match provider {
        // The SDK's AzureOpenAI client: `api-key`, deployment paths, `?api-version=`.
        SimProvider::AzureOpenAI => t["azure_api_version"] = json!("2024-10-21"),
        // The simulator wants Anthropic's own headers (see provider.rs).
        SimProvider::Anthropic => {
            t["headers"] = json!({ "x-api-key": KEY, "anthropic-version": "2023-06-01" })
        }
        _ => {}
    }
    t
}

/// Every simulated operation of every simulator, made and parsed by the official SDK: the OpenAI
/// and OpenAI-compatible simulators serve them all, the others chat, models and what they serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_parses_every_simulated_operation() {
    let (sdk, version) = openai_sdk().await;
    let mut sims = Vec::new();
    let mut args = vec![
        repo_root()
            .join("devkit/tests/sdk_contract.py")
            .display()
            .to_string(),
        "--expect-sdk-version".to_string(),
        version,
    ];
    for provider in ALL_PROVIDERS {
        let sim = Sim::start(SimConfig::new(provider).key(KEY).stream(3, Duration::ZERO))
            .await
            .unwrap();
        args.push("--target".to_string());
        args.push(target(provider, &sim).to_string());
        sims.push(sim);
    }
    let run = tokio::process::Command::new("python3")
        // No user site-packages: the pinned SDK only.
        .arg("-s")
        .args(&args)
        .env("PYTHONPATH", &sdk)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_ORG_ID")
        .env_remove("OPENAI_PROJECT_ID")
        .env_remove("OPENAI_LOG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("sdk_contract.py did not finish in 300 s")
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the official SDK rejects the simulators ({}):\n{stdout}{stderr}",
        out.status
    );
    println!("{stdout}");
    // Every simulator was reached, every operation it serves checked.
    for (provider, sim) in ALL_PROVIDERS.iter().zip(&sims) {
        let ops = sim.requests();
        assert!(!ops.is_empty(), "{provider}: no request reached it");
        for e in Endpoint::ALL.into_iter().filter(|e| provider.serves(*e)) {
            assert!(
                ops.iter()
                    .any(|r| r.path.contains(&format!("/{}", e.path()))),
                "{provider}: no {} request",
                e.path()
            );
        }
        assert!(
            stdout.contains(&format!("ok    {}: models.list", provider.id())),
            "{provider}: models not checked\n{stdout}"
        );
    }
}
