//! Admission rules (CEL `x-kubernetes-validations`) of the LLMRoute schema. Rules that depend on a
//! provider are generated from the catalog, so adding a provider never means editing a rule.
//!
//! Every message names the field it is about, because the API server prints the message as is.

use kube::core::{Rule, validate as add_rule};
use schemars::Schema;

use crate::catalog::{self, Credentials, PathStyle};

/// A CEL list literal of catalog ids, e.g. `['azure-openai', 'openai-compatible']`.
fn id_list<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = ids.map(|id| format!("'{id}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The rules on `spec`, as (rule, message, fieldPath).
pub fn spec_rules() -> Vec<(String, String, &'static str)> {
    vec![
        (
            "self.backends.all(b, self.backends.exists_one(c, c.name == b.name))".into(),
            "spec.backends[].name must be unique within the route".into(),
            ".backends",
        ),
        (
            "!has(self.workloadSecret) || !has(self.workloadSecret.mode) || \
             self.workloadSecret.mode != 'Direct' || has(self.defaultModel)"
                .into(),
            "spec.defaultModel is required when spec.workloadSecret.mode is Direct".into(),
            ".defaultModel",
        ),
        (
            "!has(self.defaultModel) || \
             self.backends.exists(b, self.defaultModel in b.models || '*' in b.models)"
                .into(),
            "spec.defaultModel must be a key of some spec.backends[].models (or a backend must map \"*\")"
                .into(),
            ".defaultModel",
        ),
        (
            "!has(self.policy) || !has(self.policy.strategy) || self.policy.strategy != 'LowestCost' || \
             self.backends.all(b, has(b.cost))"
                .into(),
            "spec.policy.strategy LowestCost needs spec.backends[].cost on every backend".into(),
            ".policy.strategy",
        ),
        (
            "!has(self.policy) || !has(self.policy.healthCheck) || !has(self.policy.healthCheck.model) || \
             self.backends.exists(b, self.policy.healthCheck.model in b.models || '*' in b.models)"
                .into(),
            "spec.policy.healthCheck.model must be a key of some spec.backends[].models".into(),
            ".policy.healthCheck.model",
        ),
        (
            "!has(self.policy) || !has(self.policy.budget) || !has(self.policy.budget.cost) || \
             self.backends.all(b, has(b.cost))"
                .into(),
            "spec.policy.budget.cost needs spec.backends[].cost on every backend (the prices usage is counted at)"
                .into(),
            ".policy.budget.cost",
        ),
        (
            "!has(self.operations) || self.operations.all(o, has(o.tokensPerRequest)) || \
             ((!has(self.policy) || !has(self.policy.budget)) && !self.backends.exists(b, has(b.budget)))"
                .into(),
            "spec.operations[].tokensPerRequest is required on every operation when the route has a budget \
             (spec.policy.budget or spec.backends[].budget): opted-in operations report no usage"
                .into(),
            ".operations",
        ),
    ]
}

/// The rules on each `spec.backends[]` entry, derived from the catalog.
fn backend_rules() -> Vec<(String, String, &'static str)> {
    let providers = catalog::providers();
    let mut rules = vec![(
        "!has(self.budget) || !has(self.budget.cost) || has(self.cost)".into(),
        "spec.backends[].budget.cost needs spec.backends[].cost (the price usage is counted at)"
            .into(),
        ".budget.cost",
    )];

    let without_base_url: Vec<&str> = providers
        .iter()
        .filter(|p| p.base_url.is_none())
        .map(|p| p.id.as_str())
        .collect();
    if !without_base_url.is_empty() {
        rules.push((
            format!("has(self.endpoint) || !(self.provider in {})", id_list(without_base_url.iter().copied())),
            format!(
                "spec.backends[].endpoint is required for providers without a catalog base URL ({})",
                without_base_url.join(", ")
            ),
            ".endpoint",
        ));
    }

    let key_optional: Vec<&str> = providers
        .iter()
        .filter(|p| p.credentials == Credentials::Optional)
        .map(|p| p.id.as_str())
        .collect();
    rules.push((
        format!(
            "has(self.credentialsSecretRef) || self.provider in {}",
            id_list(key_optional.iter().copied())
        ),
        format!(
            "spec.backends[].credentialsSecretRef is required (only {} backends may omit it)",
            key_optional.join(", ")
        ),
        ".credentialsSecretRef",
    ));

    let plain_http: Vec<&str> = providers
        .iter()
        .filter(|p| p.allow_http)
        .map(|p| p.id.as_str())
        .collect();
    rules.push((
        format!(
            "!has(self.endpoint) || self.endpoint.startsWith('https://') || \
             (self.provider in {} && self.endpoint.startsWith('http://'))",
            id_list(plain_http.iter().copied())
        ),
        format!(
            "spec.backends[].endpoint must start with https:// (http:// is accepted only for {})",
            plain_http.join(", ")
        ),
        ".endpoint",
    ));

    let deployment_style: Vec<&str> = providers
        .iter()
        .filter(|p| p.path_style == PathStyle::AzureDeployment)
        .map(|p| p.id.as_str())
        .collect();
    if !deployment_style.is_empty() {
        let ids = id_list(deployment_style.iter().copied());
        rules.push((
            format!("!(self.provider in {ids}) || !('*' in self.models)"),
            format!(
                "spec.backends[].models must map each model to a deployment name for {} (\"*\" is not allowed)",
                deployment_style.join(", ")
            ),
            ".models",
        ));
        rules.push((
            format!("!has(self.azure) || self.provider in {ids}"),
            format!(
                "spec.backends[].azure is only valid for {}",
                deployment_style.join(", ")
            ),
            ".azure",
        ));
    }
    rules
}

/// The rules on a budget (`spec.policy.budget`, `spec.backends[].budget`).
fn budget_rules() -> Vec<(String, String, &'static str)> {
    vec![(
        "has(self.tokens) || has(self.cost)".into(),
        "a budget needs tokens or cost (or both)".into(),
        ".tokens",
    )]
}

fn apply(schema: &mut Schema, rules: Vec<(String, String, &'static str)>) {
    for (rule, message, field_path) in rules {
        add_rule(
            schema,
            Rule::new(rule)
                .message(kube::core::Message::Message(message))
                .field_path(field_path),
        )
        .expect("a CEL rule serializes to JSON");
    }
}

/// schemars transform for `LLMRouteSpec`.
pub fn spec_rules_transform(schema: &mut Schema) {
    apply(schema, spec_rules());
}

/// schemars transform for `Backend`.
pub fn backend_rules_transform(schema: &mut Schema) {
    apply(schema, backend_rules());
}

/// schemars transform for `Budget`.
pub fn budget_rules_transform(schema: &mut Schema) {
    apply(schema, budget_rules());
}
