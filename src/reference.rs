//! 1Password secret references: `op://vault/item/[section/]field[?attribute=…]`.
//!
//! References are not secret (they name where a secret lives), so they may appear in logs,
//! errors and STATUS. Parsing is strict enough to reject what `op` would reject, so a typo is
//! reported as a permanent "invalid reference" before any API request is spent on it.

use std::fmt;

/// Longest reference accepted; 1Password's own names are far shorter.
pub const MAX_REF_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    pub vault: String,
    pub item: String,
    pub section: Option<String>,
    pub field: String,
    /// The raw query string after `?` (e.g. `attribute=otp`), if any.
    pub query: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid secret reference '{reference}': {reason}")]
pub struct RefError {
    pub reference: String,
    pub reason: &'static str,
}

impl SecretRef {
    pub fn parse(text: &str) -> Result<SecretRef, RefError> {
        let fail = |reason| RefError { reference: text.chars().take(200).collect(), reason };
        if text.len() > MAX_REF_LEN {
            return Err(fail("longer than 1024 bytes"));
        }
        let rest = text.strip_prefix("op://").ok_or_else(|| fail("must start with \"op://\""))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query.to_string())),
            None => (rest, None),
        };
        if path.chars().any(|c| c.is_control()) {
            return Err(fail("contains control characters"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(fail("has an empty segment"));
        }
        let (vault, item, section, field) = match parts.as_slice() {
            [vault, item, field] => (vault, item, None, field),
            [vault, item, section, field] => (vault, item, Some(section.to_string()), field),
            [_, _] | [_] => return Err(fail("too few segments (op://vault/item/[section/]field)")),
            _ => return Err(fail("too many segments (op://vault/item/[section/]field)")),
        };
        Ok(SecretRef { vault: vault.to_string(), item: item.to_string(), section, field: field.to_string(), query })
    }

    /// The vault and item this reference points into: the unit `op item get` fetches.
    pub fn item_key(&self) -> (&str, &str) {
        (&self.vault, &self.item)
    }

    /// Every name in the reference (vault, item, section, field): what an error message may
    /// quote back, and must not be mistaken for the error's wording.
    pub fn names(&self) -> Vec<&str> {
        let mut names = vec![self.vault.as_str(), self.item.as_str()];
        names.extend(self.field_names());
        names
    }

    /// The section (if any) and field names.
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.section.iter().map(String::as_str).collect();
        names.push(&self.field);
        names
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op://{}/{}/", self.vault, self.item)?;
        if let Some(section) = &self.section {
            write!(f, "{section}/")?;
        }
        f.write_str(&self.field)?;
        if let Some(query) = &self.query {
            write!(f, "?{query}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for SecretRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecretRef::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_three_and_four_segments() {
        let r = SecretRef::parse("op://Private/GitHub/token").unwrap();
        assert_eq!((r.vault.as_str(), r.item.as_str(), r.field.as_str()), ("Private", "GitHub", "token"));
        assert_eq!(r.section, None);
        let r = SecretRef::parse("op://Dev Vault/My Item/Security/one-time password?attribute=otp").unwrap();
        assert_eq!(r.section.as_deref(), Some("Security"));
        assert_eq!(r.query.as_deref(), Some("attribute=otp"));
        assert_eq!(r.to_string(), "op://Dev Vault/My Item/Security/one-time password?attribute=otp");
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "vault/item/field", "op://v/i", "op://v//f", "op://a/b/c/d/e", "op://v/i/f\n"] {
            assert!(SecretRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(SecretRef::parse(&format!("op://v/i/{}", "x".repeat(2000))).is_err());
    }
}
