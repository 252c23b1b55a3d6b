//! `llmroute render`: LLMRoute files → what the operator would apply, offline. Parsing, validation
//! and translation are the same code the operator runs; only the inputs differ (no cluster: every
//! referenced Secret key is assumed to exist, and keys are placeholders).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::api::LLMRoute;
use crate::gateway::envoy::{self, EnvoyOptions, XdsClient};
use crate::gateway::keys::KeyMaterial;
use crate::gateway::objects::{self, GatewayDeploymentOptions};
use crate::gateway::{self, Translation};
use crate::operator::plan::{self, NamespaceFacts, Plan, Settings};
use crate::policy::Facts;
use crate::validate::validate_route;

/// A problem with the input, naming the file, the route (when known) and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    pub file: String,
    pub route: Option<String>,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some(r) => write!(f, "{}: LLMRoute {r:?}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// A route read from a file, valid against the CRD.
#[derive(Clone, Debug)]
pub struct LoadedRoute {
    pub file: String,
    pub route: LLMRoute,
}

/// Parses and validates every LLMRoute in `text` (a YAML stream). Documents of other kinds are
/// ignored; an empty document is skipped.
pub fn parse_routes(file: &str, text: &str) -> Result<Vec<LoadedRoute>, Vec<InputError>> {
    let mut routes = Vec::new();
    let mut errors = Vec::new();
    let input_error = |route: Option<String>, message: String| InputError {
        file: file.to_string(),
        route,
        message,
    };
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(input_error(
                    None,
                    format!("document {}: invalid YAML: {e}", index + 1),
                ));
                // The stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if !value.is_object() {
            errors.push(input_error(
                None,
                format!(
                    "document {}: expected a Kubernetes object (a mapping)",
                    index + 1
                ),
            ));
            continue;
        }
        if value.get("kind").and_then(Value::as_str) != Some("LLMRoute") {
            continue;
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        match validate_route(&value) {
            Ok(route) => routes.push(LoadedRoute {
                file: file.to_string(),
                route,
            }),
            Err(field_errors) => errors.extend(
                field_errors
                    .into_iter()
                    .map(|e| input_error(name.clone(), e.to_string())),
            ),
        }
    }
    if errors.is_empty() {
        Ok(routes)
    } else {
        Err(errors)
    }
}

/// Reads and validates route files; also rejects two routes with the same namespace and name.
pub fn load_files(paths: &[PathBuf]) -> Result<Vec<LoadedRoute>, Vec<InputError>> {
    let mut routes: Vec<LoadedRoute> = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => match parse_routes(&file, &text) {
                Ok(mut r) => routes.append(&mut r),
                Err(mut e) => errors.append(&mut e),
            },
            Err(e) => errors.push(InputError {
                file,
                route: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let mut seen = BTreeSet::new();
    for r in &routes {
        let key = (
            namespace_of(&r.route, "default"),
            kube::ResourceExt::name_any(&r.route),
        );
        if !seen.insert(key.clone()) {
            errors.push(InputError {
                file: r.file.clone(),
                route: Some(key.1),
                message: format!("metadata.name: Duplicate value: another LLMRoute in namespace {:?} has this name", key.0),
            });
        }
    }
    if errors.is_empty() {
        Ok(routes)
    } else {
        Err(errors)
    }
}

fn namespace_of(route: &LLMRoute, default: &str) -> String {
    route
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| default.to_string())
}

/// Options of an offline render.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    pub namespace: String,
    pub default_region: String,
    pub envoy: EnvoyOptions,
    /// The xDS server the gateways' bootstrap names.
    pub xds: XdsClient,
    pub deployment: GatewayDeploymentOptions,
    /// The operator's namespace (named in the gateways' NetworkPolicy).
    pub operator_namespace: String,
}

/// One namespace's translation, with the facts assumed offline.
pub struct NamespaceRender {
    pub namespace: String,
    pub translation: Translation,
    pub routes: Vec<LLMRoute>,
}

/// Groups routes by namespace and translates each namespace, assuming every referenced key exists.
pub fn translate_offline(routes: &[LoadedRoute], opts: &RenderOptions) -> Vec<NamespaceRender> {
    let mut by_ns: BTreeMap<String, Vec<LLMRoute>> = BTreeMap::new();
    for r in routes {
        let mut route = r.route.clone();
        let ns = namespace_of(&route, &opts.namespace);
        route.metadata.namespace = Some(ns.clone());
        by_ns.entry(ns).or_default().push(route);
    }
    by_ns
        .into_iter()
        .map(|(namespace, mut routes)| {
            routes.sort_by_key(kube::ResourceExt::name_any);
            let mut facts = Facts {
                default_region: opts.default_region.clone(),
                ..Default::default()
            };
            for r in &routes {
                for b in &r.spec.backends {
                    if let Some(s) = &b.credentials_secret_ref {
                        facts
                            .secrets
                            .entry(s.name.clone())
                            .or_default()
                            .insert(s.key.clone());
                    }
                }
            }
            let translation = gateway::translate(&namespace, &routes, &facts);
            NamespaceRender {
                namespace,
                translation,
                routes,
            }
        })
        .collect()
}

/// Placeholder keys, for an offline gateway that really serves: provider keys are `placeholder`, a
/// route's key is `llmroute-render-<route>`.
pub fn placeholder_keys(t: &Translation) -> KeyMaterial {
    KeyMaterial {
        provider_keys: t
            .gateway
            .provider_keys
            .iter()
            .map(|k| (k.entry.clone(), b"placeholder".to_vec()))
            .collect(),
        route_keys: t
            .gateway
            .routes
            .iter()
            .map(|r| (r.name.clone(), format!("llmroute-render-{}", r.name)))
            .collect(),
    }
}

fn redact_secret(mut value: Value) -> Value {
    if let Some(data) = value.get_mut("data").and_then(Value::as_object_mut) {
        for v in data.values_mut() {
            *v = Value::String("<redacted>".into());
        }
    }
    value
}

/// What stands in an offline render for what only the operator makes (certificates).
const ISSUED_BY_THE_OPERATOR: &str = "<issued by the operator>";

/// The plan the operator would make for a namespace, with the facts assumed offline: every
/// referenced Secret key exists (its value a placeholder), route keys are placeholders, nothing was
/// probed or counted, and the certificate is one the operator would issue.
pub fn offline_plan(ns: &NamespaceRender, opts: &RenderOptions) -> Plan {
    let mut secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for b in ns.routes.iter().flat_map(|r| &r.spec.backends) {
        if let Some(s) = &b.credentials_secret_ref {
            let data = secrets.entry(s.name.clone()).or_default();
            data.insert(s.key.clone(), b"placeholder".to_vec());
        }
    }
    let routes = ns
        .routes
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.metadata
                .uid
                .get_or_insert_with(|| "<assigned-by-the-api-server>".into());
            Arc::new(r)
        })
        .collect::<Vec<_>>();
    let facts = NamespaceFacts {
        namespace: ns.namespace.clone(),
        route_keys: placeholder_keys(&ns.translation).route_keys,
        routes,
        secrets,
        health: BTreeMap::new(),
        usage: BTreeMap::new(),
        usage_unknown: None,
        now_ms: 0,
        certificate: crate::xds::tls::Pem {
            cert: ISSUED_BY_THE_OPERATOR.into(),
            key: ISSUED_BY_THE_OPERATOR.into(),
            not_after: 0,
        },
        ca_pem: ISSUED_BY_THE_OPERATOR.into(),
        previous: None,
    };
    let settings = Settings {
        default_region: &opts.default_region,
        envoy: &opts.envoy,
        deployment: &opts.deployment,
        xds: &opts.xds,
        upstream_ca: None,
        operator_namespace: &opts.operator_namespace,
    };
    plan::decide(facts, &settings)
}

/// The objects the operator would apply (the objects of its plan, see [`offline_plan`]), as a YAML
/// stream, with Secret values redacted.
pub fn objects_yaml(renders: &[NamespaceRender], opts: &RenderOptions) -> String {
    let mut docs: Vec<Value> = Vec::new();
    let issued = Value::String(ISSUED_BY_THE_OPERATOR.into());
    for ns in renders {
        let plan = offline_plan(ns, opts);
        let o = &plan.objects;
        docs.push(typed_doc("v1", "ConfigMap", to_value(&o.config_map)));
        let mut xds_secret = redact_secret(to_value(&o.xds_secret));
        xds_secret["metadata"]["annotations"][objects::CERT_NOT_AFTER_ANNOTATION] = issued.clone();
        docs.push(typed_doc("v1", "Secret", xds_secret));
        let mut deployment = to_value(&o.deployment);
        deployment["spec"]["template"]["metadata"]["annotations"]
            [objects::CERT_NOT_AFTER_ANNOTATION] = issued.clone();
        docs.push(typed_doc("apps/v1", "Deployment", deployment));
        docs.push(typed_doc("v1", "Service", to_value(&o.service)));
        docs.push(typed_doc(
            "policy/v1",
            "PodDisruptionBudget",
            to_value(&o.budget),
        ));
        docs.push(typed_doc(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            to_value(&o.network_policy),
        ));
        for route in &ns.routes {
            let name = kube::ResourceExt::name_any(route);
            if let Some(secret) = plan.workloads.get(&name).and_then(|w| w.secret.as_ref()) {
                docs.push(typed_doc("v1", "Secret", redact_secret(to_value(secret))));
            }
        }
    }
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("objects serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("Kubernetes objects serialize")
}

fn typed_doc(api_version: &str, kind: &str, mut v: Value) -> Value {
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".into(), Value::String(api_version.into()));
    doc.insert("kind".into(), Value::String(kind.into()));
    if let Value::Object(map) = &mut v {
        doc.append(map);
    }
    Value::Object(doc)
}

/// The static equivalent of the gateway, for `envoy --mode validate -c DIR/validate.yaml`.
pub const VALIDATE_FILE: &str = "validate.yaml";

/// Writes a namespace's gateway files for a local Envoy: configuration in `dir` (a bootstrap with
/// file-based xDS), placeholder keys in `dir/keys`. Returns the route keys, by route.
pub fn write_gateway_dir(
    render: &NamespaceRender,
    dir: &Path,
    envoy_opts: &EnvoyOptions,
) -> std::io::Result<BTreeMap<String, String>> {
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    let (dir_s, keys_s) = (dir.display().to_string(), keys_dir.display().to_string());
    let keys = placeholder_keys(&render.translation);
    let gw = &render.translation.gateway;
    for (name, content) in envoy::render_files(gw, envoy_opts, &dir_s, &keys_s, &keys) {
        std::fs::write(dir.join(name), content)?;
    }
    std::fs::write(
        dir.join(VALIDATE_FILE),
        envoy::render_static(gw, envoy_opts, &keys_s, &keys),
    )?;
    for (entry, value) in &keys.provider_keys {
        std::fs::write(keys_dir.join(entry), value)?;
    }
    Ok(keys.route_keys)
}
