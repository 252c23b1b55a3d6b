//! Client-side validation of LLMRoute objects against the CRD's own schema: the OpenAPI constraints
//! (types, enums, patterns, lengths, ranges, required fields, list-map keys, unknown fields) and the
//! CEL rules (`x-kubernetes-validations`, evaluated with kube-cel). The API server enforces the very
//! same schema at admission; `llmroute render` and the operator use this module, so the rules are
//! written once, in [`crate::api`].

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use regex::Regex;
use serde_json::Value;

use crate::api::{GROUP, LLMRoute, VERSION};

/// One thing wrong with a route, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.backends[1].provider`.
    pub path: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn err(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The CRD's `openAPIV3Schema`, as JSON.
pub fn route_schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = LLMRoute::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("the derived CRD has an openAPIV3Schema");
        serde_json::to_value(schema).expect("the schema serializes")
    })
}

thread_local! {
    // Compiled CEL programs are not Send; compile (and register CEL functions) once per thread.
    static COMPILED: RefCell<Option<(Validator, CompiledSchema)>> = const { RefCell::new(None) };
}

/// Validates an LLMRoute object (as parsed from YAML or JSON) the way the API server would admit it,
/// and returns it typed. All problems are reported, in a stable order.
pub fn validate_route(object: &Value) -> Result<LLMRoute, Vec<FieldError>> {
    let mut errors = Vec::new();
    let want_api_version = format!("{GROUP}/{VERSION}");
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v == want_api_version => {}
        Some(v) => errors.push(err(
            "apiVersion",
            format!("must be {want_api_version}, not {v:?}"),
        )),
        None => errors.push(err(
            "apiVersion",
            format!("Required value: {want_api_version}"),
        )),
    }
    match object.get("kind").and_then(Value::as_str) {
        Some("LLMRoute") => {}
        Some(k) => errors.push(err("kind", format!("must be LLMRoute, not {k:?}"))),
        None => errors.push(err("kind", "Required value: LLMRoute")),
    }
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if is_dns_label(name) => {}
        Some(name) => errors.push(err(
            "metadata.name",
            format!("{name:?} must be a DNS label (lower-case letters, digits and '-', at most 63 characters)"),
        )),
        None => errors.push(err("metadata.name", "Required value")),
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let schema = route_schema();
    check_schema(schema, object, "", &mut errors);
    if errors.is_empty() {
        // CEL rules assume a structurally valid object, as in the API server.
        errors.extend(check_cel(object));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    serde_json::from_value::<LLMRoute>(object.clone()).map_err(|e| vec![err("", e.to_string())])
}

/// Route names become path segments, Envoy names and Secret names: keep them DNS labels.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_cel(object: &Value) -> Vec<FieldError> {
    COMPILED.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (validator, compiled) =
            cell.get_or_insert_with(|| (Validator::new(), compile_schema(route_schema())));
        match validator.validate_compiled(compiled, object, None) {
            Ok(()) => Vec::new(),
            Err(errors) => errors
                .iter()
                .map(|e| FieldError {
                    path: e.field_path.clone(),
                    message: e.message.clone(),
                })
                .collect(),
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn regex_for(pattern: &str) -> Option<Regex> {
    thread_local! {
        static CACHE: RefCell<Vec<(String, Regex)>> = const { RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, re)) = cache.iter().find(|(p, _)| p == pattern) {
            return Some(re.clone());
        }
        let re = Regex::new(pattern).ok()?;
        cache.push((pattern.to_string(), re.clone()));
        Some(re)
    })
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Checks `value` against an OpenAPI v3 structural schema as the API server does.
fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errors.push(err(path, "must not be null"));
        }
        return;
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        return; // x-kubernetes-preserve-unknown-fields or int-or-string: nothing more to check here
    };
    let actual = type_name(value);
    let type_ok = actual == ty || (ty == "number" && actual == "integer");
    if !type_ok {
        errors.push(err(path, format!("must be of type {ty}, not {actual}")));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
        errors.push(err(
            path,
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    match value {
        Value::String(s) => check_string(schema, s, path, errors),
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                errors.push(err(path, format!("must be greater than or equal to {min}")));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                errors.push(err(path, format!("must be less than or equal to {max}")));
            }
        }
        Value::Array(items) => check_array(schema, items, path, errors),
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for field in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(field) = field.as_str()
                    && !map.contains_key(field)
                {
                    errors.push(err(&join(path, field), "Required value"));
                }
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && (map.len() as u64) < min
            {
                errors.push(err(path, format!("must have at least {min} entries")));
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && (map.len() as u64) > max
            {
                errors.push(err(path, format!("must have at most {max} entries")));
            }
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue; // implicit in every CRD schema; checked above
                }
                let child_path = join(path, key);
                match (props.and_then(|p| p.get(key)), additional) {
                    (Some(child_schema), _) => {
                        check_schema(child_schema, child, &child_path, errors)
                    }
                    (None, Some(add)) if add.is_object() => {
                        check_schema(add, child, &child_path, errors)
                    }
                    _ if schema.get("x-kubernetes-preserve-unknown-fields")
                        == Some(&Value::Bool(true)) => {}
                    _ => errors.push(err(&child_path, "unknown field")),
                }
            }
        }
        _ => {}
    }
}

fn check_string(schema: &Value, s: &str, path: &str, errors: &mut Vec<FieldError>) {
    let len = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        errors.push(err(path, format!("must be at least {min} characters long")));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        errors.push(err(
            path,
            format!("may not be more than {max} characters long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && regex_for(pattern).is_some_and(|re| !re.is_match(s))
    {
        errors.push(err(path, format!("{s:?} does not match {pattern:?}")));
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(err(path, format!("must have at least {min} items")));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && (items.len() as u64) > max
    {
        errors.push(err(path, format!("must have at most {max} items")));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check_schema(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<String> = keys
                    .iter()
                    .map(|k| item.get(*k).map(|v| v.to_string()).unwrap_or_default())
                    .collect();
                if !seen.insert(key.clone()) {
                    errors.push(err(
                        &format!("{path}[{i}]"),
                        format!("Duplicate value: {}", key.join(", ")),
                    ));
                }
            }
        }
        Some("set") => {
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                if !seen.insert(item.to_string()) {
                    errors.push(err(
                        &format!("{path}[{i}]"),
                        format!("Duplicate value: {item}"),
                    ));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(spec: Value) -> Value {
        json!({"apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute", "metadata": {"name": "chat"}, "spec": spec})
    }

    fn errors_of(spec: Value) -> Vec<String> {
        match validate_route(&route(spec)) {
            Ok(_) => vec![],
            Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_minimal_route_is_valid_and_gets_defaults() {
        let r = validate_route(&route(json!({"backends": [{"name": "a", "provider": "openai",
            "credentialsSecretRef": {"name": "k", "key": "api-key"}, "models": {"gpt-4o": "gpt-4o"}}]})))
        .unwrap();
        assert_eq!(r.spec.backends[0].weight, 1);
        assert_eq!(r.spec.policy.failover_on.len(), 7);
    }

    /// A budget's time zone is an IANA name of the bundled database; anything else is refused at
    /// admission, never counted in UTC by mistake.
    #[test]
    fn a_budget_time_zone_is_an_iana_name() {
        let spec = |zone: &str| {
            json!({"policy": {"budget": {"period": "Day", "timeZone": zone, "tokens": 100}},
            "backends": [{"name": "a", "provider": "openai",
            "credentialsSecretRef": {"name": "k", "key": "x"}, "models": {"m": "m"}}]})
        };
        for zone in [
            "Asia/Shanghai",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "UTC",
        ] {
            assert_eq!(errors_of(spec(zone)), Vec::<String>::new(), "{zone}");
        }
        for zone in ["Asia/Shangai", "UTC+8", "asia/shanghai", "localtime", ""] {
            let errs = errors_of(spec(zone));
            assert_eq!(errs.len(), 1, "{zone}: {errs:?}");
            assert!(
                errs[0].starts_with("spec.policy.budget.timeZone"),
                "{zone}: {errs:?}"
            );
        }
    }

    #[test]
    fn cel_rules_from_the_schema_are_enforced_client_side() {
        let errs = errors_of(
            json!({"workloadSecret": {"mode": "Direct"}, "backends": [{"name": "a",
            "provider": "openai", "credentialsSecretRef": {"name": "k", "key": "x"}, "models": {"m": "m"}}]}),
        );
        assert_eq!(
            errs,
            vec![
                "spec.defaultModel: spec.defaultModel is required when spec.workloadSecret.mode is Direct"
            ]
        );
        let errs = errors_of(
            json!({"backends": [{"name": "a", "provider": "azure-openai",
            "credentialsSecretRef": {"name": "k", "key": "x"}, "models": {"m": "m"}}]}),
        );
        assert!(errs[0].contains("endpoint is required"), "{errs:?}");
    }

    #[test]
    fn opted_in_operations_need_tokens_per_request_under_a_budget() {
        let backend = |budget: Value| {
            let mut b = json!({"name": "a", "provider": "openai",
                "credentialsSecretRef": {"name": "k", "key": "x"}, "models": {"m": "m"}});
            if !budget.is_null() {
                b["budget"] = budget;
            }
            b
        };
        let message = "spec.operations: spec.operations[].tokensPerRequest is required on every \
            operation when the route has a budget (spec.policy.budget or spec.backends[].budget): \
            opted-in operations report no usage";
        // The route's budget, or a backend's: every operation needs tokensPerRequest.
        let errs = errors_of(json!({"backends": [backend(Value::Null)],
            "policy": {"budget": {"tokens": 1000}},
            "operations": [{"name": "files", "tokensPerRequest": 10}, {"name": "images"}]}));
        assert_eq!(errs, vec![message]);
        let errs = errors_of(json!({"backends": [backend(json!({"tokens": 5}))],
            "operations": [{"name": "audio"}]}));
        assert_eq!(errs, vec![message]);
        // Given on each, or no budget at all: accepted.
        let r = validate_route(&route(json!({"backends": [backend(json!({"tokens": 5}))],
            "policy": {"budget": {"tokens": 100}},
            "operations": [{"name": "fine_tuning", "tokensPerRequest": 0}, {"name": "images", "tokensPerRequest": 1000}]})))
        .unwrap();
        assert_eq!(r.spec.operations.len(), 2);
        assert_eq!(
            r.spec.operations[0].name,
            crate::api::OperationName::FineTuning
        );
        assert_eq!(r.spec.operations[1].tokens_per_request, Some(1000));
        let r = validate_route(&route(json!({"backends": [backend(Value::Null)],
            "operations": [{"name": "files"}, {"name": "vector_stores"}]})))
        .unwrap();
        assert_eq!(
            r.spec.operations[1].name,
            crate::api::OperationName::VectorStores
        );
        assert_eq!(r.spec.operations[1].tokens_per_request, None);
        // Only known operations, each once, at most 16, never a negative charge.
        let errs = errors_of(json!({"backends": [backend(Value::Null)],
            "operations": [{"name": "chat/completions"}]}));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("spec.operations[0].name: Unsupported value: \"chat/completions\""),
            "{errs:?}"
        );
        let errs = errors_of(json!({"backends": [backend(Value::Null)],
            "operations": [{"name": "files"}, {"name": "images"}, {"name": "files", "tokensPerRequest": 1}]}));
        assert_eq!(errs, vec!["spec.operations[2]: Duplicate value: \"files\""]);
        let errs = errors_of(json!({"backends": [backend(Value::Null)],
            "operations": [{"name": "files", "tokensPerRequest": -1}]}));
        assert!(
            errs[0].starts_with("spec.operations[0].tokensPerRequest"),
            "{errs:?}"
        );
        let errs = errors_of(json!({"backends": [backend(Value::Null)],
            "operations": [{"tokensPerRequest": 1}]}));
        assert_eq!(errs, vec!["spec.operations[0].name: Required value"]);
        let many: Vec<Value> = (0..17)
            .map(|i| json!({"name": "files", "tokensPerRequest": i}))
            .collect();
        let errs = errors_of(json!({"backends": [backend(Value::Null)], "operations": many}));
        assert!(
            errs.iter()
                .any(|e| e == "spec.operations: must have at most 16 items"),
            "{errs:?}"
        );
    }

    #[test]
    fn schema_constraints_are_enforced_client_side() {
        let errs = errors_of(
            json!({"backends": [{"name": "A_b", "provider": "nope", "weight": 0,
            "models": {}, "bogus": 1}]}),
        );
        let text = errs.join("\n");
        for needle in [
            "spec.backends[0].name",
            "spec.backends[0].provider: Unsupported value",
            "spec.backends[0].weight",
            "spec.backends[0].models: must have at least 1",
            "spec.backends[0].bogus: unknown field",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }
}
