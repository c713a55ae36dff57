//! Bindings and placeholders: which secrets may only travel to which hosts, and the
//! placeholder each bound secret is given out as (by GET, the exec provider and `--export`)
//! instead of its value.
//!
//! A placeholder is `[prefix]opb_` followed by 32 base62 characters (190 random bits): only
//! `[A-Za-z0-9_]` after the prefix, so it reads the same in a URL, a header, JSON and a form,
//! and the proxy needs no encoding variants to find it. It is made once per process; with
//! `--cache` it is kept in the sealed cache, so a restart hands out the same one.

use std::collections::BTreeMap;

use serde_json::json;

use super::hosts::{HostPattern, parse_host_list};
use crate::protocol::normalize_name;

/// The marker every placeholder carries after its optional prefix.
pub const MARKER: &str = "opb_";
/// Random characters after the marker (62^32 ≈ 2^190).
const RANDOM_CHARS: usize = 32;
const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The binding options, parsed but without placeholders yet (those need the cache).
#[derive(Debug, Clone, Default)]
pub struct BindingSpec {
    /// NAME → the hosts it may be sent to.
    pub hosts: BTreeMap<String, Vec<HostPattern>>,
    /// `--allow-raw NAME`: bound, but GET and `--export` give the value (audited).
    pub allow_raw: Vec<String>,
    /// `--placeholder-prefix NAME=PREFIX`.
    pub prefixes: BTreeMap<String, String>,
}

impl BindingSpec {
    /// Reads `{prefix}NAME_HOSTS` variables from `env`, then `--bind NAME=HOSTS` (which wins
    /// for the same name), `--allow-raw` and `--placeholder-prefix`.
    pub fn parse(
        env: impl IntoIterator<Item = (String, String)>,
        prefix: &str,
        binds: &[String],
        allow_raw: &[String],
        prefixes: &[String],
    ) -> Result<BindingSpec, String> {
        let mut spec = BindingSpec::default();
        let mut found: Vec<(String, String)> = env
            .into_iter()
            .filter(|(key, _)| key.len() > prefix.len() + "_HOSTS".len())
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(prefix)?.strip_suffix("_HOSTS")?;
                Some((name.to_string(), value))
            })
            .collect();
        found.sort();
        for (name, hosts) in found {
            let name = normalize_name(&name).map_err(|e| format!("{prefix}{name}_HOSTS: {e}"))?;
            let patterns = parse_host_list(&hosts).map_err(|e| format!("{prefix}{name}_HOSTS: {e}"))?;
            spec.hosts.insert(name, patterns);
        }
        for bind in binds {
            let (name, hosts) = bind.split_once('=').ok_or_else(|| format!("--bind {bind}: expected NAME=HOSTS"))?;
            let name = normalize_name(name.trim()).map_err(|e| format!("--bind {bind}: {e}"))?;
            let patterns = parse_host_list(hosts).map_err(|e| format!("--bind {bind}: {e}"))?;
            spec.hosts.insert(name, patterns);
        }
        for name in allow_raw {
            let name = normalize_name(name.trim()).map_err(|e| format!("--allow-raw {name}: {e}"))?;
            spec.allow_raw.push(name);
        }
        for entry in prefixes {
            let (name, text) =
                entry.split_once('=').ok_or_else(|| format!("--placeholder-prefix {entry}: expected NAME=PREFIX"))?;
            let name = normalize_name(name.trim()).map_err(|e| format!("--placeholder-prefix {entry}: {e}"))?;
            if text.len() > 64 || !text.bytes().all(|b| b.is_ascii_graphic() && !b"\"\\%+&=?#/:;,'".contains(&b)) {
                return Err(format!(
                    "--placeholder-prefix {entry}: a prefix is at most 64 printable characters, none of \" \\ % + & = ? # / : ; , '"
                ));
            }
            spec.prefixes.insert(name, text.to_string());
        }
        for name in spec.allow_raw.iter().chain(spec.prefixes.keys()) {
            if !spec.hosts.contains_key(name) {
                return Err(format!(
                    "{name} is named by --allow-raw or --placeholder-prefix but is not bound to any host"
                ));
            }
        }
        Ok(spec)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// One bound secret.
#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub placeholder: String,
    pub allow_raw: bool,
}

impl Binding {
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|h| h.matches(host, port))
    }
}

/// Every binding of the process, with its placeholder. Immutable once made.
#[derive(Debug, Default)]
pub struct Bindings {
    by_name: BTreeMap<String, Binding>,
}

impl Bindings {
    /// Gives every bound name a placeholder: the one `kept` (from the sealed cache) when it
    /// still has the configured prefix, else a new one.
    pub fn new(spec: &BindingSpec, kept: &BTreeMap<String, String>) -> Result<Bindings, String> {
        let by_name = spec
            .hosts
            .iter()
            .map(|(name, hosts)| {
                let prefix = spec.prefixes.get(name).map(String::as_str).unwrap_or("");
                let placeholder = match kept.get(name).filter(|p| is_placeholder_with_prefix(p, prefix)) {
                    Some(kept) => kept.clone(),
                    None => make_placeholder(prefix)?,
                };
                let binding = Binding {
                    name: name.clone(),
                    hosts: hosts.clone(),
                    placeholder,
                    allow_raw: spec.allow_raw.contains(name),
                };
                Ok((name.clone(), binding))
            })
            .collect::<Result<_, String>>()?;
        Ok(Bindings { by_name })
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Binding> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Binding> {
        self.by_name.values()
    }

    /// The placeholder to give out for `name` instead of its value (None: give the value).
    pub fn placeholder_for(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).filter(|b| !b.allow_raw).map(|b| b.placeholder.as_str())
    }

    /// Whether a read of `name` hands out the value of a bound secret (`--allow-raw`).
    pub fn is_raw(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|b| b.allow_raw)
    }

    /// Whether any binding names `host:port`.
    pub fn host_is_bound(&self, host: &str, port: u16) -> bool {
        self.by_name.values().any(|b| b.matches(host, port))
    }

    /// NAME → placeholder, for the sealed cache.
    pub fn placeholders(&self) -> BTreeMap<String, String> {
        self.by_name.iter().map(|(name, b)| (name.clone(), b.placeholder.clone())).collect()
    }

    /// STATUS: names, hosts and whether raw reads are allowed; never a value or placeholder.
    pub fn status(&self) -> serde_json::Value {
        self.by_name
            .values()
            .map(|b| {
                json!({
                    "name": b.name,
                    "hosts": b.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "allow_raw": b.allow_raw,
                })
            })
            .collect()
    }
}

/// A new placeholder: `prefix` + `opb_` + 32 random base62 characters.
pub fn make_placeholder(prefix: &str) -> Result<String, String> {
    let mut out = String::with_capacity(prefix.len() + MARKER.len() + RANDOM_CHARS);
    out.push_str(prefix);
    out.push_str(MARKER);
    let mut filled = 0;
    while filled < RANDOM_CHARS {
        let mut bytes = [0u8; 64];
        // Without the kernel's generator a guessable placeholder would be worse than none.
        getrandom::fill(&mut bytes).map_err(|e| format!("cannot make a placeholder: no random numbers ({e})"))?;
        // Rejection sampling (248 = 4 × 62) keeps every character equally likely.
        for b in bytes.into_iter().filter(|b| *b < 248) {
            if filled == RANDOM_CHARS {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b % 62)]));
            filled += 1;
        }
    }
    Ok(out)
}

fn is_placeholder_with_prefix(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(MARKER))
        .is_some_and(|random| random.len() == RANDOM_CHARS && random.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_printable_distinct_and_kept() {
        let a = make_placeholder("").unwrap();
        let b = make_placeholder("sk-").unwrap();
        assert!(a.starts_with("opb_") && a.len() == 36);
        assert!(b.starts_with("sk-opb_") && b.len() == 39);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
        assert_ne!(make_placeholder("").unwrap(), make_placeholder("").unwrap());
        let env = [("OP_API_HOSTS".to_string(), "api.example.com,*.example.org:8443".to_string())];
        let spec = BindingSpec::parse(env, "OP_", &[], &[], &["API=sk-".into()]).unwrap();
        let kept = BTreeMap::from([("API".to_string(), b.clone())]);
        assert_eq!(Bindings::new(&spec, &kept).unwrap().placeholder_for("API"), Some(b.as_str()));
        // A kept placeholder without the configured prefix is replaced.
        let kept = BTreeMap::from([("API".to_string(), a)]);
        assert!(Bindings::new(&spec, &kept).unwrap().placeholder_for("API").unwrap().starts_with("sk-opb_"));
    }

    #[test]
    fn specs_parse_and_refuse_nonsense() {
        let spec = BindingSpec::parse([], "OP_", &["api=api.example.com".into()], &["API".into()], &[]).unwrap();
        let bindings = Bindings::new(&spec, &BTreeMap::new()).unwrap();
        assert!(bindings.is_raw("API"));
        assert_eq!(bindings.placeholder_for("API"), None);
        assert!(BindingSpec::parse([], "OP_", &["api".into()], &[], &[]).is_err());
        assert!(BindingSpec::parse([], "OP_", &[], &["OTHER".into()], &[]).is_err());
        assert!(BindingSpec::parse([], "OP_", &["A=x.com".into()], &[], &["A=a/b".into()]).is_err());
    }
}
