//! The `file:PATH` backend: a JSON vault file for development, demos and CI.
//!
//! Format: `{"vault": {"item": {"field": "value", "section": {"field": "value"}}}}` — a
//! nested object under an item is a section. The same `op://` references work. The file is
//! re-read on every resolution (so REFRESH sees edits) and written back atomically: a
//! temporary file in the same directory, fsync, rename, keeping the file's mode.

use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::{Map, Value as Json};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{
    Backend, BackendError, BoxFuture, ErrorKind, FieldWrite, ItemWriteResult, Value, WriteOptions, check_writable,
    value_text,
};
// Also named through this path by `cache.rs`, whose rewrite moves it to `crate::fsutil`.
use crate::fsutil::write_atomic;
use crate::reference::SecretRef;
use crate::scrub::scrub;

/// Largest vault file read.
const MAX_FILE: u64 = 64 * 1024 * 1024;

pub struct FileVault {
    path: PathBuf,
    /// Serialises read-modify-write cycles of this process.
    write_lock: Mutex<()>,
}

/// A parsed vault whose strings are zeroized on drop.
struct Document(Json);

impl Drop for Document {
    fn drop(&mut self) {
        scrub(&mut self.0);
    }
}

impl FileVault {
    pub fn new(path: impl Into<PathBuf>) -> FileVault {
        FileVault { path: path.into(), write_lock: Mutex::new(()) }
    }

    fn load(&self) -> Result<Document, BackendError> {
        let fail = |kind, what: String| BackendError::new(kind, format!("vault file {}: {what}", self.path.display()));
        let meta = std::fs::metadata(&self.path).map_err(|e| fail(ErrorKind::Transient, e.to_string()))?;
        if meta.len() > MAX_FILE {
            return Err(fail(ErrorKind::Invalid, format!("larger than {MAX_FILE} bytes")));
        }
        let bytes = Zeroizing::new(std::fs::read(&self.path).map_err(|e| fail(ErrorKind::Transient, e.to_string()))?);
        // serde_json's messages quote no input, only line and column.
        let doc = Document(
            serde_json::from_slice(&bytes).map_err(|e| fail(ErrorKind::Invalid, format!("not valid JSON ({e})")))?,
        );
        if !doc.0.is_object() {
            return Err(fail(ErrorKind::Invalid, "top level must be an object of vaults".into()));
        }
        Ok(doc)
    }

    fn lookup(doc: &Document, r: &SecretRef) -> Result<Value, BackendError> {
        if r.query.is_some() {
            return Err(BackendError::new(
                ErrorKind::Invalid,
                format!("{r}: the file backend does not support ?attributes"),
            ));
        }
        let vault = doc.0.get(&r.vault).ok_or_else(|| {
            BackendError::new(ErrorKind::NotFound, format!("\"{}\" isn't a vault in {}", r.vault, "the vault file"))
        })?;
        let item = vault.get(&r.item).ok_or_else(|| {
            BackendError::new(ErrorKind::NotFound, format!("\"{}\" isn't an item in the \"{}\" vault", r.item, r.vault))
        })?;
        let holder = match &r.section {
            Some(section) => item.get(section),
            None => Some(item),
        };
        let no_field = || {
            BackendError::new(
                ErrorKind::NotFound,
                format!("item '{}/{}' does not have a field '{}'", r.vault, r.item, r.field),
            )
        };
        match holder.and_then(|h| h.get(&r.field)) {
            Some(Json::String(s)) => Ok(Zeroizing::new(s.as_bytes().to_vec())),
            Some(_) => Err(BackendError::new(ErrorKind::Invalid, format!("{r} is not a string field"))),
            None => Err(no_field()),
        }
    }

    /// One read-modify-write of the vault file carrying every field of `writes`.
    fn store(&self, writes: &[FieldWrite], options: WriteOptions) -> ItemWriteResult {
        let mut doc = self.load()?;
        let results: Vec<Result<(), BackendError>> =
            writes.iter().map(|w| Self::put(&mut doc, &w.reference, &w.value, options)).collect();
        if let Some(Err(err)) = results.iter().find(|r| r.as_ref().is_err_and(|e| e.kind == ErrorKind::NotFound)) {
            // A missing vault or item fails the whole item, as it does in 1Password.
            return Err(err.clone());
        }
        if results.iter().all(Result::is_err) {
            return Ok(results);
        }
        let mut bytes = crate::locked::ZeroizingWriter::with_capacity(4096);
        serde_json::to_writer_pretty(&mut bytes, &doc.0)
            .map_err(|e| BackendError::new(ErrorKind::Invalid, format!("cannot encode vault: {e}")))?;
        let mut bytes = bytes.0;
        crate::locked::extend_zeroizing(&mut bytes, b"\n");
        write_atomic(&self.path, &bytes, None).map_err(|e| {
            BackendError::new(ErrorKind::Transient, format!("cannot write {}: {e}", self.path.display()))
        })?;
        Ok(results)
    }

    /// Sets one field in the parsed document.
    fn put(doc: &mut Document, r: &SecretRef, value: &[u8], options: WriteOptions) -> Result<(), BackendError> {
        check_writable(r)?;
        let value = value_text(value)?;
        let missing = |what: String| BackendError::new(ErrorKind::NotFound, what);
        let vault = doc
            .0
            .as_object_mut()
            .and_then(|m| m.get_mut(&r.vault))
            .and_then(Json::as_object_mut)
            .ok_or_else(|| missing(format!("\"{}\" isn't a vault in the vault file", r.vault)))?;
        if !vault.contains_key(&r.item) {
            if !options.create_item {
                return Err(missing(format!("\"{}\" isn't an item in the \"{}\" vault", r.item, r.vault)));
            }
            vault.insert(r.item.clone(), Json::Object(Map::new()));
        }
        let mut holder = vault.get_mut(&r.item).and_then(Json::as_object_mut).ok_or_else(|| {
            BackendError::new(ErrorKind::Invalid, format!("op://{}/{} is not an object", r.vault, r.item))
        })?;
        if let Some(section) = &r.section {
            holder =
                holder.entry(section.clone()).or_insert_with(|| Json::Object(Map::new())).as_object_mut().ok_or_else(
                    || BackendError::new(ErrorKind::Invalid, format!("section {section} is not an object")),
                )?;
        }
        match holder.get_mut(&r.field) {
            Some(Json::String(old)) => zeroize::Zeroize::zeroize(old),
            Some(_) => return Err(BackendError::new(ErrorKind::Invalid, format!("{r} is not a text field"))),
            None => {}
        }
        holder.insert(r.field.clone(), Json::String(value.to_string()));
        Ok(())
    }
}

impl Backend for FileVault {
    fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        Box::pin(async move {
            match self.load() {
                Ok(doc) => refs.iter().map(|r| Self::lookup(&doc, r)).collect(),
                Err(err) => refs.iter().map(|_| Err(err.clone())).collect(),
            }
        })
    }

    fn write_item<'a>(&'a self, writes: &'a [FieldWrite], options: WriteOptions) -> BoxFuture<'a, ItemWriteResult> {
        Box::pin(async move {
            let _guard = self.write_lock.lock().await;
            self.store(writes, options)
        })
    }

    fn updated_at<'a>(&'a self, _reference: &'a SecretRef) -> BoxFuture<'a, Result<Option<SystemTime>, BackendError>> {
        // The file keeps no per-item times; its own mtime is when anything in it last changed.
        Box::pin(async move { Ok(std::fs::metadata(&self.path).and_then(|m| m.modified()).ok()) })
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(content: &str) -> (tempdir::Dir, FileVault) {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("vault.json");
        std::fs::write(&path, content).unwrap();
        (dir, FileVault::new(path))
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!("opb-file-{}-{}", std::process::id(), fastrand::u64(..)));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn resolves_fields_sections_and_reports_missing() {
        let (_d, v) = vault(r#"{"dev": {"api": {"key": "k1\n", "oauth": {"refresh": "r1"}}}}"#);
        let refs: Vec<SecretRef> =
            ["op://dev/api/key", "op://dev/api/oauth/refresh", "op://dev/api/nope", "op://x/api/key"]
                .iter()
                .map(|r| SecretRef::parse(r).unwrap())
                .collect();
        let got = v.resolve(&refs).await;
        assert_eq!(got[0].as_ref().unwrap().as_slice(), b"k1\n");
        assert_eq!(got[1].as_ref().unwrap().as_slice(), b"r1");
        assert_eq!(got[2].as_ref().unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(got[3].as_ref().unwrap_err().kind, ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn writes_atomically_and_keeps_other_fields() {
        let (d, v) = vault(r#"{"dev": {"api": {"key": "old", "other": "x"}}}"#);
        let r = SecretRef::parse("op://dev/api/key").unwrap();
        let one =
            |r: &SecretRef, v: &[u8]| vec![FieldWrite { reference: r.clone(), value: Zeroizing::new(v.to_vec()) }];
        v.write_item(&one(&r, b"new\nline"), WriteOptions::default()).await.unwrap();
        let doc: Json = serde_json::from_str(&std::fs::read_to_string(d.path().join("vault.json")).unwrap()).unwrap();
        assert_eq!(doc["dev"]["api"]["key"], "new\nline");
        assert_eq!(doc["dev"]["api"]["other"], "x");
        let missing = SecretRef::parse("op://dev/new-item/f").unwrap();
        let err = v.write_item(&one(&missing, b"v"), WriteOptions::default()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        v.write_item(&one(&missing, b"v"), WriteOptions { create_item: true }).await.unwrap();
        let query = SecretRef::parse("op://dev/api/key?attribute=type").unwrap();
        let refused = v.write_item(&one(&query, b"x"), WriteOptions::default()).await.unwrap();
        assert_eq!(refused[0].as_ref().unwrap_err().kind, ErrorKind::Invalid);
    }

    #[tokio::test]
    async fn garbage_file_is_a_clear_error() {
        let (_d, v) = vault("{not json");
        let got = v.resolve(&[SecretRef::parse("op://a/b/c").unwrap()]).await;
        let err = got[0].as_ref().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("not valid JSON"));
    }
}
