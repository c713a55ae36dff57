//! Who is on the other end of a socket connection (SO_PEERCRED): the uid the listener checks
//! and shares its limits by, and the pid, gid and executable the audit log records. It sits
//! apart from the listener so the connection and the audit log, which the listener drives,
//! need not import it back.

use tokio::net::UnixStream;

/// Who is on the other end (SO_PEERCRED), for the uid check and the audit log.
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    /// The peer's executable, looked up once per connection and only for the audit log.
    pub exe: Option<String>,
}

impl Peer {
    /// The peer's credentials; `with_exe` also resolves `/proc/<pid>/exe`.
    pub fn of(stream: &UnixStream, with_exe: bool) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let exe = cred
            .pid()
            .filter(|_| with_exe)
            .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            .map(|path| path.display().to_string());
        Ok(Peer { pid: cred.pid(), uid: cred.uid(), gid: cred.gid(), exe })
    }
}
