//! Smoke tests of the real test control plane, and of the LLMRoute CRD on it: establishment,
//! `kubectl explain`, CEL admission, status subresource, printer columns, garbage collection, the
//! deployment controller, and RBAC for non-admin identities.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use llmroute::api::{LLMRoute, LLMRouteStatus};
use support::cluster::{TestNamespace, cluster, eventually};

const VALID: &str = r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata:
  name: chat
spec:
  region: cn
  backends:
    - name: zhipu
      provider: zhipu
      credentialsSecretRef: { name: zhipu-key, key: api-key }
      models: { gpt-4o: glm-4-plus }
"#;

#[tokio::test]
async fn crd_is_established_and_explained() {
    let c = cluster();
    c.install_crds();
    let ns_list = c.kubectl_ok(&["get", "ns", "-o", "name"]);
    for ns in [
        "namespace/default",
        "namespace/kube-system",
        "namespace/kube-public",
    ] {
        assert!(ns_list.contains(ns), "{ns_list}");
    }
    // The API server publishes a new CRD's OpenAPI a few seconds after it is established.
    let explain = eventually(
        Duration::from_secs(60),
        "kubectl explain to know llmroutes",
        || {
            let out = c.kubectl(&["explain", "llmroute.spec.backends"]);
            async move {
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        },
    )
    .await;
    assert!(
        explain.contains("The providers this route may use"),
        "{explain}"
    );
    assert!(explain.contains("credentialsSecretRef"), "{explain}");
    let explain = c.kubectl_ok(&["explain", "llmr.spec.policy.failoverOn"]);
    assert!(
        explain.contains("Failure classes that make a request move on"),
        "{explain}"
    );
}

#[tokio::test]
async fn invalid_routes_are_rejected_with_the_cel_message() {
    let ns = TestNamespace::new("cel").await;
    let c = ns.cluster();
    c.install_crds();
    let direct_without_model =
        VALID.replace("spec:\n", "spec:\n  workloadSecret: { mode: Direct }\n");
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&direct_without_model),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.defaultModel is required when spec.workloadSecret.mode is Direct"),
        "{stderr}"
    );

    let azure_without_endpoint = VALID.replace("provider: zhipu", "provider: azure-openai");
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&azure_without_endpoint),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "spec.backends[].endpoint is required for providers without a catalog base URL"
        ),
        "{stderr}"
    );

    let unknown_provider = VALID.replace("provider: zhipu", "provider: zhipu-ai");
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&unknown_provider),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unsupported value: \"zhipu-ai\""),
        "{stderr}"
    );

    // An opted-in operation reports no usage: under a budget it must say what it is charged.
    let operation_without_charge = VALID.replace(
        "spec:\n",
        "spec:\n  policy: { budget: { tokens: 1000 } }\n  operations: [{ name: files }]\n",
    );
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&operation_without_charge),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "spec.operations[].tokensPerRequest is required on every operation when the route has a budget"
        ),
        "{stderr}"
    );
    let duplicate_operation = VALID.replace(
        "spec:\n",
        "spec:\n  operations: [{ name: files }, { name: files }]\n",
    );
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&duplicate_operation),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Duplicate value"), "{stderr}");
    let operation_with_charge = operation_without_charge
        .replace("{ name: files }", "{ name: files, tokensPerRequest: 100 }");
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
        Some(&operation_with_charge),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the API server rejects, the client-side validation rejects too (and the reverse for these).
    for (yaml, expect_ok) in [
        (VALID.to_string(), true),
        (direct_without_model, false),
        (azure_without_endpoint, false),
        (operation_without_charge, false),
        (duplicate_operation, false),
        (operation_with_charge, true),
    ] {
        let mut value: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        value["metadata"]["namespace"] = ns.name.clone().into();
        assert_eq!(
            llmroute::validate::validate_route(&value).is_ok(),
            expect_ok,
            "{yaml}"
        );
    }
}

#[tokio::test]
async fn a_valid_route_round_trips_with_defaults_and_status() {
    let ns = TestNamespace::new("roundtrip").await;
    let c = ns.cluster();
    c.install_crds();
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(VALID),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<LLMRoute> = Api::namespaced(c.client().await, &ns.name);
    let route = api.get("chat").await.unwrap();
    // Structural defaults applied by the API server.
    assert_eq!(
        route.spec.policy.strategy,
        llmroute::api::Strategy::Failover
    );
    assert_eq!(route.spec.backends[0].weight, 1);
    assert_eq!(route.spec.policy.failover_on.len(), 7);

    // Status through the status subresource.
    let status = LLMRouteStatus {
        observed_generation: route.metadata.generation,
        active_backend: Some("zhipu".into()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Programmed".into(),
            message: "serving from zhipu".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: route.metadata.generation,
        }],
        ..Default::default()
    };
    let patch = serde_json::json!({ "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute", "status": status });
    api.patch_status(
        "chat",
        &PatchParams::apply("llmroute-test").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
    let route = api.get("chat").await.unwrap();
    let got = route.status.unwrap();
    assert_eq!(got.active_backend.as_deref(), Some("zhipu"));
    assert_eq!(got.conditions[0].reason, "Programmed");

    // A spec write cannot change status (subresource), and kubectl shows the printer columns.
    let table = c.kubectl_ok(&["get", "llmr", "-n", &ns.name]);
    let header = table.lines().next().unwrap();
    for col in ["NAME", "READY", "ACTIVE", "STRATEGY", "AGE"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("True") && row.contains("zhipu") && row.contains("Failover"),
        "{table}"
    );
}

#[tokio::test]
async fn owned_objects_are_garbage_collected() {
    let ns = TestNamespace::new("gc").await;
    let client = ns.cluster().client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns.name);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("owner", None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let owner_ref = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.unwrap(),
        ..Default::default()
    };
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("dependent", Some(owner_ref)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the dependent ConfigMap to be garbage-collected",
        || {
            let cms = cms.clone();
            async move {
                cms.get_opt("dependent")
                    .await
                    .unwrap()
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
}

fn meta(name: &str, owner: Option<OwnerReference>) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        owner_references: owner.map(|o| vec![o]),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_deployment_gets_a_replica_set() {
    let ns = TestNamespace::new("deploy").await;
    let client = ns.cluster().client().await;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] },
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let rss: Api<ReplicaSet> = Api::namespaced(client, &ns.name);
    eventually(
        Duration::from_secs(30),
        "a ReplicaSet for the Deployment",
        || {
            let rss = rss.clone();
            async move {
                (!rss
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty())
                .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_non_admin_identity_gets_only_what_rbac_grants() {
    let ns = TestNamespace::new("rbac").await;
    let c = ns.cluster();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("alice.kubeconfig");
    c.mint_kubeconfig("alice", &["team-a"], &kubeconfig);
    let denied = c.kubectl_as(&kubeconfig, &["get", "secrets", "-n", &ns.name], None);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Forbidden"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );

    // Grant the group read access to ConfigMaps in this namespace only.
    c.kubectl_ok(&[
        "create",
        "role",
        "cm-reader",
        "-n",
        &ns.name,
        "--verb=get,list",
        "--resource=configmaps",
    ]);
    c.kubectl_ok(&[
        "create",
        "rolebinding",
        "cm-reader",
        "-n",
        &ns.name,
        "--role=cm-reader",
        "--group=team-a",
    ]);
    let ok = eventually(
        Duration::from_secs(10),
        "the RoleBinding to take effect",
        || {
            let out = c.kubectl_as(&kubeconfig, &["get", "configmaps", "-n", &ns.name], None);
            async move { out.status.success().then_some(out) }
        },
    )
    .await;
    assert!(ok.status.success());
    let still_denied = c.kubectl_as(&kubeconfig, &["get", "secrets", "-n", &ns.name], None);
    assert!(!still_denied.status.success());
    let other_ns = c.kubectl_as(&kubeconfig, &["get", "configmaps", "-n", "default"], None);
    assert!(!other_ns.status.success(), "the Role is namespaced");
}
