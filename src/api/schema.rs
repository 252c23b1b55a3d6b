//! Hand-written schema fragments for fields whose OpenAPI needs Kubernetes extensions
//! (`x-kubernetes-list-type`, list-map keys, bounded maps) or values that come from the catalog.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::json;

use super::{Backend, BackendStatus, BackendUsage, FailureClass, Operation};
use crate::catalog;

/// Matches Go's `time.ParseDuration` for the units that make sense here.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

fn inline<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<T>();
    // kube's generator inlines subschemas; keep whatever it produced.
    schema.remove("description");
    schema
}

/// A budget's `timeZone`: one of the IANA time zone names llmroute's bundled database knows (the
/// API server refuses any other, so a typo never silently counts in UTC), without the database's
/// files that are no zone of a place (`localtime`, `posixrules`, `Factory`).
pub fn time_zone(_: &mut SchemaGenerator) -> Schema {
    let mut names: Vec<String> = jiff::tz::db()
        .available()
        .map(|name| name.as_str().to_string())
        .filter(|name| !matches!(name.as_str(), "localtime" | "posixrules" | "Factory"))
        .collect();
    names.sort();
    json_schema!({
        "type": "string",
        "maxLength": 64,
        "enum": names,
    })
}

/// `spec.backends`: a list-map keyed by `name`, so server-side apply merges entries and the API
/// server rejects duplicate names.
pub fn backend_list(generator: &mut SchemaGenerator) -> Schema {
    let items = inline::<Backend>(generator);
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "items": items,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    })
}

/// `spec.operations`: at most 16, a list-map keyed by `name`, so the API server rejects duplicate
/// names.
pub fn operation_list(generator: &mut SchemaGenerator) -> Schema {
    let items = inline::<Operation>(generator);
    json_schema!({
        "type": "array",
        "maxItems": 16,
        "items": items,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    })
}

/// A status list of at most 16 `T`, one per backend: a list-map keyed by `name`.
fn per_backend<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let items = inline::<T>(generator);
    json_schema!({
        "type": "array",
        "maxItems": 16,
        "items": items,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    })
}

/// `status.backends`.
pub fn backend_status_list(generator: &mut SchemaGenerator) -> Schema {
    per_backend::<BackendStatus>(generator)
}

/// `status.usage.backends`.
pub fn backend_usage_list(generator: &mut SchemaGenerator) -> Schema {
    per_backend::<BackendUsage>(generator)
}

/// `status.conditions`: standard `metav1.Condition`s, a list-map keyed by `type`.
pub fn condition_list(generator: &mut SchemaGenerator) -> Schema {
    let items = inline::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>(generator);
    json_schema!({
        "type": "array",
        "maxItems": 16,
        "items": items,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// `backends[].provider`: one of the catalog's ids.
pub fn provider_id(_: &mut SchemaGenerator) -> Schema {
    let ids: Vec<&str> = catalog::providers().iter().map(|p| p.id.as_str()).collect();
    json_schema!({ "type": "string", "enum": ids })
}

/// `backends[].models`: logical name → provider model, 1 to 64 entries.
pub fn model_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "minLength": 1,
            "maxLength": 256,
            "pattern": "^(\\*|[A-Za-z0-9][-A-Za-z0-9._:/@+]*)$",
        },
        "x-kubernetes-validations": [{
            "rule": "self.all(k, k == '*' || (k.size() <= 128 && k.matches('^[A-Za-z0-9][-A-Za-z0-9._:/@+]*$')))",
            "message": "model names (keys) must be 1-128 characters of letters, digits and -._:/@+, or exactly \"*\"",
        }],
    })
}

/// A set of lower-case ISO 3166-1 alpha-2 region codes.
pub fn region_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": { "type": "string", "pattern": "^[a-z]{2}$", "maxLength": 2 },
        "x-kubernetes-list-type": "set",
    })
}

/// `policy.failoverOn`: a set of failure classes.
pub fn failure_class_set(_: &mut SchemaGenerator) -> Schema {
    let classes: Vec<&str> = FailureClass::ALL.iter().map(|c| c.as_str()).collect();
    json_schema!({
        "type": "array",
        "maxItems": classes.len(),
        "items": { "type": "string", "enum": classes },
        "x-kubernetes-list-type": "set",
        "default": classes,
    })
}

/// A positive Go-style duration.
pub fn duration(_: &mut SchemaGenerator) -> Schema {
    Schema::try_from(json!({
        "type": "string",
        "maxLength": 32,
        "pattern": DURATION_PATTERN,
        "x-kubernetes-validations": [{
            "rule": "duration(self) >= duration('1ms') && duration(self) <= duration('24h')",
            "message": "must be a duration between 1ms and 24h, such as 500ms, 30s or 2m",
        }],
    }))
    .expect("duration schema is an object")
}

/// A Go-style duration that may be zero (`0s`).
pub fn duration_or_zero(_: &mut SchemaGenerator) -> Schema {
    Schema::try_from(json!({
        "type": "string",
        "maxLength": 32,
        "pattern": DURATION_PATTERN,
        "x-kubernetes-validations": [{
            "rule": "duration(self) <= duration('24h')",
            "message": "must be a duration of at most 24h, such as 0s, 30s or 5m",
        }],
    }))
    .expect("duration schema is an object")
}
