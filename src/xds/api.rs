//! The Envoy API as data: the protobuf descriptors of Envoy 1.40's xDS resources and extensions
//! (`envoy-api.bin`, written by `scripts/gen-envoy-api` from the Go bindings the Envoy project
//! publishes for that release), the conversion of the translation core's JSON resources into the
//! protobuf bytes xDS carries, and the messages of the delta Aggregated Discovery Service.
//!
//! The translation core writes Envoy resources as proto3 JSON (the same text `llmroute render` writes
//! and `envoy --mode validate` reads). Encoding that JSON against Envoy's own descriptors, with
//! unknown fields refused, means a resource the operator serves is checked field by field against
//! the API of the Envoy it configures before any gateway sees it.
//!
//! The stream messages are declared here with `prost` derives instead of generating all of Envoy's
//! API: they are five small messages, and a unit test checks every field number and type against the
//! descriptors above.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

static DESCRIPTORS: &[u8] = include_bytes!("envoy-api.bin");

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The resource types llmroute serves, in the order a change is pushed (clusters before the
/// listeners that route to them, listeners before the route configurations and secrets they ask for).
pub const TYPES: [&str; 4] = [CLUSTER, LISTENER, ROUTE, SECRET];

/// The descriptor pool of Envoy's API.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(DESCRIPTORS).expect("src/xds/envoy-api.bin is a FileDescriptorSet")
    })
}

/// The message name of a type URL (`type.googleapis.com/envoy.config.listener.v3.Listener` →
/// `envoy.config.listener.v3.Listener`).
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Encodes a resource given as proto3 JSON (a top-level `@type` is ignored) into the protobuf bytes
/// of `type_url`. Fields Envoy's API does not have are an error.
pub fn encode(type_url: &str, json: &serde_json::Value) -> Result<Vec<u8>, String> {
    let text = match json {
        serde_json::Value::Object(map) if map.contains_key("@type") => {
            let mut map = map.clone();
            map.remove("@type");
            serde_json::to_string(&map)
        }
        other => serde_json::to_string(other),
    }
    .map_err(|e| e.to_string())?;
    encode_str(type_url, &text)
}

/// [`encode`] of JSON text (without a top-level `@type`): parsed straight into the message, with
/// no intermediate JSON tree.
pub fn encode_str(type_url: &str, text: &str) -> Result<Vec<u8>, String> {
    let name = message_name(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("{name} is not in the Envoy API descriptors"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let message = DynamicMessage::deserialize_with_options(
        desc,
        &mut de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .and_then(|m| de.end().map(|()| m))
    .map_err(|e| format!("{name}: {e}"))?;
    Ok(prost::Message::encode_to_vec(&message))
}

/// Decodes protobuf bytes of `type_url` back into proto3 JSON (original field names), for the
/// operator's debug view and for tests.
pub fn decode(type_url: &str, bytes: &[u8]) -> Result<serde_json::Value, String> {
    let name = message_name(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("{name} is not in the Envoy API descriptors"))?;
    let message = DynamicMessage::decode(desc, bytes).map_err(|e| format!("{name}: {e}"))?;
    let options = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    let mut out = serde_json::Serializer::new(Vec::new());
    message
        .serialize_with_options(&mut out, &options)
        .map_err(|e| format!("{name}: {e}"))?;
    serde_json::from_slice(&out.into_inner()).map_err(|e| format!("{name}: {e}"))
}

/// `envoy.config.core.v3.Node`: who a gateway says it is. Only the fields llmroute reads; the
/// others are skipped when decoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<prost_types::Struct>,
    #[prost(string, tag = "6")]
    pub user_agent_name: String,
    #[prost(string, tag = "7")]
    pub user_agent_version: String,
    /// What Envoy sends (its build's version); `user_agent_version` is the same oneof's other
    /// field, which Envoy leaves empty.
    #[prost(message, optional, tag = "8")]
    pub user_agent_build_version: Option<BuildVersion>,
}

/// `envoy.config.core.v3.BuildVersion`: only its version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BuildVersion {
    #[prost(message, optional, tag = "1")]
    pub version: Option<SemanticVersion>,
}

/// `envoy.type.v3.SemanticVersion`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SemanticVersion {
    #[prost(uint32, tag = "1")]
    pub major_number: u32,
    #[prost(uint32, tag = "2")]
    pub minor_number: u32,
    #[prost(uint32, tag = "3")]
    pub patch: u32,
}

impl Node {
    /// The Envoy version the node runs, as it says (`user_agent_build_version`).
    pub fn envoy_version(&self) -> Option<SemanticVersion> {
        self.user_agent_build_version.as_ref()?.version
    }

    /// A string field of the node's metadata.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// `google.rpc.Status`: the error of a rejected (NACKed) response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryRequest {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    #[prost(map = "string, string", tag = "5")]
    pub initial_resource_versions: std::collections::HashMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

/// `envoy.service.discovery.v3.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<prost_types::Any>,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryResponse {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::{Kind, MessageDescriptor};

    fn message(name: &str) -> MessageDescriptor {
        pool()
            .get_message_by_name(name)
            .unwrap_or_else(|| panic!("{name} in the descriptors"))
    }

    /// (field name, number, kind name) of the fields the hand-declared messages use.
    fn check(name: &str, fields: &[(&str, u32, &str)]) {
        let desc = message(name);
        for (field, number, kind) in fields {
            let f = desc
                .get_field_by_name(field)
                .unwrap_or_else(|| panic!("{name}.{field} exists"));
            assert_eq!(f.number(), *number, "{name}.{field} number");
            let actual = match f.kind() {
                Kind::String => "string".to_string(),
                Kind::Int32 => "int32".to_string(),
                Kind::Uint32 => "uint32".to_string(),
                Kind::Message(m) => m.full_name().to_string(),
                other => format!("{other:?}"),
            };
            assert_eq!(&actual, kind, "{name}.{field} type");
        }
    }

    #[test]
    fn stream_messages_match_envoys_descriptors() {
        check(
            "envoy.config.core.v3.Node",
            &[
                ("id", 1, "string"),
                ("cluster", 2, "string"),
                ("metadata", 3, "google.protobuf.Struct"),
                ("user_agent_name", 6, "string"),
                ("user_agent_version", 7, "string"),
                (
                    "user_agent_build_version",
                    8,
                    "envoy.config.core.v3.BuildVersion",
                ),
            ],
        );
        check(
            "envoy.config.core.v3.BuildVersion",
            &[("version", 1, "envoy.type.v3.SemanticVersion")],
        );
        check(
            "envoy.type.v3.SemanticVersion",
            &[
                ("major_number", 1, "uint32"),
                ("minor_number", 2, "uint32"),
                ("patch", 3, "uint32"),
            ],
        );
        check(
            "google.rpc.Status",
            &[("code", 1, "int32"), ("message", 2, "string")],
        );
        check(
            "envoy.service.discovery.v3.DeltaDiscoveryRequest",
            &[
                ("node", 1, "envoy.config.core.v3.Node"),
                ("type_url", 2, "string"),
                ("resource_names_subscribe", 3, "string"),
                ("resource_names_unsubscribe", 4, "string"),
                (
                    "initial_resource_versions",
                    5,
                    "envoy.service.discovery.v3.DeltaDiscoveryRequest.InitialResourceVersionsEntry",
                ),
                ("response_nonce", 6, "string"),
                ("error_detail", 7, "google.rpc.Status"),
            ],
        );
        check(
            "envoy.service.discovery.v3.Resource",
            &[
                ("version", 1, "string"),
                ("resource", 2, "google.protobuf.Any"),
                ("name", 3, "string"),
            ],
        );
        check(
            "envoy.service.discovery.v3.DeltaDiscoveryResponse",
            &[
                ("system_version_info", 1, "string"),
                ("resources", 2, "envoy.service.discovery.v3.Resource"),
                ("type_url", 4, "string"),
                ("nonce", 5, "string"),
                ("removed_resources", 6, "string"),
            ],
        );
        let repeated = |m: &str, f: &str| message(m).get_field_by_name(f).unwrap().is_list();
        assert!(repeated(
            "envoy.service.discovery.v3.DeltaDiscoveryRequest",
            "resource_names_subscribe"
        ));
        assert!(repeated(
            "envoy.service.discovery.v3.DeltaDiscoveryResponse",
            "removed_resources"
        ));
    }

    #[test]
    fn the_resource_types_are_known() {
        for t in TYPES {
            message(message_name(t));
        }
    }

    #[test]
    fn json_encodes_and_decodes_with_nested_any() {
        let json = serde_json::json!({
            "@type": CLUSTER,
            "name": "c",
            "connect_timeout": "1s",
            "cluster_type": {
                "name": "envoy.clusters.aggregate",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                    "clusters": ["a", "b"],
                },
            },
        });
        let bytes = encode(CLUSTER, &json).unwrap();
        let back = decode(CLUSTER, &bytes).unwrap();
        assert_eq!(back["name"], "c");
        assert_eq!(back["connect_timeout"], "1s");
        assert_eq!(
            back["cluster_type"]["typed_config"]["clusters"],
            serde_json::json!(["a", "b"])
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = encode(
            CLUSTER,
            &serde_json::json!({ "name": "c", "no_such_field": 1 }),
        )
        .unwrap_err();
        assert!(err.contains("no_such_field"), "{err}");
        let err = encode(
            LISTENER,
            &serde_json::json!({ "name": "l", "filter_chains": [{ "filters": [{ "name": "x",
                "typed_config": { "@type": "type.googleapis.com/no.Such" } }] }] }),
        )
        .unwrap_err();
        assert!(err.contains("no.Such"), "{err}");
    }
}
