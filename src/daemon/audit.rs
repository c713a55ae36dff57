//! The audit log: one JSON line per socket request (time, peer pid/uid/gid/exe, command,
//! name, result). Never a value. The file is created 0600 and appended to; `-` means stderr.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use super::connection::Peer;

pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let sink: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            Box::new(File::options().create(true).append(true).mode(0o600).open(path)?)
        };
        Ok(AuditLog { sink: Mutex::new(sink) })
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
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(sink, "{line}");
        let _ = sink.flush();
    }
}
