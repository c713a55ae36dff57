//! The audit log: one JSON line per socket request (time, peer pid/uid/gid/exe, command,
//! name, result). Never a value. The file is created 0600 and appended to; `-` means stderr.
//!
//! Lines go through the lossy non-blocking writer of [`crate::logging`] (a stalled reader
//! costs dropped, counted lines, never a stalled broker) unless `strict` is asked for, in
//! which case every request waits until its line is written.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use super::peer::Peer;
use crate::logging::Sink;

pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl AuditLog {
    pub fn open(path: &Path, strict: bool) -> std::io::Result<AuditLog> {
        let target: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            Box::new(File::options().create(true).append(true).mode(0o600).open(path)?)
        };
        let sink = if strict { target } else { Box::new(crate::logging::non_blocking(Sink::Audit, target)) };
        Ok(AuditLog { sink: Mutex::new(sink) })
    }

    /// Writes one line made elsewhere (the proxy's); it must hold no value.
    pub fn record_json(&self, line: serde_json::Value) {
        let line = format!("{line}\n");
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.write_all(line.as_bytes());
        let _ = sink.flush();
    }

    pub fn record(&self, peer: &Peer, command: &str, name: Option<&str>, result: &str) {
        let time = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let line = serde_json::json!({
            "time": time,
            "pid": peer.pid,
            "uid": peer.uid,
            "gid": peer.gid,
            "exe": peer.exe,
            "command": command,
            "name": name,
            "result": result,
        });
        // One write per line: the non-blocking writer queues (or drops) each write whole.
        let line = format!("{line}\n");
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.write_all(line.as_bytes());
        let _ = sink.flush();
    }
}
