//! Wiping JSON documents that carry secret values (item JSON, vault files, cache documents,
//! exec-provider replies) before they are dropped: every layer that parses one uses it.

use serde_json::Value as Json;
use zeroize::Zeroize;

/// Zeroizes every string in a JSON tree (item JSON carries every field's value).
pub fn scrub(value: &mut Json) {
    match value {
        Json::String(s) => s.zeroize(),
        Json::Array(items) => items.iter_mut().for_each(scrub),
        Json::Object(map) => map.values_mut().for_each(scrub),
        _ => {}
    }
}
