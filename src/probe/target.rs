//! What to probe: one [`ProbeTarget`] per distinct (provider account, probe) among a namespace's
//! routes, derived from the routes and the resolved keys. Pure: the caller supplies the keys.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::duration_ms;
use crate::api::{LLMRoute, ProbeKind, SecretKeyRef};
use crate::catalog::{self, PathStyle};
use crate::gateway::ir::backend_base_url;
use crate::policy::{probe_key, probe_model};

/// One probe to run periodically. `headers` carries the provider key: never log a target.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// [`crate::policy::probe_key`]: how the policy finds this target's results.
    pub key: String,
    pub provider: String,
    pub url: String,
    /// `Some(body)`: POST a chat completion; `None`: GET the models list.
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
    pub interval: Duration,
    pub timeout: Duration,
    /// The key value, to redact it from anything the provider echoes back.
    pub secret: Option<String>,
    /// The largest `unhealthyThreshold` and `healthyThreshold` of the routes sharing the target:
    /// streaks longer than these change no decision.
    pub unhealthy_max: u32,
    pub healthy_max: u32,
}

impl std::fmt::Debug for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTarget")
            .field("key", &self.key)
            .field("url", &self.url)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The targets of `routes` (valid routes of one namespace). `key_of` resolves a Secret key
/// reference to its value; backends whose key cannot be resolved, or that the route excludes by
/// design, are the caller's to leave out through `skip`.
pub fn targets(
    routes: &[LLMRoute],
    key_of: impl Fn(&SecretKeyRef) -> Option<String>,
    skip: impl Fn(&LLMRoute, usize) -> bool,
) -> Vec<ProbeTarget> {
    let mut by_key: BTreeMap<String, ProbeTarget> = BTreeMap::new();
    for route in routes {
        let hc = &route.spec.policy.health_check;
        if !hc.enabled {
            continue;
        }
        let interval = Duration::from_millis(duration_ms(&hc.interval).unwrap_or(30_000));
        let timeout = Duration::from_millis(duration_ms(&hc.timeout).unwrap_or(10_000));
        for (i, backend) in route.spec.backends.iter().enumerate() {
            if skip(route, i) {
                continue;
            }
            let Some(provider) = catalog::provider(&backend.provider) else {
                continue;
            };
            let Ok(base) = backend_base_url(backend, provider) else {
                continue;
            };
            let secret = match &backend.credentials_secret_ref {
                Some(r) => match key_of(r) {
                    Some(k) => Some(k),
                    None => continue,
                },
                None => None,
            };
            let key = probe_key(route, backend);
            if let Some(existing) = by_key.get_mut(&key) {
                existing.interval = existing.interval.min(interval);
                existing.timeout = existing.timeout.min(timeout);
                existing.unhealthy_max = existing.unhealthy_max.max(hc.unhealthy_threshold);
                existing.healthy_max = existing.healthy_max.max(hc.healthy_threshold);
                continue;
            }
            let model = probe_model(route, backend);
            let api_version = backend
                .azure
                .as_ref()
                .map(|a| a.api_version.clone())
                .unwrap_or_else(|| crate::api::DEFAULT_AZURE_API_VERSION.to_string());
            let path = match hc.probe {
                ProbeKind::ChatCompletion => provider.chat_path.clone(),
                ProbeKind::ModelsList => provider.models_path.clone(),
            }
            .replace("{deployment}", &model)
            .replace("{apiVersion}", &api_version);
            let body = match hc.probe {
                ProbeKind::ChatCompletion => {
                    let mut body = serde_json::json!({
                        "messages": [{ "role": "user", "content": "ping" }],
                        "max_tokens": 1,
                    });
                    if provider.path_style != PathStyle::AzureDeployment {
                        body["model"] = serde_json::json!(model);
                    }
                    Some(body.to_string())
                }
                ProbeKind::ModelsList => None,
            };
            let mut headers: Vec<(String, String)> = provider
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Some(k) = &secret {
                headers.push((
                    provider.auth.header.to_ascii_lowercase(),
                    format!("{}{k}", provider.auth.prefix),
                ));
            }
            by_key.insert(
                key.clone(),
                ProbeTarget {
                    key,
                    provider: provider.id.clone(),
                    url: format!("{}{path}", base.to_url()),
                    body,
                    headers,
                    interval,
                    timeout,
                    secret,
                    unhealthy_max: hc.unhealthy_threshold,
                    healthy_max: hc.healthy_threshold,
                },
            );
        }
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, yaml_backends: &str, probe: &str) -> LLMRoute {
        serde_yaml_ng::from_str(&format!(
            "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec:\n  defaultModel: chat\n  policy:\n    healthCheck: {{probe: {probe}, interval: 5s}}\n  backends:\n{yaml_backends}"
        ))
        .unwrap()
    }

    const BACKENDS: &str = "  - name: openai\n    provider: openai\n    credentialsSecretRef: {name: keys, key: openai}\n    models: {chat: gpt-4o-mini, big: gpt-4o}\n  - name: azure\n    provider: azure-openai\n    endpoint: https://res.openai.azure.com\n    credentialsSecretRef: {name: keys, key: azure}\n    models: {chat: my-deployment}\n";

    #[test]
    fn chat_probes_use_each_providers_path_auth_and_model() {
        let r = route("a", BACKENDS, "ChatCompletion");
        let t = targets(
            std::slice::from_ref(&r),
            |k| Some(format!("key-{}", k.key)),
            |_, _| false,
        );
        assert_eq!(t.len(), 2);
        let azure = t.iter().find(|t| t.provider == "azure-openai").unwrap();
        assert_eq!(
            azure.url,
            "https://res.openai.azure.com/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
        );
        assert!(
            azure
                .headers
                .contains(&("api-key".into(), "key-azure".into()))
        );
        assert!(!azure.body.as_deref().unwrap().contains("model"));
        let openai = t.iter().find(|t| t.provider == "openai").unwrap();
        assert_eq!(openai.url, "https://api.openai.com/v1/chat/completions");
        assert!(
            openai
                .headers
                .contains(&("authorization".into(), "Bearer key-openai".into()))
        );
        let body: serde_json::Value =
            serde_json::from_str(openai.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["max_tokens"], 1);
        assert!(!format!("{openai:?}").contains("key-openai"));
    }

    #[test]
    fn routes_sharing_an_account_share_its_probe_and_unresolved_keys_are_skipped() {
        let a = route("a", BACKENDS, "ModelsList");
        let b = route("b", BACKENDS, "ModelsList");
        let t = targets(
            &[a, b],
            |k| (k.key == "openai").then(|| "k".to_string()),
            |_, _| false,
        );
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].url, "https://api.openai.com/v1/models");
        assert!(t[0].body.is_none());
    }
}
