//! `llmroute crd` and `llmroute render` as a user runs them, golden files of the translation, and
//! the table of bad inputs.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use llmroute::gateway::envoy::{self, EnvoyOptions};
use llmroute::render::{self, RenderOptions};
use support::envoy::repo_root;

fn llmroute(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(args)
        .output()
        .expect("run llmroute")
}

#[test]
fn crds_dir_matches_llmroute_crd() {
    let out = llmroute(&["crd"]);
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let stored =
        std::fs::read_to_string(repo_root().join("crds/llmroute.io_llmroutes.yaml")).unwrap();
    assert!(
        printed == stored,
        "crds/llmroute.io_llmroutes.yaml differs from `llmroute crd`: run `cargo run -- crd > crds/llmroute.io_llmroutes.yaml`"
    );
    for needle in [
        "shortNames:\n    - llmr",
        "subresources:\n      status: {}",
        "name: Ready",
        "name: Active",
        "name: Strategy",
        "name: Age",
    ] {
        assert!(printed.contains(needle), "CRD lacks {needle:?}");
    }
}

#[test]
fn providers_doc_lists_every_catalog_entry() {
    let doc =
        std::fs::read_to_string(repo_root().join("docs/providers.md")).expect("docs/providers.md");
    for p in llmroute::catalog::providers() {
        assert!(
            doc.contains(&format!("`{}`", p.id)),
            "docs/providers.md does not list `{}`",
            p.id
        );
        if let Some(url) = &p.base_url {
            assert!(
                doc.contains(url.as_str()),
                "docs/providers.md lacks the base URL of {}",
                p.id
            );
        }
    }
}

fn golden_dir() -> PathBuf {
    repo_root().join("tests/golden")
}

/// Everything a golden case covers: per namespace, the resources the operator's xDS server serves
/// (with render's placeholder keys), and the objects, as name → content.
fn render_case(input: &Path) -> BTreeMap<String, String> {
    let routes = render::load_files(&[input.to_path_buf()]).unwrap_or_else(|e| panic!("{e:?}"));
    let opts = RenderOptions {
        namespace: "default".into(),
        default_region: "us".into(),
        // As `llmroute render` and the operator render it: the access log to the Pod's usage log.
        envoy: EnvoyOptions {
            usage_log: llmroute::gateway::objects::USAGE_LOG_FILE.into(),
            usage_module: llmroute::gateway::objects::USAGE_MODULE_FILE.into(),
            ..Default::default()
        },
        xds: Default::default(),
        deployment: Default::default(),
        operator_namespace: "llmroute-system".into(),
    };
    let renders = render::translate_offline(&routes, &opts);
    let mut out = BTreeMap::new();
    for ns in &renders {
        let keys = render::placeholder_keys(&ns.translation);
        let ads = envoy::ads_config(&ns.translation.gateway, &opts.envoy, &keys, None);
        let resources: Vec<serde_json::Value> = ads
            .resources
            .iter()
            .map(|r| serde_json::json!({ "type": r.type_url, "name": r.name, "resource": r.json }))
            .collect();
        let mut text = serde_json::to_string_pretty(&resources).unwrap();
        text.push('\n');
        out.insert(format!("{}/xds.json", ns.namespace), text);
    }
    out.insert("objects.yaml".into(), render::objects_yaml(&renders, &opts));
    out
}

fn golden_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "expected golden inputs in tests/golden");
    cases
}

#[test]
fn translation_matches_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for input in golden_cases() {
        let expected_dir = input.with_extension("");
        let actual = render_case(&input);
        if update {
            let _ = std::fs::remove_dir_all(&expected_dir);
            for (name, content) in &actual {
                let path = expected_dir.join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
            continue;
        }
        let mut expected = BTreeMap::new();
        for ns in std::fs::read_dir(&expected_dir)
            .unwrap_or_else(|_| panic!("{} missing: UPDATE_GOLDEN=1", expected_dir.display()))
        {
            let ns = ns.unwrap().path();
            if ns.is_dir() {
                for f in std::fs::read_dir(&ns).unwrap() {
                    let f = f.unwrap().path();
                    let key = format!(
                        "{}/{}",
                        ns.file_name().unwrap().to_str().unwrap(),
                        f.file_name().unwrap().to_str().unwrap()
                    );
                    expected.insert(key, std::fs::read_to_string(f).unwrap());
                }
            } else {
                expected.insert(
                    ns.file_name().unwrap().to_str().unwrap().to_string(),
                    std::fs::read_to_string(&ns).unwrap(),
                );
            }
        }
        assert_eq!(
            expected.keys().collect::<Vec<_>>(),
            actual.keys().collect::<Vec<_>>(),
            "{}: file set differs (UPDATE_GOLDEN=1 cargo test --test render to accept)",
            input.display()
        );
        for (name, content) in &actual {
            assert!(
                &expected[name] == content,
                "{}: {name} differs from the golden file (UPDATE_GOLDEN=1 cargo test --test render to accept)",
                input.display()
            );
        }
    }
}

#[test]
fn translation_is_deterministic_and_independent_of_input_order() {
    for input in golden_cases() {
        assert!(
            render_case(&input) == render_case(&input),
            "{}: two renders differ",
            input.display()
        );
    }
    // Two routes in one namespace, given in either order, give byte-identical files.
    let dir = tempfile::tempdir().unwrap();
    let a = std::fs::read_to_string(golden_dir().join("failover-cn.yaml")).unwrap();
    let b = a.replace("name: chat", "name: chat-two");
    std::fs::write(dir.path().join("ab.yaml"), format!("{a}\n---\n{b}")).unwrap();
    std::fs::write(dir.path().join("ba.yaml"), format!("{b}\n---\n{a}")).unwrap();
    let (ab, ba) = (
        render_case(&dir.path().join("ab.yaml")),
        render_case(&dir.path().join("ba.yaml")),
    );
    for (name, content) in &ab {
        assert!(
            ba.get(name) == Some(content),
            "{name} depends on the order of the input routes"
        );
    }
}

/// Keys go to the gateway only where Envoy expects them: a provider key in its SDS secret (which
/// Envoy redacts in config dumps), a route key in its front route's metadata. Nothing written to the
/// API server (the objects) holds either.
#[test]
fn keys_are_only_in_secrets_and_route_metadata() {
    use base64::Engine;
    let provider = base64::engine::general_purpose::STANDARD.encode("placeholder");
    for input in golden_cases() {
        let files = render_case(&input);
        for (name, content) in &files {
            if name == "objects.yaml" {
                assert!(
                    !content.contains("placeholder") && !content.contains("llmroute-render-"),
                    "render printed a key"
                );
                continue;
            }
            let resources: Vec<serde_json::Value> = serde_json::from_str(content).unwrap();
            for r in resources {
                let text = r["resource"].to_string();
                let is_secret = r["type"].as_str().unwrap().ends_with("tls.v3.Secret");
                let is_front = r["name"] == "gateway"
                    && r["type"].as_str().unwrap().ends_with("RouteConfiguration");
                assert!(
                    is_secret || !text.contains(&provider),
                    "{name}: provider key outside a secret: {}",
                    r["name"]
                );
                assert!(
                    is_front || !text.contains("llmroute-render-"),
                    "{name}: route key outside the front routes: {}",
                    r["name"]
                );
                if is_front {
                    for route in r["resource"]["virtual_hosts"][0]["routes"]
                        .as_array()
                        .unwrap()
                    {
                        let key =
                            &route["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["key"];
                        assert!(
                            key.is_null() || key.as_str().unwrap().starts_with("llmroute-render-"),
                            "{key}"
                        );
                    }
                }
            }
        }
    }
}

/// `spec.operations` reaches the front route's Lua metadata as `{ name: tokens per request }`
/// (0 when not given), and routes that opt in to none carry no `operations` at all.
#[test]
fn opted_in_operations_reach_the_front_route_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ops.yaml");
    let with_ops = route_yaml(
        "ops",
        &format!(
            "  backends:{VALID_BACKEND}\n  policy: {{ budget: {{ tokens: 100000 }} }}\n  operations:\n    - {{ name: images, tokensPerRequest: 1000 }}\n    - {{ name: files, tokensPerRequest: 0 }}"
        ),
    );
    let without = route_yaml("plain", &format!("  backends:{VALID_BACKEND}"));
    std::fs::write(&input, format!("{with_ops}---\n{without}")).unwrap();
    let files = render_case(&input);
    let resources: Vec<serde_json::Value> =
        serde_json::from_str(&files["default/xds.json"]).unwrap();
    let front = resources
        .iter()
        .find(|r| {
            r["name"] == "gateway" && r["type"].as_str().unwrap().ends_with("RouteConfiguration")
        })
        .expect("the front route configuration");
    let lua_of = |name: &str| {
        front["resource"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no front route {name}"))["metadata"]["filter_metadata"]
            ["envoy.filters.http.lua"]
            .clone()
    };
    assert_eq!(
        lua_of("ops")["operations"],
        serde_json::json!({ "files": 0, "images": 1000 })
    );
    assert!(lua_of("plain").get("operations").is_none());
}

const VALID_BACKEND: &str = r#"
    - name: a
      provider: openai
      credentialsSecretRef: { name: k, key: api-key }
      models: { gpt-4o: gpt-4o }"#;

fn route_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// Bad inputs: each must exit 1 with lines naming the file, the route and the field, never panic.
#[test]
fn bad_inputs_are_rejected_with_one_precise_line() {
    let with_backend =
        |extra: &str| route_yaml("r", &format!("  backends:{VALID_BACKEND}\n{extra}"));
    let backend = |fields: &str| route_yaml("r", &format!("  backends:\n    - name: a\n{fields}"));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed YAML",
            "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {name: r\nspec: [".into(),
            "invalid YAML",
        ),
        (
            "tab indentation",
            "apiVersion: v1\n\tkind: LLMRoute\n".into(),
            "invalid YAML",
        ),
        (
            "not a mapping",
            "- a\n- b\n".into(),
            "expected a Kubernetes object",
        ),
        (
            "wrong apiVersion",
            route_yaml("r", &format!("  backends:{VALID_BACKEND}"))
                .replace("llmroute.io/v1alpha1", "llmroute.io/v1"),
            "apiVersion",
        ),
        (
            "missing name",
            "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {}\nspec: {}\n".into(),
            "metadata.name",
        ),
        (
            "name not a DNS label",
            route_yaml("Bad_Name", &format!("  backends:{VALID_BACKEND}")),
            "metadata.name",
        ),
        (
            "missing spec.backends",
            route_yaml("r", "  region: cn"),
            "spec.backends: Required value",
        ),
        (
            "empty backends",
            route_yaml("r", "  backends: []"),
            "spec.backends: must have at least 1",
        ),
        (
            "unknown provider",
            backend(
                "      provider: openia\n      credentialsSecretRef: {name: k, key: x}\n      models: {m: m}",
            ),
            "spec.backends[0].provider: Unsupported value: \"openia\"",
        ),
        (
            "missing provider",
            backend("      credentialsSecretRef: {name: k, key: x}\n      models: {m: m}"),
            "spec.backends[0].provider: Required value",
        ),
        (
            "missing models",
            backend("      provider: openai\n      credentialsSecretRef: {name: k, key: x}"),
            "spec.backends[0].models: Required value",
        ),
        (
            "model map maps nothing",
            backend(
                "      provider: openai\n      credentialsSecretRef: {name: k, key: x}\n      models: {}",
            ),
            "spec.backends[0].models: must have at least 1",
        ),
        (
            "duplicate backend names",
            route_yaml("r", &format!("  backends:{VALID_BACKEND}{VALID_BACKEND}")),
            "spec.backends[1]: Duplicate value",
        ),
        (
            "missing credentials",
            backend("      provider: zhipu\n      models: {m: m}"),
            "credentialsSecretRef is required",
        ),
        (
            "azure without endpoint",
            backend(
                "      provider: azure-openai\n      credentialsSecretRef: {name: k, key: x}\n      models: {m: d}",
            ),
            "spec.backends[0].endpoint: spec.backends[].endpoint is required",
        ),
        (
            "azure with wildcard",
            backend(
                "      provider: azure-openai\n      endpoint: https://x.openai.azure.com\n      credentialsSecretRef: {name: k, key: x}\n      models: {\"*\": \"*\"}",
            ),
            "spec.backends[0].models",
        ),
        (
            "http endpoint for a cloud provider",
            backend(
                "      provider: deepseek\n      endpoint: http://proxy.local/v1\n      credentialsSecretRef: {name: k, key: x}\n      models: {m: m}",
            ),
            "must start with https://",
        ),
        (
            "endpoint with a query",
            backend(
                "      provider: deepseek\n      endpoint: https://proxy.local/v1?x=1\n      credentialsSecretRef: {name: k, key: x}\n      models: {m: m}",
            ),
            "spec.backends[0].endpoint",
        ),
        (
            "negative priority",
            with_backend("").replace(
                "models: { gpt-4o: gpt-4o }",
                "models: { gpt-4o: gpt-4o }\n      priority: -1",
            ),
            "spec.backends[0].priority",
        ),
        (
            "zero weight",
            with_backend("").replace(
                "models: { gpt-4o: gpt-4o }",
                "models: { gpt-4o: gpt-4o }\n      weight: 0",
            ),
            "spec.backends[0].weight",
        ),
        (
            "unknown strategy",
            with_backend("  policy: { strategy: Random }"),
            "spec.policy.strategy: Unsupported value",
        ),
        (
            "unknown failure class",
            with_backend("  policy: { failoverOn: [RegionBlocked, Teapot] }"),
            "spec.policy.failoverOn[1]",
        ),
        (
            "bad duration",
            with_backend("  policy: { timeouts: { request: 5 minutes } }"),
            "spec.policy.timeouts.request",
        ),
        (
            "direct mode without defaultModel",
            with_backend("  workloadSecret: { mode: Direct }"),
            "spec.defaultModel: spec.defaultModel is required when spec.workloadSecret.mode is Direct",
        ),
        (
            "defaultModel not mapped",
            with_backend("  defaultModel: claude"),
            "spec.defaultModel: spec.defaultModel must be a key",
        ),
        (
            "LowestCost without cost",
            with_backend("  policy: { strategy: LowestCost }"),
            "spec.policy.strategy: spec.policy.strategy LowestCost needs",
        ),
        (
            "budget without a limit",
            with_backend("  policy: { budget: { period: Day } }"),
            "spec.policy.budget.tokens: a budget needs tokens or cost",
        ),
        (
            "cost budget without prices",
            with_backend("  policy: { budget: { cost: \"5\" } }"),
            "spec.policy.budget.cost: spec.policy.budget.cost needs spec.backends[].cost",
        ),
        (
            "backend cost budget without its price",
            route_yaml(
                "r",
                &format!("  backends:{VALID_BACKEND}\n      budget: {{ cost: \"1\" }}"),
            ),
            "spec.backends[0].budget.cost: spec.backends[].budget.cost needs spec.backends[].cost",
        ),
        (
            "opted-in operation without its charge under a budget",
            with_backend(
                "  policy: { budget: { tokens: 1000 } }\n  operations: [{ name: files, tokensPerRequest: 5 }, { name: images }]",
            ),
            "spec.operations: spec.operations[].tokensPerRequest is required on every operation when the route has a budget",
        ),
        (
            "opted-in operation without its charge under a backend budget",
            route_yaml(
                "r",
                &format!(
                    "  backends:{VALID_BACKEND}\n      budget: {{ tokens: 5 }}\n  operations: [{{ name: audio }}]"
                ),
            ),
            "spec.operations: spec.operations[].tokensPerRequest is required",
        ),
        (
            "unknown operation",
            with_backend("  operations: [{ name: realtime }]"),
            "spec.operations[0].name: Unsupported value: \"realtime\"",
        ),
        (
            "duplicate operation",
            with_backend("  operations: [{ name: files }, { name: files, tokensPerRequest: 1 }]"),
            "spec.operations[1]: Duplicate value: \"files\"",
        ),
        (
            "region not a code",
            with_backend("  region: china"),
            "spec.region",
        ),
        (
            "unknown field",
            with_backend("  regoin: cn"),
            "spec.regoin: unknown field",
        ),
        (
            "too many backends",
            route_yaml(
                "r",
                &format!(
                    "  backends:{}",
                    (0..17)
                        .map(|i| VALID_BACKEND.replace("name: a", &format!("name: b{i}")))
                        .collect::<String>()
                ),
            ),
            "spec.backends: must have at most 16",
        ),
        (
            "wrong type",
            with_backend("  defaultModel: [a]"),
            "spec.defaultModel: must be of type string",
        ),
    ];
    assert!(cases.len() >= 20);
    let dir = tempfile::tempdir().unwrap();
    for (what, yaml, needle) in &cases {
        let file = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&file, yaml).unwrap();
        let out = llmroute(&["render", "-f", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: exit code; stderr: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{what}: printed objects despite errors"
        );
        assert!(!stderr.contains("panicked"), "{what}: panic: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            !lines.is_empty() && lines.len() <= 2,
            "{what}: expected one line (two at most), got {lines:?}"
        );
        let file_name = file.display().to_string();
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with(&format!("error: {file_name}: "))),
            "{what}: line must name the file: {lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "{what}: expected {needle:?} in {lines:?}"
        );
        if !what.contains("YAML")
            && *what != "tab indentation"
            && *what != "not a mapping"
            && *what != "missing name"
            && *what != "name not a DNS label"
        {
            assert!(
                lines[0].contains("LLMRoute \"r\": "),
                "{what}: line must name the route: {lines:?}"
            );
        }
    }
}

#[test]
fn render_prints_objects_with_secrets_redacted() {
    let out = llmroute(&[
        "render",
        "-f",
        repo_root()
            .join("examples/failover-cn.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<&str> = text.lines().filter(|l| l.starts_with("kind: ")).collect();
    assert_eq!(
        kinds,
        [
            "kind: ConfigMap",
            "kind: Secret",
            "kind: Deployment",
            "kind: Service",
            "kind: PodDisruptionBudget",
            "kind: NetworkPolicy",
            "kind: Secret"
        ]
    );
    assert!(text.contains("OPENAI_BASE_URL: <redacted>") && text.contains("tls.key: <redacted>"));
    assert!(text.contains("name: llmroute-gateway-xds") && text.contains("DELTA_GRPC"));
    assert!(!text.contains("llmroute-render-chat") && !text.contains("placeholder"));
    assert!(text.contains("name: chat-llm") && text.contains("namespace: team-a"));
}

/// A namespace whose configuration would not fit in a ConfigMap (8 routes of 16 accounts: about
/// 1.3 MB) renders: the configuration reaches gateways over xDS, not through a ConfigMap.
#[test]
fn render_handles_a_configuration_larger_than_a_config_map() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = Vec::new();
    for r in 0..8 {
        let backends: String = (0..16)
            .map(|b| {
                format!(
                    "    - name: b{b}\n      provider: openai-compatible\n      endpoint: http://llm-{r}-{b}.models.svc:8000/v1\n      priority: {b}\n      credentialsSecretRef: {{ name: keys, key: k{b} }}\n      models: {{ chat: model-{b} }}\n"
                )
            })
            .collect();
        docs.push(route_yaml(
            &format!("r{r}"),
            &format!("  backends:\n{backends}"),
        ));
    }
    let file = dir.path().join("routes.yaml");
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let out = llmroute(&["render", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let routes = render::load_files(&[file]).unwrap();
    let opts = RenderOptions {
        namespace: "default".into(),
        default_region: "us".into(),
        envoy: EnvoyOptions::default(),
        xds: Default::default(),
        deployment: Default::default(),
        operator_namespace: "llmroute-system".into(),
    };
    let ns = &render::translate_offline(&routes, &opts)[0];
    let ads = envoy::ads_config(
        &ns.translation.gateway,
        &opts.envoy,
        &render::placeholder_keys(&ns.translation),
        None,
    );
    let snapshot =
        llmroute::xds::snapshot::Snapshot::next(None, ads.resources, ads.routes).unwrap();
    assert!(snapshot.bytes() > 1024 * 1024, "{}", snapshot.bytes());
}

/// The gateway Deployment terminates gracefully: the shutdown-manager sidecar (the operator's image,
/// from the options) drains Envoy in its preStop, Envoy's preStop waits for the manager, and the
/// grace period and Envoy's drain time cover the maximum drain.
#[test]
fn the_gateway_deployment_drains_envoy_before_its_sigterm() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use llmroute::gateway::objects::{self, GatewayDeploymentOptions};
    let envoy_opts = EnvoyOptions {
        admin_port: 9911,
        usage_log: objects::USAGE_LOG_FILE.into(),
        ..Default::default()
    };
    let opts = GatewayDeploymentOptions {
        shutdown_manager_image: "registry.example.com/llmroute:9.9.9".into(),
        ..Default::default()
    };
    let d = objects::deployment("team-a", &envoy_opts, &opts, "0", &[]);
    let pod = d.spec.unwrap().template.spec.unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["envoy", "shutdown-manager"]);
    let (envoy, manager) = (&pod.containers[0], &pod.containers[1]);

    // Envoy: preStop GET of the manager's /shutdown/ready, by port number (a name would resolve among
    // Envoy's own ports); it drains for the maximum drain, asking every client to go at once.
    let get = envoy
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.http_get.as_ref())
        .expect("envoy preStop httpGet");
    assert_eq!(get.path.as_deref(), Some("/shutdown/ready"));
    assert_eq!(get.port, IntOrString::Int(19002));
    let args = envoy.args.clone().unwrap();
    let flag = |name: &str| args[args.iter().position(|a| a == name).unwrap() + 1].clone();
    assert_eq!(
        flag("--drain-time-s"),
        objects::MAX_DRAIN_SECONDS.to_string()
    );
    assert_eq!(flag("--drain-strategy"), "immediate");

    // The sidecar: the image of the options, the manager listening on that port, the drain in its
    // preStop against this gateway's admin port, the state in its own emptyDir.
    assert_eq!(
        manager.image.as_deref(),
        Some("registry.example.com/llmroute:9.9.9")
    );
    let command = manager.command.clone().unwrap();
    assert_eq!(command[..3], ["llmroute", "gateway", "shutdown-manager"]);
    assert!(command.windows(2).any(|w| w == ["--port", "19002"]));
    let ports = manager.ports.clone().unwrap();
    let ports: Vec<_> = ports
        .iter()
        .map(|p| (p.name.as_deref().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(ports, [("shutdown", 19002), ("usage", 19004)]);
    // The usage endpoint serves with the gateway's certificate (mutual TLS, the operator only).
    assert!(command.windows(2).any(|w| w == ["--usage-port", "19004"]));
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--tls-dir", objects::XDS_CERT_DIR])
    );
    let mounts = manager.volume_mounts.clone().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == objects::XDS_CERT_DIR && m.read_only == Some(true))
    );
    let exec = manager
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("sidecar preStop exec");
    assert_eq!(exec[..3], ["llmroute", "gateway", "shutdown"]);
    for pair in [
        ["--admin-port", "9911"],
        ["--min-drain", &format!("{}s", objects::MIN_DRAIN_SECONDS)],
        ["--max-drain", &format!("{}s", objects::MAX_DRAIN_SECONDS)],
    ] {
        assert!(exec.windows(2).any(|w| w == pair), "{pair:?} in {exec:?}");
    }
    let state = objects::SHUTDOWN_STATE_DIR;
    assert!(exec.windows(2).any(|w| w == ["--state-dir", state]));
    assert!(command.windows(2).any(|w| w == ["--state-dir", state]));
    let mount = &manager.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, state);
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the state volume");
    assert!(volume.empty_dir.is_some());

    // The access log: Envoy writes it into a volume the sidecar mounts too, and follows.
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--usage-log", objects::USAGE_LOG_FILE])
    );
    assert!(objects::USAGE_LOG_FILE.starts_with(&format!("{}/", objects::USAGE_LOG_DIR)));
    for container in [envoy, manager] {
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == objects::USAGE_LOG_DIR)
            .unwrap_or_else(|| panic!("{} mounts the usage log", container.name));
        assert_ne!(mount.read_only, Some(true), "both write there");
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name);
        assert!(volume.and_then(|v| v.empty_dir.as_ref()).is_some());
    }
    assert!(
        envoy
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != mount.name),
        "only the sidecar sees the drain state"
    );

    // Hardened as Envoy, small.
    assert_eq!(manager.security_context, envoy.security_context);
    let requests = manager
        .resources
        .as_ref()
        .unwrap()
        .requests
        .clone()
        .unwrap();
    assert_eq!(requests["memory"].0, "16Mi");

    // The grace period covers the maximum drain, the manager's wait and a margin.
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert_eq!(grace, objects::TERMINATION_GRACE_SECONDS);
    let ready_timeout = command[command.iter().position(|a| a == "--ready-timeout").unwrap() + 1]
        .trim_end_matches('s')
        .parse::<i64>()
        .unwrap();
    assert!(objects::MAX_DRAIN_SECONDS < ready_timeout && ready_timeout < grace);
    const { assert!(objects::MIN_DRAIN_SECONDS < objects::MAX_DRAIN_SECONDS) };
}

#[test]
fn the_gateway_pod_copies_the_usage_module_for_envoy_from_the_operator_image() {
    use llmroute::gateway::objects::{self, GatewayDeploymentOptions};
    let opts = GatewayDeploymentOptions {
        shutdown_manager_image: "registry.example.com/llmroute:9.9.9".into(),
        ..Default::default()
    };
    let with = EnvoyOptions {
        usage_module: objects::USAGE_MODULE_FILE.into(),
        ..Default::default()
    };
    let pod = objects::deployment("team-a", &with, &opts, "0", &[])
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    // An init container of the operator's image fills the volume before Envoy starts...
    let [init] = pod.init_containers.as_deref().unwrap() else {
        panic!("one init container: {:?}", pod.init_containers);
    };
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example.com/llmroute:9.9.9")
    );
    assert_eq!(
        init.command.as_deref().unwrap(),
        [
            "llmroute",
            "gateway",
            "install-modules",
            "--to",
            objects::MODULES_DIR
        ]
    );
    assert_eq!(
        objects::USAGE_MODULE_FILE,
        format!(
            "{}/{}",
            objects::MODULES_DIR,
            llmroute::gateway::envoy::SSE_USAGE_MODULE_FILE
        )
    );
    let envoy = &pod.containers[0];
    let mount_of = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == objects::MODULES_DIR)
            .cloned()
            .unwrap_or_else(|| panic!("{} mounts the modules", c.name))
    };
    // ...which Envoy only reads.
    assert_eq!(mount_of(envoy).read_only, Some(true));
    assert_ne!(mount_of(init).read_only, Some(true));
    assert_eq!(mount_of(envoy).name, mount_of(init).name);
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount_of(envoy).name);
    assert!(volume.and_then(|v| v.empty_dir.as_ref()).is_some());
    assert_eq!(init.security_context, envoy.security_context);

    // A module elsewhere is the Envoy image's own (or none): no init container, no volume.
    for usage_module in ["", "/opt/envoy/libllmroute_sse_usage.so"] {
        let envoy_opts = EnvoyOptions {
            usage_module: usage_module.into(),
            ..Default::default()
        };
        let pod = objects::deployment("team-a", &envoy_opts, &opts, "0", &[])
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert!(pod.init_containers.is_none(), "{usage_module:?}");
        assert!(
            pod.volumes.iter().flatten().all(|v| v.name != "modules"),
            "{usage_module:?}"
        );
    }
}
