//! The secret values a gateway's configuration carries: provider keys and route keys.

use std::collections::BTreeMap;

/// Secret values the objects need: provider keys by gateway entry, and each route's key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyMaterial {
    /// Gateway keys Secret entry → key value.
    pub provider_keys: BTreeMap<String, Vec<u8>>,
    /// Route name → route key.
    pub route_keys: BTreeMap<String, String>,
}

/// A key without the whitespace around it (a trailing newline would corrupt the header it goes in).
pub fn trim(value: &[u8]) -> Vec<u8> {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    value[start..end].to_vec()
}
