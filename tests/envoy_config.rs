//! The generated configuration checked by the real Envoy 1.40: every golden input and every example
//! validates (`envoy --mode validate` on the static equivalent), is served over xDS (as the operator
//! serves it) and over the file-based layout of `llmroute render --out-dir` with no rejected
//! resource, and a rendered gateway really serves, fails over and rewrites per provider.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use llmroute::gateway::envoy::{self, EnvoyOptions};
use llmroute::render::{self, RenderOptions, VALIDATE_FILE};
use llmroute::xds::snapshot::Snapshot;
use support::envoy::{Envoy, free_port, repo_root, validate};
use support::sim::{Mode, Sim};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

struct Rendered {
    dir: tempfile::TempDir,
    opts: EnvoyOptions,
}

impl Rendered {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Gateway options with free ports on 127.0.0.1.
fn local_options() -> (EnvoyOptions, RenderOptions) {
    let opts = EnvoyOptions {
        port: free_port(),
        address: "127.0.0.1".into(),
        admin_port: free_port(),
        health_port: free_port(),
        usage_module: support::envoy::sse_usage_module(),
        ..Default::default()
    };
    let render_opts = RenderOptions {
        namespace: "default".into(),
        default_region: "us".into(),
        envoy: opts.clone(),
        xds: Default::default(),
        deployment: Default::default(),
        operator_namespace: "llmroute-system".into(),
    };
    (opts, render_opts)
}

/// Renders `input` into a fresh directory with free ports, as `llmroute render --out-dir` does.
fn render_dir(input: &Path) -> Rendered {
    let routes = render::load_files(&[input.to_path_buf()]).unwrap_or_else(|e| panic!("{e:?}"));
    let dir = tempfile::tempdir().unwrap();
    let (opts, render_opts) = local_options();
    let renders = render::translate_offline(&routes, &render_opts);
    assert_eq!(
        renders.len(),
        1,
        "{}: one namespace per file",
        input.display()
    );
    render::write_gateway_dir(&renders[0], dir.path(), &opts).unwrap();
    Rendered { dir, opts }
}

#[test]
fn every_golden_input_and_example_passes_envoy_validate() {
    let mut inputs = yaml_files("tests/golden");
    inputs.extend(yaml_files("examples"));
    inputs.extend(yaml_files("examples/providers"));
    assert!(inputs.len() >= 10);
    for input in inputs {
        let r = render_dir(&input);
        if let Err(out) = validate(&r.path().join(VALIDATE_FILE)) {
            panic!("{}: envoy --mode validate failed:\n{out}", input.display());
        }
        // The shipped bootstrap (file-based xDS) validates too.
        if let Err(out) = validate(&r.path().join("bootstrap.yaml")) {
            panic!(
                "{}: bootstrap.yaml failed validation:\n{out}",
                input.display()
            );
        }
    }
}

/// A namespace of many routes loads whole: nothing of the configuration grows with the number of
/// routes past one of Envoy's own limits (the catch-all's 404 once listed every route, and Envoy
/// rejects a direct response over 4 KiB: a namespace of some 150 routes lost its whole gateway).
#[test]
fn a_namespace_of_many_routes_passes_envoy_validate() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("many.yaml");
    let routes: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: route-with-a-long-name-{i:04}, namespace: many }}\nspec:\n  region: cn\n  defaultModel: chat\n  backends:\n    - name: vllm\n      provider: openai-compatible\n      endpoint: http://vllm.many.svc:8000/v1\n      models: {{ chat: qwen2.5-7b-instruct }}\n"
            )
        })
        .collect();
    std::fs::write(&input, routes.join("---\n")).unwrap();
    let r = render_dir(&input);
    if let Err(out) = validate(&r.path().join(VALIDATE_FILE)) {
        panic!("300 routes: envoy --mode validate failed:\n{out}");
    }
}

#[test]
fn every_example_loads_from_files_with_nothing_rejected() {
    for input in yaml_files("examples")
        .into_iter()
        .chain(yaml_files("examples/providers"))
    {
        let r = render_dir(&input);
        let envoy = Envoy::start(
            &r.path().join("bootstrap.yaml"),
            r.opts.admin_port,
            r.opts.health_port,
            r.path().join("envoy.log"),
        );
        let rejected: Vec<(String, u64)> = envoy
            .stats_matching("update_rejected")
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .collect();
        assert!(
            rejected.is_empty(),
            "{}: rejected resources {rejected:?}\n{}",
            input.display(),
            envoy.log_text()
        );
        assert_eq!(
            envoy.stat("listener_manager.lds.update_success"),
            Some(1),
            "{}",
            input.display()
        );
        assert_eq!(
            envoy.stat("cluster_manager.cds.update_success"),
            Some(1),
            "{}",
            input.display()
        );
        let rds_ok = envoy
            .stats_matching(".rds.")
            .into_iter()
            .filter(|(k, v)| k.ends_with("update_success") && *v >= 1)
            .count();
        let rds_files = std::fs::read_dir(r.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name().into_string().unwrap();
                n == "routes.json" || n.starts_with("account.")
            })
            .count();
        assert_eq!(
            rds_ok,
            rds_files,
            "{}: every route configuration loads",
            input.display()
        );
        assert!(
            !envoy.log_text().contains("[error]"),
            "{}: {}",
            input.display(),
            envoy.log_text()
        );
    }
}

const ROUTE_KEY: &str = "llmroute-render-chat";

fn two_backend_route(dir: &Path, primary: &Sim, secondary: &Sim, failover_on: &str) -> PathBuf {
    let yaml = format!(
        r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: chat }}
spec:
  backends:
    - name: primary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/v1
      credentialsSecretRef: {{ name: primary, key: key }}
      models: {{ gpt-4o: model-a, only-a: a-special }}
    - name: secondary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/api/paas/v4
      priority: 1
      credentialsSecretRef: {{ name: secondary, key: key }}
      models: {{ gpt-4o: glm-4-plus }}
  policy:
    failoverOn: {failover_on}
"#,
        primary.port, secondary.port
    );
    let file = dir.join("route.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

async fn chat(port: u16, key: &str, model: &str) -> reqwest::Response {
    llmroute_devkit::tls::http_client()
        .post(format!("http://127.0.0.1:{port}/chat/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("request through the gateway")
}

/// The rendered gateway serves: route key checked and stripped, provider key injected per backend,
/// model mapped, path and Host rewritten, failover on classified failures only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_gateway_serves_and_fails_over() {
    let primary = Sim::start("key-primary").await;
    let secondary = Sim::start("key-secondary").await;
    let scratch = tempfile::tempdir().unwrap();
    let input = two_backend_route(
        scratch.path(),
        &primary,
        &secondary,
        "[RegionBlocked, QuotaExhausted, ServerError, Unreachable, Timeout]",
    );
    let r = render_dir(&input);
    std::fs::write(r.path().join("keys/provider_primary_key"), "key-primary").unwrap();
    std::fs::write(
        r.path().join("keys/provider_secondary_key"),
        "key-secondary",
    )
    .unwrap();
    let envoy = Envoy::start(
        &r.path().join("bootstrap.yaml"),
        r.opts.admin_port,
        r.opts.health_port,
        r.path().join("envoy.log"),
    );
    let port = r.opts.port;

    // Healthy primary: it answers, with its own key, path, Host and model.
    let resp = chat(port, ROUTE_KEY, "gpt-4o").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llmroute-backend"], "primary");
    let got = primary.received().pop().unwrap();
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(
        got.header("authorization").as_deref(),
        Some("Bearer key-primary")
    );
    assert_eq!(
        got.header("host"),
        Some(format!("127.0.0.1:{}", primary.port))
    );
    assert_eq!(got.body["model"], "model-a");
    assert!(
        got.headers
            .keys()
            .all(|h| !h.as_str().starts_with("x-envoy-")),
        "{:?}",
        got.headers
    );

    // The front listener tells the backend listeners the model in x-llmroute-model: a client's own
    // header of that name neither changes the mapping nor reaches the provider.
    let resp = llmroute_devkit::tls::http_client()
        .post(format!("http://127.0.0.1:{port}/chat/v1/chat/completions"))
        .bearer_auth(ROUTE_KEY)
        .header("x-llmroute-model", "only-a")
        .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("request through the gateway");
    assert_eq!(resp.status(), 200);
    let got = primary.received().pop().unwrap();
    assert_eq!(got.body["model"], "model-a");
    assert!(
        got.headers
            .keys()
            .all(|h| !h.as_str().starts_with("x-llmroute")),
        "{:?}",
        got.headers
    );

    // Region block → the secondary answers the same request, with its own key, path and model.
    primary.set_mode(Mode::RegionBlocked);
    let resp = chat(port, ROUTE_KEY, "gpt-4o").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llmroute-backend"], "secondary");
    assert!(resp.headers().get("x-llmroute-retry").is_none());
    let got = secondary.received().pop().unwrap();
    assert_eq!(got.path, "/api/paas/v4/chat/completions");
    assert_eq!(
        got.header("authorization").as_deref(),
        Some("Bearer key-secondary")
    );
    assert_eq!(got.body["model"], "glm-4-plus");

    // A permission 403 is not a failover trigger: returned unchanged.
    primary.set_mode(Mode::Forbidden);
    let before = secondary.received().len();
    let resp = chat(port, ROUTE_KEY, "gpt-4o").await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        secondary.received().len(),
        before,
        "a permission 403 must not fail over"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    // RateLimited is not in this route's failoverOn: the 429 reaches the client.
    primary.set_mode(Mode::RateLimited);
    let resp = chat(port, ROUTE_KEY, "gpt-4o").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-llmroute-failure"], "RateLimited");
    assert_eq!(secondary.received().len(), before);

    // QuotaExhausted is: the secondary answers.
    primary.set_mode(Mode::QuotaExhausted);
    assert_eq!(
        chat(port, ROUTE_KEY, "gpt-4o").await.headers()["x-llmroute-backend"],
        "secondary"
    );

    // A model only the primary maps, while it fails: the secondary is skipped, the client sees the failure.
    primary.set_mode(Mode::ServerError);
    let resp = chat(port, ROUTE_KEY, "only-a").await;
    assert_eq!(resp.status(), 404, "secondary does not map only-a");

    // Route key: missing or wrong → 401 OpenAI error; unknown model → 404 listing the route's models.
    primary.set_mode(Mode::Ok);
    let resp = chat(port, "wrong", "gpt-4o").await;
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let resp = llmroute_devkit::tls::http_client()
        .post(format!("http://127.0.0.1:{port}/chat/v1/chat/completions"))
        .json(&serde_json::json!({ "model": "gpt-4o", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = chat(port, ROUTE_KEY, "gpt-5").await;
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("gpt-4o") && message.contains("only-a"),
        "{message}"
    );

    // The models list answers from the gateway.
    let models: serde_json::Value = llmroute_devkit::tls::http_client()
        .get(format!("http://127.0.0.1:{port}/chat/v1/models"))
        .bearer_auth(ROUTE_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o", "only-a"]);

    // Every gateway metric the shipped alerts use is exported on the metrics port.
    let exposition = support::envoy::http_get(r.opts.health_port, "/stats/prometheus").unwrap();
    support::alerts::assert_exported("envoy_", &exposition, 2, "the gateway");
    // Resources are labels, not parts of metric names: one metric name for every cluster and account.
    let per_resource: Vec<String> = support::alerts::exported(&exposition)
        .into_iter()
        .filter(|n| n.contains("127_0_0_1") || n.contains("provider_") || n.contains("chain_chat"))
        .collect();
    assert!(
        per_resource.is_empty(),
        "metric names naming a resource: {per_resource:?}"
    );
    assert!(
        exposition.contains("envoy_cluster_upstream_rq_retry{envoy_cluster_name=\"chain_chat\"}"),
        "{exposition}"
    );
    assert!(
        exposition
            .lines()
            .any(|l| l.starts_with("envoy_http_downstream_rq_xx{")
                && l.contains(
                    "envoy_http_conn_manager_prefix=\"account_openai-compatible_http_127_0_0_1_"
                )),
        "per-account request counts under one metric name"
    );

    // Nothing of the route key ever reached a provider.
    for r in primary.received().iter().chain(secondary.received().iter()) {
        assert!(!format!("{:?}", r.headers).contains(ROUTE_KEY));
    }
    drop(envoy);
}

/// Every golden input and example, served over xDS as the operator serves it (delta ADS, mutual
/// TLS, keys as SDS secrets): one gateway loads each, acknowledges every resource (no NACK) and
/// rejects nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_golden_input_and_example_is_served_over_xds_with_nothing_rejected() {
    let authority = Arc::new(llmroute::xds::tls::Authority::generate(SystemTime::now()).unwrap());
    let server = support::xds::Server::start(authority.clone(), 0).await;
    let mut inputs = yaml_files("tests/golden");
    inputs.extend(yaml_files("examples"));
    inputs.extend(yaml_files("examples/providers"));
    for (i, input) in inputs.iter().enumerate() {
        let routes =
            render::load_files(std::slice::from_ref(input)).unwrap_or_else(|e| panic!("{e:?}"));
        let (opts, render_opts) = local_options();
        for (j, ns) in render::translate_offline(&routes, &render_opts)
            .iter()
            .enumerate()
        {
            // A namespace of the server per input.
            let name = format!("case-{i}-{j}");
            let keys = render::placeholder_keys(&ns.translation);
            let ads = envoy::ads_config(&ns.translation.gateway, &opts, &keys, None);
            let snapshot = Snapshot::next(None, ads.resources, ads.routes)
                .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            server.xds.publish(&name, snapshot);
            let dir = tempfile::tempdir().unwrap();
            let bootstrap = support::xds::gateway_files(
                dir.path(),
                &authority,
                &name,
                &name,
                server.port,
                &opts,
            );
            let (admin, health, log) = (
                opts.admin_port,
                opts.health_port,
                dir.path().join("envoy.log"),
            );
            let envoy = tokio::task::spawn_blocking(move || {
                Envoy::start_with(
                    &bootstrap,
                    admin,
                    health,
                    log,
                    &["--service-node".into(), "gw".into()],
                )
            })
            .await
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !server.xds.all_current(&name) {
                assert!(
                    Instant::now() < deadline,
                    "{}: not every resource acknowledged: {:?}\n{}",
                    input.display(),
                    server.xds.route_serving(&name),
                    envoy.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let rejected: Vec<(String, u64)> = envoy
                .stats_matching("update_rejected")
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .collect();
            assert!(rejected.is_empty(), "{}: {rejected:?}", input.display());
            assert!(
                !envoy.log_text().contains("[error]"),
                "{}: {}",
                input.display(),
                envoy.log_text()
            );
        }
    }
}

/// The README's local run: `llmroute render --out-dir` writes files for an Envoy on this machine.
/// The usage module's default path is the gateway Pod's, which is not here: it is left out, with a
/// note, and Envoy accepts the files; given the module built here, Envoy loads it.
#[test]
fn render_out_dir_loads_the_usage_module_when_it_is_here_and_says_when_not() {
    let render = |dir: &Path, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(["render", "-f"])
            .arg(repo_root().join("examples/failover-cn.yaml"))
            .arg("--out-dir")
            .arg(dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    };
    let without = tempfile::tempdir().unwrap();
    let note = render(without.path(), &[]);
    assert!(
        note.contains("streams' usage is not read")
            && note.contains(llmroute::gateway::objects::USAGE_MODULE_FILE),
        "{note}"
    );
    let config = std::fs::read_to_string(without.path().join("validate.yaml")).unwrap();
    assert!(!config.contains("dynamic_modules"));
    validate(&without.path().join("validate.yaml")).unwrap();

    let with = tempfile::tempdir().unwrap();
    let module = support::envoy::sse_usage_module();
    let note = render(with.path(), &[&format!("--usage-module={module}")]);
    assert!(!note.contains("usage is not read"), "{note}");
    let config = std::fs::read_to_string(with.path().join("validate.yaml")).unwrap();
    assert!(config.contains("envoy.filters.http.dynamic_modules") && config.contains(&module));
    validate(&with.path().join("validate.yaml")).unwrap();
}
