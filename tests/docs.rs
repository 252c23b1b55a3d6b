//! The documentation is checked against the code it describes: `docs/api.md` is generated from the
//! CRD's schema (`UPDATE_GOLDEN=1 cargo test --test docs` regenerates it), every condition and event
//! reason the operator can write is explained in `docs/troubleshooting.md`, `docs/policy.md` covers
//! every failure class and policy field, and relative links in the Markdown files resolve.

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use support::envoy::repo_root;

// ---------------------------------------------------------------------------------------------
// docs/api.md

fn crd_schema() -> (Value, Value) {
    let text =
        std::fs::read_to_string(repo_root().join("crds/llmroute.io_llmroutes.yaml")).unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    let version = crd["spec"]["versions"][0].clone();
    (crd, version)
}

/// Text on one line: whitespace runs folded.
fn fold(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One Markdown table cell: folded, pipes escaped.
fn cell(text: &str) -> String {
    fold(text).replace('|', "\\|")
}

/// A number as the schema means it (`0.0` in YAML is the integer bound 0).
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

fn anchor(path: &str) -> String {
    path.replace("[]", "").replace('.', "-").to_lowercase()
}

fn is_object(schema: &Value) -> bool {
    schema["type"] == "object" && schema.get("properties").is_some()
}

/// The type column: scalars by name, objects and lists of objects linked to their section.
fn type_of(schema: &Value, path: &str) -> String {
    match schema["type"].as_str().unwrap_or("any") {
        "array" => {
            let item_path = format!("{path}[]");
            format!("[]{}", type_of(&schema["items"], &item_path))
        }
        "object" if is_object(schema) => format!("[object](#{})", anchor(path)),
        "object" => match schema.get("additionalProperties") {
            Some(v) if v.is_object() => {
                format!("map[string]{}", v["type"].as_str().unwrap_or("any"))
            }
            _ => "object".into(),
        },
        "integer" => match schema["format"].as_str() {
            Some(f) => format!("integer ({f})"),
            None => "integer".into(),
        },
        "string" => match schema["format"].as_str() {
            Some(f) => format!("string ({f})"),
            None => "string".into(),
        },
        other => other.to_string(),
    }
}

/// The validation column: everything the API server checks about the field itself.
fn constraints(schema: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    let code = |v: &Value| format!("`{}`", serde_json::to_string(v).unwrap());
    if let Some(d) = schema.get("default") {
        parts.push(format!("default {}", code(d)));
    }
    if let Some(e) = schema["enum"].as_array().filter(|e| e.len() > 40) {
        // A long list (the IANA time zone names): its size and where it starts and ends.
        let name = |v: &Value| format!("`{}`", v.as_str().unwrap_or_default());
        parts.push(format!(
            "one of {} names ({} ... {})",
            e.len(),
            name(&e[0]),
            name(&e[e.len() - 1])
        ));
    } else if let Some(e) = schema["enum"].as_array() {
        parts.push(format!(
            "one of {}",
            e.iter()
                .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (key, label) in [
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minimum", "minimum"),
        ("maximum", "maximum"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min entries"),
        ("maxProperties", "max entries"),
    ] {
        if let Some(v) = schema.get(key) {
            parts.push(format!("{label} {}", number(v)));
        }
    }
    if let Some(p) = schema["pattern"].as_str() {
        parts.push(format!("pattern `{p}`"));
    }
    if let Some(t) = schema["x-kubernetes-list-type"].as_str() {
        match schema["x-kubernetes-list-map-keys"].as_array() {
            Some(keys) => parts.push(format!(
                "list keyed by {}",
                keys.iter()
                    .map(|k| format!("`{}`", k.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => parts.push(format!("list type `{t}`")),
        }
    }
    if let Some(items) = schema.get("items")
        && !is_object(items)
    {
        let each = constraints(items);
        if !each.is_empty() {
            parts.push(format!("each item: {each}"));
        }
    }
    parts.join("; ")
}

/// The CEL rules of a schema: (message, rule).
fn rules_of(schema: &Value) -> Vec<(String, String)> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        fold(r["message"].as_str().unwrap_or("(no message)")),
                        fold(r["rule"].as_str().unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every field path of the schema below `path` (`spec.backends[].name`), with its description.
fn field_paths(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    if let Some(props) = schema["properties"].as_object() {
        for (name, field) in props {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push((
                p.clone(),
                field["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
            field_paths(field, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        field_paths(items, &format!("{path}[]"), out);
    }
}

/// The sections of objects below `schema` at `path`, depth first.
fn object_sections(schema: &Value, path: &str, out: &mut String) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    writeln!(out, "<a id=\"{}\"></a>\n", anchor(path)).unwrap();
    writeln!(out, "### `{path}`\n").unwrap();
    if let Some(d) = schema["description"].as_str() {
        writeln!(out, "{}\n", cell(d)).unwrap();
    }
    let rules = rules_of(schema);
    if !rules.is_empty() {
        writeln!(out, "Rules (CEL, checked by the API server):\n").unwrap();
        for (message, rule) in rules {
            writeln!(out, "- {message} — `{rule}`").unwrap();
        }
        writeln!(out).unwrap();
    }
    writeln!(
        out,
        "| field | type | required | description | validation |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|").unwrap();
    let mut nested = Vec::new();
    for (name, field) in props {
        let p = format!("{path}.{name}");
        let mut validation = constraints(field);
        let field_rules = rules_of(field);
        if !is_object(field) && !field_rules.is_empty() {
            let rules: Vec<String> = field_rules
                .iter()
                .map(|(message, rule)| format!("{message} (`{rule}`)"))
                .collect();
            if !validation.is_empty() {
                validation.push_str("; ");
            }
            write!(validation, "rules: {}", rules.join("; ")).unwrap();
        }
        writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            name,
            type_of(field, &p),
            if required.contains(name.as_str()) {
                "yes"
            } else {
                ""
            },
            cell(field["description"].as_str().unwrap_or_default()),
            cell(&validation),
        )
        .unwrap();
        let mut f = field;
        let mut fp = p.clone();
        while f["type"] == "array" {
            f = &f["items"];
            fp.push_str("[]");
        }
        if is_object(f) {
            nested.push((f, fp));
        }
    }
    writeln!(out).unwrap();
    for (f, p) in nested {
        object_sections(f, &p, out);
    }
}

fn generate_api_md() -> String {
    let (crd, version) = crd_schema();
    let schema = &version["schema"]["openAPIV3Schema"];
    let names = &crd["spec"]["names"];
    let mut out = String::new();
    writeln!(
        out,
        "# API reference: `{}/{}` `{}`\n",
        crd["spec"]["group"].as_str().unwrap(),
        version["name"].as_str().unwrap(),
        names["kind"].as_str().unwrap()
    )
    .unwrap();
    writeln!(
        out,
        "<!-- Generated from crds/llmroute.io_llmroutes.yaml by tests/docs.rs: do not edit by hand; \
         `UPDATE_GOLDEN=1 cargo test --test docs` regenerates it. -->\n"
    )
    .unwrap();
    if let Some(d) = schema["description"].as_str() {
        writeln!(out, "{}\n", cell(d)).unwrap();
    }
    writeln!(
        out,
        "Namespaced; plural `{}`, short name {}, category {}. The same text is served by `kubectl explain llmroute.spec` (and below).\n",
        names["plural"].as_str().unwrap(),
        names["shortNames"].as_array().map(|s| s.iter().map(|n| format!("`{}`", n.as_str().unwrap())).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        names["categories"].as_array().map(|s| s.iter().map(|n| format!("`{}`", n.as_str().unwrap())).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
    )
    .unwrap();
    writeln!(
        out,
        "`kubectl get llmroutes` columns (`-o wide` adds those of priority 1):\n"
    )
    .unwrap();
    writeln!(out, "| column | JSONPath | priority |").unwrap();
    writeln!(out, "|---|---|---|").unwrap();
    for c in version["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
    {
        writeln!(
            out,
            "| {} | `{}` | {} |",
            c["name"].as_str().unwrap(),
            cell(c["jsonPath"].as_str().unwrap()),
            c["priority"].as_i64().unwrap_or(0)
        )
        .unwrap();
    }
    writeln!(out).unwrap();
    writeln!(out, "## Spec\n").unwrap();
    object_sections(&schema["properties"]["spec"], "spec", &mut out);
    writeln!(out, "## Status\n").unwrap();
    writeln!(
        out,
        "Written by the operator only (the status subresource). What each condition reason means and \
         what to do about it: [troubleshooting.md](troubleshooting.md).\n"
    )
    .unwrap();
    object_sections(&schema["properties"]["status"], "status", &mut out);
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

#[test]
fn api_md_documents_every_field_of_the_crd() {
    let generated = generate_api_md();
    let path = repo_root().join("docs/api.md");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    // Every field path, with its description, whatever else differs.
    let (_, version) = crd_schema();
    let mut paths = Vec::new();
    field_paths(&version["schema"]["openAPIV3Schema"], "", &mut paths);
    assert!(paths.len() > 60, "{} field paths", paths.len());
    let mut missing = Vec::new();
    for (p, description) in &paths {
        let (parent, name) = match p.rfind('.') {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => ("", p.as_str()),
        };
        let heading = format!("`{parent}`\n");
        let row_start = format!("| `{name}` |");
        let in_section = current
            .split("### ")
            .find(|s| s.starts_with(&heading))
            .is_some_and(|s| {
                s.lines()
                    .any(|l| l.starts_with(&row_start) && l.contains(&cell(description)))
            });
        if !in_section && !parent.is_empty() {
            missing.push(p.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/api.md lacks (with their description): {missing:?}"
    );
    assert!(
        current == generated,
        "docs/api.md is not what the CRD generates: run `UPDATE_GOLDEN=1 cargo test --test docs` and commit it"
    );
}

// ---------------------------------------------------------------------------------------------
// docs/troubleshooting.md

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every condition, event and exclusion reason in src/: `reason: "X"`, `Problem::new("X", ..)`,
/// events `(EventType::.., "X")`, `let reason = ..."X"...;` and the condition types of
/// src/status.rs (which are also the reasons of their True conditions).
fn reasons_in_src() -> BTreeSet<String> {
    let patterns = [
        Regex::new(r#"reason:\s*"([A-Z][A-Za-z]+)""#).unwrap(),
        Regex::new(r#"Problem::new\(\s*"([A-Z][A-Za-z]+)""#).unwrap(),
        Regex::new(r#"EventType::\w+,\s*"([A-Z][A-Za-z]+)""#).unwrap(),
    ];
    let let_reason = Regex::new(r#"let reason = [^;]*;"#).unwrap();
    let quoted = Regex::new(r#""([A-Z][A-Za-z]+)""#).unwrap();
    let condition_type = Regex::new(r#"pub const [A-Z_]+: &str = "([A-Z][A-Za-z]+)";"#).unwrap();
    let mut files = Vec::new();
    rust_files(&repo_root().join("src"), &mut files);
    let mut reasons = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for p in &patterns {
            reasons.extend(p.captures_iter(&text).map(|c| c[1].to_string()));
        }
        for m in let_reason.find_iter(&text) {
            reasons.extend(quoted.captures_iter(m.as_str()).map(|c| c[1].to_string()));
        }
        if f.ends_with("status.rs") {
            reasons.extend(
                condition_type
                    .captures_iter(&text)
                    .map(|c| c[1].to_string()),
            );
        }
    }
    reasons
}

#[test]
fn troubleshooting_explains_every_reason_the_operator_writes() {
    let reasons = reasons_in_src();
    for known in [
        "InvalidSpec",
        "SecretNotFound",
        "NoEligibleBackend",
        "GatewayPending",
        "Published",
    ] {
        assert!(
            reasons.contains(known),
            "the scan of src/ lost {known}: {reasons:?}"
        );
    }
    let doc = std::fs::read_to_string(repo_root().join("docs/troubleshooting.md")).unwrap();
    let mut missing: Vec<String> = reasons
        .iter()
        .filter(|r| !doc.contains(&format!("`{r}`")))
        .cloned()
        .collect();
    // Failure classes are backend states and reasons (status.backends, metrics) too.
    for class in llmroute::api::FailureClass::ALL {
        if !doc.contains(&format!("`{}`", class.as_str())) {
            missing.push(class.as_str().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// docs/policy.md

#[test]
fn policy_doc_covers_every_failure_class_and_policy_field() {
    let doc = std::fs::read_to_string(repo_root().join("docs/policy.md")).unwrap();
    let mut missing = Vec::new();
    for class in llmroute::api::FailureClass::ALL {
        if !doc.contains(&format!("`{}`", class.as_str())) {
            missing.push(class.as_str().to_string());
        }
    }
    // The gateway's own class for a model a backend does not map (src/gateway/lua/backend.lua).
    let backend_lua =
        std::fs::read_to_string(repo_root().join("src/gateway/lua/backend.lua")).unwrap();
    if backend_lua.contains("ModelNotMapped") && !doc.contains("`ModelNotMapped`") {
        missing.push("ModelNotMapped".into());
    }
    let (_, version) = crd_schema();
    let mut paths = Vec::new();
    field_paths(
        &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["policy"],
        "",
        &mut paths,
    );
    for (p, _) in paths {
        let leaf = p
            .rsplit('.')
            .next()
            .unwrap()
            .trim_end_matches("[]")
            .to_string();
        // As `leaf` or as a dotted path ending in it (`healthCheck.interval`).
        let mentioned = Regex::new(&format!(r"`([A-Za-z]+\.)*{leaf}`")).unwrap();
        if !mentioned.is_match(&doc) {
            missing.push(format!("spec.policy.{p}"));
        }
    }
    for field in ["region", "regions", "priority", "weight", "dataResidency"] {
        let mentioned = Regex::new(&format!(r"`([A-Za-z]+\.)*{field}`")).unwrap();
        if !mentioned.is_match(&doc) {
            missing.push(field.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/policy.md does not cover: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Links

#[test]
fn relative_links_in_the_docs_resolve() {
    let mut files = vec![
        repo_root().join("README.md"),
        repo_root().join("tests/README.md"),
        repo_root().join("deploy/argocd/README.md"),
    ];
    fn md_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                md_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    md_files(&repo_root().join("docs"), &mut files);
    let link = Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let code = Regex::new(r"(?s)```.*?```|`[^`\n]*`").unwrap();
    let mut broken = Vec::new();
    for f in files {
        // Code spans and blocks are not links (patterns such as `[a-z](...)` would look like one).
        let text = code
            .replace_all(&std::fs::read_to_string(&f).unwrap(), "")
            .into_owned();
        for c in link.captures_iter(&text) {
            let target = &c[1];
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap();
            if !f.parent().unwrap().join(file).exists() {
                broken.push(format!(
                    "{}: {target}",
                    f.strip_prefix(repo_root()).unwrap().display()
                ));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:?}");
}

/// The graceful-termination timings in docs/troubleshooting.md are the gateway Deployment's.
#[test]
fn troubleshooting_states_the_gateway_drain_timings() {
    use llmroute::gateway::objects::{
        MAX_DRAIN_SECONDS, MIN_DRAIN_SECONDS, TERMINATION_GRACE_SECONDS,
    };
    let doc = std::fs::read_to_string(repo_root().join("docs/troubleshooting.md")).unwrap();
    for needle in [
        format!("at least **{MIN_DRAIN_SECONDS} s**"),
        format!("at most **{MAX_DRAIN_SECONDS} s**"),
        format!("`--drain-time-s {MAX_DRAIN_SECONDS}`"),
        format!("`terminationGracePeriodSeconds` is **{TERMINATION_GRACE_SECONDS}**"),
    ] {
        assert!(
            doc.contains(&needle),
            "docs/troubleshooting.md lacks {needle:?}"
        );
    }
}
