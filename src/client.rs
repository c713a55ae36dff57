//! The typed client of the socket protocol. It always speaks version 2, pipelining `HELLO 2`
//! with its first request so the upgrade costs no round trip.
//!
//! Before a byte is sent, the client checks who serves the socket (SO_PEERCRED): root, its
//! own uid, or the one uid it was told to trust. Anyone else could have bound the path first
//! to collect what clients send (a SET's value) or to feed them false values.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use zeroize::Zeroizing;

use crate::bufio::ZeroizingReader;
use crate::locked::extend_zeroizing;
use crate::protocol::{self, ProtocolError, Reply, Request, Version};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach op-bridge at {path}: {source}")]
    Unreachable { path: PathBuf, source: io::Error },
    #[error(
        "refusing to talk to {path}: it is served by uid {server}, not by root or uid {own}; another \
         process may be posing as op-bridge (if op-bridge really runs as uid {server}, pass --server-uid \
         {server})"
    )]
    UntrustedServer { path: PathBuf, server: u32, own: u32 },
    #[error("op-bridge at {path} did not answer within {after:?}")]
    Timeout { path: PathBuf, after: Duration },
    #[error("bad reply from op-bridge: {0}")]
    Protocol(#[from] ProtocolError),
    /// The daemon answered `ERR …`.
    #[error("{0}")]
    Refused(String),
}

impl ClientError {
    /// The exit code of DESIGN §2: 1 for an ERR answer, 3 when the daemon is unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused(message) if message.starts_with(crate::protocol::PENDING) => crate::exit::PENDING,
            ClientError::Refused(message) if message.starts_with(crate::protocol::NOT_JOURNALED) => {
                crate::exit::NOT_JOURNALED
            }
            ClientError::Refused(_) => crate::exit::ERR,
            _ => crate::exit::UNREACHABLE,
        }
    }
}

pub struct Client {
    path: PathBuf,
    reader: ZeroizingReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    version: Version,
    hello_sent: bool,
    timeout: Duration,
}

impl Client {
    /// Connects to a server of root or our own uid.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        Self::connect_trusting(path, timeout, None).await
    }

    /// Connects to a server of root, our own uid, or `server_uid`; any other is refused
    /// before anything is written.
    pub async fn connect_trusting(
        path: &Path,
        timeout: Duration,
        server_uid: Option<u32>,
    ) -> Result<Client, ClientError> {
        let unreachable = |source| ClientError::Unreachable { path: path.to_path_buf(), source };
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(stream) => stream.map_err(unreachable)?,
            Err(_) => return Err(ClientError::Timeout { path: path.to_path_buf(), after: timeout }),
        };
        let server = stream.peer_cred().map_err(unreachable)?.uid();
        let own = nix::unistd::geteuid().as_raw();
        if server != 0 && server != own && Some(server) != server_uid {
            return Err(ClientError::UntrustedServer { path: path.to_path_buf(), server, own });
        }
        let (read, writer) = stream.into_split();
        Ok(Client {
            path: path.to_path_buf(),
            reader: ZeroizingReader::new(read),
            writer,
            version: Version::V2,
            hello_sent: false,
            timeout,
        })
    }

    /// Sends several requests in one write and reads their replies in order.
    pub async fn call_many(&mut self, requests: &[Request]) -> Result<Vec<Reply>, ClientError> {
        let path = self.path.clone();
        let after = self.timeout;
        match tokio::time::timeout(after, self.exchange(requests)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { path, after }),
        }
    }

    async fn exchange(&mut self, requests: &[Request]) -> Result<Vec<Reply>, ClientError> {
        let mut wire = Zeroizing::new(Vec::new());
        let mut hello_pending = false;
        // An ERR to HELLO is either a version-1 daemon (which goes on answering) or a refusal
        // followed by a close; in the second case it is the error to report.
        let mut hello_refused = None;
        if !self.hello_sent {
            self.hello_sent = true;
            extend_zeroizing(&mut wire, b"HELLO 2\n");
            hello_pending = true;
            // SET is encoded differently in each version, so the version must be known before
            // one is sent: a version-1 daemon would store a framed SET's length as the value.
            if requests.iter().any(|r| matches!(r, Request::Set { .. })) {
                self.send(&wire).await?;
                wire.clear();
                hello_refused = self.read_hello().await?;
                hello_pending = false;
            }
        }
        for request in requests {
            if let Request::Set { value, .. } = request
                && self.version == Version::V1
                && value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
            {
                return Err(hello_refused.map(ClientError::Refused).unwrap_or_else(|| {
                    ClientError::Protocol(ProtocolError::Malformed(
                        "the daemon only speaks protocol version 1, which cannot carry a value with a line break \
                         or NUL byte"
                            .into(),
                    ))
                }));
            }
            extend_zeroizing(&mut wire, &protocol::encode_request(request, self.version));
        }
        if let Err(err) = self.send(&wire).await {
            return Err(hello_refused.map(ClientError::Refused).unwrap_or(err));
        }
        if hello_pending {
            hello_refused = self.read_hello().await?;
        }
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests {
            let expect_value = matches!(request, Request::Get(_));
            match protocol::read_reply(&mut self.reader, self.version, expect_value).await {
                Ok(reply) => replies.push(reply),
                Err(err) => {
                    return Err(match hello_refused.take() {
                        Some(message) => ClientError::Refused(message),
                        None => err.into(),
                    });
                }
            }
        }
        Ok(replies)
    }

    async fn send(&mut self, wire: &[u8]) -> Result<(), ClientError> {
        let Err(source) = self.writer.write_all(wire).await else { return Ok(()) };
        // A daemon that turns the connection away (peer check, connection limit) answers ERR
        // and closes without reading; its reason beats "broken pipe".
        if let Ok(Reply::Err(message)) = protocol::read_reply(&mut self.reader, Version::V1, false).await {
            return Err(ClientError::Refused(message));
        }
        Err(ClientError::Unreachable { path: self.path.clone(), source })
    }

    /// Reads the answer to `HELLO 2` and settles the version; returns the ERR text, if any.
    async fn read_hello(&mut self) -> Result<Option<String>, ClientError> {
        let (version, refused) = match protocol::read_reply(&mut self.reader, Version::V1, false).await? {
            Reply::Ok(v) if v == "2" => (Version::V2, None),
            Reply::Err(message) => (Version::V1, Some(message)),
            Reply::Ok(_) | Reply::Value(_) => (Version::V1, None),
        };
        self.version = version;
        Ok(refused)
    }

    /// One request; an `ERR` reply becomes [`ClientError::Refused`].
    pub async fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let reply = self.call_many(std::slice::from_ref(&request)).await?.pop();
        match reply {
            Some(Reply::Err(message)) => Err(ClientError::Refused(message)),
            Some(reply) => Ok(reply),
            None => Err(ClientError::Protocol(ProtocolError::Truncated)),
        }
    }

    /// The value of a name or reference.
    pub async fn get(&mut self, target: &str) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        match self.call(Request::Get(target.to_string())).await? {
            Reply::Value(value) => Ok(value),
            Reply::Ok(_) | Reply::Err(_) => {
                Err(ClientError::Protocol(ProtocolError::Malformed("GET reply without a value".into())))
            }
        }
    }

    /// A request whose reply is `OK [text]`; returns the text.
    pub async fn simple(&mut self, request: Request) -> Result<String, ClientError> {
        match self.call(request).await? {
            Reply::Ok(text) => Ok(text),
            _ => Err(ClientError::Protocol(ProtocolError::Malformed("unexpected value in reply".into()))),
        }
    }
}

/// A client command's failure (the exit code of DESIGN §2 comes from it).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Client(err) => err.exit_code(),
            CommandError::Usage(_) => crate::exit::USAGE,
            CommandError::Io(_) => crate::exit::ERR,
        }
    }
}
