//! The receiving end of Envoy's gRPC access log (`envoy.service.accesslog.v3.AccessLogService`,
//! `StreamAccessLogs`, client streaming), served by the gateway Pod's sidecar on 127.0.0.1.
//!
//! The messages below declare only the fields the sidecar reads, with the field numbers of Envoy's
//! API (`envoy/service/accesslog/v3/als.proto`, `envoy/data/accesslog/v3/accesslog.proto`,
//! `envoy/config/core/v3/base.proto`, as in the descriptor set `src/xds/envoy-api.bin`); protobuf
//! skips the others.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures::StreamExt;
use tonic::codegen::{BoxFuture, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::{Answer, Usage, UsageCounters};

/// `envoy.service.accesslog.v3.StreamAccessLogsMessage`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAccessLogsMessage {
    #[prost(message, optional, tag = "2")]
    pub http_logs: Option<HttpAccessLogEntries>,
}

/// `StreamAccessLogsMessage.HTTPAccessLogEntries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpAccessLogEntries {
    #[prost(message, repeated, tag = "1")]
    pub log_entry: Vec<HttpAccessLogEntry>,
}

/// `envoy.data.accesslog.v3.HTTPAccessLogEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpAccessLogEntry {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<AccessLogCommon>,
    #[prost(message, optional, tag = "3")]
    pub request: Option<HttpRequestProperties>,
    #[prost(message, optional, tag = "4")]
    pub response: Option<HttpResponseProperties>,
}

/// `envoy.data.accesslog.v3.AccessLogCommon`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccessLogCommon {
    /// `envoy.config.core.v3.Metadata`: the request's dynamic metadata.
    #[prost(message, optional, tag = "17")]
    pub metadata: Option<Metadata>,
    #[prost(string, tag = "19")]
    pub route_name: String,
    /// The log's custom tags (the route's prices, [`PRICES_TAG`]).
    #[prost(map = "string, string", tag = "22")]
    pub custom_tags: HashMap<String, String>,
    /// An entry logged while the request still runs (periodic logging); not an answer.
    #[prost(bool, tag = "27")]
    pub intermediate_log_entry: bool,
}

/// `envoy.config.core.v3.Metadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    pub filter_metadata: HashMap<String, prost_types::Struct>,
}

/// `envoy.data.accesslog.v3.HTTPRequestProperties`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequestProperties {
    #[prost(map = "string, string", tag = "13")]
    pub request_headers: HashMap<String, String>,
}

/// `envoy.data.accesslog.v3.HTTPResponseProperties`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpResponseProperties {
    #[prost(message, optional, tag = "1")]
    pub response_code: Option<u32>,
    #[prost(map = "string, string", tag = "4")]
    pub response_headers: HashMap<String, String>,
}

/// `envoy.service.accesslog.v3.StreamAccessLogsResponse` (empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAccessLogsResponse {}

/// Dynamic-metadata namespace the front listener's usage extractors write (`gateway::envoy`).
pub const METADATA_NAMESPACE: &str = crate::gateway::envoy::USAGE_METADATA;
/// Request header the front Lua sets to the model the client asked for.
pub const MODEL_HEADER: &str = "x-llmroute-model";
/// Response headers naming the backend that answered and the failure class of a failed answer.
pub const BACKEND_HEADER: &str = "x-llmroute-backend";
pub const FAILURE_HEADER: &str = "x-llmroute-failure";
/// Custom tag of the usage log with the route's prices (see [`super::prices_tag`]).
pub const PRICES_TAG: &str = "prices";

/// One access-log entry as an [`Answer`]; None for an entry that is not an answer (intermediate).
pub fn answer(entry: &HttpAccessLogEntry) -> Option<Answer> {
    let common = entry.common_properties.as_ref()?;
    if common.intermediate_log_entry {
        return None;
    }
    let usage = common
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(METADATA_NAMESPACE));
    let number = |key: &str| -> Option<u64> {
        match usage?.fields.get(key)?.kind.as_ref()? {
            prost_types::value::Kind::NumberValue(n) if *n >= 0.0 && n.is_finite() => {
                Some(*n as u64)
            }
            prost_types::value::Kind::StringValue(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    let text = |key: &str| -> String {
        match usage
            .and_then(|u| u.fields.get(key))
            .and_then(|v| v.kind.as_ref())
        {
            Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
            _ => String::new(),
        }
    };
    let request_header = |name: &str| {
        entry
            .request
            .as_ref()
            .and_then(|r| r.request_headers.get(name).cloned())
            .unwrap_or_default()
    };
    let response = entry.response.as_ref();
    let response_header = |name: &str| {
        response
            .and_then(|r| r.response_headers.get(name).cloned())
            .unwrap_or_default()
    };
    let backend = response_header(BACKEND_HEADER);
    let price = common
        .custom_tags
        .get(PRICES_TAG)
        .and_then(|tag| super::price_in_tag(tag, &backend));
    Some(Answer {
        route: common.route_name.clone(),
        price,
        backend,
        model: request_header(MODEL_HEADER),
        provider_model: text("provider_model"),
        status: response.and_then(|r| r.response_code).unwrap_or(0),
        failure: response_header(FAILURE_HEADER),
        usage: Usage {
            prompt: number("prompt_tokens"),
            completion: number("completion_tokens"),
            cached: number("cached_tokens"),
            total: number("total_tokens"),
        },
    })
}

/// The `AccessLogService` gRPC service, counting into `counters`.
#[derive(Clone)]
pub struct AccessLogService {
    counters: Arc<UsageCounters>,
}

impl AccessLogService {
    pub fn new(counters: Arc<UsageCounters>) -> Self {
        AccessLogService { counters }
    }
}

const STREAM_PATH: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

impl NamedService for AccessLogService {
    const NAME: &'static str = "envoy.service.accesslog.v3.AccessLogService";
}

struct StreamMethod(Arc<UsageCounters>);

impl tonic::server::ClientStreamingService<StreamAccessLogsMessage> for StreamMethod {
    type Response = StreamAccessLogsResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;

    fn call(&mut self, request: Request<Streaming<StreamAccessLogsMessage>>) -> Self::Future {
        let counters = self.0.clone();
        Box::pin(async move {
            let mut stream = request.into_inner();
            // Envoy keeps one stream open per logger and sends batches on it; it ends with Envoy.
            while let Some(message) = stream.next().await {
                let message = message?;
                for entry in message.http_logs.iter().flat_map(|l| &l.log_entry) {
                    if let Some(answer) = answer(entry) {
                        counters.record(&answer);
                    }
                }
            }
            Ok(Response::new(StreamAccessLogsResponse {}))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for AccessLogService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let counters = self.counters.clone();
        Box::pin(async move {
            if req.uri().path() == STREAM_PATH {
                let codec = tonic_prost::ProstCodec::<
                    StreamAccessLogsResponse,
                    StreamAccessLogsMessage,
                >::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.client_streaming(StreamMethod(counters), req).await)
            } else {
                Ok(
                    Status::unimplemented(format!("{} is not served", req.uri().path()))
                        .into_http(),
                )
            }
        })
    }
}

/// Serves the access-log service on `listener` (plain HTTP/2: Envoy dials it on 127.0.0.1) until
/// `stop` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    counters: Arc<UsageCounters>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AccessLogService::new(counters))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn number(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(n)),
        }
    }

    #[test]
    fn an_entry_encoded_as_envoy_does_is_read_back() {
        let usage = prost_types::Struct {
            fields: [
                ("prompt_tokens".to_string(), number(12.0)),
                ("completion_tokens".to_string(), number(5.0)),
                (
                    "provider_model".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("glm-4-plus".into())),
                    },
                ),
            ]
            .into(),
        };
        let message = StreamAccessLogsMessage {
            http_logs: Some(HttpAccessLogEntries {
                log_entry: vec![HttpAccessLogEntry {
                    common_properties: Some(AccessLogCommon {
                        metadata: Some(Metadata {
                            filter_metadata: [(METADATA_NAMESPACE.to_string(), usage)].into(),
                        }),
                        route_name: "chat".into(),
                        custom_tags: [(PRICES_TAG.to_string(), "zhipu=1/2".to_string())].into(),
                        intermediate_log_entry: false,
                    }),
                    request: Some(HttpRequestProperties {
                        request_headers: [(MODEL_HEADER.to_string(), "smart".to_string())].into(),
                    }),
                    response: Some(HttpResponseProperties {
                        response_code: Some(200),
                        response_headers: [(BACKEND_HEADER.to_string(), "zhipu".to_string())]
                            .into(),
                    }),
                }],
            }),
        };
        let bytes = message.encode_to_vec();
        let back = StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap();
        let a = answer(&back.http_logs.unwrap().log_entry[0]).unwrap();
        assert_eq!(a.route, "chat");
        assert_eq!(a.backend, "zhipu");
        assert_eq!(a.model, "smart");
        assert_eq!(a.provider_model, "glm-4-plus");
        assert_eq!(a.status, 200);
        assert_eq!(a.usage.prompt, Some(12));
        assert_eq!(a.usage.completion, Some(5));
        assert_eq!(a.usage.cached, None);
        assert_eq!(
            a.price,
            Some(super::super::Price {
                input: 1.0,
                output: 2.0
            })
        );
    }

    /// The field numbers above against Envoy's own descriptors: a message written as Envoy's JSON
    /// and encoded by the API's descriptor set is read back by the structs here.
    #[test]
    fn field_numbers_are_envoy_s() {
        let json = serde_json::json!({
            "http_logs": { "log_entry": [{
                "common_properties": {
                    "route_name": "chat",
                    "custom_tags": { "prices": "zhipu=1/2,deepseek=0.27/1.1" },
                    "metadata": { "filter_metadata": { "llmroute": {
                        "prompt_tokens": 7, "completion_tokens": 2, "cached_tokens": 1,
                        "total_tokens": 9, "provider_model": "deepseek-chat"
                    } } },
                    "upstream_cluster": "front",
                },
                "request": { "request_headers": { "x-llmroute-model": "chat" }, "path": "/chat/v1/chat/completions" },
                "response": {
                    "response_code": 429,
                    "response_headers": { "x-llmroute-backend": "deepseek", "x-llmroute-failure": "RateLimited" },
                },
            }, {
                "common_properties": { "route_name": "chat", "intermediate_log_entry": true },
            }] },
        });
        let bytes = crate::xds::api::encode_str(
            "type.googleapis.com/envoy.service.accesslog.v3.StreamAccessLogsMessage",
            &json.to_string(),
        )
        .unwrap();
        let message = StreamAccessLogsMessage::decode(bytes.as_slice()).unwrap();
        let entries = message.http_logs.unwrap().log_entry;
        assert_eq!(
            answer(&entries[1]),
            None,
            "an intermediate entry is no answer"
        );
        let a = answer(&entries[0]).unwrap();
        assert_eq!(
            a,
            Answer {
                route: "chat".into(),
                backend: "deepseek".into(),
                model: "chat".into(),
                provider_model: "deepseek-chat".into(),
                status: 429,
                failure: "RateLimited".into(),
                usage: Usage {
                    prompt: Some(7),
                    completion: Some(2),
                    cached: Some(1),
                    total: Some(9),
                },
                price: Some(crate::usage::Price {
                    input: 0.27,
                    output: 1.1,
                }),
            }
        );
    }
}
